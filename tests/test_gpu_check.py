"""`python -m mplus_lightning.gpu_check`: the tiny shape runs on CPU end to end (what a GPU run does at 8B size)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mplus_lightning import gpu_check
from mplus_lightning.bench import SHAPES, random_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_result():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "mplus_lightning.gpu_check", "--shape", "tiny", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, "one JSON line on stdout"
    return json.loads(lines[0])


@pytest.mark.slow
def test_tiny_check_runs_every_part_on_cpu_well_under_a_minute(tiny_result):
    r = tiny_result
    assert r["wall_s"] < 45, "the check itself (imports aside) must stay well under a minute on CPU"
    inf = r["inference"]
    assert set(inf["placements"]) == set(gpu_check.PLACEMENTS)
    for p in inf["placements"].values():
        assert p["prefill_ms"] > 0 and p["decode_ms_per_token"] > 0 and p["decode_ms_per_token_unfolded"] > 0
        assert p["prefill_tokens_per_s"] > 0 and p["peak_gib"] is None       # peak memory is measured on CUDA
    assert inf["decode_tokens_agree_with_layer_path"] == {"folded": 1.0, "unfolded": 1.0}
    assert inf["prefill_flops"] > 0 and inf["inject_ms_per_chunk"] > 0
    kinds = r["training"]["kinds"]
    assert list(kinds) == list(gpu_check.TRAINING_KINDS)
    for k in kinds.values():
        assert k["flops"] > 0 and k["tokens"] > 0 and k["ratio_to_plain"] > 0
    assert r["training"]["plain_llama"]["tokens"] == max(k["tokens"] for k in kinds.values())
    assert r["memory"]["ltm_rows_per_layer"] == gpu_check.WORKLOADS["tiny"].ltm_rows
    assert r["met"] == {k: None for k in gpu_check.TARGETS}, "targets are judged on a GPU only"


def test_the_8b_shape_on_cpu_is_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--shape", "8b", "--device", "cpu"])
    assert "--shape 8b needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--shape", "tiny", "--placements", "gpu"])
    assert "--placements: unknown ['gpu']" in capsys.readouterr().err
    # a path the JSON cannot be written to is refused before the run, not after minutes of GPU time
    with pytest.raises(SystemExit):
        gpu_check.main(["--shape", "tiny", "--device", "cpu", "--out", __file__ + "/check.json"])
    assert "is a file" in capsys.readouterr().err


def test_verdicts_compare_the_best_placement_with_each_target():
    def result(decode, prefill, ratios, host_peak):
        placements = {"device": {"decode_ms_per_token": decode, "prefill_ms": prefill, "peak_gib_unfolded": 60.0},
                      "rows_on_host": {"decode_ms_per_token": decode + 1, "prefill_ms": prefill + 50,
                                       "peak_gib_unfolded": host_peak}}
        return {"device": "cuda", "inference": {"placements": placements},
                "training": {"kinds": {str(i): {"ratio_to_plain": x} for i, x in enumerate(ratios)}}}

    assert gpu_check.verdicts(result(9.0, 35.0, [0.6, 0.7], 21.5)) == {
        "decode_ms_per_token": True, "prefill_ms": True, "training_mfu_ratio_to_plain": True,
        "peak_gib_ltm_on_host": True}
    assert gpu_check.verdicts(result(12.0, 41.0, [0.6, 0.4], 23.0)) == {
        "decode_ms_per_token": False, "prefill_ms": False, "training_mfu_ratio_to_plain": False,
        "peak_gib_ltm_on_host": False}


def test_the_decode_latency_per_token_is_the_difference_of_the_two_timings_over_the_tokens_after_the_first(
        monkeypatch):
    work = gpu_check.WORKLOADS["tiny"]
    shape = dataclasses.replace(SHAPES["tiny"], chunk_tokens=min(SHAPES["tiny"].chunk_tokens, work.inject_tokens))
    device = torch.device("cpu")
    model, memory = gpu_check.build(shape, work, device, torch.float32)
    prompt = random_ids(shape, work.prompt_tokens, torch.Generator().manual_seed(2), device)
    new = work.new_tokens
    # prefill; then per fold: one token, `new` tokens (unfolded 5 ms a token after the first, folded 2 ms)
    times = iter([0.004, 0.010, 0.010 + (new - 1) * 0.005, 0.008, 0.008 + (new - 1) * 0.002])
    monkeypatch.setattr(gpu_check, "_median_time", lambda clock, fn, repeats: next(times))
    out = gpu_check.check_placement(model, memory, shape, work, device, prompt, None)
    assert out["prefill_ms"] == pytest.approx(4.0)
    assert out["decode_ms_per_token_unfolded"] == pytest.approx(5.0)
    assert out["decode_ms_per_token"] == pytest.approx(2.0) and out["decode_tokens_per_s"] == pytest.approx(500.0)


def test_each_training_kinds_ratio_to_plain_is_its_rate_over_the_plain_llamas(tiny_result):
    plain = tiny_result["training"]["plain_llama"]["tflops_per_s"]
    for name, kind in tiny_result["training"]["kinds"].items():
        assert kind["ratio_to_plain"] == pytest.approx(kind["tflops_per_s"] / plain, rel=1e-3), name

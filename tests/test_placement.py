"""Memory placement: long-term rows (and keys) in host memory read, generate and commit exactly as on the device.

On CPU the host and the device are the same memory, but the host code paths run (the chunked gather through the
staging buffers, the per-layer key copies); page-locking and the CUDA-only tests need a GPU.
"""
import json

import pytest
import torch

from mplus_lightning import MemoryState, MPlus, tiny_config
from mplus_lightning.model import memory as memory_module
from mplus_lightning.model.memory import LTM_PLACEMENTS

from .conftest import random_ids, randomize_adapters

PLACEMENTS = [("host", "device"), ("device", "host"), ("host", "host")]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_adapters(MPlus(tiny_config(ltm_capacity=120)).eval())


def filled(model: MPlus, chunks: int = 12) -> MemoryState:
    """A memory whose long-term part holds more rows than a read retrieves (so retrieval chooses)."""
    mem = model.new_memory()
    for s in range(chunks):
        model.inject(mem, random_ids(16, seed=s + 1), generator=torch.Generator().manual_seed(s))
    assert len(mem.ltm) > 2 * model.config.ltm_read_rows
    return mem


@pytest.mark.parametrize("rows,keys", PLACEMENTS)
def test_host_placement_reads_and_generates_like_the_device(model, rows, keys, monkeypatch):
    monkeypatch.setattr(memory_module, "GATHER_CHUNK_ROWS", 5)   # several chunks, both staging buffers, reused
    mem = filled(model)
    prompt = random_ids(6, batch=2, seed=7)
    logits, picked = model.read(mem, prompt, return_retrieved=True)
    ids = model.generate(mem, prompt, 5, eos_token_id=None)
    placed = mem.clone().place("cpu", ltm_rows=rows, ltm_keys=keys)
    assert placed.ltm.placement() == {"rows": rows, "keys": keys, "device": "cpu"}
    placed_logits, placed_picked = model.read(placed, prompt, return_retrieved=True)
    assert torch.equal(placed_picked, picked)
    assert torch.equal(placed_logits, logits), "host-placed long-term memory changed the logits"
    assert torch.equal(model.generate(placed, prompt, 5, eos_token_id=None), ids)
    assert not placed.ltm.keys.is_pinned(), "page-locked only when CUDA is there"


@pytest.mark.parametrize("rows,keys", PLACEMENTS)
def test_commits_into_a_host_placed_store_match_the_device_until_full_and_after(model, rows, keys):
    on_device, placed = model.new_memory(), model.new_memory().place("cpu", ltm_rows=rows, ltm_keys=keys)
    capacity = model.config.ltm_capacity
    for s in range(18):   # 17 commits of K=8 rows: past the capacity of 120, the oldest rows leave (scatter path)
        for mem in (on_device, placed):
            model.inject(mem, random_ids(16, seed=s + 1), generator=torch.Generator().manual_seed(s))
    assert len(placed.ltm) == len(on_device.ltm) == capacity
    for l in range(model.config.num_layers):
        for a, b in zip(placed.ltm.view(l), on_device.ltm.view(l)):
            assert torch.equal(a, b)
    assert placed.ltm.placement()["rows"] == rows and placed.ltm.placement()["keys"] == keys


def test_clone_empty_like_and_dtype_casts_keep_the_placement_and_to_a_device_brings_everything_back(model):
    mem = filled(model, chunks=6).place("cpu", ltm_rows="host", ltm_keys="host")
    copy = mem.clone()
    assert copy.ltm.placement()["rows"] == "host" and copy.ltm.rows is not mem.ltm.rows
    assert mem.with_empty_ltm().ltm.placement()["keys"] == "host"
    mem.to(dtype=torch.float64)
    assert mem.ltm.placement()["rows"] == "host" and mem.ltm.rows.dtype == torch.float64
    mem.to("cpu")
    assert mem.ltm.placement() == {"rows": "device", "keys": "device", "device": "cpu"}


def test_an_unknown_placement_is_an_error_naming_the_argument(model):
    mem = model.new_memory()
    with pytest.raises(ValueError, match="ltm_rows must be 'host' or 'device'"):
        mem.place("cpu", ltm_rows="gpu")
    with pytest.raises(ValueError, match="ltm_keys must be 'host' or 'device'"):
        mem.place("cpu", ltm_keys="disk")


def test_gather_returns_the_indexed_rows_in_order(model, monkeypatch):
    monkeypatch.setattr(memory_module, "GATHER_CHUNK_ROWS", 3)
    ltm = filled(model, chunks=6).ltm.place("cpu", rows="host")
    idx = torch.tensor([[5, 0, 17, 3, 3, 9, 1], [2, 2, 8, 11, 4, 0, 6]])
    out = ltm.gather(1, idx, torch.device("cpu"), torch.float64)
    assert out.dtype == torch.float64 and out.shape == (2, 7, ltm.hidden_size)
    assert torch.equal(out, ltm.view(1)[0][idx].double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked memory, copies to the GPU)")
def test_on_cuda_host_parts_are_in_host_memory_and_reads_match(model):
    model = model.to("cuda")
    mem = filled(model)
    prompt = random_ids(6, seed=7).cuda()
    logits = model.read(mem, prompt)
    mem.place("cuda", ltm_rows="host", ltm_keys="host")
    assert mem.ltm.rows.device.type == "cpu" and mem.ltm.keys.is_pinned() and mem.ltm.ages.is_cuda
    torch.testing.assert_close(model.read(mem, prompt), logits, rtol=0, atol=0)


def test_evaluate_cost_measures_m_plus_once_per_placement(tmp_path, capsys):
    from mplus_lightning.evaluate import main
    from tests.test_eval_fixtures import make_env

    model_dir, _ = make_env(tmp_path / "env")
    out = tmp_path / "cost"
    argv = ["cost", "--model", str(model_dir), "--out", str(out), "--no-progress", "lengths=[160]",
            "window_tokens=64", "chunk_tokens=16", "prefill_block=32", "methods=[mplus,memoryllm]",
            "placements=[device,rows_on_host,all_on_host]", "tensorboard=false"]
    assert main(argv) == 0
    res = json.loads((out / "cost.json").read_text())
    rows = {(r["method"], r["placement"]): r for r in res["rows"]}
    assert set(rows) == {("mplus", p) for p in LTM_PLACEMENTS} | {("memoryllm", "device")}
    device, host_rows, host_all = (rows[("mplus", p)] for p in ("device", "rows_on_host", "all_on_host"))
    assert device["ltm_rows_per_layer"] == host_rows["ltm_rows_per_layer"] == 64 and device["latency_s"] > 0
    assert device["ltm_on_device_mb"] > host_rows["ltm_on_device_mb"] > host_all["ltm_on_device_mb"] > 0  # ages stay
    assert device["ltm_on_device_mb"] == pytest.approx(device["ltm_mb"])
    assert "| rows_on_host |" in (out / "cost.md").read_text()
    assert main([*argv[:-2], "placements=[gpu]", "overwrite=true"]) != 0
    assert "placements must be a non-empty subset of ['device', 'rows_on_host', 'all_on_host']" in \
        capsys.readouterr().err

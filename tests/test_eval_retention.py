"""End-to-end retention runs on a tiny random checkpoint: outputs, scoring, resume, and the CLI's bad-input errors."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mplus_lightning import tiny_config
from mplus_lightning.eval import retention
from mplus_lightning.eval.io import ResultStore
from mplus_lightning.eval.metrics import exact_hit, qa_f1
from mplus_lightning.evaluate import main
from tests.test_eval_fixtures import (
    TINY_RETENTION,
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
    retention_args,
    squad_env,
    squad_json,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    return (*squad_env(root), root)


def args(env, out, *extra):
    model_dir, data, _ = env
    return retention_args(model_dir, data, out, *extra)


def lines(path):
    return path.read_text().splitlines()


def test_end_to_end_outputs(env, tmp_path):
    out = tmp_path / "out"
    assert main(args(env, out, "num_items=3")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "squad" and res["num_items"] == 3 and res["distances"] == [0, 64, 128]
    assert set(res["modes"]) == {"mplus", "memoryllm"}
    for curve in res["modes"].values():
        assert len(curve["exact_hit"]) == len(curve["qa_f1"]) == 3 and curve["n"] == 3
        assert all(0 <= v <= 1 for v in curve["exact_hit"] + curve["qa_f1"])
        assert curve["tokens"] == [0, 64, 128] and curve["injections"] == [0, 2, 4]   # 32-token distractors
    assert res["borderline"]["n"] == 3
    theory = res["theory"]["mplus"]
    assert (theory["N"], theory["K"]) == (32, 8) and len(theory["exact_hit"]) == 3
    png = (out / "retention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    recs = [json.loads(x) for x in lines(out / "items.jsonl")]
    assert len(recs) == 9 and {r["kind"] for r in recs} == {"borderline", "mplus", "memoryllm"}
    assert [r["id"] for r in recs if r["kind"] == "mplus"] == ["q0", "q2", "q4"]        # index file order
    for r in recs:                                                                     # scores match predictions
        for p in r.get("points", [r]):
            assert p["exact_hit"] == int(exact_hit(p["prediction"], r["answer"]))
            assert p["qa_f1"] == pytest.approx(qa_f1(p["prediction"], r["answer"]))


def test_scoring_pipeline_counts_hits(env, tmp_path):
    """Questions whose gold answer is what the model says without context must score 1.0 on the borderline."""
    model_dir, data, root = env
    out = tmp_path / "first"
    assert main(args(env, out, "num_items=3", "modes=[mplus]")) == 0
    said = {r["id"]: r["prediction"].strip() for r in map(json.loads, lines(out / "items.jsonl"))
            if r["kind"] == "borderline"}
    assert all(said.values()), said
    dev = json.loads((data / "dev-v2.0.json").read_text())
    for para in dev["data"][0]["paragraphs"]:
        for qa in para["qas"]:
            if qa["id"] in said:
                qa["answers"] = [{"text": said[qa["id"]], "answer_start": 0}]
    d2 = root / "parrot"
    d2.mkdir(exist_ok=True)
    (d2 / "dev-v2.0.json").write_text(json.dumps(dev))
    (d2 / "train-v2.0.json").write_text((data / "train-v2.0.json").read_text())
    np.save(d2 / "indices_squad_3.npy", np.load(data / "indices_squad_3.npy"))
    out2 = tmp_path / "second"
    assert main(["retention", "--model", str(model_dir), "--data", str(d2), "--out", str(out2), *TINY_RETENTION,
                 "num_items=3", "modes=[mplus]"]) == 0
    res = json.loads((out2 / "results.json").read_text())
    assert res["borderline"]["exact_hit"] == 1.0


def test_resume_after_interrupt_skips_finished_items(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_add = ResultStore.add
    calls = {"n": 0}

    def interrupted_add(self, rec):
        if calls["n"] == 4:          # item 0: borderline, mplus, memoryllm; item 1: borderline; then "Ctrl-C"
            raise KeyboardInterrupt
        calls["n"] += 1
        real_add(self, rec)

    monkeypatch.setattr(ResultStore, "add", interrupted_add)
    sigint = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):                      # Lightning's graceful shutdown on Ctrl-C: exit status 1
        main(args(env, out))
    signal.signal(signal.SIGINT, sigint)                 # which ignores further Ctrl-Cs: give pytest its handler back
    monkeypatch.setattr(ResultStore, "add", real_add)
    before = lines(out / "items.jsonl")
    assert len(before) == 4 and not (out / "results.json").exists()

    seen = []
    real_item = retention._retention_item

    def counting_item(model, base, tok, cfg, index, item, *rest):
        seen.append(item.id)
        return real_item(model, base, tok, cfg, index, item, *rest)

    monkeypatch.setattr(retention, "_retention_item", counting_item)
    assert main(args(env, out)) == 0
    after = lines(out / "items.jsonl")
    assert seen == ["q2", "q4", "q5"]                        # item 0 (q0) was finished, it is not redone
    assert after[:4] == before and len(after) == 12          # 4 items x (borderline + 2 modes), nothing twice
    assert len({(json.loads(x)["kind"], json.loads(x)["id"]) for x in after}) == 12
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_items"] == 1 and res["new_items"] == 3 and res["num_items"] == 4
    # identical to an uninterrupted run (evictions are seeded per item)
    fresh = tmp_path / "fresh"
    assert main(args(env, fresh)) == 0
    ref = json.loads((fresh / "results.json").read_text())
    assert res["modes"] == ref["modes"] and res["borderline"] == ref["borderline"]
    # a third run has nothing left to do
    seen.clear()
    assert main(args(env, out)) == 0
    assert seen == [] and json.loads((out / "results.json").read_text())["skipped_items"] == 4


def test_resume_repairs_a_half_written_line_and_refuses_other_settings(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(env, out, "num_items=2")) == 0
    full = lines(out / "items.jsonl")
    with open(out / "items.jsonl", "w") as f:                 # the process died while writing the last line
        f.write("\n".join(full[:-1]) + "\n" + full[-1][:25])
    assert main(args(env, out, "num_items=2")) == 0
    repaired = lines(out / "items.jsonl")
    assert len(repaired) == len(full) and all(json.loads(x) for x in repaired)
    capsys.readouterr()
    assert main(args(env, out, "num_items=2", "distances=[0,64]")) == 2
    err = capsys.readouterr().err
    assert "different retention run" in err and "distances" in err and "overwrite=true" in err
    assert main(args(env, out, "num_items=2", "distances=[0,64]", "--overwrite")) == 0
    assert json.loads((out / "results.json").read_text())["distances"] == [0, 64]


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_cli_missing_model_dir(env, tmp_path, capsys):
    _, data, _ = env
    assert main(["retention", "--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "model directory" in err and "does not exist" in err and "config.json" in err
    (tmp_path / "empty").mkdir()
    assert main(["retention", "--model", str(tmp_path / "empty"), "--data", str(data)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["retention", "--data", str(data)]) == 2
    assert "needs `model`" in capsys.readouterr().err


def test_cli_missing_data(env, tmp_path, capsys):
    model_dir, _, _ = env
    assert main(["retention", "--model", str(model_dir), "--data", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "dev-v2.0.json" in err and "val_data.json" in err
    assert main(["retention", "--model", str(model_dir)]) == 2
    assert "retention needs --data" in capsys.readouterr().err
    assert main(["longbook", "--model", str(model_dir), "--data", str(tmp_path / "book.jsonl")]) == 2
    assert "longbook_qa_eng.jsonl" in capsys.readouterr().err
    (tmp_path / "lb").mkdir()
    assert main(["longbench", "--model", str(model_dir), "--data", str(tmp_path / "lb")]) == 2
    assert "subset '2wikimqa' not found" in capsys.readouterr().err


def test_cli_bad_keys_tokenizer_and_malformed_data(env, tmp_path, capsys):
    model_dir, data, root = env
    assert main(["retention", "--model", str(model_dir), "--data", str(data), "distances=[0,10]", "foo=1"]) == 2
    assert "unknown key 'foo'" in capsys.readouterr().err
    assert main(["retention", "--model", str(model_dir), "--data", str(data), "seed=abc"]) == 2
    assert "'seed'" in capsys.readouterr().err
    assert main(args(env, tmp_path / "o", "--tokenizer", str(tmp_path))) == 2
    assert "no tokenizer in" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dev-v2.0.json").write_text(json.dumps(squad_json(random.Random(0), 2))[:-30])
    assert main(["retention", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "dev-v2.0.json:1: malformed JSON" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mplus_lightning.evaluate", "cost", "--model", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("release, modes", [("mplus-tiny", {"mplus", "memoryllm"}), ("memoryllm-tiny", {"memoryllm"})])
def test_official_release_directories(env, tmp_path, release, modes):
    """The official layout loads as is (weights and memory from model.safetensors); the tokenizer comes from
    --tokenizer because the release fixture has none. A MemoryLLM checkpoint has only the memoryllm mode."""
    model_dir, data, _ = env
    official = Path(__file__).parent / "fixtures" / "official" / release
    out = tmp_path / release
    assert main(["retention", "--model", str(official), "--tokenizer", str(model_dir), "--data", str(data),
                 "--out", str(out), *TINY_RETENTION, "num_items=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["modes"]) == modes and res["num_items"] == 2


def test_the_theory_curve_starts_at_the_first_point_and_decays_by_the_surviving_fraction():
    # a_t = a_b + (a_u - a_b) * ((N - K) / N) ** (injections_t - injections_0), a_u the first point, a_b borderline
    config = tiny_config()                       # N = 32, K = 8: a row survives an injection with 0.75
    store = {("borderline", "a"): {"exact_hit": 0, "qa_f1": 0.2},
             ("mplus", "a"): {"points": [
                 {"exact_hit": 1, "qa_f1": 1.0, "tokens": 0, "injections": 0},
                 {"exact_hit": 1, "qa_f1": 0.6, "tokens": 40, "injections": 2},
                 {"exact_hit": 0, "qa_f1": 0.2, "tokens": 100, "injections": 5}]}}
    out = retention.summarize(SimpleNamespace(store=store), ["a"], ["mplus"], [0, 40, 100],
                              SimpleNamespace(borderline=True, model="m"), "squad", config)
    theory = out["theory"]["mplus"]
    assert theory["qa_f1"] == pytest.approx([1.0, 0.2 + 0.8 * 0.75 ** 2, 0.2 + 0.8 * 0.75 ** 5])
    assert theory["exact_hit"] == pytest.approx([1.0, 0.75 ** 2, 0.75 ** 5])

"""LongBench, LongBook QA / Event-QA and cost runs end to end on a tiny random checkpoint."""

import itertools
import json
import time
from types import SimpleNamespace

import pytest
import torch

from mplus_lightning.data.eval_sets.longbench import build_long_input
from mplus_lightning.eval import cost, longqa, runtime
from mplus_lightning.eval.cost import PeakMemory
from mplus_lightning.eval.metrics import longbench_score, qa_f1
from mplus_lightning.evaluate import main
from tests.test_eval_fixtures import (
    make_env,
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
    write_event_qa,
    write_longbench,
    write_longbook,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("longqa")
    model_dir, _ = make_env(root)
    return model_dir, root


def records(out):
    return [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]


def test_longbench_end_to_end(env, tmp_path, monkeypatch):
    model_dir, root = env
    data = write_longbench(tmp_path / "lb", subsets=("hotpotqa", "qasper"), n=2, words=150)
    injected = []
    real_inject = runtime.inject
    monkeypatch.setattr("mplus_lightning.eval.longqa.inject",
                        lambda model, mem, ids, gen, mode="mplus": (injected.append(list(ids)),
                                                                    real_inject(model, mem, ids, gen, mode)))
    out = tmp_path / "out"
    assert main(["longbench", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
                 "subsets=[hotpotqa,qasper]", "max_length=300", "window_tokens=64", "chunk_tokens=32",
                 "methods=[mplus,memoryllm,window]", "max_new_tokens.qasper=6", "max_new_tokens.hotpotqa=4",
                 "baseline_max_length=100"]) == 0
    recs = records(out)
    assert len(recs) == 2 * 2 * 3
    by = {(r["method"], r["subset"], r["id"]): r for r in recs}
    # the memory model: tail truncation to 300 - gen, window of 64 - gen, the rest in 32-token chunks, injected once
    # for both memory modes (one stream, two reads)
    r = by[("mplus", "hotpotqa", "hotpotqa-0")]
    assert r["window_tokens"] == 60 and r["memory_tokens"] == 296 - 60 and r["chunks"] == len(
        build_long_input(list(range(3, 299)), gen_tokens=4, window_tokens=64, chunk_tokens=32).chunks)
    assert by[("memoryllm", "hotpotqa", "hotpotqa-0")]["chunks"] == r["chunks"]
    assert len(injected) == sum(by[("mplus", s, i)]["chunks"] for (_, s, i) in by if _ == "mplus")
    assert all(len(c) <= 32 + 15 for c in injected)
    assert by[("window", "qasper", "qasper-1")]["window_tokens"] == 100 - 6        # backbone on the last tokens
    # scores: per item the best gold answer; per subset 100 x mean, 2 dp; Avg over subsets
    res = json.loads((out / "results.json").read_text())
    for m in ("mplus", "memoryllm", "window"):
        for s in ("hotpotqa", "qasper"):
            items = [x for x in recs if x["method"] == m and x["subset"] == s]
            for x in items:
                assert x["qa_f1"] == pytest.approx(qa_f1(x["prediction"], x["answers"]))
            assert res["scores"][m][s] == longbench_score([x["qa_f1"] for x in items])
        assert res["scores"][m]["avg"] == round((res["scores"][m]["hotpotqa"] + res["scores"][m]["qasper"]) / 2, 2)
    table = (out / "results.md").read_text()
    assert "| method | hotpotqa | qasper | Avg |" in table and table.count("\n| ") >= 4
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # resuming finds everything done: no new injections, identical results
    injected.clear()
    assert main(["longbench", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
                 "subsets=[hotpotqa,qasper]", "max_length=300", "window_tokens=64", "chunk_tokens=32",
                 "methods=[mplus,memoryllm,window]", "max_new_tokens.qasper=6", "max_new_tokens.hotpotqa=4",
                 "baseline_max_length=100"]) == 0
    assert injected == [] and json.loads((out / "results.json").read_text())["scores"] == res["scores"]


def test_longbook_qa_and_event_qa(env, tmp_path):
    model_dir, root = env
    book = write_longbook(tmp_path / "longbook_qa_eng.jsonl", n=2, words=200)
    out = tmp_path / "qa"
    assert main(["longbook", "--model", str(model_dir), "--data", str(book), "--out", str(out), "--no-progress",
                 "window_tokens=64", "chunk_tokens=32", "max_new_tokens=5", "baseline_max_length=80"]) == 0
    recs = records(out)
    assert {r["method"] for r in recs} == {"mplus", "window"} and len(recs) == 4
    res = json.loads((out / "results.json").read_text())
    assert res["scale"] == "QA-F1 (0-1)"
    assert res["scores"]["mplus"]["longbook_qa"] == pytest.approx(
        sum(r["qa_f1"] for r in recs if r["method"] == "mplus") / 2, abs=1e-4)
    mp = [r for r in recs if r["method"] == "mplus"]
    assert all(r["truncated"] == 0 and r["chunks"] > 5 for r in mp)       # the whole book went through memory

    ev = write_event_qa(tmp_path / "ev.jsonl", n=3)
    for scoring in ("letter", "loglik"):
        out = tmp_path / f"ev-{scoring}"
        assert main(["longbook", "--model", str(model_dir), "--data", str(ev), "--out", str(out), "--no-progress",
                     "task=event_qa", f"event_scoring={scoring}", "window_tokens=96", "chunk_tokens=32",
                     "methods=[mplus,memoryllm,window]", "baseline_max_length=128"]) == 0
        recs = records(out)
        assert len(recs) == 9
        for r in recs:
            assert len(r["scores"]) == 6 and r["choice"] == max(range(6), key=r["scores"].__getitem__)
            assert r["correct"] == int(r["choice"] == r["answer_index"])
        res = json.loads((out / "results.json").read_text())
        for m in ("mplus", "memoryllm", "window"):
            assert res["scores"][m]["longbook_event_qa"] == pytest.approx(
                sum(r["correct"] for r in recs if r["method"] == m) / 3, abs=1e-4)
        # the long-term memory changes what M+ reads: its option scores differ from MemoryLLM mode's
        mp = {r["id"]: r["scores"] for r in recs if r["method"] == "mplus"}
        ml = {r["id"]: r["scores"] for r in recs if r["method"] == "memoryllm"}
        assert any(mp[k] != ml[k] for k in mp)


def test_cost_end_to_end(env, tmp_path):
    model_dir, _ = env
    out = tmp_path / "cost"
    argv = ["cost", "--model", str(model_dir), "--out", str(out), "--no-progress", "lengths=[96,160]",
            "window_tokens=64", "chunk_tokens=16", "prefill_block=32"]
    assert main(argv) == 0
    res = json.loads((out / "cost.json").read_text())
    rows = {(r["method"], r["length"]): r for r in res["rows"]}
    assert set(rows) == {(m, n) for m in ("mplus", "memoryllm", "window") for n in (96, 160)}
    assert all(r["latency_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows[("mplus", 160)]["injections"] == 6 and rows[("mplus", 96)]["injections"] == 2   # (n - 64) / 16
    # M+ keeps evicted rows (capacity 64 per layer); MemoryLLM mode keeps none; both hold the same short-term pool
    assert rows[("mplus", 160)]["ltm_rows_per_layer"] == 64 and rows[("memoryllm", 160)]["ltm_rows_per_layer"] == 0
    assert rows[("mplus", 96)]["stm_mb"] == pytest.approx(3 * 32 * 64 * 4 / 2 ** 20)
    assert rows[("mplus", 160)]["ltm_mb"] > 0 == rows[("memoryllm", 160)]["ltm_mb"]
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG" and "| window | 160 |" in (out / "cost.md").read_text()
    before = (out / "items.jsonl").read_text()
    assert main(argv) == 0 and (out / "items.jsonl").read_text() == before      # resumed: nothing re-measured


def test_peak_memory_sees_an_allocation_on_cpu():
    with PeakMemory(torch.device("cpu")) as pm:
        x = torch.ones(64 * 2 ** 18)                  # 64 MB of float32, touched
        x += 1
        time.sleep(0.05)
    assert pm.delta_mb > 40 and pm.peak_mb > pm.delta_mb and "RSS" in pm.metric
    del x


class _FixedTokenizer:
    """encode: ' x' -> [20], ' y' -> [21], anything else [5]; decode: always the text it was built with."""

    def __init__(self, text: str = ""):
        self.text = text

    def encode(self, text, add_special_tokens=False):
        return {" x": [20], " y": [21]}.get(text, [5])

    def decode(self, ids, skip_special_tokens=True):
        return self.text


def test_truncate_at_newline_scores_the_first_non_empty_line():
    # as official LongBench: prediction.lstrip("\n").split("\n")[0]; the record keeps the whole generation
    work = longqa.Work("hotpotqa", "0", "p", ["Paris"], 8)
    record = longqa._answer(SimpleNamespace(truncate_at_newline=True), _FixedTokenizer("\n\nParis\nand more words"),
                            work, [3, 4], generate=lambda n: [7], last_logits=None, seq_logits=None)
    assert record["qa_f1"] == 1.0 and record["prediction"] == "\n\nParis\nand more words"


def test_loglik_scores_each_option_token_by_the_logits_of_the_position_before_it():
    # logits at index i predict token i + 1: an option's first token is scored at len(window) - 1, not at its own
    window, vocab = [10, 11, 12], 32
    work = longqa.Work("longbook_event_qa", "0", "p", [], 1, options=["x", "y"], answer_index=1)

    def seq_logits(seqs):
        out = []
        for seq in seqs:
            logits = torch.zeros(len(seq), vocab)
            right = seq[-1] == 21
            logits[len(window) - 1, seq[-1]] = 8.0 if right else -8.0   # the position that predicts the option
            logits[len(window), seq[-1]] = -8.0 if right else 8.0       # the option's own position: the wrong one
            out.append(logits)
        return out

    record = longqa._answer(SimpleNamespace(event_scoring="loglik"), _FixedTokenizer(), work, window, generate=None,
                            last_logits=None, seq_logits=seq_logits)
    assert record["choice"] == 1 and record["correct"] == 1
    expected = torch.log_softmax(torch.tensor([0.0] * 21 + [8.0] + [0.0] * 10), -1)[21]
    assert record["scores"][1] == pytest.approx(float(expected), abs=1e-5)


def test_the_cost_latency_is_the_best_of_the_repeats(tmp_path, monkeypatch):
    # a clock whose timed calls last 5, 1 and 3 s in turn: with repeats=3 every row reports 1 s
    model_dir, _ = make_env(tmp_path / "env")
    durations = itertools.cycle([5.0, 1.0, 3.0])
    clock = {"t": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:          # the end of a timed call: add that repeat's duration
            clock["t"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["t"]

    monkeypatch.setattr(cost, "time", SimpleNamespace(perf_counter=perf_counter))
    out = tmp_path / "cost"
    assert main(["cost", "--model", str(model_dir), "--out", str(out), "--no-progress", "lengths=[96]",
                 "window_tokens=64", "chunk_tokens=16", "prefill_block=32", "repeats=3", "warmup=false",
                 "tensorboard=false", "methods=[memoryllm,window]"]) == 0
    rows = json.loads((out / "cost.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["latency_s"] == pytest.approx(1.0) for r in rows), rows

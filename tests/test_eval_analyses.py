"""The paper's analyses on tiny exports: loss by position (Fig. 4), short-context loss (Sec. 4.6.1) and the
retriever's recall (Fig. 6): outputs, and values recomputed by hand."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mplus_lightning import MemoryState, MPlus
from mplus_lightning.data.tokenizer import encode, load_tokenizer
from mplus_lightning.eval.runtime import item_generator, start_memory
from mplus_lightning.evaluate import main
from tests.test_eval_fixtures import (
    WORDS,
    make_checkpoint,
    make_env,
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
    write_jsonl,
    write_squad,
)
from tests.test_eval_runtime import _plain_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses")
    model_dir, _ = make_env(root)                       # stage "3"
    other = make_checkpoint(root / "runs" / "other" / "export", seed=1)
    rng = random.Random(5)
    docs = write_jsonl(root / "docs.jsonl", [{"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(n))}
                                            for i, n in enumerate((120, 60, 3))])
    return model_dir, other, docs, root


def ids_of(model_dir, text):
    return [t for t in encode(load_tokenizer(model_dir), text) if t != 1]


def load(model_dir):
    return MPlus.from_pretrained(model_dir), MemoryState.from_pretrained(model_dir)


def test_position_loss_scores_each_chunk_against_the_memory_before_it(env, tmp_path):
    model_dir, other, docs, root = env
    out = tmp_path / "out"
    argv = ["position-loss", "--model", str(model_dir), "--data", str(docs), "--out", str(out), "--no-progress",
            f"models=[{other}]", "chunk_tokens=32", "bucket_tokens=32", "max_tokens=64"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == ["model", "export"] and res["num_documents"] == 3
    png = (out / "position_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "model" / "items.jsonl").is_file() and (out / "export" / "items.jsonl").is_file()
    text = json.loads((docs.read_text().splitlines()[0]))["text"]
    ids = ids_of(model_dir, text)[:64]
    assert len(ids) == 64
    lengths = [min(len(ids_of(model_dir, json.loads(x)["text"])), 64) for x in docs.read_text().splitlines()]
    curve = res["models"]["model"]
    assert sum(curve["tokens"]) == sum(n - 1 for n in lengths)            # every token but each document's first
    assert res["models"]["export"]["loss"] != curve["loss"]
    # by hand, document 0: bucket 0 = tokens 1..31 read against the checkpoint's memory; bucket 1 = tokens 32..63
    # read (with token 31 before them) against the memory after chunk 0 was written
    model, memory = load(model_dir)
    rec = json.loads((out / "model" / "items.jsonl").read_text().splitlines()[0])
    with torch.no_grad():
        mem = start_memory(memory)
        first = F.cross_entropy(model.read(mem, torch.tensor([ids[:32]]))[0, :-1], torch.tensor(ids[1:32]),
                                reduction="sum")
        model.inject(mem, torch.tensor([ids[:32]]), generator=item_generator(0, "position-loss", rec["id"]))
        second = F.cross_entropy(model.read(mem, torch.tensor([ids[31:64]]))[0, :-1], torch.tensor(ids[32:64]),
                                 reduction="sum")
    assert rec["count"][:2] == [31, 32]
    assert rec["loss_sum"][0] == pytest.approx(float(first), rel=1e-5)
    assert rec["loss_sum"][1] == pytest.approx(float(second), rel=1e-5)
    # a rerun resumes: nothing left to do
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(c["new_items"] == 0 and c["skipped_items"] == 3 for c in again["models"].values())
    assert again["models"]["model"]["loss"] == curve["loss"]


def test_short_context_compares_mplus_with_the_backbone_on_the_same_targets(env, tmp_path, capsys):
    model_dir, _, docs, _ = env
    out = tmp_path / "out"
    assert main(["short-context", "--model", str(model_dir), "--data", str(docs), "--out", str(out),
                 "--no-progress", "max_tokens=40", "methods=[mplus,memoryllm,backbone]"]) == 0
    assert "| backbone |" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert (out / "short_context.png").read_bytes()[:4] == b"\x89PNG" and (out / "results.md").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    model, memory = load(model_dir)
    hf = _plain_llama(model)
    inputs = [ids_of(model_dir, json.loads(x)["text"])[:40] for x in docs.read_text().splitlines()]
    sums = {"mplus": 0.0, "backbone": 0.0}
    with torch.no_grad():
        for ids in inputs:
            targets = torch.tensor(ids[1:])
            sums["mplus"] += float(F.cross_entropy(model.read(memory, torch.tensor([ids]))[0, :-1], targets,
                                                   reduction="sum"))
            sums["backbone"] += float(F.cross_entropy(hf(torch.tensor([[1] + ids])).logits[0, 1:-1], targets,
                                                      reduction="sum"))
    tokens = sum(len(ids) - 1 for ids in inputs)
    for method, total in sums.items():
        got = res["methods"][method]
        assert got["tokens"] == tokens and got["documents"] == 3
        assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert res["methods"]["memoryllm"]["loss"] != res["methods"]["mplus"]["loss"]   # the long-term memory is read


def test_recall_task_plots_the_share_of_the_context_rows_retrieved(env, tmp_path):
    model_dir, _, _, root = env
    data = write_squad(root / "squad", n_dev=4, n_train=30, index=[0, 1, 3])
    out = tmp_path / "out"
    assert main(["recall", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
                 "distances=[0,64,128]", "distractor_tokens=32", "distractor_min_tokens=32"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["modes"]) == {"mplus"} and res["borderline"] is None
    recall = res["recall"]
    assert recall["distances"] == [0, 64, 128] and recall["rows"] == 8
    assert recall["in_ltm"][0] == 0 and recall["recall"][0] is None          # right after it, all in the pool
    assert recall["in_ltm"][2] > 0
    diag = res["modes"]["mplus"]["diagnostics"]   # per-layer shares averaged over items: another path to the recall
    for j in (1, 2):
        assert 0 <= recall["retrieved"][j] <= recall["in_ltm"][j] <= 8
        if recall["recall"][j] is not None:
            assert recall["recall"][j] == pytest.approx(sum(diag["rows_retrieved"][j]) / sum(diag["rows_in_ltm"][j]))
        assert 0 < recall["random_recall"][j] <= 1
    assert recall["in_ltm"][2] == pytest.approx(8 * sum(diag["rows_in_ltm"][2]) / 3)   # 3 layers
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG" and (out / "retention.png").is_file()


def test_bad_input_is_one_line_naming_the_key_or_file(env, tmp_path, capsys):
    model_dir, _, docs, _ = env
    m = ["--model", str(model_dir)]
    assert main(["position-loss", *m]) == 2
    assert "position-loss needs --data" in capsys.readouterr().err
    assert main(["position-loss", *m, "--data", str(docs), "labels=[a,b]"]) == 2
    assert "labels must name each of the 1 checkpoints" in capsys.readouterr().err
    assert main(["short-context", *m, "--data", str(docs), "methods=[window]"]) == 2
    assert "methods must be a non-empty subset of ['mplus', 'memoryllm', 'backbone']" in capsys.readouterr().err
    assert main(["short-context", *m, "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "none.jsonl does not exist" in err and "text_field=NAME" in err

"""Evaluation as a Lightning workload: the DataModules (items held and sharded by `datasets`), resume across ranks
(part files folded into items.jsonl in item order), and a 2-rank torchrun run that writes what one process writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from mplus_lightning.data import LongBenchDataModule, LongBookDataModule, RetentionDataModule
from mplus_lightning.data.eval_sets.datamodules import TextDataModule
from mplus_lightning.data.tokenizer import load_tokenizer
from mplus_lightning.eval.workload import unique_labels
from mplus_lightning.evaluate import main
from tests import test_eval_fixtures as fixtures
from tests.test_eval_fixtures import (
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
    squad_env,
    write_event_qa,
    write_jsonl,
    write_longbench,
    write_longbook,
)

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return squad_env(tmp_path_factory.mktemp("lightning"))


def retention_args(env, out, *extra):
    return fixtures.retention_args(*env, out, *extra)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The outputs of one uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(retention_args(env, out)) == 0
    return out


# ---- DataModules --------------------------------------------------------------------------------------------------
def test_datamodules_hold_their_items_in_datasets_and_shard_them(env, tmp_path):
    model_dir, squad = env
    tok = load_tokenizer(model_dir)
    dm = RetentionDataModule(squad, tokenizer=tok, bos_token_id=1, context_tokens=20, distractor_tokens=32,
                             distractor_min_tokens=32, distractor_total=100)
    dm.setup()
    assert isinstance(dm.items, datasets.Dataset) and isinstance(dm.distractors, datasets.Dataset)
    assert dm.items["id"] == ["q0", "q2", "q4", "q5"] and dm.items["position"] == [0, 1, 2, 3]   # index file order
    first = dm.items[0]
    assert first["answer"] == "Paris" and 0 < len(first["context_ids"]) <= 20 and first["question_ids"]
    assert 1 not in first["context_ids"]                        # no BOS: each memory layer has its own
    assert sum(map(len, dm.distractors["ids"])) >= 100 and all(len(d) <= 32 for d in dm.distractors["ids"])
    # every item exactly once over the ranks, each rank a contiguous share; finished items are left out first
    for world in (1, 2, 3):
        shards = [list(dm.shard(r, world)["position"]) for r in range(world)]
        assert sorted(sum(shards, [])) == [0, 1, 2, 3] and all(s == sorted(s) for s in shards)
    dm.todo = [1, 3]
    assert [dm.shard(r, 2)["id"] for r in (0, 1)] == [["q2"], ["q5"]]
    assert next(iter(dm.predict_dataloader()))["id"] == "q2"    # one item per step, as a dict

    book = LongBookDataModule(write_longbook(tmp_path / "book.jsonl", n=3), max_new_tokens=7, limit=2)
    book.setup()
    assert book.items["id"] == ["0", "1"] and book.items[0]["max_new_tokens"] == 7
    assert "Where did the hero go?" in book.items[0]["prompt"] and book.items[1]["answers"] == ["Berlin"]
    events = LongBookDataModule(write_event_qa(tmp_path / "ev.jsonl", n=2), task="event_qa")
    events.setup()
    assert len(events.items[1]["options"]) == 6 and events.items[1]["answer_index"] == 1
    bench = LongBenchDataModule(write_longbench(tmp_path / "lb", subsets=("hotpotqa", "qasper"), n=2),
                                subsets=["hotpotqa", "qasper"])
    bench.setup()
    assert bench.items["subset"] == ["hotpotqa"] * 2 + ["qasper"] * 2 and bench.items[2]["max_new_tokens"] == 128
    texts = TextDataModule(write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b"}, {"text": ""}, {"text": "c"}]))
    texts.setup()
    assert texts.items["text"] == ["a b", "c"] and texts.items["id"] == ["docs.jsonl:1", "docs.jsonl:3"]
    for name in ("b", "a"):                                     # a folder: files in order, read as far as needed
        write_jsonl(tmp_path / "docs" / f"{name}.jsonl", [{"text": f"{name}{i}"} for i in range(2)])
    for limit, files in ((2, ["a.jsonl"]), (3, ["a.jsonl", "b.jsonl"])):
        folder = TextDataModule(tmp_path / "docs", limit=limit)
        folder.setup()
        assert list(folder.items["text"]) == ["a0", "a1", "b0"][:limit]
        assert [Path(f).name for f in folder.files().values()] == files


def test_datamodules_keep_the_readers_errors(tmp_path):
    (tmp_path / "lb").mkdir()
    with pytest.raises(FileNotFoundError, match="subset 'hotpotqa' not found"):
        LongBenchDataModule(tmp_path / "lb", subsets=["hotpotqa"])
    with pytest.raises(FileNotFoundError, match="longbook_qa_eng.jsonl"):
        LongBookDataModule(tmp_path / "nothing.jsonl")
    with pytest.raises(FileNotFoundError, match="dev-v2.0.json"):
        RetentionDataModule(tmp_path / "nodata")


def test_labels_are_the_shortest_distinct_path_ends():
    assert unique_labels(["runs/stage1/export", "runs/stage2/export"]) == ["stage1/export", "stage2/export"]
    assert unique_labels(["a/m1", "b/m2"]) == ["m1", "m2"]


# ---- resume across ranks ------------------------------------------------------------------------------------------
def test_part_files_of_an_interrupted_multirank_run_are_folded_in_and_items_stay_in_order(env, reference, tmp_path):
    lines = (reference / "items.jsonl").read_text().splitlines()
    by_item = {}
    for line in lines:
        by_item.setdefault(json.loads(line)["id"], []).append(line)
    assert list(by_item) == ["q0", "q2", "q4", "q5"] and all(len(v) == 3 for v in by_item.values())
    # as rank 0 and rank 1 of a 2-rank run left it: rank 1 finished q4 and was cut off while writing q5's borderline
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    (out / "results.json").unlink()
    (out / "items.jsonl").write_text("".join(x + "\n" for x in by_item["q0"] + by_item["q2"][:1]))
    (out / "items.rank1.jsonl").write_text("".join(x + "\n" for x in by_item["q4"]) + by_item["q5"][0][:30])
    assert main(retention_args(env, out)) == 0
    assert not list(out.glob("items.rank*"))
    assert (out / "items.jsonl").read_text().splitlines() == lines            # the same records, in item order
    res, ref = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert (res["new_items"], res["skipped_items"]) == (2, 2)                  # q2 (its modes) and q5 were left
    assert res["modes"] == ref["modes"] and res["borderline"] == ref["borderline"]


# ---- two ranks ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multirank
def test_torchrun_two_ranks_write_what_one_process_writes(env, reference, tmp_path):
    one, two = reference, tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, "-m", "mplus_lightning.evaluate", *retention_args(env, two)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 of 2: 2 of the 4 items" in proc.stderr and "rank 1 of 2: 2 of the 4 items" in proc.stderr
    assert (two / "results.json").read_text() == (one / "results.json").read_text()
    assert (two / "items.jsonl").read_text() == (one / "items.jsonl").read_text()
    assert (two / "retention.png").is_file()
    assert list((two / "tensorboard").glob("events.out.tfevents.*")) and not list(two.glob("items.rank*"))
    assert proc.stdout.count('"dataset": "squad"') == 1                         # rank 0 prints the result

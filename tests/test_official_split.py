"""The document -> sample rule replayed against the official code's own record of it.

The record (``<repo>/../shared/fixtures/official-train/data-split/split_rule.json``) holds, for 38 document lengths x
5 seeds per pipeline, what the official functions returned and every call they made to Python's `random`. A replaying
generator answers our functions with the recorded results, in order, and fails on any other call, so a pass means: the
same calls with the same arguments in the same order, and the same contexts, target, label and rejection.

Two documented differences show up in the record and are asserted as such: a stages-2/3 document shorter than the
minimum length crashes the official stream (TypeError) and is rejected by ours; a rejected stage-1 document is
replaced by a random one officially (the replay below does that around our rule), and skipped by our streams.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from mplus_lightning.data.sample import Sample, SampleRule, make_sample, split_document, split_lengths
from mplus_lightning.data.stream import DocumentSource, SampleStream

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RECORD = SHARED / "fixtures" / "official-train" / "data-split" / "split_rule.json"


@pytest.fixture(scope="module")
def record() -> dict:
    if not RECORD.is_file():
        pytest.fail(f"the official split record {RECORD} is missing: check out the shared fixtures beside this "
                    "repository (<repo>/../shared), as CI does")
    return json.loads(RECORD.read_text())


class ReplayRandom:
    """Answers `random()` / `randint(a, b)` from a recorded call list, checking each call's name and arguments."""

    def __init__(self, calls: list[list], where: str):
        self.calls, self.where, self.used = calls, where, 0

    def _next(self, name: str, *args: int) -> float | int:
        if self.used == len(self.calls):
            raise AssertionError(f"{self.where}: extra call {name}{args} after the {self.used} recorded ones")
        recorded = self.calls[self.used]
        self.used += 1
        if [recorded[0], *recorded[1:-1]] != [name, *args]:
            raise AssertionError(f"{self.where}: call {self.used} is {name}{args}, the official code made "
                                 f"{recorded[0]}{tuple(recorded[1:-1])}")
        return recorded[-1]

    def random(self) -> float:
        return self._next("random")

    def randint(self, a: int, b: int) -> int:
        return self._next("randint", a, b)

    def check_all_used(self) -> None:
        assert self.used == len(self.calls), (f"{self.where}: made {self.used} calls, the official code "
                                              f"{len(self.calls)}: missing {self.calls[self.used:]}")


def official_rule(record: dict, pipeline: str) -> tuple[SampleRule, int]:
    """Our rule for a record's pipeline label, with its values from the record's config, and its minimum length."""
    stage = "stage1" if pipeline.startswith("stage1") else "stage2_3"
    config = record["config"][stage]
    rule = SampleRule(min_length=config["min_length"], max_length=config["max_length"],
                      max_seq_length=config["max_seq_length"],
                      target_is_context_ratio=config["target_is_context_ratio"], pipeline=stage)
    found = re.search(r"min_length=(\d+)|\(min (\d+)\)", pipeline)  # absent: stage 1's own minimum
    min_length = int(found.group(1) or found.group(2)) if found else config["min_length"]
    assert min_length in (config["min_length"], config.get("longdoc_min_length")), pipeline
    return rule, min_length


def spans(sample: Sample) -> dict:
    """A sample in the record's terms (the documents are ``arange(L)``, so a token is its own position)."""
    def span(t: torch.Tensor) -> list[int]:
        assert t.numel() > 0 and torch.equal(t, torch.arange(int(t[0]), int(t[0]) + t.numel()))
        return [int(t[0]), t.numel()]
    return {"contexts": [span(c) for c in sample.contexts], "target": span(sample.target),
            "label": 4 if sample.repeat else 1}


def test_default_rule_is_the_official_one(record):
    for stage in ("stage1", "stage2_3"):
        config = record["config"][stage]
        rule = SampleRule()
        assert (rule.min_length, rule.max_length, rule.max_seq_length, rule.target_is_context_ratio) == (
            config["min_length"], config["max_length"], config["max_seq_length"], config["target_is_context_ratio"])
    assert record["config"]["stage2_3"]["longdoc_min_length"] == 384
    assert SampleRule().pipeline == "stage1"


def test_split_lengths_replays_split_sequence(record):
    records = record["split_sequence"]
    over = 0
    for r in records:
        rng = ReplayRandom(r["rng_calls"], f"split_sequence({r['seq_length']}, {r['min_length']}, {r['max_length']})"
                                            f" seed {r['seed']}")
        assert split_lengths(r["seq_length"], r["min_length"], r["max_length"], rng) == r["result"], rng.where
        rng.check_all_used()
        over += sum(r["result"]) > r["seq_length"]
    print(f"replayed {len(records)} split_sequence records ({over} where the lengths add up to more than the input)")
    assert len(records) == len(record["lengths"]) * len(record["seeds"]) * 2
    assert over > 0  # the fix-up quirk is among them


def test_split_document_replays_get_context_and_sentence(record):
    records = record["get_context_and_sentence"]
    kinds: Counter = Counter()
    for r in records:
        rule, min_length = official_rule(record, r["pipeline"])
        where = f"{r['pipeline']} L={r['doc_length']} seed {r['seed']}"
        rng = ReplayRandom(r["rng_calls"], where)
        got = split_document(r["doc_length"], rule, rng, min_length)
        rng.check_all_used()
        assert (got is not None) == rule.accepts(r["doc_length"], min_length), where
        if "raises" in r:
            # Documented difference: the official stream crashes on a document shorter than the minimum; we reject.
            assert r["raises"].startswith("TypeError") and r["doc_length"] < min_length, where
            assert got is None, where
            kinds["raises (ours: rejected)"] += 1
        elif r["rejected"]:
            assert got is None, where
            kinds["rejected"] += 1
        else:
            assert got is not None, where
            assert r["result"]["label"] == 1, where  # the label is drawn outside this function
            assert [list(c) for c in got.contexts] == r["result"]["contexts"], where
            assert list(got.target) == r["result"]["target"], where
            kinds["split"] += 1
    print(f"replayed {len(records)} get_context_and_sentence records: {dict(kinds)}")
    assert sum(kinds.values()) == len(records) == len(record["lengths"]) * len(record["seeds"]) * 3
    assert min(kinds.values()) > 0


def test_make_sample_replays_the_official_per_document_functions(record):
    records = record["sample"]
    lengths = record["lengths"]
    kinds: Counter = Counter()
    for r in records:
        rule, min_length = official_rule(record, r["pipeline"])
        where = f"{r['pipeline']} L={r['doc_length']} seed {r['seed']}"
        rng = ReplayRandom(r["rng_calls"], where)
        if rule.pipeline == "stage1":
            # The official __getitem__: a rejected document is replaced by a random one of the dataset (our streams
            # skip it instead); the loop reproduces that around our rule, which draws the label first.
            assert r["ds_lengths"] == "LENGTHS" and lengths[r["idx"]] == r["doc_length"]
            index, tried = r["idx"], []
            while True:
                tried.append(lengths[index])
                sample = make_sample(torch.arange(lengths[index]), rule, rng, min_length)
                if sample is not None:
                    break
                index = rng.randint(0, len(lengths) - 1)
            assert tried == r["docs_tried"], where
            kinds[f"stage1, {len(tried) - 1} resampled" if len(tried) > 1 else "stage1"] += 1
        else:
            sample = make_sample(torch.arange(r["doc_length"]), rule, rng, min_length)
            if "raises" in r:  # documented difference, as above
                assert r["raises"].startswith("TypeError") and r["doc_length"] < min_length, where
                kinds["stage2_3 raises (ours: rejected)"] += 1
            else:
                kinds["stage2_3 skipped" if r["skipped"] else "stage2_3"] += 1
                assert (sample is None) == r["skipped"], where
        rng.check_all_used()
        if r["result"] is None:
            assert sample is None, where
        else:
            assert spans(sample) == r["result"], where
    print(f"replayed {len(records)} sample records: {dict(sorted(kinds.items()))}")
    assert sum(kinds.values()) == len(records) == len(lengths) * len(record["seeds"]) * 3
    assert any(k.startswith("stage1, ") for k in kinds) and kinds["stage2_3 skipped"] > 0
    labels = Counter((r["pipeline"][:6], r["result"]["label"]) for r in records if r["result"] is not None)
    assert all(labels[stage, label] > 0 for stage in ("stage1", "stage2") for label in (1, 4)), labels


def test_distributions_are_reproduced_draw_for_draw(record):
    """The official histograms of 2,000 splits per length, from one generator seeded 12345, come out identical."""
    for r in record["distributions"]:
        rule, min_length = official_rule(record, r["pipeline"])
        rng = random.Random(12345)  # the same Mersenne Twister state as the official `random.seed(12345)`
        num_contexts: Counter = Counter()
        shortest: Counter = Counter()
        targets, rejected = [], 0
        for _ in range(r["draws"]):
            got = split_document(r["doc_length"], rule, rng, min_length)
            if got is None:
                rejected += 1
                continue
            num_contexts[str(len(got.contexts))] += 1
            shortest[str(min(size for _, size in got.contexts))] += 1
            targets.append(got.target[1])
        where = f"{r['pipeline']} L={r['doc_length']}"
        assert rejected == r["rejected"], where
        assert dict(num_contexts) == r["num_contexts_hist"], where
        assert dict(shortest) == r["shortest_context_hist"], where
        assert sum(targets) / len(targets) == pytest.approx(r["target_length_mean"], abs=1e-9), where
        assert (min(targets), max(targets)) == (r["target_length_min"], r["target_length_max"]), where
    print(f"reproduced {len(record['distributions'])} distributions of {record['distributions'][0]['draws']} draws")


class _Lengths(DocumentSource):
    name = "lengths"

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, index: int) -> torch.Tensor:
        return torch.arange(self.lengths[index])

    def length_hint(self, index: int) -> int:
        return self.lengths[index]


def test_streams_skip_rejected_documents_where_official_stage1_resamples(record):
    """Documented difference: one pass of our stream uses every accepted document once and no rejected one."""
    lengths = record["lengths"]
    stream = SampleStream(_Lengths(lengths), seed=3, num_epochs=1)
    got = sorted(sample.num_tokens for sample in stream)
    rule = SampleRule()
    assert got == sorted(n for n in lengths if rule.accepts(n))
    assert len(got) < len(lengths)  # some were rejected (the official stage 1 would have drawn replacements)


def test_data_modules_draw_labels_in_their_official_pipeline_order(tmp_path):
    from mplus_lightning.data.fineweb import FineWebDataModule
    from mplus_lightning.data.mixture import MixtureDataModule
    from mplus_lightning.data.slimpajama import SlimPajamaDataModule

    assert FineWebDataModule(tmp_path, "tokenizer", rule={"min_length": 8}).rule.pipeline == "stage1"
    mixture = MixtureDataModule(tmp_path, tmp_path, "tokenizer", rule={"min_length": 8})
    assert (mixture.rule.pipeline, mixture.rule.min_length) == ("stage2_3", 8)
    assert mixture.fineweb.rule is mixture.rule
    assert SlimPajamaDataModule(tmp_path, "tokenizer").rule.pipeline == "stage2_3"
    assert MixtureDataModule(tmp_path, tmp_path, "tokenizer", rule={"pipeline": "stage1"}).rule.pipeline == "stage1"

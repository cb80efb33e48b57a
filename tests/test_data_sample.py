"""The official document -> sample rule (and where we depart from it) on hand-made lengths."""

import random

import pytest
import torch

from mplus_lightning.data.sample import Sample, SampleRule, document_rng, make_sample, split_lengths

RULE = SampleRule()
LONG = SampleRule(min_length=384)


def doc(n: int) -> list[int]:
    return list(range(100, 100 + n))


def cat(s: Sample) -> list[int]:
    return [t for c in s.contexts for t in c.tolist()] + s.target.tolist()


def test_defaults_are_the_official_values():
    assert (RULE.min_length, RULE.max_length, RULE.max_seq_length, RULE.target_is_context_ratio) == (16, 512, 2048, 0.1)
    assert RULE.pipeline == "stage1"


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 300, 511, 512])
def test_short_and_one_chunk_documents_are_rejected(n):
    for seed in range(5):
        assert make_sample(doc(n), RULE, random.Random(seed)) is None
    assert not RULE.accepts(n)


@pytest.mark.parametrize("n", [513, 520, 527, 528, 700, 1024, 1500, 2000, 2047])
def test_below_max_seq_length_whole_document_is_cut_and_last_chunk_is_target(n):
    for seed in range(20):
        s = make_sample(doc(n), RULE, random.Random(seed))
        assert s is not None
        assert cat(s) == doc(n)  # nothing lost, nothing reordered
        assert len(s.contexts) >= 1
        for c in [*s.contexts, s.target]:
            assert 16 <= c.numel() <= 512
        assert s.target.dtype == torch.long and s.target.dim() == 1


@pytest.mark.parametrize("n", [2048, 2050, 2063])
def test_between_max_seq_and_max_seq_plus_min_first_min_tokens_are_the_context(n):
    s = make_sample(doc(n), RULE, random.Random(0))
    assert [c.tolist() for c in s.contexts] == [doc(n)[:16]]
    assert s.target.tolist() == doc(n)[16:]
    long = make_sample(doc(2400), LONG, random.Random(0))  # 2048 <= 2400 < 2048 + 384
    assert [c.numel() for c in long.contexts] == [384] and long.target.numel() == 2016


@pytest.mark.parametrize("n", [2064, 2100, 5000, 20000])
def test_long_documents_target_is_the_tail_and_chunks_cover_the_rest(n):
    lengths = set()
    for seed in range(30):
        s = make_sample(doc(n), RULE, random.Random(seed))
        t = s.target.numel()
        lengths.add(t)
        assert 16 <= t <= 2048
        assert s.target.tolist() == doc(n)[n - t:]
        assert cat(s) == doc(n)
        assert all(16 <= c.numel() <= 512 for c in s.contexts)
    assert len(lengths) > 5  # the target length is random


def test_long_document_rule_uses_384_to_512_token_chunks():
    for n in (4096, 7000, 16000, 40000):
        for seed in range(10):
            s = make_sample(doc(n), RULE, random.Random(seed), min_length=384)
            sizes = [c.numel() for c in s.contexts]
            assert all(384 <= x <= 512 for x in sizes[:-1]) and 1 <= sizes[-1] <= 512, sizes
            assert 384 <= s.target.numel() <= 2048
            assert cat(s) == doc(n)


def test_lengths_that_384_to_512_cannot_cover_keep_a_short_last_slice_as_officially():
    # 513..767 tokens cannot be cut into 384..512-token pieces: officially a 384-token context and a short target ...
    for n in (513, 600, 767):
        for seed in range(5):
            s = make_sample(doc(n), LONG, random.Random(seed))
            assert [c.numel() for c in s.contexts] == [384] and s.target.tolist() == doc(n)[384:]
        assert LONG.accepts(n)
    # ... and the context of a longer document keeps a short last chunk (only the last one).
    short_seen = False
    for seed in range(200):
        s = make_sample(doc(2600), LONG, random.Random(seed))
        sizes = [c.numel() for c in s.contexts]
        assert all(384 <= x <= 512 for x in sizes[:-1])
        assert cat(s) == doc(2600)
        short_seen |= sizes[-1] < 384
    assert short_seen


def test_accepts_agrees_with_make_sample():
    for rule in (RULE, LONG, SampleRule(min_length=8, max_length=32, max_seq_length=64)):
        for n in range(0, 3000, 7):
            got = make_sample(doc(n), rule, random.Random(n)) is not None
            assert got == rule.accepts(n), (rule, n)


def test_split_lengths_sum_and_bounds():
    r = random.Random(1)
    quirks = 0
    for _ in range(2000):
        lo = r.randint(1, 50)
        hi = r.randint(lo, 120)
        n = r.randint(1, 2000)
        sizes = split_lengths(n, lo, hi, random.Random(r.random()))
        if n <= hi:
            assert sizes == [n]
            continue
        assert len(sizes) >= 2 and all(lo <= x <= hi for x in sizes)
        assert sum(sizes[:-1]) < n <= sum(sizes)  # the last slice is never empty
        if hi >= 2 * lo - 1:
            assert sum(sizes) == n
        quirks += sum(sizes) > n
    assert quirks > 0  # the official fix-up that cannot give the last chunk enough tokens happened


class Scripted:
    """Returns the given `randint` results in order and records every call."""

    def __init__(self, draws=(), randoms=()):
        self.draws, self.randoms, self.calls = list(draws), list(randoms), []

    def randint(self, a, b):
        self.calls.append(("randint", a, b))
        return self.draws.pop(0)

    def random(self):
        self.calls.append(("random",))
        return self.randoms.pop(0)


def test_split_lengths_stops_drawing_at_max_length_and_fixes_the_last_chunk_up_newest_first():
    rng = Scripted([300, 200])
    assert split_lengths(1000, 16, 512, rng) == [300, 200, 500]  # 500 left: no third draw
    assert rng.calls == [("randint", 16, 512)] * 2
    assert split_lengths(1000, 16, 512, Scripted([480, 510])) == [480, 504, 16]  # 10 left: the newest gives 6
    assert split_lengths(1160, 384, 512, Scripted([400, 390])) == [392, 384, 384]  # 370 left: both give
    assert split_lengths(1100, 384, 512, Scripted([384, 384])) == [384, 384, 384]  # cannot give: sum > 1100


def test_pipeline_decides_when_the_label_is_drawn():
    stage1, stage2_3 = SampleRule(), SampleRule(pipeline="stage2_3")
    rng = Scripted(randoms=[0.05])
    assert make_sample(doc(300), stage1, rng) is None and rng.calls == [("random",)]  # drawn, then rejected
    rng = Scripted()
    assert make_sample(doc(300), stage2_3, rng) is None and rng.calls == []
    rng = Scripted([1800, 300], randoms=[0.05])
    s = make_sample(doc(2600), stage1, rng)
    assert rng.calls == [("random",), ("randint", 16, 2048), ("randint", 16, 512)] and s.repeat
    rng = Scripted([1800, 300], randoms=[0.5])
    s = make_sample(doc(2600), stage2_3, rng)
    assert rng.calls == [("randint", 16, 2048), ("randint", 16, 512), ("random",)] and not s.repeat
    assert [c.numel() for c in s.contexts] == [300, 500] and s.target.tolist() == doc(2600)[800:]


def test_deterministic_per_document_generator():
    a = make_sample(doc(5000), RULE, document_rng(7, "fineweb", 0, 123))
    b = make_sample(doc(5000), RULE, document_rng(7, "fineweb", 0, 123))
    assert [c.tolist() for c in a.contexts] == [c.tolist() for c in b.contexts] and a.repeat == b.repeat
    others = [make_sample(doc(5000), RULE, document_rng(7, "fineweb", e, i)) for e, i in ((1, 123), (0, 124))]
    assert any([c.numel() for c in o.contexts] != [c.numel() for c in a.contexts] for o in others)


def test_repeat_probability():
    n = 3000
    frac = sum(make_sample(doc(1000), RULE, random.Random(i)).repeat for i in range(n)) / n
    assert abs(frac - 0.1) < 0.025
    never = SampleRule(target_is_context_ratio=0.0)
    always = SampleRule(target_is_context_ratio=1.0)
    assert not any(make_sample(doc(1000), never, random.Random(i)).repeat for i in range(50))
    assert all(make_sample(doc(1000), always, random.Random(i)).repeat for i in range(50))


def test_rule_validation_messages():
    with pytest.raises(ValueError, match="min_length <= max_length"):
        SampleRule(min_length=600)
    with pytest.raises(ValueError, match="target_is_context_ratio"):
        SampleRule(target_is_context_ratio=1.5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min_len'\]"):
        SampleRule.from_any({"min_len": 3})
    with pytest.raises(ValueError, match=r"pipeline='stage2': expected one of \['stage1', 'stage2_3'\]"):
        SampleRule(pipeline="stage2")
    with pytest.raises(ValueError, match="max_seq_length=16 must exceed min_length=16"):
        SampleRule(max_seq_length=16)
    assert SampleRule.from_any({"min_length": 8}).min_length == 8


def test_a_data_module_default_pipeline_applies_only_where_none_is_named():
    assert SampleRule.from_any(None, pipeline="stage2_3").pipeline == "stage2_3"
    assert SampleRule.from_any({"min_length": 8}, pipeline="stage2_3") == SampleRule(8, pipeline="stage2_3")
    assert SampleRule.from_any({"pipeline": "stage1"}, pipeline="stage2_3").pipeline == "stage1"
    assert SampleRule.from_any(RULE, pipeline="stage2_3") is RULE


def test_sample_moves_through_lightning_batch_transfer():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    s = make_sample(doc(3000), RULE, random.Random(0), doc_id="d", source="fineweb", position=4)
    moved = move_data_to_device(s, torch.device("cpu"))
    assert isinstance(moved, Sample) and moved.position == 4 and moved.doc_id == "d"
    assert [c.tolist() for c in moved.contexts] == [c.tolist() for c in s.contexts]
    assert s.num_tokens == 3000

"""Mixtures: ratios, determinism, sharding and resume of a mixed stream, source exhaustion, the stage presets."""

import logging
from collections import Counter

import pytest
import torch

from mplus_lightning.data.mixture import STAGE2_RATIOS, STAGE3_RATIOS, MixtureDataModule, resolve_ratios
from mplus_lightning.data.slimpajama import BUCKETS
from mplus_lightning.data.stream import SampleLoader, SampleStream, SourceSpec, SyntheticDocuments

from .test_data_common import slim_built, slim_src, texts, tok, tok_dir, write_parquet  # noqa: F401  (fixtures)

NAMES = ["fineweb", *BUCKETS]


def sources(weights, n_docs=(400, 60, 60, 60, 60)):
    return [SourceSpec(name, SyntheticDocuments(n, 512, min_length=16, max_length=3000, seed=i, name=name), w)
            for i, (name, w, n) in enumerate(zip(NAMES, weights, n_docs))]


def shares(samples):
    c = Counter(s.source for s in samples)
    return {k: c[k] / len(samples) for k in NAMES}


def test_presets():
    assert STAGE2_RATIOS == {"fineweb": 0.2, "4k-8k": 0.2, "8k-16k": 0.2, "16k-32k": 0.2, "32k-64k": 0.2}
    assert STAGE3_RATIOS == {"fineweb": 0.9, "4k-8k": 0.025, "8k-16k": 0.025, "16k-32k": 0.025, "32k-64k": 0.025}
    assert resolve_ratios("ltm") == STAGE3_RATIOS
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['books'\]"):
        resolve_ratios({"books": 1.0})
    with pytest.raises(ValueError, match="expected one of"):
        resolve_ratios("stage9")


@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1], [0.9, 0.025, 0.025, 0.025, 0.025], [3, 1, 0.5, 0.5, 1]])
def test_empirical_ratios_match_the_configuration(weights):
    got = shares([s for s, _ in zip(SampleStream(sources(weights), seed=1), range(600))])
    total = sum(weights)
    for name, w in zip(NAMES, weights):
        assert abs(got[name] - w / total) < 0.05, (name, got)


def test_mixture_is_deterministic_and_seeded():
    def run(seed):
        return [(s.source, s.doc_id) for s, _ in zip(SampleStream(sources([1] * 5), seed=seed), range(80))]

    assert run(4) == run(4) and run(4) != run(5)


def test_mixture_sharding_and_resume_with_workers():
    ranks = []
    for rank in range(2):
        full = [s for s, _ in zip(SampleLoader(SampleStream(sources([1] * 5), seed=2, rank=rank, world_size=2),
                                               num_workers=2), range(60))]
        rest = [s for s, _ in zip(SampleLoader(SampleStream(sources([1] * 5), seed=2, rank=rank, world_size=2,
                                                            skip=23), num_workers=2), range(37))]
        assert [(s.doc_id, s.position, s.source) for s in full[23:]] == [(s.doc_id, s.position, s.source) for s in rest]
        assert all(torch.equal(a.target, b.target) for a, b in zip(full[23:], rest))
        ranks.append({s.doc_id for s in full if s.epoch == 0})
    assert not ranks[0] & ranks[1]


def test_a_source_that_runs_out_cycles_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="mplus_lightning.data.stream"):
        loader = SampleLoader(SampleStream(sources([1] * 5, (400, 8, 60, 60, 60)), seed=1))
        got = [s for s, _ in zip(loader, range(200))]
    small = [s for s in got if s.source == "4k-8k"]
    assert max(s.epoch for s in small) >= 2
    assert "source '4k-8k' begins pass 2 at sample" in caplog.text
    assert abs(len(small) / len(got) - 0.2) < 0.07  # the ratio holds although the source is small


def test_stop_mode_ends_when_the_first_source_runs_out(caplog):
    srcs = sources([1] * 5, (400, 8, 60, 60, 60))
    with caplog.at_level(logging.INFO, logger="mplus_lightning.data.stream"):
        got = list(SampleLoader(SampleStream(srcs, seed=1, num_epochs=1)))
    assert got and all(s.epoch == 0 for s in got)
    accepted_small = sum(srcs[1].docs.length_hint(i) > 512 for i in range(8))
    assert sum(s.source == "4k-8k" for s in got) == accepted_small  # every document of the small source, once
    assert "source '4k-8k' finished pass 1" in caplog.text


@pytest.fixture
def fineweb_dir(tmp_path):
    write_parquet(tmp_path / "fw" / "data" / "CC-MAIN-2024-10" / "train-0.parquet", texts(40, seed=6, hi=900))
    return tmp_path / "fw"


def test_mixture_datamodule_end_to_end(fineweb_dir, slim_built, tok_dir, tmp_path):
    dm = MixtureDataModule(fineweb_dir, slim_built, tok_dir, ratios="stage2", val_docs=5, val_size=3,
                           cache_dir=tmp_path / "cache", progress=False, seed=3, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    assert [(s.name, s.weight) for s in dm.sources()] == [(n, 0.2) for n in NAMES]
    assert dm.num_epochs is None  # on_exhausted="cycle"
    got = [s for s, _ in zip(dm.train_dataloader(), range(12))]
    assert [s.position for s in got] == list(range(12)) and len({s.source for s in got}) >= 3
    fw = [s for s in got if s.source == "fineweb"]
    assert all(16 <= c.numel() <= 512 for s in fw for c in s.contexts)
    assert all(384 <= c.numel() <= 512 for s in got if s.source != "fineweb" for c in s.contexts)
    held_out = {dm.fineweb.table().doc_id(i) for i in range(5)}
    assert not {s.doc_id for s in fw} & held_out
    assert [s.doc_id for s in dm.val_samples()] == [dm.fineweb.table().doc_id(i) for i in range(3)]
    dm.samples_consumed = 5
    again = [s for s, _ in zip(dm.train_dataloader(), range(7))]
    assert [(s.doc_id, s.position) for s in again] == [(s.doc_id, s.position) for s in got[5:]]


def test_mixture_datamodule_options_and_errors(fineweb_dir, slim_built, tok_dir, tmp_path):
    params = {"fineweb": str(fineweb_dir), "buckets": str(slim_built), "tokenizer": str(tok_dir),  # as in a YAML
              "ratios": "stage3", "on_exhausted": "stop", "val_docs": 5, "cache_dir": str(tmp_path / "cache"),
              "progress": False, "num_workers": 2, "rule": {"target_is_context_ratio": 0.2}}
    dm = MixtureDataModule(**params)
    dm.setup("fit")
    assert dm.num_epochs == 1 and [s.weight for s in dm.sources()] == [0.9] + [0.025] * 4
    assert dm.rule.target_is_context_ratio == 0.2 and dm.fineweb.rule is dm.rule
    only_long = MixtureDataModule(None, slim_built, tok_dir, ratios={"4k-8k": 1, "32k-64k": 1})
    only_long.setup("fit")
    assert [s.name for s in only_long.sources()] == ["4k-8k", "32k-64k"] and only_long.val_dataloader() == []
    with pytest.raises(ValueError, match=r"ratios give fine-web a share but fineweb \(its folder\) is None"):
        MixtureDataModule(None, slim_built, tok_dir)
    with pytest.raises(ValueError, match="on_exhausted='loop'"):
        MixtureDataModule(fineweb_dir, slim_built, tok_dir, on_exhausted="loop")
    with pytest.raises(FileNotFoundError, match="buckets folder .* does not exist"):
        MixtureDataModule(fineweb_dir, tmp_path / "nope", tok_dir, val_docs=5, cache_dir=tmp_path / "cache",
                          progress=False).setup("fit")

"""Streams: rank/worker sharding, resume at the exact sample, epoch ends, the DataModule position in checkpoints."""

import logging

import pytest
import torch
from torch.utils.data import DataLoader

from mplus_lightning.data.sample import SampleRule
from mplus_lightning.data.stream import (
    DocumentSource,
    SampleLoader,
    SampleStream,
    SourceSpec,
    SyntheticDataModule,
    SyntheticDocuments,
    collate_single,
    worker_share,
)

DOCS = SyntheticDocuments(150, 512, min_length=16, max_length=2600, seed=11)
ACCEPTED = {DOCS.doc_id(i) for i in range(len(DOCS)) if SampleRule().accepts(DOCS.length_hint(i))}


def same(a, b) -> bool:
    return (a.doc_id, a.position, a.repeat, a.epoch, a.source) == (b.doc_id, b.position, b.repeat, b.epoch, b.source) \
        and len(a.contexts) == len(b.contexts) and all(torch.equal(x, y) for x, y in zip(a.contexts, b.contexts)) \
        and torch.equal(a.target, b.target)


def take(it, n):
    out = []
    for s in it:
        out.append(s)
        if len(out) == n:
            break
    return out


def test_synthetic_documents_are_deterministic_and_avoid_special_ids():
    assert torch.equal(DOCS.tokens(3), SyntheticDocuments(150, 512, max_length=2600, seed=11).tokens(3))
    assert len(DOCS.tokens(3)) == DOCS.length_hint(3)
    assert int(min(DOCS.tokens(i).min() for i in range(20))) >= 3
    assert 60 < len(ACCEPTED) < 150  # some documents are rejected, most are not


def test_sharding_direct_every_document_once():
    seen = {}
    for rank in range(2):
        ds = SampleStream(DOCS, seed=3, rank=rank, world_size=2, num_epochs=1)
        for w in range(2):
            ids = [s.doc_id for s in ds.iter_worker(w, 2)]
            assert len(ids) == len(set(ids))
            seen[(rank, w)] = set(ids)
    union = set().union(*seen.values())
    assert union == ACCEPTED
    keys = list(seen)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not seen[a] & seen[b], (a, b)


def test_sharding_through_dataloader_workers():
    per_rank = []
    for rank in range(2):
        ds = SampleStream(DOCS, seed=3, rank=rank, world_size=2, num_epochs=1)
        # a plain DataLoader: each worker stops at the end of its own share -> every document exactly once
        ids = [s.doc_id for s in DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_single)]
        assert len(ids) == len(set(ids))
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == ACCEPTED


def test_sample_loader_workers_pass0_is_a_partition_and_positions_are_consecutive():
    per_rank = []
    for rank in range(2):
        ds = SampleStream(DOCS, seed=3, rank=rank, world_size=2)  # endless: sources cycle
        got = take(SampleLoader(ds, num_workers=2), 110)
        assert [s.position for s in got] == list(range(110))
        assert {s.epoch for s in got} >= {0, 1}  # the shares ran out and started over
        pass0 = [s.doc_id for s in got if s.epoch == 0]
        assert len(pass0) == len(set(pass0))
        per_rank.append(set(pass0))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == ACCEPTED


def test_finite_stream_through_sample_loader_ends_and_logs(caplog):
    ends, consumed = [], [0]
    ds = SampleStream(DOCS, seed=3, rank=0, world_size=2, num_epochs=1)
    loader = SampleLoader(ds, num_workers=2, on_end=ends.append, skip_fn=lambda: consumed[0])
    with caplog.at_level(logging.INFO, logger="mplus_lightning.data.stream"):
        got = list(loader)
    assert all(s.epoch == 0 for s in got) and len({s.doc_id for s in got}) == len(got)
    assert ends == [len(got)] and loader.exhausted_at == len(got)
    assert "training data exhausted after" in caplog.text and "finished pass 1" in caplog.text
    assert len(got) >= len(ACCEPTED) / 2 - 10  # only the tail of the longer worker share is cut
    consumed[0] = len(got)
    assert list(loader) == [] and ends == [len(got)] * 2  # the next iteration starts at the end: nothing left
    consumed[0] = len(got) - 2
    assert [s.position for s in loader] == [len(got) - 2, len(got) - 1]


def test_finite_stream_ranks_stop_together():
    """All ranks stop at the step where the first one runs out (sync_fn stands in for the all-reduce)."""
    lengths = [len(list(SampleStream(DOCS, seed=3, rank=r, world_size=2, num_epochs=1))) for r in range(2)]
    assert lengths[0] != lengths[1]
    calls = {0: 0, 1: 0}

    def sync(rank):
        def fn(have):
            calls[rank] += 1
            return have and calls[rank] <= min(lengths)  # what the all-reduce over both ranks answers
        return fn

    for r in range(2):
        loader = SampleLoader(SampleStream(DOCS, seed=3, rank=r, world_size=2, num_epochs=1), sync_fn=sync(r))
        assert len(list(loader)) == min(lengths)
        assert loader.exhausted_at == min(lengths)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("skip", [1, 7, 14])
def test_resume_continues_at_the_exact_sample(workers, skip):
    full = take(SampleLoader(SampleStream(DOCS, seed=5, rank=1, world_size=2), num_workers=workers), 40)
    rest = take(SampleLoader(SampleStream(DOCS, seed=5, rank=1, world_size=2, skip=skip), num_workers=workers),
                40 - skip)
    assert [s.position for s in rest] == list(range(skip, 40))
    assert all(same(a, b) for a, b in zip(full[skip:], rest))


def test_resume_across_a_pass_boundary_and_past_the_end():
    full = list(SampleStream(DOCS, seed=2, num_epochs=2))
    assert [s.epoch for s in full].count(0) == len(ACCEPTED) == [s.epoch for s in full].count(1)
    first, second = [s.doc_id for s in full if s.epoch == 0], [s.doc_id for s in full if s.epoch == 1]
    assert set(first) == set(second) == ACCEPTED and first != second  # every pass reshuffled
    k = len(ACCEPTED) - 3
    assert all(same(a, b) for a, b in zip(full[k:], SampleStream(DOCS, seed=2, num_epochs=2, skip=k)))
    assert list(SampleStream(DOCS, seed=2, num_epochs=2, skip=len(full))) == []
    assert len(list(SampleStream(DOCS, seed=2, num_epochs=2, skip=len(full) - 1))) == 1


def test_seed_changes_the_order_but_not_the_layout_independence():
    a = [s.doc_id for s in take(SampleStream(DOCS, seed=1), 30)]
    b = [s.doc_id for s in take(SampleStream(DOCS, seed=2), 30)]
    assert a != b
    # the same document is cut the same way whichever rank/worker gets it
    by_doc = {s.doc_id: s for s in SampleStream(DOCS, seed=1, num_epochs=1)}
    for s in SampleStream(DOCS, seed=1, rank=1, world_size=3, num_epochs=1).iter_worker(1, 2):
        o = by_doc[s.doc_id]
        assert [c.numel() for c in s.contexts] == [c.numel() for c in o.contexts] and s.repeat == o.repeat


def test_worker_share():
    assert [worker_share(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert [worker_share(0, w, 2) for w in range(2)] == [0, 0]
    assert sum(worker_share(101, w, 4) for w in range(4)) == 101


def test_bad_inputs():
    with pytest.raises(ValueError, match="fewer than the 8 .ranks x dataloader workers"):
        next(iter(SampleStream(SyntheticDocuments(5, 512), rank=3, world_size=4).iter_worker(1, 2)))

    class Tiny(DocumentSource):
        name = "tiny"

        def __len__(self):
            return 4

        def tokens(self, i):
            return [5] * 10

    with pytest.raises(RuntimeError, match="none of the 4 documents .* yields a sample"):
        next(iter(SampleStream(Tiny())))
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_single([1, 2])
    with pytest.raises(ValueError, match="unique"):
        SampleStream([SourceSpec("a", DOCS), SourceSpec("a", DOCS)])
    with pytest.raises(ValueError, match="rank=2 is not in"):
        SampleStream(DOCS, rank=2, world_size=2)


def test_datamodule_state_dict_and_position():
    dm = SyntheticDataModule(512, num_docs=150, max_doc_length=2600, seed=4, num_workers=2)
    first = take(dm.train_dataloader(), 9)
    dm.samples_consumed = 6
    state = dm.state_dict()
    assert state["samples_consumed"] == 6 and state["num_workers"] == 2 and state["world_size"] == 1
    dm2 = SyntheticDataModule(512, num_docs=150, max_doc_length=2600, seed=4, num_workers=2)
    dm2.load_state_dict(state)
    again = take(dm2.train_dataloader(), 3)
    assert all(same(a, b) for a, b in zip(first[6:], again))
    dm3 = SyntheticDataModule(512, num_docs=150, max_doc_length=2600, seed=4, num_workers=1)
    with pytest.warns(UserWarning, match=r"different num_workers \(2 -> 1\)"):
        dm3.load_state_dict(state)
    assert dm3.samples_consumed == 6
    with pytest.warns(UserWarning, match=r"different world_size \(2 -> 1\)"):   # saved by 2 ranks, resumed on 1
        dm2.load_state_dict({**state, "world_size": 2})


def test_validation_split_over_ranks():
    dm = SyntheticDataModule(512, val_docs=5, max_doc_length=5000)
    val = list(dm.val_dataloader())
    assert len(val) == 5 and all(s.contexts == [] and 1 <= s.target.numel() <= 2048 for s in val)
    assert SyntheticDataModule(512, val_docs=0).val_dataloader() == []


# ------------------------------------------------------------------------------- Lightning: checkpoint and resume

def _run(tmp_path, dm, max_steps, ckpt=None, every=None):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, idx):
            self.seen.append((batch.position, batch.doc_id, batch.target.sum().item()))
            self.trainer.datamodule.samples_consumed += 1
            return (self.w * batch.target.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callbacks = []
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                      filename="s{step}"))
    model = Recorder()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                         enable_checkpointing=bool(every), default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen, trainer


def test_lightning_checkpoint_resume_continues_the_stream(tmp_path):
    def dm():
        return SyntheticDataModule(512, num_docs=150, max_doc_length=2600, seed=9, num_workers=2)

    full, _ = _run(tmp_path / "a", dm(), 7)
    first, _ = _run(tmp_path / "b", dm(), 3, every=3)
    ckpt = next((tmp_path / "b").glob("*.ckpt"))
    rest, trainer = _run(tmp_path / "c", dm(), 7, ckpt=str(ckpt))
    assert first == full[:3] and rest == full[3:]
    assert [p for p, _, _ in full] == list(range(7))
    assert trainer.datamodule.samples_consumed == 7


def test_lightning_stops_when_a_finite_stream_ends(tmp_path, caplog):
    dm = SyntheticDataModule(512, num_docs=12, max_doc_length=2600, seed=9, num_epochs=1)
    n = sum(1 for _ in dm.build_train_dataset())
    with caplog.at_level(logging.INFO, logger="mplus_lightning.data.stream"):
        seen, trainer = _run(tmp_path, dm, 1000)
    assert len(seen) == n and trainer.global_step == n and dm.exhausted_at == n
    assert "training data exhausted" in caplog.text


# ------------------------------------------------------------------------------- two real ranks (gloo, forked)

import lightning.pytorch as pl  # noqa: E402


class _RankRecorder(pl.LightningModule):
    """Writes what each rank trained on to out/rank<r>.txt (forked processes cannot return lists)."""

    def __init__(self, out):
        super().__init__()
        self.out = str(out)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, idx):
        self.trainer.datamodule.samples_consumed += 1
        with open(f"{self.out}/rank{self.global_rank}.txt", "a") as fh:
            fh.write(f"{batch.position} {batch.doc_id}\n")
        return (self.w * batch.target.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.multirank
def test_two_ranks_get_disjoint_documents_and_stop_together(tmp_path):
    dm = SyntheticDataModule(512, num_docs=40, max_doc_length=2600, seed=9, num_epochs=1, val_docs=0)
    trainer = pl.Trainer(max_steps=1000, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(_RankRecorder(tmp_path), datamodule=dm)
    rows = [[line.split() for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()] for r in range(2)]
    lengths = [len(list(dm.build_train_dataset(rank=r, world_size=2, skip=0))) for r in range(2)]
    assert lengths[0] != lengths[1]  # otherwise the test would not show that the ranks stop together
    assert len(rows[0]) == len(rows[1]) == min(lengths)  # both ranks stop at the step where the first runs out
    assert [int(p) for p, _ in rows[0]] == list(range(min(lengths)))
    assert not {d for _, d in rows[0]} & {d for _, d in rows[1]}

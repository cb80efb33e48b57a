"""Shared data machinery: documents -> `Sample`s, sharded over ranks and dataloader workers, resumable, with honest
epoch ends; the DataLoader and the LightningDataModule base that carry the data position in checkpoints.

The stream (`SampleStream`)
---------------------------
A stream draws samples from one or more *sources* (`SourceSpec`: a `DocumentSource` with a weight). Each source's
documents are visited in a permutation that depends only on ``(seed, source name, pass)``; position ``p`` of that
permutation belongs to *slot* ``p % n_slots``, where ``n_slots = world_size * num_workers`` and the slot of
(rank, worker) is ``rank * num_workers + worker``. So every document goes to exactly one (rank, worker), and no two
ranks see the same document in a pass (the official stages 2/3 fed every GPU the same documents).

Within a slot, the k-th sample comes from the source chosen by ``random.Random(f"{seed}:mix:{slot}:{n_slots}:{k}")``
with the sources' weights (only when there are several), and is the next document of that source's share that the
rule accepts (`SampleRule.accepts`; rejected documents are skipped). The document is cut by `make_sample` with its
own generator (`document_rng`), so a sample never depends on the worker layout.

Resume: a stream built with ``skip=n`` (samples this rank already consumed) continues at sample ``n``. A DataLoader
with W workers yields worker 0, 1, ..., W-1, 0, 1, ... in turn, so the rank's sample ``p`` is the ``p // W``-th sample
of (logical) worker ``p % W``, and worker w skips its ``worker_share(n, w, W)`` first samples. The DataLoader always
gives the first turn to worker id 0, so after a resume worker id i plays logical worker ``(i + n) % W``. Skipping
needs each skipped document's token count (to know whether it was rejected) but no tensors; sources that store their
token counts (`DocumentSource.length_hint`) skip without tokenizing. Resume is exact for the same seed, world size
and number of workers (`SampleDataModule` records them and warns when they change).

Epoch ends: with ``num_epochs=None`` every source starts a new pass (a new permutation) when its share runs out, and
`SampleLoader` logs it: the stream never ends and the run length is ``max_steps``. With ``num_epochs=k`` the stream
ends at the first sample that would come from pass ``k`` of any source (for a mixture: as soon as one source runs
out, ``k=1``). Inside `SampleLoader` the workers keep producing and the loader cuts the merged stream, so the
round-robin above holds to the end and the end point is the same after a resume; with several ranks the loader also
asks all ranks each step whether they still have a sample, and all stop together (an unsynchronized end would hang
the collectives of the ranks that go on). The price: the other shares' last few documents of the final pass are not
used (as many as the shares differ in accepted documents, a handful per share). The end is logged, and
`SampleDataModule` sets ``trainer.should_stop``. A plain DataLoader lets each worker stop at the end of its own share
(every document once, but the round-robin, and so exact resume, breaks in the tail).
"""

from __future__ import annotations

import bisect
import logging
import random
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..typed_config import ConfigError
from .files import DataFormatError
from .sample import Sample, SampleRule, document_rng, make_sample
from .tokenizer import check_tokenizer, encode, load_tokenizer

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- documents

class DocumentSource(ABC):
    """A finite, indexable collection of documents, each turned into token ids on demand."""

    name: str = "docs"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def tokens(self, index: int) -> Sequence[int] | torch.Tensor:
        """Token ids of document `index` (no BOS)."""

    def doc_id(self, index: int) -> str:
        """A stable name of document `index` (file:row where there are files)."""
        return f"{self.name}:{index}"

    def length_hint(self, index: int) -> int | None:
        """The token count of document `index` when it is known without tokenizing (else None)."""
        return None


class TextDocuments(DocumentSource):
    """Base for sources of text: `text(i)` tokenized on the fly with a HF tokenizer."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer = tokenizer
        self.name = name

    @abstractmethod
    def text(self, index: int) -> str: ...

    def tokens(self, index: int) -> list[int]:
        return encode(self.tokenizer, self.text(index))


class SyntheticDocuments(DocumentSource):
    """Random-token documents of uniform random length in [min_length, max_length], from a seed (no tokenizer).

    Token ids are drawn from [first_token_id, vocab_size), so the special ids below `first_token_id` (pad/bos/eos of
    the tiny configs: 0, 1, 2) never occur.
    """

    def __init__(self, num_docs: int, vocab_size: int, *, min_length: int = 16, max_length: int = 4096, seed: int = 0,
                 first_token_id: int = 3, name: str = "synthetic"):
        if num_docs < 1 or not 1 <= min_length <= max_length or not 0 <= first_token_id < vocab_size:
            raise ValueError(f"SyntheticDocuments: bad sizes num_docs={num_docs} lengths=[{min_length}, {max_length}]"
                             f" ids=[{first_token_id}, {vocab_size})")
        self.num_docs, self.vocab_size, self.seed, self.name = num_docs, vocab_size, seed, name
        self.min_length, self.max_length, self.first_token_id = min_length, max_length, first_token_id

    def __len__(self) -> int:
        return self.num_docs

    def length_hint(self, index: int) -> int:
        return random.Random(f"{self.seed}:length:{index}").randint(self.min_length, self.max_length)

    def tokens(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        return torch.from_numpy(rng.integers(self.first_token_id, self.vocab_size, self.length_hint(index)))


@dataclass
class SourceSpec:
    """One source of a stream."""

    name: str
    """Written into `Sample.source` and used in the per-document seeds (must be unique in a stream)."""
    docs: DocumentSource
    weight: float = 1.0
    """Relative share of the samples (normalized over the stream's sources)."""
    min_length: int | None = None
    """Overrides `SampleRule.min_length` for this source (384 for long documents)."""


# --------------------------------------------------------------------------------------------------- the stream

def worker_share(skip: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first `skip` samples come from `worker` when W workers take turns (0, 1, ..., W-1, 0...)."""
    return max(0, (skip - worker + num_workers - 1) // num_workers)


class _Cursor:
    """Walks one source's share for one slot, pass after pass."""

    def __init__(self, spec: SourceSpec, rule: SampleRule, seed: int, slot: int, n_slots: int, shuffle: bool):
        self.spec, self.rule, self.seed, self.shuffle = spec, rule, seed, shuffle
        self.slot, self.n_slots = slot, n_slots
        self.n = len(spec.docs)
        self.count = len(range(slot, self.n, n_slots))
        if self.count == 0:
            raise ConfigError(f"source {spec.name!r} has {self.n} documents, fewer than the {n_slots} (ranks x "
                             "dataloader workers) that share it: use more documents or fewer workers")
        self.lo = rule.min_length if spec.min_length is None else spec.min_length
        self.epoch, self.k, self.accepted, self.rejected = 0, 0, 0, 0
        self.order: np.ndarray | None = None

    def _doc(self, p: int) -> int:
        if not self.shuffle:
            return p
        if self.order is None:
            key = zlib.crc32(self.spec.name.encode())
            self.order = np.random.default_rng([self.seed, key, self.epoch]).permutation(self.n)
        return int(self.order[p])

    def next(self, materialize: bool) -> tuple[int, Sample | None]:
        """(pass, sample) of the next accepted document; the sample is None when not `materialize`d (skipping)."""
        docs = self.spec.docs
        while True:
            if self.k == self.count:
                if self.accepted == 0:
                    raise RuntimeError(
                        f"source {self.spec.name!r}: none of the {self.count} documents of shard {self.slot} of "
                        f"{self.n_slots} yields a sample (all shorter than min_length={self.lo} or at most "
                        f"max_length={self.rule.max_length} tokens); the stream would never produce anything")
                self.epoch, self.k, self.accepted, self.order = self.epoch + 1, 0, 0, None
            doc = self._doc(self.slot + self.k * self.n_slots)
            self.k += 1
            length = docs.length_hint(doc)
            ids = None
            if length is None:
                ids = docs.tokens(doc)
                length = len(ids)
            if not self.rule.accepts(length, self.lo):
                self.rejected += 1
                continue
            self.accepted += 1
            if not materialize:
                return self.epoch, None
            if ids is None:
                ids = docs.tokens(doc)
                if len(ids) != length:
                    raise DataFormatError(
                        f"source {self.spec.name!r}: document {docs.doc_id(doc)} has {len(ids)} tokens with this "
                        f"tokenizer but its index says {length}: the data was built with another tokenizer; rebuild "
                        "it with this one")
            sample = make_sample(ids, self.rule, document_rng(self.seed, self.spec.name, self.epoch, doc), self.lo,
                                 doc_id=docs.doc_id(doc), source=self.spec.name, epoch=self.epoch)
            assert sample is not None
            return self.epoch, sample


class SampleStream(IterableDataset):
    """Documents -> `Sample`s for one rank, sharded over ranks and dataloader workers, resumable (module docstring).

    Args:
        sources: one `DocumentSource`, or several `SourceSpec`s mixed by weight.
        rule: how documents are cut (`SampleRule`, or a dict of its fields).
        seed: the only seed: document order, splits, repeat labels and mixture choices all derive from it.
        rank, world_size: this rank and the number of data-parallel ranks.
        skip: samples this rank already consumed (resume).
        num_epochs: None = endless (sources cycle); k = end when a source would begin pass k.
        shuffle: visit each pass in a seeded permutation (else in index order).
    """

    def __init__(self, sources: DocumentSource | Sequence[SourceSpec], rule: SampleRule | dict | None = None, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0, num_epochs: int | None = None,
                 shuffle: bool = True):
        super().__init__()
        if isinstance(sources, DocumentSource):
            sources = [SourceSpec(sources.name, sources)]
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("SampleStream needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for s in self.sources:
            if not s.weight > 0:
                raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight} (leave the source out)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        if skip < 0 or (num_epochs is not None and num_epochs < 1):
            raise ValueError(f"skip={skip} must be >= 0 and num_epochs={num_epochs} None or >= 1")
        self.rule = SampleRule.from_any(rule)
        self.seed, self.rank, self.world_size, self.skip = seed, rank, world_size, skip
        self.num_epochs, self.shuffle = num_epochs, shuffle
        total = sum(s.weight for s in self.sources)
        self._cum = list(np.cumsum([s.weight / total for s in self.sources]))
        self.loader_cuts = False
        """Set by `SampleLoader`: the workers ignore `num_epochs` and the loader cuts the merged stream."""

    def _choose(self, slot: int, n_slots: int, k: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = random.Random(f"{self.seed}:mix:{slot}:{n_slots}:{k}").random()
        return min(bisect.bisect_right(self._cum, u), len(self.sources) - 1)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        if info is None:
            return self.iter_worker(0, 1, endless=self.loader_cuts)
        # A DataLoader gives the first turn to worker id 0, but after `skip` samples the next one belongs to logical
        # worker skip % W: rotate the roles so the merged order continues at exactly position `skip`.
        logical = (info.id + self.skip) % info.num_workers
        return self.iter_worker(logical, info.num_workers, endless=self.loader_cuts)

    def iter_worker(self, worker: int, num_workers: int, *, endless: bool = False) -> Iterator[Sample]:
        """The samples that dataloader worker `worker` of `num_workers` yields on this rank (after its skip share).

        `Sample.position` is the sample's index in the rank's merged stream (``k * num_workers + worker``).
        """
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker={worker} is not in [0, {num_workers})")
        slot = self.rank * num_workers + worker
        n_slots = self.world_size * num_workers
        cursors = [_Cursor(s, self.rule, self.seed, slot, n_slots, self.shuffle) for s in self.sources]
        to_skip = worker_share(self.skip, worker, num_workers)
        k = 0
        while True:
            epoch, sample = cursors[self._choose(slot, n_slots, k)].next(materialize=k >= to_skip)
            if not endless and self.num_epochs is not None and epoch >= self.num_epochs:
                return
            if sample is not None:
                sample.position = k * num_workers + worker
                yield sample
            k += 1


def collate_single(batch: list[Sample]) -> Sample:
    """The one `Sample` of a batch of size 1 (batch size is 1 per rank, as in the official training)."""
    if len(batch) != 1:
        raise ValueError(f"collate_single expects batches of one Sample (batch_size=1), got {len(batch)}")
    return batch[0]


def loader_generator() -> torch.Generator:
    """The generator of a DataLoader that runs inside a fit. Making a loader's iterator draws its workers' base seed
    from the loader's generator, else from torch's global one, which also draws every LoRA dropout mask: a resumed
    run, which restores the global state and then makes its iterators, would train on other masks than the run it
    continues. The streams draw nothing from torch's generators (their randomness is seeded per document)."""
    return torch.Generator()


class SampleLoader(DataLoader):
    """A batch-size-1 DataLoader over a `SampleStream` that sets exact positions and ends epochs honestly.

    Args:
        dataset: the rank's stream.
        num_workers, pin_memory, prefetch_factor: as for `DataLoader`.
        skip_fn: read at every ``iter()``: the samples already consumed (the stream then starts there). This is how
            `SampleDataModule` makes a second ``iter()`` (Lightning's next epoch) continue instead of restarting.
        sync_fn: ``sync_fn(have_sample) -> all ranks have one``; called once per sample when the stream is finite
            and several ranks train, so that all ranks stop at the same step.
        on_end: called with the end position when a finite stream ends.
        exhausted_at: where the stream already ended (from a checkpoint); iterating from there yields nothing.
    """

    def __init__(self, dataset: SampleStream, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, skip_fn: Callable[[], int] | None = None,
                 sync_fn: Callable[[bool], bool] | None = None, on_end: Callable[[int], None] | None = None,
                 exhausted_at: int | None = None):
        super().__init__(dataset, batch_size=1, collate_fn=collate_single, num_workers=num_workers,
                         pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers > 0 else None,
                         generator=loader_generator())
        self._skip_fn, self._sync_fn, self._on_end = skip_fn, sync_fn, on_end
        self.exhausted_at = exhausted_at

    def __iter__(self) -> Iterator[Sample]:
        ds: SampleStream = self.dataset  # type: ignore[assignment]
        if self._skip_fn is not None:
            ds.skip = int(self._skip_fn())
        if self.exhausted_at is not None and ds.skip >= self.exhausted_at:
            log.info("rank %d: the training stream ended at sample %d; nothing left to iterate", ds.rank,
                     self.exhausted_at)
            if self._on_end is not None:
                self._on_end(self.exhausted_at)
            return iter(())
        ds.loader_cuts = True
        return self._merged(ds, ds.skip)

    def _merged(self, ds: SampleStream, position: int) -> Iterator[Sample]:
        passes: dict[str, int] = {}
        inner = DataLoader.__iter__(self)
        ended_by = ""
        while True:
            sample = next(inner, None)
            if sample is not None and ds.num_epochs is not None and sample.epoch >= ds.num_epochs:
                ended_by, sample = sample.source, None
            if self._sync_fn is not None and not self._sync_fn(sample is not None):
                sample = None
            if sample is None:
                break
            if sample.position != position:
                raise RuntimeError(f"rank {ds.rank}: sample position {sample.position} arrived at {position}; the "
                                   "workers did not take turns")
            last = passes.setdefault(sample.source, sample.epoch)
            if sample.epoch > last:
                passes[sample.source] = sample.epoch
                log.info("rank %d: source %r begins pass %d at sample %d", ds.rank, sample.source, sample.epoch + 1,
                         position)
            position += 1
            yield sample
        del inner  # shuts the workers down
        if ds.num_epochs is not None:
            self.exhausted_at = position
            why = (f"source {ended_by!r} finished pass {ds.num_epochs}" if ended_by else
                   "another rank's stream ended" if self._sync_fn is not None else "the stream ended")
            log.info("rank %d: training data exhausted after %d samples (num_epochs=%d: %s)", ds.rank, position,
                     ds.num_epochs, why)
            if self._on_end is not None:
                self._on_end(position)


class ListStream(IterableDataset):
    """A fixed list of samples (validation), iterated in order; iterable so Lightning adds no sampler."""

    def __init__(self, samples: Sequence[Sample]):
        super().__init__()
        self.samples = list(samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


def target_only_sample(ids: Sequence[int] | torch.Tensor, max_seq_length: int, *, doc_id: str, source: str,
                       position: int) -> Sample:
    """A validation sample: no contexts, the first `max_seq_length` tokens as the target (official fine-web val)."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)[:max_seq_length]
    return Sample(contexts=[], target=t, repeat=False, doc_id=doc_id, source=source, position=position)


# --------------------------------------------------------------------------------------------------- DataModules

def model_vocab_size(trainer: Any) -> int | None:
    """Rows of the input embedding of the model `trainer` trains (its LightningModule's ``model``), else None."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    llama = getattr(getattr(module, "model", None), "llama", None)
    embeddings = getattr(llama, "get_input_embeddings", None)
    return None if embeddings is None else int(embeddings().num_embeddings)


@dataclass
class StreamParams:
    """The stream options of every data kind but `facts` (`SampleDataModule`'s arguments). A kind's `data.params`
    schema is ``class XParams(StreamParams, ..., <dataclass of the kind's own parameters>)``: a dataclass lists its
    bases' fields from the last base to the first, so --print-config shows what a kind reads first, these after."""

    rule: SampleRule = field(default_factory=SampleRule)
    """How documents are cut into context chunks and a target (official: chunks of 16..512 tokens, targets up to
    2,048, "Repeat:" samples 10%)."""
    seed: int = 0
    """Data seed: document order, the cuts, the "Repeat:" draws, the mixture's source draws."""
    num_workers: int = 0
    """Dataloader workers per rank (tokenization happens there); a resume is exact for the same count."""
    num_epochs: Optional[int] = None
    """Passes over the data before the stream ends; null: endless, a source that runs out starts a new pass (logged)
    (data.kind=mixture: null follows on_exhausted)."""
    shuffle: bool = True
    """Shuffle the documents in every pass."""
    vocab_size: Optional[int] = None
    """The model's vocab size: data that can produce larger token ids is an error before training starts (null: the
    size of the model being trained, checked at setup; data.kind=synthetic: required, token ids are drawn below it)."""
    prefetch_factor: int = 2
    """Samples each dataloader worker prepares ahead."""
    pin_memory: bool = False
    """Put the dataloader's tensors in page-locked host memory."""


class SampleDataModule(pl.LightningDataModule):
    """Base DataModule: a `SampleStream` per rank whose position travels in Lightning checkpoints.

    The LightningModule increments `samples_consumed` once per training step (one sample per rank per step), in
    ``training_step`` or earlier: `ModelCheckpoint` saves in its own ``on_train_batch_end``, which Lightning calls
    before the module's. `state_dict` stores it, and `train_dataloader` builds the stream with
    ``skip=samples_consumed`` using ``trainer.global_rank`` / ``trainer.world_size`` (rank 0 of 1 without a trainer).
    Every rank's position is the same (one sample per step), so the rank-0 checkpoint serves all ranks.

    Subclasses implement `train_sources` (and optionally `val_samples`, `prepare_data`, `data_vocab_size`, and
    `setup`, which must call this class's: it checks the data's token ids against the model's vocabulary).

    Args:
        rule: `SampleRule` or a dict of its fields (min_length, max_length, max_seq_length, target_is_context_ratio,
            pipeline).
        seed: data seed (order, splits, repeat labels, mixture choices).
        num_workers: dataloader workers per rank (tokenization happens there).
        num_epochs: None = endless (sources cycle, logged; stop with max_steps); k = stop after k passes.
        shuffle: shuffle documents in every pass.
        vocab_size: the model's vocab size; when given, the tokenizer is checked against it in `setup`.
        prefetch_factor, pin_memory: DataLoader options.
    """

    params_schema: type = StreamParams
    """The typed `data.params` of a run config for this DataModule (checked when the config loads)."""

    def __init__(self, *, rule: SampleRule | dict | None = None, seed: int = 0, num_workers: int = 0,
                 num_epochs: int | None = None, shuffle: bool = True, vocab_size: int | None = None,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        super().__init__()
        self.rule = SampleRule.from_any(rule)
        self.seed, self.num_workers, self.num_epochs, self.shuffle = seed, num_workers, num_epochs, shuffle
        self.vocab_size, self.prefetch_factor, self.pin_memory = vocab_size, prefetch_factor, pin_memory
        self.samples_consumed = 0
        """Samples this rank has trained on; the LightningModule adds 1 per training step."""
        self.exhausted_at: int | None = None
        """Position where a finite stream ended (None while it has not)."""
        self._sources: list[SourceSpec] | None = None
        self._val: list[Sample] | None = None

    # -- to implement
    def train_sources(self) -> list[SourceSpec]:
        """The training sources (called once, after `setup`)."""
        raise NotImplementedError

    def val_samples(self) -> list[Sample]:
        """The whole validation set (all ranks); empty = no validation."""
        return []

    def data_vocab_size(self) -> int | None:
        """How many token ids the data can produce (ids are below it); None when unknown."""
        return None

    # -- shared
    def setup(self, stage: str | None = None) -> None:
        """Before the first step: the data must not produce ids the model has no embedding for (they would fail
        deep inside a training step with an IndexError)."""
        self.check_vocab(model_vocab_size(self.trainer))

    def check_vocab(self, vocab_size: int | None) -> None:
        """Raise ConfigError naming the keys when the data's ids can reach `vocab_size` (the model's)."""
        have = self.data_vocab_size()
        if vocab_size is not None and have is not None and have > vocab_size:
            raise ConfigError(f"the data ({type(self).__name__}) produces token ids up to {have - 1} but the model's "
                              f"vocab_size is {vocab_size} (model.llama.vocab_size): ids >= {vocab_size} would index "
                              "past the embedding matrix; make the data's vocabulary fit the model's")

    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def sources(self) -> list[SourceSpec]:
        if self._sources is None:
            self._sources = self.train_sources()
        return self._sources

    def build_train_dataset(self, rank: int | None = None, world_size: int | None = None,
                            skip: int | None = None) -> SampleStream:
        """The stream of `rank` (default: the trainer's) continuing after `skip` (default: `samples_consumed`)."""
        r, w = self.rank_and_world()
        return SampleStream(self.sources(), self.rule, seed=self.seed, rank=r if rank is None else rank,
                            world_size=w if world_size is None else world_size,
                            skip=self.samples_consumed if skip is None else skip, num_epochs=self.num_epochs,
                            shuffle=self.shuffle)

    def train_dataloader(self) -> SampleLoader:
        rank, world = self.rank_and_world()
        ds = self.build_train_dataset(rank, world)
        sync = None
        if self.num_epochs is not None and world > 1 and self.trainer is not None:
            strategy = self.trainer.strategy
            sync = lambda have: bool(strategy.reduce_boolean_decision(have, all=True))  # noqa: E731
        return SampleLoader(ds, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor, skip_fn=lambda: self.samples_consumed,
                            sync_fn=sync, on_end=self._on_end, exhausted_at=self.exhausted_at)

    def _on_end(self, position: int) -> None:
        self.exhausted_at = position
        if self.trainer is not None:
            self.trainer.should_stop = True

    def val_dataloader(self) -> DataLoader | list:
        if self._val is None:
            self._val = self.val_samples()
        if not self._val:
            return []
        rank, world = self.rank_and_world()
        per = len(self._val) // world
        if per == 0:
            raise ValueError(f"{len(self._val)} validation samples cannot be split over {world} ranks")
        # Equal shares keep the ranks' collectives in step; the remainder (< world samples) is left out.
        mine = self._val[rank * per:(rank + 1) * per]
        return self.make_loader(ListStream(mine))

    def make_loader(self, dataset: IterableDataset) -> DataLoader:
        """How samples are batched for a step: one Sample (the memory stages); subclasses may batch."""
        return DataLoader(dataset, batch_size=1, collate_fn=collate_single, generator=loader_generator())

    def fingerprint(self) -> list[list[Any]]:
        """What the data position refers to: (name, documents, weight) per source."""
        return [[s.name, len(s.docs), float(s.weight)] for s in self.sources()]

    def state_dict(self) -> dict[str, Any]:
        _, world = self.rank_and_world()
        return {"samples_consumed": int(self.samples_consumed), "seed": self.seed, "num_workers": self.num_workers,
                "world_size": world, "num_epochs": self.num_epochs, "exhausted_at": self.exhausted_at,
                "rule": dict(vars(self.rule)), "sources": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_consumed = int(state_dict["samples_consumed"])
        self.exhausted_at = state_dict.get("exhausted_at")
        now = self.state_dict()
        changed = [k for k in ("seed", "num_workers", "world_size", "rule", "sources")
                   if k in state_dict and state_dict[k] != now[k]]
        if changed:
            warnings.warn(
                "resuming the data stream with a different "
                + ", ".join(f"{k} ({state_dict[k]} -> {now[k]})" for k in changed)
                + f": training continues after {self.samples_consumed} samples, but not with exactly the documents "
                "the interrupted run would have seen next", stacklevel=2)


class TokenizedDataModule(SampleDataModule):
    """A `SampleDataModule` that owns a tokenizer given as a local directory (or an already loaded tokenizer)."""

    def __init__(self, tokenizer: str | Path | Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._tokenizer_arg = tokenizer
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            t = self._tokenizer_arg
            self._tokenizer = load_tokenizer(t) if isinstance(t, (str, Path)) else t
            if self.vocab_size is not None:
                check_tokenizer(self._tokenizer, self.vocab_size)
        return self._tokenizer

    def data_vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_vocab(self, vocab_size: int | None) -> None:
        if vocab_size is not None:
            check_tokenizer(self.tokenizer, vocab_size)

    def setup(self, stage: str | None = None) -> None:
        _ = self.tokenizer  # fail on a bad tokenizer before training starts
        super().setup(stage)


@dataclass
class SyntheticDocumentsParams:
    """The random-token documents of data.kind=synthetic (`SyntheticDataModule`'s own arguments)."""

    num_docs: int = 256
    """Training documents."""
    min_doc_length: int = 16
    """Shortest document, in tokens (lengths are uniform in [min_doc_length, max_doc_length])."""
    max_doc_length: int = 4096
    """Longest document, in tokens."""
    val_docs: int = 4
    """Validation documents (other seeds), each a target of at most rule.max_seq_length tokens."""
    first_token_id: int = 3
    """Smallest token id drawn (the ids below are the special tokens)."""


@dataclass
class SyntheticParams(StreamParams, SyntheticDocumentsParams):
    """`data.params` of data.kind=synthetic: random-token documents from the seed (tests, tiny runs), no tokenizer."""


class SyntheticDataModule(SampleDataModule):
    """Random-token documents from a seed (tests, tiny runs); no tokenizer.

    Args:
        vocab_size: token ids are drawn from [first_token_id, vocab_size).
        num_docs: training documents.
        min_doc_length, max_doc_length: document lengths are uniform in this range.
        val_docs: validation documents (other seeds), each a target of at most ``rule.max_seq_length`` tokens.
        first_token_id: smallest id drawn (ids below are the special tokens).
        **kwargs: `SampleDataModule` options (rule, seed, num_workers, num_epochs, shuffle, ...).
    """

    params_schema = SyntheticParams

    def __init__(self, vocab_size: int, *, num_docs: int = 256, min_doc_length: int = 16,
                 max_doc_length: int = 4096, val_docs: int = 4, first_token_id: int = 3, **kwargs: Any):
        kwargs.setdefault("vocab_size", vocab_size)
        super().__init__(**kwargs)
        self.model_vocab_size = vocab_size
        self.num_docs, self.min_doc_length, self.max_doc_length = num_docs, min_doc_length, max_doc_length
        self.val_docs, self.first_token_id = val_docs, first_token_id

    def data_vocab_size(self) -> int:
        return self.model_vocab_size

    def check_vocab(self, vocab_size: int | None) -> None:
        if vocab_size is not None and self.model_vocab_size > vocab_size:
            raise ConfigError(f"data.params.vocab_size={self.model_vocab_size} draws token ids up to "
                              f"{self.model_vocab_size - 1}, but the model's vocab_size is {vocab_size} "
                              "(model.llama.vocab_size): set data.params.vocab_size to at most the model's")

    def train_sources(self) -> list[SourceSpec]:
        docs = SyntheticDocuments(self.num_docs, self.model_vocab_size, min_length=self.min_doc_length,
                                  max_length=self.max_doc_length, seed=self.seed,
                                  first_token_id=self.first_token_id)
        return [SourceSpec("synthetic", docs)]

    def val_samples(self) -> list[Sample]:
        if self.val_docs <= 0:
            return []
        docs = SyntheticDocuments(self.val_docs, self.model_vocab_size, min_length=self.min_doc_length,
                                  max_length=self.max_doc_length, seed=self.seed + 1_000_003,
                                  first_token_id=self.first_token_id, name="synthetic-val")
        return [target_only_sample(docs.tokens(i), self.rule.max_seq_length, doc_id=docs.doc_id(i),
                                   source=docs.name, position=i) for i in range(len(docs))]

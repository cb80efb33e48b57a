"""Stages 2/3: fine-web short documents mixed with the four SlimPajama long-document buckets.

Ratios are shares of *samples* (rejected documents are skipped within their source, so they do not shift the mix):

* stage 2 (`STAGE2_RATIOS`): fineweb : 4k-8k : 8k-16k : 16k-32k : 32k-64k = 1 : 1 : 1 : 1 : 1, the paper's mix
  (official: 200k fine-web + 4 x 200k bucket documents, shuffled together);
* stage 3 (`STAGE3_RATIOS`): each bucket 0.025, fine-web the remaining 0.9 (the official stage-3 config).

Each sample's source is drawn with the seeded per-position generator of `SampleStream` (module
`mplus_lightning.data.stream`), so the mix is deterministic, sharded over ranks and workers, and resumes exactly.

When a source runs out (every document of this rank's share of it has been used once):

* ``num_epochs=None`` (the default, ``on_exhausted="cycle"``): that source begins a new pass in a new order while the
  others go on, and the loader logs ``source '4k-8k' begins pass 2 at sample N``. The ratios stay as configured.
* ``num_epochs=1`` (``on_exhausted="stop"``): the stream ends at the first sample that would need a second pass of
  any source (with several ranks, all ranks stop at the same step); `SampleDataModule` logs it and asks the trainer
  to stop. This is the paper's "one epoch", without the official crash (its loader workers raised IndexError when
  their share ran out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..typed_config import ConfigError
from .fineweb import DEFAULT_DUMP, FineWebDataModule, FineWebSelection
from .sample import Sample, SampleRule, document_rng, make_sample
from .slimpajama import BUCKETS, BucketDocuments, bucket_sources, check_bucket_tokenizer
from .stream import SourceSpec, StreamParams, TokenizedDataModule

STAGE2_RATIOS: dict[str, float] = {"fineweb": 0.2, **{b: 0.2 for b in BUCKETS}}
STAGE3_RATIOS: dict[str, float] = {"fineweb": 0.9, **{b: 0.025 for b in BUCKETS}}
PRESETS = {"stage2": STAGE2_RATIOS, "stage3": STAGE3_RATIOS, "ltm": STAGE3_RATIOS}
ON_EXHAUSTED = {"cycle": None, "stop": 1}

log = logging.getLogger(__name__)


def resolve_ratios(ratios: str | dict[str, float]) -> dict[str, float]:
    """A preset name (``stage2``, ``stage3`` / ``ltm``) or a dict over ``fineweb`` and the bucket names."""
    if isinstance(ratios, str):
        if ratios not in PRESETS:
            raise ConfigError(f"ratios={ratios!r}: expected one of {sorted(PRESETS)} or a dict")
        return dict(PRESETS[ratios])
    known = {"fineweb", *BUCKETS}
    out = {str(k): float(v) for k, v in dict(ratios).items()}
    if set(out) - known:
        raise ConfigError(f"ratios: unknown source(s) {sorted(set(out) - known)}; known: {sorted(known)}")
    if any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
        raise ConfigError(f"ratios must be >= 0 with a positive sum, got {out}")
    return out


@dataclass
class MixtureSources:
    """The fine-web and long-document folders, their tokenizer and the mix (data.kind=mixture)."""

    fineweb: Optional[str] = None
    """The fine-web download folder (required unless ratios gives fine-web no share)."""
    buckets: Optional[str] = None
    """The SlimPajama builder's output folder or its val subfolder (required unless ratios gives the buckets no
    share)."""
    tokenizer: Optional[str] = None
    """The local tokenizer directory the buckets were built with (required)."""
    ratios: Any = "stage2"
    """Share of samples per source, {fineweb: .., 4k-8k: .., 8k-16k: .., 16k-32k: .., 32k-64k: ..} (normalized), or a
    preset: stage2 (1:1:1:1:1) | stage3 (fine-web 0.9, each bucket 0.025); shown resolved."""
    on_exhausted: str = "cycle"
    """When a source runs out: cycle (it starts a new pass, logged) | stop (the stream ends: one epoch)."""
    longdoc_min_length: int = 384
    """Shortest chunk and target of the long documents, in tokens (official: 384; fine-web uses rule.min_length)."""
    val_per_bucket: int = 0
    """Validation documents per long-document bucket with a share: the first ones of the builder's
    <buckets>/val/<bucket>/ (built with --val-per-bucket); 0: validation on fine-web alone. Each source of the
    validation set also gets its own curves, val/<source>/loss and val/<source>/token_acc."""


@dataclass
class MixtureParams(StreamParams, FineWebSelection, MixtureSources):
    """`data.params` of data.kind=mixture (`MixtureDataModule`): fine-web and the long-document buckets by ratio,
    the official stages 2-3 data; validation uses fine-web's held-out documents (and, on request, the buckets' own)."""

    rule: SampleRule = field(default_factory=lambda: SampleRule(pipeline="stage2_3"))

    def __post_init__(self) -> None:
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ConfigError(f"on_exhausted={self.on_exhausted!r}: expected one of {sorted(ON_EXHAUSTED)}")
        self.ratios = resolve_ratios(self.ratios)


class MixtureDataModule(TokenizedDataModule):
    """fine-web + SlimPajama buckets, mixed by ratio (module docstring).

    Args:
        fineweb: fine-web download folder (`FineWebDataModule`'s `path`); may be None when its ratio is 0.
        buckets: the SlimPajama builder's output folder (or its ``val`` subfolder); may be None when every bucket
            ratio is 0.
        tokenizer: local tokenizer directory (or a loaded tokenizer): the one the buckets were built with.
        ratios: ``stage2`` (1:1:1:1:1), ``stage3`` (0.9 fine-web, 0.025 per bucket) or a dict; normalized.
        on_exhausted: ``cycle`` (a source that runs out starts a new pass, logged) or ``stop`` (the stream ends);
            ignored when `num_epochs` is given (not None).
        longdoc_min_length: shortest chunk/target of the long documents (fine-web uses ``rule.min_length``).
        val_per_bucket: validation documents per bucket with a share, from ``<buckets>/val/<bucket>`` (0: none).
        dump, val_docs, val_size, train_start, max_train_docs, cache_dir, text_field, on_bad_line, on_bad_file:
            fine-web options (`FineWebDataModule`); validation uses the fine-web held-out documents.
        **kwargs: `SampleDataModule` options (rule, seed, num_workers, num_epochs, shuffle, vocab_size, ...).
            A rule that names no ``pipeline`` gets ``stage2_3`` (the repeat label is drawn after the split).
    """

    params_schema = MixtureParams

    def __init__(self, fineweb: str | Path | None, buckets: str | Path | None, tokenizer: str | Path | Any, *,
                 ratios: str | dict[str, float] = "stage2", on_exhausted: str = "cycle", longdoc_min_length: int = 384,
                 val_per_bucket: int = 0,
                 dump: str | None = DEFAULT_DUMP, val_docs: int = 50_000, val_size: int = 1_000, train_start: int = 0,
                 max_train_docs: int | None = None, cache_dir: str | Path | None = None, text_field: str = "text",
                 on_bad_line: str = "error", on_bad_file: str = "error", progress: bool = True, **kwargs: Any):
        if on_exhausted not in ON_EXHAUSTED:
            raise ConfigError(f"on_exhausted={on_exhausted!r}: expected one of {sorted(ON_EXHAUSTED)}")
        if kwargs.get("num_epochs") is None:   # a run config passes every parameter, None included
            kwargs["num_epochs"] = ON_EXHAUSTED[on_exhausted]
        kwargs["rule"] = SampleRule.from_any(kwargs.get("rule"), pipeline="stage2_3")  # the official stream's order
        super().__init__(tokenizer, **kwargs)
        self.ratios = resolve_ratios(ratios)
        self.on_exhausted, self.longdoc_min_length = on_exhausted, longdoc_min_length
        if val_per_bucket < 0:
            raise ConfigError(f"data.params.val_per_bucket: {val_per_bucket} must be >= 0")
        self.val_per_bucket = val_per_bucket
        self.buckets_dir = None if buckets is None else Path(buckets)
        if self.ratios.get("fineweb", 0) > 0 and fineweb is None:
            raise ConfigError("ratios give fine-web a share but fineweb (its folder) is None")
        if any(self.ratios.get(b, 0) > 0 for b in BUCKETS) and buckets is None:
            raise ConfigError("ratios give the long-document buckets a share but buckets (their folder) is None")
        self.fineweb: FineWebDataModule | None = None
        """The fine-web part (its text cache, held-out split and validation set)."""
        if fineweb is not None:
            self.fineweb = FineWebDataModule(
                fineweb, self._tokenizer_arg, dump=dump, text_field=text_field, val_docs=val_docs,
                val_size=val_size, train_start=train_start, max_train_docs=max_train_docs, cache_dir=cache_dir,
                on_bad_line=on_bad_line, on_bad_file=on_bad_file, progress=progress, rule=self.rule, seed=self.seed)

    def prepare_data(self) -> None:
        if self.fineweb is not None:
            self.fineweb.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.fineweb is not None:
            self.fineweb._tokenizer = self.tokenizer
            self.fineweb.setup(stage)
        self.sources()  # a missing or empty bucket is an error before training starts
        if self.buckets_dir is not None and any(self.ratios.get(b, 0) > 0 for b in BUCKETS):
            check_bucket_tokenizer(self.buckets_dir, self.tokenizer)
        missing = [str(self.buckets_dir / "val" / b) for b in self.val_buckets()
                   if not (self.buckets_dir / "val" / b).is_dir()]
        if missing:
            raise ConfigError(f"data.params.val_per_bucket={self.val_per_bucket} reads the buckets' validation "
                              f"documents, but {', '.join(missing)} does not exist: build the buckets with "
                              "--val-per-bucket N (data/README.md), or set val_per_bucket=0")

    def val_buckets(self) -> list[str]:
        """The buckets that validation reads documents of (those with a share, when val_per_bucket > 0)."""
        return [b for b in BUCKETS if self.ratios.get(b, 0) > 0] if self.val_per_bucket > 0 else []

    def train_sources(self) -> list[SourceSpec]:
        specs: list[SourceSpec] = []
        if self.ratios.get("fineweb", 0) > 0:
            assert self.fineweb is not None
            self.fineweb._tokenizer = self.tokenizer
            specs.append(SourceSpec("fineweb", self.fineweb.train_documents(), self.ratios["fineweb"]))
        weights = {b: self.ratios.get(b, 0.0) for b in BUCKETS if self.ratios.get(b, 0.0) > 0}
        if weights:
            assert self.buckets_dir is not None
            specs += bucket_sources(self.buckets_dir, self.tokenizer, weights, self.longdoc_min_length)
        return specs

    def val_samples(self) -> list[Sample]:
        """fine-web's held-out samples and `val_per_bucket` per bucket, each marked with its source (its own val
        curves). The sources are spread evenly through the list, so that every rank's share of it, and the first
        `trainer.val_batches` of that share, hold each source in proportion."""
        per_source: list[list[Sample]] = []
        if self.fineweb is not None:
            self.fineweb._tokenizer = self.tokenizer
            per_source.append([replace(s, val_source="fineweb") for s in self.fineweb.val_samples()])
        for bucket in self.val_buckets():
            assert self.buckets_dir is not None
            folder = self.buckets_dir / "val" / bucket
            try:
                docs = BucketDocuments(folder, self.tokenizer, name=f"val/{bucket}")
            except ConfigError:   # empty: the builder found no documents left over for it after training's share
                log.warning("validation: %s holds no documents, so bucket %s is not validated", folder, bucket)
                continue
            samples = [make_sample(docs.tokens(i), self.rule, document_rng(self.seed, docs.name, 0, i),
                                   self.longdoc_min_length, doc_id=docs.doc_id(i), source=docs.name)
                       for i in range(min(self.val_per_bucket, len(docs)))]
            # validation scores the document's own continuation, never the "Repeat:" task
            per_source.append([replace(s, val_source=bucket, repeat=False) for s in samples if s is not None])
        spread = sorted(((i + 0.5) / len(group), k, i) for k, group in enumerate(per_source) for i in range(len(group)))
        return [replace(per_source[k][i], position=n) for n, (_, k, i) in enumerate(spread)]

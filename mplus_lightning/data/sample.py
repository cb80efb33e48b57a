"""The document -> training sample rule of the official code, in one place.

A document of ``L`` tokens becomes context chunks (written into the memory one by one) and a target (read against
the memory). With ``m`` = `SampleRule.min_length` (16 for fine-web, 384 for the long SlimPajama documents),
``max_len`` = `SampleRule.max_length` (512) and ``S`` = `SampleRule.max_seq_length` (2048):

* ``L < m``: rejected.
* ``m <= L < S``: the whole document is cut by `split_lengths`: while more than ``max_len`` tokens remain, the next
  chunk is ``U[m, max_len]`` tokens long; what remains (at most ``max_len`` tokens) is the last chunk. The last chunk
  is the target, the others are the contexts. A document of one chunk (``L <= max_len``) has no context and is
  rejected.
* ``S <= L < S + m``: the context is the first ``m`` tokens, the target is the rest.
* ``L >= S + m``: the target is the last ``U[m, S]`` tokens (drawn first); the rest is cut by `split_lengths`, and all
  its chunks are contexts.

So a document is accepted when ``L >= m`` and (``L > max_len`` or ``L >= S``): a function of ``L`` alone
(`SampleRule.accepts`), never of the random draws, so a resumed stream can skip documents by their token count
without drawing anything.

The last chunk of `split_lengths`: when fewer than ``m`` tokens remain, the earlier chunks, newest first, give up
tokens down to ``m`` each and the last chunk is made ``m`` long. When they cannot give enough (only possible when
``max_len < 2 m - 1``, e.g. 384..512), the lengths add up to more than the tokens and the last slice simply ends with
the document, shorter than ``m``. Like the official code we keep that. With 384..512, a document under ``S`` tokens
can get a target shorter than 384 (one of 513..767 tokens always does: a 384-token context, the rest as the target),
and the last context chunk of a longer one is sometimes short (38% of 2,433-token documents, 0.5% of 5,000-token
ones, down to 129 tokens); a short write or target is harmless.

The "Repeat:" label (official label 4, probability `SampleRule.target_is_context_ratio`): the split is the same, and
the training step builds the repeat target itself from the context chunks. `SampleRule.pipeline` says when the one
``rng.random()`` is drawn: ``stage1`` before the split, also for a document that is then rejected (the official
stage-1 fine-web dataset), ``stage2_3`` after a successful split (the official stages-2/3 mixed stream). Both give
the same distribution; the order only matters for reproducing a given generator state.

`make_sample` makes exactly the official sequence of ``rng.random()`` and ``rng.randint(a, b)`` calls, so with the
same generator state it returns the official sample (tests/test_official_split.py replays the official code's
record of its calls and results). Streams give every document its own
``random.Random(f"{seed}:{source}:{epoch}:{doc_index}")`` (`document_rng`), so that a sample does not depend on how
documents are spread over ranks and dataloader workers (the official loaders drew from one generator per worker).

Where we differ from the official code, on purpose:

* ``L < m`` in stages 2/3: the official stream compares ``L`` with an unset option (``None``) and crashes with a
  TypeError; we reject the document, as stage 1 does.
* A rejected document in stage 1: the official dataset draws a random replacement document
  (``randint(0, len(dataset) - 1)``, i.e. sampling with replacement); our streams skip to the next document of the
  pass instead, so an epoch is a clean pass over the accepted documents.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch

PIPELINES = ("stage1", "stage2_3")
"""Values of `SampleRule.pipeline`: whose order of random draws `make_sample` follows."""


@dataclass
class SampleRule:
    """How documents are cut into samples (module docstring; official names: the same)."""

    min_length: int = 16
    """Length of the shortest chunk drawn, in tokens (fine-web; long documents use `longdoc_min_length`=384)."""
    max_length: int = 512
    """Longest context chunk, in tokens."""
    max_seq_length: int = 2048
    """Longest target, in tokens; documents shorter than this are cut into chunks entirely."""
    target_is_context_ratio: float = 0.1
    """Probability that a sample is a "Repeat:" sample (the target becomes the injected text)."""
    pipeline: str = "stage1"
    """When the repeat label is drawn: ``stage1`` before the split, ``stage2_3`` after it (module docstring)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"SampleRule: need 1 <= min_length <= max_length, got {self.min_length}, "
                             f"{self.max_length}")
        if self.max_seq_length <= self.min_length:
            raise ValueError(f"SampleRule: max_seq_length={self.max_seq_length} must exceed "
                             f"min_length={self.min_length} (a document of max_seq_length tokens would get no target)")
        if not 0.0 <= self.target_is_context_ratio <= 1.0:
            raise ValueError(f"SampleRule: target_is_context_ratio={self.target_is_context_ratio} not in [0, 1]")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"SampleRule: pipeline={self.pipeline!r}: expected one of {list(PIPELINES)}")

    @classmethod
    def from_any(cls, value: SampleRule | dict | None, *, pipeline: str | None = None) -> SampleRule:
        """A rule from a rule, a dict of its fields (e.g. a config section) or None (the defaults).

        `pipeline`, when given, replaces the default of a dict or None that does not name one (a data module's own
        stage); a `SampleRule` is returned as it is.
        """
        if isinstance(value, cls):
            return value
        value = {} if value is None else dict(value)
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"SampleRule: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        if pipeline is not None:
            value.setdefault("pipeline", pipeline)
        return cls(**value)

    def accepts(self, length: int, min_length: int | None = None) -> bool:
        """Whether a document of `length` tokens yields a sample (depends on the length only)."""
        lo = self.min_length if min_length is None else min_length
        return length >= lo and (length > self.max_length or length >= self.max_seq_length)


@dataclass
class Sample:
    """One training sample: one document, as the training step consumes it (batch size 1 per rank)."""

    contexts: list[torch.Tensor]
    """1-D LongTensor chunks in document order (written into the memory one by one)."""
    target: torch.Tensor
    """1-D LongTensor read against the memory (for `repeat` samples the step builds its own target)."""
    repeat: bool = False
    """The "Repeat:" task (official label 4): the target is replaced by the instruction + the injected text."""
    doc_id: str = ""
    """Where the document comes from (e.g. ``data/CC-MAIN-2024-10/train-00000.parquet:123``)."""
    source: str = ""
    """Which stream it comes from: ``fineweb``, ``4k-8k``, ``synthetic``, ..."""
    position: int = -1
    """Index of this sample in its rank's stream (0 = the first sample the rank ever consumed)."""
    epoch: int = 0
    """Pass over `source` that this document belongs to (0 = the first)."""
    target_mask: torch.Tensor | None = None
    """1-D bool, as long as `target`: False = no loss on that token (e.g. a question's prompt); None: loss on all."""
    # The retriever's labels, where the data knows what its target asks about. Without them the positives are every
    # row the sample wrote (the official labels) and the queries a random-length prefix of the target
    # (stages/step.py `retrieval_labels`).
    retrieval_positives: list[torch.Tensor] | None = None
    """One 1-D bool mask per context chunk, as long as that chunk: the rows written at the marked tokens are the
    retriever's positives (none marked in any injected chunk: the official labels)..."""
    retrieval_query_tokens: int | None = None
    """...queried by this many leading target tokens (the question's prompt; None: a random length per layer)."""
    val_source: str = ""
    """The source a validation sample is also scored under (`val/<val_source>/loss`, `val/<val_source>/token_acc`):
    set by a DataModule whose validation set mixes sources; empty: the overall `val/*` curves only."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the contexts and the target together."""
        return sum(int(c.numel()) for c in self.contexts) + int(self.target.numel())

    def _tensors_to(self, move) -> Sample:
        """A copy (of the same class: subclasses' extra fields come along) with `move` applied to every tensor."""
        return replace(self, contexts=[move(c) for c in self.contexts], target=move(self.target),
                       target_mask=None if self.target_mask is None else move(self.target_mask),
                       retrieval_positives=None if self.retrieval_positives is None else [
                           move(p) for p in self.retrieval_positives])

    def to(self, device: torch.device | str) -> Sample:
        """A copy with the tensors on `device` (Lightning moves batches with `.to`)."""
        return self._tensors_to(lambda t: t.to(device))

    def pin_memory(self) -> Sample:
        """A copy in pinned host memory (called by a DataLoader with ``pin_memory=True``)."""
        return self._tensors_to(lambda t: t.pin_memory())


class RandomSource(Protocol):
    """The two calls the rule makes (a `random.Random` has them)."""

    def random(self) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


@dataclass(frozen=True)
class DocumentSplit:
    """Where a document's contexts and target lie, as ``(offset, length)`` token spans."""

    contexts: list[tuple[int, int]]
    target: tuple[int, int]


def split_lengths(length: int, lo: int, hi: int, rng: RandomSource) -> list[int]:
    """The official chunk lengths of `length` tokens, left to right (module docstring).

    While more than `hi` tokens remain, the next chunk is ``rng.randint(lo, hi)`` tokens; the rest is the last chunk.
    If it is shorter than `lo` (and not the only chunk), the earlier chunks give it tokens, newest first, down to `lo`
    each, and it becomes `lo` long even where they could not give enough: then the lengths add up to more than
    `length` (only possible when ``hi < 2 * lo - 1``), and the caller's last slice ends with the tokens.

    Returns:
        The chunk lengths: one (``[length]``) when ``length <= hi``.
    """
    sizes: list[int] = []
    remaining = length
    while remaining > hi:
        size = rng.randint(lo, hi)
        sizes.append(size)
        remaining -= size
    if remaining >= lo or not sizes:
        return [*sizes, remaining]
    missing = lo - remaining
    for i in range(len(sizes) - 1, -1, -1):
        give = min(missing, sizes[i] - lo)
        sizes[i] -= give
        missing -= give
        if missing == 0:
            break
    return [*sizes, lo]


def _spans(sizes: list[int], end: int) -> list[tuple[int, int]]:
    """Consecutive ``(offset, length)`` spans of `sizes`, the last one cut off at `end` (see `split_lengths`)."""
    spans, offset = [], 0
    for size in sizes:
        spans.append((offset, min(size, end - offset)))
        offset += size
    return spans


def split_document(length: int, rule: SampleRule, rng: RandomSource, min_length: int | None = None
                   ) -> DocumentSplit | None:
    """Where the contexts and the target of a `length`-token document lie (module docstring), without the label.

    Returns:
        The spans, or None when the document is rejected (exactly when ``not rule.accepts(length, min_length)``).
    """
    lo = rule.min_length if min_length is None else min_length
    hi, seq = rule.max_length, rule.max_seq_length
    if length < lo:
        return None
    if length < seq:
        *contexts, target = _spans(split_lengths(length, lo, hi, rng), length)
        return DocumentSplit(contexts, target) if contexts else None
    if length < seq + lo:
        return DocumentSplit([(0, lo)], (lo, length - lo))
    target_length = rng.randint(lo, seq)  # drawn before the contexts, as in the official code
    rest = length - target_length
    return DocumentSplit(_spans(split_lengths(rest, lo, hi, rng), rest), (rest, target_length))


def make_sample(tokens: Sequence[int] | torch.Tensor, rule: SampleRule, rng: RandomSource,
                min_length: int | None = None, *, doc_id: str = "", source: str = "", position: int = -1,
                epoch: int = 0) -> Sample | None:
    """Cut one document into contexts and a target and draw its label (module docstring); None when rejected.

    Args:
        tokens: the document's token ids (no BOS).
        rule: chunk and target lengths, and when the label is drawn (`SampleRule.pipeline`).
        rng: the document's own random generator (the only source of randomness); called exactly as the official
            code calls Python's `random` module.
        min_length: overrides ``rule.min_length`` (384 for long documents).
        doc_id, source, position, epoch: copied into the `Sample`.
    """
    ids = tokens.to(torch.long).reshape(-1) if isinstance(tokens, torch.Tensor) else torch.as_tensor(
        list(tokens), dtype=torch.long)
    label_first = rule.pipeline == "stage1"
    repeat = label_first and rng.random() < rule.target_is_context_ratio
    split = split_document(int(ids.numel()), rule, rng, min_length)
    if split is None:
        return None
    if not label_first:
        repeat = rng.random() < rule.target_is_context_ratio
    contexts = [ids[offset:offset + size] for offset, size in split.contexts]
    offset, size = split.target
    return Sample(contexts=contexts, target=ids[offset:offset + size], repeat=repeat, doc_id=doc_id, source=source,
                  position=position, epoch=epoch)


def document_rng(seed: int, source: str, epoch: int, doc_index: int) -> random.Random:
    """The per-document generator of `make_sample`: independent of rank/worker layout, so resume is exact."""
    return random.Random(f"{seed}:{source}:{epoch}:{doc_index}")


__all__ = ["DocumentSplit", "PIPELINES", "RandomSource", "Sample", "SampleRule", "document_rng", "make_sample",
           "split_document", "split_lengths"]

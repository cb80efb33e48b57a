"""The document -> training sample rule (research/training.md §1.3), in one place.

A document of ``L`` tokens becomes context chunks (written into the memory one by one) and a target (read against
the memory). With ``min_len`` = `SampleRule.min_length` (16 for fine-web, 384 for the long SlimPajama documents),
``max_len`` = `SampleRule.max_length` (512) and ``S`` = `SampleRule.max_seq_length` (2048):

* ``L < S``: the whole document is cut left to right into chunks of uniform random length in ``[min_len, max_len]``;
  the last chunk is the target, the others are the contexts. The last piece is fixed up to at least ``min_len``
  tokens (see `split_lengths`). A document that fits in one chunk (``L <= max_len``) has no context and is rejected,
  as in the official code.
* ``S <= L < S + min_len``: the context is the first ``min_len`` tokens, the target is the rest (``< S`` tokens).
* ``L >= S + min_len``: the target is the last ``U[min_len, S]`` tokens; the rest (at least ``min_len`` tokens) is cut
  into context chunks of ``U[min_len, max_len]`` tokens with the same fix-up.

With probability `SampleRule.target_is_context_ratio` the sample is a "Repeat:" sample (official label 4): the split
is the same, and the training step builds the repeat target itself from the context chunks.

Corner cases of the official code and what we do instead (documented fixes):

* ``L < min_len``: the official stream loader compares ``L`` with ``None`` and crashes (training.md §7 item 3); the
  map-style loader rejects. **We reject.**
* ``min_len <= L <= max_len``: one chunk, no context; officially rejected (stage 1 then draws a random replacement
  document, i.e. sampling with replacement, §7 item 4; the stream skips it). **We reject; the stream skips it**, so
  an epoch is a clean pass over the accepted documents.
* The last piece is shorter than ``min_len`` and the earlier chunks cannot give enough tokens without dropping below
  ``min_len`` themselves. This only happens when ``max_len < 2 * min_len`` (e.g. 384..512): then some lengths cannot
  be cut into ``[min_len, max_len]`` chunks at all (513..767 with 384..512). **We spread the short piece over the
  earlier chunks** (each up to ``max_len``) when that is possible; when no cut exists, a document with ``L < S`` is
  rejected, and the context of an ``L >= S + min_len`` document keeps a last chunk shorter than ``min_len`` (a short
  write is harmless; rejecting would make acceptance depend on the random target length).

Acceptance depends on ``L`` alone (`SampleRule.accepts`), never on the random draws, so a resumed stream can skip
documents by their token count without drawing anything. The random draws use the ``rng`` passed in; streams give
every document its own ``random.Random(f"{seed}:{source}:{epoch}:{doc_index}")`` so that a sample does not depend
on how documents are spread over ranks and dataloader workers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class SampleRule:
    """How documents are cut into samples (official names: the same)."""

    min_length: int = 16
    """Shortest context chunk and target, in tokens (fine-web; long documents use `longdoc_min_length`=384)."""
    max_length: int = 512
    """Longest context chunk, in tokens."""
    max_seq_length: int = 2048
    """Longest target, in tokens; documents shorter than this are cut into chunks entirely."""
    target_is_context_ratio: float = 0.1
    """Probability that a sample is a "Repeat:" sample (the target becomes the injected text)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"SampleRule: need 1 <= min_length <= max_length, got {self.min_length}, "
                             f"{self.max_length}")
        if self.max_seq_length < self.min_length:
            raise ValueError(f"SampleRule: max_seq_length={self.max_seq_length} < min_length={self.min_length}")
        if not 0.0 <= self.target_is_context_ratio <= 1.0:
            raise ValueError(f"SampleRule: target_is_context_ratio={self.target_is_context_ratio} not in [0, 1]")

    @classmethod
    def from_any(cls, value: SampleRule | dict | None) -> SampleRule:
        """A rule from a rule, a dict of its fields (e.g. a config section) or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"SampleRule: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(value))

    def accepts(self, length: int, min_length: int | None = None) -> bool:
        """Whether a document of `length` tokens yields a sample (depends on the length only)."""
        lo = self.min_length if min_length is None else min_length
        if length < lo:
            return False
        if length < self.max_seq_length:
            return length > self.max_length and _cuttable(length, lo, self.max_length)
        return True


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
    # The retriever's labels, where the data knows what its target asks about (the demo's facts: a question about one
    # of the injected facts). Without them the positives are every row the sample wrote (official labels) and the
    # query a random-length prefix of the target (stages/base.py `_retrieval_labels`).
    retrieval_chunk: int | None = None
    """Index into `contexts` of the chunk the target asks about: its rows are the positives..."""
    retrieval_query_tokens: int | None = None
    """...for a query of this many leading target tokens (the question's prompt, e.g. "Recall: <name>")..."""
    retrieval_positions: list[int] | None = None
    """...and of that chunk's rows only those written at these token positions (facts: the answer's tokens, the row
    the reader copies the answer from; with only that row retrieved a stage-3 demo model answered 53-57% of facts 78
    tokens old, with only the name rows 8-12%; a retriever trained on all rows of the fact fetched the name rows)."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the contexts and the target together."""
        return sum(int(c.numel()) for c in self.contexts) + int(self.target.numel())

    def to(self, device: torch.device | str) -> Sample:
        """A copy with the tensors on `device` (of the same class: subclasses' extra fields come along)."""
        return replace(self, contexts=[c.to(device) for c in self.contexts], target=self.target.to(device))

    def pin_memory(self) -> Sample:
        """A copy in pinned host memory (called by a DataLoader with ``pin_memory=True``)."""
        return replace(self, contexts=[c.pin_memory() for c in self.contexts], target=self.target.pin_memory())


def _cuttable(length: int, lo: int, hi: int) -> bool:
    """Whether `length` tokens can be cut into chunks whose lengths all lie in [lo, hi]."""
    n = -(-length // hi)  # fewest chunks that can hold `length`; more chunks only need more tokens
    return length >= lo and n * lo <= length


def split_lengths(length: int, lo: int, hi: int, rng: random.Random, *, allow_short_last: bool = False
                  ) -> list[int] | None:
    """Cut `length` tokens into chunks of uniform random length in [lo, hi], left to right.

    Lengths are drawn until they cover the document; the last chunk is what is left. If it is shorter than `lo`, the
    earlier chunks give it tokens, the newest first, down to `lo` each. If they cannot give enough, the short piece
    is spread over the earlier chunks instead (newest first, up to `hi` each), one chunk fewer. If no cut into
    [lo, hi] exists at all, the result is None, or with `allow_short_last` the draw with a short last chunk.

    Returns:
        The chunk lengths (summing to `length`), or None.
    """
    if length <= 0:
        return None
    sizes: list[int] = []
    total = 0
    while total < length:
        n = rng.randint(lo, hi)
        sizes.append(n)
        total += n
    sizes[-1] -= total - length  # the last chunk is what is left: 1..hi tokens
    if sizes[-1] >= lo:
        return sizes
    if not _cuttable(length, lo, hi):
        return sizes if allow_short_last else None
    deficit = lo - sizes[-1]
    for i in range(len(sizes) - 2, -1, -1):
        give = min(deficit, sizes[i] - lo)
        sizes[i] -= give
        sizes[-1] += give
        deficit -= give
        if deficit == 0:
            return sizes
    # Every earlier chunk is down to `lo`: spread the short piece over them (possible because a cut exists).
    rest = sizes.pop()
    for i in range(len(sizes) - 1, -1, -1):
        take = min(rest, hi - sizes[i])
        sizes[i] += take
        rest -= take
        if rest == 0:
            break
    assert rest == 0 and sum(sizes) == length, (length, lo, hi, sizes)
    return sizes


def make_sample(tokens: Sequence[int] | torch.Tensor, rule: SampleRule, rng: random.Random,
                min_length: int | None = None, *, doc_id: str = "", source: str = "", position: int = -1,
                epoch: int = 0) -> Sample | None:
    """Cut one document into contexts and a target (module docstring); None when the document is rejected.

    Args:
        tokens: the document's token ids (no BOS).
        rule: chunk and target lengths.
        rng: the document's own random generator (the only source of randomness).
        min_length: overrides ``rule.min_length`` (384 for long documents).
        doc_id, source, position, epoch: copied into the `Sample`.
    """
    ids = tokens.to(torch.long).reshape(-1) if isinstance(tokens, torch.Tensor) else torch.as_tensor(
        list(tokens), dtype=torch.long)
    lo = rule.min_length if min_length is None else min_length
    hi, seq = rule.max_length, rule.max_seq_length
    length = int(ids.numel())
    if not rule.accepts(length, lo):
        return None
    repeat = rng.random() < rule.target_is_context_ratio
    if length < seq:
        sizes = split_lengths(length, lo, hi, rng)
        assert sizes is not None and len(sizes) >= 2, (length, sizes)  # guaranteed by `accepts`
        *contexts, target = torch.split(ids, sizes)
    elif length < seq + lo:
        contexts, target = [ids[:lo]], ids[lo:]
    else:
        target_len = rng.randint(lo, seq)
        sizes = split_lengths(length - target_len, lo, hi, rng, allow_short_last=True)
        assert sizes is not None
        contexts = list(torch.split(ids[: length - target_len], sizes))
        target = ids[length - target_len:]
    return Sample(contexts=list(contexts), target=target, repeat=repeat, doc_id=doc_id, source=source,
                  position=position, epoch=epoch)


def document_rng(seed: int, source: str, epoch: int, doc_index: int) -> random.Random:
    """The per-document generator of `make_sample`: independent of rank/worker layout, so resume is exact."""
    return random.Random(f"{seed}:{source}:{epoch}:{doc_index}")


__all__ = ["Sample", "SampleRule", "make_sample", "split_lengths", "document_rng"]

"""One rank's training step in plain torch: memory as state, every random decision from one `Decisions` object.

`MemoryStep` owns what a rank carries from step to step: its memory, the row stamps (which sample wrote each
short-term slot, so the retriever's labels follow rows through evictions), the revisit cache and the documents seen.
`step(sample)` runs one training step and returns its loss; `validate(sample)` scores a held-out sample on a copy of
the memory. Nothing here imports Lightning: the LightningModules (stages/base.py) only log, optimise and checkpoint.

Step kinds (drawn per step, the official probabilities in `StepConfig`):
  full     full-context LM on the document's first max_seq_length tokens against the memory; no write
  revisit  re-score a cached earlier target against the current memory; no write
  multi    inject up to `num_contexts_schedule` chunks (no gradient; one-chunk documents keep it), then read the
           target against the whole updated memory with the read adapter (+ retriever losses)
  single   inject one chunk with gradient; the target reads only [bos ; that block] with the write adapter; then
           the block is committed
Where we differ from the official code: the target of a multi-chunk step is scored against the memory the injection
actually produced (the official code read a random subset of the pool plus the new rows, then dropped another random
subset); the revisit counter also counts the chunks of steps that keep the cache after a revisit (the official code
skipped them); validation works on a copy of the memory (the official code injected into the training memory).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..model import MemoryState, MPlus
from ..model.adapters import WRITE
from ..model.mplus import ReadView, RetrieverProbe
from ..model.retriever import retriever_bce_loss

if TYPE_CHECKING:
    from ..config import StepConfig
    from ..data.sample import Sample

RECENT_DOCS = 64
"""Document ids a rank remembers (saved with its state: which documents it read last)."""
NEVER_WRITTEN = -1
"""Row stamp of a slot no training sample wrote (the initial pool, or rows a memory was given)."""
VALIDATION = -2
"""Row stamp of rows written by validation (only ever in a copy of the memory)."""
NOT_POSITIVE = -3
"""Row stamp of a row the current sample wrote that is not one of its retriever positives."""


# ---- collectives ----------------------------------------------------------------------------------------------
def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over all ranks when torch.distributed is initialised, else `value`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def summed_over_ranks(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per key, the element-wise sum of every rank's `values` (a key that a rank lacks adds nothing), in key order; the
    same on every rank. One process: `values`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(sorted(values.items()))
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values)
    total: dict[str, list[float]] = {}
    for part in parts:
        for key, vals in part.items():
            total[key] = [a + b for a, b in zip(total.get(key, [0.0] * len(vals)), vals)]
    return dict(sorted(total.items()))


# ---- random decisions ------------------------------------------------------------------------------------------
class Decisions:
    """Every random decision of a training step, drawn from seeded generators.

    The step kinds come from one stream that is the same on every rank: under FSDP each layer's forward is a
    collective, so all ranks must run the same sequence of passes. Retriever query lengths come from a per-rank
    stream, evictions from a per-rank torch.Generator (the draws `MemoryState.commit` makes with it).
    """

    def __init__(self, cfg: StepConfig, seed: int = 0, rank: int = 0, per_layer_evictions: bool = True):
        self.cfg = cfg
        self.per_layer_evictions = per_layer_evictions
        self.step_rng = random.Random(f"{seed}:steps")
        self.rank_rng = random.Random(f"{seed}:{rank}")
        self.eviction_generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def full_context(self) -> bool:
        """Whether this step is a full-context LM step (asked first, every step)."""
        return self.step_rng.random() < self.cfg.full_context_ratio

    def multi_chunk(self) -> bool:
        """Whether a step that is not full-context injects several chunks and reads the whole memory (else one chunk
        and only its new block); asked before the revisit decision, and on a revisit step it says whether the
        retriever losses are computed."""
        return self.step_rng.random() < self.cfg.multi_chunk_ratio

    def revisit(self) -> bool:
        """Whether to re-score the cached target; asked only when a revisit is possible."""
        return self.step_rng.random() >= self.cfg.pass_ratio

    def replace_cache(self) -> bool:
        """Whether a step right after a revisit replaces the cached target with its own."""
        return self.step_rng.random() < self.cfg.empty_prob

    def num_chunks(self, available: int, scheduled: int) -> int:
        """Chunks a multi-chunk step injects: all the sample has, up to the schedule's count."""
        return min(scheduled, available)

    def evictions(self, memory: MemoryState) -> torch.Tensor:
        """[L, K] ranks the next commit into `memory` evicts (asked only for commits into an initialised pool)."""
        return memory.sample_evictions(self.eviction_generator, self.per_layer_evictions)

    def query_lengths(self, target_len: int, num_layers: int) -> list[int]:
        """Per layer, how many leading target tokens the retriever's training queries come from."""
        return [self.rank_rng.randint(1, max(1, target_len - 1)) for _ in range(num_layers)]

    def ltm_query_lengths(self, target_len: int, num_layers: int) -> list[int] | None:
        """Per layer, how many leading target tokens retrieve the long-term rows of a read (asked for every read of a
        memory with a long-term part, with `random_retriever_length`): a random prefix, drawn apart from the
        retriever-loss prefix, as the official training did. A query with the whole target would contain the answer,
        which an inference prompt never does. None would mean the whole target."""
        return [self.rank_rng.randint(1, max(1, target_len - 1)) for _ in range(num_layers)]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.step_rng.getstate(), "rank_rng": self.rank_rng.getstate(),
                "evict_gen": self.eviction_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_rng.setstate(state["rng"])
        self.rank_rng.setstate(state["rank_rng"])
        self.eviction_generator.set_state(state["evict_gen"])


class ScriptedDecisions(Decisions):
    """Decisions given up front (tests): one list per method, consumed in order.

    Asking a method whose list is used up raises, naming it; `assert_consumed()` raises if something scripted was
    never asked for. `evictions` entries are [L, K] (or [K], the same for every layer) ranks to evict, sorted here;
    `query_lengths` and `ltm_query_lengths` entries are one length per layer. A script without `ltm_query_lengths`
    answers None (retrieve with the whole target).
    """

    METHODS = ("full_context", "multi_chunk", "revisit", "replace_cache", "num_chunks", "evictions", "query_lengths",
               "ltm_query_lengths")
    OPTIONAL = ("ltm_query_lengths",)
    """Methods that fall back to the default answer when the script does not name them."""

    def __init__(self, **script: Sequence[Any]):
        unknown = sorted(set(script) - set(self.METHODS))
        if unknown:
            raise TypeError(f"ScriptedDecisions: unknown decision(s) {unknown}; known: {list(self.METHODS)}")
        self.script = {name: list(script.get(name, ())) for name in self.METHODS
                       if name in script or name not in self.OPTIONAL}

    def _next(self, name: str) -> Any:
        if not self.script[name]:
            raise LookupError(f"ScriptedDecisions: the step asked for {name}() but nothing scripted is left for it")
        return self.script[name].pop(0)

    def full_context(self) -> bool:
        return bool(self._next("full_context"))

    def multi_chunk(self) -> bool:
        return bool(self._next("multi_chunk"))

    def revisit(self) -> bool:
        return bool(self._next("revisit"))

    def replace_cache(self) -> bool:
        return bool(self._next("replace_cache"))

    def num_chunks(self, available: int, scheduled: int) -> int:
        return int(self._next("num_chunks"))

    def evictions(self, memory: MemoryState) -> torch.Tensor:
        ranks = torch.as_tensor(self._next("evictions"), dtype=torch.long)
        L, N, K = memory.num_layers, memory.size, memory.num_tokens
        ranks = ranks.expand(L, -1) if ranks.dim() == 1 else ranks
        if tuple(ranks.shape) != (L, K) or int(ranks.min()) < 0 or int(ranks.max()) >= N:
            raise ValueError(f"ScriptedDecisions: evictions must be [layers, K] = [{L}, {K}] ranks in [0, {N}), got "
                             f"{ranks.tolist()}")
        ranks = ranks.sort(dim=1).values
        if bool((ranks[:, 1:] == ranks[:, :-1]).any()):
            raise ValueError(f"ScriptedDecisions: evictions name a rank twice in one layer: {ranks.tolist()}")
        return ranks.to(memory.device)

    def _lengths(self, name: str, num_layers: int) -> list[int]:
        lengths = [int(n) for n in self._next(name)]
        if len(lengths) != num_layers or min(lengths) < 1:
            raise ValueError(f"ScriptedDecisions: {name} needs one length >= 1 per layer ({num_layers}), got {lengths}")
        return lengths

    def query_lengths(self, target_len: int, num_layers: int) -> list[int]:
        return self._lengths("query_lengths", num_layers)

    def ltm_query_lengths(self, target_len: int, num_layers: int) -> list[int] | None:
        if "ltm_query_lengths" not in self.script:
            return None   # not scripted: retrieve with the whole target
        return self._lengths("ltm_query_lengths", num_layers)

    def assert_consumed(self) -> None:
        left = {name: len(values) for name, values in self.script.items() if values}
        if left:
            raise AssertionError(f"ScriptedDecisions: scripted decisions never asked for: {left}")

    def state_dict(self) -> dict[str, Any]:
        return {"script": {name: list(values) for name, values in self.script.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.script = {name: list(values) for name, values in state["script"].items()}


# ---- the sample's target and retriever labels -----------------------------------------------------------------
def target_sequence(sample: Sample, chunks: Sequence[torch.Tensor], *, instruction_ids: Sequence[int],
                    max_seq_length: int, mask_extra_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D sequence a step predicts and its loss mask (bool), on the device of the sample's tensors.

    Repeat samples: the instruction + the injected text, with the instruction and `mask_extra_tokens` more positions
    masked (built from ids: no decode/re-tokenize). Others: the target, masked where `sample.target_mask` says.
    """
    S = max_seq_length
    if sample.repeat:
        # on the chunks' device: on a GPU the batch arrives there, and a CPU instruction tensor would not concatenate
        instr = torch.tensor(list(instruction_ids), dtype=torch.long, device=chunks[0].device)
        body = torch.cat(list(chunks))[: S - len(instr)]
        ids = torch.cat([instr, body])
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[: len(instr) + mask_extra_tokens] = False
        return ids, mask
    ids = sample.target[:S]
    mask = sample.target_mask[:S].bool() if sample.target_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return ids, mask


def rows_written_at(token_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Which of the K rows a chunk's write produces come from the tokens marked in `token_mask` [n] -> bool [K].

    Row r of a write is the pass's output at chunk token n - K + r: a chunk longer than K writes its last K tokens'
    rows; a shorter one first re-processes old rows (rows 0 .. K-n-1), which no token of the chunk marks.
    """
    n, K = int(token_mask.numel()), num_tokens
    rows = torch.zeros(K, dtype=torch.bool)
    tokens = torch.arange(n - K, n)
    written = tokens >= 0
    rows[written] = token_mask.detach().cpu().bool()[tokens[written]]
    return rows


@dataclass
class RetrievalLabels:
    """What the retriever learns from one sample's injected chunks."""

    rows: list[torch.Tensor]
    """Per injected chunk, bool [K]: which of the rows it writes are positives."""
    query_tokens: int | None
    """Queries come from this many leading target tokens (None: a random length per layer)."""


def retrieval_labels(sample: Sample, injected: Sequence[int], num_tokens: int) -> RetrievalLabels:
    """The retriever's positives among the rows that the contexts `injected` (indices into sample.contexts) write.

    Without `sample.retrieval_positives`: every row the sample wrote (the official labels), random query lengths.
    With them: the rows written at the marked tokens of each injected chunk, queried by the target's first
    `sample.retrieval_query_tokens` tokens; a chunk whose marked tokens write no row counts with all its rows; and a
    sample none of whose injected chunks has a marked token (the chunk its question asks about was not injected)
    falls back to the official labels.
    """
    K = num_tokens
    everything = RetrievalLabels([torch.ones(K, dtype=torch.bool) for _ in injected], None)
    positives = sample.retrieval_positives
    if positives is None:
        return everything
    if len(positives) != len(sample.contexts) or any(
            int(p.numel()) != int(c.numel()) for p, c in zip(positives, sample.contexts)):
        raise ValueError(f"sample {sample.doc_id!r}: Sample.retrieval_positives needs one token mask per context "
                         f"chunk, as long as that chunk ({[int(c.numel()) for c in sample.contexts]} tokens), got "
                         f"{[int(p.numel()) for p in positives]}")
    marked = [bool(positives[i].any()) for i in injected]
    if not any(marked):
        return everything
    rows = []
    for i, any_marked in zip(injected, marked):
        chunk_rows = rows_written_at(positives[i], K) if any_marked else torch.zeros(K, dtype=torch.bool)
        rows.append(chunk_rows if chunk_rows.any() or not any_marked else torch.ones(K, dtype=torch.bool))
    return RetrievalLabels(rows, sample.retrieval_query_tokens)


# ---- the step --------------------------------------------------------------------------------------------------
@dataclass
class RevisitCache:
    """A target kept to be re-read later against a memory that has moved on (the official
    `cache_data_for_longer_context`)."""

    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    doc: int = -1
    chunks_since: int = 0
    last_step_was_revisit: bool = False
    query_tokens: int | None = None
    """The retriever query length of its sample (`RetrievalLabels.query_tokens`), if the data gave one."""


@dataclass
class StepResult:
    loss: torch.Tensor
    """What is optimised: the LM loss plus (multi-chunk and revisit steps of stages 2-3) the retriever losses."""
    lm_loss: torch.Tensor
    kind: str
    """full | revisit | multi | single."""
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    positives: torch.Tensor | None = None
    """[L, N] bool: the short-term slots the retriever losses counted as positives (multi-chunk and revisit)."""


def scheduled_chunks(cfg: StepConfig, global_step: int) -> int:
    """The most chunks a multi-chunk step injects at `global_step` (`num_contexts_schedule`)."""
    n = cfg.num_contexts_schedule[0][1]
    for start, value in cfg.num_contexts_schedule:
        if global_step >= start:
            n = value
    return n


class MemoryStep:
    """One rank's training state (memory, row stamps, revisit cache, documents seen) and its step.

    model: the MPlus being trained (it may be sharded: only its typed entry points are called).
    memory: this rank's memory (settable later; a memory set from outside has no known writers).
    decisions: every random choice (default: seeded `Decisions` of rank 0 with seed 0).
    agree_max: int -> the largest int over all ranks (default `max_over_ranks`): ranks agree on how many passes a
        step runs, so that every rank issues the same FSDP collectives.
    """

    def __init__(self, model: MPlus, cfg: StepConfig, memory: MemoryState | None = None, *,
                 decisions: Decisions | None = None, instruction_ids: Sequence[int] = (),
                 agree_max: Callable[[int], int] | None = None):
        self.model = model
        self.cfg = cfg
        self.decisions = decisions if decisions is not None else Decisions(
            cfg, per_layer_evictions=model.config.drop_memory_per_layer)
        self.instruction_ids = list(instruction_ids)
        self.agree_max = agree_max if agree_max is not None else (lambda value: max_over_ranks(value, self.device))
        self.row_stamps: torch.Tensor | None = None
        self._memory: MemoryState | None = None
        self.memory = memory
        self.revisit = RevisitCache()
        self.docs_seen = 0
        self.recent_docs: list[str] = []

    @property
    def memory(self) -> MemoryState | None:
        return self._memory

    @memory.setter
    def memory(self, memory: MemoryState | None) -> None:
        self._memory = memory
        self.row_stamps = None if memory is None else torch.full(
            memory.ranks.shape, NEVER_WRITTEN, dtype=torch.long, device=memory.device)

    @property
    def device(self) -> torch.device:
        """Where the step runs: where its memory lives."""
        if self._memory is None:
            raise RuntimeError("MemoryStep has no memory: set `.memory` (e.g. model.new_memory()) before stepping")
        return self._memory.device

    def to(self, device: torch.device | str | None = None, memory_dtype: torch.dtype | None = None) -> MemoryStep:
        """Move the memory (cast to `memory_dtype`), the row stamps and the revisit cache; returns self."""
        self.memory.to(device=device, dtype=memory_dtype)
        self.row_stamps = self.row_stamps.to(device)
        c = self.revisit
        c.ids = None if c.ids is None else c.ids.to(device)
        c.mask = None if c.mask is None else c.mask.to(device)
        return self

    # ---- memory writes -----------------------------------------------------------------------------------------
    def _keys(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.ltm_keys(rows)

    def _commit(self, memory: MemoryState, row_stamps: torch.Tensor, delta: torch.Tensor,
                stamps: torch.Tensor) -> torch.Tensor:
        """Commit delta [L, K, d] into `memory`, evicting the rows `decisions.evictions` names, and stamp the new
        slots in `row_stamps` (stamps [K]: one per row of delta). Returns the new slots [L, K] in delta's row order."""
        evict = self.decisions.evictions(memory) if memory.initialized else None
        memory.commit(delta.detach(), evict_ranks=evict, keys_fn=self._keys if memory.ltm is not None else None)
        slots = memory.slots_in_rank_order()[:, -memory.num_tokens:]
        row_stamps.scatter_(1, slots, stamps.to(row_stamps.device).expand_as(slots))
        return slots

    def _inject_no_grad(self, memory: MemoryState, row_stamps: torch.Tensor, chunks: Sequence[torch.Tensor],
                        stamps: Sequence[torch.Tensor]) -> None:
        """Inject chunks one by one without gradient, stamping chunk i's rows with stamps[i] [K]. Ranks with fewer
        chunks than the most any rank has run the same passes on a stand-in chunk and discard them, so every rank
        issues the same FSDP collectives."""
        n = self.agree_max(len(chunks))
        for i in range(n):
            real = i < len(chunks)
            chunk = chunks[i] if real else torch.full((memory.num_tokens,), 3, dtype=torch.long)
            with torch.no_grad():
                delta = self.model.write_pass(chunk[None].to(self.device), memory.newest_block())
                if real:
                    self._commit(memory, row_stamps, delta, stamps[i])
                elif memory.ltm is not None and memory.initialized:
                    self._keys(delta.new_zeros(delta.shape))  # the commit's key pass

    # ---- retriever losses ----------------------------------------------------------------------------------------
    def _probe(self, memory: MemoryState, target_len: int, encoder: bool,
               query_tokens: int | None = None) -> RetrieverProbe | None:
        """The retriever's training probe: queries from a prefix of the target (`query_tokens` long when the data
        says which tokens ask, else `decisions.query_lengths`, as official, or the whole target)."""
        s = self.cfg
        if not s.retriever_loss:
            return None
        L = self.model.config.num_layers
        if query_tokens:
            lengths = [min(query_tokens, target_len)] * L
        elif s.random_retriever_length:
            lengths = self.decisions.query_lengths(target_len, L)
        else:
            lengths = [target_len] * L
        enc = None
        if encoder and s.encoder_retriever_loss and self.model.config.add_encoder_retriever:
            enc = torch.argsort(memory.ranks, dim=1)[:, -memory.num_tokens:]  # newest block, per layer
        return RetrieverProbe(lengths=lengths, encoder_queries=enc)

    def _view(self, memory: MemoryState, target_len: int, query_tokens: int | None = None) -> ReadView:
        """The read view of `memory` for a target of `target_len` tokens. With a long-term part, the rows are
        retrieved with the target's first `query_tokens` tokens when the data says which tokens ask (the question),
        else with the prefix `decisions.ltm_query_lengths` draws (`random_retriever_length`), else the whole target."""
        view = self.model.view(memory)
        if view.ltm is not None:
            L = self.model.config.num_layers
            if query_tokens:
                view.ltm_query_lengths = [min(query_tokens, target_len)] * L
            elif self.cfg.random_retriever_length:
                view.ltm_query_lengths = self.decisions.ltm_query_lengths(target_len, L)
        return view

    def _retriever_losses(self, probe: RetrieverProbe | None, positives: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if probe is None or not probe.scores:
            return torch.zeros((), device=self.device), {}
        w = torch.stack(probe.scores)                                      # [L, N]
        loss = retriever_bce_loss(w, positives, self.cfg.negative_loss_weight)
        picked = w.detach() > 0.5
        tp = (picked & positives).sum().item()
        metrics = {"retriever_loss": loss.item(),
                   "retriever_precision": tp / max(1, picked.sum().item()),
                   "retriever_recall": tp / max(1, positives.sum().item())}
        if probe.encoder_scores:
            enc = retriever_bce_loss(torch.stack(probe.encoder_scores), positives, self.cfg.negative_loss_weight)
            metrics["retriever_encoder_loss"] = enc.item()
            loss = loss + enc
        return loss, metrics

    # ---- the step ----------------------------------------------------------------------------------------------
    def target(self, sample: Sample, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_sequence` of the sample as a batch of one on the step's device: (ids [1, n], mask [1, n])."""
        ids, mask = target_sequence(sample, chunks, instruction_ids=self.instruction_ids,
                                    max_seq_length=self.cfg.max_seq_length,
                                    mask_extra_tokens=self.cfg.mask_extra_tokens)
        return ids[None].to(self.device), mask[None].to(self.device)

    def step(self, sample: Sample, global_step: int = 0) -> StepResult:
        """One training step on `sample` (its loss is not yet backpropagated); `global_step` picks the chunk count
        of `num_contexts_schedule`."""
        cfg, model, memory, decide = self.cfg, self.model, self.memory, self.decisions
        if memory is None:
            raise RuntimeError("MemoryStep has no memory: set `.memory` (e.g. model.new_memory()) before stepping")
        doc = self.docs_seen
        self.docs_seen += 1
        self.recent_docs = (self.recent_docs + [str(sample.doc_id)])[-RECENT_DOCS:]
        contexts = [c.long() for c in sample.contexts]
        if not contexts:
            raise ValueError(f"training sample {sample.doc_id!r} has no context chunk (the data should reject it)")
        if decide.full_context():
            # Full-context LM: the document's first tokens read against the memory; nothing is written.
            seq = sample.target if sample.repeat else torch.cat(contexts + [sample.target])
            ids = seq[: cfg.max_seq_length][None].to(self.device)
            loss, _ = model.lm_loss(ids, torch.ones_like(ids, dtype=torch.bool), self._view(memory, ids.shape[1]))
            return StepResult(loss, loss, "full", ids.shape[1])

        c = self.revisit
        multi = decide.multi_chunk()
        if (cfg.revisit and not c.last_step_was_revisit and c.ids is not None and c.chunks_since > 0
                and decide.revisit()):
            # Revisit: the document fetched for this step is not used (as official); its target waits in no cache.
            probe = self._probe(memory, c.ids.shape[1], encoder=False, query_tokens=c.query_tokens) if multi else None
            loss, _ = model.lm_loss(c.ids, c.mask, self._view(memory, c.ids.shape[1], c.query_tokens), probe=probe)
            positives = self.row_stamps == c.doc
            r_loss, metrics = self._retriever_losses(probe, positives)
            c.last_step_was_revisit = True
            metrics["revisit_distance_chunks"] = c.chunks_since
            return StepResult(loss + r_loss, loss, "revisit", c.ids.shape[1], metrics, positives)

        n_chunks = self.agree_max(decide.num_chunks(len(contexts), scheduled_chunks(cfg, global_step))) if multi else 1
        # repeat samples copy their first chunks; the others read their last ones (fewer if this document is short)
        first = 0 if sample.repeat else max(0, len(contexts) - n_chunks)
        injected = list(range(first, min(len(contexts), first + n_chunks)))
        chunks = [contexts[i] for i in injected]
        ids, mask = self.target(sample, chunks)
        tokens = ids.shape[1] + sum(len(x) for x in chunks)
        metrics: dict[str, Any] = {"num_contexts": n_chunks}
        labels = retrieval_labels(sample, injected, memory.num_tokens)
        stamps = [torch.where(rows, doc, NOT_POSITIVE) for rows in labels.rows]
        positives = None
        if multi:
            if n_chunks == 1 and cfg.single_chunk_gradient:
                delta = model.write_pass(chunks[0][None].to(self.device), memory.newest_block())
                slots = self._commit(memory, self.row_stamps, delta, stamps[0])
                # The committed rows are read with the new block carrying its gradient back into the write pass.
                view = self._view(memory, ids.shape[1], labels.query_tokens)
                view.written = (slots, delta)
            else:
                self._inject_no_grad(memory, self.row_stamps, chunks, stamps)
                view = self._view(memory, ids.shape[1], labels.query_tokens)
            probe = self._probe(memory, ids.shape[1], encoder=True, query_tokens=labels.query_tokens)
            loss, _ = model.lm_loss(ids, mask, view, probe=probe)
            positives = self.row_stamps == doc
            r_loss, r_metrics = self._retriever_losses(probe, positives)
            metrics.update(r_metrics)
            total, kind = loss + r_loss, "multi"
        else:
            delta = model.write_pass(chunks[0][None].to(self.device), memory.newest_block())
            loss, _ = model.lm_loss(ids, mask, model.delta_view(delta, WRITE))
            self._commit(memory, self.row_stamps, delta, stamps[0])
            total, kind = loss, "single"
        self._update_revisit_cache(ids, mask, doc, n_chunks, labels.query_tokens)
        return StepResult(total, loss, kind, tokens, metrics, positives)

    def _update_revisit_cache(self, ids, mask, doc: int, n_chunks: int, query_tokens: int | None) -> None:
        c = self.revisit
        if c.ids is None or (c.last_step_was_revisit and self.decisions.replace_cache()):
            c.ids, c.mask, c.doc, c.chunks_since, c.query_tokens = ids.detach(), mask, doc, 0, query_tokens
        else:
            c.chunks_since += n_chunks  # also when the cache was kept after a revisit (the official code skipped it)
        c.last_step_was_revisit = False

    @torch.no_grad()
    def validate(self, sample: Sample, global_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM loss, next-token accuracy) of the sample's target after injecting its last scheduled contexts into a
        copy of the memory; the training memory is left as it was (the eviction draws come from `decisions`)."""
        memory, row_stamps = self.memory.clone(), self.row_stamps.clone()
        contexts = [c.long() for c in sample.contexts][-scheduled_chunks(self.cfg, global_step):]
        stamp = torch.full((memory.num_tokens,), VALIDATION, dtype=torch.long)
        self._inject_no_grad(memory, row_stamps, contexts, [stamp] * len(contexts))
        ids, mask = self.target(sample, contexts)
        loss, count, hits = self.model.lm_loss(ids, mask, self.model.view(memory), with_accuracy=True)
        return loss, hits.float() / count.clamp(min=1)

    # ---- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything this rank carries between steps, copied to CPU (memory, stamps, cache, documents, decisions).

        Copies, also of a memory on CPU: the live tensors change in place at the next step."""
        c = self.revisit
        memory = self.memory.state_dict()
        if self.memory.device.type == "cpu":   # MemoryState.state_dict shares the storage of CPU tensors
            memory = {k: v.clone() for k, v in memory.items()}
        copy = lambda t: None if t is None else t.detach().to("cpu", copy=True)  # noqa: E731
        return {
            "memory": memory, "memory_meta": self.memory.meta(),
            "row_doc": copy(self.row_stamps), "docs_seen": self.docs_seen, "recent_docs": list(self.recent_docs),
            "revisit": {"ids": copy(c.ids), "mask": copy(c.mask), "doc": c.doc, "chunks_since": c.chunks_since,
                        "last": c.last_step_was_revisit, "query_tokens": c.query_tokens},
            **self.decisions.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, device: torch.device | str | None = None,
                        memory_dtype: torch.dtype | None = None) -> None:
        """Continue from `state_dict()`'s output, the memory on `device` in `memory_dtype`. The memory may keep the
        state's tensors (no copy of a memory that is already on `device`): load a state once."""
        self.memory = MemoryState.from_state_dict(state["memory"], state["memory_meta"]).to(device, memory_dtype)
        self.row_stamps = state["row_doc"].to(device, copy=True)
        self.docs_seen = state["docs_seen"]
        self.recent_docs = list(state.get("recent_docs", []))
        r = state["revisit"]
        self.revisit = RevisitCache(
            ids=None if r["ids"] is None else r["ids"].to(device),
            mask=None if r["mask"] is None else r["mask"].to(device),
            doc=r["doc"], chunks_since=r["chunks_since"], last_step_was_revisit=r["last"],
            query_tokens=r.get("query_tokens"))
        self.decisions.load_state_dict(state)

"""Retention diagnostics (`diagnose: true`, M+ mode): is a miss the retriever's or the reader's?

At every scoring point of an item, where are the rows its context wrote: still in the short-term pool, moved to
the long-term memory, and of those, how many did each layer's retrieval pick for the question? And would the reader
answer if the retrieval were an oracle, i.e. put the context's long-term rows first (`with_oracle_retrieval`)?

This is how the CPU demo's retriever problem was found (README): 78 tokens after a fact, its model answered 12%, 57%
with an oracle retrieval, while each layer's retrieval picked 0.2 of the fact's 5.6 long-term rows. Rows are
recognised by their bits (a commit moves a row into the long-term memory unchanged). Costs one extra write of the
context, and one read and one generation per scoring point.
"""

from __future__ import annotations

import torch

from ..model.memory import LongTermMemory, MemoryState
from .runtime import generate_ids


def _fingerprints(rows: torch.Tensor) -> torch.Tensor:
    """[..., d] rows -> [...] int64 sums of their bit patterns: equal rows give equal sums, exactly."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return rows.contiguous().view(bits).to(torch.int64).sum(-1)


def find_rows(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of `store` [M, d] that equal one of `rows` [R, d] (bit for bit)."""
    if store.shape[0] == 0 or rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=store.device)
    rows = rows.to(device=store.device, dtype=store.dtype)
    candidates = torch.isin(_fingerprints(store), _fingerprints(rows)).nonzero().flatten()
    same = (store[candidates][:, None] == rows[None]).all(-1).any(1)   # fingerprints can collide: check the bits
    return candidates[same]


def locate(memory: MemoryState, rows: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """Where the rows [L, R, d] are now: per layer, how many are in the short-term pool, and the long-term memory
    indices of those that moved there."""
    in_stm, in_ltm = [], []
    for l in range(memory.num_layers):
        in_stm.append(int(find_rows(memory.rows[l], rows[l]).numel()))
        ltm_rows = memory.ltm.view(l)[0] if memory.ltm is not None else memory.rows.new_zeros(0, memory.hidden_size)
        in_ltm.append(find_rows(ltm_rows, rows[l]))
    return in_stm, in_ltm


class PinnedLongTermMemory(LongTermMemory):
    """A long-term memory sharing the rows, keys and ages of `ltm` (for reading only) whose retrieval takes, per layer
    l, the rows `pinned[l]` first (up to the k it reads) and the rest by score as usual; still ordered oldest first."""

    def __init__(self, ltm: LongTermMemory, pinned: list[torch.Tensor]):
        self.capacity, self.size = ltm.capacity, ltm.size
        self.rows, self.keys, self.ages = ltm.rows, ltm.keys, ltm.ages
        self.pinned = pinned

    def scores(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        scores = super().scores(layer, queries)
        return scores.index_fill(1, self.pinned[layer].to(scores.device), float("inf"))


def with_oracle_retrieval(memory: MemoryState, pinned: list[torch.Tensor]) -> MemoryState:
    """`memory` (the same tensors, for reading only) whose reads retrieve, per layer l, its long-term rows `pinned[l]`
    first: the oracle retrieval."""
    return MemoryState(rows=memory.rows, ranks=memory.ranks, ages=memory.ages, num_tokens=memory.num_tokens,
                       ltm=PinnedLongTermMemory(memory.ltm, pinned), initialized=memory.initialized,
                       kv_store=memory.kv_store)


def diagnose_point(model, memory: MemoryState, context_rows: torch.Tensor, q_ids: list[int], max_new_tokens: int,
                   score) -> dict:
    """The diagnostics of one scoring point (M+ mode), per layer: the shares of the context's rows [L, R, d] in the
    short-term pool, in the long-term memory, and retrieved for the question; and `score(generated ids)` (a dict
    with exact_hit and qa_f1) of the answer generated with the oracle retrieval."""
    in_stm, in_ltm = locate(memory, context_rows)
    R = context_rows.shape[1]
    _, picked = model.read(memory, torch.tensor([q_ids], device=model.device), logits_to_keep=1,
                           return_retrieved=True)
    retrieved = [0] * memory.num_layers
    if picked is not None:
        for l in range(memory.num_layers):
            retrieved[l] = int(torch.isin(picked[l, 0], in_ltm[l].to(picked.device)).sum())
    oracle = score(generate_ids(model, with_oracle_retrieval(memory, in_ltm), q_ids, max_new_tokens))
    ltm_rows = [int(memory.ltm.view(l)[0].shape[0]) if memory.ltm is not None else 0
                for l in range(memory.num_layers)]
    return {"rows_in_stm": [n / R for n in in_stm], "rows_in_ltm": [len(i) / R for i in in_ltm],
            "rows_retrieved": [n / R for n in retrieved], "ltm_rows": ltm_rows,
            "oracle_exact_hit": oracle["exact_hit"], "oracle_qa_f1": oracle["qa_f1"]}


DIAGNOSTICS = ("rows_in_stm", "rows_in_ltm", "rows_retrieved", "oracle_exact_hit", "oracle_qa_f1")


def summarize_diagnostics(points: list[list[dict]]) -> dict | None:
    """Per-distance means over items ([item][distance] points) of every diagnostic (per-layer lists stay per layer);
    None if the points carry none."""
    if not points or "oracle_exact_hit" not in points[0][0]:
        return None
    n, out = len(points), {}
    for key in DIAGNOSTICS:
        per_distance = []
        for j in range(len(points[0])):
            values = [p[j][key] for p in points]
            if isinstance(values[0], list):
                per_distance.append([sum(v[l] for v in values) / n for l in range(len(values[0]))])
            else:
                per_distance.append(sum(values) / n)
        out[key] = per_distance
    return out


def summarize_recall(points: list[list[dict]], rows: int, read_rows: int) -> dict | None:
    """The retriever's recall of a context's rows (paper Fig. 6), per distance, from the diagnostics of
    [item][distance] points (None if they carry none): `recall`, the share of the context's long-term rows that
    the retrieval picked (pooled over items and layers; None where none were in the long-term memory), also per
    layer; `retrieved` and `in_ltm`, the mean number of those rows per item and layer (the context wrote `rows` per
    layer); and `random_recall`, what picking `read_rows` long-term rows at random would get (K0 / rows stored)."""
    if not points or "rows_retrieved" not in points[0][0]:
        return None
    out: dict = {"rows": rows, "read_rows": read_rows, "recall": [], "recall_per_layer": [], "retrieved": [],
                 "in_ltm": [], "random_recall": []}
    for j in range(len(points[0])):
        at = [p[j] for p in points]
        layers = range(len(at[0]["rows_in_ltm"]))
        in_ltm = [sum(p["rows_in_ltm"][l] * rows for p in at) for l in layers]
        got = [sum(p["rows_retrieved"][l] * rows for p in at) for l in layers]
        out["recall_per_layer"].append([g / t if t else None for g, t in zip(got, in_ltm)])
        out["recall"].append(sum(got) / sum(in_ltm) if sum(in_ltm) else None)
        cells = len(at) * len(layers)
        out["retrieved"].append(sum(got) / cells)
        out["in_ltm"].append(sum(in_ltm) / cells)
        stored = [m for p in at for m in p.get("ltm_rows", [])]
        out["random_recall"].append(sum(min(read_rows, m) / m for m in stored if m) / len(stored)
                                    if stored and all(stored) else None)
    return out

"""What the official training code did in the recorded training steps of ../shared/fixtures/official-train, and how to
make our step do the same.

Each case directory holds `record.json` (configuration, losses, gradient norms and every random decision the official
step made, with its file:line in the official tree), `io.safetensors` (inputs, memory before/after, deltas, logits,
gradients) and `release/` (the same weights in the release layout, which `MPlus.from_pretrained` reads). This module
replays the official decisions into a description of the memory each step read and left behind, and plans the
evictions that make our step's commits produce that memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-train"
"""CI clones the repository with shared/ beside it."""
EXTRA_ENV = "MPLUS_EXTRA_TRAIN_FIXTURES"
"""A directory of further case directories (same layout as train-step/); os.pathsep separates several."""
TRAIN_PREFIX = "model.base_model.model."
"""The official LightningModule's parameter names are the release keys behind this prefix."""


# ---- discovery -----------------------------------------------------------------------------------------------------
def _cases_under(root: Path) -> list[Path]:
    for where in (root / "train-step", root):
        found = sorted(p.parent for p in where.glob("*/record.json"))
        if found:
            return found
    return []


def case_dirs() -> list[Path]:
    """Every recorded case: train-step/<case>/ of the fixtures, then those under $MPLUS_EXTRA_TRAIN_FIXTURES."""
    dirs = _cases_under(FIXTURES) if fixtures_present() else []
    for extra in filter(None, os.environ.get(EXTRA_ENV, "").split(os.pathsep)):
        more = _cases_under(Path(extra))
        if not more:
            raise FileNotFoundError(f"${EXTRA_ENV}={extra}: no case directory (<case>/record.json) under it")
        dirs += more
    return dirs


def fixtures_present() -> bool:
    return FIXTURES.is_dir() and bool(_cases_under(FIXTURES))


def missing_fixtures_message() -> str:
    return (f"official training fixtures not found at {FIXTURES} (no train-step/<case>/record.json): clone the "
            "project's shared/ directory beside the repository (CI does), or point $"
            f"{EXTRA_ENV} at a directory of cases")


# ---- one case --------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    path: Path
    record: dict
    io: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: Path) -> "Case":
        return cls(path, json.loads((path / "record.json").read_text()), load_file(str(path / "io.safetensors")))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def params(self) -> dict:
        """The official model.params the step ran with: the shipped stage YAML's, with the fixture's overrides."""
        p = {k: v for k, v in self.record["shipped_model_params"].items()
             if k not in self.record.get("removed_from_config", [])}
        p.update(self.record["overrides"])
        return p

    @property
    def has_ltm(self) -> bool:
        return int(self.params.get("num_ltm_blocks", 0)) > 0

    def tensors(self, step: int) -> dict[str, torch.Tensor]:
        """io.safetensors entries of step `step` (cases with several steps prefix them `step<k>/`)."""
        if len(self.record["steps"]) == 1:
            return self.io
        prefix = f"step{step}/"
        return {k[len(prefix):]: v for k, v in self.io.items() if k.startswith(prefix)}


# ---- the official decisions ------------------------------------------------------------------------------------------
class DecisionLog:
    """The official step's random decisions, taken by site (file:line); `check_consumed` names any left over."""

    def __init__(self, decisions: list[dict]):
        self.items = list(decisions)
        self.used = [False] * len(self.items)

    def take(self, site: str) -> list[dict]:
        out = []
        for i, d in enumerate(self.items):
            if d["site"].endswith(site) and not self.used[i]:
                self.used[i] = True
                out.append(d)
        return out

    def check_consumed(self) -> None:
        left = [f"{d['fn']} at {d['site']} ({d.get('meaning', d.get('func'))})"
                for d, used in zip(self.items, self.used) if not used]
        if left:
            raise AssertionError(f"official decisions that no part of our step corresponds to: {left}")


SITE = {
    "full_context": "models/base.py:1401",
    "random_insertion": "models/base.py:1417",
    "revisit": "models/base.py:1427",
    "multi_chunk": "models/base.py:1441",
    "random_sample_length": "models/base.py:568",
    "survivor_simulation": "util.py:586",
    "survivors": "models/base.py:1150",
    "read_subset": ("modules/base.py:415", "modules/base.py:434"),
    "drop": "modules/base.py:146",
    "ltm_delta_drop": "models/base.py:1004",
    "query_length": "modules/modeling_llama.py:601",
    "ltm_query_length": "modules/base.py:538",
    "ltm_topk": "modules/base.py:550",
}


@dataclass
class OfficialStep:
    """What one official training step did to the memory, in terms of the pool before it.

    Rows are named by where they came from: an int r is the old pool row of rank r (oldest = 0); a pair (i, j) is row j
    of the delta written by injected chunk i. Per layer.
    """

    kind: str
    """full | revisit | multi | single"""
    flags: dict[str, bool]
    """Forced step-kind draws turned into our step's yes/no decisions."""
    num_chunks: int = 0
    read_old: list[list[int]] | None = None
    """Old rows the target read (None: it read only the new delta, or the whole pool)."""
    new_rows: list[list[tuple[int, int]]] = field(default_factory=list)
    """Rows this step wrote that are in the pool after the official update, in pool order."""
    after_old: list[list[int]] | None = None
    """Old rows the official update kept."""
    dropped_old: list[list[int]] = field(default_factory=list)
    dropped_delta: list[list[tuple[int, int]]] = field(default_factory=list)
    """Stage 3: rows that went to the long-term staging buffer (dropped pool rows, then dropped delta rows)."""
    query_lengths: list[int] | None = None
    ltm_query_lengths: list[int] | None = None


def _forced(log: DecisionLog, name: str) -> float | None:
    found = log.take(SITE[name])
    if len(found) > 1:
        raise AssertionError(f"{len(found)} draws at {SITE[name]} in one step")
    return found[0]["forced"] if found else None


def _per_layer(records: list[dict], num_layers: int, what: str) -> list[list[dict]]:
    """Records of one kind grouped by event: [[layer 0, layer 1, ...], ...] (official: one draw per layer)."""
    if len(records) % num_layers:
        raise AssertionError(f"{len(records)} {what} draws for {num_layers} layers")
    events = [records[i:i + num_layers] for i in range(0, len(records), num_layers)]
    for ev in events:
        if [d.get("layer") for d in ev] != list(range(num_layers)):
            raise AssertionError(f"{what} draws are not one per layer in layer order: {[d.get('layer') for d in ev]}")
    return events


def scheduled_chunks(params: dict, global_step: int) -> int:
    """The official `num_contexts_schedule` ({checkpoints, values}) at `global_step`."""
    schedule = params["num_contexts_schedule"]
    return schedule["values"][sum(global_step >= c for c in schedule["checkpoints"])]


def replay(case: Case, step: dict, num_layers: int, pool_rows: int) -> OfficialStep:
    """Turn the logged decisions of one official step into the memory it read and left (see OfficialStep)."""
    p = case.params
    K, L, N = int(p["num_tokens"]), num_layers, pool_rows
    log = DecisionLog(step["random_decisions"])
    flags = {}
    full = _forced(log, "full_context")
    flags["full_context"] = full is not None and full < p["full_context_and_sentence_training_ratio"]
    insertion = _forced(log, "random_insertion")
    if insertion is not None and insertion < p.get("complete_with_random_memory_insertion_ratio", 0.0):
        raise AssertionError("the official step inserted the memory at random (ratio > 0): our step has no such kind")
    revisit = _forced(log, "revisit")
    if revisit is not None:
        flags["revisit"] = revisit >= p["pass_ratio"]
    cat = _forced(log, "multi_chunk")
    if cat is not None:
        flags["multi_chunk"] = cat < p["occassionally_cat_to_maximum_memory_ratio"]
    sample_length = _forced(log, "random_sample_length")
    if sample_length is not None and sample_length < p.get("random_sample_length_ratio", 0.0):
        raise AssertionError("the official step shortened the sample at random: our step has no such draw")
    for d in list(log.items):
        if d["fn"] == "np.random.random" and "empty_prob" in d.get("meaning", "") and d["site"] not in SITE.values():
            flags["replace_cache"] = d["forced"] < p["empty_prob"]
            log.take(d["site"])

    injections = [f for f in step["inner_forwards"] if f["is_injection"]]
    out = OfficialStep(kind="full" if flags["full_context"] else "revisit" if flags.get("revisit") else
                       "multi" if flags.get("multi_chunk") else "single", flags=flags, num_chunks=len(injections))
    lengths = log.take(SITE["query_length"])
    if lengths:
        out.query_lengths = [d["result"][0] for d in _per_layer(lengths, L, "retriever query length")[0]]
    ltm_lengths = log.take(SITE["ltm_query_length"])
    if ltm_lengths:
        out.ltm_query_lengths = [d["result"][0] for d in _per_layer(ltm_lengths, L, "long-term query length")[0]]
    log.take(SITE["ltm_topk"])  # not random: the retrieval our read recomputes (the logits check it)
    if out.kind in ("full", "revisit"):
        log.check_consumed()
        return out

    n = out.num_chunks
    scheduled = 1
    if out.kind == "multi":
        scheduled = min(len(step["batch"]["context_lengths"]),
                        scheduled_chunks(p, case.record.get("trainer_global_step", 0)))
    if n < scheduled:
        raise AssertionError(f"the official step injected {n} of {scheduled} chunks (a chunk without survivors is "
                             "skipped by the official stage-1 efficient injection): our step injects every chunk")
    drops = _per_layer(log.take(SITE["drop"]), L, "drop_memory")
    final = drops[-1]                                  # the pool update at the end of (stage 3: during) the step
    acc_drops = drops[:-1] + _per_layer(log.take(SITE["ltm_delta_drop"]), L, "delta drop")
    survivors = log.take(SITE["survivors"])
    log.take(SITE["survivor_simulation"])             # only decides the survivor counts the draws above show
    read_perms = log.take(SITE["read_subset"][0]) + log.take(SITE["read_subset"][1])

    per_chunk = _per_layer(survivors, L, "survivor") if survivors else []
    new_rows, dropped_delta = [], []
    for l in range(L):
        if per_chunk:                                  # stage 1 efficient injection: a random subset of each chunk
            rows = [(i, j) for i, ev in enumerate(per_chunk) for j in sorted(ev[l]["result"])]
            gone = []
        else:                                          # sequential: the accumulated rows lose some per new chunk
            rows, gone = [(0, j) for j in range(K)], []
            for i in range(1, n):
                perm = acc_drops[i - 1][l]["result"]
                if len(perm) != len(rows):
                    raise AssertionError(f"delta drop of chunk {i}, layer {l}: permutation of {len(perm)} for "
                                         f"{len(rows)} accumulated rows")
                keep = len(rows) - int(len(rows) * K / N)
                gone += [rows[j] for j in sorted(perm[keep:])]
                rows = [rows[j] for j in sorted(perm[:keep])] + [(i, j) for j in range(K)]
        new_rows.append(rows)
        dropped_delta.append(gone)
    out.new_rows, out.dropped_delta = new_rows, dropped_delta
    m = len(new_rows[0])
    read_in = [f.get("delta_memory_in_rows") for f in step["inner_forwards"] if not f["is_injection"]]
    if out.kind == "multi" and read_in and read_in[0] is not None and read_in[0] != m:
        raise AssertionError(f"replayed {m} new rows, the official read had {read_in[0]}")
    out.after_old = [sorted(ev["result"][: N - m]) for ev in final]
    out.dropped_old = [sorted(ev["result"][N - m:]) for ev in final]
    if read_perms:
        (subset,) = _per_layer(read_perms, L, "read subset")
        out.read_old = [sorted(ev["result"][: N - m]) for ev in subset]
    elif out.kind == "multi":
        out.read_old = out.after_old                  # stage 3: the pool is updated before the target reads it
    log.check_consumed()
    return out


# ---- scripting our commits -------------------------------------------------------------------------------------------
def plan_evictions(pool_rows: int, K: int, num_chunks: int, keep_old: list[list[int]],
                   keep_new: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Ranks to evict at each of our `num_chunks` commits ([L, K] each) so that the pool ends up as the old rows
    `keep_old` (ranks before the step) followed by the written rows `keep_new`, both in order.

    Our commit evicts K rows, then appends the whole new block; a row of block i can leave at a later commit. Rows
    that must leave go as early as possible, written rows first (they exist for fewer commits).
    """
    plans = []
    for old, new in zip(keep_old, keep_new):
        final = set(old) | set(new)
        pool = list(range(pool_rows))                  # identities in rank order
        per_commit = []
        for i in range(num_chunks):
            doomed = [r for r in pool if r not in final]
            written = [r for r in doomed if isinstance(r, tuple)]
            olds = [r for r in doomed if not isinstance(r, tuple)]
            chosen = (written + olds)[:K]
            if len(chosen) < K:
                raise AssertionError(f"commit {i}: only {len(chosen)} rows may leave, a commit evicts {K}")
            per_commit.append(sorted(pool.index(r) for r in chosen))
            pool = [r for r in pool if r not in chosen] + [(i, j) for j in range(K)]
        expected = list(old) + list(new)
        if pool != expected:
            raise AssertionError(f"the planned commits leave {pool}, not {expected}")
        plans.append(per_commit)
    return [torch.tensor([layer[i] for layer in plans]) for i in range(num_chunks)]


def compose(before: torch.Tensor, deltas: list[torch.Tensor], old: list[list[int]],
            new: list[list[tuple[int, int]]]) -> torch.Tensor:
    """[L, rows, d]: the named rows (see OfficialStep) gathered from the pool before the step and the deltas."""
    return torch.stack([torch.stack([before[l, r] for r in old[l]] + [deltas[i][l, j] for i, j in new[l]])
                        for l in range(before.shape[0])])


# ---- parameter names -------------------------------------------------------------------------------------------------
def ours_of(official_training_name: str, official_to_ours) -> list[str]:
    """Our parameter names behind an official training parameter (`bos_embedding` is one [L, 1, d] tensor officially,
    one vector per layer for us)."""
    key = official_training_name.removeprefix(TRAIN_PREFIX)
    if key == "new_memory_positional_emb":
        return ["new_memory_embedding"]
    if key == "bos_embedding":
        return ["bos_embedding"]                       # expanded by the caller, which knows the layer count
    return [official_to_ours(key)]


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (what the parity tests bound by ~1e-5)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)

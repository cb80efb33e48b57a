"""Memory as state: the short-term pool (MemoryState) and the long-term memory (LongTermMemory).

Neither is an `nn.Parameter`: a model owns weights only, and any number of memories (users, ranks, evaluation
items) can live beside one model. Both are plain tensors plus bookkeeping, saved with safetensors.

Short-term pool. Layer l holds N rows (hidden states at the input of layer l). Only a row's *rank* (its logical
position, 0 = oldest) matters to the model: it fixes the row's RoPE position. So rows live in fixed slots with a
rank per slot, and a commit writes the K new rows into the K freed slots instead of re-concatenating N rows.

Ages count memory rows written since a row was written: every commit adds K to every age (short- and long-term), and
the new block gets ages K-1 ... 0 (the last written row is the youngest). The official inference code never ages
short-term rows (only training does); we age them consistently.

On disk a memory is either our snapshot (`save`/`load`: memory.safetensors + memory.json) or the tensors an official
release stores beside its weights (`memory`, `ltm.l`, `ltm_keys.l`, `ltm_ages.l`, ...): `from_pretrained` reads both,
`release_tensors` writes the latter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .configuration import MPlusConfig
from .profiling import region
from .retriever import mean_sigmoid_scores, select_oldest_first
from .tensor_files import read_tensors, weight_files

MEMORY_FILE = "memory.safetensors"
MEMORY_META = "memory.json"
FORMAT_VERSION = 1
RELEASE_MEMORY_KEY = re.compile(
    r"^(memory|initialized|ltm\.\d+|ltm_keys\.\d+|ltm_ages\.\d+|ltm_recall_frequencies\.\d+)$")
"""Keys of an official release's weights that hold its memory, not model weights (recall frequencies are dropped on
loading: our long-term memory is a FIFO by age)."""
RELEASE_RECALL_FREQUENCY = 10.0
"""What `release_tensors` stores as every long-term row's recall frequency: the official value of a fresh row."""


class LongTermMemory:
    """Per-layer long-term rows, their retrieval keys and ages, bounded by `capacity` rows per layer.

    Stored in preallocated per-layer buffers that grow geometrically up to `capacity`; nothing is lost before the
    capacity is reached, then the oldest rows (largest age) of each layer leave first. Every layer holds the same
    number of rows (each commit evicts K rows from every layer).
    """

    def __init__(self, num_layers: int, hidden_size: int, key_size: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"long-term capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.size = 0
        self.rows = torch.empty(num_layers, 0, hidden_size, dtype=dtype, device=device)
        self.keys = torch.empty(num_layers, 0, key_size, dtype=dtype, device=device)
        self.ages = torch.empty(num_layers, 0, dtype=torch.long, device=device)

    @property
    def num_layers(self) -> int:
        return self.rows.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.rows.shape[2]

    @property
    def key_size(self) -> int:
        return self.keys.shape[2]

    def __len__(self) -> int:
        return self.size

    def _reserve(self, needed: int) -> None:
        allocated = self.rows.shape[1]
        if needed <= allocated:
            return
        new = min(self.capacity, max(needed, 2 * allocated, 1024))

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((t.shape[0], new, *t.shape[2:]))
            out[:, : self.size] = t[:, : self.size]
            return out

        self.rows, self.keys, self.ages = grow(self.rows), grow(self.keys), grow(self.ages)

    @region("commit.ltm_add")
    def add(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Append k rows per layer ([L, k, d], [L, k, s], [L, k]); past capacity the oldest rows leave first."""
        k = rows.shape[1]
        if k > self.capacity:
            raise ValueError(f"cannot add {k} rows to a long-term memory of capacity {self.capacity}")
        free = min(k, self.capacity - self.size)
        if free:
            self._reserve(self.size + free)
            sl = slice(self.size, self.size + free)
            self.rows[:, sl], self.keys[:, sl], self.ages[:, sl] = rows[:, :free], keys[:, :free], ages[:, :free]
            self.size += free
        if free < k:
            # Full: overwrite the slots of the oldest rows of each layer (they may differ per layer).
            rest = k - free
            slots = torch.topk(self.ages[:, : self.size], rest, dim=1).indices  # [L, rest]
            self.rows.scatter_(1, slots[..., None].expand(-1, -1, self.hidden_size), rows[:, free:])
            self.keys.scatter_(1, slots[..., None].expand(-1, -1, self.key_size), keys[:, free:])
            self.ages.scatter_(1, slots, ages[:, free:])

    def age_by(self, amount: int) -> None:
        self.ages[:, : self.size] += amount

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated for the next ones)."""
        self.size = 0

    def empty_like(self) -> "LongTermMemory":
        """An empty long-term memory of the same layers, widths, capacity, dtype and device."""
        return LongTermMemory(self.num_layers, self.hidden_size, self.key_size, self.capacity, dtype=self.rows.dtype,
                              device=self.rows.device)

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, keys, ages) of one layer, only the filled part."""
        return self.rows[layer, : self.size], self.keys[layer, : self.size], self.ages[layer, : self.size]

    # ---- retrieval ---------------------------------------------------------------------------------------------
    def scores(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """[B, M] retrieval scores of the layer's stored rows for queries [B, n, s]: mean over n of sigmoid(q . key)."""
        return mean_sigmoid_scores(queries, self.keys[layer, : self.size].to(queries.dtype))

    def retrieve(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """[B, min(k, M)] indices of the layer's k best-scoring rows for queries [B, n, s], ordered oldest first."""
        with region("retrieval.scores"):
            scores = self.scores(layer, queries)
        with region("retrieval.select"):
            return select_oldest_first(scores, self.ages[layer, : self.size], k)

    # ---- copies ------------------------------------------------------------------------------------------------
    def clone(self) -> "LongTermMemory":
        out = LongTermMemory.__new__(LongTermMemory)
        out.capacity, out.size = self.capacity, self.size
        out.rows, out.keys, out.ages = (t[:, : self.size].clone() for t in (self.rows, self.keys, self.ages))
        return out

    def to(self, device=None, dtype=None) -> "LongTermMemory":
        self.rows = self.rows.to(device=device, dtype=dtype)
        self.keys = self.keys.to(device=device, dtype=dtype)
        self.ages = self.ages.to(device=device)
        return self

    @classmethod
    def from_tensors(cls, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, capacity: int
                     ) -> "LongTermMemory":
        L, m, d = rows.shape
        if keys.shape[:2] != (L, m) or ages.shape != (L, m):
            raise ValueError(f"long-term rows {tuple(rows.shape)}, keys {tuple(keys.shape)} and ages "
                             f"{tuple(ages.shape)} disagree on layers/rows")
        if m > capacity:
            raise ValueError(f"{m} stored long-term rows exceed the capacity {capacity}; raise ltm_capacity")
        out = cls(L, d, keys.shape[2], capacity, dtype=rows.dtype, device=rows.device)
        out.add(rows, keys.to(rows.dtype), ages.to(torch.long))
        return out


@dataclass
class MemoryState:
    """The short-term pool of every layer in fixed slots, plus (M+) the long-term memory.

    rows  [L, N, d]  hidden states at the input of each layer
    ranks [L, N]     logical position of the row in slot j (0 = oldest); a permutation of 0..N-1 per layer
    ages  [L, N]     memory rows written since this row was written
    """

    rows: torch.Tensor
    ranks: torch.Tensor
    ages: torch.Tensor
    num_tokens: int
    ltm: LongTermMemory | None = None
    initialized: bool = True
    """MemoryLLM semantics: an uninitialised pool is filled by tiling the first written block."""
    kv_store: dict = field(default_factory=dict, repr=False, compare=False)
    """Inference cache of the rows' keys/values per layer (MPlus.read/generate); validated on every use."""

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: torch.Tensor, num_tokens: int, *, ltm: LongTermMemory | None = None,
                  initialized: bool = True) -> "MemoryState":
        """A pool whose rows are given in rank order (oldest first), as official checkpoints store them.

        The true ages of such rows are unknown; they get rank-derived ages (N-1 ... 0), which keeps ages and ranks
        consistent.
        """
        L, N, _ = rows.shape
        if N < num_tokens:
            raise ValueError(f"a pool of {N} rows cannot hold one block of {num_tokens}")
        ranks = torch.arange(N, device=rows.device).expand(L, N).clone()
        ages = (N - 1 - ranks).clone()
        return cls(rows=rows, ranks=ranks, ages=ages, num_tokens=num_tokens, ltm=ltm, initialized=initialized)

    @classmethod
    def empty_like_config(cls, config, *, dtype=torch.float32, device="cpu", seed: int = 0) -> "MemoryState":
        """A fresh pool for `config` (an MPlusConfig): small random rows, empty long-term memory."""
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(config.num_layers, config.stm_rows, config.hidden_size, generator=g) * 0.02
        ltm = None
        if config.has_ltm:
            ltm = LongTermMemory(config.num_layers, config.hidden_size, config.selector_hidden_dim,
                                 config.ltm_capacity, dtype=dtype, device=device)
        return cls.from_rows(rows.to(device=device, dtype=dtype), config.num_tokens, ltm=ltm, initialized=False)

    # ---- shape -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.rows.shape[0]

    @property
    def size(self) -> int:
        """N, rows per layer."""
        return self.rows.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.rows.shape[2]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def check_compatible(self, config) -> None:
        """Raise a ValueError naming the mismatch if this memory does not belong to a model of `config`."""
        want = (config.num_layers, config.stm_rows, config.hidden_size)
        if tuple(self.rows.shape) != want:
            raise ValueError(
                f"memory has shape [layers, rows, hidden] = {list(self.rows.shape)} but the model expects {list(want)}:"
                " this memory snapshot belongs to another model (or another stage's pool size)")
        if self.num_tokens != config.num_tokens:
            raise ValueError(f"memory was written with num_tokens={self.num_tokens}, model has {config.num_tokens}")
        if config.has_ltm and self.ltm is None:
            raise ValueError("this M+ model needs a long-term memory, but the memory has none (MemoryLLM snapshot?)")
        if self.ltm is not None and config.has_ltm and self.ltm.key_size != config.selector_hidden_dim:
            raise ValueError(f"long-term keys are {self.ltm.key_size} wide, the model's retriever makes "
                             f"{config.selector_hidden_dim}")

    # ---- reading ---------------------------------------------------------------------------------------------
    def slots_in_rank_order(self) -> torch.Tensor:
        """[L, N] slot index of rank 0, 1, ... per layer."""
        return torch.argsort(self.ranks, dim=1)

    def ordered_rows(self) -> torch.Tensor:
        """[L, N, d] rows oldest first (the official layout)."""
        slots = self.slots_in_rank_order()
        return torch.gather(self.rows, 1, slots[..., None].expand(-1, -1, self.hidden_size))

    @region("newest_block")
    def newest_block(self) -> torch.Tensor:
        """[L, K, d] the K most recently written rows of each layer, oldest first."""
        slots = self.slots_in_rank_order()[:, -self.num_tokens:]
        return torch.gather(self.rows, 1, slots[..., None].expand(-1, -1, self.hidden_size))

    def with_empty_ltm(self) -> "MemoryState":
        """The same short-term pool (shared tensors, not copies) with an empty long-term memory of the same shape:
        what a MemoryLLM-mode read of an M+ memory sees. Without a long-term memory: self."""
        if self.ltm is None:
            return self
        return MemoryState(rows=self.rows, ranks=self.ranks, ages=self.ages, num_tokens=self.num_tokens,
                           ltm=self.ltm.empty_like(), initialized=self.initialized)

    # ---- writing ---------------------------------------------------------------------------------------------
    @region("commit.sample_evictions")
    def sample_evictions(self, generator: torch.Generator | None = None, per_layer: bool = True) -> torch.Tensor:
        """[L, K] ranks to evict, sorted, uniform without replacement.

        Draws `torch.randperm(N)` once per layer in layer order (once in all if not per_layer) and evicts the ranks in
        its last K entries, the same draws as the official code on the same generator.
        """
        N, K = self.size, self.num_tokens
        perms = [torch.randperm(N, generator=generator) for _ in range(self.num_layers if per_layer else 1)]
        drop = torch.stack([p[N - K:] for p in perms]).sort(dim=1).values
        return drop.expand(self.num_layers, K).to(self.device)

    @torch.no_grad()
    @region("commit")
    def commit(self, delta: torch.Tensor, *, evict_ranks: torch.Tensor | None = None,
               keys_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
               generator: torch.Generator | None = None, per_layer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new block `delta` [L, K, d]: K rows per layer leave, delta becomes the newest block.

        Evicted rows go to the long-term memory (if any) with keys from `keys_fn(rows [L, K, d]) -> [L, K, s]`.
        Returns the evicted (rows [L, K, d], ages [L, K]) in rank order. An uninitialised pool is filled by tiling
        delta (MemoryLLM semantics) and evicts nothing.
        """
        L, N, d = self.rows.shape
        K = self.num_tokens
        if tuple(delta.shape) != (L, K, d):
            raise ValueError(f"delta has shape {tuple(delta.shape)}, expected [layers, K, hidden] = {[L, K, d]}")
        delta = delta.to(dtype=self.rows.dtype, device=self.rows.device)
        if not self.initialized:
            reps = -(-N // K)
            tiled = delta.repeat(1, reps, 1)[:, -N:]
            self.rows.copy_(tiled)
            self.ranks.copy_(torch.arange(N, device=self.device).expand(L, N))
            self.ages.copy_((torch.arange(N, device=self.device).flip(0) % K).expand(L, N))
            self.initialized = True
            return delta.new_empty(L, 0, d), self.ages.new_empty(L, 0)

        if evict_ranks is None:
            evict_ranks = self.sample_evictions(generator, per_layer)
        slot_of_rank = self.slots_in_rank_order()
        evict_slots = torch.gather(slot_of_rank, 1, evict_ranks)                     # [L, K]
        idx_d = evict_slots[..., None].expand(-1, -1, d)
        evicted_rows = torch.gather(self.rows, 1, idx_d)
        evicted_ages = torch.gather(self.ages, 1, evict_slots) + K

        # Survivors keep their order: new rank = old rank - (evicted ranks below it).
        dropped = torch.zeros(L, N, dtype=torch.long, device=self.device)
        dropped.scatter_(1, evict_ranks, 1)
        shift = torch.cumsum(dropped, dim=1)                                         # by rank
        self.ranks -= torch.gather(shift, 1, self.ranks)
        self.ages += K
        self.rows.scatter_(1, idx_d, delta)
        self.ranks.scatter_(1, evict_slots, torch.arange(N - K, N, device=self.device).expand(L, K))
        self.ages.scatter_(1, evict_slots, torch.arange(K - 1, -1, -1, device=self.device).expand(L, K))

        if self.ltm is not None:
            if keys_fn is None:
                raise ValueError("this memory has a long-term part: commit needs keys_fn to key the evicted rows")
            self.ltm.age_by(K)
            with region("commit.ltm_keys"):
                keys = keys_fn(evicted_rows)
            self.ltm.add(evicted_rows, keys, evicted_ages)
        return evicted_rows, evicted_ages

    # ---- copies and persistence -----------------------------------------------------------------------------
    def clone(self) -> "MemoryState":
        return MemoryState(rows=self.rows.clone(), ranks=self.ranks.clone(), ages=self.ages.clone(),
                           num_tokens=self.num_tokens, ltm=self.ltm.clone() if self.ltm is not None else None,
                           initialized=self.initialized)

    def to(self, device=None, dtype=None) -> "MemoryState":
        """Move/cast in place (ranks and ages stay integer); returns self."""
        self.kv_store.clear()
        self.rows = self.rows.to(device=device, dtype=dtype)
        self.ranks, self.ages = self.ranks.to(device=device), self.ages.to(device=device)
        if self.ltm is not None:
            self.ltm.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"rows": self.rows, "ranks": self.ranks, "ages": self.ages}
        if self.ltm is not None:
            rows, keys, ages = (t[:, : self.ltm.size] for t in (self.ltm.rows, self.ltm.keys, self.ltm.ages))
            sd.update(ltm_rows=rows, ltm_keys=keys, ltm_ages=ages)
        return {k: v.detach().contiguous().cpu() for k, v in sd.items()}

    def meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, "num_tokens": self.num_tokens, "initialized": self.initialized,
                "ltm_capacity": self.ltm.capacity if self.ltm is not None else None}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], meta: dict) -> "MemoryState":
        missing = {"rows", "ranks", "ages"} - set(sd)
        if missing:
            raise ValueError(f"memory snapshot lacks {sorted(missing)}")
        ltm = None
        if "ltm_rows" in sd:
            ltm = LongTermMemory.from_tensors(sd["ltm_rows"], sd["ltm_keys"], sd["ltm_ages"], meta["ltm_capacity"])
        rows, ranks = sd["rows"], sd["ranks"].long()
        if ranks.shape != rows.shape[:2] or not torch.equal(ranks.sort(dim=1).values,
                                                            torch.arange(rows.shape[1]).expand_as(ranks)):
            raise ValueError("memory snapshot is corrupt: `ranks` is not a permutation of 0..N-1 in every layer")
        return cls(rows=rows, ranks=ranks, ages=sd["ages"].long(), num_tokens=int(meta["num_tokens"]), ltm=ltm,
                   initialized=bool(meta.get("initialized", True)))

    def save(self, directory: str | Path) -> None:
        """Write memory.safetensors + memory.json into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / MEMORY_FILE))
        (directory / MEMORY_META).write_text(json.dumps(self.meta(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "MemoryState":
        """Read a snapshot written by `save`."""
        directory = Path(directory)
        meta_path, file = directory / MEMORY_META, directory / MEMORY_FILE
        if not meta_path.is_file() or not file.is_file():
            raise FileNotFoundError(f"no memory snapshot in {directory}: expected {MEMORY_FILE} and {MEMORY_META}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        return cls.from_state_dict(load_file(str(file)), meta)

    @staticmethod
    def saved_in(path: str | Path) -> bool:
        """Whether a model directory holds a memory: our export's `memory/` or an official `memory` tensor."""
        path = Path(path)
        return (path / "memory" / MEMORY_META).is_file() or "memory" in weight_files(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "MemoryState":
        """The memory saved in a model directory: our export (`memory/`) or an official release."""
        path = Path(path)
        if (path / "memory" / MEMORY_META).is_file():
            mem = cls.load(path / "memory")
        else:
            mem = cls._from_release(path)
        return mem.to(device=device, dtype=dtype)

    @classmethod
    def _from_release(cls, path: Path) -> "MemoryState":
        """The short-term pool (and M+ long-term memory) stored inside an official release's weights."""
        config = MPlusConfig.from_json(path / "config.json")
        files = weight_files(path)
        if "memory" not in files:
            raise FileNotFoundError(f"{path} holds no memory: neither memory/ (our export) nor an official `memory` "
                                    "tensor")
        L = config.num_layers
        names = [k for k in files if RELEASE_MEMORY_KEY.match(k) and not k.startswith("ltm_recall_frequencies.")]
        t = read_tensors(files, names)
        rows = t["memory"]
        if rows.dim() != 3 or rows.shape[0] != L or rows.shape[2] != config.hidden_size:
            raise ValueError(f"`memory` has shape {tuple(rows.shape)}, config.json implies "
                             f"[{L}, N, {config.hidden_size}]")
        ltm = None
        if config.has_ltm:
            try:
                ltm_rows = torch.stack([t[f"ltm.{l}"] for l in range(L)])
                keys = torch.stack([t[f"ltm_keys.{l}"] for l in range(L)])
                ages = torch.stack([t[f"ltm_ages.{l}"] for l in range(L)]).round().long()
            except KeyError as e:
                raise ValueError(f"{path}: M+ checkpoint lacks long-term tensor {e}") from None
            ltm = LongTermMemory.from_tensors(ltm_rows, keys, ages, max(config.ltm_capacity, ltm_rows.shape[1]))
        initialized = bool(t["initialized"].item()) if "initialized" in t else True
        return cls.from_rows(rows, config.num_tokens, ltm=ltm, initialized=initialized)

    def release_tensors(self) -> dict[str, torch.Tensor]:
        """The memory as an official release stores it beside its weights (`_from_release` reads it back): rows in
        rank order; long-term rows per layer with their keys, ages and a fresh recall frequency."""
        tensors = {"memory": self.ordered_rows()}
        if self.ltm is not None:
            for l in range(self.num_layers):
                rows, keys, ages = self.ltm.view(l)
                tensors[f"ltm.{l}"], tensors[f"ltm_keys.{l}"] = rows, keys
                tensors[f"ltm_ages.{l}"] = ages.to(rows.dtype)
                tensors[f"ltm_recall_frequencies.{l}"] = torch.full((self.ltm.size,), RELEASE_RECALL_FREQUENCY,
                                                                    dtype=rows.dtype)
        else:
            tensors["initialized"] = torch.tensor(int(self.initialized), dtype=torch.uint8)
        return tensors

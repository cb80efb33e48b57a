"""Memory as state: the short-term pool (MemoryState) and the long-term memory (LongTermMemory).

Neither is an `nn.Parameter`: a model owns weights only, and any number of memories (users, ranks, evaluation
items) can live beside one model. Both are plain tensors plus bookkeeping, saved with safetensors.

Short-term pool. Layer l holds N rows (hidden states at the input of layer l). Only a row's *rank* (its logical
position, 0 = oldest) matters to the model: it fixes the row's RoPE position. So rows live in fixed slots with a
rank per slot, and a commit writes the K new rows into the K freed slots instead of re-concatenating N rows.

Ages count memory rows written since a row was written: every commit adds K to every age (short- and long-term), and
the new block gets ages K-1 ... 0 (the last written row is the youngest). The official inference code never ages
short-term rows (only training does); we age them consistently.

Placement: `MemoryState.place` can keep the long-term rows (and their keys) in host memory while everything else
stays on the GPU; reads then copy only the rows they retrieve (`LongTermMemory.gather`).

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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .configuration import MPlusConfig
from .profiling import region
from .retriever import mean_sigmoid_scores, select_oldest_first
from .tensor_files import DamagedFileError, read_tensors, weight_files

MEMORY_FILE = "memory.safetensors"
MEMORY_META = "memory.json"
FORMAT_VERSION = 1
RELEASE_MEMORY_KEY = re.compile(
    r"^(memory|initialized|ltm\.\d+|ltm_keys\.\d+|ltm_ages\.\d+|ltm_recall_frequencies\.\d+)$")
"""Keys of an official release's weights that hold its memory, not model weights (recall frequencies are dropped on
loading: our long-term memory is a FIFO by age)."""
RELEASE_RECALL_FREQUENCY = 10.0
"""What `release_tensors` stores as every long-term row's recall frequency: the official value of a fresh row."""


HOST, DEVICE = "host", "device"
LTM_PLACEMENTS = {"device": (DEVICE, DEVICE), "rows_on_host": (HOST, DEVICE), "all_on_host": (HOST, HOST)}
"""Named placements of a long-term memory -> (rows, keys): `MemoryState.place(..., ltm_rows=, ltm_keys=)`."""
GATHER_CHUNK_ROWS = 512
"""Rows per host-side gather of a read from host-placed long-term rows: the gather of one chunk overlaps the
asynchronous copy of the previous one to the device."""


def _host_buffer(shape, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, page-locked when asked and CUDA is there (asynchronous copies to the GPU)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned and torch.cuda.is_available())


def _to_host(t: torch.Tensor, dtype: torch.dtype | None, pinned: bool) -> torch.Tensor:
    """`t` on the CPU in `dtype`, page-locked if `pinned` and CUDA is there; `t` itself if it already is."""
    dtype = dtype or t.dtype
    pinned = pinned and torch.cuda.is_available()
    if t.device.type == "cpu" and t.dtype == dtype and (not pinned or t.is_pinned()):
        return t
    out = _host_buffer(t.shape, dtype, pinned)
    out.copy_(t)
    return out


class MemoryFileError(DamagedFileError):
    """A saved memory whose tensors are missing or disagree in shape: names the file and the tensors."""


class LongTermMemory:
    """Per-layer long-term rows, their retrieval keys and ages, bounded by `capacity` rows per layer.

    Stored in preallocated per-layer buffers that grow geometrically up to `capacity`; nothing is lost before the
    capacity is reached, then the oldest rows (largest age) of each layer leave first. Every layer holds the same
    number of rows (each commit evicts K rows from every layer).

    Placement (`place`): the rows, and separately their keys, may live in host memory while the ages and every
    computation stay on the compute device. A read then scores the keys on the device and copies only the K0 rows
    it retrieves per layer (`gather`); host-placed keys are copied per layer, the next layer's while the current
    one computes (`prefetch_keys`), as the official code keeps its long-term memory on the CPU.
    """

    rows_on_host = False
    keys_on_host = False
    _staging: list | None = None      # page-locked gather buffers and the events of their last copies
    _prefetched: dict | None = None   # layer -> (version key, keys on the device, copy event)

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

    def reserve(self, rows_per_layer: int) -> None:
        """Allocate room for this many rows per layer (at most the capacity) now, e.g. before adding a large store
        in slices, which would otherwise grow the buffers (and copy them) several times."""
        self._reserve(min(self.capacity, rows_per_layer))

    def _reserve(self, needed: int) -> None:
        allocated = self.rows.shape[1]
        if needed <= allocated:
            return
        new = min(self.capacity, max(needed, 2 * allocated, 1024))

        def grow(t: torch.Tensor) -> torch.Tensor:
            shape = (t.shape[0], new, *t.shape[2:])
            out = _host_buffer(shape, t.dtype, t.is_pinned()) if t.device.type == "cpu" else t.new_empty(shape)
            out[:, : self.size] = t[:, : self.size]
            return out

        self.rows, self.keys, self.ages = grow(self.rows), grow(self.keys), grow(self.ages)

    @region("commit.ltm_add")
    def add(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Append k rows per layer ([L, k, d], [L, k, s], [L, k]); past capacity the oldest rows leave first."""
        k = rows.shape[1]
        if k > self.capacity:
            raise ValueError(f"cannot add {k} rows to a long-term memory of capacity {self.capacity}")
        # where each part lives (host-placed parts receive device rows here)
        rows, keys = rows.to(self.rows.device, self.rows.dtype), keys.to(self.keys.device, self.keys.dtype)
        ages = ages.to(self.ages.device)
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
            row_slots, key_slots = slots.to(self.rows.device), slots.to(self.keys.device)
            self.rows.scatter_(1, row_slots[..., None].expand(-1, -1, self.hidden_size), rows[:, free:])
            self.keys.scatter_(1, key_slots[..., None].expand(-1, -1, self.key_size), keys[:, free:])
            self.ages.scatter_(1, slots, ages[:, free:])

    def age_by(self, amount: int) -> None:
        self.ages[:, : self.size] += amount

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated for the next ones)."""
        self.size = 0

    def empty_like(self) -> "LongTermMemory":
        """An empty long-term memory of the same layers, widths, capacity, dtype and placement."""
        out = LongTermMemory(self.num_layers, self.hidden_size, self.key_size, self.capacity, dtype=self.rows.dtype,
                             device=self.device)
        return out.place(rows=HOST if self.rows_on_host else DEVICE, keys=HOST if self.keys_on_host else DEVICE)

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, keys, ages) of one layer, only the filled part."""
        return self.rows[layer, : self.size], self.keys[layer, : self.size], self.ages[layer, : self.size]

    # ---- placement -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The compute device: where the ages live, and the rows and keys unless placed on the host."""
        return self.ages.device

    def place(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
              rows: str = DEVICE, keys: str = DEVICE) -> "LongTermMemory":
        """Put the ages on `device` (default: where they are), and the rows and the keys each on it (`"device"`) or
        in host memory (`"host"`), cast to `dtype`; in place, returns self.

        Host rows stay in ordinary (pageable) memory: a read gathers its K0 rows per layer on the host into a
        page-locked buffer, and only that buffer needs locking. Host keys are page-locked when CUDA is there: each
        read copies every key of a layer to the device, asynchronously.
        """
        for what, where in (("rows", rows), ("keys", keys)):
            if where not in (HOST, DEVICE):
                raise ValueError(f"long-term {what} placement must be 'host' or 'device', got {where!r}")
        device = torch.device(device) if device is not None else self.device
        self.ages = self.ages.to(device)
        self.rows = (_to_host(self.rows, dtype, pinned=False) if rows == HOST
                     else self.rows.to(device=device, dtype=dtype))
        self.keys = (_to_host(self.keys, dtype, pinned=True) if keys == HOST
                     else self.keys.to(device=device, dtype=dtype))
        self.rows_on_host, self.keys_on_host = rows == HOST, keys == HOST
        self._staging = self._prefetched = None
        return self

    def placement(self) -> dict[str, str]:
        """Where the rows and keys are ('host' or 'device') and the compute device."""
        return {"rows": HOST if self.rows_on_host else DEVICE, "keys": HOST if self.keys_on_host else DEVICE,
                "device": str(self.device)}

    def _keys_version(self) -> tuple:
        return (id(self.keys), self.keys._version, self.size)

    def prefetch_keys(self, layer: int, device: torch.device) -> None:
        """Start copying a layer's host-placed keys to the CUDA `device` on a side stream, so that the copy overlaps
        the work queued before that layer's retrieval (keys, unlike the retrieved rows, do not depend on the hidden
        states). A no-op otherwise."""
        if not (self.keys_on_host and device.type == "cuda" and 0 <= layer < self.num_layers and self.size):
            return
        if self._prefetched is None:
            self._prefetched = {}
        if layer in self._prefetched:
            return
        stream = _copy_stream(device)   # the copy depends on nothing queued on the device: it starts at once
        with torch.cuda.stream(stream):
            copy = self.keys[layer, : self.size].to(device, non_blocking=True)
        self._prefetched[layer] = (self._keys_version(), copy, stream.record_event())

    def _keys_on(self, layer: int, device: torch.device) -> torch.Tensor:
        """The layer's filled keys on `device`: the prefetched copy if there is a current one, else a copy now."""
        keys = self.keys[layer, : self.size]
        hit = self._prefetched.pop(layer, None) if self._prefetched else None
        if hit is not None and hit[0] == self._keys_version() and hit[1].device == device:
            current = torch.cuda.current_stream(device)
            current.wait_event(hit[2])
            hit[1].record_stream(current)   # allocated on the side stream, used on this one
            return hit[1]
        return keys.to(device, non_blocking=keys.is_pinned())

    def gather(self, layer: int, idx: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows idx [B, m] of a layer -> [B, m, d] on `device` in `dtype`.

        Host rows: gathered on the host in chunks into page-locked buffers (two, alternating), each chunk copied to
        the device asynchronously while the next one is gathered; only the K0 retrieved rows cross to the device."""
        rows = self.rows[layer, : self.size]
        if not self.rows_on_host and rows.device == device:
            return rows[idx].to(dtype)
        flat = idx.reshape(-1).to(rows.device)
        out = torch.empty(flat.numel(), rows.shape[1], dtype=rows.dtype, device=device)
        for i, start in enumerate(range(0, flat.numel(), GATHER_CHUNK_ROWS)):
            part = flat[start: start + GATHER_CHUNK_ROWS]
            buffer, done = self._staging_buffer(i % 2, rows)
            if done is not None:
                done.synchronize()          # its previous copy has left the buffer
            chunk = torch.index_select(rows, 0, part, out=buffer[: part.numel()])
            out[start: start + part.numel()].copy_(chunk, non_blocking=True)
            if device.type == "cuda":
                self._staging[i % 2][1] = torch.cuda.current_stream(device).record_event()
        return out.view(*idx.shape, rows.shape[1]).to(dtype)

    def _staging_buffer(self, which: int, rows: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self._staging is None:
            self._staging = [[None, None], [None, None]]
        buffer, done = self._staging[which]
        if buffer is None or buffer.shape != (GATHER_CHUNK_ROWS, rows.shape[1]) or buffer.dtype != rows.dtype:
            buffer = _host_buffer((GATHER_CHUNK_ROWS, rows.shape[1]), rows.dtype, pinned=True)
            self._staging[which] = [buffer, None]
            done = None
        return buffer, done

    # ---- retrieval ---------------------------------------------------------------------------------------------
    def scores(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """[B, M] retrieval scores of the layer's stored rows for queries [B, n, s]: mean over n of sigmoid(q . key)."""
        return mean_sigmoid_scores(queries, self._keys_on(layer, queries.device).to(queries.dtype))

    def retrieve(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """[B, min(k, M)] indices of the layer's k best-scoring rows for queries [B, n, s], ordered oldest first."""
        with region("retrieval.scores"):
            scores = self.scores(layer, queries)
        with region("retrieval.select"):
            return select_oldest_first(scores, self.ages[layer, : self.size], k)

    # ---- copies ------------------------------------------------------------------------------------------------
    def clone(self) -> "LongTermMemory":
        """An independent copy with the same placement."""
        out = LongTermMemory.__new__(LongTermMemory)
        out.capacity, out.size = self.capacity, self.size
        out.rows, out.ages = (t[:, : self.size].clone() for t in (self.rows, self.ages))
        keys = self.keys[:, : self.size]
        if keys.is_pinned():
            out.keys = _host_buffer(keys.shape, keys.dtype, pinned=True)
            out.keys.copy_(keys)
        else:
            out.keys = keys.clone()
        out.rows_on_host, out.keys_on_host = self.rows_on_host, self.keys_on_host
        return out

    def to(self, device=None, dtype=None) -> "LongTermMemory":
        """Move everything to `device` (the placement becomes all-device), or with device None only cast in place,
        keeping the placement."""
        if device is None:
            return self.place(None, dtype, rows=HOST if self.rows_on_host else DEVICE,
                              keys=HOST if self.keys_on_host else DEVICE)
        return self.place(device, dtype)

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
        """Move/cast in place (ranks and ages stay integer); returns self. With a device, everything goes there
        (see `place` to keep the long-term rows on the host)."""
        self.kv_store.clear()
        self.rows = self.rows.to(device=device, dtype=dtype)
        self.ranks, self.ages = self.ranks.to(device=device), self.ages.to(device=device)
        if self.ltm is not None:
            self.ltm.to(device=device, dtype=dtype)
        return self

    def place(self, device, dtype=None, *, ltm_rows: str = "device", ltm_keys: str = "device") -> "MemoryState":
        """Like `to(device, dtype)`, with the long-term rows and their retrieval keys each on `device` ("device") or
        in host memory ("host"); in place, returns self. E.g. `memory.place("cuda", torch.bfloat16,
        ltm_rows="host")`: the ~40 GB of long-term rows of an 8B model at the official 153,600 rows per layer stay
        on the host, and a read copies the K0 rows it retrieves per layer (21 MB each at 8B). Host keys (2.5 GB
        there) also leave the GPU, at the price of copying every key of a layer at each read, as officially."""
        for what, where in (("ltm_rows", ltm_rows), ("ltm_keys", ltm_keys)):
            if where not in (HOST, DEVICE):
                raise ValueError(f"{what} must be 'host' or 'device', got {where!r}")
        self.kv_store.clear()
        self.rows = self.rows.to(device=device, dtype=dtype)
        self.ranks, self.ages = self.ranks.to(device=device), self.ages.to(device=device)
        if self.ltm is not None:   # never all of it on the device on the way (it may not fit there)
            self.ltm.place(device, dtype, rows=ltm_rows, keys=ltm_keys)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors on the CPU. A memory on the CPU shares them; one on a device does not, its host-placed
        long-term parts included (copied: they change in place at the next commit)."""
        sd = {"rows": self.rows, "ranks": self.ranks, "ages": self.ages}
        if self.ltm is not None:
            rows, keys, ages = (t[:, : self.ltm.size] for t in (self.ltm.rows, self.ltm.keys, self.ltm.ages))
            sd.update(ltm_rows=rows, ltm_keys=keys, ltm_ages=ages)
        copy = self.device.type != "cpu"
        return {k: v.detach().contiguous().to("cpu", copy=copy) for k, v in sd.items()}

    def meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, "num_tokens": self.num_tokens, "initialized": self.initialized,
                "ltm_capacity": self.ltm.capacity if self.ltm is not None else None}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], meta: dict, source: str = "memory snapshot"
                        ) -> "MemoryState":
        missing = {"rows", "ranks", "ages"} - set(sd)
        if missing:
            raise MemoryFileError(f"{source} lacks {sorted(missing)}")
        rows_shape = tuple(sd["rows"].shape)
        if len(rows_shape) != 3:
            raise MemoryFileError(f"{source}: `rows` has shape {rows_shape}, expected [layers, rows, hidden]")
        for name in ("ranks", "ages"):
            if tuple(sd[name].shape) != rows_shape[:2]:
                raise MemoryFileError(f"{source}: `{name}` has shape {tuple(sd[name].shape)} but `rows` has "
                                      f"{rows_shape}: `{name}` must be {list(rows_shape[:2])}; the snapshot is "
                                      "damaged, save it again")
        ltm = None
        if "ltm_rows" in sd:
            ltm_shape = tuple(sd["ltm_rows"].shape)
            for name in ("ltm_keys", "ltm_ages"):   # both start with [layers, stored rows]; ages are nothing more
                got = tuple(sd[name].shape) if name in sd else None
                if got is None or got[:2] != ltm_shape[:2] or (name == "ltm_ages" and len(got) != 2):
                    raise MemoryFileError(f"{source}: `{name}` has shape {got} but `ltm_rows` has {ltm_shape}: "
                                          f"`{name}` must start with {list(ltm_shape[:2])}; the snapshot is damaged, "
                                          "save it again")
            ltm = LongTermMemory.from_tensors(sd["ltm_rows"], sd["ltm_keys"], sd["ltm_ages"], meta["ltm_capacity"])
        rows, ranks = sd["rows"], sd["ranks"].long()
        if not torch.equal(ranks.sort(dim=1).values, torch.arange(rows.shape[1]).expand_as(ranks)):   # shape checked
            raise MemoryFileError(f"{source} is corrupt: `ranks` is not a permutation of 0..N-1 in every layer")
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
        try:
            sd = load_file(str(file))
        except SafetensorError as e:
            raise MemoryFileError(f"{file} is damaged or truncated ({e}): save the memory again") from None
        return cls.from_state_dict(sd, meta, source=str(file))

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
            except RuntimeError:
                shapes = {k: tuple(t[k].shape) for k in names if k.startswith(("ltm.", "ltm_keys.", "ltm_ages."))}
                raise MemoryFileError(f"{path}: the long-term tensors disagree in shape across layers ({shapes}); "
                                      "re-download or re-export the checkpoint") from None
            if keys.shape[:2] != ltm_rows.shape[:2] or ages.shape != ltm_rows.shape[:2]:
                raise MemoryFileError(f"{path}: `ltm_keys.*` {tuple(keys.shape)} / `ltm_ages.*` {tuple(ages.shape)} "
                                      f"do not match `ltm.*` {tuple(ltm_rows.shape)}; re-download or re-export the "
                                      "checkpoint")
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


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    """One side stream per CUDA device for prefetching host-placed keys."""
    key = str(device)
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device)
    return _COPY_STREAMS[key]

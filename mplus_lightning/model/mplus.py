"""MPlus: a transformers LlamaForCausalLM whose decoder layers read a memory prefix (write / inject / read / generate).

Every pass loops over the HF decoder layers. Memory rows act only as keys/values: a layer's memory prefix
`[bos_l ; rows]` goes through that layer's RMSNorm_in and k/v projections (with the active LoRA adapter) and RoPE at
the rows' positions, and is placed in the KV cache before the layer runs on the real tokens. Real tokens attend
to every prefix row and causally to each other (bottom-right aligned), as in the official code; the attention computes
that without a mask (attention.py).

Sequence layouts (positions):
  write  [bos 0 ; previous block 1..K ; chunk K+1..K+n]; the new memory embedding e is added to the last K query rows
         at every layer; if n < K the last K-n previous rows are re-processed as queries (as officially).
  read   [bos 0 ; retrieved LTM rows, oldest first, ending at K0 ; STM row of rank r at 1+K0+r ; prompt 1+K0+N...].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding, rotate_half

from . import formats
from .adapters import READ, WRITE, FoldedAdapters, activate, add_lora_adapters, lora_modules
from .attention import MemoryAttention
from .configuration import MPlusConfig
from .decoding import StaticDecoder, decode_loop, pick_token
from .memory import LongTermMemory, MemoryState
from .profiling import region
from .retriever import Retriever
from .tensor_files import read_tensors, weight_files


def _check_transformers(version: str) -> None:
    """The decoder layer below calls into transformers' Llama attention, whose internals change between minor
    releases: on 5.17 (an H100 image's) the memory prefix never reached attention and SDPA failed on a mask of the
    wrong length. Fail at import with the fix instead."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < (5, 24) or major >= 6:
        raise ImportError(f"mplus_lightning needs transformers>=5.24,<6 (found {version}): "
                          "pip install 'transformers>=5.24,<6'")


_check_transformers(transformers.__version__)

MIN_CHUNK_TOKENS = 16  # the official README's "hard minimum"; shorter chunks disturb the memory
DECODE_SLOTS_ROUNDING = 256  # decode caches are sized in these steps, so that the next generation can reuse one


def is_memory_parameter(name: str) -> bool:
    """What M+ adds to the Llama: LoRA adapters, per-layer BOS vectors, the new-memory embedding e, retrievers."""
    return "lora_" in name or name.endswith("memory_bos") or "retriever" in name or name == "new_memory_embedding"


class MemoryKVCache:
    """Per-layer key/value cache that starts with a memory prefix. Called by the layer's attention as `cache.update`.

    With `capacity` the buffers are preallocated (generation: no re-concatenation per token); without, the tokens' K/V
    are kept apart from what came before them (write, read and training passes: the CPU attention reads the two parts
    separately, so concatenating them would only copy both, forward and backward).
    """

    def __init__(self, num_layers: int, capacity: int | None = None):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        # without capacity: the last update's K/V, joined to keys/values only if another update follows
        self._latest: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def _past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of everything before the next tokens (no capacity)."""
        if self._latest[layer] is not None:
            k, v = self._latest[layer]
            self._latest[layer] = None
            if self.keys[layer] is None:
                self.keys[layer], self.values[layer] = k, v
            else:
                self.keys[layer] = torch.cat([self.keys[layer], k], 2)
                self.values[layer] = torch.cat([self.values[layer], v], 2)
        return None if self.keys[layer] is None else (self.keys[layer], self.values[layer])

    def _put(self, layer: int, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        n = self.lengths[layer]
        if self.capacity is None:
            past = self._past(layer)
            self._latest[layer] = (k, v)
            self.lengths[layer] = n + k.shape[2]
            return k, v, past
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.capacity, D)
            self.values[layer] = v.new_empty(B, H, self.capacity, D)
        end = n + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions overflows at {end}")
        self.keys[layer][:, :, n:end] = k
        self.values[layer][:, :, n:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], None

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start layer `layer` over with the memory prefix (activation checkpointing re-runs a layer: no stacking)."""
        if self.capacity is None:
            self.keys[layer] = self.values[layer] = self._latest[layer] = None
        self.lengths[layer] = 0
        self._put(layer, k, v)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Add the tokens' K/V [B, Hkv, n, D] -> (keys, values, past) for `attention.memory_attention`: with a
        capacity, keys/values are every position up to these tokens (views of the buffers) and past is None;
        without, they are the tokens' own and past the (keys, values) before them (or None: nothing before)."""
        return self._put(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


class PrefixKV(NamedTuple):
    """Keys/values [B|1, Hkv, p, hd] of memory prefix rows projected earlier (the short-term pool between reads)."""

    keys: torch.Tensor
    values: torch.Tensor


class GradientFreeRows(NamedTuple):
    """Memory prefix rows [B|1, p, d] at positions [B|1, p] that no gradient flows into (a training read's pool and
    retrieved rows): projected apart from BOS and the rows that carry one, so that autograd does not back-propagate
    into them. Worth it for thousands of rows; a few (a write pass's previous block) ride along with BOS."""

    rows: torch.Tensor
    positions: torch.Tensor


class MemoryDecoderLayer(LlamaDecoderLayer):
    """A transformers LlamaDecoderLayer that also owns its memory BOS vector and (M+) its retriever.

    Its forward builds the memory prefix *inside* the layer, so that under FSDP the layer's parameters are gathered
    when the memory K/V and the retrieval are computed, and activation checkpointing recomputes with the same adapter.
    """

    memory_bos: nn.Parameter
    retriever: Retriever | None

    @classmethod
    def convert(cls, layer: LlamaDecoderLayer, config: MPlusConfig) -> "MemoryDecoderLayer":
        """Turn an HF decoder layer into a MemoryDecoderLayer in place (weights and parameter names unchanged)."""
        layer.__class__ = cls
        MemoryAttention.convert(layer.self_attn)
        d = config.hidden_size
        layer.memory_bos = nn.Parameter(torch.zeros(d))
        layer.retriever = (Retriever(d, config.selector_hidden_dim, config.num_selector_layers,
                                     config.add_encoder_retriever) if config.add_selector else None)
        layer._lora_cache = None
        return layer

    def lora(self):
        if self._lora_cache is None:
            self._lora_cache = lora_modules(self)
        return self._lora_cache

    @region("memory_kv")
    def memory_kv(self, rows: torch.Tensor, positions: torch.Tensor, rotary: nn.Module
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of memory rows [B, p, d] at RoPE `positions` [B, p] -> ([B, Hkv, p, hd], same)."""
        attn = self.self_attn
        B, p, _ = rows.shape
        u = self.input_layernorm(rows)
        k = attn.k_proj(u).view(B, p, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(u).view(B, p, -1, attn.head_dim).transpose(1, 2)
        cos, sin = rotary(u, positions)
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        return k, v

    def _project(self, parts: list, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """`memory_kv` of several (rows, positions) parts in one call, batch-1 parts broadcast to the others' batch."""
        size = max(rows.shape[0] for rows, _ in parts)
        rows = torch.cat([r.expand(size, -1, -1) for r, _ in parts], 1)
        positions = torch.cat([p.expand(size, -1) for _, p in parts], 1)
        return self.memory_kv(rows, positions, rotary)

    def forward(self, hidden_states, *, adapter: str | None = None, position_embeddings=None, rotary=None,
                cache: MemoryKVCache | None = None, prefix=None, keys_only: bool = False):
        """Run the layer on `hidden_states` [B, q, d] with `adapter` active.

        `prefix` is None (decode step: everything is in the cache already), or a callable
        `prefix(layer, hidden_states) -> [part, ...]` of the memory rows in front of the tokens, each part either
        `(rows [B|1, p, d], positions [B|1, p])` to project or a `PrefixKV` projected earlier; the layer prepends its
        BOS vector at position 0 and puts their K/V into `cache` first. The q tokens see every key the cache holds
        before them and causally each other (`attention.memory_attention`); the order of the keys does not matter.
        `GradientFreeRows` parts are projected apart from BOS and the other parts (see there).
        `keys_only`: return the retriever keys f_k(RMSNorm_in(rows)) of `hidden_states` instead (inside the layer's
        forward so that FSDP has gathered the retriever's weights).
        """
        if keys_only:
            return self.retriever.key_proj(self.input_layernorm(hidden_states))
        activate(self.lora(), adapter)
        B = hidden_states.shape[0]
        idx = self.self_attn.layer_idx
        if prefix is not None:
            bos = self.memory_bos.to(hidden_states.dtype)
            if not torch.is_grad_enabled():   # else its view would claim requires_grad without a grad_fn
                bos = bos.detach()
            parts = [(bos[None, None], torch.zeros(1, 1, dtype=torch.long, device=bos.device)),
                     *prefix(self, hidden_states)]
            to_project = [part for part in parts if not isinstance(part, PrefixKV) and part[0].shape[1]]
            joint = [part for part in to_project if not isinstance(part, GradientFreeRows)]   # BOS is one of them
            apart = [part for part in to_project if isinstance(part, GradientFreeRows)]
            kvs = [self._project(joint, rotary), *(part for part in parts if isinstance(part, PrefixKV)),
                   *([self._project(apart, rotary)] if apart else [])]
            k = torch.cat([k.expand(B, -1, -1, -1) for k, _ in kvs], 2)
            v = torch.cat([v.expand(B, -1, -1, -1) for _, v in kvs], 2)
            cache.prefill(idx, k, v)
        return super().forward(hidden_states, cache=cache, position_embeddings=position_embeddings)


@dataclass
class ReadView:
    """What a read pass attends to, per layer: memory rows at RoPE positions, and optionally a LTM to retrieve from.

    rows [L, m, d] (may carry gradients in training), positions [L, m]; real tokens start at `query_start`.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    query_start: int
    ltm: LongTermMemory | None = None
    ltm_read_rows: int = 0
    adapter: str = READ
    kv_store: dict | None = None
    """Where to keep the rows' K/V between reads (inference only: MemoryState.kv_store). Entries are keyed by
    `kv_version` (the in-place versions of the memory's rows and ranks) and the layer's weights' versions, so any
    commit, edit or weight update recomputes them."""
    kv_version: tuple = ()
    ltm_query_lengths: list[int] | None = None
    """Per layer, how many leading query tokens retrieve the long-term rows (training: the official random prefix,
    `Decisions.ltm_query_lengths`); None: all of them, as at inference."""
    written: tuple[torch.Tensor, torch.Tensor] | None = None
    """(slots [L, K], delta [L, K, d]): rows just committed at these slots whose values carry the write pass's
    gradient (a one-chunk training step); `rows` holds them detached. None: no row carries a gradient."""


class RetrieverProbe:
    """Retriever training scores of a read pass, collected inside each layer.

    Per layer: queries f_q(RMSNorm_in(h)) of a random-length prefix of the target (`lengths[l]` tokens), keys
    f_k(RMSNorm_in(row)) of the view's rows, both on detached inputs (the retriever loss trains only the retriever);
    w = mean sigmoid(q . k) per row. With `encoder_queries` (row indices into the view), the encoder retriever
    f_q^enc scores the same rows from those rows' own states.

    A plain class, not a dataclass: FSDP2 rebuilds dataclass arguments of a forward when it casts them to the
    compute dtype, and the scores would be collected in that copy instead of this probe.
    """

    def __init__(self, lengths: list[int], encoder_queries: torch.Tensor | None = None):
        self.lengths = list(lengths)
        self.encoder_queries = encoder_queries
        self.scores: list[torch.Tensor] = []
        self.encoder_scores: list[torch.Tensor] = []

    def score(self, layer: "MemoryDecoderLayer", l: int, h: torch.Tensor, rows: torch.Tensor) -> None:
        if layer.retriever is None:
            raise ValueError("retriever training needs a model built with add_selector=true")
        norm_rows = layer.input_layernorm(rows.detach())
        keys = layer.retriever.key_proj(norm_rows)                                   # [m, s]
        queries = layer.retriever.query_proj(layer.input_layernorm(h[:, : self.lengths[l]].detach()))
        self.scores.append(torch.sigmoid(queries @ keys.t()).mean(dim=1).mean(dim=0))  # [m]
        if self.encoder_queries is not None and layer.retriever.encoder_query_proj is not None:
            q_enc = layer.retriever.encoder_query_proj(norm_rows[self.encoder_queries[l]])
            self.encoder_scores.append(torch.sigmoid(q_enc @ keys.t()).mean(dim=0))


class MPlus(nn.Module):
    """M+ (or MemoryLLM with `num_ltm_blocks=0`) over transformers' LlamaForCausalLM.

    The model owns weights only; memory is a `MemoryState` passed in. Public methods run without gradients:
        delta = model.write(memory, ids)       # [L, K, d] new rows of the update pass; memory unchanged
        model.inject(memory, ids)              # write + commit (K rows per layer leave, to the LTM), in place
        logits = model.read(memory, ids)       # [B, n, V]
        ids = model.generate(memory, ids, max_new_tokens=20)
    """

    def __init__(self, config: MPlusConfig):
        super().__init__()
        self.config = config
        self.llama = LlamaForCausalLM(config.llama_config())
        for layer in self.llama.model.layers:
            MemoryDecoderLayer.convert(layer, config)
        self.adapters = (WRITE, READ) if config.two_adapters else (WRITE,)
        self.read_adapter = READ if config.two_adapters else WRITE
        add_lora_adapters(self.llama.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          targets=config.lora_targets, names=self.adapters)
        self.new_memory_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self._init_memory_parameters()
        self.freeze_backbone()

    # ---- construction helpers --------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_memory_parameters(self) -> None:
        """BOS vectors start as the BOS token's embedding (official training); retriever/LoRA keep their inits."""
        bos_id = self.llama.config.bos_token_id
        emb = self.llama.model.embed_tokens.weight
        for layer in self.layers:
            if bos_id is not None and 0 <= bos_id < emb.shape[0] and emb.device.type != "meta":
                layer.memory_bos.copy_(emb[bos_id])

    def freeze_backbone(self, train_backbone: bool = False) -> None:
        """Train only what the official stages train: both adapters, BOS vectors, e, and the retrievers.
        `train_backbone` also trains the Llama weights (tiny models trained from scratch, e.g. the CPU demo)."""
        for name, p in self.named_parameters():
            p.requires_grad_(train_backbone or is_memory_parameter(name))

    def train_backbone_only(self) -> None:
        """Train the Llama weights alone (stage `pretrain`: no memory, so the memory parts would get no gradient)."""
        for name, p in self.named_parameters():
            p.requires_grad_(not is_memory_parameter(name))

    @property
    def layers(self) -> nn.ModuleList:
        return self.llama.model.layers

    @property
    def rotary(self) -> nn.Module:
        return self.llama.model.rotary_emb

    @property
    def device(self) -> torch.device:
        return self.new_memory_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.new_memory_embedding.dtype

    # ---- input checks ------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids, what: str, *, single: bool = False) -> torch.Tensor:
        if not torch.is_tensor(input_ids):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"{what}: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            raise ValueError(f"{what}: input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"{what}: the input is empty (0 tokens)")
        if single and input_ids.shape[0] != 1:
            raise ValueError(f"{what}: writes take one chunk at a time (batch 1), got batch {input_ids.shape[0]}: "
                             "one memory absorbs one text stream; loop over chunks, or use one MemoryState per stream")
        vocab = self.llama.config.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{what}: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
        bos = self.llama.config.bos_token_id
        if bos is not None and bool((input_ids[:, 0] == bos).any()):
            raise ValueError(f"{what}: the input starts with the BOS token ({bos}). Each layer already has a learned "
                             "BOS vector; tokenize with add_special_tokens=False")
        return input_ids.to(self.device, torch.long)

    def _check_memory(self, memory: MemoryState) -> None:
        if not isinstance(memory, MemoryState):
            raise TypeError(f"expected a MemoryState, got {type(memory).__name__}")
        memory.check_compatible(self.config)
        if memory.device != self.device or memory.dtype != self.dtype:
            raise ValueError(f"memory is {memory.dtype} on {memory.device} but the model is {self.dtype} on "
                             f"{self.device}: call memory.to(device, dtype) first")

    def new_memory(self, seed: int = 0) -> MemoryState:
        """A fresh, uninitialised memory for this model (the first write fills the pool)."""
        return MemoryState.empty_like_config(self.config, dtype=self.dtype, device=self.device, seed=seed)

    # ---- the passes --------------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llama.model.embed_tokens(ids)

    def _positions(self, h: torch.Tensor, start: int, length: int | None = None):
        """RoPE (cos, sin) for `length` (default: h's) consecutive positions from `start`."""
        pos = torch.arange(start, start + (length or h.shape[1]), device=h.device)[None]
        return self.rotary(h, pos)

    def _write_layers(self, h: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Update pass over chunk states h [1, n, d] with previous blocks [L, K, d] -> delta [L, K, d]."""
        K, n = self.config.num_tokens, h.shape[1]
        e = self.new_memory_embedding.to(h.dtype)
        p = min(K, n)                           # previous rows in the prefix (plus BOS)
        q = max(K, n)                           # query rows
        pos = self._positions(h, 1 + p, q)
        prefix_pos = torch.arange(1, 1 + p, device=h.device)[None]
        cache = MemoryKVCache(len(self.layers))
        deltas = []
        for l, layer in enumerate(self.layers):
            old = previous[l][None]
            if n >= K:
                query = torch.cat([h[:, : n - K], h[:, n - K:] + e], dim=1)
            else:
                query = torch.cat([old[:, n:], h], dim=1) + e
            out = layer(query, adapter=WRITE, position_embeddings=pos, rotary=self.rotary, cache=cache,
                        prefix=lambda _layer, _h, rows=old[:, :p]: [(rows, prefix_pos)])
            deltas.append(out[:, -K:])
            h = out[:, -n:]
        return torch.cat(deltas, dim=0)

    def view(self, memory: MemoryState) -> "ReadView":
        """The read view of a memory: its STM rows at positions 1+K0+rank, plus its LTM to retrieve from."""
        K0 = self.config.ltm_read_rows
        return ReadView(rows=memory.rows, positions=1 + K0 + memory.ranks, query_start=1 + K0 + memory.size,
                        ltm=memory.ltm if self.config.has_ltm else None, ltm_read_rows=K0,
                        adapter=self.read_adapter,
                        kv_store=memory.kv_store if not torch.is_grad_enabled() else None,
                        kv_version=(id(memory.rows), memory.rows._version, id(memory.ranks), memory.ranks._version))

    def _cached_kv(self, view: "ReadView", layer_idx: int, layer: "MemoryDecoderLayer"):
        """K/V of the view's rows of one layer, reused until the rows, their ranks or the layer's weights change."""
        weights = [*layer.input_layernorm.parameters(), *layer.self_attn.k_proj.parameters(),
                   *layer.self_attn.v_proj.parameters()]
        key = (view.adapter, view.kv_version, view.rows.dtype, tuple((id(p), p._version) for p in weights))
        hit = view.kv_store.get(layer_idx)
        if hit is None or hit[0] != key:
            kv = layer.memory_kv(view.rows[layer_idx][None].to(self.dtype), view.positions[layer_idx][None],
                                 self.rotary)
            hit = view.kv_store[layer_idx] = (key, PrefixKV(*kv))
        return hit[1]

    def _read_prefix(self, view: "ReadView", layer_idx: int, retrieved: list | None,
                     probe: "RetrieverProbe | None"):
        """The callable that builds layer l's read prefix: retrieved LTM rows (oldest first), then the view's rows."""
        K0 = view.ltm_read_rows
        rows_l, pos_l = view.rows[layer_idx][None], view.positions[layer_idx][None]
        ltm = view.ltm

        @region("read_prefix")
        def prefix(layer: MemoryDecoderLayer, h: torch.Tensor):
            if ltm is not None:   # host-placed keys: the next layer's copy overlaps this layer's work
                ltm.prefetch_keys(layer_idx + 1, h.device)
            if probe is not None:
                probe.score(layer, layer_idx, h, view.rows[layer_idx])
            queries = h if view.ltm_query_lengths is None else h[:, : view.ltm_query_lengths[layer_idx]]
            picked, ltm_pos = self._retrieve(layer, layer_idx, queries, ltm, K0, retrieved)
            if view.kv_store is not None:
                # The view rows' K/V come from the store; only BOS and the retrieved rows are projected here.
                return [(picked, ltm_pos), self._cached_kv(view, layer_idx, layer)]
            rows, positions, written = rows_l, pos_l, []
            if view.written is not None:   # the rows just written carry the write pass's gradient: from `delta`
                slots, delta = view.written
                kept = torch.ones(rows_l.shape[1], dtype=torch.int8, device=rows_l.device)
                kept[slots[layer_idx]] = 0
                # the kept slots in order, without a boolean mask (which would wait for the device to count them)
                kept = kept.sort(descending=True, stable=True).indices[: rows_l.shape[1] - slots.shape[1]]
                rows, positions = rows_l[:, kept], pos_l[:, kept]
                written = [(delta[layer_idx][None].to(h.dtype), pos_l[:, slots[layer_idx]])]
            parts = [(picked, ltm_pos), (rows.to(h.dtype), positions)]
            if torch.is_grad_enabled() and not rows.requires_grad:   # a training read: thousands of them
                parts = [GradientFreeRows(*part) for part in parts]
            return parts + written
        return prefix

    @staticmethod
    def _retrieve(layer: "MemoryDecoderLayer", layer_idx: int, h: torch.Tensor, ltm: LongTermMemory | None, K0: int,
                  retrieved: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's long-term rows for queries h [B, n, d]: ([B, m, d] oldest first, their positions [B, m]).
        Only the m <= K0 retrieved rows are copied to h's device (the rows may be placed on the host)."""
        B = h.shape[0]
        if ltm is None or ltm.size == 0:
            return h.new_zeros(B, 0, h.shape[2]), torch.zeros(B, 0, dtype=torch.long, device=h.device)
        with torch.no_grad():  # retrieval is a selection: no gradient flows through it (official: no_grad)
            queries = layer.retriever.query_proj(layer.input_layernorm(h))
            idx = ltm.retrieve(layer_idx, queries, K0)  # [B, m], oldest first
        if retrieved is not None:
            retrieved.append(idx)
        m = idx.shape[1]
        # Fewer than K0 stored rows: they sit right before the STM, so the STM and prompt keep their positions.
        ltm_pos = torch.arange(1 + K0 - m, 1 + K0, device=h.device).expand(B, m)
        return ltm.gather(layer_idx, idx, h.device, h.dtype), ltm_pos

    def prefix_length(self, memory: MemoryState) -> int:
        """Memory rows (BOS included) in front of a read: 1 + min(K0, stored LTM rows) + N."""
        m = min(self.config.ltm_read_rows, memory.ltm.size) if (self.config.has_ltm and memory.ltm) else 0
        return 1 + m + memory.size

    def _read_layers(self, view: "ReadView", h: torch.Tensor, cache: MemoryKVCache,
                     retrieved: list | None = None, probe: "RetrieverProbe | None" = None) -> torch.Tensor:
        pos = self._positions(h, view.query_start)
        for l, layer in enumerate(self.layers):
            h = layer(h, adapter=view.adapter, position_embeddings=pos, rotary=self.rotary, cache=cache,
                      prefix=self._read_prefix(view, l, retrieved, probe))
        return h

    @region("lm_head")
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.llama.lm_head(self.llama.model.norm(h))

    # ---- training entry points (FSDP2 registers each as a forward: distributed.shard_backbone) -------------------
    TRAINING_ENTRY_POINTS = ("write_pass", "lm_loss", "plain_lm_loss", "ltm_keys")
    """The methods a training step calls on the model; under FSDP2 each gathers the root's shards like a forward."""

    def forward(self, *args, **kwargs):
        raise TypeError("MPlus has no forward(): training calls model.write_pass / lm_loss / plain_lm_loss / ltm_keys, "
                        "inference model.write / inject / read / generate")

    def write_pass(self, ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The update pass over a chunk ids [1, n] after the previous block [L, K, d] -> delta [L, K, d], with
        gradients when enabled (training; `write` is the checked, gradient-free version for a memory)."""
        return self._write_layers(self._embed(ids), previous)

    def plain_lm_loss(self, ids: torch.Tensor, loss_mask: torch.Tensor):
        """(mean CE, token count, greedy hits) of the plain Llama on a batch ids [B, n] where loss_mask [B, n] says
        (no memory, no adapter: the `pretrain` stage of a from-scratch backbone)."""
        return self._next_token_loss(self._backbone_hidden(ids, adapter=None), ids, loss_mask, with_accuracy=True)

    def delta_view(self, delta: torch.Tensor, adapter: str = WRITE) -> ReadView:
        """A view of only the K rows just written (single-chunk training: the target reads [bos ; delta])."""
        L, K, _ = delta.shape
        pos = torch.arange(1, K + 1, device=delta.device).expand(L, K)
        return ReadView(rows=delta, positions=pos, query_start=K + 1, adapter=adapter)

    def lm_loss(self, ids: torch.Tensor, loss_mask: torch.Tensor, view: ReadView,
                probe: RetrieverProbe | None = None, with_accuracy: bool = False):
        """(mean CE, token count[, greedy next-token hits]) over the masked-in next tokens of `ids` [B, n] read
        against `view` (`view(memory)`, `delta_view(delta)`); with `probe`, the retriever's training scores too."""
        h = self._read_layers(view, self._embed(ids), MemoryKVCache(len(self.layers)), probe=probe)
        return self._next_token_loss(h, ids, loss_mask, with_accuracy)

    def _next_token_loss(self, h: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor,
                         with_accuracy: bool = False):
        """(mean CE, count[, hits]) of predicting ids[:, t+1] from h[:, t] where loss_mask[:, t+1]. The lm_head runs
        on those positions only (answers-only losses score a few tokens of each sequence)."""
        scored = loss_mask[:, 1:].bool()
        labels = ids[:, 1:][scored]
        logits = self._logits(h[:, :-1][scored]).float()             # fp32 logits, as in the official training
        count = labels.new_tensor(labels.numel())
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / count.clamp(min=1)
        if with_accuracy:
            return loss, count, (logits.argmax(-1) == labels).sum()
        return loss, count

    # ---- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write(self, memory: MemoryState, input_ids) -> torch.Tensor:
        """The update pass: [L, K, d] new memory rows for the chunk `input_ids` [1, n]. Memory is unchanged."""
        self._check_memory(memory)
        ids = self._check_ids(input_ids, "write", single=True)
        # A chunk shorter than K re-processes old memory rows (`_write_layers`); the official README sets 16 as
        # the hard minimum for its K=256. Models with K < 16 (the CPU demo's K=6 facts) are warned below K only.
        shortest = min(MIN_CHUNK_TOKENS, self.config.num_tokens)
        if ids.shape[1] < shortest:
            warnings.warn(f"writing a chunk of {ids.shape[1]} tokens (< {shortest}): the official model was trained "
                          "on chunks of 16-512 tokens; short chunks re-process old memory rows and disturb the "
                          "memory", stacklevel=3)
        return self._write_layers(self._embed(ids), memory.newest_block())

    @torch.no_grad()
    def inject(self, memory: MemoryState, input_ids, generator: torch.Generator | None = None) -> MemoryState:
        """Write the chunk and commit it: per layer K random rows leave (to the long-term memory), in place."""
        delta = self.write(memory, input_ids)
        memory.commit(delta, keys_fn=self.ltm_keys if memory.ltm is not None else None, generator=generator,
                      per_layer=self.config.drop_memory_per_layer)
        return memory

    def ltm_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys f_k(RMSNorm_in(row)) of rows [L, k, d] -> [L, k, s], each layer with its own f_k."""
        return torch.stack([layer(rows[l].to(self.dtype), keys_only=True) for l, layer in enumerate(self.layers)])

    @torch.no_grad()
    def read(self, memory: MemoryState, input_ids, *, logits_to_keep: int = 0, return_retrieved: bool = False):
        """Logits [B, n, V] of the read pass over `input_ids` against the memory (last `logits_to_keep` if > 0).

        With `return_retrieved`, also returns [L, B, m] indices of the long-term rows each layer read (oldest first).
        """
        self._check_memory(memory)
        ids = self._check_ids(input_ids, "read")
        retrieved: list = []
        h = self._read_layers(self.view(memory), self._embed(ids), MemoryKVCache(len(self.layers)), retrieved)
        logits = self._logits(h[:, -logits_to_keep:] if logits_to_keep else h)
        if return_retrieved:
            return logits, (torch.stack(retrieved) if retrieved else None)
        return logits

    @torch.no_grad()
    def backbone_logits(self, input_ids, *, adapter: str | None = None) -> torch.Tensor:
        """Logits [B, n, V] of the plain Llama on `input_ids` (positions from 0, no memory, no BOS vector).

        `adapter=None` runs the base weights alone (equal to HF LlamaForCausalLM); the plain-window baseline.
        """
        return self._logits(self._backbone_hidden(self._check_ids(input_ids, "backbone_logits"), adapter))

    def _backbone_hidden(self, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
        """Final hidden states [B, n, d] of the plain Llama (causal, positions from 0, no memory prefix)."""
        h = self._embed(ids)
        pos, cache = self._positions(h, 0), MemoryKVCache(len(self.layers))
        for layer in self.layers:
            h = layer(h, adapter=adapter, position_embeddings=pos, rotary=self.rotary, cache=cache)
        return h

    @torch.no_grad()
    def generate(self, memory: MemoryState, input_ids, max_new_tokens: int = 20, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, eos_token_id: int | None = -1,
                 generator: torch.Generator | None = None, fold_adapter: bool = True) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` new ids, greedy unless `do_sample`. [B, n + new].

        Retrieval happens once, at the prefill; decode steps attend to the cache. Stops when every row has produced
        `eos_token_id` (default: the config's; None never stops); finished rows are padded with it.

        Decode steps (`StaticDecoder`) run with the read adapter folded into a copy of the adapted weights
        (`fold_adapter`; at 8B the copy takes ~12 GB, False applies the adapter per step instead and frees it) over a
        cache kept for the next call, replayed as one CUDA graph per token on CUDA; `free_decode_state()` releases
        them. In train mode (LoRA dropout) the steps run through the layers as the prefill does.
        """
        self._check_memory(memory)
        ids = self._check_ids(input_ids, "generate")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
        eos = self.llama.config.eos_token_id if eos_token_id == -1 else eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        n = ids.shape[1]
        needed = self.prefix_length(memory) + n + max_new_tokens
        decoder = self._decoder_for(ids.shape[0], needed, fold_adapter, build=max_new_tokens > 1)
        cache = MemoryKVCache(len(self.layers), capacity=decoder.capacity if decoder is not None else needed)
        if decoder is not None:
            decoder.bind(cache)
        h = self._read_layers(self.view(memory), self._embed(ids), cache)
        first_position = 1 + self.config.ltm_read_rows + memory.size + n
        first_slot = cache.get_seq_length(0)

        def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
            if decoder is not None:
                return decoder.step(tokens, first_slot + i, first_position + i)
            h = self._embed(tokens)
            pos = self._positions(h, first_position + i)
            for layer in self.layers:
                h = layer(h, adapter=self.read_adapter, position_embeddings=pos, rotary=self.rotary, cache=cache)
            return self._logits(h[:, -1])

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return pick_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator)

        new = decode_loop(self._logits(h[:, -1]), step, max_new_tokens, stop_ids=() if eos is None else (eos,),
                          pick=pick)
        return torch.cat([ids, new], dim=1)

    _folded: FoldedAdapters | None = None
    _decoder: StaticDecoder | None = None

    def _decoder_for(self, batch: int, needed: int, fold_adapter: bool, build: bool = True) -> StaticDecoder | None:
        """The decoder of a generation of `batch` rows needing `needed` cache slots: the last one if it still fits
        and its weights are unchanged, else a new one (if `build`; a generation without decode steps only borrows
        its cache). None in train mode or for adapters it cannot run."""
        if self.training:
            return None
        if not build:
            decoder = self._decoder
            usable = (decoder is not None and decoder.fits(batch, needed) and decoder.dtype == self.dtype
                      and decoder.device == self.device)
            return decoder if usable else None
        if fold_adapter and self._folded is None:
            self._folded = FoldedAdapters()
        elif not fold_adapter and self._folded is not None:
            self._folded = None          # the caller chose memory over speed: drop the folded copy
        try:
            key = StaticDecoder.identity(self, self.read_adapter, self._folded)
        except NotImplementedError:
            return None
        decoder = self._decoder
        if decoder is None or decoder.key != key or not decoder.fits(batch, needed):
            self._decoder = None         # free the old cache (and graph) before allocating the new one
            capacity = -(-needed // DECODE_SLOTS_ROUNDING) * DECODE_SLOTS_ROUNDING
            decoder = self._decoder = StaticDecoder(self, batch, capacity, adapter=self.read_adapter,
                                                    folded=self._folded)
        return decoder

    def free_decode_state(self) -> None:
        """Free what `generate` keeps between calls: the folded adapter weights, the decode cache and its graph."""
        self._folded = self._decoder = None

    def decode_state_bytes(self) -> int:
        """Bytes `generate` keeps between calls (folded weights and decode cache; `free_decode_state` frees them)."""
        folded = self._folded.nbytes() if self._folded is not None else 0
        return folded + (self._decoder.cache_bytes() if self._decoder is not None else 0)

    # ---- persistence ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "MPlus":
        """Load an official release directory (MPlus / MemoryLLM) or one written by `save_pretrained`, for inference:
        in eval mode (LoRA dropout off), with the rotary frequencies as the checkpoint was trained (pass `dtype`
        rather than casting afterwards: `.to(bfloat16)` rounds them). Its memory: `MemoryState.from_pretrained`."""
        path = Path(path)
        config = MPlusConfig.from_json(path / "config.json")
        state = formats.read_weights(path, config)
        model = _empty_model(config, dtype, device)
        formats.load_state_strict(model, {k: v.to(dtype) for k, v in state.items()}, str(path))
        if config.llama.get("tie_word_embeddings"):
            model.llama.tie_weights()
        model.freeze_backbone()
        return model.eval()

    def for_training(self) -> "MPlus":
        """This model set up for our training stages: train mode (the loaders return eval-mode models) and rotary
        frequencies in float32, recorded in its config, which is how our training computes them; so a run that
        starts from an official release exports a model that loads as it was trained."""
        self.config = self.config.replace(rope_inv_freq_dtype="float32")
        _rebuild_rotary(self)
        return self.train()

    def save_pretrained(self, out_dir: str | Path, memory: MemoryState | None = None) -> None:
        """A self-contained directory: config.json, model.safetensors (our names) and memory/ (if given)."""
        formats.save_model_state(self.config, self.state_dict(), out_dir, memory)


def _empty_model(config: MPlusConfig, dtype: torch.dtype, device) -> MPlus:
    """An MPlus with uninitialised storage on `device` (no random init of billions of weights)."""
    with torch.device("meta"):
        model = MPlus(config)
    model.to_empty(device=device)
    model = model.to(dtype)
    _rebuild_rotary(model)
    return model


def _rebuild_rotary(model: MPlus) -> None:
    """Rebuild the RoPE buffers (non-persistent: in no checkpoint) as the model was trained: in its config's
    `rope_inv_freq_dtype` whatever the weights' dtype, or, unrecorded (official releases), rounded to the weights'
    dtype as the official README's model.to(bfloat16) does, so that the rotary angles match the release's."""
    recorded = model.config.rope_inv_freq_dtype
    dtype = model.dtype if recorded is None else getattr(torch, recorded)
    model.llama.model.rotary_emb = LlamaRotaryEmbedding(model.llama.config).to(device=model.device, dtype=dtype)


def load_llama(llama_dir: str | Path, config: MPlusConfig, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> MPlus:
    """An MPlus around the weights of a plain HF Llama directory (adapters, BOS vectors, retrievers freshly made)."""
    path = Path(llama_dir)
    files = weight_files(path)
    base = read_tensors(files, list(files))
    with torch.device("cpu"):
        model = MPlus(config).to(dtype)   # fresh adapters/retrievers with their normal initialisation
    own = model.state_dict()
    state = dict(own)
    for key, t in base.items():
        ours = "llama." + key
        if ours not in own:
            ours = ours.replace(".weight", ".base_layer.weight")
        if ours not in own:
            raise ValueError(f"{path}: weight {key} has no place in an MPlus built from the given config")
        state[ours] = t.to(dtype)
    formats.load_state_strict(model, state, str(path))
    model._init_memory_parameters()
    model = model.to(device)
    _rebuild_rotary(model)   # `.to(dtype)` above cast the frequencies too: rebuild them as the config says
    return model

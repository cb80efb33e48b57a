"""The token-by-token decode loop shared by `MPlus.generate` (reads through memory) and the evaluations' plain-window
baseline (the backbone alone): both pre-fill their own cache, then hand this loop the first logits and a step.

`StaticDecoder` is the step of `MPlus.generate`: the read adapter folded into the weights, a preallocated cache, and on
CUDA one graph replay per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .adapters import FoldedAdapters, projection


def pick_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: the argmax, or a draw from softmax(logits / temperature) over the top k."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], max_new_tokens: int, *,
                stop_ids: Sequence[int] = (), pick: Callable[[torch.Tensor], torch.Tensor] = pick_token
                ) -> torch.Tensor:
    """New ids [B, t <= max_new_tokens], one per loop turn.

    Args:
        logits: [B, V] for the first new token (the pre-fill's last position).
        step: `step(tokens [B, 1], i)` feeds the i-th new token (0-based) through the model and returns the logits
            [B, V] for the next one; it is not called after the last token.
        stop_ids: a row that emits any of them is finished and repeats `stop_ids[0]` from then on; the loop stops
            once every row is finished. Empty: always `max_new_tokens` tokens.
        pick: logits [B, V] -> ids [B] (default greedy).
    """
    batch = logits.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    out: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        token = pick(logits)
        if len(stop_ids):
            token = torch.where(finished, torch.full_like(token, stop_ids[0]), token)
            finished |= torch.isin(token, stops)
        out.append(token[:, None])
        if i == max_new_tokens - 1 or (len(stop_ids) and bool(finished.all())):
            break
        logits = step(token[:, None], i)
    if not out:
        return torch.empty(batch, 0, dtype=torch.long, device=logits.device)
    return torch.cat(out, dim=1)


# ---- the decode step of MPlus.generate: plain torch over a static cache, one CUDA graph on CUDA ----------------------
class LayerWeights:
    """What one decoder layer's decode step reads: its norms and its seven projections (adapter folded or not)."""

    def __init__(self, layer: nn.Module, adapter: str | None, folded: FoldedAdapters | None):
        attn, mlp = layer.self_attn, layer.mlp
        get = (lambda m: folded.projection(m, adapter)) if folded is not None else (lambda m: projection(m, adapter))
        self.input_norm, self.post_norm, self.act = layer.input_layernorm, layer.post_attention_layernorm, mlp.act_fn
        self.q, self.k, self.v, self.o = get(attn.q_proj), get(attn.k_proj), get(attn.v_proj), get(attn.o_proj)
        self.gate, self.up, self.down = get(mlp.gate_proj), get(mlp.up_proj), get(mlp.down_proj)

    def tensors(self) -> list[torch.Tensor]:
        out = [*self.input_norm.parameters(), *self.post_norm.parameters()]
        for p in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down):
            out += p.tensors()
        return out


class StaticDecoder:
    """Decode steps of a Llama-shaped MPlus against a preallocated K/V cache, in plain torch.

    One step feeds one token per row through every layer: RMSNorm, the projections (`LayerWeights`), RoPE at the
    token's position, its K/V written into the cache slot after the previous ones, attention over the filled slots
    (the memory prefix, the prompt and the tokens so far), the MLP, then the final norm and lm_head. Grouped-query
    attention needs no copy of the cache: the query heads sharing a K/V head are one query block of that head.

    `static` (default: on CUDA): the step takes its token, cache slot and position as tensors and attends over the
    whole cache with a mask that hides the slots after the current one (the buffers start zeroed, so hidden slots
    hold finite values): fixed shapes, so that on CUDA it is captured once as a CUDA graph and replayed, one launch
    per token instead of the few hundred kernels Python issued per token, which made 8B decoding host-bound.
    Otherwise (CPU, or if capture fails) it runs eagerly over the filled slots only.
    """

    def __init__(self, model, batch: int, capacity: int, *, adapter: str | None, folded: FoldedAdapters | None,
                 static: bool | None = None):
        cfg = model.llama.config
        self.model = model
        self.batch, self.capacity = batch, capacity
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.device, self.dtype = model.device, model.dtype
        self.layers = [LayerWeights(layer, adapter, folded) for layer in model.layers]
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.static = (self.device.type == "cuda") if static is None else static
        self.use_graph = self.static and self.device.type == "cuda"
        self._graph = None
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None
        self.key = self.identity(model, adapter, folded)

    @staticmethod
    def identity(model, adapter: str | None, folded: FoldedAdapters | None) -> tuple:
        """What a built decoder depends on: the storage of every tensor a step reads (a captured graph holds their
        addresses). Folded weights are refreshed in place when their sources change (`FoldedAdapters`)."""
        tensors = [model.llama.model.embed_tokens.weight, *model.llama.model.norm.parameters(),
                   model.llama.lm_head.weight, *model.rotary.buffers()]
        for layer in model.layers:
            tensors += LayerWeights(layer, adapter, folded).tensors()
        return (adapter, folded is not None, model.dtype, str(model.device),
                tuple((t.data_ptr(), tuple(t.shape)) for t in tensors))

    def fits(self, batch: int, needed: int) -> bool:
        """Whether this decoder serves a generation of `batch` rows needing `needed` cache slots (little padding:
        a graph attends over every slot)."""
        return batch == self.batch and needed <= self.capacity <= needed + max(1024, needed // 4)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bind(self, cache) -> None:
        """Make `cache` (an empty MemoryKVCache of this capacity) fill this decoder's buffers at the prefill."""
        if cache.capacity != self.capacity:
            raise ValueError(f"cache of {cache.capacity} slots, decoder of {self.capacity}")
        cache.keys, cache.values = list(self.keys), list(self.values)

    def step(self, tokens: torch.Tensor, slot: int, position: int) -> torch.Tensor:
        """Logits [B, V] after feeding tokens [B, 1] into cache slot `slot` at RoPE position `position`."""
        if slot >= self.capacity:
            raise RuntimeError(f"decode cache of {self.capacity} slots overflows at slot {slot}")
        if not self.static:
            return self._forward(tokens, slot, position)
        if not self.use_graph:
            return self._forward(tokens.clone(), torch.full((1,), slot, dtype=torch.long, device=self.device),
                                 torch.full((1, 1), position, dtype=torch.long, device=self.device))
        if self._graph is None:
            try:
                self._capture(tokens, slot, position)
            except RuntimeError as e:    # e.g. an op without graph support: decode eagerly instead
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding without a graph",
                              stacklevel=2)
                self.static = self.use_graph = False
                self._graph = None
                return self._forward(tokens, slot, position)
        static_tokens, static_slot, static_position = self._inputs
        static_tokens.copy_(tokens)
        static_slot.fill_(slot)
        static_position.fill_(position)
        self._graph.replay()
        return self._logits.clone()

    def _capture(self, tokens: torch.Tensor, slot: int, position: int) -> None:
        """Record the step with static inputs set to this step's values: the warm-up runs write this token's K/V into
        its slot, as the replay that follows does again."""
        device = self.device
        self._inputs = (tokens.clone(), torch.full((1,), slot, dtype=torch.long, device=device),
                        torch.full((1, 1), position, dtype=torch.long, device=device))
        run = lambda: self._forward(*self._inputs)   # noqa: E731
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = run()
        self._graph = graph

    def _forward(self, tokens: torch.Tensor, slot: int | torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        model = self.model
        B, H, G, D = tokens.shape[0], self.heads, self.heads // self.kv_heads, self.head_dim
        h = model.llama.model.embed_tokens(tokens)                                     # [B, 1, d]
        static = torch.is_tensor(slot)
        if static:
            pos_ids = position
            visible = torch.arange(self.capacity, device=h.device) <= slot             # [capacity]
            mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~visible, float("-inf"))[None, None, None]
        else:
            pos_ids = torch.tensor([[position]], device=h.device)
            mask = None
        cos, sin = model.rotary(h, pos_ids)
        for l, w in enumerate(self.layers):
            x = w.input_norm(h)
            q = w.q(x).view(B, 1, H, D).transpose(1, 2)
            k = w.k(x).view(B, 1, self.kv_heads, D).transpose(1, 2)
            v = w.v(x).view(B, 1, self.kv_heads, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = self.keys[l], self.values[l]
            if static:
                keys.index_copy_(2, slot, k)
                values.index_copy_(2, slot, v)
            else:
                keys[:, :, slot: slot + 1] = k
                values[:, :, slot: slot + 1] = v
                keys, values = keys[:, :, : slot + 1], values[:, :, : slot + 1]
            # query heads kv*G .. kv*G+G-1 share K/V head kv (transformers' repeat_kv order)
            o = F.scaled_dot_product_attention(q.reshape(B, self.kv_heads, G, D), keys, values, attn_mask=mask,
                                               scale=self.scaling)
            h = h + w.o(o.reshape(B, 1, H * D))
            x = w.post_norm(h)
            h = h + w.down(w.act(w.gate(x)) * w.up(x))
        return model.llama.lm_head(model.llama.model.norm(h[:, -1]))

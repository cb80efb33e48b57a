"""Attention of real tokens over a memory prefix, without a materialised mask.

A layer's keys are [memory prefix (P rows) ; the n real tokens]. Every token sees every prefix row and, causally, the
tokens up to itself: a causal pattern aligned to the bottom-right corner of the [n, P + n] score matrix. Building that
pattern as a mask costs a [n, P + n] tensor per pass, makes the kernels read and add it at every score, and keeps
SDPA on GPU off its flash kernel. `memory_attention` computes it without one:

  * one query (a decode step) sees every key, and with no prefix the pattern is plain causal: SDPA, no mask;
  * on CPU, two fused attentions, one over the prefix (no mask) and one causal over the tokens, merged by their
    log-sum-exp; the backward runs the kernel's own backward of each part against the merged output and log-sum-exp,
    which is the exact gradient of softmax attention over the union of the two key sets;
  * elsewhere (CUDA), SDPA with torch's `causal_lower_right` bias, which runs the fused kernels that implement this
    alignment (flash attention's causal mode is bottom-right aligned; the memory-efficient kernel has a mask type).

Grouped-query attention (fewer K/V heads than query heads, query head h reading K/V head h // group) works on every
path; on CPU the kernels take the K/V heads as they are (no copy), and the query heads that share a K/V head may be
read as one longer query block of it. Under autocast the three inputs run in its dtype, as autocast runs SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention.bias import causal_lower_right
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

_aten = torch.ops.aten
# The public SDPA returns no log-sum-exp, which merging two attentions needs; these are the kernels it runs on CPU.
_HAS_CPU_FLASH = (hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu")
                  and hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


def memory_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     past: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Attention [B, H, n, D] of queries [B, H, n, D] over keys/values [B, Hkv, P + n, D] whose first P rows are the
    memory prefix: query i sees keys 0 .. P + i (every prefix row, then the tokens up to itself). H % Hkv == 0.

    past: the prefix's (keys, values) [B, Hkv, P, D] given apart; key/value are then the n tokens' own. The CPU path
    reads the two parts as they are; the others concatenate them.
    """
    n = query.shape[2]
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):   # as autocast runs SDPA: all three in its lower-precision dtype
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    cpu_flash = device_type == "cpu" and dropout == 0.0 and _HAS_CPU_FLASH and n > 1
    if past is not None:
        if key.shape[2] != n:
            raise ValueError(f"memory_attention: {n} queries but {key.shape[2]} keys of their own beside `past`")
        past_key, past_value = past[0].to(dtype), past[1].to(dtype)
        if cpu_flash and past_key.shape[2]:
            return _PrefixThenCausalCPU.apply(query, past_key, past_value, key, value, _scale(query, scale))
        key, value = torch.cat([past_key, key], 2), torch.cat([past_value, value], 2)
    total = key.shape[2]
    prefix = total - n
    if prefix < 0:
        raise ValueError(f"memory_attention: {n} queries but only {total} keys (the queries' own keys come last)")
    grouped = query.shape[1] != key.shape[1]
    if n == 1 or prefix == 0:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=n > 1, scale=scale,
                                              enable_gqa=grouped)
    if cpu_flash:
        return _PrefixThenCausalCPU.apply(query, key[:, :, :prefix], value[:, :, :prefix], key[:, :, prefix:],
                                          value[:, :, prefix:], _scale(query, scale))
    if grouped and not _flash_reads_grouped_heads(query, key, value, dropout):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        grouped = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(n, total),
                                          dropout_p=dropout, scale=scale, enable_gqa=grouped)


def _scale(query: torch.Tensor, scale: float | None) -> float:
    return query.shape[-1] ** -0.5 if scale is None else scale


def _flash_reads_grouped_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether SDPA's flash kernel (CUDA, 16-bit) runs on these fewer K/V heads as they are; the memory-efficient
    kernel, the other one behind `causal_lower_right`, needs them repeated to one per query head."""
    if query.device.type != "cuda":
        return False
    return can_use_flash_attention(SDPAParams(query, key, value, None, dropout, False, True))


def _fold_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, n, ...] -> [B, Hkv, H / Hkv * n, ...]: the query heads of one K/V head as one query block."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[3:])


def _cpu_flash(query, key, value, causal: bool, scale: float, fold: bool):
    """(out [B, H, n, D], log-sum-exp [B, H, n]) of one fused CPU attention (causal: top-left aligned, n == keys)."""
    if fold:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            _fold_groups(query, key.shape[1]), key, value, is_causal=causal, scale=scale)
        return out.reshape(query.shape), lse.reshape(query.shape[:3])
    return _aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, is_causal=causal, scale=scale)


def _cpu_flash_backward(grad_out, query, key, value, out, lse, causal: bool, scale: float, fold: bool):
    """(dQ, dK, dV) of one part of a merged attention, given the merged output and log-sum-exp."""
    if fold:
        kv = key.shape[1]
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _fold_groups(grad_out, kv), _fold_groups(query, kv), key, value, _fold_groups(out, kv),
            _fold_groups(lse, kv), 0.0, causal, scale=scale)
        return dq.reshape(query.shape), dk, dv
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, lse, 0.0,
                                                                      causal, scale=scale)


class _PrefixThenCausalCPU(torch.autograd.Function):
    """`memory_attention` on CPU: the prefix part and the causal token part as two fused kernels, merged by LSE."""

    @staticmethod
    def forward(ctx, query, prefix_key, prefix_value, key, value, scale: float):
        # Folding the query heads of a K/V head into one block reads each K/V block once per block of queries; it
        # also leaves only B * Hkv units for the backward's threads, so it is used when those keep every thread busy.
        fold = query.shape[1] != key.shape[1] and query.shape[0] * key.shape[1] >= torch.get_num_threads()
        out_p, lse_p = _cpu_flash(query, prefix_key, prefix_value, False, scale, fold)
        out_t, lse_t = _cpu_flash(query, key, value, True, scale, False)
        lse = torch.logaddexp(lse_p, lse_t)
        out = (out_p * (lse_p - lse).exp().unsqueeze(-1) + out_t * (lse_t - lse).exp().unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, prefix_key, prefix_value, key, value, out, lse)
        ctx.scale, ctx.fold = scale, fold
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, prefix_key, prefix_value, key, value, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq_p, dk_p, dv_p = _cpu_flash_backward(grad_out, query, prefix_key, prefix_value, out, lse, False, ctx.scale,
                                               ctx.fold)
        dq_t, dk_t, dv_t = _cpu_flash_backward(grad_out, query, key, value, out, lse, True, ctx.scale, False)
        return dq_p + dq_t, dk_p, dv_p, dk_t, dv_t, None


class MemoryAttention(LlamaAttention):
    """transformers' Llama attention (same weights and names) whose keys start with the memory prefix that the layer
    put into the KV cache; computed by `memory_attention` instead of transformers' attention functions (which take
    the bottom-right alignment only as an explicit mask)."""

    @classmethod
    def convert(cls, attention: LlamaAttention) -> "MemoryAttention":
        """Turn an HF LlamaAttention into a MemoryAttention in place."""
        attention.__class__ = cls
        return attention

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise ValueError("MemoryAttention takes no attention mask: the memory prefix in the cache and causality "
                             "define what each token sees")
        B, n, _ = hidden_states.shape
        heads = (B, n, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        past = None
        if cache is not None:
            key, value, past = cache.update(key, value, self.layer_idx)
        out = memory_attention(query, key, value, past=past, scale=self.scaling,
                               dropout=self.attention_dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1)), None

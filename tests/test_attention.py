"""Attention over a memory prefix without a mask (model/attention.py) equals the masked attention it replaced: the
kernel on random tensors (forward and gradients, grouped-query heads, every path), and every pass of the tiny model
(write, read, generate, training losses and their gradients) with the reference swapped in."""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mplus_lightning import MPlus, tiny_config
from mplus_lightning.model import attention
from mplus_lightning.model.attention import memory_attention

from .conftest import filled, random_ids, randomize_adapters


# ---- the reference: the explicit mask the model used before -------------------------------------------------------
def bottom_right_causal_mask(q: int, total: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, q, total] additive mask: query i sees keys 0 .. total-q+i (every prefix row and itself)."""
    i = torch.arange(q, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :]
    mask = torch.zeros(q, total, dtype=dtype, device=device)
    mask.masked_fill_(j > i + (total - q), torch.finfo(dtype).min)
    return mask[None, None]


def masked_attention(query, key, value, *, past=None, scale=None, dropout=0.0):
    """What transformers' SDPA attention computed with that mask: K/V heads repeated per query group, then SDPA."""
    if past is not None:
        key, value = torch.cat([past[0], key], 2), torch.cat([past[1], value], 2)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    n, total = query.shape[2], key.shape[2]
    mask = None if n == 1 else bottom_right_causal_mask(n, total, query.dtype, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


@contextlib.contextmanager
def reference_attention():
    with mock.patch.object(attention, "memory_attention", masked_attention):
        yield


@contextlib.contextmanager
def generic_path():
    """The path taken off CPU (torch's causal_lower_right bias), forced on CPU."""
    with mock.patch.object(attention, "_HAS_CPU_FLASH", False):
        yield


def test_reference_mask_is_bottom_right_causal():
    q, total = 3, 7
    mask = bottom_right_causal_mask(q, total, torch.float32, "cpu")[0, 0]
    visible = mask == 0
    for i in range(q):
        assert visible[i].tolist() == [j <= total - q + i for j in range(total)]
    # against torch's own top-left causal attention on the square case
    x = torch.randn(1, 1, total, 8)
    naive = F.scaled_dot_product_attention(x, x, x, is_causal=True)[:, :, -q:]
    ours = F.scaled_dot_product_attention(x[:, :, -q:], x, x, attn_mask=mask)
    torch.testing.assert_close(ours, naive)


# ---- the kernel on random tensors -----------------------------------------------------------------------------------
def qkv(batch, heads, kv_heads, n, prefix, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(batch, h, t, dim, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads, n), make(kv_heads, prefix + n), make(kv_heads, prefix + n)


SHAPES = [  # batch, heads, kv_heads, queries n, prefix P
    (1, 4, 4, 5, 9), (2, 4, 2, 7, 40), (1, 4, 1, 33, 70), (2, 4, 2, 1, 30), (1, 4, 2, 12, 0), (1, 4, 2, 1, 0),
    (1, 8, 2, 130, 300),
]


@pytest.mark.parametrize("path", ["cpu", "generic"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}n{}P{}".format(*s))
def test_memory_attention_equals_masked_attention_with_gradients(shape, path):
    q, k, v = qkv(*shape)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    expected = masked_attention(q, k, v, scale=0.3)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    with generic_path() if path == "generic" else contextlib.nullcontext():
        out = memory_attention(q, k, v, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for ours, ref, name in zip(grads, expected_grads, "qkv"):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("path", ["cpu", "generic"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}n{}P{}".format(*s))
def test_a_prefix_given_apart_gives_what_the_concatenated_keys_give(shape, path):
    """`past=` (the cache's training and read passes): the same output and gradients, to the bit on the CPU path,
    as the prefix concatenated in front of the tokens' keys."""
    q, k, v = qkv(*shape)
    P = k.shape[2] - q.shape[2]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    with generic_path() if path == "generic" else contextlib.nullcontext():
        expected = memory_attention(q, k, v, scale=0.3)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
        parts = [t.detach()[:, :, s].requires_grad_() for t in (k, v) for s in (slice(0, P), slice(P, None))]
        pk, k_own, pv, v_own = parts
        out = memory_attention(q, k_own, v_own, past=(pk, pv), scale=0.3)
    dq, dpk, dk, dpv, dv = torch.autograd.grad(out, (q, pk, k_own, pv, v_own), grad)
    exact = path == "cpu"
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert check(out, expected)
    assert check(dq, expected_grads[0])
    assert check(torch.cat([dpk, dk], 2), expected_grads[1]) and check(torch.cat([dpv, dv], 2), expected_grads[2])


def test_a_prefix_given_apart_must_leave_the_tokens_their_own_keys():
    q, k, v = qkv(1, 4, 2, 5, 3)
    with pytest.raises(ValueError, match="5 queries but 8 keys of their own"):
        memory_attention(q, k, v, past=(k[:, :, :3], v[:, :, :3]))


def test_cache_without_capacity_keeps_the_tokens_apart_and_joins_them_for_the_next_update():
    """The cache hands the attention the prefix and the tokens' K/V as they are; a second update (a prompt read in
    blocks) sees both earlier parts as its past, in order; a prefill starts the layer over."""
    from mplus_lightning.model.mplus import MemoryKVCache
    cache = MemoryKVCache(2)
    prefix, first, second = (torch.randn(1, 2, t, 4) for t in (3, 5, 2))
    cache.prefill(1, prefix, prefix + 1)
    k, v, past = cache.update(first, first + 1, 1)
    assert k is first and torch.equal(v, first + 1) and past[0] is prefix and torch.equal(past[1], prefix + 1)
    k, v, past = cache.update(second, second + 1, 1)
    assert k is second and torch.equal(past[0], torch.cat([prefix, first], 2))
    assert torch.equal(past[1], torch.cat([prefix, first], 2) + 1)
    assert cache.get_seq_length(1) == 10 and cache.get_seq_length(0) == 0
    k, v, past = cache.update(first, first, 0)                 # no prefix: nothing before the first tokens
    assert past is None
    cache.prefill(1, prefix, prefix)
    assert cache.update(second, second, 1)[2][0] is prefix and cache.get_seq_length(1) == 5
    full = MemoryKVCache(1, capacity=12)                       # preallocated: everything up to the tokens, no past
    full.prefill(0, prefix, prefix)
    k, v, past = full.update(first, first, 0)
    assert past is None and torch.equal(k, torch.cat([prefix, first], 2))


@pytest.mark.parametrize("threads", [1, 8])   # 8 > B * Hkv: the query heads are not folded into their K/V head
def test_cpu_path_passes_gradcheck_in_float64(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = qkv(1, 4, 2, 5, 6, dim=4, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda q, k, v: memory_attention(q, k, v), (q, k, v))
    finally:
        torch.set_num_threads(previous)


def test_attention_dropout_keeps_working():
    """A config with attention_dropout > 0 in train mode: the masked path, with the same random draws as before."""
    q, k, v = qkv(1, 4, 2, 5, 7)
    torch.manual_seed(3)
    out = memory_attention(q, k, v, dropout=0.5)
    torch.manual_seed(3)
    expected = masked_attention(q, k, v, dropout=0.5)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, memory_attention(q, k, v))


def test_under_autocast_it_runs_in_the_autocast_dtype_like_sdpa():
    """bf16 training: RoPE leaves q and k in float32 while v comes out of a bf16 linear."""
    q, k, v = qkv(1, 4, 2, 9, 20)
    v_bf16 = v.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        expected = masked_attention(q, k, v_bf16)
        out = memory_attention(q, k, v_bf16)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v_bf16.grad.dtype == torch.bfloat16


def test_a_token_sees_the_prefix_and_earlier_tokens_only():
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 6, 4))
    out = memory_attention(q, k, v)
    changed = v.clone()
    changed[:, :, 4 + 3] += 10.0                     # the value of token 3
    out2 = memory_attention(q, k, changed)
    assert torch.equal(out[:, :, :3], out2[:, :, :3])
    assert not torch.allclose(out[:, :, 3:], out2[:, :, 3:])


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def test_read_runs_fused_cpu_kernels_without_any_query_by_key_tensor(tiny_model):
    memory = filled(tiny_model, chunks=6)
    n = 5
    total = tiny_model.prefix_length(memory) + n
    with OpLog() as log:
        tiny_model.read(memory, random_ids(n, seed=3))
    kernels = [c for c in log.calls if c[0] == torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]
    assert len(kernels) == 2 * len(tiny_model.layers)          # the prefix part and the token part, per layer
    assert all(kw.get("attn_mask") is None for _, _, kw, _ in kernels)
    outputs = [o for c in log.calls for o in (c[3] if isinstance(c[3], (tuple, list)) else (c[3],))]
    assert not [o.shape for o in outputs if torch.is_tensor(o) and o.dim() >= 2 and tuple(o.shape[-2:]) == (n, total)]


def test_the_attention_takes_no_mask(tiny_model):
    layer = tiny_model.layers[0]
    h = torch.randn(1, 3, 64)
    pos = tiny_model._positions(h, 0)
    with pytest.raises(ValueError, match="takes no attention mask"):
        layer.self_attn(h, pos, attention_mask=torch.zeros(1, 1, 3, 3))


# ---- every pass of the tiny model against the masked reference ---------------------------------------------------
def both(fn):
    """(ours, the masked reference's) results of fn()."""
    ours = fn()
    with reference_attention():
        return ours, fn()


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=what)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_adapters(MPlus(tiny_config()).eval())


@pytest.fixture(scope="module", params=[1, 6], ids=["no_ltm_rows", "ltm_rows"])
def memory(request, model):
    memory = filled(model, request.param)
    assert (memory.ltm.size > 0) == (request.param > 1)
    return memory


LENGTHS = [1, 5, 19]     # K = 8 rows per write: 1, < K, > K tokens


@pytest.mark.parametrize("n", LENGTHS)
def test_read_and_write_equal_the_masked_reference(model, memory, n):
    ids = random_ids(n, batch=2, seed=n)
    logits, expected = both(lambda: model.read(memory, ids, return_retrieved=True))
    close(logits[0], expected[0], "read logits")
    assert (logits[1] is None and expected[1] is None) or torch.equal(logits[1], expected[1])
    with warnings.catch_warnings():   # chunks under the 16-token minimum warn
        warnings.simplefilter("ignore")
        delta, expected = both(lambda: model.write(memory, ids[:1]))
    close(delta, expected, "write delta")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("mode", ["eval", "train"])   # train mode decodes through the layers, eval by StaticDecoder
def test_generate_equals_the_masked_reference(model, memory, n, mode):
    ids = random_ids(n, batch=2, seed=10 + n)

    def generate():
        return model.generate(memory, ids, max_new_tokens=6, eos_token_id=None)

    try:
        model.train(mode == "train")
        ours = generate()
        # the reference decodes through the layers (train mode: the tiny config has no LoRA dropout), where the
        # masked attention replaces ours; StaticDecoder calls SDPA itself and would not see the replacement
        model.train(True)
        with reference_attention():
            expected = generate()
    finally:
        model.eval()
    assert torch.equal(ours, expected)


def trainable_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("n", LENGTHS)
def test_training_losses_and_gradients_equal_the_masked_reference(model, memory, n):
    ids = random_ids(n + 1, batch=2, seed=20 + n)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    chunk = random_ids(max(n, 2), seed=30 + n)

    def read_loss():   # the target read against the whole memory (multi-chunk / full-context / revisit steps)
        loss, _ = model.lm_loss(ids, loss_mask, model.view(memory))
        return loss, trainable_grads(model, loss)

    def single_chunk_loss():   # a write with gradient, then the target reads [bos ; delta] (single-chunk step)
        delta = model.write_pass(chunk, memory.newest_block())
        loss, _ = model.lm_loss(ids, loss_mask, model.delta_view(delta))
        return loss, trainable_grads(model, loss)

    for fn, what in ((read_loss, "read"), (single_chunk_loss, "single-chunk")):
        (loss, grads), (ref_loss, ref_grads) = both(fn)
        close(loss, ref_loss, f"{what} loss")
        assert sum(g is not None for g in grads) > 0
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"{what} gradient")

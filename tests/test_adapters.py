"""Canary for the peft internals we rely on to pick an adapter per forward."""
import torch
from peft.tuners.lora import Linear as LoraLinear

from mplus_lightning.model.adapters import activate, add_lora_adapters


def tiny_lora():
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(6, 6, bias=False))
    add_lora_adapters(net, r=2, alpha=4, dropout=0.0, targets=("q_proj",), names=("write", "read"))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p))
    return net


def test_peft_still_switches_adapters_through_the_private_attribute():
    """Fails if peft renames `_active_adapter` or stops reading it in LoRA forwards."""
    net = tiny_lora()
    layer = net.q_proj
    assert isinstance(layer, LoraLinear)
    x = torch.randn(3, 6)
    base = layer.base_layer(x)
    for name in ("write", "read"):
        activate([layer], name)
        assert layer.active_adapters == [name]
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        torch.testing.assert_close(layer(x), base + B(A(x)) * s)
    activate([layer], None)
    torch.testing.assert_close(layer(x), base)


def test_switching_never_freezes_the_other_adapter():
    net = tiny_lora()
    activate([net.q_proj], "read")
    activate([net.q_proj], "write")
    grads = {n: p.requires_grad for n, p in net.named_parameters() if "lora_" in n}
    assert grads and all(grads.values()), grads
    assert not net.q_proj.base_layer.weight.requires_grad


def test_one_step_trains_both_adapters():
    net = tiny_lora()
    x = torch.randn(3, 6)
    activate([net.q_proj], "write")
    y = net(x)
    activate([net.q_proj], "read")
    loss = (net(y) ** 2).sum()
    loss.backward()
    for name in ("write", "read"):
        assert net.q_proj.lora_A[name].weight.grad.abs().sum() > 0, name


def test_the_addmm_forward_equals_peft_own_forward_with_its_gradients():
    """AddmmLoraLinear folds peft's `base + B(A(x)) * s` into one addmm: same outputs and gradients (fp32 rounding),
    and peft's own forward for what it does not cover (two active adapters here)."""
    net = tiny_lora()
    layer = net.q_proj
    assert type(layer).__name__ == "AddmmLoraLinear"
    x = torch.randn(2, 5, 6, requires_grad=True)
    for active in (["read"], ["write"], [], ["write", "read"]):
        layer._active_adapter = active
        outs, grads = [], []
        for forward in (type(layer).forward, LoraLinear.forward):   # ours, then peft's
            out = forward(layer, x)
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append([t.grad.clone() for t in (x, *layer.parameters()) if t.grad is not None])
            for t in (x, *layer.parameters()):
                t.grad = None
        torch.testing.assert_close(outs[0], outs[1])
        assert len(grads[0]) == len(grads[1]) == 1 + 2 * len(active)
        for ours, peft in zip(*grads):
            torch.testing.assert_close(ours, peft)
    # under bf16 autocast the output has peft's dtype
    layer._active_adapter = ["read"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == LoraLinear.forward(layer, x).dtype == torch.bfloat16

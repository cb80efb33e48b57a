"""The two LoRA adapters, `write` (official `default`, the update pass) and `read` (official `decoder_adapter`).

Both are injected with peft into the Llama layers. The adapter is chosen per forward, per decoder layer, by setting
the private `_active_adapter` of that layer's LoRA modules; we never call `set_adapter`, which silently freezes the
other adapter, and the choice is an argument of the layer's forward so that activation checkpointing recomputes
with the same adapter (a switch stored on the modules would be seen in its later state by the recomputation).
tests/test_adapters.py holds the canary that fails if peft renames the attribute.

Decoding (`MPlus.generate`) reads the weights with the read adapter folded in, W + s B A (`FoldedAdapters`): one
matmul per projection instead of three, on a copy that is refreshed whenever a weight changes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

WRITE, READ = "write", "read"
OFFICIAL_NAMES = {"default": WRITE, "decoder_adapter": READ}


def add_lora_adapters(model: nn.Module, *, r: int, alpha: float, dropout: float, targets: tuple[str, ...],
                      names: tuple[str, ...] = (WRITE, READ)) -> None:
    """Inject one LoRA adapter per name into `model` in place and make all of them trainable."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    for name in names:
        with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=name)
    for module in lora_modules(model):
        for name in names:
            for p in (*module.lora_A[name].parameters(), *module.lora_B[name].parameters()):
                p.requires_grad_(True)
        if type(module) is LoraLinear:
            module.__class__ = AddmmLoraLinear


class AddmmLoraLinear(LoraLinear):
    """peft's LoRA Linear whose plain-LoRA forward adds s (x A^T) B^T to the base output inside one addmm.

    peft computes `base + B(A(x)) * s`: two more passes over the [n, d_out] output, forward and backward, which on
    CPU cost about as much as the rank-r matmuls themselves. Everything else (several or no active adapters, DoRA and
    other variants, merged weights, extra arguments, mixed dtypes outside autocast) runs peft's own forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        name = active[0] if len(active) == 1 else None
        if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
                or not _plain_lora(self, name)
                or (self.lora_A[name].weight.dtype != self.base_layer.weight.dtype
                    and not torch.is_autocast_enabled(x.device.type))):
            return super().forward(x, *args, **kwargs)
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        y = base(x)
        xa = a(self.lora_dropout[name](x))
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.weight.t(),
                          alpha=self.scaling[name])
        return out.view(y.shape)


def lora_modules(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def activate(modules: list[BaseTunerLayer], adapter: str | None) -> None:
    """Make `adapter` the only active one in these LoRA modules (None: none, the base weights alone).

    Writes peft's private `_active_adapter` instead of calling `set_adapter`, which has requires_grad side effects.
    """
    active = [adapter] if adapter is not None else []
    for m in modules:
        m._active_adapter = active


# ---- the read adapter folded into the weights (decode) -----------------------------------------------------------
class Projection:
    """What a decode step needs of one linear map, possibly LoRA-wrapped: y = x W^T + b + s (x A^T) B^T, or with the
    adapter folded into W (then A and B are None). Plain tensors, so that a CUDA graph can capture the call."""

    __slots__ = ("weight", "bias", "lora_a", "lora_b", "scale")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, lora_a: torch.Tensor | None = None,
                 lora_b: torch.Tensor | None = None, scale: float = 1.0):
        self.weight, self.bias, self.lora_a, self.lora_b, self.scale = weight, bias, lora_a, lora_b, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.weight, self.bias, self.lora_a, self.lora_b) if t is not None)


def _plain_lora(module: BaseTunerLayer, adapter: str) -> bool:
    """Whether `adapter` of this LoRA module is plain LoRA, y = x W^T + s (x A^T) B^T: no DoRA or other variant, no
    bias on B."""
    return adapter not in getattr(module, "lora_variant", {}) and module.lora_B[adapter].bias is None


def _parts(module: nn.Module, adapter: str | None) -> tuple[nn.Linear, nn.Parameter | None, nn.Parameter | None, float]:
    """(base linear, A, B, scale) of a linear with `adapter` (A, B None: no such adapter, or a plain nn.Linear).

    Raises NotImplementedError for LoRA variants a decode step does not reproduce (DoRA, LoRA bias, ...)."""
    if not isinstance(module, BaseTunerLayer):
        return module, None, None, 1.0
    base = module.base_layer
    if adapter is None or adapter not in module.lora_A:
        return base, None, None, 1.0
    if not _plain_lora(module, adapter) or getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(f"adapter {adapter!r}: only plain LoRA (no DoRA, bias or fan_in_fan_out) is folded")
    return base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def projection(module: nn.Module, adapter: str | None) -> Projection:
    """The module's own tensors with `adapter` applied per call (no copy)."""
    base, a, b, scale = _parts(module, adapter)
    return Projection(base.weight, base.bias, a, b, scale)


class FoldedAdapters:
    """Copies of LoRA-wrapped weights with one adapter folded in, W + s B A, kept until a weight changes.

    A copy is rebuilt when the base weight, A or B is replaced or modified in place (their `_version`s: optimizer
    steps, `load_state_dict`, `.to()`), so that training between generations never decodes with stale weights. The
    write passes keep using the unfolded modules. Folding costs one copy of every adapted weight (about 12 GB for
    Llama-3.1-8B in bf16); dropping the object frees it (`MPlus.free_decode_state`).
    """

    def __init__(self):
        self._folded: dict[int, tuple[tuple, Projection]] = {}

    def nbytes(self) -> int:
        return sum(p.weight.numel() * p.weight.element_size() for _, p in self._folded.values())

    def projection(self, module: nn.Module, adapter: str | None) -> Projection:
        base, a, b, scale = _parts(module, adapter)
        if a is None:
            return Projection(base.weight, base.bias)
        key = (adapter, scale, *((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in (base.weight, a, b)))
        hit = self._folded.get(id(module))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():   # in float32, then rounded once to the weight's dtype
            weight = (base.weight.float() + scale * (b.float() @ a.float())).to(base.weight.dtype)
            if hit is not None and hit[1].weight.shape == weight.shape and hit[1].weight.dtype == weight.dtype \
                    and hit[1].weight.device == weight.device:
                hit[1].weight.copy_(weight)    # same storage: a captured CUDA graph stays valid
                weight = hit[1].weight
        folded = Projection(weight, base.bias)
        self._folded[id(module)] = (key, folded)
        return folded

"""The two LoRA adapters, `write` (official `default`, the update pass) and `read` (official `decoder_adapter`).

Both are injected with peft into the Llama layers. The adapter is chosen per forward, per decoder layer, by setting
the private `_active_adapter` of that layer's LoRA modules; we never call `set_adapter`, which silently freezes the
other adapter, and the choice is an argument of the layer's forward so that activation checkpointing recomputes
with the same adapter (a switch stored on the modules would be seen in its later state by the recomputation).
tests/test_adapters.py holds the canary that fails if peft renames the attribute.
"""

from __future__ import annotations

import warnings

from peft import LoraConfig, inject_adapter_in_model
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


def lora_modules(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def activate(modules: list[BaseTunerLayer], adapter: str | None) -> None:
    """Make `adapter` the only active one in these LoRA modules (None: none, the base weights alone).

    Writes peft's private `_active_adapter` instead of calling `set_adapter`, which has requires_grad side effects.
    """
    active = [adapter] if adapter is not None else []
    for m in modules:
        m._active_adapter = active

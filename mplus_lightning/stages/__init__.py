"""One thin LightningModule per training stage (stages.py, pretrain.py) on a shared base (base.py); the step itself
is plain torch (step.py).

The LightningModules are imported on first use, so that `mplus_lightning.stages.step` runs without Lightning.
"""

from __future__ import annotations

import importlib

_LAZY = {"MemoryTrainingModule": ".base", "PretrainModule": ".pretrain", "Stage1Module": ".stages",
         "Stage2Module": ".stages", "LtmModule": ".stages", "module_for": ".stages"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)

"""One thin LightningModule per training stage on a shared base (stages/base.py)."""
from .base import MemoryTrainingModule
from .stages import LtmModule, Stage1Module, Stage2Module, module_for

__all__ = ["MemoryTrainingModule", "Stage1Module", "Stage2Module", "LtmModule", "module_for"]

"""One thin LightningModule per training stage on a shared base (stages/base.py)."""
from .base import MemoryTrainingModule
from .pretrain import PretrainModule
from .stages import LtmModule, Stage1Module, Stage2Module, module_for

__all__ = ["MemoryTrainingModule", "PretrainModule", "Stage1Module", "Stage2Module", "LtmModule", "module_for"]

"""The three memory stages (they share base.py's module and step.py's step; each checks what its stage needs), and
the stage names."""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import MemoryTrainingModule
from .pretrain import PretrainModule


class Stage1Module(MemoryTrainingModule):
    """Stage 1: MemoryLLM continual training (pool of num_blocks*K rows, no long-term memory)."""

    stage = "stage1"


class Stage2Module(MemoryTrainingModule):
    """Stage 2: long documents; the retriever is trained here too, as in the official code."""

    stage = "stage2"

    def check_stage(self, cfg: RunConfig) -> None:
        super().check_stage(cfg)
        if not (cfg.model.add_selector and cfg.step.retriever_loss):
            raise ConfigError("stage2 trains the retriever: set model.add_selector=true and step.retriever_loss=true")


class LtmModule(MemoryTrainingModule):
    """Stage 3 (ltm): short-term pool + long-term memory + retriever co-training."""

    stage = "ltm"

    def check_stage(self, cfg: RunConfig) -> None:
        super().check_stage(cfg)
        if cfg.model.num_ltm_blocks < 1:
            raise ConfigError("model.num_ltm_blocks: stage ltm needs >= 1 (a long-term memory)")


def module_for(stage: str):
    return {"pretrain": PretrainModule, "stage1": Stage1Module, "stage2": Stage2Module, "ltm": LtmModule}[stage]

"""Stage `pretrain`: the plain Llama on batches of in-context text, no memory. For backbones trained from scratch.

The released M+ starts from Llama-3.1-8B, which can already read a fact back out of its context window; stages 1-3
teach it (through LoRA adapters) to read the fact out of memory instead. A tiny Llama trained from scratch (the CPU
demo) has to learn the reading first, and that is far cheaper in context and in batches than one memory at a time:
this stage trains the Llama weights alone (adapters, BOS vectors, the new-memory embedding and retrievers keep their
inits) on batches of the data's `in_context` layout. Its export has no memory; stage 1's `init_from` it starts with a
fresh pool.
"""

from __future__ import annotations

import lightning as L

from ..config import RunConfig
from ..model import MPlus
from .base import TrainingRecipe
from .build import build_model


class PretrainModule(TrainingRecipe, L.LightningModule):
    """Batches {"input_ids": [B, T], "loss_mask": [B, T]} -> masked next-token loss of the plain Llama."""

    stage = "pretrain"

    def __init__(self, cfg: RunConfig, instruction_ids: list[int] | None = None):
        super().__init__()
        self.check_stage(cfg)
        self.cfg = cfg
        self.model: MPlus = build_model(cfg)
        self.model.train_backbone_only()
        self.memory = None   # nothing to export beside the weights

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["loss_mask"]
        loss, count, hits = self.model.plain_lm_loss(ids, mask)
        self.stop_if_not_finite(loss, f"pretrain batch of {ids.shape[0]} sequences")
        self.count_samples(ids.shape[0])
        self.record_step(ids.numel(), ids.shape[0], {"train/loss": loss.detach(), "train/lm_loss": loss.detach(),
                                                     "train/token_acc": hits.float() / count.clamp(min=1)})
        return loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restore_curves(checkpoint)

    def validation_step(self, batch, batch_idx):
        loss, count, hits = self.model.plain_lm_loss(batch["input_ids"], batch["loss_mask"])
        n = batch["input_ids"].shape[0]
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log("val/token_acc", hits.float() / count.clamp(min=1), batch_size=n, sync_dist=True)

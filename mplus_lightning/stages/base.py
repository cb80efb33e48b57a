"""The LightningModules' shared parts: the training recipe (optimizer, schedule, sharding, non-finite stop) and the
memory stages' module, a thin Lightning shell around `MemoryStep` (stages/step.py, plain torch), which owns each rank's
memory and runs the step.

Where we differ from the official recipe: full-context steps step the scheduler too (the official code skipped the
scheduler on them), and the learning rate does not scale with the GPU count (the official code multiplied it).
Each rank's memory and step state is saved beside every checkpoint (`rank_state_path`); the official code saved
weights only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..config import RunConfig
from ..model import MemoryState, MPlus
from .build import build_model, initial_memory
from .step import Decisions, MemoryStep, max_over_ranks

log = logging.getLogger(__name__)
RANK_STATE_SUFFIX = ".rank{rank}.state"


def rank_state_path(ckpt_path: str | Path, rank: int) -> Path:
    """Each rank's memory and step state live beside the Lightning checkpoint (they differ per rank)."""
    return Path(str(ckpt_path) + RANK_STATE_SUFFIX.format(rank=rank))


def save_rank_state(path: Path, state: dict[str, Any]) -> None:
    """Write one rank's state file (`MemoryStep.state_dict()` plus the torch RNG and the world size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written state


def load_rank_state(path: Path) -> dict[str, Any]:
    """Read a state file written by `save_rank_state` (on CPU)."""
    return torch.load(path, weights_only=False, map_location="cpu")


class TrainingRecipe:
    """What every stage's LightningModule shares: the stage check, FSDP2 sharding, the optimizer and schedule,
    clipping, the model config in checkpoints, the stop on a non-finite loss. Mixed into modules that own `cfg`
    (RunConfig) and `model` (MPlus)."""

    cfg: RunConfig
    model: MPlus
    stage: str

    def check_stage(self, cfg: RunConfig) -> None:
        if cfg.stage != self.stage:
            raise ValueError(f"{type(self).__name__} trains {self.stage}, config says stage={cfg.stage}")

    def configure_optimizers(self):
        o = self.cfg.optim
        main = [p for n, p in self.model.named_parameters() if p.requires_grad and "retriever" not in n]
        selector = [p for n, p in self.model.named_parameters() if p.requires_grad and "retriever" in n]
        groups = [{"params": main, "lr": o.lr, "name": "main"}]
        if selector:
            groups.append({"params": selector, "lr": o.selector_lr, "name": "selector"})
        opt = torch.optim.AdamW(groups, weight_decay=o.weight_decay, betas=tuple(o.betas))
        if o.schedule == "constant" and o.warmup_steps == 0:
            return opt

        def factor(step: int) -> float:
            warmup = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
            if o.schedule == "constant":
                return warmup
            return warmup * (1.0 - (1.0 - o.final_lr_factor) * min(step, o.decay_steps) / max(1, o.decay_steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor] * len(groups))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")

    def configure_model(self) -> None:
        """FSDP2: shard each decoder layer, then the root (ModelParallelStrategy); activation checkpointing per layer
        on request. The adapter is a forward argument of each layer, so recomputation uses the right one."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from ..distributed import checkpoint_layers, shard_backbone

        if getattr(self, "_configured", False):
            return
        self._configured = True
        ac = self.cfg.trainer.activation_checkpointing
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            param_dtype = torch.bfloat16 if self.cfg.trainer.precision.startswith("bf16") else None
            shard_backbone(self.model, self.device_mesh["data_parallel"], param_dtype=param_dtype,
                           activation_checkpointing=ac)
        elif ac:
            checkpoint_layers(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The model's config travels in the checkpoint, so `python -m mplus_lightning.export` needs nothing else."""
        checkpoint["mplus_config"] = self.model.config.to_dict()

    def count_samples(self, n: int) -> None:
        """Advance the data position (saved in checkpoints) in the training step, not in on_train_batch_end:
        ModelCheckpoint saves in its own on_train_batch_end, which Lightning calls before the module's."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "samples_consumed"):
            dm.samples_consumed += n

    def _start_clock(self) -> None:
        if getattr(self, "_t0", None) is None:
            self._t0 = time.perf_counter()

    def _lap(self) -> float:
        """Seconds since the previous step ended (for train/tokens_per_s)."""
        now = time.perf_counter()
        elapsed, self._t0 = now - self._t0, now
        return elapsed

    def _agree_max(self, value: int) -> int:
        """The largest `value` over all ranks (1 process: `value`)."""
        return max_over_ranks(value, self.device)

    def stop_if_not_finite(self, loss: torch.Tensor, what: str) -> None:
        """Every rank stops together on a non-finite loss, with the step and what was being trained."""
        if self._agree_max(int(not torch.isfinite(loss))):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()} on rank {self.global_rank}) at step {self.global_step} "
                f"({what}): stopping. Nothing was saved after the last good checkpoint; resume from it with a lower "
                "learning rate (optim.lr) or check the data.")


class MemoryTrainingModule(TrainingRecipe, L.LightningModule):
    """Shared Lightning shell of the three memory stages; the step itself is `self.memory_step` (a `MemoryStep`).
    Subclasses only check their stage's requirements."""

    stage = "stage1"

    def __init__(self, cfg: RunConfig, instruction_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.check_stage(cfg)
        self.model: MPlus = build_model(cfg)
        self.memory_step = MemoryStep(self.model, cfg.step, decisions=self._decisions(rank=0),
                                      instruction_ids=instruction_ids or [], agree_max=self._agree_max)

    def _decisions(self, rank: int) -> Decisions:
        return Decisions(self.cfg.step, self.cfg.trainer.seed, rank,
                         per_layer_evictions=self.model.config.drop_memory_per_layer)

    @property
    def memory(self) -> MemoryState | None:
        """This rank's training memory (`memory_step.memory`; exported at the end of a run)."""
        return self.memory_step.memory

    @memory.setter
    def memory(self, memory: MemoryState | None) -> None:
        self.memory_step.memory = memory

    @property
    def memory_dtype(self) -> torch.dtype:
        """bf16 under bf16 precisions (the official pool and long-term memory were bf16: ~40 GB per rank at 8B size
        instead of 80), else the weights' dtype."""
        return torch.bfloat16 if self.cfg.trainer.precision.startswith("bf16") else self.model.dtype

    # ---- memory lifecycle ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.memory_step.decisions = self._decisions(rank)

    def on_fit_start(self) -> None:
        if self.memory is None:
            self.memory = initial_memory(self.cfg, self.model, seed=self.cfg.trainer.seed + self.global_rank)
        self.memory_step.to(self.device, self.memory_dtype)

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def training_step(self, sample, batch_idx):
        self._start_clock()
        result = self.memory_step.step(sample, self.global_step)
        self.stop_if_not_finite(result.loss, f"{result.kind} step, document {sample.doc_id}")
        self.count_samples(1)
        elapsed = self._lap()
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        self.log("train/loss", result.loss, prog_bar=True, **log)
        self.log("train/lm_loss", result.lm_loss, **log)
        self.log(f"train/lm_loss_{result.kind}", result.lm_loss, **log)
        self.log("train/tokens_per_s", result.tokens / max(elapsed, 1e-9), prog_bar=True, **log)
        for k, v in result.metrics.items():
            self.log(f"train/{k}", float(v), **log)
        if self.memory.ltm is not None:
            self.log("ltm/size", float(len(self.memory.ltm)), **log)
        return result.loss

    def validation_step(self, sample, batch_idx):
        """Held-out LM loss and next-token accuracy of the target after injecting its contexts into a *copy* of the
        training memory (the official code injected into the live one)."""
        loss, accuracy = self.memory_step.validate(sample, self.global_step)
        self.log("val/loss", loss, batch_size=1, sync_dist=True)
        self.log("val/token_acc", accuracy, batch_size=1, sync_dist=True)

    # ---- per-rank state in checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict:
        return {**self.memory_step.state_dict(), "torch_rng": torch.get_rng_state(),
                "world_size": self.trainer.world_size}

    def save_rank_state(self, path: Path) -> None:
        save_rank_state(path, self.rank_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Load this rank's memory and step state from beside the checkpoint.

        Another world size than at save time: new rank r continues the state of saved rank r % saved_world_size
        (memories are duplicated when growing, the surplus ones dropped when shrinking), and the log says so.
        """
        ckpt_path = self.trainer.ckpt_path if self._trainer is not None else None
        if ckpt_path is None:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        saved = sorted(Path(str(ckpt_path)).parent.glob(Path(str(ckpt_path)).name + ".rank*.state"))
        if not saved:
            raise FileNotFoundError(
                f"no memory state beside {ckpt_path}: every rank's memory is saved as "
                f"<ckpt>{RANK_STATE_SUFFIX.format(rank='<r>')}; was this checkpoint written by mplus_lightning?")
        source = rank % len(saved)
        if len(saved) != world:
            log.warning("resuming a checkpoint saved by %d ranks on %d ranks: rank %d continues the memory and "
                        "step state of saved rank %d", len(saved), world, rank, source)
        path = rank_state_path(ckpt_path, source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (found {[p.name for p in saved]})")
        # Applied now: Lightning calls this hook after on_fit_start when the strategy restores after setup (FSDP2).
        state = load_rank_state(path)
        self.memory_step.load_state_dict(state, device=self.device, memory_dtype=self.memory_dtype)
        torch.set_rng_state(state["torch_rng"])

"""The LightningModules' shared parts: the training recipe (optimizer, schedule, sharding, non-finite stop) and the
memory stages' module, a thin Lightning shell around `MemoryStep` (stages/step.py, plain torch), which owns each rank's
memory and runs the step.

Where we differ from the official recipe: full-context steps step the scheduler too (the official code skipped the
scheduler on them), and the learning rate does not scale with the GPU count (the official code multiplied it by the
GPUs of a node; the shipped configs state the effective rates it trained at on 8 GPUs).
Each rank's memory and step state is saved with every checkpoint (a checkpoint unit, checkpointing.py); the official
code saved weights only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from .. import checkpointing as ck
from ..checkpointing import CheckpointError, NonFiniteError
from ..config import RunConfig
from ..model import MemoryState, MPlus
from .build import build_model, initial_memory
from .step import Decisions, MemoryStep, max_over_ranks

log = logging.getLogger(__name__)

SELECTOR_PARAMETERS = ("query_proj", "key_proj")
"""The selector group holds every trainable parameter whose name contains one of these (the retrievers' query, key
and encoder-query projectors), as the official code grouped them; the main group holds the rest."""


def is_selector_parameter(name: str) -> bool:
    return any(part in name for part in SELECTOR_PARAMETERS)


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
        """AdamW over the groups main (optim.lr) and selector (optim.selector_lr, when the retriever trains), both at
        the configured rates, unscaled; the schedule multiplies both (`config.learning_rates` says it in words)."""
        o = self.cfg.optim
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        main = [p for n, p in trainable if not is_selector_parameter(n)]
        selector = [p for n, p in trainable if is_selector_parameter(n)]
        groups = [{"params": main, "lr": o.lr, "name": "main"}]
        if selector:
            groups.append({"params": selector, "lr": o.selector_lr, "name": "selector"})
        opt = torch.optim.AdamW(groups, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=1e-8)
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

    def on_train_start(self) -> None:
        """A learning rate changed in the config since the checkpoint takes effect (Lightning restores the saved
        optimizer and scheduler, rates included, just before this hook)."""
        o = self.cfg.optim
        wanted = {"main": (o.lr, "optim.lr"), "selector": (o.selector_lr, "optim.selector_lr")}
        configs = self.trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        for i, group in enumerate(self.trainer.optimizers[0].param_groups):
            if group.get("name") not in wanted:
                continue
            new, key = wanted[group["name"]]
            old = group.get("initial_lr", group["lr"])
            if old == new:
                continue
            log.warning("learning rate changed on resume: %s %g -> %g", key, old, new)
            if scheduler is None:
                group["lr"] = new
                continue
            group["initial_lr"] = scheduler.base_lrs[i] = new
            group["lr"] = new * scheduler.lr_lambdas[i](scheduler.last_epoch)

    def count_samples(self, n: int) -> None:
        """Advance the data position (saved in checkpoints) in the training step, not in on_train_batch_end: the
        checkpoint callback saves in its own on_train_batch_end, which Lightning calls before the module's."""
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
            raise NonFiniteError(
                f"non-finite training loss ({loss.item()} on rank {self.global_rank}) at step {self.global_step} "
                f"({what}): stopping.", self.global_step)


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
        self.log("train/tokens_per_s", result.tokens / max(elapsed, 1e-9), prog_bar=True, **log)
        if self.memory.ltm is not None:
            self.log("ltm/size", float(len(self.memory.ltm)), **log)
        self.log_this_step_only({f"train/lm_loss_{result.kind}": result.lm_loss.detach(),
                                 **{f"train/{k}": v for k, v in result.metrics.items()}})
        return result.loss

    def log_this_step_only(self, metrics: dict[str, Any]) -> None:
        """Write metrics that only some step kinds have straight to the loggers, at the steps Lightning writes its own
        (rank 0): `self.log` would repeat a key's last value at every later step, as Lightning keeps each logged key
        until the epoch ends and the memory stages run one endless epoch."""
        trainer = self._trainer
        if trainer is None or trainer.global_rank != 0 or (self.global_step + 1) % trainer.log_every_n_steps:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=self.global_step)

    def validation_step(self, sample, batch_idx):
        """Held-out LM loss and next-token accuracy of the target after injecting its contexts into a *copy* of the
        training memory (the official code injected into the live one)."""
        loss, accuracy = self.memory_step.validate(sample, self.global_step)
        self.log("val/loss", loss, batch_size=1, sync_dist=True)
        self.log("val/token_acc", accuracy, batch_size=1, sync_dist=True)

    # ---- per-rank state in checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """What this rank saves with each checkpoint (checkpointing.write_rank_state)."""
        return {**self.memory_step.state_dict(), "torch_rng": torch.get_rng_state(),
                "world_size": self.trainer.world_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Load this rank's memory and step state from the checkpoint unit being resumed (its files were verified
        against the manifest before the run started).

        Another world size than at save time: new rank r continues the state of saved rank r % saved_world_size
        (memories are duplicated when growing, the surplus ones dropped when shrinking), and the log says so.
        """
        ckpt_path = self.trainer.ckpt_path if self._trainer is not None else None
        if ckpt_path is None:
            return
        unit = ck.unit_containing(ckpt_path)
        if unit is None:
            raise CheckpointError(f"{ckpt_path} is not inside a checkpoint folder of mplus_lightning.fit "
                                  f"(checkpoints/step=N/ with {ck.MANIFEST}): resume with resume=<that folder>")
        saved = ck.read_manifest(unit)["ranks"]
        if not saved:
            raise CheckpointError(f"{unit.path} holds no memory state (a stage pretrain checkpoint): start stage "
                                  f"{self.stage} from its run's export with init_from=, not with resume")
        rank, world = self.trainer.global_rank, self.trainer.world_size
        source = rank % saved
        if saved != world:
            log.warning("resuming a checkpoint saved by %d ranks on %d ranks: rank %d continues the memory and "
                        "step state of saved rank %d", saved, world, rank, source)
        # Applied now: Lightning calls this hook after on_fit_start when the strategy restores after setup (FSDP2).
        path = unit.rank_state(source)
        state = ck.read_rank_state(path)
        ck.check_same_save(checkpoint.get(ck.UNIT_KEY), state.get("unit"), unit.model, path)
        self.memory_step.load_state_dict(state, device=self.device, memory_dtype=self.memory_dtype)
        torch.set_rng_state(state["torch_rng"])

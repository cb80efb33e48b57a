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
from typing import Any

import lightning as L
import torch

from .. import checkpointing as ck
from ..checkpointing import CheckpointError, NonFiniteError
from ..config import ConfigError, RunConfig
from ..model import MemoryState, MPlus
from ..progress import TrainingCurves
from .build import build_model, initial_memory
from .step import Decisions, MemoryStep, max_over_ranks, summed_over_ranks

log = logging.getLogger(__name__)

SELECTOR_PARAMETERS = ("query_proj", "key_proj")
"""The selector group holds every trainable parameter whose name contains one of these (the retrievers' query, key
and encoder-query projectors), as the official code grouped them; the main group holds the rest."""


def gradient_norm(parameters) -> float:
    """Total 2-norm of the gradients of `parameters` (sharded gradients: over all shards, a collective)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):   # FSDP2: a DTensor holding this rank's partial norm
        norm = norm.full_tensor()
    return float(norm)


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
            raise ConfigError(f"stage: {type(self).__name__} trains stage={self.stage}, the config says "
                              f"stage={cfg.stage}")

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
        self.save_curves(checkpoint)

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

    @property
    def curves(self) -> TrainingCurves:
        """The scalars of the current logging interval (written by `on_before_optimizer_step`)."""
        if getattr(self, "_curves", None) is None:
            self._curves = TrainingCurves()
        return self._curves

    def record_step(self, tokens: int, samples: int, values: dict[str, Any]) -> None:
        """Add one step's scalars to the logging interval; the loss also goes to the progress bar and callbacks (not
        to the loggers: Lightning would write its latest value instead of the interval's mean)."""
        self.curves.add(tokens, samples, {k: float(v) for k, v in values.items()})
        for key in ("train/loss", "train/lm_loss"):
            if key in values:
                self.log(key, float(values[key]), prog_bar=key == "train/loss", logger=False, on_step=True,
                         on_epoch=False, batch_size=max(1, samples))

    def is_logging_step(self) -> bool:
        trainer = self._trainer
        return trainer is not None and (self.global_step + 1) % max(1, trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        """At each logging step: the gradient norm before clipping and the interval's scalars (every rank computes,
        as sharded gradients and token counts need all of them; rank 0 writes)."""
        if not self.is_logging_step():
            return
        values = {**self.flush_curves(), "train/grad_norm": gradient_norm(self.parameters())}
        self.write_metrics(values, self.global_step)

    def on_train_end(self) -> None:
        """The last, partial interval of a run whose length is no multiple of the logging interval."""
        if self.curves.counts:
            self.write_metrics(self.flush_curves(), max(0, self.global_step - 1))

    def flush_curves(self) -> dict[str, float]:
        def counts_over_ranks(counts: list[int]) -> list[int]:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return counts
            t = torch.tensor(counts, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            return [int(x) for x in t.tolist()]

        values = self.curves.flush(counts_over_ranks)
        self.last_logged = values
        return values

    def write_metrics(self, values: dict[str, float], step: int) -> None:
        trainer = self._trainer
        if trainer is None or trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def save_curves(self, checkpoint: dict) -> None:
        checkpoint["training_curves"] = self.curves.state_dict()

    def restore_curves(self, checkpoint: dict) -> None:
        """Cumulative tokens and samples continue on resume (checkpoints from before they existed start at 0)."""
        if "training_curves" in checkpoint:
            self.curves.load_state_dict(checkpoint["training_curves"])

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
        result = self.memory_step.step(sample, self.global_step)
        self.stop_if_not_finite(result.loss, f"{result.kind} step, document {sample.doc_id}")
        self.count_samples(1)
        lm_loss = result.lm_loss.detach()
        self.record_step(result.tokens, 1, {"train/loss": result.loss.detach(), "train/lm_loss": lm_loss,
                                            f"train/lm_loss_{result.kind}": lm_loss,
                                            **{f"train/{k}": v for k, v in result.metrics.items()}})
        if self.memory.ltm is not None:
            self.log("ltm/size", float(len(self.memory.ltm)), on_step=True, on_epoch=False, batch_size=1)
        return result.loss

    def validation_step(self, sample, batch_idx):
        """Held-out LM loss and next-token accuracy of the target after injecting its contexts into a *copy* of the
        training memory (the official code injected into the live one)."""
        loss, accuracy = self.memory_step.validate(sample, self.global_step)
        self.log("val/loss", loss, batch_size=1, sync_dist=True)
        self.log("val/token_acc", accuracy, batch_size=1, sync_dist=True)
        if sample.val_source:
            sums = self.val_sums.setdefault(sample.val_source, [0.0, 0.0, 0.0])
            sums[0], sums[1], sums[2] = sums[0] + float(loss), sums[1] + float(accuracy), sums[2] + 1

    def on_validation_epoch_start(self) -> None:
        self.val_sums: dict[str, list[float]] = {}   # val_source -> [sum of losses, sum of accuracies, samples]

    def on_validation_epoch_end(self) -> None:
        """`val/<source>/loss` and `val/<source>/token_acc`: means over that source's samples of all ranks. Summed over
        ranks here, not by `self.log(sync_dist=True)` in the step: a rank whose share of the validation set lacks a
        source would skip that key's collective, and the ranks' collectives would fall out of step."""
        for source, (loss, accuracy, count) in summed_over_ranks(self.val_sums).items():
            # the same values on every rank: sync_dist only keeps Lightning from warning about unsynced epoch values
            self.log(f"val/{source}/loss", loss / count, sync_dist=True)
            self.log(f"val/{source}/token_acc", accuracy / count, sync_dist=True)

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
        self.restore_curves(checkpoint)
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

"""Evaluation as a Lightning workload: the Trainer's `predict` runs one item per step, sharded over ranks.

`run_workload(cfg, module, datamodule)` builds a Trainer from the config's `device`, `devices` and `num_nodes` (or
from the launcher: torchrun, SLURM's srun) and calls `trainer.predict`. Each rank evaluates its share of the items
with its own copy of the model, each item from a fresh copy of the checkpoint's memory, and appends its records to
its own result file. At the end rank 0 folds the ranks' files into items.jsonl, sorted by the items' order, and writes
results.json, the plot and TensorBoard; every rank returns the same summary. The per-item records do not depend on
the number of ranks (evictions are seeded per item), so neither do the outputs.

Resume: rank 0 opens the output directory first (`RunDir.create`: manifest checks, a line cut off mid-write dropped,
part files of an interrupted multi-rank run folded in); then every rank reads the finished records and leaves those
items out before the remaining ones are divided among the ranks (`EvalDataModule.todo`).

A task is an `EvalModule` subclass: `key_columns` (the item columns its records are keyed by), `todo` (what is
left to do for an item), `evaluate` (the records of one item, yielded as each is finished), `order` (where a record
goes in items.jsonl) and `summarize` (results.json and the other outputs, on rank 0).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from ..data.eval_sets.datamodules import EvalDataModule
from ..model.memory import MemoryState
from ..model.mplus import MPlus
from ..typed_config import ConfigError
from .io import ResultStore
from .runtime import EvalInputError, RunDir, load_checkpoint, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

RANK_WAIT = timedelta(hours=12)
"""How long a rank that finished its share waits for the others at the end (items differ in length)."""


def launcher_processes() -> tuple[int, int] | None:
    """(processes per node, nodes) started by an external launcher (torchrun, SLURM's srun), or None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        return per_node, int(os.environ["WORLD_SIZE"]) // per_node
    if SLURMEnvironment.detect():
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
        return int(os.environ["SLURM_NTASKS"]) // nodes, nodes
    return None


def build_trainer(cfg, device: torch.device | None = None) -> Trainer:
    """A Trainer for `predict`: one process per device (`cfg.devices` x `cfg.num_nodes`, default: the launcher's),
    DDP's process group for the gathering at the end (the model is not wrapped: nothing is trained), no logger or
    checkpoints (the evaluation writes its own outputs)."""
    device = device if device is not None else resolve_device(cfg.device)
    launched = launcher_processes()
    devices = cfg.devices if cfg.devices is not None else launched[0] if launched else 1
    num_nodes = cfg.num_nodes if cfg.num_nodes is not None else launched[1] if launched else 1
    if devices < 1 or num_nodes < 1:
        raise EvalInputError(f"devices and num_nodes must be >= 1, got devices={devices}, num_nodes={num_nodes}")
    if device.index is not None and devices * num_nodes > 1:
        raise EvalInputError(f"device={cfg.device} names one GPU but devices={devices}, num_nodes={num_nodes}: use "
                             "device=cuda (each process takes the GPU of its local rank)")
    world = devices * num_nodes
    if world > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy: Any = DDPStrategy(timeout=RANK_WAIT)
    else:
        strategy = "auto"
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)                    # the accelerator summary and a logger advertisement
    try:
        return Trainer(accelerator="gpu" if device.type == "cuda" else "cpu",
                       devices=[device.index] if device.index is not None else devices, num_nodes=num_nodes,
                       strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
                       enable_progress_bar=bool(cfg.progress), use_distributed_sampler=False, inference_mode=False)
    finally:
        quiet.setLevel(level)


@dataclass
class Loaded:
    """The model, the checkpoint's memory and the tokenizer of a run: state beside the LightningModule, not part of
    it, so that Lightning neither broadcasts nor moves the weights (every rank loads its own copy on its device)."""

    model: MPlus | None = None
    memory: MemoryState | None = None
    tokenizer: Any = None


class EvalModule(LightningModule):
    """One item per `predict_step`, its records appended to this rank's result file as each is finished."""

    key_columns: tuple[str, ...] = ("id",)

    def __init__(self, cfg, run: RunDir, *, model: MPlus | None = None, memory: MemoryState | None = None,
                 tokenizer: Any = None):
        super().__init__()
        self.cfg, self.run = cfg, run
        self.loaded = Loaded(model, memory, tokenizer)
        self.out: ResultStore | None = None
        self.num_items = self.num_todo = 0
        self.positions: dict[tuple, int] = {}

    # ---- the task's part ----------------------------------------------------------------------------------------
    def todo(self, key: tuple, done: ResultStore) -> list:
        """What is still to do for the item with these `key_columns` values (empty: it is finished)."""
        raise NotImplementedError

    def evaluate(self, item: dict, todo: list) -> Iterator[dict]:
        """The records of one item (those in `todo`), each yielded as soon as it is finished."""
        raise NotImplementedError

    def order(self, record: dict) -> tuple:
        """Sort key of a record in items.jsonl."""
        raise NotImplementedError

    def summarize(self) -> dict:
        """(rank 0, all records in `self.run.store`) Write results.json and the other outputs; return the summary."""
        raise NotImplementedError

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    @property
    def model(self) -> MPlus:
        return self.loaded.model

    @property
    def memory(self) -> MemoryState:
        return self.loaded.memory

    def setup(self, stage: str) -> None:
        trainer, strategy = self.trainer, self.trainer.strategy
        failure = None
        if trainer.is_global_zero:
            try:
                self.run.create()
            except (ConfigError, OSError) as e:   # every rank raises it: none is left waiting
                failure = e
        failure = strategy.broadcast(failure, src=0)
        if failure is not None:
            raise failure
        # rank 0 has repaired items.jsonl; the others read it before anyone appends (Lightning's post-setup barrier)
        done = self.run.store if trainer.is_global_zero else self.run.results()
        self.out = done if trainer.is_global_zero else ResultStore(self.run.part_file(trainer.global_rank),
                                                                   self.run.key_fields)
        datamodule: EvalDataModule = trainer.datamodule
        datamodule.setup()
        self._todo = {}
        self.positions = {}
        for position, key in enumerate(datamodule.keys(self.key_columns)):
            self.positions[key] = position
            left = self.todo(key, done)
            if left:
                self._todo[position] = left
        datamodule.todo = list(self._todo)
        self.num_items, self.num_todo = len(datamodule.items), len(self._todo)
        mine = len(datamodule.shard(trainer.global_rank, trainer.world_size))
        if trainer.world_size > 1:
            log.info("rank %d of %d: %d of the %d items still to evaluate", trainer.global_rank, trainer.world_size,
                     mine, self.num_todo)
        if self.loaded.model is None and mine:             # a rank without items never needs the weights
            device = strategy.root_device
            self.loaded.model, self.loaded.memory = load_checkpoint(self.cfg.model, device,
                                                                    resolve_dtype(self.cfg.dtype, device))

    def position(self, key: tuple) -> int:
        """An item's place in the item list (after all items for records of items no longer in it)."""
        return self.positions.get(key, len(self.positions))

    def predict_step(self, item: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> None:
        for record in self.evaluate(item, self._todo[item["position"]]):
            self.out.add(record)

    def finish(self) -> dict:
        """(every rank, after `predict`) Rank 0 folds the ranks' results into items.jsonl, in order, and summarizes;
        every rank returns the summary."""
        strategy = self.trainer.strategy
        strategy.barrier()
        summary = failure = None
        if self.trainer.is_global_zero:
            try:
                self.run.merge_parts()
                self.run.store.sort(self.order)
                summary = self.summarize()
            except Exception as e:  # noqa: BLE001 -- handed to every rank, which all raise it
                failure = e
        summary, failure = strategy.broadcast((summary, failure), src=0)
        if failure is not None:
            raise failure
        return summary


def run_workload(cfg, module: EvalModule, datamodule: EvalDataModule, device: torch.device | None = None) -> dict:
    """Evaluate every item of `datamodule` still to do with `module` through `trainer.predict`; the summary."""
    trainer = build_trainer(cfg, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
        warnings.filterwarnings("ignore", message="predict returned None")   # the records go to files instead
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")   # Lightning vs torch
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return module.finish()


def unique_labels(paths: Sequence[str]) -> list[str]:
    """Short names of model directories: the last path component, or as many trailing ones as tell them apart
    (`runs/stage1/export`, `runs/stage2/export` -> `stage1/export`, `stage2/export`)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for n in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate(labels)]

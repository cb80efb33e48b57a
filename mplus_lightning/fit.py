"""Train one stage: `mplus-fit --config experiments/X.yaml [key=value ...]` (or `python -m mplus_lightning.fit`).

Precedence: config defaults <- the YAML file <- key=value overrides (e.g. `trainer.max_steps=100 optim.lr=1e-5`).
`--print-config` prints the resolved config (each key under a comment saying what it does) and exits; `--describe
[GROUP]` lists every key with its type, default and meaning. Outputs go to <run_dir>/<name>/:
  config.yaml         the resolved config
  checkpoints/        Lightning checkpoints (+ each rank's memory beside them); last.ckpt is the newest
  tensorboard/        TensorBoard logs (`tensorboard --logdir <run_dir>`)
  export/             at the end: a self-contained model directory (MPlus.from_pretrained), rank 0's memory
Resume exactly with `resume=last` (or resume=<path to a .ckpt>).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from . import config as config_lib
from .config import ConfigError, RunConfig
from .stages import module_for
from .stages.base import rank_state_path

log = logging.getLogger("mplus_lightning.fit")

# data.kind -> "module:Class"; each takes data.params as keyword arguments.
DATAMODULES = {
    "synthetic": "mplus_lightning.data.stream:SyntheticDataModule",
    "fineweb": "mplus_lightning.data.fineweb:FineWebDataModule",
    "slimpajama": "mplus_lightning.data.slimpajama:SlimPajamaDataModule",
    "mixture": "mplus_lightning.data.mixture:MixtureDataModule",
    "facts": "mplus_lightning.data.facts:FactsDataModule",
}


class MemoryCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes each rank's memory and step state beside the checkpoint (they differ per
    rank and can be tens of GB, so they are not gathered into rank 0's file)."""

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        if trainer.lightning_module.memory is not None:   # stage pretrain has none
            trainer.lightning_module.save_rank_state(rank_state_path(filepath, trainer.global_rank))
        trainer.strategy.barrier("rank_state_saved")

    def _remove_checkpoint(self, trainer, filepath):
        super()._remove_checkpoint(trainer, filepath)
        rank_state_path(filepath, trainer.global_rank).unlink(missing_ok=True)


def build_datamodule(cfg: RunConfig):
    if cfg.data.kind not in DATAMODULES:
        raise ConfigError(f"data.kind: {cfg.data.kind!r} is not one of {sorted(DATAMODULES)}")
    module_name, cls_name = DATAMODULES[cfg.data.kind].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    required = [n for n, p in inspect.signature(cls).parameters.items()
                if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unset = [n for n in required if cfg.data.params.get(n) is None]
    if unset:
        raise ConfigError(", ".join(f"data.params.{n}" for n in unset) + f" must be set for data.kind={cfg.data.kind}"
                          " (local paths; data/README.md describes each dataset's layout)")
    try:
        return cls(**cfg.data.params)
    except TypeError as e:
        raise ConfigError(f"data.params for data.kind={cfg.data.kind}: {e}") from None


def check_layout(cfg: RunConfig, datamodule) -> None:
    """Stage pretrain takes batches of in-context sequences; the memory stages take one sample at a time."""
    in_context = bool(getattr(datamodule, "in_context", False))
    if cfg.stage == "pretrain" and not in_context:
        raise ConfigError(f"stage pretrain trains the plain Llama on batches of in-context text: data.kind="
                          f"{cfg.data.kind} has no such layout (use data.kind=facts with "
                          "data.params.layout=in_context)")
    if cfg.stage != "pretrain" and in_context:
        raise ConfigError(f"stage {cfg.stage} injects facts into memory: set data.params.layout=memory (in_context "
                          "is for stage pretrain)")


def instruction_ids(cfg: RunConfig, datamodule) -> list[int]:
    """The repeat task's instruction in token ids: the data's tokenizer, or for tokenizer-less synthetic data a
    fixed byte mapping into the non-special ids (any fixed sequence serves as an instruction there)."""
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        from .data.tokenizer import encode
        ids = encode(tokenizer, cfg.data.instruction)
    else:
        first = getattr(datamodule, "first_token_id", 3)
        vocab = getattr(datamodule, "model_vocab_size", None) or cfg.model.llama.get("vocab_size", 256)
        ids = [first + b % (vocab - first) for b in cfg.data.instruction.encode()]
    if not ids:
        raise ConfigError(f"data.instruction {cfg.data.instruction!r} encodes to no tokens")
    return ids


def resolve_resume(cfg: RunConfig) -> str | None:
    if cfg.resume is None:
        return None
    path = cfg.out_dir / "checkpoints" / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={cfg.resume}: {path} does not exist (checkpoints of this run are in "
                                f"{cfg.out_dir / 'checkpoints'})")
    return str(path)


def build_trainer(cfg: RunConfig, callbacks: list | None = None) -> L.Trainer:
    from .distributed import build_strategy

    t = cfg.trainer
    out = cfg.out_dir
    checkpoint = MemoryCheckpoint(dirpath=out / "checkpoints", filename="step={step:09d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.ckpt_every_n_steps,
                                  save_last=True, save_top_k=t.keep_checkpoints, monitor="step", mode="max")
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=build_strategy(cfg), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None, limit_val_batches=t.val_batches,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.progress_bar,
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), *(callbacks or [])],
        enable_model_summary=False, deterministic=False, use_distributed_sampler=False,
    )


def run(cfg: RunConfig, callbacks: list | None = None) -> L.Trainer:
    """Train one stage and export it to <out_dir>/export; `callbacks` are added to the Trainer's own."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    ckpt_path = resolve_resume(cfg)
    datamodule = build_datamodule(cfg)
    check_layout(cfg, datamodule)
    module = module_for(cfg.stage)(cfg, instruction_ids(cfg, datamodule))
    trainer = build_trainer(cfg, callbacks)
    if trainer.global_rank == 0:
        config_lib.save(cfg, cfg.out_dir / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    export(trainer, module, cfg.out_dir / "export")
    return trainer


def export(trainer: L.Trainer, module, out_dir: Path) -> None:
    """The run's result as a self-contained model directory (rank 0's memory)."""
    from .distributed import full_state_dict

    state = full_state_dict(trainer, module.model)
    if trainer.global_rank == 0:
        from .model.formats import save_model_state
        save_model_state(module.model.config, state, out_dir, module.memory)
        log.info("exported %s", out_dir)
    trainer.strategy.barrier("export")


def build_parser() -> argparse.ArgumentParser:
    epilog = ("config groups and top-level keys (`--describe GROUP` prints each key of one with its type, default "
              "and meaning;\n`--describe` all of them):\n" + config_lib.groups_help())
    parser = argparse.ArgumentParser(prog="mplus-fit", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (see experiments/); required unless --describe")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML, each key under its docstring, and exit")
    parser.add_argument("--describe", nargs="?", const="", metavar="GROUP",
                        help="print every config key (or those of GROUP: model, data, step, optim, trainer, or one "
                             "key such as optim.lr) with its type, default and meaning, and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.describe is not None:
        try:
            print(config_lib.describe_fields(args.describe or None), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.config is None:
        parser.error("--config is required (a YAML file such as experiments/stage1.yaml)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

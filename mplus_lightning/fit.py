"""Train one stage: `mplus-fit --config experiments/X.yaml [key=value ...]` (or `python -m mplus_lightning.fit`).

Precedence: config defaults <- the YAML file <- key=value overrides (e.g. `trainer.max_steps=100 optim.lr=1e-5`).
`--print-config` prints the resolved config (each key under a comment saying what it does) and exits; `--describe
[GROUP]` lists every key with its type, default and meaning. Outputs go to <run_dir>/<name>/:
  config.yaml         the resolved config
  checkpoints/        one folder per checkpoint, step=N/: Lightning's checkpoint (a frozen backbone named, not
                      stored), each rank's memory, a manifest
  tensorboard/        TensorBoard logs (`tensorboard --logdir <run_dir>`)
  export/             at the end: a self-contained model directory (MPlus.from_pretrained), rank 0's memory and
                      the data's tokenizer
Resume exactly with `resume=last` (the newest complete checkpoint) or resume=<checkpoint folder>. A run folder that
already holds a run is refused unless `resume` or `overwrite=true` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from . import checkpointing as ck, config as config_lib, progress
from .checkpointing import CheckpointError, NonFiniteError
from .config import DATAMODULES, ConfigError, RunConfig  # noqa: F401 (DATAMODULES: the data kinds, re-exported)
from .model.tensor_files import DamagedFileError
from .stages import module_for
from .stages.build import built_config
from .stages.step import max_over_ranks
from .typed_config import show_traceback

log = logging.getLogger("mplus_lightning.fit")


class CheckpointUnits(Checkpoint):
    """Every `every` steps, one checkpoint unit (checkpointing.py): Lightning's checkpoint plus each rank's memory and
    step state (they differ per rank and can be tens of GB, so they are not gathered into rank 0's file), committed
    by a manifest; then the oldest units beyond `keep` are pruned. Non-finite weights, optimizer moments or memory
    are never saved: the run stops instead."""

    def __init__(self, directory: Path, every: int, keep: int):
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.last_saved_step = -1
        self._saving: dict | None = None   # {step, id} of the save in progress: also written into Lightning's file

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_saved_step = trainer.global_step   # a resumed run does not save the step it resumed from again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every >= 1 and step % self.every == 0 and step != self.last_saved_step and not trainer.sanity_checking:
            self.save(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._saving is not None:
            checkpoint[ck.UNIT_KEY] = dict(self._saving)

    def save(self, trainer: L.Trainer, module) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        bad = ck.first_non_finite(training_tensors(module, trainer.optimizers))
        if max_over_ranks(int(bad is not None), module.device):
            raise NonFiniteError(f"non-finite values after step {step - 1} ({bad or 'on another rank'}, rank {rank}): "
                                 f"the checkpoint of step {step} was not written.", step)
        unit = {"step": step, "id": trainer.strategy.broadcast(ck.new_unit_id())}
        tmp = self.directory / (ck.unit_name(step) + ck.TMP)
        if rank == 0:
            ck.begin_unit(self.directory, step)
        trainer.strategy.barrier("checkpoint_unit_begun")
        self._saving = unit
        try:
            trainer.save_checkpoint(tmp / ck.MODEL)
        finally:
            self._saving = None
        ck.after_phase("model", tmp)
        has_rank_state = hasattr(module, "rank_state")   # stage pretrain has no memory
        if has_rank_state:
            ck.write_rank_state(tmp / ck.rank_state_name(rank), {**module.rank_state(), "unit": unit})
        ck.after_phase("rank_state", tmp)
        trainer.strategy.barrier("rank_states_written")
        digests = gather_dicts(ck.file_digests(tmp, rank))
        if rank == 0:
            ck.commit_unit(tmp, step, unit["id"], trainer.world_size if has_rank_state else 0, digests)
            ck.prune(self.directory, self.keep)
        trainer.strategy.barrier("checkpoint_unit_committed")
        self.last_saved_step = step


class FrozenBackboneIO(TorchCheckpointIO):
    """Writes and reads model.ckpt (non-sharded strategies): a frozen backbone (`checkpointing.FrozenBackbone`) is
    left out on saving and put back from the rebuilt model on loading, once its fingerprint matches."""

    def __init__(self, frozen: ck.FrozenBackbone | None):
        self.frozen = frozen

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if self.frozen is not None:
            checkpoint = self.frozen.strip(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return ck.restore_frozen_backbone(checkpoint, self.frozen, path)


def gather_dicts(part: dict) -> dict:
    """The union of every rank's `part` (1 process: `part`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return part
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def training_tensors(module, optimizers) -> list[tuple[str, torch.Tensor]]:
    """Everything a checkpoint saves that training can make non-finite: parameters, optimizer moments, memory rows."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = [(f"parameter {n}", p) for n, p in module.named_parameters()]
    for opt in optimizers:
        for p, state in opt.state.items():
            out += [(f"optimizer {k} of {names.get(id(p), '?')}", v) for k, v in state.items()
                    if isinstance(v, torch.Tensor)]
    memory = getattr(module, "memory", None)
    if memory is not None:
        out.append(("memory rows", memory.rows))
        if memory.ltm is not None:
            out += [("long-term memory rows", memory.ltm.rows[:, : len(memory.ltm)]),
                    ("long-term memory keys", memory.ltm.keys[:, : len(memory.ltm)])]
    return out


def build_datamodule(cfg: RunConfig):
    """The DataModule of data.kind with data.params (typed and resolved when the config loaded)."""
    cls = config_lib.datamodule_class(cfg.data.kind)
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


RUN_OUTPUTS = ("checkpoints", "tensorboard", "export")
"""What a run writes into its folder (besides config.yaml): a folder holding any of them holds a run."""


def previous_run(out_dir: Path) -> list[str]:
    """The outputs of an earlier run in `out_dir` (empty: nothing to lose)."""
    return [name for name in RUN_OUTPUTS if (out_dir / name).is_dir() and any((out_dir / name).iterdir())]


def resume_unit(cfg: RunConfig) -> ck.Unit:
    """The checkpoint unit `resume` names: `last` is the newest complete one of this run folder (wherever the folder
    now is); a path may be relative to the working directory or to the run folder."""
    ckpts = cfg.out_dir / "checkpoints"
    if cfg.resume == "last":
        units = ck.list_units(ckpts)
        if not units:
            raise CheckpointError(f"resume=last: {ckpts} holds no complete checkpoint (a run saves one every "
                                  "trainer.ckpt_every_n_steps); start without resume")
        return units[-1]
    path = Path(cfg.resume)
    if not path.exists() and not path.is_absolute() and (cfg.out_dir / path).exists():
        path = cfg.out_dir / path
    return ck.find_unit(path, f"resume={cfg.resume}")


def prepare_run_folder(cfg: RunConfig, rank: int) -> str | None:
    """Check the run folder before anything is written and return the Lightning checkpoint to resume from.

    A new run needs a folder without an earlier run's outputs, or `overwrite=true` (which deletes them). A resume
    gets its unit verified (the files this rank reads) and the units after it moved aside. Only rank 0 changes the
    folder: Lightning starts the other ranks later, and they must find the same checkpoint."""
    out = cfg.out_dir
    if cfg.resume is None:
        found = previous_run(out) if rank == 0 else []   # the other ranks start after rank 0 began writing
        if found and not cfg.overwrite:
            raise CheckpointError(
                f"{out} already holds a run ({', '.join(found)}): continue it with resume=last, start it again with "
                "overwrite=true (deletes its checkpoints, TensorBoard logs and export), or set another name=")
        if found:
            for name in found:
                shutil.rmtree(out / name)
            log.info("overwrite=true: deleted the earlier run's %s in %s", ", ".join(found), out)
        return None
    if cfg.overwrite:
        raise ConfigError(f"overwrite=true starts the run again from scratch and resume={cfg.resume} continues it: "
                          "set only one of them")
    unit = resume_unit(cfg)
    ck.verify_or_refuse(unit, rank)
    if rank == 0:
        ckpts = out / "checkpoints"
        ck.remove_incomplete(ckpts)
        moved = ck.supersede(ckpts, unit)
        if moved:
            log.warning("resuming from %s: the later checkpoints %s belong to the abandoned run and were moved to %s",
                        unit.path, [p.name for p in moved], moved[0].parent)
    log.info("resuming from %s (step %d)", unit.path, unit.step)
    return str(unit.model)


def stop_advice(cfg: RunConfig, step: int) -> str:
    """Where to resume after training went non-finite at `step`: the newest checkpoint saved before it (the one
    saved at `step` holds the state that failed; resumed, it fails again)."""
    unit = ck.newest_before(cfg.out_dir / "checkpoints", step)
    if unit is None:
        return (f"No checkpoint was saved before step {step}: start again with overwrite=true and a lower "
                "learning rate (optim.lr).")
    return (f"The last finite checkpoint before step {step} is {unit.path}: resume with resume={unit.path} and a lower "
            "learning rate (optim.lr; a changed rate takes effect on resume), or check the data.")


def build_trainer(cfg: RunConfig, callbacks: list | None = None) -> L.Trainer:
    """The Trainer of a run. Progress shows as Lightning's bar over `max_steps` on a terminal (with
    `trainer.progress_bar`), else as one line every `trainer.log_every_n_steps` (output redirected to a file), unless
    `callbacks` bring their own `Progress`."""
    from .distributed import build_strategy

    progress.silence_noise()
    t = cfg.trainer
    out = cfg.out_dir
    checkpoint = CheckpointUnits(out / "checkpoints", every=t.ckpt_every_n_steps, keep=t.keep_checkpoints)
    callbacks = list(callbacks or [])
    bar = t.progress_bar and progress.on_terminal()
    if bar:
        callbacks.append(progress.StepBar(cfg.name))
    elif not any(isinstance(c, progress.Progress) for c in callbacks):
        callbacks.append(progress.Progress(cfg.name, t.log_every_n_steps))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=build_strategy(cfg), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None, limit_val_batches=t.val_batches,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, enable_progress_bar=bar,
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), *callbacks],
        enable_model_summary=False, deterministic=False, use_distributed_sampler=False,
    )


def flat_config(cfg: RunConfig) -> dict[str, object]:
    """The resolved config as `group.key: value` (lists and mappings as text), for TensorBoard's hparams."""
    def walk(prefix: str, value) -> dict[str, object]:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and value:
            return {k: v for key, sub in value.items() for k, v in walk(f"{prefix}{key}.", sub).items()}
        key = prefix.rstrip(".")
        return {key: value if isinstance(value, (int, float, str, bool)) else str(value)}

    return walk("", cfg)


def run(cfg: RunConfig, callbacks: list | None = None) -> L.Trainer:
    """Train one stage and export it to <out_dir>/export; `callbacks` are added to the Trainer's own. Ends with a
    paragraph on stdout (rank 0): steps, time, final losses, the newest checkpoint and the export."""
    log.info("%s: %s", cfg.name, config_lib.learning_rates(cfg))
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, callbacks)
    ckpt_path = prepare_run_folder(cfg, trainer.global_rank)
    datamodule = build_datamodule(cfg)
    check_layout(cfg, datamodule)
    module = module_for(cfg.stage)(cfg, instruction_ids(cfg, datamodule))
    # Fingerprinted now, as built: a resume rebuilds the model the same way before Lightning moves or casts it.
    trainer.strategy.checkpoint_io = FrozenBackboneIO(ck.frozen_backbone(cfg, module.model))
    if trainer.global_rank == 0:
        config_lib.save(built_config(cfg, module.model), cfg.out_dir / "config.yaml")   # the backbone as built
    trainer.logger.log_hyperparams(flat_config(cfg))
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} {stop_advice(cfg, e.step)}", e.step) from None
    export(trainer, module, cfg.out_dir / "export", tokenizer=cfg.data.params.get("tokenizer"))
    if trainer.global_rank == 0:
        units = ck.list_units(cfg.out_dir / "checkpoints")
        final = {**{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
                 **getattr(module, "last_logged", {})}
        print(progress.summary(cfg.name, trainer.global_step, time.perf_counter() - started, final,
                               str(units[-1].path) if units else None, str(cfg.out_dir / "export")), flush=True)
    return trainer


def export(trainer: L.Trainer, module, out_dir: Path, tokenizer: str | None = None) -> None:
    """The run's result as a self-contained model directory (rank 0's memory), with the data's tokenizer when the run
    had one (so evaluations need no --tokenizer), readable by the group."""
    from .distributed import full_state_dict

    state = full_state_dict(trainer, module.model)
    if trainer.global_rank == 0:
        from .model.formats import save_model_state
        save_model_state(module.model.config, state, out_dir, module.memory)
        if tokenizer:
            copy_tokenizer(Path(tokenizer), out_dir)
        share_with_group(out_dir)
        log.info("exported %s", out_dir)
    trainer.strategy.barrier("export")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
"""What a Hugging Face tokenizer directory holds (the fast tokenizer's files and a slow one's sentencepiece model)."""


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy the tokenizer files of `source` (a directory, or a tokenizer.json file) into `out_dir`."""
    files = [source] if source.is_file() else [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    for f in files:
        shutil.copyfile(f, out_dir / ("tokenizer.json" if source.is_file() else f.name))


def share_with_group(root: Path) -> None:
    """Files 0644 and folders 0755: the exports are written through private temporary files (0600)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_parser() -> argparse.ArgumentParser:
    epilog = ("config groups and top-level keys (`--describe GROUP` prints each key of one with its type, default "
              "and meaning;\n`--describe` all of them):\n" + config_lib.groups_help())
    parser = argparse.ArgumentParser(prog="mplus-fit", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (see experiments/); required unless --describe")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML, each key under its docstring, and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a config or input error (also MPLUS_DEBUG=1)")
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
        if show_traceback(args.debug):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError, FloatingPointError, DamagedFileError) as e:
        if show_traceback(args.debug):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

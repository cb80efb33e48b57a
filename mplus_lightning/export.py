"""Export a training checkpoint as a self-contained model directory that `MPlus.from_pretrained` reads.

    mplus-export CKPT OUT [--rank R] [--tokenizer PATH] [--backbone DIR]   (or: python -m mplus_lightning.export ...)

CKPT is a checkpoint folder of `mplus_lightning.fit` (`<run>/checkpoints/step=N/`, or a file in it), or a run's
`checkpoints/` folder or run folder for its newest checkpoint. Its files are checked against its manifest first and
nothing in them can run code. The memory is rank R's (default 0; every rank has its own). Like the end-of-run export,
OUT also gets the run's tokenizer (data.params.tokenizer in <run>/config.yaml, or --tokenizer PATH), so evaluations
need no --tokenizer, and its files are readable by the group. A run with a frozen backbone (model.train_backbone:
false) saved only its name and fingerprint: it is rebuilt from the run's init source, checked, and exported whole
(--backbone DIR: where that source is now, if it moved).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import checkpointing as ck
from .checkpointing import CheckpointError
from .data.tokenizer import load_tokenizer
from .fit import copy_tokenizer, share_with_group
from .model.configuration import MPlusConfig
from .model.formats import save_model_state
from .model.memory import MemoryState
from .typed_config import merge, parse_overrides, read_yaml

MODEL_PREFIX = "model."   # the LightningModule holds the MPlus as `self.model`


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, rank: int = 0, backbone: str | Path | None = None) -> Path:
    """A self-contained model directory from a checkpoint. A frozen backbone that the checkpoint only names is
    rebuilt from its run's init source (`backbone`: where that source is now, if it moved) and must match the
    fingerprint saved with it."""
    unit = ck.find_unit(Path(ckpt), f"checkpoint {ckpt}")
    ranks = ck.read_manifest(unit)["ranks"]
    if ranks and not 0 <= rank < ranks:
        raise CheckpointError(f"{unit.path} holds the memories of ranks 0..{ranks - 1}: pass --rank in that range")
    ck.verify_or_refuse(unit, rank if ranks else None, use="")
    checkpoint = ck.read_full_checkpoint(unit.model)
    if "mplus_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{unit.model} is not a checkpoint written by mplus_lightning.fit (no "
                              "mplus_config/state_dict)")
    record = ck.saved_backbone(checkpoint, unit.model)
    if record is not None:
        checkpoint = ck.restore_frozen_backbone(checkpoint, rebuilt_backbone(record, unit.model, backbone),
                                                unit.model, fix=BACKBONE_FIX)
    config = MPlusConfig.from_dict(checkpoint["mplus_config"])
    state = {k[len(MODEL_PREFIX):].replace("._checkpoint_wrapped_module", ""): v
             for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    memory = None   # a stage pretrain checkpoint has none
    if ranks:
        rank_state = ck.read_rank_state(unit.rank_state(rank))
        memory = MemoryState.from_state_dict(rank_state["memory"], rank_state["memory_meta"])
    save_model_state(config, state, out_dir, memory)
    return Path(out_dir)


BACKBONE_FIX = ("pass --backbone <the directory the run started from> if it moved, or export a checkpoint of a run "
                "whose backbone is still there")


def rebuilt_backbone(record: dict, path: Path, backbone: str | Path | None) -> ck.FrozenBackbone:
    """The frozen backbone a checkpoint names (`record`: `checkpointing.saved_backbone`), rebuilt as its run built it,
    from the run config it records."""
    from .config import RunConfig
    from .stages.build import build_model

    source_key = record.get("source_key")
    if backbone is not None and not source_key:
        raise CheckpointError(f"{path}: its run's backbone is a random tiny init ({record.get('source')}), which has "
                              "no directory: export it without --backbone")
    overrides = [f"{source_key}={Path(backbone).resolve()}"] if backbone is not None else []
    try:
        cfg = merge(RunConfig, [(f"the run config in {path}", record["config"]), parse_overrides(overrides)],
                    what="run config")
        with torch.random.fork_rng(devices=[]):   # the build seeds torch: the caller's random state stays as it was
            model = build_model(cfg)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]   # the refusal stays one line
        raise CheckpointError(f"{path} holds no copy of its frozen backbone and rebuilding it from "
                              f"{record.get('source')} failed ({reason}); {BACKBONE_FIX}") from None
    return ck.FrozenBackbone.of(cfg, model)


def recorded_tokenizer(ckpt: str | Path) -> tuple[Path | None, Path]:
    """(the tokenizer the checkpoint's run trained with, None for tokenizer-less data; the run's config.yaml, where
    fit records it as data.params.tokenizer)."""
    run = ck.find_unit(Path(ckpt), f"checkpoint {ckpt}").path.parent.parent   # <run>/checkpoints/step=N
    config = run / "config.yaml"
    if not config.is_file():
        return None, config
    path = OmegaConf.select(read_yaml(config)[1], "data.params.tokenizer", default=None)
    return (Path(str(path)) if path else None), config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mplus-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a checkpoint folder (<run>/checkpoints/step=N), or a run for its newest one")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--rank", type=int, default=0, help="whose memory to export (default 0)")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json to put into the export (default: "
                                            "the run's data.params.tokenizer, read from <run>/config.yaml)")
    parser.add_argument("--backbone", metavar="DIR",
                        help="for a run whose backbone was frozen (its checkpoints name it instead of storing it): "
                             "where its init_from / model.path directory is now, if it moved")
    args = parser.parse_args(argv)
    try:
        if args.tokenizer:   # asked for by name: a bad path is an error, before anything is written
            tokenizer, config = Path(args.tokenizer), None
            load_tokenizer(tokenizer)
        else:
            tokenizer, config = recorded_tokenizer(args.ckpt)
        out = export_checkpoint(args.ckpt, args.out, args.rank, args.backbone)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The run's tokenizer was recorded at training time and may have moved since: the weights are still worth
    # keeping, so that is a warning with the fix, not a failure.
    if config is not None and not config.is_file():
        print(f"warning: {out} has no tokenizer: {config} (the run's config, which names it) does not exist; export "
              "again with --tokenizer PATH, or give evaluations --tokenizer PATH", file=sys.stderr)
    elif tokenizer is not None:
        try:
            load_tokenizer(tokenizer)
            copy_tokenizer(tokenizer, out)
        except (FileNotFoundError, ValueError) as e:
            reason = "does not exist" if not tokenizer.exists() else f"cannot be loaded ({str(e).splitlines()[0]})"
            print(f"warning: {out} has no tokenizer: the run's tokenizer {tokenizer} (data.params.tokenizer in "
                  f"{config}) {reason}; export again with --tokenizer PATH, or give evaluations --tokenizer PATH",
                  file=sys.stderr)
    share_with_group(out)   # written through private temporary files (0600), like the end-of-run export
    print(f"exported {args.ckpt} (memory of rank {args.rank}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

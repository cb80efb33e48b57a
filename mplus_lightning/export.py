"""Export a training checkpoint as a self-contained model directory that `MPlus.from_pretrained` reads.

    mplus-export CKPT OUT [--rank R]        (or: python -m mplus_lightning.export CKPT OUT [--rank R])

CKPT is a checkpoint folder of `mplus_lightning.fit` (`<run>/checkpoints/step=N/`, or a file in it), or a run's
`checkpoints/` folder or run folder for its newest checkpoint. Its files are checked against its manifest first and
nothing in them can run code. The memory is rank R's (default 0; every rank has its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checkpointing as ck
from .checkpointing import CheckpointError
from .model.configuration import MPlusConfig
from .model.formats import save_model_state
from .model.memory import MemoryState

MODEL_PREFIX = "model."   # the LightningModule holds the MPlus as `self.model`


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, rank: int = 0) -> Path:
    unit = ck.find_unit(Path(ckpt), f"checkpoint {ckpt}")
    ranks = ck.read_manifest(unit)["ranks"]
    if ranks and not 0 <= rank < ranks:
        raise CheckpointError(f"{unit.path} holds the memories of ranks 0..{ranks - 1}: pass --rank in that range")
    ck.verify_or_refuse(unit, rank if ranks else None, use="")
    checkpoint = ck.read_full_checkpoint(unit.model)
    if "mplus_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{unit.model} is not a checkpoint written by mplus_lightning.fit (no "
                              "mplus_config/state_dict)")
    config = MPlusConfig.from_dict(checkpoint["mplus_config"])
    state = {k[len(MODEL_PREFIX):].replace("._checkpoint_wrapped_module", ""): v
             for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    memory = None   # a stage pretrain checkpoint has none
    if ranks:
        rank_state = ck.read_rank_state(unit.rank_state(rank))
        memory = MemoryState.from_state_dict(rank_state["memory"], rank_state["memory_meta"])
    save_model_state(config, state, out_dir, memory)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mplus-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a checkpoint folder (<run>/checkpoints/step=N), or a run for its newest one")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--rank", type=int, default=0, help="whose memory to export (default 0)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.rank)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} (memory of rank {args.rank}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

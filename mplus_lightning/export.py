"""Export a training checkpoint as a self-contained model directory that `MPlus.from_pretrained` reads.

    mplus-export CKPT OUT [--rank R]        (or: python -m mplus_lightning.export CKPT OUT [--rank R])

CKPT is a Lightning checkpoint of `mplus_lightning.fit`: a single file (one device) or the directory of a sharded
FSDP2 checkpoint. The memory comes from rank R's state saved beside it (default 0; every rank has its own).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .model.configuration import MPlusConfig
from .model.formats import save_model_state
from .model.memory import MemoryState
from .stages.base import rank_state_path

MODEL_PREFIX = "model."   # the LightningModule holds the MPlus as `self.model`


def _load_checkpoint(path: Path) -> dict:
    if path.is_dir():   # a sharded (torch.distributed.checkpoint) directory: consolidate on this one process
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), f"{tmp}/full.pt")
            state = torch.load(f"{tmp}/full.pt", weights_only=False, map_location="cpu")
        meta = torch.load(path / "meta.pt", weights_only=False, map_location="cpu")
        return {**meta, **state}
    return torch.load(path, weights_only=False, map_location="cpu")


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, rank: int = 0) -> Path:
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    checkpoint = _load_checkpoint(ckpt)
    if "mplus_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt} is not a checkpoint written by mplus_lightning.fit (no mplus_config/state_dict)")
    config = MPlusConfig.from_dict(checkpoint["mplus_config"])
    state = {k[len(MODEL_PREFIX):].replace("._checkpoint_wrapped_module", ""): v
             for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    state_file = rank_state_path(ckpt, rank)
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: the memory of rank {rank} is saved beside the checkpoint")
    rank_state = torch.load(state_file, weights_only=False, map_location="cpu")
    memory = MemoryState.from_state_dict(rank_state["memory"], rank_state["memory_meta"])
    save_model_state(config, state, out_dir, memory)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mplus-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a .ckpt file or a sharded checkpoint directory")
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

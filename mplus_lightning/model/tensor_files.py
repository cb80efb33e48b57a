"""The safetensors files of a model directory: one `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Reading only; what the keys mean is for `formats` (weights) and `memory` (memory)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def weight_files(path: str | Path) -> dict[str, Path]:
    """key -> file for a directory with model.safetensors or model.safetensors.index.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path / INDEX} is malformed ({e!r}): expected a JSON object with `weight_map`") from None
        files = {k: path / f for k, f in index.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{path / INDEX} names shard {f.name}, which is missing")
        return files
    single = path / WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor {INDEX}")
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def read_tensors(files: dict[str, Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` (each listed in `files`, as `weight_files` returns it), opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out

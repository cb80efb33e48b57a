"""The safetensors files of a model directory: one `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Reading only; what the keys mean is for `formats` (weights) and `memory` (memory)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class DamagedFileError(ValueError):
    """A saved file that cannot be read as written (truncated, tensors of disagreeing shapes): names the file."""


def _open(file: Path):
    try:
        return safe_open(str(file), "pt")
    except SafetensorError as e:
        raise DamagedFileError(f"{file} is damaged or truncated ({e}): re-export or re-download it") from None


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
    with _open(single) as f:
        return {k: single for k in f.keys()}


def read_tensors(files: dict[str, Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` (each listed in `files`, as `weight_files` returns it), opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for file, names in by_file.items():
        with _open(file) as f:
            for k in names:
                try:
                    out[k] = f.get_tensor(k)
                except SafetensorError as e:
                    raise DamagedFileError(f"{file}: tensor {k} cannot be read ({e}): re-export or re-download "
                                           "the file") from None
    return out

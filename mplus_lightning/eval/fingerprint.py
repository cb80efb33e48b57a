"""What an evaluation read, by content: fingerprints of the model's and the data's files, so that resuming an output
directory with new weights (or data) at the same path is refused instead of mixing old and new results; and the
completeness check of safetensors files, so that a truncated download is named before anything is loaded.

Size and modification time do not identify a file: a new export of the same architecture has the same size, and copies
with ``cp -p`` / ``rsync -a`` keep the old time. Hashing every byte would cost a full read of the checkpoint (16 GB for
an 8B model, ~1 min on a shared filesystem) at every start. So:

* a ``.safetensors`` file is fingerprinted by its header (every tensor's name, dtype, shape and offsets) plus, per
  tensor, all its bytes when it is small (at most `WHOLE_TENSOR_BYTES`: LoRA adapters, norms, the retriever, BOS
  vectors, which are what fine-tuning changes when the backbone is frozen) and `SAMPLES` spread ranges of
  `SAMPLE_BYTES` otherwise (the frozen backbone's matrices, the memory pool, whose rows all change when it is
  rewritten). An 8B checkpoint costs a few MB of reads;
* any other file up to `WHOLE_FILE_BYTES` (configs, tokenizers, SQuAD, index files) is hashed whole; a larger one
  (NQ's 6.4 GB dev file) by its size and `SAMPLES` spread ranges of `LARGE_SAMPLE_BYTES`.

What this can miss: an edit confined to unsampled bytes of one large tensor or file (not what a new training run or
a new dataset release does).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from ..data.files import DamagedFileError

WHOLE_TENSOR_BYTES = 1 << 20
WHOLE_FILE_BYTES = 64 << 20
SAMPLES = 16
SAMPLE_BYTES = 4096
LARGE_SAMPLE_BYTES = 64 << 10
MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on the header size."""


def safetensors_header(path: Path) -> tuple[bytes, dict, int]:
    """(raw header, parsed header, offset of the tensor data) of a complete safetensors file.

    Raises:
        DamagedFileError: naming the file, when it is shorter than its header says or the header is unreadable.
    """
    size = path.stat().st_size
    fix = "re-export or re-download it"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DamagedFileError(f"{path}: truncated safetensors file ({size} bytes, not even a header): {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise DamagedFileError(f"{path}: truncated or not a safetensors file ({size} bytes; its first 8 bytes "
                                    f"announce a {n}-byte header): {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise DamagedFileError(f"{path}: unreadable safetensors header ({e}): {fix}") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise DamagedFileError(f"{path}: {'truncated' if size < expected else 'damaged'} safetensors file ({size} "
                                f"bytes, its header describes {expected}): {fix}")
    return raw, header, 8 + n


def _spread(start: int, length: int, piece: int) -> list[tuple[int, int]]:
    """`SAMPLES` ranges of `piece` bytes spread over [start, start + length), the first and last included."""
    if length <= piece * SAMPLES:
        return [(start, length)]
    step = (length - piece) / (SAMPLES - 1)
    return [(start + round(i * step), piece) for i in range(SAMPLES)]


def _read_ranges(path: Path, ranges: list[tuple[int, int]], h: Any) -> None:
    with open(path, "rb") as fh:
        for offset, length in ranges:
            fh.seek(offset)
            while length > 0:
                chunk = fh.read(min(length, 1 << 20))
                if not chunk:
                    raise DamagedFileError(f"{path}: ends at byte {fh.tell()} while it was being read")
                h.update(chunk)
                length -= len(chunk)


def file_fingerprint(path: str | Path) -> str:
    """A content fingerprint of one file (module docstring: what is read)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.suffix == ".safetensors":
        raw, header, data_start = safetensors_header(path)
        h.update(raw)
        ranges: list[tuple[int, int]] = []
        for begin, end in sorted(tuple(t["data_offsets"]) for k, t in header.items() if k != "__metadata__"):
            length = end - begin
            ranges += ([(data_start + begin, length)] if length <= WHOLE_TENSOR_BYTES
                       else _spread(data_start + begin, length, SAMPLE_BYTES))
        _read_ranges(path, ranges, h)
        return "st:" + h.hexdigest()[:32]
    size = path.stat().st_size
    if size <= WHOLE_FILE_BYTES:
        _read_ranges(path, [(0, size)], h)
        return "sha256:" + h.hexdigest()[:32]
    h.update(str(size).encode())
    _read_ranges(path, _spread(0, size, LARGE_SAMPLE_BYTES), h)
    return "sampled:" + h.hexdigest()[:32]


def input_files(path: str | Path, exclude: Path | None = None) -> list[Path]:
    """The files a path stands for: itself, or every file under a directory (hidden ones and `exclude` left out)."""
    path = Path(path)
    if path.is_file():
        return [path]
    skip = exclude.resolve() if exclude is not None else None
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        out.append(p)
    return out


def fingerprints(path: str | Path, exclude: Path | None = None) -> dict[str, str]:
    """{file: fingerprint} of every file `path` stands for (`input_files`)."""
    return {str(p): file_fingerprint(p) for p in input_files(path, exclude)}


def check_complete(path: str | Path) -> None:
    """Every safetensors file under `path` is as long as its header says (raises `DamagedFileError` naming it)."""
    for p in input_files(path):
        if p.suffix == ".safetensors":
            safetensors_header(p)

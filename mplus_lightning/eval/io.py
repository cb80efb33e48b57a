"""File helpers shared by the evaluation readers and runners: JSON Lines in and out, and the per-item result log
that lets an interrupted evaluation resume where it stopped."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


try:  # one exception type for every data reader of the project
    from ..data.stream import DataFormatError
except ImportError:  # pragma: no cover - the training data package is always there in this repository
    class DataFormatError(ValueError):
        """An input file is not in the expected format; the message names the file (and line)."""


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file for reading, transparently decompressing `.gz`."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for every non-blank line of a JSON Lines file (optionally .gz).

    A line that is not valid JSON raises DataFormatError naming the file and the line.
    """
    path = Path(path)
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def require(obj: Any, fields: Iterable[str], where: str) -> None:
    """Raise DataFormatError naming `where` (file:line) if `obj` is not an object holding every field."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing}; present: {sorted(obj)}")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ResultStore:
    """Append-only JSON Lines log of finished work units, keyed by a tuple of record fields.

    Each `add` appends one line and flushes it to disk, so an interrupted run keeps everything it finished. On
    opening, an unterminated last line (the process died mid-write) is dropped and the file is rewritten without it;
    any other malformed line is an error naming the line.
    """

    def __init__(self, path: str | Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.records: dict[tuple, dict] = {}
        self._load()

    def key(self, record: dict) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def _load(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]       # `tail` is "" when the file ends with a newline
        for lineno, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{self.path}:{lineno}: malformed result line ({e.msg}); delete the line or "
                                      "rerun with overwrite=true") from None
            self.records[self.key(rec)] = rec
        if tail.strip():                              # cut off mid-write: drop it and rewrite the file
            kept = "".join(line + "\n" for line in complete if line.strip())
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(kept, encoding="utf-8")
            os.replace(tmp, self.path)

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[self.key(record)] = record

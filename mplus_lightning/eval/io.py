"""Writing evaluation results: JSON written atomically, and the per-item result log that lets an interrupted
evaluation resume where it stopped. (Reading inputs: `mplus_lightning.data.files`.)"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.files import DataFormatError


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
        self.extend([record])

    def extend(self, records: list[dict]) -> None:
        """Append records (one flush for all of them)."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[self.key(r)] = r

    def sort(self, order: Callable[[dict], Any]) -> None:
        """Rewrite the file (atomically) with its records ordered by `order(record)` (a stable sort)."""
        records = sorted(self.records.values(), key=order)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        self.records = {self.key(r): r for r in records}

"""Held-out text documents for the loss analyses (position-loss, short-context): any JSON Lines or parquet files whose
records carry a text field.

    a file           docs.jsonl[.gz|.zst] or shard.parquet
    a directory      every *.parquet / *.jsonl[.gz|.zst] under it, in natural order: a SlimPajama bucket folder written
                     by `python -m mplus_lightning.data.slimpajama build` (e.g. OUT/val/32k-64k, documents the
                     training run never saw), or a fine-web-edu dump folder (data/CC-MAIN-2024-10)

Documents are read in file order, each with the id `<file name>:<row>` (rows of parquet count from 0, JSON lines
from 1), so the same files give the same ids on every rank and in every resumed run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..files import DataFormatError
from ..fineweb import SUFFIXES, iter_texts, natural_key

LAYOUT = ("expected a .jsonl[.gz|.zst] / .parquet file, or a directory of them (e.g. a SlimPajama bucket folder "
          "OUT/val/32k-64k, or fine-web-edu's data/CC-MAIN-2024-10), each record with a string field `text` "
          "(text_field=NAME for another)")


def text_files(path: str | Path) -> list[Path]:
    """The files `read_texts` reads for `path`, in natural order."""
    path = Path(path).expanduser()
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise FileNotFoundError(f"{path}: not a text data file; {LAYOUT}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"text data path {path} does not exist; {LAYOUT}")
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)), key=natural_key)
    if not files:
        raise FileNotFoundError(f"no .jsonl[.gz|.zst] / .parquet files under {path}; {LAYOUT}")
    return files


def iter_documents(path: str | Path, *, text_field: str = "text") -> Iterator[tuple[Path, dict]]:
    """(file, ``{"id", "text"}``) of every non-empty document, in file order."""
    files = text_files(path)
    base = files[0].parent if len(files) == 1 else Path(path).expanduser()
    for f in files:
        for row, text in iter_texts(f, text_field=text_field):
            if text:
                yield f, {"id": f"{f.relative_to(base)}:{row}", "text": text}


def read_texts(path: str | Path, *, text_field: str = "text", limit: int | None = None
               ) -> tuple[list[dict], list[Path]]:
    """The first `limit` non-empty documents (all if None), as ``{"id", "text"}``, and the files they came from
    (reading stops there)."""
    docs: list[dict] = []
    read: list[Path] = []
    if limit is None or limit > 0:
        for f, doc in iter_documents(path, text_field=text_field):
            docs.append(doc)
            if not read or read[-1] != f:
                read.append(f)
            if limit is not None and len(docs) >= limit:
                break
    if not docs and limit != 0:
        raise DataFormatError(f"{path}: no documents with a non-empty `{text_field}`; {LAYOUT}")
    return docs, read

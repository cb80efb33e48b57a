"""fineweb-edu from local shards (stage 1, and the short documents of stages 2/3).

On disk (see data/README.md): the Hugging Face layout ``DIR/data/CC-MAIN-2024-10/*.parquet`` (``dump`` picks the
folder), or any ``*.parquet`` / ``*.jsonl`` / ``*.jsonl.gz`` / ``*.jsonl.zst`` files under ``DIR``; every record has
a string field ``text``. Files are read in natural sort order (``...-2-of-...`` before ``...-10-of-...``).

Documents are numbered in that order. The first ``val_docs`` are held out: validation uses the first ``val_size`` of
them and training never sees any of them (official: 50,000 held out, 1,000 evaluated).
Training uses documents ``[val_docs + train_start, val_docs + train_start + max_train_docs)``; the official stage 1
used 3,000,000 of them, stage 2 the first 200,000 (``train_start=0``).

Random access: the texts that are used are copied once into an Arrow IPC file (``cache_dir``, default
``DIR/.mplus_cache``) that every rank and worker memory-maps; the copy is keyed by the files (names, sizes, mtimes)
and the options, and is rebuilt when they change. Where the data folder is read-only (usual for shared datasets on a
cluster) and no cache was built there, the cache goes to ``$XDG_CACHE_HOME/mplus_lightning/<hash of the folder>``
(default ``~/.cache/...``; logged). Tokenization happens on the fly in the dataloader workers.

Damaged shards (a truncated .zst/.gz or parquet file) are errors naming the file; ``on_bad_file="skip"`` leaves them
out whole instead, and the cache's manifest and every run's log say how many files and documents were lost (as they
do for malformed lines skipped with ``on_bad_line="skip"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..typed_config import ConfigError
from .files import (
    ON_BAD_FILE,
    ON_BAD_LINE,
    SKIP_FILE_HINT,
    BadFiles,
    BadLines,
    DamagedFileError,
    DataFormatError,
    check_choice,
    iter_jsonl,
    text_field_check,
)
from .sample import Sample
from .stream import SourceSpec, StreamParams, TextDocuments, TokenizedDataModule, target_only_sample
from .tokenizer import encode

log = logging.getLogger(__name__)

DEFAULT_DUMP = "CC-MAIN-2024-10"
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
LAYOUT = f"""expected fineweb-edu shards:
  DIR/data/{DEFAULT_DUMP}/*.parquet   (the Hugging Face layout; `dump` names the folder)
  or any *.parquet / *.jsonl / *.jsonl.gz / *.jsonl.zst files under DIR, each record with a string field 'text'.
Download on a machine with internet:
  huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset --include 'data/{DEFAULT_DUMP}/*' \\
      --local-dir DIR"""


def natural_key(path: str | Path) -> list[Any]:
    """Sort key that orders numbers inside names numerically (chunk2 < chunk10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_text_files(data_dir: str | Path, dump: str | None = DEFAULT_DUMP) -> tuple[Path, list[Path]]:
    """The folder that holds the shards and its data files in natural order.

    Raises:
        FileNotFoundError: naming the path and the expected layout.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"fineweb directory {str(root)!r} does not exist; {LAYOUT}")
    base = root
    if dump:
        for cand in (root / "data" / dump, root / dump):
            if cand.is_dir():
                base = cand
                break
        else:
            if (root / "data").is_dir():
                have = sorted(p.name for p in (root / "data").iterdir() if p.is_dir())
                raise FileNotFoundError(f"{str(root / 'data')!r} has no dump folder {dump!r} (it has {have[:10]}); "
                                        f"set `dump` to one of them; {LAYOUT}")
    files = sorted((p for p in base.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                    and not any(part.startswith(".") for part in p.relative_to(base).parts)), key=natural_key)
    if not files:
        raise FileNotFoundError(f"no .parquet / .jsonl[.gz|.zst] files under {str(base)!r}; {LAYOUT}")
    return base, files


def iter_texts(path: Path, *, text_field: str = "text", on_bad_line: str = "error",
               bad: BadLines | None = None) -> Iterator[tuple[int, str]]:
    """``(row, text)`` of every record of one file: parquet rows count from 0, JSON lines from 1 (line numbers).

    A damaged file raises `DamagedFileError` (after yielding what was readable)."""
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a broken file
            raise DamagedFileError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataFormatError(f"{path}: no column {text_field!r} (columns: {names}); {LAYOUT}")
        row = 0
        batches = pf.iter_batches(columns=[text_field], batch_size=4096)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:
                raise DamagedFileError(f"{path}: unreadable after row {row} ({e})") from None
            if batch is None:
                return
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    where = f"{path}: row {row}: {text_field!r} is {type(text).__name__}, not a string"
                    if on_bad_line == "error":
                        raise DataFormatError(where + " (pass on_bad_line='skip' to skip and count such rows)")
                    if bad is not None:
                        bad.add(where)
                else:
                    yield row, text
                row += 1
    for lineno, obj in iter_jsonl(path, on_bad_line=on_bad_line, bad=bad, require=text_field_check(text_field)):
        yield lineno, obj[text_field]


class TextTable:
    """Texts and ids of documents in one memory-mapped Arrow IPC file (random access, shared by all workers)."""

    DOCS, MANIFEST = "docs.arrow", "manifest.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / self.MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{str(self.path)!r} is not a built text cache (no {self.MANIFEST})")
        self.manifest = json.loads(mf.read_text())
        lost = [f"{self.manifest['bad_lines']} malformed records (first: {self.manifest['first_bad_line']})"
                ] if self.manifest.get("bad_lines") else []
        if self.manifest.get("bad_files"):
            lost.append(f"{len(self.manifest['bad_files'])} damaged files with at least "
                        f"{self.manifest['documents_lost']} documents (first: {self.manifest['bad_files'][0]})")
        if lost:   # said at every use, not only when the cache was built
            log.warning("%s: this text cache was built leaving out %s", self.path, " and ".join(lost))
        self._starts: list[int] = []
        n = 0
        for rows in self.manifest["batch_rows"]:
            self._starts.append(n)
            n += rows
        self.num_docs = n
        self._reader: Any = None

    def __len__(self) -> int:
        return self.num_docs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # memory maps do not travel to worker processes; each reopens its own
        return state

    def _row(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} of {self.num_docs}")
        if self._reader is None:
            import pyarrow as pa

            self._reader = pa.ipc.open_file(pa.memory_map(str(self.path / self.DOCS)))
        import bisect

        b = bisect.bisect_right(self._starts, index) - 1
        return self._reader.get_batch(b), index - self._starts[b]

    def text(self, index: int) -> str:
        batch, j = self._row(index)
        return batch.column(0)[j].as_py()

    def doc_id(self, index: int) -> str:
        batch, j = self._row(index)
        return batch.column(1)[j].as_py()

    @classmethod
    def build(cls, files: list[Path], base: Path, out: Path, *, text_field: str = "text", limit: int | None = None,
              on_bad_line: str = "error", on_bad_file: str = "error", progress: bool = True) -> TextTable:
        """Copy the texts of `files` (at most `limit` documents) into `out`; atomic (a half-built cache never shows).

        A damaged file is an error (``on_bad_file="error"``) or left out whole (``"skip"``, counted in the manifest).
        """
        import pyarrow as pa

        check_choice("on_bad_line", on_bad_line, ON_BAD_LINE)
        check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        schema = pa.schema([("text", pa.large_string()), ("doc_id", pa.string())])
        bad = BadLines()
        bad_files = BadFiles()
        batch_rows: list[int] = []
        texts: list[str] = []
        ids: list[str] = []
        n = 0
        try:
            from tqdm.auto import tqdm

            with pa.OSFile(str(tmp / cls.DOCS), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                def flush() -> None:
                    if texts:
                        writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string()), pa.array(ids)],
                                                           schema=schema))
                        batch_rows.append(len(texts))
                        texts.clear()
                        ids.clear()

                bar = tqdm(files, desc=f"text cache {out.name}", unit="file", disable=not progress)
                for f in bar:
                    rel = f.relative_to(base).as_posix()
                    docs_before, batches_before = n, len(batch_rows)
                    try:
                        for row, text in iter_texts(f, text_field=text_field, on_bad_line=on_bad_line, bad=bad):
                            if limit is not None and n >= limit:
                                break
                            texts.append(text)
                            ids.append(f"{rel}:{row}")
                            n += 1
                            if len(texts) == 4096:
                                flush()
                        flush()   # a file's texts never share a batch with the next file's (see below)
                    except DamagedFileError as e:
                        if on_bad_file == "error":
                            raise DamagedFileError(f"{e}{SKIP_FILE_HINT}") from None
                        # Left out whole: its batches already written stay in the Arrow file but count no rows.
                        texts.clear()
                        ids.clear()
                        batch_rows[batches_before:] = [0] * (len(batch_rows) - batches_before)
                        bad_files.add(e, n - docs_before)
                        log.warning("left out (on_bad_file=skip) with the %d documents read from it: %s",
                                    n - docs_before, e)
                        n = docs_before
                    bar.set_postfix(docs=n)
                    if limit is not None and n >= limit:
                        break
                flush()
            manifest = {"num_docs": n, "batch_rows": batch_rows, "files": [f.relative_to(base).as_posix()
                                                                          for f in files],
                        "text_field": text_field, "limit": limit, "bad_lines": bad.count, "first_bad_line": bad.first,
                        "bad_files": bad_files.files, "documents_lost": bad_files.documents_lost}
            (tmp / cls.MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished the same cache first
                if not (out / cls.MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(out)   # which logs what was left out


def fallback_cache_root(data_dir: Path) -> Path:
    """Where the text cache goes when the data folder is read-only: ``$XDG_CACHE_HOME/mplus_lightning/<hash>``."""
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "mplus_lightning" / hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:16]


def unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (made if missing), or None; tried, since permission bits alone do not
    tell (read-only mounts, root, ACLs)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=folder))   # what `TextTable.build` does first
    except OSError as e:
        return f"{e.strerror or e}"
    return None


def cache_key(files: list[Path], **options: Any) -> str:
    """Hash of the files (name, size, mtime) and the options: a changed input means a new cache."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:16]


class FineWebDocuments(TextDocuments):
    """Documents ``[start, stop)`` of a `TextTable`, tokenized on the fly."""

    def __init__(self, table: TextTable, tokenizer: Any, *, start: int = 0, stop: int | None = None,
                 name: str = "fineweb"):
        super().__init__(tokenizer, name)
        self.table = table
        self.start = start
        self.stop = len(table) if stop is None else min(stop, len(table))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def text(self, index: int) -> str:
        return self.table.text(self.start + index)

    def doc_id(self, index: int) -> str:
        return self.table.doc_id(self.start + index)


@dataclass
class FineWebSelection:
    """Which fine-web documents are held out and which are trained on, and how the shards are read (data.kind=fineweb
    and mixture). Documents are numbered in the files' natural order."""

    dump: Optional[str] = DEFAULT_DUMP
    """The ``data/<dump>`` folder to read (official: CC-MAIN-2024-10 in stages 1-2, CC-MAIN-2023-50 in stage 3);
    null: every shard under the folder."""
    text_field: str = "text"
    """The field / column that holds the text."""
    val_docs: int = 50_000
    """The first documents, held out from training (official: 50,000)."""
    val_size: int = 1_000
    """How many of the held-out documents validation evaluates, at most val_docs (official: 1,000)."""
    train_start: int = 0
    """First training document, counted after the held-out ones (official stage 3: 720,000)."""
    max_train_docs: Optional[int] = None
    """Training documents, from train_start on (official: 3,000,000 in stage 1, 200,000 in stage 2, 720,000 in stage
    3); null: all that follow."""
    cache_dir: Optional[str] = None
    """Where the text cache goes (null: <shard folder>/.mplus_cache, or $XDG_CACHE_HOME/mplus_lightning/<hash> when
    that folder is read-only)."""
    on_bad_line: str = "error"
    """A malformed record: error (naming file and line) | skip (skipped and counted)."""
    on_bad_file: str = "error"
    """A damaged shard (e.g. a truncated .zst): error (naming it) | skip (left out whole, its documents counted)."""
    progress: bool = True
    """Show a progress bar while the text cache is built."""


@dataclass
class FineWebSource:
    """The fine-web download and its tokenizer (data.kind=fineweb)."""

    path: Optional[str] = None
    """The download folder (required; data/README.md gives the layout)."""
    tokenizer: Optional[str] = None
    """A local tokenizer directory, e.g. the Llama-3.1-8B one (required)."""
    name: str = "fineweb"
    """Source name of these samples (logs, the text cache's folder)."""


@dataclass
class FineWebParams(StreamParams, FineWebSelection, FineWebSource):
    """`data.params` of data.kind=fineweb (`FineWebDataModule`): fineweb-edu shards, the official stage-1 data."""


class FineWebDataModule(TokenizedDataModule):
    """fineweb-edu shards -> samples (16..512-token chunks, targets up to 2,048 tokens).

    Args:
        path: the download directory (see `LAYOUT`).
        tokenizer: a local HF tokenizer directory (e.g. the Llama-3.1-8B directory) or a loaded tokenizer.
        dump: the ``data/<dump>`` folder to read (None: every shard under `path`).
        text_field: the field/column with the text.
        val_docs: the first documents, held out from training.
        val_size: how many of them the validation loader evaluates, at most `val_docs` (each: no context, target =
            the first ``rule.max_seq_length`` tokens).
        train_start: first training document, counted after the held-out ones.
        max_train_docs: number of training documents (None: all that follow).
        cache_dir: where the text cache goes (default ``<shard folder>/.mplus_cache``, or when that folder is
            read-only ``$XDG_CACHE_HOME/mplus_lightning/<hash>``).
        on_bad_line: ``error`` (a malformed record is an error naming file and line) or ``skip`` (skip and count).
        on_bad_file: ``error`` (a damaged shard, e.g. a truncated .zst, is an error naming it) or ``skip`` (leave
            it out whole; its documents are lost, counted in the cache manifest and logged).
        name: `Sample.source` of these samples.
        **kwargs: `SampleDataModule` options (rule, seed, num_workers, num_epochs, shuffle, vocab_size, ...).
    """

    params_schema = FineWebParams

    def __init__(self, path: str | Path, tokenizer: str | Path | Any, *, dump: str | None = DEFAULT_DUMP,
                 text_field: str = "text", val_docs: int = 50_000, val_size: int = 1_000, train_start: int = 0,
                 max_train_docs: int | None = None, cache_dir: str | Path | None = None, on_bad_line: str = "error",
                 on_bad_file: str = "error", name: str = "fineweb", progress: bool = True, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        if val_docs < 0 or val_size < 0 or train_start < 0 or (max_train_docs is not None and max_train_docs < 1):
            raise ConfigError(f"FineWebDataModule: need val_docs ({val_docs}), val_size ({val_size}) and train_start "
                             f"({train_start}) >= 0 and max_train_docs ({max_train_docs}) None or >= 1")
        check_choice("on_bad_line", on_bad_line, ON_BAD_LINE)
        check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
        self.path, self.dump, self.text_field = Path(path), dump, text_field
        self.val_docs, self.val_size, self.train_start, self.max_train_docs = (val_docs, val_size, train_start,
                                                                               max_train_docs)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.on_bad_line, self.on_bad_file, self.name, self.progress = on_bad_line, on_bad_file, name, progress
        self._table: TextTable | None = None

    def _cache_roots(self, base: Path) -> list[Path]:
        """Where the text cache may be, in order of preference."""
        if self.cache_dir is not None:
            return [self.cache_dir]
        return [base / ".mplus_cache", fallback_cache_root(base)]

    def table(self) -> TextTable:
        """The text cache, built on first use (or by `prepare_data`) in the first writable of `_cache_roots`."""
        if self._table is not None:
            return self._table
        base, files = find_text_files(self.path, self.dump)
        limit = None if self.max_train_docs is None else self.val_docs + self.train_start + self.max_train_docs
        options: dict[str, Any] = {"text_field": self.text_field, "limit": limit, "on_bad_line": self.on_bad_line}
        if self.on_bad_file != "error":   # only then, so caches built before the option existed stay valid
            options["on_bad_file"] = self.on_bad_file
        name = f"{self.name}-{cache_key(files, **options)}"
        roots = self._cache_roots(base)
        built = [root / name for root in roots if (root / name / TextTable.MANIFEST).is_file()]
        if built:
            self._table = TextTable(built[0])
            return self._table
        problems = []
        for root in roots:
            why = unwritable(root)
            if why is None:
                break
            problems.append(f"{root}: {why}")
        else:
            raise ConfigError(f"cannot write the {self.name} text cache (" + "; ".join(problems) + "): set "
                              "data.params.cache_dir to a writable folder")
        if problems:
            log.warning("the %s text cache goes to %s, as the data folder is not writable (%s); set "
                        "data.params.cache_dir to choose another place", self.name, root, problems[0])
        log.info("building the %s text cache at %s from %d files", self.name, root / name, len(files))
        self._table = TextTable.build(files, base, root / name, text_field=self.text_field, limit=limit,
                                      on_bad_line=self.on_bad_line, on_bad_file=self.on_bad_file,
                                      progress=self.progress)
        return self._table

    def prepare_data(self) -> None:
        self.table()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        n = len(self.table())
        if n <= self.val_docs + self.train_start:
            raise ConfigError(f"{self.name}: {self.path} has {n} documents, but the first "
                             f"{self.val_docs + self.train_start} are held out (val_docs={self.val_docs}) or skipped "
                             f"(train_start={self.train_start}): no training documents left")

    def train_documents(self) -> FineWebDocuments:
        start = self.val_docs + self.train_start
        stop = None if self.max_train_docs is None else start + self.max_train_docs
        return FineWebDocuments(self.table(), self.tokenizer, start=start, stop=stop, name=self.name)

    def val_documents(self) -> FineWebDocuments:
        return FineWebDocuments(self.table(), self.tokenizer, start=0, stop=min(self.val_size, self.val_docs),
                                name=f"{self.name}-val")

    def train_sources(self) -> list[SourceSpec]:
        return [SourceSpec(self.name, self.train_documents())]

    def val_samples(self) -> list[Sample]:
        docs = self.val_documents()
        out: list[Sample] = []
        for i in range(len(docs)):
            ids = encode(self.tokenizer, docs.text(i))
            if len(ids) >= 2:  # a 0/1-token document has nothing to predict
                out.append(target_only_sample(ids, self.rule.max_seq_length, doc_id=docs.doc_id(i),
                                              source=docs.name, position=len(out)))
        return out

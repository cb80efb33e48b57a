"""Reading input files: text (plain, .gz, .zst), JSON and JSON Lines, with errors that name the file and line.

Shared by the training streams (data/) and the evaluation readers (data/eval_sets/): every malformed input raises
`DataFormatError`, and a stream may instead skip bad lines and count them (`on_bad_line="skip"`, `BadLines`).

A compressed file must be complete: one cut short (an interrupted download or copy) or with corrupt data raises
`DamagedFileError` naming it, never a silently shorter file. zstd frames are decompressed one by one to their end
(the stock stream reader stops quietly at a truncated frame); gzip's own end-of-stream check is kept. A stream may
leave such files out whole (`on_bad_file="skip"`, `BadFiles`), which loses their documents and is reported.

A line whose text is not valid Unicode (invalid UTF-8 bytes, or a lone surrogate escape such as ``"\\ud800"``, which
`json.loads` accepts but no tokenizer can encode) is a bad line like malformed JSON.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..typed_config import ConfigError


class DataFormatError(ConfigError):
    """A data file does not have the expected format; the message names the file (and line).

    A user's mistake like a bad config value, so it is a `ConfigError`: the command-line tools print it as one line.
    """


class DamagedFileError(DataFormatError):
    """A file that cannot be read to its end: truncated or corrupt compressed data, an unreadable parquet file."""


@dataclass
class BadLines:
    """Counts malformed records that were skipped (``on_bad_line="skip"``)."""

    count: int = 0
    first: str = ""
    """Where the first one was (file:line and why)."""

    def add(self, where: str) -> None:
        self.count += 1
        if not self.first:
            self.first = where


@dataclass
class BadFiles:
    """Damaged files that were left out whole (``on_bad_file="skip"``)."""

    files: list[str] = field(default_factory=list)
    """Each file and why it is damaged."""
    documents_lost: int = 0
    """Documents read from them before the damage showed, dropped with the rest of their file (the unreadable part
    cannot be counted: the true loss is larger)."""

    def add(self, error: DamagedFileError, documents_read: int) -> None:
        self.files.append(str(error))
        self.documents_lost += documents_read


ON_BAD_LINE = ("error", "skip")
ON_BAD_FILE = ("error", "skip")
SKIP_FILE_HINT = (" (pass on_bad_file='skip' to leave damaged files out; their documents are lost and counted; "
                  "or replace the file)")
READ_CHUNK = 1 << 17
"""Compressed bytes read at a time (zstd's recommended input size)."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {choices}")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, refusing a file that ends inside a frame."""

    def __init__(self, path: Path):
        import zstandard

        self.path, self._error = path, zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()
        self._fh = open(path, "rb")
        self._frame: Any = None          # decompressor of the frame being read (None between frames)
        self._frames = 0
        self._out, self._pos = b"", 0    # decompressed bytes not yet returned
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out) and not self._done:
            self._fill()
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        data = self._fh.read(READ_CHUNK)
        if not data:
            if self._frame is not None or self._frames == 0:
                raise DamagedFileError(f"{self.path}: truncated: the file ends inside a zstd frame "
                                       f"(after {self._frames} complete frame(s))")
            self._done = True
            return
        parts = []
        try:
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                parts.append(self._frame.decompress(data))
                if not self._frame.eof:
                    break
                data = self._frame.unused_data   # the next frame starts in this chunk
                self._frame = None
                self._frames += 1
        except self._error as e:
            raise DamagedFileError(f"{self.path}: corrupt zstd data ({e})") from None
        self._out, self._pos = b"".join(parts), 0

    def close(self) -> None:
        self._fh.close()
        super().close()


class _Gzip(io.RawIOBase):
    """The decompressed bytes of a .gz file; a file cut short or with corrupt data raises `DamagedFileError`."""

    def __init__(self, path: Path):
        self.path = path
        self._gz = gzip.open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._gz.readinto(buffer)
        except EOFError:
            raise DamagedFileError(f"{self.path}: truncated: the file ends inside the gzip stream") from None
        except (OSError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
            raise DamagedFileError(f"{self.path}: corrupt gzip data ({e})") from None

    def close(self) -> None:
        self._gz.close()
        super().close()


def open_text(path: str | Path, errors: str = "strict") -> io.TextIOBase:
    """Open a text file, decompressing ``.gz`` and ``.zst`` (zstandard) by suffix, as UTF-8.

    A compressed file that is empty, cut short or corrupt raises `DamagedFileError` (when opened or while read).
    `errors`: how undecodable bytes are handled (``surrogateescape`` lets `iter_jsonl` report them per line).
    """
    p = Path(path)
    if p.suffix in (".gz", ".zst"):
        if p.stat().st_size == 0:
            raise DamagedFileError(f"{p}: empty file (0 bytes): not {p.suffix} data; an interrupted download?")
        raw = _Gzip(p) if p.suffix == ".gz" else _ZstdFrames(p)
        return io.TextIOWrapper(io.BufferedReader(raw, READ_CHUNK), encoding="utf-8", errors=errors)
    return open(p, encoding="utf-8", errors=errors)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def invalid_unicode(obj: Any, where: str = "") -> str | None:
    """The JSON path of the first string in `obj` that is not valid Unicode (holds a lone surrogate), else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the value"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(k, str) and invalid_unicode(k) is not None:
            return f"{where}.{k!r}" if where else repr(k)
        bad = invalid_unicode(v, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]")
        if bad is not None:
            return bad.lstrip(".")
    return None


def _line_problem(line: str, obj: Any) -> str | None:
    """Why a parsed JSON line cannot be used as text, or None."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:      # undecodable bytes, kept as surrogates by errors="surrogateescape"
        return "invalid UTF-8 bytes"
    if _SURROGATE_ESCAPE.search(line):   # cheap pre-check; valid surrogate pairs (emoji) pass the full check
        bad = invalid_unicode(obj)
        if bad is not None:
            return f"{bad} holds a lone surrogate escape (e.g. \\ud800): not valid Unicode, no tokenizer can encode it"
    return None


def iter_jsonl(path: str | Path, *, on_bad_line: str = "error", bad: BadLines | None = None,
               require: Callable[[Any], str | None] | None = None,
               offer_skip: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file (1-based line numbers).

    A line is bad when it is not JSON, not valid Unicode (module docstring) or fails `require`. A damaged compressed
    file raises `DamagedFileError` (whatever `on_bad_line` says) once its readable lines have been yielded.

    Args:
        on_bad_line: ``error`` raises `DataFormatError` naming file and line; ``skip`` counts the line in `bad`.
        require: optional check of a parsed object; returns None if fine, else the reason it is malformed.
        offer_skip: the error tells the user to pass on_bad_line='skip' (False where the caller has no such option,
            e.g. the evaluation readers).
    """
    check_choice("on_bad_line", on_bad_line, ON_BAD_LINE)
    with open_text(path, errors="surrogateescape") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except DamagedFileError as e:
                raise DamagedFileError(f"{e}; {lineno} line(s) were readable before it") from None
            except OSError as e:
                raise DamagedFileError(f"{path}: cannot read past line {lineno}: {e}") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
                why = _line_problem(line, obj)
                if why is None and require is not None:
                    why = require(obj)
            except json.JSONDecodeError as e:
                why = f"malformed JSON: {e.msg}, column {e.colno}"
            if why is not None:
                where = f"{path}:{lineno}: {why}"
                if on_bad_line == "error":
                    hint = " (pass on_bad_line='skip' to skip and count such lines)" if offer_skip else ""
                    raise DataFormatError(where + hint)
                if bad is not None:
                    bad.add(where)
                continue
            yield lineno, obj


def text_field_check(field: str) -> Callable[[Any], str | None]:
    """A `iter_jsonl` check: the object has a string `field`."""
    def check(obj: Any) -> str | None:
        if not isinstance(obj, dict):
            return f"expected a JSON object, got {type(obj).__name__}"
        if not isinstance(obj.get(field), str):
            return f"no string field {field!r} (keys: {sorted(obj)[:10]})"
        return None
    return check


def load_json(path: str | Path) -> Any:
    """The JSON document in `path` (optionally .gz/.zst); malformed JSON, text that is not valid Unicode and a damaged
    compressed file raise `DataFormatError` naming the file (and line, or the JSON path of the bad string)."""
    path = Path(path)
    try:
        with open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    bad = invalid_unicode(obj) if _SURROGATE_ESCAPE.search(text) else None
    if bad is not None:
        raise DataFormatError(f"{path}: {bad} holds a lone surrogate escape (e.g. \\ud800): not valid Unicode; fix "
                              "or drop that entry")
    return obj


def require_fields(obj: Any, fields: Iterable[str], where: str) -> None:
    """Raise DataFormatError naming `where` (file:line) if `obj` is not an object holding every field."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing}; present: {sorted(obj)}")

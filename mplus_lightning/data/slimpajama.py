"""SlimPajama long-document buckets (stages 2/3): the builder the official repo lacks, and a reader.

Build (paper App. C)::

    python -m mplus_lightning.data.slimpajama build --src DIR --tokenizer PATH --out DIR --per-bucket N [--seed S]

reads SlimPajama-627B's ``chunk*/example_*.jsonl.zst`` (fields ``text`` and ``meta.redpajama_set_name``), counts each
document's tokens with the given tokenizer (no special tokens), and writes ``N`` documents per bucket::

    4k-8k    [4096, 8192) tokens          16k-32k  [16384, 32768)
    8k-16k   [8192, 16384)                32k-64k  [32768, 65536)     (64k+ is counted in the statistics, dropped)

How it works, and why it can be interrupted at any point:

1. *Scan* (the expensive pass; ``--workers`` processes): one result file per source file under ``OUT/.build/scan``
   (line number, token count and set of every document of >= 4k tokens, plus per-set counts of every length bin).
   A finished source file is never scanned again. Documents of fewer than 4,096 UTF-8 bytes cannot have 4,096 tokens
   (every token of a byte-level BPE such as Llama-3's covers at least one byte), so they are counted as "<4k"
   without tokenizing (``--no-byte-prefilter`` tokenizes everything).
2. *Select*: per bucket, the ``N`` documents with the smallest ``hash(seed, file, line)`` (bottom-k sampling: a
   uniform sample without replacement that does not depend on the scan order or the number of workers); the next
   ``--val-per-bucket`` become a disjoint validation set. Buckets with fewer documents keep them all (a warning).
3. *Write*: the chosen lines are copied, in source order, to ``OUT/<bucket>/shard_00000.jsonl``, ... (JSON lines
   ``{"id", "text", "num_tokens", "redpajama_set_name"}``, ``--docs-per-shard`` per shard) and
   ``OUT/val/<bucket>/...``. ``OUT/.build/write.json`` records the progress after every source file; a re-run
   truncates the shards back to that point and continues.
4. *Finish*: ``OUT/<bucket>/index.npz`` (shard, byte offset, token count of every document, for random access),
   ``OUT/stats.json`` (the paper's Table 4: documents per bucket and share per ``redpajama_set_name``, for the whole
   scanned corpus and for the sample; also printed) and ``OUT/manifest.json``.

A damaged source file (a truncated .zst) stops the build with its name; ``--on-bad-file skip`` leaves such files out
whole, counted in ``stats.json`` (``corpus.bad_files_skipped``, ``corpus.documents_lost``) and the printed table, as
``--on-bad-line skip`` does for malformed lines (lines whose text is not valid Unicode included).

Re-running the same command after an interruption continues where it stopped; re-running with another seed or N
redoes only steps 2-4. ``--stop-after-files K`` processes at most K source files and exits (to split a build over
several jobs, and in tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..typed_config import ConfigError
from .files import (
    ON_BAD_FILE,
    ON_BAD_LINE,
    BadLines,
    DamagedFileError,
    DataFormatError,
    check_choice,
    invalid_unicode,
    iter_jsonl,
    open_text,
)
from .fineweb import natural_key
from .sample import SampleRule
from .stream import SourceSpec, StreamParams, TextDocuments, TokenizedDataModule
from .tokenizer import encode, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

BUCKETS: dict[str, tuple[int, int]] = {
    "4k-8k": (4096, 8192), "8k-16k": (8192, 16384), "16k-32k": (16384, 32768), "32k-64k": (32768, 65536)}
"""Training buckets: name -> [lo, hi) token counts."""
STAT_BINS: dict[str, tuple[int, float]] = {"<4k": (0, 4096), **BUCKETS, "64k-128k": (65536, 131072),
                                            "128k+": (131072, float("inf"))}
"""Bins of the statistics (the paper's Table 4 lists the last six)."""
PAPER_TABLE4 = {"4k-8k": 11_189_999, "8k-16k": 4_706_687, "16k-32k": 1_607_064, "32k-64k": 443_438,
                "64k-128k": 192_515, "128k+": 98_097}
"""Documents per bin in the whole SlimPajama-627B with the Llama-3.1 tokenizer (paper Table 4), for comparison."""

SRC_LAYOUT = """expected SlimPajama-627B's training files:
  SRC/chunk1/example_train_0.jsonl.zst ... SRC/chunk10/example_train_*.jsonl.zst
  (SRC is the dataset's `train` folder; the dataset root that holds train/ works too), one JSON object per line with
  "text" and "meta": {"redpajama_set_name": ...}.
Download on a machine with internet (one chunk is ~1/10 of the corpus):
  huggingface-cli download cerebras/SlimPajama-627B --repo-type dataset --include 'train/chunk1/*' --local-dir DIR"""
BUCKETS_LAYOUT = """expected buckets built by `python -m mplus_lightning.data.slimpajama build`:
  DIR/4k-8k/shard_00000.jsonl ... DIR/4k-8k/index.npz   (likewise 8k-16k, 16k-32k, 32k-64k)
  or the official layout DIR/<bucket>/chunk_<i>.jsonl (JSON lines with "text"; token counts are then unknown)"""

BUILD, SCAN, WRITE_PROGRESS, INDEX = ".build", "scan", "write.json", "index.npz"
BUILDER_SKIP_HINT = (" (pass --on-bad-file skip to leave damaged files out; their documents are lost and counted in "
                     "stats.json; or replace the file and re-run)")


# --------------------------------------------------------------------------------------------------- helpers

def find_source_files(src: str | Path) -> tuple[Path, list[Path]]:
    """The folder that holds ``chunk*/`` and its ``example_*.jsonl.zst`` files in natural order."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"SlimPajama source {str(root)!r} does not exist; {SRC_LAYOUT}")
    for base in (root, root / "train"):
        files = sorted(base.glob("chunk*/example_*.jsonl.zst"), key=lambda p: natural_key(p.relative_to(base)))
        if files:
            return base, files
    raise FileNotFoundError(f"no chunk*/example_*.jsonl.zst under {str(root)!r}; {SRC_LAYOUT}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic): a fast, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def selection_keys(seed: int, rel: str, lines: np.ndarray) -> np.ndarray:
    """``hash(seed, file, line)`` for bottom-k sampling; depends on nothing else (order, workers, other files)."""
    base = (np.uint64(zlib.crc32(rel.encode())) << np.uint64(32)) | lines.astype(np.uint64)
    return _mix64(base ^ _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64)))


def _bin_of(n: int) -> str:
    for name, (lo, hi) in STAT_BINS.items():
        if lo <= n < hi:
            return name
    raise AssertionError(n)


def _record_check(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("text"), str):
        return f"no string field 'text' (keys: {sorted(obj)[:10]})"
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return f"'meta' is {type(meta).__name__}, not an object"
    return None


def _set_name(obj: dict) -> str:
    name = (obj.get("meta") or {}).get("redpajama_set_name")
    return name if isinstance(name, str) else "unknown"


# --------------------------------------------------------------------------------------------------- scan

_TOKENIZER: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


def scan_file(path: Path, rel: str, tokenizer: Any, *, byte_prefilter: bool = True, on_bad_line: str = "error",
              on_bad_file: str = "error") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-set bin counts of one source file, and (line, tokens, set) of its documents in the training buckets.

    A damaged file raises `DamagedFileError`, or with ``on_bad_file="skip"`` counts as empty: its meta then names the
    damage (``bad_file``) and the documents read before it (``documents_lost``).
    """
    lo_bucket, hi_bucket = min(lo for lo, _ in BUCKETS.values()), max(hi for _, hi in BUCKETS.values())
    counts: dict[str, Counter] = defaultdict(Counter)
    sets: list[str] = []
    set_ix: dict[str, int] = {}
    lines, ntoks, setids = [], [], []
    bad = BadLines()
    docs = 0
    try:
        for lineno, obj in iter_jsonl(path, on_bad_line=on_bad_line, bad=bad, require=_record_check):
            docs += 1
            text, name = obj["text"], _set_name(obj)
            if byte_prefilter and len(text.encode("utf-8")) < lo_bucket:
                n = 0  # fewer bytes than 4096 -> fewer tokens than 4096
            else:
                n = len(encode(tokenizer, text))
            counts[name][_bin_of(n)] += 1
            if lo_bucket <= n < hi_bucket:
                if name not in set_ix:
                    set_ix[name] = len(sets)
                    sets.append(name)
                lines.append(lineno)
                ntoks.append(n)
                setids.append(set_ix[name])
    except DamagedFileError as e:
        if on_bad_file == "error":
            raise DamagedFileError(f"{e}{BUILDER_SKIP_HINT}") from None
        log.warning("left out (--on-bad-file skip) with the %d documents read from it: %s", docs, e)
        empty = np.zeros(0, dtype=np.int64)
        return ({"file": rel, "documents": 0, "bad_lines": bad.count, "first_bad_line": bad.first, "sets": [],
                 "counts": {}, "bad_file": str(e), "documents_lost": docs},
                {"line": empty, "ntok": empty, "set": empty})
    meta = {"file": rel, "documents": docs, "bad_lines": bad.count, "first_bad_line": bad.first, "sets": sets,
            "counts": {k: dict(v) for k, v in counts.items()}}
    arrays = {"line": np.asarray(lines, dtype=np.int64), "ntok": np.asarray(ntoks, dtype=np.int64),
              "set": np.asarray(setids, dtype=np.int64)}
    return meta, arrays


def _scan_path(out: Path, index: int) -> Path:
    return out / BUILD / SCAN / f"{index:06d}.npz"


def _save_scan(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    _atomic_write(path, buf.getvalue())


def _load_scan(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(path) as z:
        return json.loads(str(z["meta"])), {k: z[k] for k in ("line", "ntok", "set")}


def _scan_task(args: tuple[int, str, str, str, bool, str, str]) -> tuple[int, dict[str, Any]]:
    index, path, rel, out, prefilter, on_bad_line, on_bad_file = args
    meta, arrays = scan_file(Path(path), rel, _TOKENIZER, byte_prefilter=prefilter, on_bad_line=on_bad_line,
                             on_bad_file=on_bad_file)
    _save_scan(_scan_path(Path(out), index), meta, arrays)
    return index, meta


# --------------------------------------------------------------------------------------------------- build

@dataclass
class BuildResult:
    complete: bool
    """False when `stop_after_files` stopped the run early: run again to continue."""
    out: Path
    stats: dict[str, Any] | None = None


@dataclass
class _Pick:
    target: str  # "4k-8k" or "val/4k-8k"
    ntok: int
    set_name: str


def build_buckets(src: str | Path, tokenizer: str | Path, out: str | Path, per_bucket: int, *, seed: int = 0,
                  val_per_bucket: int = 0, docs_per_shard: int = 1000, workers: int = 1, byte_prefilter: bool = True,
                  max_files: int | None = None, stop_after_files: int | None = None, on_bad_line: str = "error",
                  on_bad_file: str = "error", progress: bool = True) -> BuildResult:
    """Build (or continue building) the long-document buckets; see the module docstring.

    Args:
        src: SlimPajama's train folder (``chunk*/example_*.jsonl.zst``).
        tokenizer: local tokenizer directory (the training model's tokenizer).
        out: output folder.
        per_bucket: documents per training bucket (official: 200,000).
        seed: the sampling seed.
        val_per_bucket: extra documents per bucket, disjoint from the training ones, written under ``OUT/val/``.
        docs_per_shard: documents per output shard.
        workers: scanning processes.
        byte_prefilter: count documents of < 4,096 bytes as < 4k tokens without tokenizing.
        max_files: only the first `max_files` source files make up the corpus (a subset build).
        stop_after_files: process at most this many source files in this call, then return ``complete=False``.
        on_bad_line: ``error`` or ``skip`` (skip and count malformed lines).
        on_bad_file: ``error`` or ``skip`` (leave damaged source files out whole, counted in the statistics).
        progress: show progress bars.
    """
    from tqdm.auto import tqdm

    if per_bucket < 1 or val_per_bucket < 0 or docs_per_shard < 1 or workers < 1:
        raise ConfigError(f"need per_bucket >= 1 ({per_bucket}), val_per_bucket >= 0 ({val_per_bucket}), "
                         f"docs_per_shard >= 1 ({docs_per_shard}), workers >= 1 ({workers})")
    check_choice("on_bad_line", on_bad_line, ON_BAD_LINE)
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    base, files = find_source_files(src)
    if max_files is not None:
        files = files[:max_files]
    rels = [f.relative_to(base).as_posix() for f in files]
    out = Path(out)
    (out / BUILD / SCAN).mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    fingerprint = tokenizer_fingerprint(tok)

    # The scan results are valid only for the same tokenizer, files and scan options.
    # (Not on_bad_file: a damaged file has no scan result in error mode, and one left out by skip is refused below.)
    scan_cfg = {"tokenizer": fingerprint, "files": rels, "byte_prefilter": byte_prefilter, "on_bad_line": on_bad_line,
                "buckets": BUCKETS}
    cfg_path = out / BUILD / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        diff = [k for k in scan_cfg if old.get(k) != json.loads(json.dumps(scan_cfg[k]))]
        if diff:
            raise ConfigError(f"{out} holds a build started with a different {', '.join(diff)}; use a new --out or "
                             f"delete {out / BUILD} to start over")
    else:
        _atomic_write(cfg_path, json.dumps(scan_cfg, indent=1).encode())

    budget = float("inf") if stop_after_files is None else stop_after_files

    # 1. scan
    pending = [i for i in range(len(files)) if not _scan_path(out, i).is_file()]
    todo = pending[: int(min(len(pending), budget))]
    if todo:
        bar = tqdm(total=len(files), initial=len(files) - len(pending), desc="scan", unit="file", disable=not progress)
        tasks = [(i, str(files[i]), rels[i], str(out), byte_prefilter, on_bad_line, on_bad_file) for i in todo]
        long_docs = 0
        if workers == 1:
            global _TOKENIZER
            _TOKENIZER = tok
            results = map(_scan_task, tasks)
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer),))
            results = pool.imap_unordered(_scan_task, tasks)
        try:
            for _, meta in results:
                long_docs += sum(sum(v for k, v in c.items() if k in BUCKETS) for c in meta["counts"].values())
                bar.update(1)
                bar.set_postfix(long_docs=long_docs)
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()
        budget -= len(todo)
        if len(todo) < len(pending):
            return BuildResult(False, out)

    # 2. select
    metas, picks, selected = _select(out, rels, per_bucket, val_per_bucket, seed)
    left_out = [i for i, m in enumerate(metas) if m.get("bad_file")]
    if left_out and on_bad_file == "error":
        i = left_out[0]
        raise DamagedFileError(f"{metas[i]['bad_file']} (left out by an earlier --on-bad-file skip run, as are "
                               f"{len(left_out) - 1} more): pass --on-bad-file skip, or replace the file, delete "
                               f"{_scan_path(out, i)} and re-run")
    digest = hashlib.sha1(json.dumps([seed, per_bucket, val_per_bucket, docs_per_shard,
                                      {k: sorted(v) for k, v in selected.items()}]).encode()).hexdigest()

    # 3. write
    targets = [b for b in BUCKETS] + ([f"val/{b}" for b in BUCKETS] if val_per_bucket else [])
    prog_path = out / BUILD / WRITE_PROGRESS
    prog = json.loads(prog_path.read_text()) if prog_path.is_file() else None
    if prog is None or prog.get("digest") != digest:
        if prog is not None:
            log.warning("%s: the selection changed (seed / per-bucket / files); rewriting the shards", out)
        for t in list(BUCKETS) + ["val"]:
            shutil.rmtree(out / t, ignore_errors=True)
        for name in ("stats.json", "manifest.json"):
            (out / name).unlink(missing_ok=True)
        prog = {"digest": digest, "next_file": 0, "written": {t: 0 for t in targets}, "done": False}
        _atomic_write(prog_path, json.dumps(prog).encode())
    if not prog["done"]:
        for t in targets:
            _truncate(out / t, prog["written"][t], docs_per_shard)
        remaining = [i for i in range(prog["next_file"], len(files))]
        bar = tqdm(total=len(files), initial=prog["next_file"], desc="write", unit="file", disable=not progress)
        try:
            for i in remaining:
                if budget <= 0:
                    return BuildResult(False, out)
                wanted = picks.get(i, {})
                if wanted:
                    _copy_lines(files[i], rels[i], wanted, out, prog["written"], docs_per_shard)
                prog["next_file"] = i + 1
                _atomic_write(prog_path, json.dumps(prog).encode())
                budget -= 1
                bar.update(1)
        finally:
            bar.close()
        prog["done"] = True
        _atomic_write(prog_path, json.dumps(prog).encode())

    # 4. finish
    order = _write_order(picks)
    for t in targets:
        _write_index(out / t, order.get(t, []), docs_per_shard)
    stats = _stats(metas, order, per_bucket, val_per_bucket, seed, str(tokenizer), fingerprint)
    _atomic_write(out / "stats.json", json.dumps(stats, indent=1).encode())
    manifest = {"builder": "mplus_lightning.data.slimpajama", "buckets": BUCKETS, "per_bucket": per_bucket,
                "val_per_bucket": val_per_bucket, "seed": seed, "docs_per_shard": docs_per_shard,
                "tokenizer": str(tokenizer), "tokenizer_fingerprint": fingerprint, "source": str(base),
                "source_files": len(files), "byte_prefilter": byte_prefilter,
                "documents": {t: len(order.get(t, [])) for t in targets}}
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    for b in BUCKETS:
        if len(order.get(b, [])) < per_bucket:
            log.warning("bucket %s has only %d documents (wanted %d)", b, len(order.get(b, [])), per_bucket)
    if progress:
        print(format_stats(stats))
    return BuildResult(True, out, stats)


def _select(out: Path, rels: list[str], per_bucket: int, val_per_bucket: int, seed: int
            ) -> tuple[list[dict[str, Any]], dict[int, dict[int, _Pick]], dict[str, list[list[int]]]]:
    """Bottom-k per bucket over all scan results: {file: {line: pick}}."""
    metas = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("file", "line", "ntok", "key")}
    set_names: list[list[str]] = []
    set_cols: list[np.ndarray] = []
    for i, rel in enumerate(rels):
        meta, arr = _load_scan(_scan_path(out, i))
        if meta["file"] != rel:
            raise RuntimeError(f"{_scan_path(out, i)} belongs to {meta['file']}, not {rel}: delete {out / BUILD}")
        metas.append(meta)
        cols["file"].append(np.full(len(arr["line"]), i, dtype=np.int64))
        cols["line"].append(arr["line"])
        cols["ntok"].append(arr["ntok"])
        cols["key"].append(selection_keys(seed, rel, arr["line"]))
        set_names.append(meta["sets"])
        set_cols.append(arr["set"])
    cat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in cols.items()}
    names = [set_names[f][s] for f, s in zip(cat["file"].tolist(), np.concatenate(set_cols).tolist())] if set_cols \
        else []
    picks: dict[int, dict[int, _Pick]] = defaultdict(dict)
    selected: dict[str, list[list[int]]] = {}
    for b, (lo, hi) in BUCKETS.items():
        idx = np.nonzero((cat["ntok"] >= lo) & (cat["ntok"] < hi))[0]
        idx = idx[np.argsort(cat["key"][idx], kind="stable")]
        for target, chosen in ((b, idx[:per_bucket]), (f"val/{b}", idx[per_bucket:per_bucket + val_per_bucket])):
            selected[target] = []
            for j in chosen.tolist():
                f, line = int(cat["file"][j]), int(cat["line"][j])
                picks[f][line] = _Pick(target, int(cat["ntok"][j]), names[j])
                selected[target].append([f, line])
    return metas, dict(picks), selected


def _write_order(picks: dict[int, dict[int, _Pick]]) -> dict[str, list[tuple[str, int, str]]]:
    """Per target, (id, tokens, set) in the order the documents are written (source file, then line)."""
    order: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for f in sorted(picks):
        for line in sorted(picks[f]):
            p = picks[f][line]
            order[p.target].append((f"{f}:{line}", p.ntok, p.set_name))
    return order


def _shard(folder: Path, k: int) -> Path:
    return folder / f"shard_{k:05d}.jsonl"


def _truncate(folder: Path, written: int, per_shard: int) -> None:
    """Cut a target's shards back to its first `written` documents (undo a half-written source file)."""
    folder.mkdir(parents=True, exist_ok=True)
    full, rows = divmod(written, per_shard)  # shards 0..full-1 are complete; shard `full` holds `rows` documents
    for p in folder.glob("shard_*.jsonl"):
        k = int(p.stem.split("_")[1])
        if k > full or (k == full and rows == 0):
            p.unlink()
    if rows:
        last = _shard(folder, full)
        with open(last, "r+b") as fh:
            for n in range(rows):
                if not fh.readline():
                    raise RuntimeError(f"{last} has {n} documents, the progress file says {rows}; delete {folder}"
                                       " and the build's write.json to rewrite the shards")
            fh.truncate(fh.tell())


def _copy_lines(path: Path, rel: str, wanted: dict[int, _Pick], out: Path, written: dict[str, int],
                per_shard: int) -> None:
    """Append the wanted lines of one source file to their targets' shards, then flush them to disk."""
    handles: dict[Path, Any] = {}
    try:
        remaining = len(wanted)
        with open_text(path) as fh:
            lineno = 0
            while remaining:
                line = fh.readline()
                if not line:
                    raise DataFormatError(f"{path}: ended at line {lineno}, but line(s) "
                                          f"{sorted(set(wanted) - set(range(lineno + 1)))[:5]} were chosen when it was"
                                          " scanned: the file changed; delete the build folder and start over")
                lineno += 1
                pick = wanted.get(lineno)
                if pick is None:
                    continue
                remaining -= 1
                obj = json.loads(line)
                rec = {"id": f"{rel}:{lineno}", "text": obj["text"], "num_tokens": pick.ntok,
                       "redpajama_set_name": pick.set_name}
                n = written[pick.target]
                shard = _shard(out / pick.target, n // per_shard)
                if shard not in handles:
                    handles[shard] = open(shard, "ab")
                handles[shard].write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                written[pick.target] = n + 1
    finally:
        for h in handles.values():
            h.flush()
            os.fsync(h.fileno())
            h.close()


def _write_index(folder: Path, order: list[tuple[str, int, str]], per_shard: int) -> None:
    """``index.npz``: byte offset, shard and token count of every document (random access without a scan)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, rows, offsets = [], [], []
    k = 0
    while len(offsets) < len(order):
        path = _shard(folder, k)
        pos = 0
        with open(path, "rb") as fh:
            for r, line in enumerate(fh):
                shards.append(k)
                rows.append(r)
                offsets.append(pos)
                pos += len(line)
        k += 1
    if len(offsets) != len(order) or _shard(folder, k).exists():
        raise RuntimeError(f"{folder}: the shards hold {len(offsets)} documents, expected {len(order)}")
    sets = sorted({s for _, _, s in order})
    import io

    buf = io.BytesIO()
    np.savez(buf, shard=np.asarray(shards, dtype=np.int32), row=np.asarray(rows, dtype=np.int32),
             offset=np.asarray(offsets, dtype=np.int64),
             num_tokens=np.asarray([n for _, n, _ in order], dtype=np.int64),
             set=np.asarray([sets.index(s) for _, _, s in order], dtype=np.int16), set_names=np.array(json.dumps(sets)))
    _atomic_write(folder / INDEX, buf.getvalue())


def _stats(metas: list[dict[str, Any]], order: dict[str, list[tuple[str, int, str]]], per_bucket: int,
           val_per_bucket: int, seed: int, tokenizer: str, fingerprint: str) -> dict[str, Any]:
    by_bin: dict[str, Counter] = {b: Counter() for b in STAT_BINS}
    total, bad, lost = 0, 0, 0
    bad_files = []
    for m in metas:
        total += m["documents"]
        bad += m["bad_lines"]
        if m.get("bad_file"):
            bad_files.append(m["bad_file"])
            lost += m["documents_lost"]
        for set_name, c in m["counts"].items():
            for b, n in c.items():
                by_bin[b][set_name] += n

    def shares(c: Counter) -> dict[str, float]:
        n = sum(c.values())
        return {k: round(v / n, 6) for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))} if n else {}

    corpus = {b: {"documents": sum(c.values()), "share_by_set": shares(c), "documents_by_set": dict(c),
                  "used": b in BUCKETS} for b, c in by_bin.items()}
    sampled = {}
    for b in BUCKETS:
        docs = order.get(b, [])
        sampled[b] = {"documents": len(docs), "wanted": per_bucket,
                      "val_documents": len(order.get(f"val/{b}", [])),
                      "mean_tokens": round(float(np.mean([n for _, n, _ in docs])), 1) if docs else 0.0,
                      "share_by_set": shares(Counter(s for _, _, s in docs))}
    return {"corpus": {"source_files": len(metas), "documents": total, "bad_lines_skipped": bad,
                       "bad_files_skipped": bad_files, "documents_lost": lost, "bins": corpus},
            "sampled": sampled, "paper_table4_documents": PAPER_TABLE4, "seed": seed, "per_bucket": per_bucket,
            "val_per_bucket": val_per_bucket, "tokenizer": tokenizer, "tokenizer_fingerprint": fingerprint,
            "bins_tokens": {b: [lo, None if hi == float("inf") else hi] for b, (lo, hi) in STAT_BINS.items()}}


def format_stats(stats: dict[str, Any], top: int = 4) -> str:
    """The statistics as a text table (corpus bins like the paper's Table 4, then the sample)."""
    c = stats["corpus"]
    lines = [f"SlimPajama scan: {c['documents']:,} documents in {c['source_files']} files"
             + (f" ({c['bad_lines_skipped']} malformed lines skipped)" if c["bad_lines_skipped"] else "")
             + (f" ({len(c['bad_files_skipped'])} damaged files left out, losing at least {c['documents_lost']:,} "
                "documents)" if c.get("bad_files_skipped") else ""),
             f"{'bin':<9} {'documents':>12} {'paper (full)':>13}  largest sets"]
    for b, row in c["bins"].items():
        sets = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(row["share_by_set"].items())[:top])
        paper = stats["paper_table4_documents"].get(b)
        paper_s = "" if paper is None else f"{paper:,}"
        lines.append(f"{b:<9} {row['documents']:>12,} {paper_s:>13}  {sets}"
                     + ("" if row["used"] or b == "<4k" else "  (dropped)"))
    lines.append(f"sample (seed {stats['seed']}, {stats['per_bucket']:,} per bucket):")
    for b, row in stats["sampled"].items():
        sets = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(row["share_by_set"].items())[:top])
        lines.append(f"{b:<9} {row['documents']:>12,} docs, mean {row['mean_tokens']:,.0f} tokens"
                     + (f", {row['val_documents']:,} val" if row["val_documents"] else "") + f"  {sets}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- reader

class BucketDocuments(TextDocuments):
    """One bucket folder: random access to its documents; token counts from ``index.npz`` when it exists.

    Without an index (the official ``chunk_<i>.jsonl`` layout) the line offsets are found by reading the files once,
    and documents are tokenized to learn their lengths.
    """

    def __init__(self, folder: str | Path, tokenizer: Any, name: str | None = None):
        self.folder = Path(folder)
        super().__init__(tokenizer, name or self.folder.name)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"bucket folder {str(self.folder)!r} does not exist; {BUCKETS_LAYOUT}")
        index = self.folder / INDEX
        self.num_tokens: np.ndarray | None = None
        if index.is_file():
            with np.load(index) as z:
                self.shard_ix, self.rows, self.offsets = z["shard"], z["row"], z["offset"]
                self.num_tokens = z["num_tokens"]
            self.files = [_shard(self.folder, k) for k in range(int(self.shard_ix.max()) + 1)] if len(
                self.offsets) else []
        else:
            self.files = sorted(self.folder.glob("*.jsonl"), key=natural_key)
            shard_ix, rows, offsets = [], [], []
            for k, path in enumerate(self.files):
                pos = 0
                with open(path, "rb") as fh:
                    for r, line in enumerate(fh):
                        if line.strip():
                            shard_ix.append(k)
                            rows.append(r)
                            offsets.append(pos)
                        pos += len(line)
            self.shard_ix, self.rows = np.asarray(shard_ix, dtype=np.int32), np.asarray(rows, dtype=np.int32)
            self.offsets = np.asarray(offsets, dtype=np.int64)
        if len(self.offsets) == 0:
            raise ConfigError(f"bucket {self.name!r} at {str(self.folder)!r} is empty (no documents); {BUCKETS_LAYOUT}")
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.offsets)

    def length_hint(self, index: int) -> int | None:
        return None if self.num_tokens is None else int(self.num_tokens[index])

    def doc_id(self, index: int) -> str:
        return f"{self.name}/{self.files[int(self.shard_ix[index])].name}:{int(self.rows[index]) + 1}"

    def text(self, index: int) -> str:
        k = int(self.shard_ix[index])
        fh = self._handles.get(k)
        if fh is None:
            fh = self._handles[k] = open(self.files[k], "rb")
        fh.seek(int(self.offsets[index]))
        line = fh.readline()
        where = f"{self.files[k]}:{int(self.rows[index]) + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: malformed JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{where}: invalid UTF-8 bytes ({e.reason})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataFormatError(f"{where}: no string field 'text'")
        if invalid_unicode(obj["text"]) is not None:
            raise DataFormatError(f"{where}: 'text' holds a lone surrogate (e.g. a \\ud800 escape): not valid "
                                  "Unicode, no tokenizer can encode it; fix or drop the line")
        return obj["text"]


@dataclass
class BucketSource:
    """The long-document buckets and their tokenizer (data.kind=slimpajama)."""

    path: Optional[str] = None
    """The builder's --out folder, or its val subfolder, or the official long_data folder (required)."""
    tokenizer: Optional[str] = None
    """The local tokenizer directory the buckets were built with (required)."""
    buckets: list[str] = field(default_factory=lambda: list(BUCKETS))
    """Which buckets to read."""
    weights: Optional[dict[str, float]] = None
    """Relative share of samples per bucket, naming exactly `buckets` (null: equal)."""
    longdoc_min_length: int = 384
    """Shortest chunk and target of these documents, in tokens (official: 384)."""


@dataclass
class SlimPajamaParams(StreamParams, BucketSource):
    """`data.params` of data.kind=slimpajama (`SlimPajamaDataModule`): the long-document buckets alone."""

    rule: SampleRule = field(default_factory=lambda: SampleRule(pipeline="stage2_3"))


class SlimPajamaDataModule(TokenizedDataModule):
    """The long-document buckets -> samples with 384..512-token chunks (official ``longdoc_min_length``).

    Args:
        path: the builder's ``--out`` folder (or its ``val`` subfolder, or the official ``long_data`` folder).
        tokenizer: local tokenizer directory (the one the buckets were built with) or a loaded tokenizer.
        buckets: which buckets to read.
        weights: relative shares per bucket (default: equal).
        longdoc_min_length: shortest chunk and target of these documents.
        **kwargs: `SampleDataModule` options (rule, seed, num_workers, num_epochs, shuffle, vocab_size, ...).
            A rule that names no ``pipeline`` gets ``stage2_3`` (the repeat label is drawn after the split).
    """

    params_schema = SlimPajamaParams

    def __init__(self, path: str | Path, tokenizer: str | Path | Any, *,
                 buckets: Sequence[str] = tuple(BUCKETS), weights: dict[str, float] | None = None,
                 longdoc_min_length: int = 384, **kwargs: Any):
        kwargs["rule"] = SampleRule.from_any(kwargs.get("rule"), pipeline="stage2_3")  # the official stream's order
        super().__init__(tokenizer, **kwargs)
        self.path, self.buckets = Path(path), list(buckets)
        self.weights = {b: 1.0 for b in self.buckets} if weights is None else dict(weights)
        if set(self.weights) != set(self.buckets):
            raise ConfigError(f"weights {sorted(self.weights)} must name exactly the buckets {self.buckets}")
        self.longdoc_min_length = longdoc_min_length

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.sources()  # an empty or missing bucket is an error before training starts
        check_bucket_tokenizer(self.path, self.tokenizer)

    def train_sources(self) -> list[SourceSpec]:
        return bucket_sources(self.path, self.tokenizer, self.weights, self.longdoc_min_length)


def bucket_sources(buckets_dir: Path, tokenizer: Any, weights: dict[str, float], min_length: int
                   ) -> list[SourceSpec]:
    """One `SourceSpec` per bucket with a positive weight."""
    if not Path(buckets_dir).is_dir():
        raise FileNotFoundError(f"buckets folder {str(buckets_dir)!r} does not exist; {BUCKETS_LAYOUT}")
    return [SourceSpec(b, BucketDocuments(Path(buckets_dir) / b, tokenizer, name=b), w, min_length)
            for b, w in weights.items() if w > 0]


def check_bucket_tokenizer(buckets_dir: Path, tokenizer: Any) -> None:
    """Fail when the buckets were built with another tokenizer (their buckets and token counts would be wrong)."""
    mf = Path(buckets_dir) / "manifest.json"
    if mf.is_file():
        manifest = json.loads(mf.read_text())
        built = manifest.get("tokenizer_fingerprint")
        if built and built != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{buckets_dir} was built with another tokenizer ({manifest.get('tokenizer')}): its "
                             "buckets and token counts do not hold for this one; rebuild the buckets with the "
                             "training tokenizer")


# --------------------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mplus_lightning.data.slimpajama",
                                description="Build the SlimPajama long-document buckets (stages 2/3).")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="scan, sample and write the buckets (resumable: re-run to continue)")
    b.add_argument("--src", required=True, help="SlimPajama-627B train folder (chunk*/example_*.jsonl.zst)")
    b.add_argument("--tokenizer", required=True, help="local tokenizer directory (the training model's)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--per-bucket", type=int, required=True, help="documents per bucket (official: 200000)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--val-per-bucket", type=int, default=0, help="disjoint validation documents per bucket")
    b.add_argument("--docs-per-shard", type=int, default=1000)
    b.add_argument("--workers", type=int, default=1, help="scanning processes")
    b.add_argument("--max-files", type=int, default=None, help="use only the first N source files")
    b.add_argument("--stop-after-files", type=int, default=None, help="process at most N files in this run")
    b.add_argument("--no-byte-prefilter", action="store_true", help="tokenize documents of < 4096 bytes too")
    b.add_argument("--on-bad-line", choices=ON_BAD_LINE, default="error",
                   help="skip (and count) malformed lines instead of stopping")
    b.add_argument("--on-bad-file", choices=ON_BAD_FILE, default="error",
                   help="leave damaged (e.g. truncated) source files out whole, counted, instead of stopping")
    b.add_argument("--quiet", action="store_true", help="no progress bars or table")
    s = sub.add_parser("stats", help="print the statistics of a finished build")
    s.add_argument("out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "stats":
        print(format_stats(json.loads((Path(args.out) / "stats.json").read_text())))
        return 0
    try:
        res = build_buckets(args.src, args.tokenizer, args.out, args.per_bucket, seed=args.seed,
                            val_per_bucket=args.val_per_bucket, docs_per_shard=args.docs_per_shard,
                            workers=args.workers, byte_prefilter=not args.no_byte_prefilter, max_files=args.max_files,
                            stop_after_files=args.stop_after_files, on_bad_line=args.on_bad_line,
                            on_bad_file=args.on_bad_file, progress=not args.quiet)
    except (ConfigError, FileNotFoundError) as e:   # a user's mistake: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not res.complete:
        print(f"stopped early (--stop-after-files); re-run the same command to continue building {res.out}")
        return 3
    print(f"buckets written to {res.out} (statistics: {res.out / 'stats.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers and fixtures shared by the tests/test_data_*.py files: small files in the real formats, a tiny tokenizer.

(No tests here; the modules import what they use from this one.)
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

SYLLABLES = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "do", "pri", "an", "tor", "el", "gu", "nes", "bo", "qui"]
SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub"]


def words(n: int, seed: int) -> str:
    """`n` pseudo-words from a seeded generator (some punctuation, so BPE has something to learn)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        w = "".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 3)))
        out.append(w + ("." if i % 11 == 10 else ""))
    return " ".join(out)


def texts(n: int, seed: int = 0, lo: int = 3, hi: int = 900) -> list[str]:
    r = random.Random(seed)
    return [words(r.randint(lo, hi), seed * 100_003 + i) for i in range(n)]


def write_parquet(path: Path, rows: list[str], column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows, "id": [f"<urn:{i}>" for i in range(len(rows))]}), path, row_group_size=7)
    return path


def write_jsonl(path: Path, records: list, *, raw_lines: dict[int, str] | None = None) -> Path:
    """JSON lines (``.gz`` / ``.zst`` by suffix); `raw_lines` puts literal text at 0-based positions (bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    for i, raw in sorted((raw_lines or {}).items()):
        lines.insert(i, raw)
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE (vocab <= 512, pad/bos/eos = 0/1/2) trained on the pseudo-words."""
    from mplus_lightning.data.tokenizer import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(texts(300, seed=99), 512, out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from mplus_lightning.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def long_text(tok, target_tokens: int, seed: int) -> str:
    """A text of roughly `target_tokens` tokens (calibrated on a sample of the same generator)."""
    from mplus_lightning.data.tokenizer import encode

    sample = words(2000, seed + 7)
    per_word = len(encode(tok, sample)) / 2000
    return words(int(target_tokens / per_word), seed)


def make_slimpajama(root: Path, tok) -> dict:
    """SlimPajama-layout source: 3 files in chunk1/chunk2, short documents plus long ones in every bucket and one
    beyond 64k. Returns {"root", "docs": [(rel, line, text, set)]} for independent checks."""
    targets = [6000, 6500, 7000, 12000, 13000, 11000, 24000, 22000, 45000, 40000, 90000]
    files = ["chunk1/example_train_0.jsonl.zst", "chunk1/example_train_1.jsonl.zst", "chunk2/example_train_0.jsonl.zst"]
    per_file: dict[str, list[dict]] = {f: [] for f in files}
    r = random.Random(5)
    for i, t in enumerate(texts(36, seed=3, hi=400)):
        per_file[files[i % 3]].append({"text": t, "meta": {"redpajama_set_name": SETS[i % 2]}})
    for i, n in enumerate(targets):
        per_file[files[i % 3]].insert(r.randint(0, 5), {"text": long_text(tok, n, 1000 + i),
                                                       "meta": {"redpajama_set_name": SETS[i % len(SETS)]}})
    docs = []
    for f, recs in per_file.items():
        write_jsonl(root / f, recs)
        docs += [(f, line, rec["text"], rec["meta"]["redpajama_set_name"]) for line, rec in enumerate(recs, 1)]
    return {"root": root, "docs": docs}


@pytest.fixture(scope="session")
def slim_src(tmp_path_factory, tok) -> dict:
    return make_slimpajama(tmp_path_factory.mktemp("slim") / "train", tok)


@pytest.fixture(scope="session")
def slim_built(tmp_path_factory, slim_src, tok_dir) -> Path:
    """Buckets built from `slim_src`: 2 per bucket, 1 validation document per bucket."""
    from mplus_lightning.data.slimpajama import build_buckets

    out = tmp_path_factory.mktemp("buckets")
    res = build_buckets(slim_src["root"], tok_dir, out, 2, seed=0, val_per_bucket=1, docs_per_shard=1, progress=False)
    assert res.complete
    return out

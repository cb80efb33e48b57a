"""SlimPajama bucket builder (end to end, resume after interruption, statistics) and the bucket reader."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mplus_lightning.data import slimpajama as sp
from mplus_lightning.data.slimpajama import (
    BUCKETS,
    BucketDocuments,
    SlimPajamaDataModule,
    build_buckets,
    find_source_files,
)
from mplus_lightning.data.stream import DataFormatError
from mplus_lightning.data.tokenizer import encode, train_tiny_tokenizer

from .test_data_common import slim_built, slim_src, texts, tok, tok_dir, write_jsonl  # noqa: F401  (fixtures)


def bucket_of(n: int) -> str | None:
    return next((b for b, (lo, hi) in BUCKETS.items() if lo <= n < hi), None)


@pytest.fixture(scope="module")
def truth(slim_src, tok):
    """Token count and bucket of every source document, computed here independently of the builder."""
    return [(rel, line, text, s, len(encode(tok, text))) for rel, line, text, s in slim_src["docs"]]


def tree(root: Path) -> dict[str, bytes]:
    """Every output file (not the .build working folder) -> contents."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".build" not in p.parts}


def test_build_end_to_end(slim_built, truth, tok):
    by_bucket = Counter(bucket_of(n) for *_, n in truth)
    for b in BUCKETS:
        docs = BucketDocuments(slim_built / b, tok)
        assert len(docs) == min(2, by_bucket[b])
        for i in range(len(docs)):
            n = len(encode(tok, docs.text(i)))
            assert n == docs.length_hint(i) and bucket_of(n) == b
    # validation documents are disjoint from the training ones
    train_texts = {BucketDocuments(slim_built / b, tok).text(i) for b in BUCKETS for i in range(2)}
    val = BucketDocuments(slim_built / "val" / "4k-8k", tok)
    assert len(val) == 1 and val.text(0) not in train_texts
    rec = json.loads((slim_built / "4k-8k" / "shard_00000.jsonl").read_text())
    assert set(rec) == {"id", "text", "num_tokens", "redpajama_set_name"}
    assert re_match(r"chunk\d/example_train_\d\.jsonl\.zst:\d+", rec["id"])


def re_match(pattern, s):
    import re

    return re.fullmatch(pattern, s) is not None


def test_statistics_like_table_4(slim_built, truth):
    stats = json.loads((slim_built / "stats.json").read_text())
    bins = stats["corpus"]["bins"]
    assert stats["corpus"]["documents"] == len(truth)
    for b, (lo, hi) in sp.STAT_BINS.items():
        mine = Counter(s for *_, s, n in truth if lo <= n < hi)
        assert bins[b]["documents"] == sum(mine.values()), b
        assert bins[b]["documents_by_set"] == dict(mine), b
        if mine:
            assert sum(bins[b]["share_by_set"].values()) == pytest.approx(1.0, abs=1e-5)
    assert bins["64k-128k"]["documents"] == 1 and not bins["64k-128k"]["used"]
    assert {b: r["documents"] for b, r in stats["sampled"].items()} == {b: 2 for b in BUCKETS}
    assert stats["sampled"]["4k-8k"]["val_documents"] == 1
    manifest = json.loads((slim_built / "manifest.json").read_text())
    assert manifest["documents"]["4k-8k"] == 2 and manifest["per_bucket"] == 2


def test_resume_after_interruptions_gives_the_same_output(tmp_path, slim_src, tok_dir, slim_built, monkeypatch):
    out = tmp_path / "out"
    kw = dict(seed=0, val_per_bucket=1, docs_per_shard=1, progress=False)
    r = build_buckets(slim_src["root"], tok_dir, out, 2, stop_after_files=1, **kw)
    assert not r.complete and len(list((out / ".build" / "scan").glob("*.npz"))) == 1
    r = build_buckets(slim_src["root"], tok_dir, out, 2, stop_after_files=3, **kw)  # 2 scans + 1 written file
    assert not r.complete and json.loads((out / ".build" / "write.json").read_text())["next_file"] == 1
    # a crash in the middle of the next source file: lines were appended but the progress was not recorded
    real = sp._copy_lines

    def crash(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sp, "_copy_lines", crash)
    with pytest.raises(KeyboardInterrupt):
        build_buckets(slim_src["root"], tok_dir, out, 2, **kw)
    monkeypatch.setattr(sp, "_copy_lines", real)
    assert build_buckets(slim_src["root"], tok_dir, out, 2, **kw).complete
    assert tree(out) == tree(slim_built)


def test_seed_and_size_change_redo_only_the_selection(tmp_path, slim_src, tok_dir, tok, slim_built):
    out = tmp_path / "out"
    shutil.copytree(slim_built, out)
    picks = {}
    for seed in range(6):
        assert build_buckets(slim_src["root"], tok_dir, out, 1, seed=seed, docs_per_shard=1, progress=False).complete
        picks[seed] = tuple(BucketDocuments(out / b, tok).doc_id(0) + BucketDocuments(out / b, tok).text(0)[:20]
                            for b in ("4k-8k", "8k-16k"))
        assert not (out / "val").exists()
    assert len(set(picks.values())) > 1  # the seed moves the sample
    again = build_buckets(slim_src["root"], tok_dir, out, 1, seed=3, docs_per_shard=1, progress=False)
    assert again.complete and tuple(BucketDocuments(out / b, tok).doc_id(0) + BucketDocuments(out / b, tok).text(0)[
        :20] for b in ("4k-8k", "8k-16k")) == picks[3]


def test_another_tokenizer_is_refused(tmp_path, slim_src, slim_built):
    other = train_tiny_tokenizer(texts(50, seed=8), 300, tmp_path / "tok2")
    out = tmp_path / "out"
    shutil.copytree(slim_built, out)
    with pytest.raises(ValueError, match="different tokenizer"):
        build_buckets(slim_src["root"], tmp_path / "tok2", out, 2, progress=False)
    dm = SlimPajamaDataModule(slim_built, other)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        dm.setup("fit")


def test_bad_source_input(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*does not exist.*chunk1/example_train_0\.jsonl\.zst"):
        find_source_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no chunk\*/example_\*\.jsonl\.zst under"):
        find_source_files(tmp_path / "empty")
    src = tmp_path / "src"
    recs = [{"text": t, "meta": {"redpajama_set_name": "RedPajamaC4"}} for t in texts(6, seed=1)]
    write_jsonl(src / "train" / "chunk1" / "example_train_0.jsonl.zst", recs, raw_lines={4: "not json"})
    assert find_source_files(src)[0] == src / "train"  # the dataset root works too
    with pytest.raises(DataFormatError, match=r"example_train_0\.jsonl\.zst:5: malformed JSON"):
        build_buckets(src, tok_dir, tmp_path / "o1", 2, progress=False)
    res = build_buckets(src, tok_dir, tmp_path / "o2", 2, on_bad_line="skip", progress=False)
    assert res.stats["corpus"]["bad_lines_skipped"] == 1 and res.stats["corpus"]["documents"] == 6
    with pytest.raises(ValueError, match="is empty"):  # no long document at all -> empty buckets
        SlimPajamaDataModule(tmp_path / "o2", tok_dir).setup("fit")


def test_cli_prints_the_statistics(tmp_path, slim_src, tok_dir, capsys):
    code = sp.main(["build", "--src", str(slim_src["root"]), "--tokenizer", str(tok_dir), "--out",
                    str(tmp_path / "o"), "--per-bucket", "1", "--stop-after-files", "1", "--quiet"])
    assert code == 3 and "re-run the same command" in capsys.readouterr().out
    code = sp.main(["build", "--src", str(slim_src["root"]), "--tokenizer", str(tok_dir), "--out",
                    str(tmp_path / "o"), "--per-bucket", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "SlimPajama scan: 47 documents in 3 files" in out and "64k-128k" in out
    assert sp.main(["stats", str(tmp_path / "o")]) == 0 and "4k-8k" in capsys.readouterr().out


def test_datamodule_reads_long_document_samples(slim_built, tok_dir, tok):
    samples = []
    for b in BUCKETS:  # one bucket at a time: a finite mixture would end when its first source runs out
        dm = SlimPajamaDataModule(slim_built, tok_dir, seed=1, num_epochs=1, buckets=[b])
        dm.setup("fit")
        samples += list(dm.build_train_dataset())
    assert Counter(s.source for s in samples) == {b: 2 for b in BUCKETS} and len({s.doc_id for s in samples}) == 8
    for s in samples:
        assert all(384 <= c.numel() <= 512 for c in s.contexts)
        assert 384 <= s.target.numel() <= 2048
        lo, hi = BUCKETS[s.source]
        assert lo <= s.num_tokens < hi
        assert s.doc_id.startswith(f"{s.source}/shard_")


def test_official_bucket_layout_and_missing_or_empty_buckets(tmp_path, tok, slim_built):
    folder = tmp_path / "long_data" / "4k-8k"
    texts_ = [BucketDocuments(slim_built / "4k-8k", tok).text(i) for i in range(2)]
    write_jsonl(folder / "chunk_0.jsonl", [{"text": t} for t in texts_])
    docs = BucketDocuments(folder, tok)
    assert len(docs) == 2 and docs.length_hint(0) is None and docs.text(1) == texts_[1]
    with pytest.raises(FileNotFoundError, match=r"(?s)bucket folder .*8k-16k.* does not exist.*shard_00000\.jsonl"):
        SlimPajamaDataModule(tmp_path / "long_data", tok).setup("fit")
    (tmp_path / "e" / "4k-8k").mkdir(parents=True)
    (tmp_path / "e" / "4k-8k" / "chunk_0.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"bucket '4k-8k' at .* is empty"):
        SlimPajamaDataModule(tmp_path / "e", tok, buckets=["4k-8k"]).setup("fit")


def test_selection_keys_are_order_free():
    a = sp.selection_keys(3, "chunk1/x.jsonl.zst", np.arange(1, 100))
    b = sp.selection_keys(3, "chunk1/x.jsonl.zst", np.arange(99, 0, -1))
    assert np.array_equal(a, b[::-1]) and len(set(a.tolist())) == 99
    assert not np.array_equal(a, sp.selection_keys(4, "chunk1/x.jsonl.zst", np.arange(1, 100)))


def test_bucket_stream_survives_pickling(slim_built, tok):
    import pickle

    from mplus_lightning.data.stream import SampleStream

    ds = SampleStream(BucketDocuments(slim_built / "4k-8k", tok), num_epochs=1, rule={"min_length": 384})
    first = [(s.doc_id, s.target.tolist()) for s in ds]  # opens file handles in this process
    assert len(first) == 2
    assert [(s.doc_id, s.target.tolist()) for s in pickle.loads(pickle.dumps(ds))] == first


def test_buckets_take_a_document_at_their_lower_bound_and_not_at_their_upper(tmp_path):
    # [lo, hi): a 4096-token document is in 4k-8k, an 8192-token one in 8k-16k
    (tmp_path / sp.BUILD / sp.SCAN).mkdir(parents=True)
    meta = {"file": "chunk1/example_train_0.jsonl.zst", "documents": 3, "bad_lines": 0, "first_bad_line": "",
            "sets": ["s"], "counts": {}}
    sp._save_scan(sp._scan_path(tmp_path, 0), meta, {"line": np.array([1, 2, 3]),
                                                      "ntok": np.array([4096, 8191, 8192]), "set": np.array([0, 0, 0])})
    _, _, selected = sp._select(tmp_path, [meta["file"]], per_bucket=5, val_per_bucket=0, seed=0)
    assert sorted(selected["4k-8k"]) == [[0, 1], [0, 2]] and selected["8k-16k"] == [[0, 3]]
    assert [sp._bin_of(n) for n in (4095, 4096, 8191, 8192)] == ["<4k", "4k-8k", "4k-8k", "8k-16k"]

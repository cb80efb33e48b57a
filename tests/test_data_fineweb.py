"""fineweb-edu shards: HF parquet layout and jsonl(.gz), held-out validation, tokenization, bad input."""

import os

import pytest

from mplus_lightning.data.fineweb import FineWebDataModule, TextTable, find_text_files
from mplus_lightning.data.stream import DataFormatError
from mplus_lightning.data.tokenizer import encode

from .test_data_common import texts, tok, tok_dir, write_jsonl, write_parquet  # noqa: F401  (fixtures)

DUMP = "CC-MAIN-2024-10"


@pytest.fixture
def hf_layout(tmp_path):
    """data/CC-MAIN-2024-10/ with two parquet shards (natural order: 2 before 10) and another dump beside it."""
    docs = texts(60, seed=1, lo=1, hi=700)
    write_parquet(tmp_path / "data" / DUMP / "train-2-of-10.parquet", docs[:25])
    write_parquet(tmp_path / "data" / DUMP / "train-10-of-10.parquet", docs[25:])
    write_parquet(tmp_path / "data" / "CC-MAIN-2023-50" / "train-0.parquet", texts(5, seed=2))
    return tmp_path, docs


def dm_for(root, tok_dir, tmp_path, **kw):
    kw.setdefault("val_docs", 10)
    kw.setdefault("val_size", 4)
    return FineWebDataModule(root, tok_dir, cache_dir=tmp_path / "cache", progress=False, **kw)


def test_hf_layout_order_validation_and_training_are_disjoint(hf_layout, tok_dir, tok, tmp_path):
    root, docs = hf_layout
    dm = dm_for(root, tok_dir, tmp_path, num_epochs=1)
    dm.prepare_data()
    dm.setup("fit")
    table = dm.table()
    assert len(table) == 60  # the other dump is not read
    assert table.doc_id(0) == "train-2-of-10.parquet:0" and table.doc_id(25) == "train-10-of-10.parquet:0"
    assert [table.text(i) for i in range(60)] == docs
    val = dm.val_samples()
    assert [s.doc_id for s in val] == [table.doc_id(i) for i in range(4) if len(encode(tok, docs[i])) >= 2]
    for s in val:
        i = int(s.doc_id.split(":")[1])
        assert s.contexts == [] and s.target.tolist() == encode(tok, docs[i])[:2048]
    train = list(dm.build_train_dataset())
    held_out = {table.doc_id(i) for i in range(10)}
    assert train and not {s.doc_id for s in train} & held_out
    expected = {table.doc_id(i) for i in range(10, 60) if dm.rule.accepts(len(encode(tok, docs[i])))}
    assert {s.doc_id for s in train} == expected
    for s in train[:5]:
        i = 25 + int(s.doc_id.split(":")[1]) if s.doc_id.startswith("train-10") else int(s.doc_id.split(":")[1])
        assert [t for c in s.contexts for t in c.tolist()] + s.target.tolist() == encode(tok, docs[i])
        assert s.source == "fineweb"


def test_train_start_and_max_train_docs_select_a_range(hf_layout, tok_dir, tok, tmp_path):
    root, docs = hf_layout
    dm = dm_for(root, tok_dir, tmp_path, train_start=5, max_train_docs=20)
    dm.setup("fit")
    d = dm.train_documents()
    assert len(d) == 20 and d.text(0) == docs[15] and d.text(19) == docs[34]
    assert len(dm.table()) == 35  # only what is used is cached


def test_cache_is_reused_and_rebuilt_when_a_file_changes(hf_layout, tok_dir, tmp_path):
    root, docs = hf_layout
    first = dm_for(root, tok_dir, tmp_path).table().path
    stamp = os.stat(first / TextTable.DOCS).st_mtime_ns
    assert dm_for(root, tok_dir, tmp_path).table().path == first
    assert os.stat(first / TextTable.DOCS).st_mtime_ns == stamp
    write_parquet(root / "data" / DUMP / "train-10-of-10.parquet", docs[25:] + ["one more document"])
    again = dm_for(root, tok_dir, tmp_path).table()
    assert again.path != first and len(again) == 61


def test_jsonl_gz_layout_with_line_numbers(tmp_path, tok_dir):
    docs = texts(30, seed=4)
    write_jsonl(tmp_path / "fw" / "part-1.jsonl.gz", [{"text": t, "score": 3.1} for t in docs[:20]])
    write_jsonl(tmp_path / "fw" / "part-2.jsonl", [{"text": t} for t in docs[20:]])
    dm = dm_for(tmp_path / "fw", tok_dir, tmp_path, dump=None, val_docs=3, val_size=3)
    dm.setup("fit")
    t = dm.table()
    assert len(t) == 30 and t.doc_id(0) == "part-1.jsonl.gz:1" and t.doc_id(20) == "part-2.jsonl:1"
    assert t.text(29) == docs[29]
    assert len(dm.val_samples()) == 3


def test_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, tok_dir):
    good = [{"text": t} for t in texts(12, seed=5)]
    write_jsonl(tmp_path / "fw" / "bad.jsonl.gz", good, raw_lines={2: '{"text": "unterminated', 6: '{"txt": "x"}'})
    with pytest.raises(DataFormatError, match=r"bad\.jsonl\.gz:3: malformed JSON"):
        dm_for(tmp_path / "fw", tok_dir, tmp_path, dump=None, val_docs=2).setup("fit")
    dm = dm_for(tmp_path / "fw", tok_dir, tmp_path, dump=None, val_docs=2, on_bad_line="skip")
    dm.setup("fit")
    assert len(dm.table()) == 12
    assert dm.table().manifest["bad_lines"] == 2
    assert dm.table().manifest["first_bad_line"].endswith("bad.jsonl.gz:3: malformed JSON: Unterminated string "
                                                          "starting at, column 10")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl\.gz:7: no string field 'text' \(keys: \['txt'\]\)"):
        write_jsonl(tmp_path / "fw2" / "bad.jsonl.gz", good, raw_lines={6: '{"txt": "x"}'})
        dm_for(tmp_path / "fw2", tok_dir, tmp_path, dump=None, val_docs=2).setup("fit")


def test_parquet_without_text_column(tmp_path, tok_dir):
    write_parquet(tmp_path / "fw" / "x.parquet", ["a", "b"], column="content")
    with pytest.raises(DataFormatError, match=r"x\.parquet: no column 'text' \(columns: \['content', 'id'\]\)"):
        dm_for(tmp_path / "fw", tok_dir, tmp_path, dump=None).setup("fit")


def test_missing_paths_name_the_expected_layout(tmp_path, tok_dir, hf_layout):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*does not exist.*data/CC-MAIN-2024-10/\*\.parquet.*"
                                                 r"huggingface-cli download HuggingFaceFW/fineweb-edu"):
        find_text_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.parquet / \.jsonl.* files under"):
        find_text_files(tmp_path / "empty")
    root, _ = hf_layout
    with pytest.raises(FileNotFoundError, match=r"no dump folder 'CC-MAIN-1999-01' \(it has \['CC-MAIN-2023-50', "
                                                 r"'CC-MAIN-2024-10'\]\)"):
        find_text_files(root, "CC-MAIN-1999-01")


def test_errors_before_training(hf_layout, tok_dir, tmp_path):
    root, _ = hf_layout
    with pytest.raises(ValueError, match="no training documents left"):
        dm_for(root, tok_dir, tmp_path, val_docs=60).setup("fit")
    with pytest.raises(ValueError, match="but the model's vocab_size is 300"):
        dm_for(root, tok_dir, tmp_path, vocab_size=300).setup("fit")
    with pytest.raises(ValueError, match=r"need val_docs \(-1\)"):
        dm_for(root, tok_dir, tmp_path, val_docs=-1)
    assert len(dm_for(root, tok_dir, tmp_path, val_docs=3, val_size=1000).val_samples()) == 3


def test_stream_survives_pickling_for_spawned_workers(hf_layout, tok_dir, tmp_path):
    import pickle

    root, _ = hf_layout
    dm = dm_for(root, tok_dir, tmp_path, num_epochs=1)
    dm.setup("fit")
    ds = dm.build_train_dataset()
    first = [(s.doc_id, s.target.tolist()) for s in ds]  # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert [(s.doc_id, s.target.tolist()) for s in clone] == first

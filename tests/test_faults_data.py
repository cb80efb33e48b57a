"""Faults in the inputs, tried as they happen: shards cut short, read-only dataset folders, text that no tokenizer can
encode, vocabularies larger than the model's, malformed evaluation data, truncated checkpoints, and new weights at the
path an evaluation resumes from. Each is an error naming the file (and the fix), or, where the user asks for it,
skipped and counted; never data that silently shrinks or results that silently mix."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mplus_lightning.data.eval_sets.retention import read_squad, resolve_layout
from mplus_lightning.data.files import BadLines, DamagedFileError, DataFormatError, iter_jsonl, load_json
from mplus_lightning.data.fineweb import FineWebDataModule, fallback_cache_root, iter_texts
from mplus_lightning.data.slimpajama import BucketDocuments, build_buckets, main as slimpajama_main
from mplus_lightning.data.tokenizer import load_tokenizer
from mplus_lightning.eval.fingerprint import file_fingerprint
from mplus_lightning.evaluate import main as evaluate_main
from mplus_lightning.typed_config import ConfigError

from .test_data_common import texts, tok, tok_dir, write_jsonl, write_parquet  # noqa: F401  (fixtures)
from .test_eval_fixtures import (
    make_checkpoint,
    make_env,
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
    squad_json,
    write_squad,
)

SUFFIXES = [".jsonl.zst", ".jsonl.gz", ".parquet"]
LONE_SURROGATE = '{"text": "kalo mi \\ud800 tor el"}'   # json.loads accepts it; no tokenizer can encode it


def write_shard(path: Path, docs: list[str]) -> Path:
    if path.name.endswith(".parquet"):
        return write_parquet(path, docs)
    return write_jsonl(path, [{"text": t} for t in docs])


def cut(path: Path, keep: float) -> Path:
    """Truncate `path` to a fraction of its bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fineweb(root: Path, tok_dir: Path, tmp_path: Path, **kw) -> FineWebDataModule:
    kw.setdefault("cache_dir", tmp_path / "cache")
    return FineWebDataModule(root, tok_dir, dump=None, val_docs=2, val_size=2, progress=False, **kw)


# ---- damaged shards -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_shard_cut_short_alone_is_an_error_naming_it(tmp_path, tok_dir, suffix):
    bad = cut(write_shard(tmp_path / "fw" / f"part-0{suffix}", texts(40, seed=1)), 0.02)
    with pytest.raises(DamagedFileError, match=re.escape(f"part-0{suffix}: ") + ".*on_bad_file='skip'"):
        fineweb(bad.parent, tok_dir, tmp_path).setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_shard_cut_short_beside_good_ones_is_an_error_or_left_out_whole_and_counted(tmp_path, tok_dir, caplog,
                                                                                     suffix):
    good = texts(30, seed=2, lo=20, hi=60)
    write_shard(tmp_path / "fw" / f"part-0{suffix}", good[:20])
    # long enough that its readable half fills a whole batch of the cache (4096 texts), which is then dropped too
    bad = cut(write_shard(tmp_path / "fw" / f"part-1{suffix}", texts(9000, seed=3, lo=10, hi=30)), 0.6)
    write_shard(tmp_path / "fw" / f"part-2{suffix}", good[20:])
    # on_bad_line=skip does not hide it: the file is damaged, not one line of it
    with pytest.raises(DamagedFileError, match=re.escape(f"part-1{suffix}: ") + "(truncated|not a readable)"):
        fineweb(bad.parent, tok_dir, tmp_path, on_bad_line="skip").setup("fit")
    with caplog.at_level(logging.WARNING):
        dm = fineweb(bad.parent, tok_dir, tmp_path, on_bad_file="skip")
        dm.setup("fit")
    table = dm.table()
    assert [table.text(i) for i in range(len(table))] == good           # the whole damaged file is left out
    assert {table.doc_id(i).split(":")[0] for i in range(len(table))} == {f"part-0{suffix}", f"part-2{suffix}"}
    manifest = table.manifest
    assert len(manifest["bad_files"]) == 1 and f"part-1{suffix}" in manifest["bad_files"][0]
    readable = 0 if suffix == ".parquet" else sum(1 for _ in _readable_lines(bad))
    assert manifest["documents_lost"] == readable and (suffix == ".parquet" or readable > 4096)
    assert "left out" in caplog.text and f"part-1{suffix}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):    # every later run that uses the cache says so too
        fineweb(bad.parent, tok_dir, tmp_path, on_bad_file="skip").setup("fit")
    assert "1 damaged files" in caplog.text


def _readable_lines(path: Path):
    try:
        yield from iter_jsonl(path)
    except DamagedFileError:
        return


def test_a_zstd_file_cut_after_a_whole_frame_inside_the_next_is_detected(tmp_path):
    import zstandard

    frame = zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 5)
    (tmp_path / "two.jsonl.zst").write_bytes(frame + frame)
    assert len(list(iter_jsonl(tmp_path / "two.jsonl.zst"))) == 10
    (tmp_path / "cut.jsonl.zst").write_bytes(frame + frame[:-4])
    with pytest.raises(DamagedFileError, match=r"cut\.jsonl\.zst: truncated.*1 complete frame.*5 line\(s\)"):
        list(iter_jsonl(tmp_path / "cut.jsonl.zst"))
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    with pytest.raises(DamagedFileError, match=r"empty\.jsonl\.zst: empty file"):
        list(iter_jsonl(tmp_path / "empty.jsonl.zst"))


def test_a_truncated_gzip_json_file_is_named(tmp_path):
    import gzip

    (tmp_path / "dev.json.gz").write_bytes(gzip.compress(json.dumps(squad_json(random.Random(0), 3)).encode())[:-9])
    with pytest.raises(DamagedFileError, match=r"dev\.json\.gz: truncated"):
        load_json(tmp_path / "dev.json.gz")


# ---- the bucket builder ------------------------------------------------------------------------------------------
def slim_source(root: Path, *, bad_last: bool = False, raw_lines: dict | None = None) -> Path:
    recs = [{"text": t, "meta": {"redpajama_set_name": "RedPajamaC4"}} for t in texts(40, seed=7, lo=20, hi=60)]
    write_jsonl(root / "chunk1" / "example_train_0.jsonl.zst", recs[:10], raw_lines=raw_lines)
    more = [{"text": t, "meta": {"redpajama_set_name": "RedPajamaC4"}} for t in texts(2500, seed=9, lo=20, hi=60)]
    last = write_jsonl(root / "chunk1" / "example_train_1.jsonl.zst", recs[10:] + (more if bad_last else []))
    if bad_last:
        cut(last, 0.5)
    return root


def test_builder_names_a_truncated_source_file_or_leaves_it_out_counted(tmp_path, tok_dir):
    src = slim_source(tmp_path / "src", bad_last=True)
    with pytest.raises(DamagedFileError, match=r"example_train_1\.jsonl\.zst: truncated.*--on-bad-file skip"):
        build_buckets(src, tok_dir, tmp_path / "out", 2, on_bad_line="skip", progress=False)
    res = build_buckets(src, tok_dir, tmp_path / "out", 2, on_bad_line="skip", on_bad_file="skip", progress=False)
    corpus = res.stats["corpus"]
    assert corpus["documents"] == 10 and len(corpus["bad_files_skipped"]) == 1
    assert "example_train_1.jsonl.zst" in corpus["bad_files_skipped"][0] and corpus["documents_lost"] > 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["corpus"]["documents_lost"] == corpus["documents_lost"]
    # a later run that does not ask to skip is told about the file left out before
    with pytest.raises(DamagedFileError, match="left out by an earlier --on-bad-file skip run"):
        build_buckets(src, tok_dir, tmp_path / "out", 2, on_bad_line="skip", progress=False)


def test_builder_cli_prints_one_line_for_a_damaged_file(tmp_path, tok_dir, capsys):
    src = slim_source(tmp_path / "src", bad_last=True)
    code = slimpajama_main(["build", "--src", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"),
                            "--per-bucket", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "example_train_1.jsonl.zst: truncated" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_builder_lone_surrogate_is_a_bad_line_that_skip_skips(tmp_path, tok_dir):
    src = slim_source(tmp_path / "src", raw_lines={2: LONE_SURROGATE.replace('"text"', '"meta": {}, "text"')})
    with pytest.raises(DataFormatError, match=r"example_train_0\.jsonl\.zst:3: text holds a lone surrogate"):
        build_buckets(src, tok_dir, tmp_path / "o1", 2, progress=False)
    res = build_buckets(src, tok_dir, tmp_path / "o2", 2, on_bad_line="skip", progress=False)
    assert res.stats["corpus"]["bad_lines_skipped"] == 1 and res.stats["corpus"]["documents"] == 40


def test_bucket_reader_names_a_line_with_a_lone_surrogate(tmp_path, tok):
    folder = tmp_path / "4k-8k"       # the official layout: chunk_<i>.jsonl, read by offsets
    folder.mkdir()
    (folder / "chunk_0.jsonl").write_text('{"text": "kalo mi"}\n' + LONE_SURROGATE + "\n")
    docs = BucketDocuments(folder, tok)
    assert docs.tokens(0)
    with pytest.raises(DataFormatError, match=r"chunk_0\.jsonl:2: 'text' holds a lone surrogate"):
        docs.tokens(1)


# ---- the training streams: bad text, read-only folders -----------------------------------------------------------
def test_stream_lone_surrogate_is_a_bad_line_that_skip_skips(tmp_path, tok_dir):
    docs = texts(10, seed=4)
    write_jsonl(tmp_path / "fw" / "part.jsonl.zst", [{"text": t} for t in docs], raw_lines={4: LONE_SURROGATE})
    with pytest.raises(DataFormatError, match=r"part\.jsonl\.zst:5: text holds a lone surrogate.*on_bad_line='skip'"):
        fineweb(tmp_path / "fw", tok_dir, tmp_path).setup("fit")
    bad = BadLines()
    assert len(list(iter_jsonl(tmp_path / "fw" / "part.jsonl.zst", on_bad_line="skip", bad=bad))) == 10
    assert bad.count == 1 and bad.first.startswith(f"{tmp_path / 'fw' / 'part.jsonl.zst'}:5")
    dm = fineweb(tmp_path / "fw", tok_dir, tmp_path, on_bad_line="skip")
    dm.setup("fit")
    table = dm.table()
    assert [table.text(i) for i in range(len(table))] == docs and table.manifest["bad_lines"] == 1
    (tmp_path / "fw2").mkdir()
    (tmp_path / "fw2" / "p.jsonl").write_bytes(b'{"text": "kalo"}\n{"text": "mi \xff tor"}\n')   # not UTF-8
    bad = BadLines()
    assert len(list(iter_jsonl(tmp_path / "fw2" / "p.jsonl", on_bad_line="skip", bad=bad))) == 1
    assert bad.first.endswith("p.jsonl:2: invalid UTF-8 bytes")


@pytest.fixture
def read_only(monkeypatch):
    """Makes folders read-only. Root ignores permission bits, so there creating folders inside them is refused the
    way a read-only mount refuses it."""
    folders: list[Path] = []
    real_mkdir, real_open = os.mkdir, os.open

    def refused(path) -> bool:
        return any(Path(path).resolve().is_relative_to(f) for f in folders)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    yield make
    for f in folders:
        f.chmod(0o755)


def test_read_only_data_folder_caches_in_the_user_cache_or_names_cache_dir(tmp_path, tok_dir, monkeypatch, caplog,
                                                                           read_only):
    docs = texts(8, seed=6)
    write_jsonl(tmp_path / "fw" / "part.jsonl", [{"text": t} for t in docs])
    read_only(tmp_path / "fw")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with caplog.at_level(logging.WARNING):
        dm = fineweb(tmp_path / "fw", tok_dir, tmp_path, cache_dir=None)
        dm.setup("fit")
    table = dm.table()
    assert table.path.parent == fallback_cache_root(tmp_path / "fw")
    assert table.path.is_relative_to(tmp_path / "xdg" / "mplus_lightning") and len(table) == 8
    assert "not writable" in caplog.text and str(table.path.parent) in caplog.text
    again = fineweb(tmp_path / "fw", tok_dir, tmp_path, cache_dir=None)
    again.setup("fit")
    assert again.table().path == table.path
    shutil.rmtree(tmp_path / "xdg")
    read_only(tmp_path / "xdg")
    with pytest.raises(ConfigError, match=r"cannot write the fineweb text cache.*set data\.params\.cache_dir"):
        fineweb(tmp_path / "fw", tok_dir, tmp_path, cache_dir=None).setup("fit")
    with pytest.raises(ConfigError, match=r"ro-cache.*set data\.params\.cache_dir to a writable folder"):
        fineweb(tmp_path / "fw", tok_dir, tmp_path, cache_dir=read_only(tmp_path / "ro-cache")).setup("fit")


# ---- vocabularies larger than the model's ------------------------------------------------------------------------
def trainer_of_vocab(n: int) -> SimpleNamespace:
    """Stands for a Trainer whose LightningModule's model has `n` embedding rows."""
    llama = SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(n, 2))
    return SimpleNamespace(lightning_module=SimpleNamespace(model=SimpleNamespace(llama=llama)))


def test_a_data_tokenizer_larger_than_the_model_is_refused_at_setup(tmp_path, tok_dir, tok):
    write_jsonl(tmp_path / "fw" / "part.jsonl", [{"text": t} for t in texts(6, seed=8)])
    dm = fineweb(tmp_path / "fw", tok_dir, tmp_path)       # data.params.vocab_size not given
    dm.trainer = trainer_of_vocab(300)
    with pytest.raises(ConfigError, match=rf"has {len(tok)} tokens but the model's vocab_size is 300.*"
                                          r"data\.params\.tokenizer"):
        dm.setup("fit")
    dm = fineweb(tmp_path / "fw", tok_dir, tmp_path)
    dm.trainer = trainer_of_vocab(len(tok))
    dm.setup("fit")


def test_the_facts_data_checks_its_tokenizer_against_the_model_at_setup(corpus_dir):
    from mplus_lightning.data.facts import FactsDataModule

    dm = FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"))
    dm.trainer = trainer_of_vocab(300)
    with pytest.raises(ConfigError, match=r"but the model's vocab_size is 300"):
        dm.setup("fit")


@pytest.mark.slow
def test_fit_refuses_synthetic_ids_past_the_model_vocab_before_the_first_step(tmp_path, capsys):
    from mplus_lightning.fit import main as fit_main

    root = Path(__file__).resolve().parent.parent
    code = fit_main(["--config", str(root / "experiments" / "tiny.yaml"), "data.params.vocab_size=1024",
                     f"run_dir={tmp_path}", "trainer.max_steps=2", "trainer.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 1 and "error: data.params.vocab_size=1024" in err and "model.llama.vocab_size" in err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))


def test_a_bogus_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    with pytest.raises(DataFormatError, match=r"tok/tokenizer\.json: not a readable tokenizer \(KeyError: "
                                              r"'added_tokens'\)"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "added_')    # truncated
    with pytest.raises(DataFormatError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_tokenizer(tmp_path / "tok" / "tokenizer.json")


# ---- evaluation data ---------------------------------------------------------------------------------------------
def test_squad_values_of_the_wrong_type_and_questions_without_answers_are_named(tmp_path):
    data = squad_json(random.Random(0), 3)
    data["data"][0]["paragraphs"][1]["context"] = 12345
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"data\[0\]\.paragraphs\[1\]\.context: expected a string, got int"):
        read_squad(tmp_path / "a.json")
    data = squad_json(random.Random(0), 3)
    del data["data"][0]["paragraphs"][1]["qas"][0]["answers"]     # not marked is_impossible either
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"paragraphs\[1\]\.qas\[0\]: no answer .*is_impossible"):
        read_squad(tmp_path / "b.json")
    data = squad_json(random.Random(0), 3)                          # impossible questions are still left out
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert [it.id for it in read_squad(tmp_path / "c.json")] == ["q0", "q1", "q2"]


def test_dataset_processed_is_found_in_a_folder_that_holds_both_layouts(tmp_path):
    d = write_squad(tmp_path / "both", n_dev=2, n_train=2)
    (d / "val_data.json").write_text(json.dumps([{"c": "ctx", "q": "q?", "a": "a"}]))
    (d / "unrelated_contexts_from_train.json").write_text(json.dumps(["x"]))
    assert resolve_layout(d, "processed") == ("processed", d / "val_data.json")
    assert resolve_layout(d, "squad") == ("squad", d / "dev-v2.0.json")
    assert resolve_layout(d, "auto")[0] == "squad"


# ---- checkpoints read by an evaluation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-eval")
    model_dir, _ = make_env(root)
    data = write_squad(root / "data" / "squad", n_dev=3, n_train=30, index=[0, 1])
    return model_dir, data


@pytest.mark.parametrize("name", ["model.safetensors", "memory/memory.safetensors"])
def test_a_truncated_checkpoint_file_is_named_by_evaluate(eval_env, tmp_path, capsys, name):
    model_dir, data = eval_env
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    cut(copy / name, 0.6)
    code = evaluate_main(["retention", "--model", str(copy), "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{copy / name}: truncated safetensors file" in err and "re-download" in err


RETENTION = ["--no-progress", "distances=[0,32]", "distractor_tokens=32", "distractor_min_tokens=32", "num_items=2"]


@pytest.mark.slow
def test_evaluate_refuses_to_resume_with_new_weights_at_the_same_path(eval_env, tmp_path, capsys):
    model_dir, data = eval_env
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    out = tmp_path / "out"
    args = ["retention", "--model", str(model), "--data", str(data), "--out", str(out), *RETENTION]
    assert evaluate_main(args) == 0
    weights = model / "model.safetensors"
    before = weights.stat()
    make_checkpoint(tmp_path / "new", seed=1)            # new weights, same shapes: the same size
    shutil.copy2(tmp_path / "new" / "model.safetensors", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))   # and the old time, as `cp -p` / rsync -a keep it
    assert weights.stat().st_size == before.st_size
    capsys.readouterr()
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert f"{weights} changed since" in err and "model" in err and "overwrite=true" in err
    assert len((out / "items.jsonl").read_text().splitlines()) == 6          # the old results are untouched
    assert evaluate_main([*args, "--overwrite"]) == 0


@pytest.mark.slow
def test_evaluate_refuses_to_resume_when_the_data_file_changed(eval_env, tmp_path, capsys):
    model_dir, data = eval_env
    data = Path(shutil.copytree(data, tmp_path / "squad"))
    out = tmp_path / "out"
    args = ["retention", "--model", str(model_dir), "--data", str(data), "--out", str(out), *RETENTION]
    assert evaluate_main(args) == 0
    dev = data / "dev-v2.0.json"
    dev.write_text(dev.read_text().replace("capital", "Capital"))
    capsys.readouterr()
    assert evaluate_main(args) == 2
    assert f"{dev} changed since" in capsys.readouterr().err


def test_fingerprint_sees_new_weights_of_equal_size_and_time_but_not_the_time(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    big = torch.randn(1 << 19, generator=g)               # 2 MB: sampled
    tensors = {"backbone": big, "lora_B": torch.randn(64, 8, generator=g), "norm": torch.ones(64)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    first = file_fingerprint(tmp_path / "a.safetensors")
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))
    assert file_fingerprint(tmp_path / "a.safetensors") == first      # contents, not times
    changed = dict(tensors, lora_B=tensors["lora_B"] + 1e-3)           # fine-tuning with a frozen backbone
    save_file(changed, str(tmp_path / "a.safetensors"))
    assert file_fingerprint(tmp_path / "a.safetensors") != first
    save_file(dict(tensors, backbone=big * 1.01), str(tmp_path / "a.safetensors"))
    assert file_fingerprint(tmp_path / "a.safetensors") != first
    big_file = tmp_path / "nq.jsonl"                                    # a large data file: size + spread samples
    rows = np.random.default_rng(0).integers(0, 9, (70 << 20) // 8, dtype=np.int64)
    big_file.write_bytes(rows.tobytes())
    fp = file_fingerprint(big_file)
    assert fp.startswith("sampled:") and fp == file_fingerprint(big_file)


def test_jsonl_line_numbers_are_the_files_own_blank_lines_included(tmp_path):
    # the SlimPajama builder copies documents by these numbers: a blank line must count
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n{bad\n')
    got = []
    with pytest.raises(DataFormatError, match=r"x\.jsonl:5: malformed JSON"):
        for lineno, obj in iter_jsonl(path):
            got.append((lineno, obj["text"]))
    assert got == [(1, "a"), (4, "b")]


def test_parquet_rows_keep_their_numbers_after_a_skipped_row(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    bad = BadLines()
    assert list(iter_texts(path, on_bad_line="skip", bad=bad)) == [(0, "a"), (2, "c")]
    assert bad.count == 1 and "row 1" in bad.first

"""`python -m mplus_lightning.export`: an export usable alone, like the end-of-run one (the run's tokenizer travels
into it, its files are readable by the group), and a tokenizer that has moved since training is one line, not a
traceback."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from mplus_lightning import MPlus, checkpointing as ck, config as C, fit
from mplus_lightning.data.tokenizer import encode, load_tokenizer
from mplus_lightning.eval.runtime import load_eval_tokenizer
from mplus_lightning.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Fact: Tina Horvat Madrid."


@pytest.fixture(scope="module")
def facts_run(corpus_dir, tmp_path_factory):
    """A 2-step stage-1 run on the facts corpus, with its own copy of the tokenizer and a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("export_cli")
    tokenizer = shutil.copytree(corpus_dir / "tokenizer", out / "tokenizer")
    cfg = C.load(ROOT / "experiments" / "demo_stage1.yaml", [
        "init_from=null", "model.init=tiny", "model.path=null", f"run_dir={out / 'runs'}",
        f"data.params.corpus={corpus_dir}", f"data.params.tokenizer={tokenizer}", "data.params.val_samples=2",
        "trainer.max_steps=2", "trainer.val_every_n_steps=100", "trainer.ckpt_every_n_steps=2"])
    fit.run(cfg)
    return cfg.out_dir, tokenizer


def newest_unit(run: Path) -> Path:
    return ck.list_units(run / "checkpoints")[-1].path


def one_line(text: str, prefix: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    assert "Traceback" not in text
    return lines[0]


def test_the_export_carries_the_run_tokenizer_and_is_readable_by_the_group(facts_run, tmp_path):
    run, tokenizer = facts_run
    out = tmp_path / "exported"
    assert export_main([str(newest_unit(run)), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert encode(load_tokenizer(out), TEXT) == encode(load_tokenizer(tokenizer), TEXT)
    # What the evaluations do without --tokenizer: the model directory's own tokenizer, checked against its vocabulary
    model = MPlus.from_pretrained(out)
    evaluation = SimpleNamespace(model=str(out), tokenizer=None)
    assert encode(load_eval_tokenizer(evaluation, model), TEXT) == encode(load_tokenizer(tokenizer), TEXT)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_a_moved_tokenizer_is_a_one_line_warning_and_the_weights_are_still_exported(facts_run, tmp_path, capsys):
    run, tokenizer = facts_run
    moved_run = shutil.copytree(run, tmp_path / "run")   # the same run, its config naming a tokenizer that moved
    config = moved_run / "config.yaml"
    config.write_text(config.read_text().replace(str(tokenizer), str(tmp_path / "gone")))
    out = tmp_path / "exported"
    assert export_main([str(moved_run), str(out)]) == 0
    warning = one_line(capsys.readouterr().err, "warning:")
    assert str(tmp_path / "gone") in warning and "does not exist" in warning and "--tokenizer PATH" in warning
    assert not (out / "tokenizer.json").exists()
    MPlus.from_pretrained(out)
    # the fix the warning names: the tokenizer's new place, given by hand
    assert export_main([str(moved_run), str(tmp_path / "fixed"), "--tokenizer", str(tokenizer)]) == 0
    assert encode(load_tokenizer(tmp_path / "fixed"), TEXT) == encode(load_tokenizer(tokenizer), TEXT)


def test_a_bad_tokenizer_given_by_hand_is_a_one_line_error_before_anything_is_written(facts_run, tmp_path, capsys):
    run, _ = facts_run
    out = tmp_path / "exported"
    assert export_main([str(run), str(out), "--tokenizer", str(tmp_path / "nope")]) == 2
    error = one_line(capsys.readouterr().err, "error:")
    assert str(tmp_path / "nope") in error and not out.exists()


def test_a_run_without_a_tokenizer_exports_without_a_warning(facts_run, tmp_path, capsys):
    run, tokenizer = facts_run
    synthetic_like = shutil.copytree(run, tmp_path / "run")
    config = synthetic_like / "config.yaml"
    config.write_text(config.read_text().replace(f"tokenizer: {tokenizer}", "tokenizer: null"))
    assert "tokenizer: null" in config.read_text()
    assert export_main([str(synthetic_like), str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().err == "" and not (tmp_path / "exported" / "tokenizer.json").exists()

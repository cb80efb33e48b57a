"""What a run writes about itself: TensorBoard curves without repeated or single-sample values, progress lines when
its output goes to a file, a summary at the end, and an export that evaluations can use alone."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mplus_lightning import checkpointing as ck, config as C, fit, progress

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def redirected_run(tmp_path_factory):
    """A 20-step tiny stage-1 run with a mix of step kinds, its stdout and stderr redirected to a file."""
    out = tmp_path_factory.mktemp("curves")
    log_file = out / "run.log"
    with log_file.open("w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "mplus_lightning.fit", "--config", str(ROOT / "experiments" / "tiny.yaml"),
             f"run_dir={out}", f"trainer.max_steps={STEPS}", f"trainer.log_every_n_steps={EVERY}",
             "trainer.ckpt_every_n_steps=10", "trainer.val_every_n_steps=100", "step.full_context_ratio=0.2"],
            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    text = log_file.read_text()
    assert done.returncode == 0, text
    acc = EventAccumulator(str(out / "tiny-stage1" / "tensorboard"))
    acc.Reload()
    return out / "tiny-stage1", text, acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_each_kind_is_written_only_for_intervals_where_it_ran(redirected_run):
    _, _, acc = redirected_run
    logging_steps = list(range(EVERY - 1, STEPS, EVERY))
    kinds = [t for t in acc.Tags()["scalars"] if t.startswith("train/lm_loss_")]
    assert len(kinds) >= 2, kinds
    assert any(len(scalars(acc, k)) < len(logging_steps) for k in kinds), "some kind skipped an interval"
    for kind in kinds:
        points = scalars(acc, kind)
        steps, values = [s for s, _ in points], [v for _, v in points]
        assert set(steps) <= set(logging_steps) and len(set(steps)) == len(steps), (kind, points)
        assert all(a != b for a, b in zip(values, values[1:])), f"{kind} repeats a value: {points}"
    assert [s for s, _ in scalars(acc, "train/loss")] == logging_steps


def test_gradient_norm_counters_and_windowed_throughput(redirected_run):
    _, _, acc = redirected_run
    grad = scalars(acc, "train/grad_norm")
    assert len(grad) == STEPS // EVERY and all(math.isfinite(v) and v > 0 for _, v in grad), grad
    assert [v for _, v in scalars(acc, "train/samples")] == [float(s + 1) for s in range(EVERY - 1, STEPS, EVERY)]
    tokens = [v for _, v in scalars(acc, "train/tokens")]
    assert len(tokens) == STEPS // EVERY and all(b > a > 0 for a, b in zip(tokens, tokens[1:])), tokens
    rates = [v for _, v in scalars(acc, "train/tokens_per_s")]
    assert rates and all(v > 0 for v in rates)
    assert scalars(acc, "lr-AdamW/main")


def test_hparams_are_the_resolved_config(redirected_run):
    run, _, _ = redirected_run
    text = (run / "tensorboard" / "hparams.yaml").read_text()
    assert "model.num_blocks: 6" in text and f"trainer.max_steps: {STEPS}" in text, text[:500]


def test_redirected_output_has_progress_lines_and_a_summary_but_no_noise(redirected_run):
    run, text, _ = redirected_run
    lines = text.splitlines()
    progress_lines = [i for i, line in enumerate(lines) if "[tiny-stage1] step" in line]
    assert len(progress_lines) == STEPS // EVERY, text
    assert "tokens/s" in lines[progress_lines[0]] and "left" in lines[progress_lines[0]]
    end = next(i for i, line in enumerate(lines) if "stopped: `max_steps=" in line)
    assert progress_lines[0] < end, "progress is printed while the run trains"
    for noise in ("Epoch 0/-2", "litlogger", "LeafSpec"):
        assert noise not in text, noise
    summary = next(line for line in lines if "trained" in line and "steps in" in line)
    assert f"trained {STEPS} steps" in summary and "train/loss" in summary
    assert str(run / "export") in summary and str(ck.list_units(run / "checkpoints")[-1].path) in summary


def test_export_files_are_readable_by_the_group(redirected_run):
    run, _, _ = redirected_run
    export = run / "export"
    for path in [export, *export.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_the_data_tokenizer_travels_into_the_export(corpus_dir, tmp_path):
    from mplus_lightning.data.tokenizer import encode, load_tokenizer

    cfg = C.load(ROOT / "experiments" / "demo_stage1.yaml", [
        "init_from=null", f"run_dir={tmp_path}", f"data.params.corpus={corpus_dir}",
        f"data.params.tokenizer={corpus_dir / 'tokenizer'}", "data.params.val_samples=2", "trainer.max_steps=2",
        "trainer.val_every_n_steps=100", "trainer.ckpt_every_n_steps=100"])
    fit.run(cfg)
    export = cfg.out_dir / "export"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    text = "Fact: Tina Horvat Madrid."
    assert encode(load_tokenizer(export), text) == encode(load_tokenizer(corpus_dir / "tokenizer"), text)


def test_a_terminal_gets_a_bar_over_the_steps_labelled_with_the_run(tmp_path, monkeypatch):
    cfg = C.load(ROOT / "experiments" / "tiny.yaml", [f"run_dir={tmp_path}"])
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bars = [c for c in fit.build_trainer(cfg).callbacks if isinstance(c, progress.StepBar)]
    assert len(bars) == 1 and bars[0]._get_train_description(0) == "tiny-stage1"
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    callbacks = fit.build_trainer(cfg).callbacks
    assert not any(isinstance(c, progress.StepBar) for c in callbacks)
    assert [c.every for c in callbacks if isinstance(c, progress.Progress)] == [cfg.trainer.log_every_n_steps]
    own = progress.Progress("mine", 3)
    assert [c for c in fit.build_trainer(cfg, [own]).callbacks if isinstance(c, progress.Progress)] == [own]


def test_curves_average_the_interval_and_count_from_the_start():
    curves = progress.TrainingCurves()
    curves.add(10, 1, {"train/loss": 1.0, "train/lm_loss_multi": 1.0})
    curves.add(30, 1, {"train/loss": 3.0, "train/lm_loss_single": 5.0})
    first = curves.flush()
    assert first["train/loss"] == 2.0 and first["train/lm_loss_multi"] == 1.0 and first["train/lm_loss_single"] == 5.0
    assert (first["train/tokens"], first["train/samples"]) == (40.0, 2.0) and first["train/tokens_per_s"] > 0
    curves.add(5, 1, {"train/loss": 4.0})
    second = curves.flush()
    assert "train/lm_loss_multi" not in second and second["train/loss"] == 4.0 and second["train/tokens"] == 45.0
    resumed = progress.TrainingCurves()
    resumed.load_state_dict(curves.state_dict())
    assert resumed.flush()["train/samples"] == 3.0


def test_cumulative_counts_continue_on_resume(tmp_path):
    base = [f"run_dir={tmp_path}", f"trainer.log_every_n_steps={EVERY}", "trainer.ckpt_every_n_steps=10",
            "trainer.val_every_n_steps=100", "trainer.progress_bar=false"]
    fit.run(C.load(ROOT / "experiments" / "tiny.yaml", [*base, "trainer.max_steps=10"]))
    cfg = C.load(ROOT / "experiments" / "tiny.yaml", [*base, "trainer.max_steps=20", "resume=last"])
    fit.run(cfg)
    acc = EventAccumulator(str(cfg.out_dir / "tensorboard"))
    acc.Reload()
    assert dict(scalars(acc, "train/samples"))[19] == 20.0

"""No crash in any strategy x precision: every step kind of every stage, trained on CPU for a few steps.

For each strategy (`auto`: one process; `ddp` and `fsdp2`: two gloo ranks started once by Lightning, running every
precision and stage in turn) and each precision (32-true, bf16-mixed, bf16-true), the three memory stages run as a
chain (stage 1 from a tiny random model, stage 2 from its export, stage 3 from stage 2's with the pool shrinking into
the long-term memory), each for one cycle of the step kinds: full-context, single-chunk, multi-chunk with several
chunks, a revisit (with the retriever losses in stages 2-3) and a one-chunk multi-chunk step (the branch that keeps
the gradient through the injection), then a validation (and in stage 3 a checkpoint). The step kinds come from a
cycle instead of the configured probabilities (the chunk counts still come from `step.num_contexts_schedule`); every
other decision is the real seeded one. Each run must log finite losses for every kind, and its export must load and
read.

`python -m tests.test_matrix STRATEGY OUT_DIR` runs one strategy's job by hand (what the tests spawn).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from mplus_lightning.stages.step import Decisions

ROOT = Path(__file__).parents[1]
STRATEGIES = ("auto", "ddp", "fsdp2")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
STAGES = (("stage1", "tiny.yaml"), ("stage2", "tiny_stage2.yaml"), ("ltm", "tiny_ltm.yaml"))
CHECKPOINTED = "ltm"
"""The stage that saves a checkpoint at its end (the others save none: a save costs more than the run, and stage 3's
state holds all of theirs plus the long-term memory)."""
KINDS = ("full", "single", "multi", "revisit", "multi")
"""The step kinds of a run, one per step; a revisit needs an earlier step's cached target and chunks written since."""
SEVERAL_CHUNKS = 3
"""Chunks of the first multi-chunk step: documents of 200-260 tokens give every rank at least 5."""
ONE_CHUNK_STEP = len(KINDS) - 1
"""The last multi-chunk step injects one chunk (`num_contexts_schedule`)."""
JOB_TIMEOUT_S = 480
SETTINGS = [
    "trainer.progress_bar=false", "trainer.log_every_n_steps=1", f"trainer.max_steps={len(KINDS)}",
    f"trainer.val_every_n_steps={len(KINDS)}", "trainer.val_batches=1",
    f"step.num_contexts_schedule=[[0,{SEVERAL_CHUNKS}],[{ONE_CHUNK_STEP},1]]",
    "data.params.min_doc_length=200", "data.params.max_doc_length=260", "data.params.num_docs=64",
]


def run_name(precision: str, stage: str) -> str:
    return f"{precision}-{stage}"


class CycledKinds(Decisions):
    """A rank's seeded decisions, except that the step kinds follow `KINDS` (the same on every rank, as the real
    stream's are); evictions, retriever query lengths and cache replacements stay the real draws."""

    def __init__(self, real: Decisions):
        self.__dict__.update(real.__dict__)
        self.steps = 0
        self.kind = ""

    def full_context(self) -> bool:   # asked first, once per step
        self.kind = KINDS[self.steps % len(KINDS)]
        self.steps += 1
        return self.kind == "full"

    def multi_chunk(self) -> bool:    # on a revisit step: compute the retriever losses
        return self.kind in ("multi", "revisit")

    def revisit(self) -> bool:
        return self.kind == "revisit"


class CycleStepKinds(L.Callback):
    """Installs `CycledKinds` once the module has its rank's decisions (its setup hook runs before this)."""

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.memory_step.decisions = CycledKinds(pl_module.memory_step.decisions)


def run_job(strategy: str, out: Path) -> None:
    """Every precision x stage under `strategy`. A crash leaves its traceback in out/error.rank<r>.txt; one process
    goes on with the next precision, several stop (Lightning has ended the other ranks)."""
    from mplus_lightning import config as C, fit

    devices = 1 if strategy == "auto" else 2
    for precision in PRECISIONS:
        previous = None
        for stage, yaml in STAGES:
            name = run_name(precision, stage)
            overrides = [f"name={name}", f"run_dir={out}", f"trainer.strategy={strategy}",
                         f"trainer.devices={devices}", f"trainer.precision={precision}",
                         f"init_from={previous if previous else 'null'}", *SETTINGS,
                         f"trainer.ckpt_every_n_steps={len(KINDS) if stage == CHECKPOINTED else 10**6}"]
            try:
                trainer = fit.run(C.load(ROOT / "experiments" / yaml, overrides), callbacks=[CycleStepKinds()])
            except Exception:
                rank = int(os.environ.get("LOCAL_RANK", 0))
                with open(out / f"error.rank{rank}.txt", "a") as f:
                    f.write(f"{name}: {traceback.format_exc()[-3000:]}\n")
                if devices > 1:
                    raise
                break   # the later stages start from this one's export
            if trainer.global_rank == 0:
                (out / name / "done").write_text("ok")
            previous = out / name / "export"


# ---- the tests -------------------------------------------------------------------------------------------------
_jobs: dict[str, tuple[Path, str]] = {}


def job(strategy: str, tmp_path_factory) -> tuple[Path, str]:
    """Run `strategy`'s job once per session: (its output directory, what went wrong or "")."""
    if strategy not in _jobs:
        out = tmp_path_factory.mktemp(f"matrix-{strategy}")
        problem = ""
        if strategy == "auto":
            run_job(strategy, out)
        else:
            # a session of its own: a hung job's ranks are all ended together
            proc = subprocess.Popen([sys.executable, "-m", "tests.test_matrix", strategy, str(out)], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output = proc.communicate()[0] + f"\n{strategy} job ran past {JOB_TIMEOUT_S} s and was killed"
            if proc.returncode != 0:
                problem = output[-3000:]
        if torch.get_default_dtype() != torch.float32:
            problem += f"\nthe runs left torch's default dtype at {torch.get_default_dtype()}"
        errors = "".join(p.read_text() for p in sorted(out.glob("error.rank*.txt")))
        _jobs[strategy] = (out, errors + problem)
    return _jobs[strategy]


def combinations():
    for strategy in STRATEGIES:
        marks = [pytest.mark.slow] + ([pytest.mark.multirank] if strategy != "auto" else [])
        for precision in PRECISIONS:
            yield pytest.param(strategy, precision, marks=marks, id=f"{strategy}-{precision}")


@pytest.mark.parametrize("strategy,precision", list(combinations()))
def test_every_stage_runs_every_step_kind_with_finite_losses(strategy, precision, tmp_path_factory):
    from mplus_lightning import MemoryState, MPlus

    from .test_training import scalars

    out, problem = job(strategy, tmp_path_factory)
    for stage, _ in STAGES:
        run = out / run_name(precision, stage)
        assert (run / "done").is_file(), f"{strategy} {precision} {stage} did not finish:\n{problem}"
        losses = scalars(run, "train/loss")
        assert sorted(losses) == list(range(len(KINDS))), (stage, losses)
        assert all(math.isfinite(v) for v in losses.values()), (stage, losses)
        # each kind's loss is written at that kind's steps only (and finite)
        steps_of = {kind: scalars(run, f"train/lm_loss_{kind}") for kind in set(KINDS)}
        assert {k: sorted(v) for k, v in steps_of.items()} == {
            k: [i for i, kind in enumerate(KINDS) if kind == k] for k in set(KINDS)}, (stage, steps_of)
        assert all(math.isfinite(v) for losses in steps_of.values() for v in losses.values()), (stage, steps_of)
        chunks = scalars(run, "train/num_contexts")
        assert chunks == {1: 1, 2: SEVERAL_CHUNKS, ONE_CHUNK_STEP: 1}, (stage, chunks)
        retriever = scalars(run, "train/retriever_loss")   # multi-chunk and revisit steps of stages 2-3
        assert sorted(retriever) == ([] if stage == "stage1" else [2, 3, 4]), (stage, retriever)
        assert all(math.isfinite(v) for v in retriever.values()), (stage, retriever)
        val = scalars(run, "val/loss")
        assert val and all(math.isfinite(v) for v in val.values()), (stage, val)
        if stage == CHECKPOINTED:
            ranks = range(1 if strategy == "auto" else 2)
            assert all(any((run / "checkpoints").rglob(f"*rank{r}*")) for r in ranks), "every rank saved its memory"
        model, memory = MPlus.from_pretrained(run / "export"), MemoryState.from_pretrained(run / "export")
        memory.to(dtype=model.dtype)
        logits = model.read(memory, torch.tensor([[5, 6, 7]]))
        assert logits.shape == (1, 3, model.config.llama["vocab_size"]) and torch.isfinite(logits).all(), stage
        assert (memory.ltm is not None and len(memory.ltm) > 0) == (stage == "ltm"), stage


if __name__ == "__main__":
    run_job(sys.argv[1], Path(sys.argv[2]))

"""Real multi-process runs of `python -m mplus_lightning.fit` with FSDP2 (ModelParallelStrategy) on 2 gloo ranks.

Tolerances: the 2-rank run and the 1-process reference compute the same float32 math, but FSDP reduces gradients
with a reduce-scatter (sum then divide, in another order than our (g0 + g1) / 2) and AdamW divides by sqrt(v), so
results agree to float32 rounding amplified over a few steps: losses to 1e-5 relative, weights to 1e-5 absolute.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mplus_lightning import MemoryState, checkpointing as ck, config as C, fit
from mplus_lightning.stages import LtmModule
from mplus_lightning.stages.build import initial_memory
from mplus_lightning.stages.step import Decisions, MemoryStep

from .test_training import scalars

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
ROOT = Path(__file__).parents[1]
# Documents long enough that every rank injects exactly 2 chunks per multi-chunk step.
COMMON = ["init_from=null", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
          "trainer.val_every_n_steps=1000", "step.num_contexts_schedule=[[0,2]]",
          "data.params.min_doc_length=200", "data.params.max_doc_length=260"]


def launch(tmp_path, name, *extra, devices=2):
    args = [sys.executable, "-m", "mplus_lightning.fit", "--config", str(ROOT / "experiments" / "tiny_ltm.yaml"),
            f"name={name}", f"run_dir={tmp_path}", "trainer.strategy=fsdp2", f"trainer.devices={devices}",
            *COMMON, *extra]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def reference(tmp_path, steps: int):
    """One process playing both ranks: each rank's memory and draws, gradients averaged, one AdamW step."""
    cfg = C.load(ROOT / "experiments" / "tiny_ltm.yaml", [f"run_dir={tmp_path}", "name=ref", *COMMON])
    seed = cfg.trainer.seed
    dm = fit.build_datamodule(cfg)
    streams = [iter(dm.build_train_dataset(rank=r, world_size=2, skip=0)) for r in (0, 1)]
    module = LtmModule(cfg, fit.instruction_ids(cfg, dm))
    # what setup() and on_fit_start() do on rank r: its own memory and decisions, the shared model
    ranks = [MemoryStep(module.model, cfg.step, initial_memory(cfg, module.model, seed=seed + r),
                        decisions=Decisions(cfg.step, seed, r, module.model.config.drop_memory_per_layer),
                        instruction_ids=module.memory_step.instruction_ids) for r in (0, 1)]
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    losses = []
    for global_step in range(steps):
        step = []
        for r in (0, 1):
            result = ranks[r].step(next(streams[r]), global_step)
            (result.loss / 2).backward()
            step.append(result.loss.item())
        opt.step()
        opt.zero_grad()
        losses.append(step)
    return module, losses, ranks


def test_two_ranks_equal_one_process_on_the_same_global_batch_with_activation_checkpointing(tmp_path):
    launch(tmp_path, "fsdp", "trainer.max_steps=3", "trainer.ckpt_every_n_steps=3",
           "trainer.activation_checkpointing=true")
    module, losses, ranks = reference(tmp_path, steps=3)
    logged = scalars(tmp_path / "fsdp", "train/loss")       # rank 0's losses
    assert sorted(logged) == [0, 1, 2]
    for step, (l0, _) in enumerate(losses):
        assert abs(logged[step] - l0) <= 1e-5 * abs(l0), (step, logged[step], l0)
    exported = load_file(str(tmp_path / "fsdp" / "export" / "model.safetensors"))
    mine = module.model.state_dict()
    assert exported.keys() == mine.keys()
    moved = 0
    for k, v in mine.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-5, msg=k)
        moved += "lora_B" in k and v.abs().sum() > 0
    assert moved, "training changed the adapters (the comparison is not between two untouched models)"
    memory = MemoryState.from_pretrained(tmp_path / "fsdp" / "export")      # rank 0's memory
    torch.testing.assert_close(memory.rows, ranks[0].memory.rows, rtol=0, atol=1e-5)


def test_two_rank_resume_is_exact_and_ranks_read_disjoint_documents(tmp_path):
    launch(tmp_path, "straight", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2")
    launch(tmp_path, "split", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2")
    (unit,) = ck.list_units(tmp_path / "split" / "checkpoints")
    assert unit.model.is_dir(), "FSDP2 writes a sharded (distributed) checkpoint"
    assert {p.name for p in unit.path.glob("rank*")} == {"rank0.safetensors", "rank1.safetensors"}
    launch(tmp_path, "split", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2", "resume=last")
    a, b = scalars(tmp_path / "straight", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    states = {}
    for run in ("straight", "split"):
        for r in (0, 1):
            states[run, r] = ck.read_rank_state(ck.list_units(tmp_path / run / "checkpoints")[-1].rank_state(r))
    for r in (0, 1):
        torch.testing.assert_close(states["split", r]["memory"]["rows"], states["straight", r]["memory"]["rows"])
    docs0, docs1 = set(states["straight", 0]["recent_docs"]), set(states["straight", 1]["recent_docs"])
    assert len(docs0) == len(docs1) == 4 and not docs0 & docs1
    # the sharded checkpoint exports to the same model the run exported, with either rank's memory
    from mplus_lightning.export import main as export_main
    newest = ck.list_units(tmp_path / "split" / "checkpoints")[-1]
    assert newest.step == 4 and ck.verify_unit(newest)["ranks"] == 2
    assert export_main([str(newest.path), str(tmp_path / "exported1"), "--rank", "1"]) == 0
    run_export = load_file(str(tmp_path / "split" / "export" / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported1" / "model.safetensors"))
    assert exported.keys() == run_export.keys()
    for k in run_export:
        assert torch.equal(exported[k], run_export[k]), k
    mem1 = MemoryState.from_pretrained(tmp_path / "exported1")
    assert torch.equal(mem1.rows, states["split", 1]["memory"]["rows"])


def test_resume_on_another_world_size_follows_the_documented_rule(tmp_path):
    launch(tmp_path, "grow", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2")
    proc = launch(tmp_path, "grow", "trainer.max_steps=3", "trainer.ckpt_every_n_steps=3", "resume=last",
                  devices=1)
    assert "saved by 2 ranks on 1 ranks: rank 0 continues the memory and step state of saved rank 0" in proc.stderr


POISON_RANK_1 = '''
import sys
import torch
from mplus_lightning import fit
from mplus_lightning.stages.step import MemoryStep

real = MemoryStep.step


def poisoned(self, sample, global_step=0):
    """Rank 1 only: a NaN in its memory after step 1 (its loss stays finite); rank 0 stays finite."""
    result = real(self, sample, global_step)
    if global_step == 1 and torch.distributed.get_rank() == 1:
        self.memory.rows[0, 0, 0] = float("nan")
    return result


MemoryStep.step = poisoned
sys.exit(fit.main(sys.argv[1:]))
'''


def test_a_non_finite_state_on_one_rank_stops_every_rank_before_the_save(tmp_path):
    # Only rank 1 sees the NaN: if rank 0 went on to save, it would wait forever in the save's collectives.
    script = tmp_path / "poisoned_fit.py"
    script.write_text(POISON_RANK_1)
    args = [sys.executable, str(script), "--config", str(ROOT / "experiments" / "tiny_ltm.yaml"), "name=nan",
            f"run_dir={tmp_path}", "trainer.strategy=fsdp2", "trainer.devices=2", "trainer.max_steps=4",
            "trainer.ckpt_every_n_steps=1", *COMMON]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a rank hung after another found non-finite state")
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: non-finite values after step 1")]
    assert any("(memory rows, rank 1)" in line for line in errors), err[-3000:]
    assert any("(on another rank, rank 0)" in line for line in errors), err[-3000:]
    assert [u.step for u in ck.list_units(tmp_path / "nan" / "checkpoints")] == [1]

"""Runs that cannot silently lose or corrupt work: checkpoint units (mplus_lightning/checkpointing.py) written
atomically and verified on load, run folders that refuse to be reused by accident, no code run from data files,
and the non-finite stop. Faults are injected, never timed: a save is stopped after each of its phases by replacing
`checkpointing.after_phase`, as a kill would stop it there."""
import json
import pickle
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from mplus_lightning import MemoryState, checkpointing as ck, config as C, fit
from mplus_lightning.checkpointing import CheckpointError, NonFiniteError
from mplus_lightning.export import main as export_main
from mplus_lightning.stages.step import MemoryStep

from .test_step import sample, stage3_step
from .test_training import scalars

ROOT = Path(__file__).parents[1]
QUIET = ["trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=1000"]
YAML = {"stage1": "tiny.yaml", "ltm": "tiny_ltm.yaml"}


def run_cfg(run_dir, name, *extra, stage="stage1"):
    """A tiny run that saves a checkpoint unit every step."""
    return C.load(ROOT / "experiments" / YAML[stage], [f"name={name}", f"run_dir={run_dir}", "init_from=null",
                                                       "trainer.ckpt_every_n_steps=1", *QUIET, *extra])


class Losses(L.Callback):
    """The training loss of every step (a replayed step overwrites its entry)."""

    def __init__(self, by_step=None):
        self.by_step = {} if by_step is None else by_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step - 1] = float(outputs["loss"])


class Killed(Exception):
    pass


def steps(run_dir: Path) -> list[int]:
    return [u.step for u in ck.list_units(run_dir / "checkpoints")]


def assert_same_losses(got: dict, want: dict):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * max(1.0, abs(want[step])), (step, got[step], want[step])


def assert_same_export(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = MemoryState.from_pretrained(a), MemoryState.from_pretrained(b)
    assert torch.equal(ma.rows, mb.rows) and torch.equal(ma.ranks, mb.ranks)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished tiny stage-1 run with checkpoint units at steps 1, 2 and 3 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("saved")
    cfg = run_cfg(root, "run", "trainer.max_steps=3", "trainer.keep_checkpoints=3")
    fit.run(cfg)
    assert steps(cfg.out_dir) == [1, 2, 3]
    return cfg.out_dir


def copy_run(saved_run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(saved_run, tmp_path / name)
    return tmp_path / name


def rewrite_manifest(unit: ck.Unit, ranks: int | None = None):
    """What someone who controls the whole folder can do: make the manifest match the files again (and, with
    `ranks`, claim another number of rank states)."""
    manifest = json.loads((unit.path / ck.MANIFEST).read_text())
    tmp = unit.path.with_name(unit.path.name + ck.TMP)
    (unit.path / ck.MANIFEST).unlink()
    unit.path.rename(tmp)
    ck.commit_unit(tmp, unit.step, manifest["id"], manifest["ranks"] if ranks is None else ranks)


# ---- kills ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "ltm"])
def test_a_save_killed_after_any_phase_resumes_exactly(tmp_path, monkeypatch, stage):
    """One run killed once after each phase of a save, resumed with resume=last each time: the losses, weights and
    memory equal an uninterrupted run's, and every unit on disk is complete at every moment."""
    extra = ["trainer.max_steps=4", "trainer.keep_checkpoints=2"]
    straight = Losses()
    fit.run(run_cfg(tmp_path, "straight", *extra, stage=stage), callbacks=[straight])
    assert sorted(straight.by_step) == [0, 1, 2, 3]

    armed = {}

    def kill(phase, path):
        if not armed:
            return
        armed["saves"] += phase == "model"
        if phase == armed.get("phase") and armed["saves"] >= armed["from_save"]:
            armed.clear()
            raise Killed(f"killed after {phase} ({path.name})")

    monkeypatch.setattr(ck, "after_phase", kill)
    killed = Losses()
    run_dir = tmp_path / "killed"
    expected_newest = {"model": 1, "rank_state": 1, "manifest": 1, "commit": 2, "prune": 3}
    for i, phase in enumerate(ck.PHASES):
        armed.update(phase=phase, saves=0, from_save=2 if i == 0 else 1)   # the first run dies in its 2nd save
        cfg = run_cfg(tmp_path, "killed", *extra, *(["resume=last"] if i else []), stage=stage)
        with pytest.raises(Killed, match=f"after {phase}"):
            fit.run(cfg, callbacks=[killed])
        assert steps(run_dir)[-1] == expected_newest[phase], (phase, steps(run_dir))
        for unit in ck.list_units(run_dir / "checkpoints"):
            ck.verify_unit(unit)   # whatever the moment of the kill, every unit it left is complete
    leftovers = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "step=000000001.deleting" in leftovers, leftovers
    fit.run(run_cfg(tmp_path, "killed", *extra, "resume=last", stage=stage), callbacks=[killed])
    assert_same_losses(killed.by_step, straight.by_step)
    assert_same_export(run_dir / "export", tmp_path / "straight" / "export")
    assert steps(run_dir) == [3, 4] and not [p for p in (run_dir / "checkpoints").iterdir()
                                           if p.name.endswith((ck.TMP, ck.DELETING))]


# ---- damaged and mismatched files ----------------------------------------------------------------------------------
def flip_bytes(path: Path, n: int = 64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped model": (ck.MODEL, flip_bytes, "does not match its checksum"),
    "truncated model": (ck.MODEL, truncate, "truncated or damaged"),
    "empty model": (ck.MODEL, lambda p: p.write_bytes(b""), "truncated or damaged"),
    "flipped rank state": ("rank0.safetensors", flip_bytes, "does not match its checksum"),
    "truncated rank state": ("rank0.safetensors", truncate, "truncated or damaged"),
    "missing rank state": ("rank0.safetensors", Path.unlink, "is missing"),
    "garbled manifest": (ck.MANIFEST, lambda p: p.write_text('{"format": "mplus'), "unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_with_its_intact_predecessors(saved_run, tmp_path, case):
    run = copy_run(saved_run, tmp_path)
    file, damage, why = DAMAGE[case]
    damage(run / "checkpoints" / "step=000000003" / file)
    cfg = run_cfg(tmp_path, "run", "resume=last")
    with pytest.raises(CheckpointError) as e:
        fit.prepare_run_folder(cfg, rank=0)
    message = str(e.value)
    units = run / "checkpoints"
    assert str(units / "step=000000003" / file) in message and why in message
    assert f"resume={units / 'step=000000002'}, resume={units / 'step=000000001'}" in message
    assert "\n" not in message and steps(run) == [1, 2, 3], "nothing is deleted or moved by a refusal"


def test_files_of_two_saves_are_never_combined(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    unit3, unit2 = (ck.Unit(run / "checkpoints" / f"step=00000000{s}", s) for s in (3, 2))
    shutil.copy(unit2.rank_state(0), unit3.rank_state(0))   # e.g. killed while writing the newer one, old one kept
    rewrite_manifest(unit3)   # even with checksums that match
    with pytest.raises(CheckpointError, match=rf"{unit3.rank_state(0)} \(step 2\) and .*manifest.json \(step 3\) were "
                                              "written by different saves"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=0)


@pytest.mark.slow
def test_a_rank_state_of_another_save_of_the_same_step_is_refused(saved_run, tmp_path):
    # Two runs of the same config save identical steps; only the save's id tells their files apart.
    run = copy_run(saved_run, tmp_path)
    twin = run_cfg(tmp_path / "twin", "run", "trainer.max_steps=3", "trainer.keep_checkpoints=3")
    fit.run(twin)
    unit3 = ck.Unit(run / "checkpoints" / "step=000000003", 3)
    shutil.copy(ck.Unit(twin.out_dir / "checkpoints" / "step=000000003", 3).rank_state(0), unit3.rank_state(0))
    rewrite_manifest(unit3)
    with pytest.raises(CheckpointError, match=r"\(step 3\) and .*\(step 3\) were written by different saves"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=0)


def test_a_renamed_checkpoint_folder_is_not_resumed_as_a_later_step(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    (run / "checkpoints" / "step=000000001").rename(run / "checkpoints" / "step=000000009")
    with pytest.raises(CheckpointError, match=r"says step 1 but its folder is step=000000009: .*was renamed"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=0)


def test_every_rank_verifies_its_own_state(saved_run, tmp_path):
    # A two-rank unit made from the one-rank run; rank 1's file is damaged: rank 1 names it (rank 0 reads its own).
    run = copy_run(saved_run, tmp_path)
    unit3 = ck.Unit(run / "checkpoints" / "step=000000003", 3)
    shutil.copy(unit3.rank_state(0), unit3.rank_state(1))
    rewrite_manifest(unit3, ranks=2)
    flip_bytes(unit3.rank_state(1))
    with pytest.raises(CheckpointError, match=rf"{unit3.rank_state(1)} does not match its checksum"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=1)


def test_resuming_an_earlier_step_moves_the_newer_ones_aside_before_training(saved_run, tmp_path):
    # Else `resume=last` after a crash before the next save would go back to the step the user chose to leave.
    run = copy_run(saved_run, tmp_path)
    fit.prepare_run_folder(run_cfg(tmp_path, "run", f"resume={run / 'checkpoints' / 'step=000000002'}"), rank=0)
    assert steps(run) == [1, 2]
    assert [p.name for p in (run / "checkpoints" / ck.SUPERSEDED).glob("*/step=*")] == ["step=000000003"]
    assert fit.resume_unit(run_cfg(tmp_path, "run", "resume=last")).step == 2


@pytest.mark.slow
def test_resuming_an_intact_predecessor_moves_the_damaged_one_aside(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    flip_bytes(run / "checkpoints" / "step=000000003" / ck.MODEL)
    args = ["--config", str(ROOT / "experiments" / "tiny.yaml"), "name=run", f"run_dir={tmp_path}",
            "trainer.ckpt_every_n_steps=1", "trainer.max_steps=4", *QUIET]
    assert fit.main([*args, "resume=last"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and "step=000000003/model.ckpt does not match its checksum" in line
    alternative = line.split("Intact earlier checkpoints: resume=")[1].split(",")[0]
    assert alternative == str(run / "checkpoints" / "step=000000002")
    assert fit.main([*args, f"resume={alternative}"]) == 0
    assert steps(run) == [2, 3, 4]
    (aside,) = (run / "checkpoints" / ck.SUPERSEDED).glob("*/step=000000003")
    with pytest.raises(CheckpointError):
        ck.verify_unit(ck.Unit(aside, 3))          # the damaged one, kept but never resumed by resume=last
    for unit in ck.list_units(run / "checkpoints"):
        ck.verify_unit(unit)


def test_what_is_not_a_checkpoint_is_named(saved_run, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"resume=.*notes\.txt: .*notes\.txt is not a checkpoint of "
                                              r"mplus_lightning\.fit"):
        fit.prepare_run_folder(run_cfg(tmp_path, "new", f"resume={tmp_path / 'notes.txt'}"), rank=0)
    run = copy_run(saved_run, tmp_path)
    shutil.copytree(run / "checkpoints" / "step=000000003", run / "checkpoints" / "step=000000004.tmp")
    (run / "checkpoints" / "step=000000004.tmp" / ck.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"step=000000004\.tmp is an incomplete checkpoint .*step=000000003"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=checkpoints/step=000000004.tmp"), rank=0)
    with pytest.raises(CheckpointError, match=r"resume=last: .*holds no complete checkpoint"):
        fit.prepare_run_folder(run_cfg(tmp_path, "empty", "resume=last"), rank=0)
    # a truncated memory file is named by the reader too (not only by its checksum)
    state = tmp_path / "rank0.safetensors"
    shutil.copy(run / "checkpoints" / "step=000000003" / "rank0.safetensors", state)
    truncate(state)
    with pytest.raises(CheckpointError, match=rf"{state}: its tensors cannot be read|{state} is not a readable"):
        ck.read_rank_state(state)


# ---- run folders ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_moved_or_copied_run_folder_resumes_from_its_newest_step(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path, "first")
    run.rename(tmp_path / "moved")
    losses = Losses()
    fit.run(run_cfg(tmp_path, "moved", "trainer.max_steps=4", "resume=last"), callbacks=[losses])
    assert sorted(losses.by_step) == [3]
    shutil.copytree(tmp_path / "moved", tmp_path / "copied")
    losses = Losses()
    fit.run(run_cfg(tmp_path, "copied", "trainer.max_steps=5", "trainer.keep_checkpoints=3", "resume=last"),
            callbacks=[losses])
    assert sorted(losses.by_step) == [4] and steps(tmp_path / "copied") == [3, 4, 5]
    assert not [p for p in tmp_path.rglob("*") if "-v1" in p.name]


@pytest.mark.slow
def test_a_used_run_folder_is_refused_unless_resumed_or_overwritten(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    args = ["--config", str(ROOT / "experiments" / "tiny.yaml"), "name=run", f"run_dir={tmp_path}",
            "trainer.ckpt_every_n_steps=1", "trainer.max_steps=1", *QUIET]
    assert fit.main(args) == 1
    err = capsys.readouterr().err
    assert f"error: {run} already holds a run (checkpoints, tensorboard, export)" in err
    assert "resume=last" in err and "overwrite=true" in err and "Traceback" not in err
    assert steps(run) == [1, 2, 3]
    assert fit.main([*args, "overwrite=true", "resume=last"]) == 1
    assert "set only one of them" in capsys.readouterr().err
    assert fit.main([*args, "overwrite=true"]) == 0
    assert steps(run) == [1], "the earlier run's checkpoints are gone"
    assert len(list((run / "tensorboard").glob("events.*"))) == 1 and sorted(scalars(run, "train/loss")) == [0]


# ---- no code from files --------------------------------------------------------------------------------------------
class Payload:
    """Unpickling it creates `marker` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payloads_in_a_checkpoint_never_run(saved_run, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    run = copy_run(saved_run, tmp_path)
    unit = ck.Unit(run / "checkpoints" / "step=000000003", 3)
    state = unit.rank_state(0)
    torch.save({"memory": Payload(marker)}, state)          # the rank state read on resume
    rewrite_manifest(unit)
    with pytest.raises(CheckpointError, match=rf"{state} is not a readable rank state"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=0)
    with pytest.raises(CheckpointError, match=rf"{state} is not a readable rank state"):
        ck.read_rank_state(state)
    torch.save({"state_dict": Payload(marker), "global_step": 3}, unit.model)   # Lightning's file, for export
    rewrite_manifest(unit)
    assert export_main([str(unit.path), str(tmp_path / "out")]) == 2
    assert f"{unit.model} is not a readable Lightning checkpoint (UnpicklingError" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=rf"{unit.model} is not a readable Lightning checkpoint"):
        fit.prepare_run_folder(run_cfg(tmp_path, "run", "resume=last"), rank=0)
    assert not marker.exists()


def test_pickle_payloads_in_a_sharded_checkpoint_never_run(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "payload-ran"
    with warnings.catch_warnings():   # "torch.distributed is ... uninitialized": one process, as intended here
        warnings.simplefilter("ignore")
        dcp.save({"weight": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=tmp_path / "entry", no_dist=True)
        dcp.save({"weight": torch.ones(2)}, checkpoint_id=tmp_path / "index", no_dist=True)
    torch.save({"global_step": 1}, tmp_path / "entry" / "meta.pt")
    with pytest.raises(CheckpointError, match=r"entry .*extra is not plain data"):
        ck.read_lightning_checkpoint(tmp_path / "entry")
    (tmp_path / "index" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"index/\.metadata is not a safe checkpoint index \(UnpicklingError: "
                                              r"io\.open is not allowed"):
        ck.read_lightning_checkpoint(tmp_path / "index")
    # the same through `python -m mplus_lightning.export` on a unit holding it (manifest and all consistent)
    tmp = ck.begin_unit(tmp_path / "checkpoints", 1)
    shutil.copytree(tmp_path / "entry", tmp / ck.MODEL)
    ck.commit_unit(tmp, 1, "x", ranks=0)
    assert export_main([str(tmp_path / "checkpoints"), str(tmp_path / "out")]) == 2
    assert "is not plain data" in capsys.readouterr().err
    assert not marker.exists()


# ---- non-finite training -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("huge_lr", [1e3, 1e5, 1e20])
def test_a_huge_learning_rate_stops_before_saving_non_finite_state(saved_run, tmp_path, caplog, huge_lr):
    """Resumed with a huge learning rate, the tiny run goes non-finite: in its weights before its loss (1e3: the
    BOS vectors, as weight decay multiplies them by 1 - lr * 0.01 every step) or in its loss first. No non-finite
    checkpoint is written, the stop names the newest one before the failure (its step's loss was finite), and
    resuming it with the old rate uses that rate from its first step."""
    run = copy_run(saved_run, tmp_path)
    with caplog.at_level("WARNING", logger="mplus_lightning.stages.base"):
        with pytest.raises(NonFiniteError) as e:
            fit.run(run_cfg(tmp_path, "run", "trainer.max_steps=12", "trainer.keep_checkpoints=-1",
                            f"optim.lr={huge_lr}", "resume=last"))
    assert f"learning rate changed on resume: optim.lr 0.001 -> {huge_lr:g}" in caplog.text
    lr = scalars(run, "lr-AdamW/main")
    assert lr[3] == pytest.approx(huge_lr * (1 - 0.9 * 3 / 100)), "the new rate is used from the first resumed step"
    message, failed = str(e.value), e.value.step
    named = ck.newest_before(run / "checkpoints", failed)
    assert named is not None and f"resume={named.path} and a lower learning rate" in message
    for unit in ck.list_units(run / "checkpoints"):   # every unit on disk is finite
        ck.verify_unit(unit)
        checkpoint = ck.read_full_checkpoint(unit.model)
        tensors = [*checkpoint["state_dict"].values(),
                   *(v for s in checkpoint["optimizer_states"][0]["state"].values() for v in s.values()),
                   ck.read_rank_state(unit.rank_state(0))["memory"]["rows"]]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), unit.path
    caplog.clear()
    losses = Losses()
    with caplog.at_level("WARNING", logger="mplus_lightning.stages.base"):
        fit.run(run_cfg(tmp_path, "run", f"trainer.max_steps={named.step + 1}", "trainer.ckpt_every_n_steps=1000",
                        f"resume={named.path}"), callbacks=[losses])
    assert sorted(losses.by_step) == [named.step] and torch.isfinite(torch.tensor(losses.by_step[named.step]))
    assert scalars(run, "lr-AdamW/main")[named.step] == pytest.approx(1e-3 * (1 - 0.9 * named.step / 100))
    if named.step > 3:   # saved by the huge-rate run: its rate is replaced again
        assert f"learning rate changed on resume: optim.lr {huge_lr:g} -> 0.001" in caplog.text


def poison_after_step(monkeypatch, step: int, what: str):
    """Make the training step `step` return an infinite loss, or write a NaN into the memory's rows (a finite loss)."""
    real = MemoryStep.step

    def poisoned(self, sample, global_step=0):
        result = real(self, sample, global_step)
        if global_step == step:
            if what == "inf loss":
                result.loss = result.loss * float("inf")
            else:
                self.memory.rows[0, 0, 0] = float("nan")
        return result
    monkeypatch.setattr(MemoryStep, "step", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("what, message", [("inf loss", r"non-finite training loss \(inf on rank 0\) at step 1"),
                                           ("nan memory row", r"non-finite values after step 1 \(memory rows")])
def test_an_infinite_loss_or_a_non_finite_memory_stops_before_it_is_saved(tmp_path, monkeypatch, what, message):
    poison_after_step(monkeypatch, 1, what)
    cfg = run_cfg(tmp_path, "run", "trainer.max_steps=4", "trainer.keep_checkpoints=-1")
    with pytest.raises(NonFiniteError, match=message):
        fit.run(cfg)
    assert steps(cfg.out_dir) == [1], "only the step before the failure was saved"


@pytest.mark.slow
def test_a_non_finite_stop_on_the_command_line_is_one_error_line(tmp_path, monkeypatch, capsys):
    poison_after_step(monkeypatch, 2, "inf loss")
    args = ["--config", str(ROOT / "experiments" / "tiny.yaml"), "name=run", f"run_dir={tmp_path}",
            "trainer.max_steps=4", "trainer.ckpt_every_n_steps=1", *QUIET]
    assert fit.main(args) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and "non-finite training loss (inf on rank 0) at step 2" in line
    # unit 2 holds the weights whose loss was infinite; unit 1 is the newest whose step was finite
    assert f"resume={tmp_path / 'run' / 'checkpoints' / 'step=000000001'} and a lower learning rate" in line


# ---- the pieces ----------------------------------------------------------------------------------------------------
def test_rank_state_files_round_trip_the_step_exactly(tmp_path):
    first = stage3_step()
    for seed in range(4):
        first.step(sample(seed=seed))
    rng = torch.get_rng_state()
    ck.write_rank_state(tmp_path / "rank0.safetensors", {**first.state_dict(), "torch_rng": rng})
    again = stage3_step()
    state = ck.read_rank_state(tmp_path / "rank0.safetensors")
    again.load_state_dict(state)
    assert isinstance(state["rng"], tuple) and isinstance(state["rng"][1], tuple)
    assert state["rng"] == first.decisions.state_dict()["rng"]
    assert torch.equal(state["torch_rng"], rng) and state["revisit"]["ids"] is not None
    for seed in range(4, 8):
        a, b = first.step(sample(seed=seed)), again.step(sample(seed=seed))
        assert a.kind == b.kind and torch.equal(a.loss, b.loss), seed
    assert torch.equal(first.memory.rows, again.memory.rows)


def test_pruning_keeps_the_newest_two_and_only_removes_committed_units(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        tmp = ck.begin_unit(ckpts, step)
        (tmp / ck.MODEL).write_bytes(b"x")
        ck.commit_unit(tmp, step, str(step), ranks=0)
    ck.begin_unit(ckpts, 5)   # a save in progress
    assert [u.step for u in ck.list_units(ckpts)] == [1, 2, 3, 4]
    ck.prune(ckpts, keep=-1)
    assert [u.step for u in ck.list_units(ckpts)] == [1, 2, 3, 4]
    ck.prune(ckpts, keep=3)
    assert [u.step for u in ck.list_units(ckpts)] == [2, 3, 4]
    ck.prune(ckpts, keep=0)
    assert [u.step for u in ck.list_units(ckpts)] == [3, 4] and (ckpts / "step=000000005.tmp").is_dir()
    assert ck.remove_incomplete(ckpts) == [ckpts / "step=000000005.tmp"]


def test_one_non_finite_element_is_enough_to_name_a_tensor():
    x = torch.zeros(4)
    x[1] = float("nan")
    assert ck.first_non_finite([("fine", torch.zeros(3)), ("bad", x), ("also bad", x)]) == "bad"
    assert ck.first_non_finite([("fine", torch.zeros(3)), ("ints", torch.arange(3))]) is None

"""Checkpoints of runs whose backbone is frozen (model.train_backbone false, the real stages' default) name the backbone
and fingerprint it instead of storing it at every save (checkpointing.FrozenBackbone): smaller files, exact resume,
exports that hold every weight, and a one-line refusal when the backbone's source changed since the run started."""
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mplus_lightning import checkpointing as ck, config as C, fit
from mplus_lightning.checkpointing import CheckpointError
from mplus_lightning.distributed import checkpoint_layers
from mplus_lightning.export import export_checkpoint, main as export_main
from mplus_lightning.model.mplus import is_memory_parameter
from mplus_lightning.stages.build import build_model

from .test_faults import QUIET, Losses, assert_same_export, assert_same_losses, copy_run, run_cfg

ROOT = Path(__file__).parents[1]
CHANGED = "llama.model.layers.1.mlp.up_proj.base_layer.weight"   # a frozen backbone tensor that the tests alter


def unit(run: Path, step: int) -> ck.Unit:
    (found,) = [u for u in ck.list_units(run / "checkpoints") if u.step == step]
    return found


def saved(run: Path, step: int) -> dict:
    return ck.read_lightning_checkpoint(unit(run, step).model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny frozen-backbone stage-1 run twice, 3 steps with a unit per step: `frozen` as now, `stored` with
    every weight in its checkpoints as before frozen backbones were left out."""
    root = tmp_path_factory.mktemp("frozen")
    losses = Losses()
    fit.run(run_cfg(root, "frozen", "trainer.max_steps=3", "trainer.keep_checkpoints=3"), callbacks=[losses])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "frozen_backbone", lambda *args, **kwargs: None)
        fit.run(run_cfg(root, "stored", "trainer.max_steps=3", "trainer.keep_checkpoints=3"))
    return SimpleNamespace(frozen=root / "frozen", stored=root / "stored", losses=losses.by_step)


@pytest.mark.slow
def test_a_frozen_backbone_is_named_and_fingerprinted_not_stored(runs, tmp_path):
    fit.run(run_cfg(tmp_path, "trained", "trainer.max_steps=1", "model.train_backbone=true"))
    frozen, stored, trained = saved(runs.frozen, 1), saved(runs.stored, 1), saved(tmp_path / "trained", 1)
    backbone = {k for k in stored["state_dict"] if not is_memory_parameter(k[len("model."):])}
    assert "model.llama.model.embed_tokens.weight" in backbone and "model.llama.lm_head.weight" in backbone
    record = frozen[ck.FROZEN_BACKBONE]
    assert set(record["digests"]) == backbone
    assert set(frozen["state_dict"]) == set(stored["state_dict"]) - backbone
    seed = run_cfg(tmp_path, "x").trainer.seed
    assert record["source"] == f"model.init=tiny with model.llama and trainer.seed={seed}"
    for key in backbone:   # the fingerprint is of the weights the run trained with
        assert record["digests"][key] == ck.tensor_sha256(stored["state_dict"][key]), key
    assert ck.FROZEN_BACKBONE not in trained   # train_backbone: true stores everything
    assert set(trained["state_dict"]) == set(stored["state_dict"])
    size = {name: unit(run, 1).model.stat().st_size
            for name, run in (("frozen", runs.frozen), ("stored", runs.stored), ("trained", tmp_path / "trained"))}
    backbone_bytes = sum(stored["state_dict"][k].nbytes for k in backbone)
    assert size["frozen"] < size["trained"] / 4, size
    assert size["frozen"] <= size["stored"] - backbone_bytes, (size, backbone_bytes)


@pytest.mark.slow
def test_resuming_a_frozen_backbone_checkpoint_continues_exactly(runs, tmp_path):
    run = copy_run(runs.frozen, tmp_path, "frozen")
    resumed = Losses()
    fit.run(run_cfg(tmp_path, "frozen", "trainer.max_steps=3", "trainer.keep_checkpoints=3",
                    f"resume={unit(run, 1).path}"), callbacks=[resumed])
    assert sorted(resumed.by_step) == [1, 2]
    assert_same_losses(resumed.by_step, {step: runs.losses[step] for step in (1, 2)})
    assert_same_export(run / "export", runs.frozen / "export")
    again, straight = saved(run, 3), saved(runs.frozen, 3)
    assert again["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
    moments = [(again_state, state) for a, b in zip(again["optimizer_states"][0]["state"].values(),
                                                   straight["optimizer_states"][0]["state"].values())
               for again_state, state in zip(a.values(), b.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


@pytest.mark.slow
def test_the_export_of_a_frozen_backbone_checkpoint_holds_every_weight(runs, tmp_path):
    rng = torch.get_rng_state()
    assert export_main([str(unit(runs.frozen, 3).path), str(tmp_path / "from_frozen")]) == 0
    assert torch.equal(torch.get_rng_state(), rng), "rebuilding the backbone leaves the caller's random state alone"
    assert export_main([str(unit(runs.stored, 3).path), str(tmp_path / "from_stored")]) == 0
    assert_same_export(tmp_path / "from_frozen", tmp_path / "from_stored")
    assert_same_export(tmp_path / "from_frozen", runs.frozen / "export")   # the end-of-run export
    weights = load_file(str(tmp_path / "from_frozen" / "model.safetensors"))
    assert "llama.model.embed_tokens.weight" in weights and any("lora_" in k for k in weights)
    with pytest.raises(CheckpointError, match=r"random tiny init .* export it without --backbone"):
        export_checkpoint(unit(runs.frozen, 3).path, tmp_path / "nowhere", backbone=tmp_path)


@pytest.mark.slow
def test_a_resume_that_would_rebuild_another_backbone_is_refused(runs, tmp_path):
    copy_run(runs.frozen, tmp_path, "frozen")
    with pytest.raises(CheckpointError, match=r"tensor model\.llama\.\S+ has other values .*use the model\.llama and "
                                              r"trainer\.seed the run started with"):
        fit.run(run_cfg(tmp_path, "frozen", "trainer.max_steps=4", "trainer.seed=7", "resume=last"))
    with pytest.raises(CheckpointError, match=r"model\.ckpt holds no copy of its frozen backbone .* resume with the "
                                              r"run's model\.train_backbone=false"):
        fit.run(run_cfg(tmp_path, "frozen", "trainer.max_steps=4", "model.train_backbone=true", "resume=last"))


@pytest.mark.slow
def test_a_changed_backbone_source_is_refused_in_one_line_naming_it(runs, tmp_path, capsys):
    """A stage-2 run from stage 1's export: its checkpoints name that directory. The same weights moved elsewhere
    are accepted (the fingerprint is of the weights, not of the path); changed weights are refused by resume and by
    export, in one line naming the checkpoint, the directory, the tensor and the fix."""
    source = tmp_path / "stage1-export"
    shutil.copytree(runs.frozen / "export", source)
    stage2 = ["--config", str(ROOT / "experiments" / "tiny_stage2.yaml"), "name=stage2", f"run_dir={tmp_path}",
              "trainer.ckpt_every_n_steps=1", *QUIET]
    assert fit.main([*stage2, f"init_from={source}", "trainer.max_steps=1"]) == 0
    record = saved(tmp_path / "stage2", 1)[ck.FROZEN_BACKBONE]
    assert (record["source_key"], record["source"]) == ("init_from", str(source.resolve()))
    moved = tmp_path / "moved"
    source.rename(moved)
    capsys.readouterr()
    assert export_main([str(tmp_path / "stage2"), str(tmp_path / "lost")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(source.resolve()) in err and "pass --backbone" in err, err
    assert export_main([str(tmp_path / "stage2"), str(tmp_path / "found"), "--backbone", str(moved)]) == 0
    assert fit.main([*stage2, f"init_from={moved}", "trainer.max_steps=2", "resume=last"]) == 0

    weights_file = moved / "model.safetensors"
    with safe_open(str(weights_file), "pt") as f:
        metadata = f.metadata()
    weights = load_file(str(weights_file))
    weights[CHANGED] = weights[CHANGED].clone()
    weights[CHANGED][0, 0] += 1.0
    save_file(weights, str(weights_file), metadata=metadata)
    capsys.readouterr()
    assert fit.main([*stage2, f"init_from={moved}", "trainer.max_steps=3", "resume=last"]) == 1
    err = capsys.readouterr().err.strip()
    newest = unit(tmp_path / "stage2", 2).model
    assert err.startswith(f"error: {newest}: the frozen backbone rebuilt from {moved.resolve()} differs"), err
    assert "\n" not in err and f"tensor model.{CHANGED} has other values" in err and "set init_from= to" in err, err
    assert export_main([str(tmp_path / "stage2"), str(tmp_path / "changed"), "--backbone", str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"tensor model.{CHANGED} has other values" in err and "pass --backbone" in err, err


def test_the_fingerprint_reads_the_built_tensors_also_under_activation_checkpointing():
    cfg = run_cfg("unused", "x")
    model = build_model(cfg)
    frozen = ck.frozen_backbone(cfg, model)
    assert frozen is not None and frozen.digests and all(k.startswith("model.llama.") for k in frozen.digests)
    checkpoint_layers(model)   # what configure_model does before a resume loads: wrapped layers, same state-dict keys
    tensors = frozen.tensors()
    assert tensors.keys() == frozen.digests.keys()
    assert all(ck.tensor_sha256(t) == frozen.digests[k] for k, t in tensors.items())
    assert ck.tensor_sha256(torch.zeros(2, dtype=torch.float32)) != ck.tensor_sha256(torch.zeros(2, dtype=torch.int32))
    for extra in ("model.train_backbone=true", "trainer.strategy=fsdp2"):
        assert ck.frozen_backbone(run_cfg("unused", "x", extra), model) is None, extra
    pretrain = C.load(ROOT / "experiments" / "demo_pretrain.yaml", ["model.train_backbone=false"])
    assert ck.frozen_backbone(pretrain, model) is None


@pytest.mark.slow
@pytest.mark.multirank
def test_fsdp2_sharded_checkpoints_still_store_the_frozen_backbone(tmp_path):
    """FSDP2 writes torch.distributed.checkpoint shards, which Lightning reads back whole: they keep every weight
    (each rank writes its own shard of the backbone) and resume as before (tests/test_distributed.py)."""
    args = [sys.executable, "-m", "mplus_lightning.fit", "--config", str(ROOT / "experiments" / "tiny.yaml"),
            "name=fsdp", f"run_dir={tmp_path}", "trainer.strategy=fsdp2", "trainer.devices=2", "trainer.max_steps=1",
            "trainer.ckpt_every_n_steps=1", *QUIET]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = unit(tmp_path / "fsdp", 1).model
    assert model.is_dir() and ck.FROZEN_BACKBONE not in ck.read_lightning_checkpoint(model)
    keys = set(ck.read_full_checkpoint(model)["state_dict"])
    assert {"model.llama.model.embed_tokens.weight", f"model.{CHANGED}"} <= keys


@pytest.mark.slow
def test_a_tensor_frozen_now_but_trained_in_the_saved_run_is_refused(runs):
    # The saved run trained it (its checkpoint stores it, not its digest): the rebuilt copy must not overwrite it.
    checkpoint = saved(runs.frozen, 3)
    frozen = ck.frozen_backbone(run_cfg("unused", "frozen"), build_model(run_cfg("unused", "frozen")))
    restored = ck.restore_frozen_backbone(checkpoint, frozen, "model.ckpt")
    assert frozen.digests.keys() <= restored["state_dict"].keys()
    record = checkpoint[ck.FROZEN_BACKBONE]
    dropped = sorted(record["digests"])[0]
    trained = {**checkpoint, ck.FROZEN_BACKBONE: {**record, "digests": {k: v for k, v in record["digests"].items()
                                                                        if k != dropped}}}
    with pytest.raises(CheckpointError, match=rf"tensor {dropped} is not part of the saved backbone"):
        ck.restore_frozen_backbone(trained, frozen, "model.ckpt")


@pytest.mark.slow
def test_export_with_backbone_of_a_run_that_started_from_a_llama_directory(tmp_path, capsys):
    # The run names model.path (not init_from) as its backbone's source: --backbone must replace that key.
    cfg = C.load(ROOT / "experiments" / "tiny.yaml",
                 [f"run_dir={tmp_path}", "name=llama-run", "model.init=llama", f"model.path={tmp_path / 'llama'}",
                  "trainer.max_steps=1", "trainer.ckpt_every_n_steps=1", *QUIET])
    torch.manual_seed(5)
    llama = LlamaForCausalLM(LlamaConfig(**cfg.model.llama))
    llama.save_pretrained(tmp_path / "llama")
    fit.run(cfg)
    (found,) = ck.list_units(cfg.out_dir / "checkpoints")
    assert ck.read_lightning_checkpoint(found.model)[ck.FROZEN_BACKBONE]["source_key"] == "model.path"
    shutil.move(tmp_path / "llama", tmp_path / "moved-llama")
    assert export_main([str(found.path), str(tmp_path / "out"), "--backbone", str(tmp_path / "moved-llama")]) == 0, \
        capsys.readouterr().err
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(weights["llama.model.embed_tokens.weight"], llama.model.embed_tokens.weight.detach())

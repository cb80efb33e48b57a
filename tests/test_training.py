"""Training stages end to end on tiny CPU runs: resume equivalence, NaN stop, TensorBoard, stage transitions."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mplus_lightning import MemoryState, MPlus, checkpointing as ck, config as C, fit
from mplus_lightning.data.sample import Sample
from mplus_lightning.stages import LtmModule
from mplus_lightning.stages.build import fit_pool
from mplus_lightning.stages.step import MemoryStep

ROOT = Path(__file__).parents[1]
QUIET = ["trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=1000"]


def ltm_cfg(tmp_path, name, *extra):
    """Tiny stage-3 run from scratch: exercises LTM, retriever losses, revisits and all step kinds."""
    return C.load(ROOT / "experiments" / "tiny_ltm.yaml",
                  [f"name={name}", f"run_dir={tmp_path}", "init_from=null", *QUIET, *extra])


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    # LoRA dropout on (the shipped stage configs' 0.1): each step draws its masks from torch's global generator, so
    # the resumed run must continue that generator exactly where the saved step left it (a validation at the saved
    # step included).
    run = ["trainer.ckpt_every_n_steps=2", "model.lora_dropout=0.1", "trainer.val_every_n_steps=2",
           "trainer.val_batches=2"]
    straight = ltm_cfg(tmp_path, "straight", "trainer.max_steps=4", *run)
    fit.run(straight)
    first = ltm_cfg(tmp_path, "split", "trainer.max_steps=2", *run)
    fit.run(first)
    (unit,) = ck.list_units(first.out_dir / "checkpoints")
    assert unit.step == 2 and unit.rank_state(0).is_file() and unit.model.is_file()
    fit.run(ltm_cfg(tmp_path, "split", "trainer.max_steps=4", *run, "resume=last"))
    a, b = scalars(straight.out_dir, "train/loss"), scalars(first.out_dir, "train/loss")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    # the memory at the end is the same too
    ma = MemoryState.from_pretrained(straight.out_dir / "export")
    mb = MemoryState.from_pretrained(first.out_dir / "export")
    torch.testing.assert_close(mb.rows, ma.rows)
    assert torch.equal(mb.ranks, ma.ranks) and len(ma.ltm) == len(mb.ltm) > 0
    # `python -m mplus_lightning.export` turns the last checkpoint into the same model directory
    from mplus_lightning.export import main as export_main
    assert export_main([str(first.out_dir / "checkpoints"), str(tmp_path / "exported")]) == 0   # the newest: step 4
    model, again = MPlus.from_pretrained(tmp_path / "exported"), MPlus.from_pretrained(first.out_dir / "export")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(MemoryState.from_pretrained(tmp_path / "exported").rows, mb.rows)
    assert export_main([str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_tensorboard_has_the_curves(tmp_path):
    cfg = ltm_cfg(tmp_path, "tb", "trainer.max_steps=8", "trainer.val_every_n_steps=8", "trainer.val_batches=2",
                  "step.full_context_ratio=0.2")
    fit.run(cfg)
    acc = EventAccumulator(str(cfg.out_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lm_loss", "train/tokens_per_s", "train/retriever_loss",
                "train/retriever_precision", "train/retriever_recall", "ltm/size", "lr-AdamW/main",
                "lr-AdamW/selector", "val/loss", "val/token_acc"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("train/lm_loss_") for t in tags)
    assert (cfg.out_dir / "config.yaml").is_file() and C.load(cfg.out_dir / "config.yaml") == cfg


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = MemoryStep.step

    def poisoned(self, sample, global_step=0):
        result = real(self, sample, global_step)
        if global_step == 3:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(MemoryStep, "step", poisoned)
    cfg = ltm_cfg(tmp_path, "nan", "trainer.max_steps=6", "trainer.ckpt_every_n_steps=2")
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 3") as e:
        fit.run(cfg)
    ckpts = cfg.out_dir / "checkpoints"
    assert f"The last finite checkpoint before step 3 is {ckpts / 'step=000000002'}" in str(e.value)
    assert [u.step for u in ck.list_units(ckpts)] == [2]
    assert torch.load(ck.list_units(ckpts)[-1].model, weights_only=True)["global_step"] == 2
    assert not list(ckpts.glob("step=000000004*"))
    monkeypatch.setattr(MemoryStep, "step", real)
    fit.run(ltm_cfg(tmp_path, "nan", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2", "resume=last"))


def tiny_module(tmp_path, cls=LtmModule, *extra):
    cfg = ltm_cfg(tmp_path, "unit", *extra) if cls is LtmModule else C.load(
        ROOT / "experiments" / "tiny.yaml", ["name=unit", f"run_dir={tmp_path}", *QUIET, *extra])
    module = cls(cfg, [5, 6])
    module.memory = module.model.new_memory()
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        module.model.inject(module.memory, torch.randint(3, 512, (1, 12), generator=g), generator=g)
    return module


def sample(n_contexts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Sample([torch.randint(3, 512, (12,), generator=g) for _ in range(n_contexts)],
                  torch.randint(3, 512, (20,), generator=g), doc_id=str(seed))


def test_validation_leaves_the_training_memory_alone(tmp_path, monkeypatch):
    module = tiny_module(tmp_path)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    before = module.memory.clone()
    module.validation_step(sample(), 0)
    assert torch.equal(module.memory.rows, before.rows) and torch.equal(module.memory.ranks, before.ranks)
    assert len(module.memory.ltm) == len(before.ltm)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_step_kinds_write_the_memory_and_train_the_right_adapter(tmp_path, kind):
    module = tiny_module(tmp_path, LtmModule, "step.full_context_ratio=0", "step.revisit=false",
                         f"step.multi_chunk_ratio={1.0 if kind == 'multi' else 0.0}")
    ltm_before = len(module.memory.ltm)
    result = module.memory_step.step(sample(n_contexts=3))
    assert result.kind == kind
    result.loss.backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
    touched = {a for a in ("write", "read") if any(f"lora_B.{a}" in n and g is not None and g.abs().sum() > 0
                                                    for n, g in grads.items())}
    K = module.memory.num_tokens
    if kind == "single":
        assert touched == {"write"}, "the target reads only the new block, with the write adapter"
        assert len(module.memory.ltm) == ltm_before + K
    else:
        assert touched == {"read"}, "multi-chunk injections run without gradient; the read adapter reads"
        assert len(module.memory.ltm) == ltm_before + 3 * K
        assert grads["llama.model.layers.0.retriever.query_proj.0.weight"].abs().sum() > 0


def test_one_chunk_documents_keep_the_gradient_through_the_injection(tmp_path):
    module = tiny_module(tmp_path, LtmModule, "step.full_context_ratio=0", "step.revisit=false",
                         "step.multi_chunk_ratio=1.0")
    result = module.memory_step.step(sample(n_contexts=1))
    result.loss.backward()
    g = module.model.layers[0].self_attn.q_proj.lora_B["write"].weight.grad
    assert result.kind == "multi" and g is not None and g.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients_for_both_adapters(tmp_path):
    grads = []
    for ac in (False, True):
        module = tiny_module(tmp_path, LtmModule, "step.full_context_ratio=0", "step.revisit=false",
                             "step.multi_chunk_ratio=1.0")
        if ac:
            from mplus_lightning.distributed import checkpoint_layers
            checkpoint_layers(module.model)
        torch.manual_seed(0)
        loss = module.memory_step.step(sample(n_contexts=1)).loss
        loss.backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                      for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("lora_B.write" in n for n in grads[0]) and any("lora_B.read" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_pool_shrink_moves_the_oldest_rows_into_the_long_term_memory():
    from mplus_lightning import tiny_config
    small = MPlus(tiny_config(num_blocks=6, num_ltm_blocks=2))          # N = 32
    big_mem = MPlus(tiny_config(num_blocks=6, num_ltm_blocks=0)).new_memory()   # N = 48, no LTM
    big_mem.initialized = True
    ordered = big_mem.ordered_rows().clone()
    ages = torch.gather(big_mem.ages, 1, big_mem.slots_in_rank_order())
    out = fit_pool(big_mem, small)
    assert out.size == 32 and len(out.ltm) == 16
    torch.testing.assert_close(out.ordered_rows(), ordered[:, 16:])
    rows, keys, ltm_ages = out.ltm.view(0)
    torch.testing.assert_close(rows, ordered[0, :16])
    assert torch.equal(ltm_ages, ages[0, :16])
    torch.testing.assert_close(keys, small.ltm_keys(ordered[:, :16])[0])
    with pytest.raises(ValueError, match="can shrink .* but not grow"):
        fit_pool(small.new_memory(), MPlus(tiny_config(num_blocks=8, num_ltm_blocks=0)))


def test_init_from_names_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    from mplus_lightning import tiny_config
    from mplus_lightning.stages.build import build_model
    MPlus(tiny_config(num_tokens=4)).save_pretrained(tmp_path / "k4")
    cfg = C.load(ROOT / "experiments" / "tiny_stage2.yaml", [f"init_from={tmp_path / 'k4'}"])
    with pytest.raises(ValueError, match="num_tokens 4 -> 8 cannot change"):
        build_model(cfg)
    MPlus(tiny_config(num_ltm_blocks=0)).save_pretrained(tmp_path / "cut")
    weights = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del weights["llama.model.layers.1.self_attn.q_proj.lora_A.read.weight"]
    save_file(weights, str(tmp_path / "cut" / "model.safetensors"))
    cfg = C.load(ROOT / "experiments" / "tiny_stage2.yaml", [f"init_from={tmp_path / 'cut'}"])
    with pytest.raises(ValueError, match=r"missing 1 key.*layers\.1\.self_attn\.q_proj\.lora_A\.read"):
        build_model(cfg)
    # a stage-1 export lacks the retriever: that is the one thing allowed to start fresh
    MPlus(tiny_config(num_ltm_blocks=0, add_selector=False)).save_pretrained(tmp_path / "s1")
    model = build_model(C.load(ROOT / "experiments" / "tiny_stage2.yaml", [f"init_from={tmp_path / 's1'}"]))
    assert model.layers[0].retriever is not None


@pytest.mark.slow
def test_make_tiny_chain_runs_all_three_stages_through_the_cli(tmp_path):
    steps = ["trainer.max_steps=3", "trainer.ckpt_every_n_steps=3", f"run_dir={tmp_path}", *QUIET]
    for name, prev in (("tiny", None), ("tiny_stage2", "tiny-stage1"), ("tiny_ltm", "tiny-stage2")):
        extra = [f"init_from={tmp_path / prev / 'export'}"] if prev else []
        proc = subprocess.run([sys.executable, "-m", "mplus_lightning.fit", "--config",
                               str(ROOT / "experiments" / f"{name}.yaml"), *steps, *extra],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    model = MPlus.from_pretrained(tmp_path / "tiny-ltm" / "export")
    memory = MemoryState.from_pretrained(tmp_path / "tiny-ltm" / "export")
    assert model.config.has_ltm and memory.size == 32 and len(memory.ltm) >= 16
    assert "stage transition" in proc.stderr, "the pool shrink is logged"
    assert model.generate(memory, torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 5)


def test_bf16_precision_keeps_the_memory_in_bf16_and_trains(tmp_path):
    module = tiny_module(tmp_path, LtmModule, "trainer.precision=bf16-mixed", "step.full_context_ratio=0",
                         "step.revisit=false", "step.multi_chunk_ratio=1.0")
    assert module.memory_dtype == torch.bfloat16
    module.on_fit_start()   # the hook that casts the memory (and that a real fit runs before the first step)
    assert module.memory.rows.dtype == module.memory.ltm.rows.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = module.memory_step.step(sample(n_contexts=2))
    result.loss.backward()
    assert torch.isfinite(result.loss) and module.memory.rows.dtype == torch.bfloat16
    assert module.memory.ltm.rows.dtype == torch.bfloat16


def test_bf16_one_chunk_multi_step_keeps_the_gradient_through_the_injection(tmp_path):
    # bf16-mixed without FSDP: the memory is bf16, the write pass returns float32 under autocast; the view of the
    # committed rows must take the new block in its own dtype (this crashed in scatter_ with a dtype mismatch).
    module = tiny_module(tmp_path, LtmModule, "trainer.precision=bf16-mixed", "step.full_context_ratio=0",
                         "step.revisit=false", "step.multi_chunk_ratio=1.0")
    module.on_fit_start()
    assert module.memory.rows.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = module.memory_step.step(sample(n_contexts=1))
    result.loss.backward()
    g = module.model.layers[0].self_attn.q_proj.lora_B["write"].weight.grad
    assert result.kind == "multi" and result.metrics["num_contexts"] == 1 and torch.isfinite(result.loss)
    assert g is not None and g.abs().sum() > 0 and module.memory.rows.dtype == torch.bfloat16

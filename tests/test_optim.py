"""The optimizer and learning-rate schedule against the official training code's: the shipped stage configs give the
official parameter groups and effective learning rates (fixtures/official-train/learning-rate, recorded from the
official `train/main.py` on 8 GPUs), and both the run's first log line and --print-config state those rates."""
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from mplus_lightning import config as C
from mplus_lightning.fit import main as fit_main
from mplus_lightning.stages import module_for

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared/fixtures/official-train/learning-rate"
"""CI clones the repository with shared/ beside it."""
CONFIGS = {"stage1": "stage1.yaml", "stage2": "stage2.yaml", "stage3": "ltm.yaml"}
# The shape of the official recording's tiny model (its README): 2 layers, K=8, 4 blocks, LoRA r=4, selector width 16.
TINY = ["model.init=tiny", "model.llama={vocab_size: 512, hidden_size: 64, intermediate_size: 128, "
        "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, bos_token_id: 1, eos_token_id: 2}",
        "model.num_tokens=8", "model.num_blocks=4", "model.lora_r=4", "model.lora_alpha=8", "model.lora_dropout=0",
        "model.selector_hidden_dim=16", "model.ltm_capacity=64", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "trainer.devices=1", "trainer.strategy=auto"]


@pytest.fixture(scope="module")
def official() -> dict:
    path = FIXTURE / "learning_rate.json"
    assert path.is_file(), (f"official learning-rate fixture not found at {path}: clone the project's shared/ "
                            "directory beside the repository (CI does)")
    return json.loads(path.read_text())["stages"]


def official_kind(name: str) -> str:
    """The official name of the kind of parameter behind one of ours."""
    if "lora_" in name:
        return "lora.default" if ".write." in name else "lora.decoder_adapter" if ".read." in name else name
    if name.endswith("memory_bos"):
        return "bos_embedding"                      # officially one [L, 1, d] tensor, ours one [d] per layer
    if name == "new_memory_embedding":
        return "new_memory_positional_emb"
    for kind in ("encoder_query_proj", "query_proj", "key_proj"):
        if f".{kind}." in name:
            return kind
    return name                                     # anything else is not an official trainable kind


def tiny_module(stage: str):
    overrides = [*TINY, "model.num_ltm_blocks=1"] if stage == "stage3" else TINY
    cfg = C.load(ROOT / "experiments" / CONFIGS[stage], overrides)
    return module_for(cfg.stage)(cfg, [5, 6])


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_shipped_configs_give_the_official_parameter_groups(stage, official):
    want = official[stage]
    module = tiny_module(stage)
    result = module.configure_optimizers()
    opt = result["optimizer"] if isinstance(result, dict) else result
    assert type(opt) is torch.optim.AdamW and want["optimizer"] == "AdamW"
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    expected = {g["name"] or "main": g for g in want["param_groups"]}   # official stage 1: one unnamed group
    assert set(groups) == set(expected)
    for name, group in expected.items():
        got = groups[name]
        assert got["lr"] == pytest.approx(group["lr"], rel=1e-12), name
        assert (got["weight_decay"], tuple(got["betas"]), got["eps"], got["amsgrad"]) == (
            group["weight_decay"], tuple(group["betas"]), group["eps"], group["amsgrad"]), name
        kinds = Counter(official_kind(names[id(p)]) for p in got["params"])
        assert sorted(kinds) == sorted(group["kinds"]), name
        if name == "main":   # same LoRA tensors; the official BOS vectors are one tensor, ours one per layer
            assert kinds["lora.default"] + kinds["lora.decoder_adapter"] == group["num_tensors"] - 2
            assert kinds["bos_embedding"] == 2 and kinds["new_memory_positional_emb"] == 1
        else:
            assert sum(kinds.values()) == group["num_tensors"]
    trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable), "every trainable parameter in exactly one group"
    assert isinstance(result, dict) == (want["scheduler"] is not None), "a scheduler exactly where official has one"


def test_stage1_schedule_matches_the_official_linear_decay(official):
    want = official["stage1"]["scheduler"]
    assert (want["class"], want["start_factor"], want["end_factor"], want["total_iters"]) == ("LinearLR", 1, 0.1,
                                                                                           100_000)
    result = tiny_module("stage1").configure_optimizers()
    assert result["lr_scheduler"]["interval"] == "step"
    opt, sched = result["optimizer"], result["lr_scheduler"]["scheduler"]
    expected = {int(k): v for k, v in want["lr_after_k_scheduler_steps"].items()}
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()": no training here
        for k in range(max(expected) + 1):
            if k in expected:
                seen[k] = opt.param_groups[0]["lr"]
            sched.step()
    for k, lr in expected.items():
        assert seen[k] == pytest.approx(lr, rel=1e-9), k


def test_a_warm_up_ramps_linearly_from_the_first_step_and_multiplies_the_decay():
    # Not official (it has no warm-up) but offered (optim.warmup_steps): step k trains at min(1, (k+1)/W) of the rate
    # the schedule gives, so the first step is not taken at 0 and step W-1 reaches the full rate.
    cfg = C.load(ROOT / "experiments" / CONFIGS["stage1"], [*TINY, "optim.warmup_steps=10"])
    result = module_for(cfg.stage)(cfg, [5, 6]).configure_optimizers()
    opt, sched = result["optimizer"], result["lr_scheduler"]["scheduler"]
    o = cfg.optim
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()": no training here
        for _ in range(30):
            seen.append(opt.param_groups[0]["lr"])
            sched.step()
    decay = [1 - (1 - o.final_lr_factor) * k / o.decay_steps for k in range(30)]
    want = [o.lr * min(1.0, (k + 1) / 10) * decay[k] for k in range(30)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert seen[0] == pytest.approx(o.lr / 10 * decay[0]) and seen[9] == pytest.approx(o.lr * decay[9])


def test_print_config_shows_the_effective_learning_rates(capsys):
    assert fit_main(["--config", str(ROOT / "experiments" / "stage1.yaml"), "--print-config"]) == 0
    stage1 = capsys.readouterr().out
    assert stage1.startswith("# learning rates: main 0.000368 (linear decay to 0.1x over 100000 steps")
    assert "\n  lr: 0.000368\n" in stage1
    for name in ("ltm.yaml", "ltm_2x8.yaml", "stage2.yaml"):
        assert fit_main(["--config", str(ROOT / "experiments" / name), "--print-config"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("# learning rates: main 3.68e-05, selector 0.0001 (constant)\n"), name
        assert "\n  lr: 3.68e-05\n" in out and "\n  selector_lr: 0.0001\n" in out, name


def test_learning_rates_line_names_each_group_and_the_schedule():
    tiny = C.load(ROOT / "experiments" / "tiny_ltm.yaml", ["optim.warmup_steps=10"])
    assert C.learning_rates(tiny) == ("learning rates: main 0.0005, selector 0.001 (linear warm-up over 10 steps, "
                                      "then constant)")
    pretrain = C.load(ROOT / "experiments" / "demo_pretrain.yaml", ["model.add_selector=true"])
    assert C.learning_rates(pretrain) == "learning rates: main 0.005 (linear warm-up over 100 steps, then constant)"

"""Loading for inference: eval mode (LoRA dropout off) and the rotary frequencies as the checkpoint was trained
(float32 for our exports, the bf16 rounding for official releases); training modules switch to train mode themselves."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mplus_lightning import MemoryState, MPlus, MPlusConfig, config as C, fit, tiny_config
from mplus_lightning.model.formats import save_official
from mplus_lightning.model.mplus import load_llama

from .conftest import FIXTURES, random_ids, randomize_adapters

ROOT = Path(__file__).parents[1]
FAR = 12_800   # a position the memory rows of the official 8B pool reach


def filled(model: MPlus) -> MemoryState:
    memory = model.new_memory()
    for i in range(6):
        model.inject(memory, random_ids(20, seed=i), generator=torch.Generator().manual_seed(i))
    return memory


def float32_inv_freq(model: MPlus) -> torch.Tensor:
    """The rotary frequencies as computed for training (transformers computes them in float32)."""
    return LlamaRotaryEmbedding(model.llama.config).inv_freq


def dropouts(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]


# ---- eval mode ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["ours", "official"])
def test_a_loaded_model_reads_deterministically_with_lora_dropout_in_its_config(tmp_path, layout):
    model = randomize_adapters(MPlus(tiny_config(lora_dropout=0.1)).eval())
    memory = filled(model)
    out = tmp_path / layout
    model.save_pretrained(out, memory=memory) if layout == "ours" else save_official(model, memory, out)
    assert json.loads((out / "config.json").read_text())["lora_config"]["lora_dropout"] == 0.1
    loaded, memory = MPlus.from_pretrained(out), MemoryState.from_pretrained(out)
    assert not any(m.training for m in loaded.modules())
    assert dropouts(loaded), "the exported lora_dropout builds dropout modules"
    ids = random_ids(12, seed=3)
    assert torch.equal(loaded.read(memory, ids), loaded.read(memory, ids))
    # in train mode the same two reads differ: the dropout is real, so the check above could fail
    loaded.train()
    assert not torch.equal(loaded.read(memory, ids), loaded.read(memory, ids))


def test_training_from_a_loaded_release_runs_its_steps_in_train_mode(tmp_path):
    """model.init=pretrained builds the model with from_pretrained (eval mode); Lightning does not switch modes at
    fit start, so the stage module must: every training step, also after a validation, runs with dropout on."""
    release = tmp_path / "release"
    model = randomize_adapters(MPlus(tiny_config(num_ltm_blocks=0, add_selector=False, lora_dropout=0.1)))
    save_official(model, filled(model), release)
    seen = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((module.model.training, [d.training for d in dropouts(module.model)]))

    cfg = C.load(ROOT / "experiments" / "tiny.yaml", [
        "name=from-release", f"run_dir={tmp_path}", "model.init=pretrained", f"model.path={release}",
        "model.lora_dropout=0.1", "trainer.max_steps=2", "trainer.val_every_n_steps=1", "trainer.val_batches=1",
        "trainer.ckpt_every_n_steps=2", "trainer.progress_bar=false"])
    fit.run(cfg, callbacks=[RecordModes()])
    assert len(seen) == 2
    for training, flags in seen:
        assert training and flags and all(flags)
    # the release's frequencies were unrecorded; this run trained them in float32 and its export says so
    exported = json.loads((cfg.out_dir / "export" / "config.json").read_text())
    assert exported["mplus_lightning"]["rope_inv_freq_dtype"] == "float32"


# ---- rotary frequencies ------------------------------------------------------------------------------------------
def test_a_bf16_load_of_our_export_keeps_the_float32_rotary_frequencies(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["mplus_lightning"]["rope_inv_freq_dtype"] == "float32"
    model = MPlus.from_pretrained(tmp_path / "export", dtype=torch.bfloat16)
    expected = float32_inv_freq(model)
    assert model.dtype == torch.bfloat16 and expected.dtype == torch.float32
    for buffer in (model.rotary.inv_freq, model.rotary.original_inv_freq):
        assert buffer.dtype == torch.float32 and torch.equal(buffer, expected)
    # the angles of a far memory row are the float32 ones, which the bf16-rounded frequencies miss by radians
    cos, _ = model.rotary(torch.zeros(1, 1, dtype=torch.bfloat16), torch.tensor([[FAR]]))
    assert torch.equal(cos[0, 0], (FAR * expected).repeat(2).cos().bfloat16())
    rounded = expected.bfloat16().float()
    assert (FAR * (rounded - expected)).abs().max() > 1.0


def test_a_bf16_load_of_an_official_release_keeps_its_bf16_rounding(tmp_path):
    src = FIXTURES / "mplus-tiny"
    model = MPlus.from_pretrained(src, dtype=torch.bfloat16)
    assert model.config.rope_inv_freq_dtype is None
    expected = float32_inv_freq(model).bfloat16()
    assert not torch.equal(expected.float(), float32_inv_freq(model)), "rounding changes these frequencies"
    for buffer in (model.rotary.inv_freq, model.rotary.original_inv_freq):
        assert buffer.dtype == torch.bfloat16 and torch.equal(buffer, expected)
    # a float32 load (the parity tests) has the float32 frequencies
    fp32 = MPlus.from_pretrained(src)
    assert torch.equal(fp32.rotary.inv_freq, float32_inv_freq(model))
    # re-exported in our format the release stays unrecorded, so it loads as the release does
    fp32.save_pretrained(tmp_path / "again", memory=MemoryState.from_pretrained(src))
    assert "rope_inv_freq_dtype" not in json.loads((tmp_path / "again" / "config.json").read_text())["mplus_lightning"]
    again = MPlus.from_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    assert again.rotary.inv_freq.dtype == torch.bfloat16 and torch.equal(again.rotary.inv_freq, expected)


def test_a_bf16_start_from_a_plain_llama_keeps_float32_rotary_frequencies(tmp_path):
    config = tiny_config()
    LlamaForCausalLM(config.llama_config()).save_pretrained(tmp_path / "llama")
    model = load_llama(tmp_path / "llama", config, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, float32_inv_freq(model))


def test_an_unknown_rope_dtype_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="rope_inv_freq_dtype must name a torch floating dtype.*'int8'"):
        tiny_config(rope_inv_freq_dtype="int8")
    d = tiny_config().to_dict()
    d["mplus_lightning"]["rope_inv_freq_dtype"] = "fp32"
    with pytest.raises(ValueError, match="mplus_lightning.rope_inv_freq_dtype .* got 'fp32'"):
        MPlusConfig.from_dict(d)

"""A run that starts from weights (init_from, model.path) builds their backbone: a configured model.llama must agree
with it (each differing field is named with both values), an empty one takes it, and the saved config.yaml records
the backbone as built."""
import logging

import pytest
import torch
from omegaconf import OmegaConf

from mplus_lightning import MPlus, config as C, fit, tiny_config
from mplus_lightning.config import ConfigError
from mplus_lightning.stages.build import build_model, built_config, initial_memory

from .test_experiments import ROOT

WIDTH_64 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
EXPORTED = tiny_config(llama=WIDTH_64).llama
"""The export's backbone: tiny_stage2.yaml's model.llama plus the fields tiny_config adds (rope_theta, ...)."""


@pytest.fixture
def export_64(tmp_path):
    """A stage-1 export of tiny_stage2.yaml's shape with a width-64 backbone."""
    MPlus(tiny_config(llama=WIDTH_64, num_ltm_blocks=0, add_selector=False)).save_pretrained(tmp_path / "s1")
    return tmp_path / "s1"


def stage2_config(tmp_path, *overrides, llama: bool = True):
    """tiny_stage2.yaml (with or without its model.llama) starting from `init_from`."""
    raw = OmegaConf.load(ROOT / "experiments" / "tiny_stage2.yaml")
    if not llama:
        del raw.model["llama"]
    OmegaConf.save(raw, tmp_path / "stage2.yaml")
    return C.load(tmp_path / "stage2.yaml", [f"run_dir={tmp_path / 'runs'}", *overrides])


def test_a_configured_backbone_that_disagrees_with_the_export_is_an_error(tmp_path, export_64):
    cfg = stage2_config(tmp_path, f"init_from={export_64}", "model.llama.hidden_size=128",
                        "model.llama.intermediate_size=256")
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    lines = str(error.value).splitlines()
    assert f"init_from {export_64}" in lines[0] and "leave model.llama empty" in lines[0]
    assert lines[1:] == [f"  model.llama.hidden_size: config 128, init_from {export_64}: 64",
                         f"  model.llama.intermediate_size: config 256, init_from {export_64}: 128"]


def test_an_agreeing_or_empty_backbone_builds_the_export(tmp_path, export_64):
    same = build_model(stage2_config(tmp_path, f"init_from={export_64}"))
    assert same.config.llama == EXPORTED
    cfg = stage2_config(tmp_path, f"init_from={export_64}", llama=False)
    assert cfg.model.llama == {}, "init_from needs no model.llama (model.init is ignored)"
    model = build_model(cfg)
    assert model.config.hidden_size == 64 and model.config.llama == EXPORTED, "the export's backbone"
    assert built_config(cfg, model).model.llama == EXPORTED and cfg.model.llama == {}, "recorded, cfg untouched"


def test_model_path_backbones_are_checked_too(tmp_path, export_64):
    cfg = C.load(ROOT / "experiments" / "tiny_stage2.yaml", [
        "init_from=null", "model.init=pretrained", f"model.path={export_64}", "model.llama.num_hidden_layers=2",
        "model.add_selector=false", "step.retriever_loss=false", "stage=stage1"])
    with pytest.raises(ConfigError, match=r"model\.llama\.num_hidden_layers: config 2, model\.path .*: 3$"):
        build_model(cfg)


@pytest.mark.slow
def test_a_run_logs_its_learning_rates_first_and_saves_the_backbone_it_built(tmp_path, export_64, caplog):
    cfg = stage2_config(tmp_path, f"init_from={export_64}", "trainer.max_steps=1", "trainer.ckpt_every_n_steps=1",
                        "trainer.val_every_n_steps=1000", "trainer.progress_bar=false", llama=False)
    with caplog.at_level(logging.INFO):
        fit.run(cfg)
    assert caplog.records[0].getMessage() == "tiny-stage2: learning rates: main 0.0005, selector 0.001 (constant)"
    saved = C.load(cfg.out_dir / "config.yaml")
    assert saved.model.llama == EXPORTED, "config.yaml records the backbone the run built"
    assert saved == built_config(cfg, MPlus.from_pretrained(cfg.out_dir / "export"))


def test_a_pretrained_init_starts_from_the_memory_stored_with_it(tmp_path):
    torch.manual_seed(0)
    model = MPlus(tiny_config(num_ltm_blocks=0, add_selector=False))
    memory = model.new_memory(seed=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.inject(memory, torch.randint(3, 512, (1, 20), generator=g), generator=g)
    model.save_pretrained(tmp_path / "release", memory=memory)
    cfg = C.load(ROOT / "experiments" / "tiny.yaml",
                 [f"run_dir={tmp_path}", "model.init=pretrained", f"model.path={tmp_path / 'release'}"])
    start = initial_memory(cfg, build_model(cfg), seed=0)
    assert start.initialized and torch.equal(start.ordered_rows(), memory.ordered_rows())

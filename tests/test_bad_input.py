"""Bad input gets an error that names the problem (and the fix), never a crash deep in torch."""
import json
import shutil
import warnings

import pytest
import torch

from mplus_lightning import MemoryState, MPlus, tiny_config

from .conftest import FIXTURES, random_ids


@pytest.fixture
def model_and_memory(tiny_model):
    mem = tiny_model.new_memory()
    tiny_model.inject(mem, random_ids(20))
    return tiny_model, mem


def test_empty_chunk(model_and_memory):
    model, mem = model_and_memory
    with pytest.raises(ValueError, match="empty"):
        model.inject(mem, torch.zeros(1, 0, dtype=torch.long))


def test_short_chunk_warns(model_and_memory):
    model, mem = model_and_memory        # K=8: below 8 tokens old rows are re-processed (16 for the official K=256)
    with pytest.warns(UserWarning, match="< 8"):
        model.inject(mem, random_ids(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.inject(mem, random_ids(10))


def test_bos_at_start_is_an_error_with_the_fix(model_and_memory):
    model, mem = model_and_memory
    ids = random_ids(20)
    ids[0, 0] = model.llama.config.bos_token_id
    with pytest.raises(ValueError, match="add_special_tokens=False"):
        model.read(mem, ids)


def test_batched_write_is_refused(model_and_memory):
    model, mem = model_and_memory
    with pytest.raises(ValueError, match="one chunk at a time"):
        model.inject(mem, random_ids(20, batch=2))


def test_out_of_vocab_and_bad_dtype(model_and_memory):
    model, mem = model_and_memory
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.read(mem, torch.tensor([[5, 9999]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model.read(mem, torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model.read(mem, torch.ones(1, 2, 3, dtype=torch.long))


def test_memory_from_another_model(model_and_memory):
    model, _ = model_and_memory
    other = MPlus(tiny_config(num_blocks=7)).new_memory()
    with pytest.raises(ValueError, match="belongs to another model"):
        model.read(other, random_ids(5))
    memoryllm_mem = MPlus(tiny_config(num_ltm_blocks=0, num_blocks=4)).new_memory()
    with pytest.raises(ValueError, match="needs a long-term memory"):
        model.read(memoryllm_mem, random_ids(5))


def test_memory_on_other_dtype(model_and_memory):
    model, mem = model_and_memory
    with pytest.raises(ValueError, match=r"call memory.to\(device, dtype\)"):
        model.read(mem.clone().to(dtype=torch.float64), random_ids(5))


def test_checkpoint_with_mismatching_shape_names_the_key(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "mplus-tiny", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.base_layer\.weight: checkpoint has shape"):
        MPlus.from_pretrained(bad)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MPlus.from_pretrained(tmp_path)
    shutil.copy(FIXTURES / "mplus-tiny" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MPlus.from_pretrained(tmp_path)


def test_plain_llama_config_is_not_taken_for_an_mplus_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="not an M\\+ or MemoryLLM checkpoint"):
        MPlus.from_pretrained(tmp_path)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="num_ltm_blocks < num_blocks"):
        tiny_config(num_ltm_blocks=6, num_blocks=6)
    with pytest.raises(ValueError, match="add_selector"):
        tiny_config(add_selector=False)


def test_memory_snapshot_mismatch_on_export(tmp_path, tiny_model):
    other = MPlus(tiny_config(num_blocks=7)).new_memory()
    with pytest.raises(ValueError, match="belongs to another model"):
        tiny_model.save_pretrained(tmp_path / "x", memory=other)
    assert MemoryState  # imported for the public API


def test_an_unsupported_transformers_is_named_with_the_fix():
    from mplus_lightning.model.mplus import _check_transformers

    _check_transformers("5.24.0")
    _check_transformers("5.31.2")
    for version in ("5.17.0", "6.0.0"):
        with pytest.raises(ImportError, match=r"transformers>=5.24,<6 \(found " + version.replace(".", r"\.")):
            _check_transformers(version)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.selector_lr=0", "optim.selector_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("trainer.ckpt_every_n_steps=0", "trainer.ckpt_every_n_steps"),
    ("model.lora_r=0", "model.lora_r"), ("model.lora_alpha=0", "model.lora_alpha"),
    *((f"step.{key}={value}", f"step.{key}") for key in ("full_context_ratio", "multi_chunk_ratio", "pass_ratio",
                                                          "empty_prob") for value in ("1.5", "-0.1")),
])
def test_out_of_range_run_config_values_name_the_key(override, key):
    from mplus_lightning import config as config_lib
    from mplus_lightning.typed_config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": "):
        config_lib.load(None, ["name=t", override])


def test_stage_check_is_a_config_error_naming_the_keys():
    from mplus_lightning import config as config_lib
    from mplus_lightning.stages.stages import Stage2Module
    from mplus_lightning.typed_config import ConfigError

    tiny = FIXTURES.parents[2] / "experiments" / "tiny.yaml"
    cfg = config_lib.load(tiny, ["stage=stage2", "model.add_selector=true", "step.retriever_loss=false"])
    with pytest.raises(ConfigError, match="step.retriever_loss=true"):
        Stage2Module.check_stage(object.__new__(Stage2Module), cfg)
    cfg = config_lib.load(tiny, ["stage=stage1"])
    with pytest.raises(ConfigError, match="stage: .*stage=stage1"):
        Stage2Module.check_stage(object.__new__(Stage2Module), cfg)


def test_memory_snapshot_with_a_short_ages_row_names_the_file_and_shapes(tmp_path, model_and_memory):
    from safetensors.torch import load_file, save_file

    from mplus_lightning.model.memory import MemoryFileError

    _, mem = model_and_memory
    mem.save(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    sd = load_file(str(file))
    sd["ages"] = sd["ages"][:-1].contiguous()
    save_file(sd, str(file))
    with pytest.raises(MemoryFileError, match=r"memory\.safetensors: `ages` has shape \(\d+, \d+\) but `rows` has"):
        MemoryState.load(tmp_path)
    sd = load_file(str(file))
    sd["ages"] = sd["ranks"].clone()
    sd["ltm_ages"] = sd["ltm_ages"][:-1].contiguous()   # one layer short
    save_file(sd, str(file))
    with pytest.raises(MemoryFileError, match="`ltm_ages` has shape"):
        MemoryState.load(tmp_path)


def test_later_stage_without_init_from_names_init_from(caplog):
    import logging

    from mplus_lightning import config as config_lib
    from mplus_lightning.stages.build import build_model
    from mplus_lightning.typed_config import ConfigError

    ltm = FIXTURES.parents[2] / "experiments" / "tiny_ltm.yaml"
    cfg = config_lib.load(ltm, ["init_from=null", "model.init=llama"])
    with pytest.raises(ConfigError, match="^init_from: stage ltm"):
        build_model(cfg)
    cfg = config_lib.load(ltm, ["init_from=null"])
    with caplog.at_level(logging.WARNING, logger="mplus_lightning.stages.build"):
        build_model(cfg)
    assert "stage ltm starts from random weights: init_from is not set" in caplog.text


def test_truncated_weights_name_the_file_and_the_fix(tmp_path):
    from mplus_lightning.model.tensor_files import DamagedFileError

    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "mplus-tiny", bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match=r"model\.safetensors is damaged or truncated .*re-export or re-down"):
        MPlus.from_pretrained(bad)


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch, capsys):
    from mplus_lightning import evaluate, fit
    from mplus_lightning.typed_config import ConfigError

    tiny = str(FIXTURES.parents[2] / "experiments" / "tiny.yaml")
    monkeypatch.delenv("MPLUS_DEBUG", raising=False)
    assert fit.main(["--config", tiny, "optim.lr=-1"]) == 2
    assert "error: invalid config:" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optim.lr"):
        fit.main(["--debug", "--config", tiny, "optim.lr=-1"])
    monkeypatch.setenv("MPLUS_DEBUG", "1")
    with pytest.raises(ConfigError, match="optim.lr"):
        fit.main(["--config", tiny, "optim.lr=-1"])
    with pytest.raises(ConfigError):
        evaluate.main(["cost", "no_such_key=1"])
    monkeypatch.delenv("MPLUS_DEBUG")
    assert evaluate.main(["cost", "no_such_key=1"]) == 2
    with pytest.raises(ConfigError):
        evaluate.main(["cost", "--debug", "no_such_key=1"])


def test_only_a_true_mplus_debug_shows_tracebacks(monkeypatch):
    from mplus_lightning.typed_config import show_traceback

    monkeypatch.setenv("MPLUS_DEBUG", "0")
    assert show_traceback(False) is False and show_traceback(True) is True
    monkeypatch.setenv("MPLUS_DEBUG", "1")
    assert show_traceback(False) is True

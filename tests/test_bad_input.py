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

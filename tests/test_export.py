"""Round trips: our export, the official layout, sharded safetensors, and a plain HF Llama directory."""
import json

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mplus_lightning import MemoryState, MPlus, tiny_config
from mplus_lightning.model.formats import save_official
from mplus_lightning.model.mplus import load_llama

from .conftest import FIXTURES, random_ids


def trained_like(model):
    mem = model.new_memory()
    for i in range(6):
        model.inject(mem, random_ids(20, seed=i), generator=torch.Generator().manual_seed(i))
    return mem


def same_behaviour(a, mem_a, b, mem_b):
    ids = random_ids(12, seed=9)
    torch.testing.assert_close(b.read(mem_b, ids), a.read(mem_a, ids), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.write(mem_b, random_ids(20, seed=8)), a.write(mem_a, random_ids(20, seed=8)))


def test_save_pretrained_round_trip_with_memory(tmp_path, tiny_model):
    mem = trained_like(tiny_model)
    tiny_model.save_pretrained(tmp_path / "export", memory=mem)
    model = MPlus.from_pretrained(tmp_path / "export")
    memory = MemoryState.from_pretrained(tmp_path / "export")
    same_behaviour(tiny_model, mem, model, memory)
    assert torch.equal(memory.ranks, mem.ranks) and torch.equal(memory.ltm.view(0)[2], mem.ltm.view(0)[2])


def test_official_layout_round_trip(tmp_path, tiny_model):
    mem = trained_like(tiny_model)
    save_official(tiny_model, mem, tmp_path / "official")
    cfg = json.loads((tmp_path / "official" / "config.json").read_text())
    assert cfg["architectures"] == ["MPlus"] and "mplus_lightning" not in cfg
    keys = load_file(str(tmp_path / "official" / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.q_proj.lora_A.decoder_adapter.weight" in keys
    assert "model.layers.2.self_attn.key_proj.2.weight" in keys and "ltm_keys.2" in keys
    same_behaviour(tiny_model, mem, MPlus.from_pretrained(tmp_path / "official"),
                   MemoryState.from_pretrained(tmp_path / "official"))


def test_official_fixture_reexported_matches_the_original_bytes(tmp_path):
    src = FIXTURES / "mplus-tiny"
    model, mem = MPlus.from_pretrained(src), MemoryState.from_pretrained(src)
    save_official(model, mem, tmp_path / "again")
    original = load_file(str(src / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    original = {k: v for k, v in original.items() if not k.startswith("ltm_recall")}
    again = {k: v for k, v in again.items() if not k.startswith("ltm_recall")}
    assert original.keys() == again.keys()
    for k in original:
        assert torch.equal(original[k], again[k]), k
    # config.json: every field of the release, with its value (ltm_initial_size: the rows stored, which the official
    # loader sizes its long-term tensors from), but transformers' own bookkeeping
    config = json.loads((src / "config.json").read_text())
    config_again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config_again["ltm_initial_size"] == mem.ltm.size
    bookkeeping = {"transformers_version", "_attn_implementation_autoset"}
    assert {k: config_again.get(k, "missing") for k in config.keys() - bookkeeping} == \
        {k: v for k, v in config.items() if k not in bookkeeping}


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    src = FIXTURES / "memoryllm-tiny"
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (out / "config.json").write_text((src / "config.json").read_text())
    same_behaviour(MPlus.from_pretrained(src), MemoryState.from_pretrained(src),
                   MPlus.from_pretrained(out), MemoryState.from_pretrained(out))


def test_start_from_a_plain_llama_directory(tmp_path):
    config = tiny_config()
    hf = LlamaForCausalLM(config.llama_config())
    hf.save_pretrained(tmp_path / "llama")
    model = load_llama(tmp_path / "llama", config)
    ids = random_ids(10)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone_logits(ids), hf(ids).logits)
        # fresh adapters are no-ops (LoRA B = 0) and the BOS vectors are the BOS token's embedding
        torch.testing.assert_close(model.backbone_logits(ids, adapter="read"), hf(ids).logits)
    assert torch.equal(model.layers[0].memory_bos, hf.model.embed_tokens.weight[1])


def test_tied_embeddings_export_and_load(tmp_path):
    model = MPlus(tiny_config(llama={"tie_word_embeddings": True})).eval()
    assert model.llama.lm_head.weight is model.llama.model.embed_tokens.weight
    mem = trained_like(model)
    model.save_pretrained(tmp_path / "tied", memory=mem)
    back = MPlus.from_pretrained(tmp_path / "tied")
    assert back.llama.lm_head.weight is back.llama.model.embed_tokens.weight
    same_behaviour(model, mem, back, MemoryState.from_pretrained(tmp_path / "tied"))

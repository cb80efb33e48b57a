"""Model directory formats: the official release layout (YuWangX/mplus-8b, memoryllm-8b) and our own export — how
their weights map to our parameter names, and how each is written. `MPlus.from_pretrained` / `save_pretrained` and
`load_llama` (mplus.py) build models from them; the memory stored beside the weights is `MemoryState`'s business
(`MemoryState.from_pretrained`, `release_tensors`); the safetensors files themselves are read by `tensor_files`.

Official key names (l = layer; adapter `default` = our `write`, `decoder_adapter` = our `read`):
  model.layers.l.self_attn.q_proj.lora_A.default.weight -> llama.model.layers.l.self_attn.q_proj.lora_A.write.weight
  model.layers.l.self_attn.query_proj.0.weight          -> llama.model.layers.l.retriever.query_proj.0.weight
  bos_embedding [L, 1, d]                               -> llama.model.layers.l.memory_bos [d]
  new_memory_positional_emb [1, 1, d]                   -> new_memory_embedding [d]
  memory, ltm.l, ltm_keys.l, ltm_ages.l, initialized    -> MemoryState (not model weights)
  ltm_recall_frequencies.l                              -> dropped: our long-term memory is a FIFO by age
  anything else X                                       -> llama.X
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import OFFICIAL_NAMES
from .configuration import MPlusConfig
from .memory import RELEASE_MEMORY_KEY, RELEASE_RECALL_FREQUENCY, MemoryState
from .tensor_files import WEIGHTS, read_tensors, weight_files

TIED_HEAD = "llama.lm_head.weight"
_ADAPTER_KEY = re.compile(r"\.lora_([AB])\.(default|decoder_adapter)\.")
_RETRIEVER_KEY = re.compile(r"\.self_attn\.(query_proj|key_proj|encoder_query_proj)\.")
_OURS_TO_OFFICIAL_ADAPTER = {v: k for k, v in OFFICIAL_NAMES.items()}


# ---- key maps ---------------------------------------------------------------------------------------------------
def official_to_ours(key: str) -> str:
    key = _ADAPTER_KEY.sub(lambda m: f".lora_{m[1]}.{OFFICIAL_NAMES[m[2]]}.", key)
    key = _RETRIEVER_KEY.sub(lambda m: f".retriever.{m[1]}.", key)
    return "llama." + key


def ours_to_official(key: str) -> str:
    key = key.removeprefix("llama.")
    key = re.sub(r"\.lora_([AB])\.(write|read)\.", lambda m: f".lora_{m[1]}.{_OURS_TO_OFFICIAL_ADAPTER[m[2]]}.", key)
    return key.replace(".retriever.", ".self_attn.")


def _official_weights(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if key == "bos_embedding":
            if t.dim() != 3 or t.shape[0] != num_layers:
                raise ValueError(f"bos_embedding has shape {tuple(t.shape)}, expected [{num_layers}, 1, hidden]")
            for l in range(num_layers):
                out[f"llama.model.layers.{l}.memory_bos"] = t[l].reshape(-1)
        elif key == "new_memory_positional_emb":
            out["new_memory_embedding"] = t.reshape(-1)
        else:
            out[official_to_ours(key)] = t
    return out


# ---- reading ----------------------------------------------------------------------------------------------------
def is_our_export(path: str | Path) -> bool:
    """Whether a model directory was written by `save_model_state` (its config.json carries our section)."""
    try:
        return "mplus_lightning" in json.loads((Path(path) / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def read_weights(path: str | Path, config: MPlusConfig) -> dict[str, torch.Tensor]:
    """The model weights of an official release or our export, under our parameter names (memory tensors left out;
    a tied lm_head filled in from the embedding)."""
    path = Path(path)
    files = weight_files(path)
    ours = is_our_export(path)
    tensors = read_tensors(files, [k for k in files if ours or not RELEASE_MEMORY_KEY.match(k)])
    state = tensors if ours else _official_weights(tensors, config.num_layers)
    if config.llama.get("tie_word_embeddings") and TIED_HEAD not in state:
        state[TIED_HEAD] = state["llama.model.embed_tokens.weight"]
    return state


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; any missing/unexpected key or shape mismatch is an error naming the key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
    for k in sorted(set(expected) & set(state)):
        if tuple(expected[k].shape) != tuple(state[k].shape):
            problems.append(f"{k}: checkpoint has shape {tuple(state[k].shape)}, model expects "
                            f"{tuple(expected[k].shape)}")
    if problems:
        raise ValueError(f"{source} does not match the model built from its config.json: " + "; ".join(problems[:10]))
    model.load_state_dict(state, strict=True)


# ---- writing ----------------------------------------------------------------------------------------------------
def save_model_state(config: MPlusConfig, state: dict[str, torch.Tensor], out_dir,
                     memory: MemoryState | None = None) -> None:
    """Our self-contained export of a model's config and state dict (possibly gathered, e.g. FSDP full):
    config.json, model.safetensors (our key names), memory/ (if given)."""
    out = Path(out_dir)
    if memory is not None:
        memory.check_compatible(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if config.llama.get("tie_word_embeddings"):   # one tensor, stored once (safetensors refuses shared tensors)
        state = {k: v for k, v in state.items() if k != TIED_HEAD}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS))
    if memory is not None:
        memory.save(out / "memory")


def save_official(model: nn.Module, memory: MemoryState, out_dir) -> None:
    """The official release layout of an MPlus and its memory (what YuWangX/mplus-8b's loader expects), e.g. to run
    the official code on our weights (the memory part: `MemoryState.release_tensors`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = model.config.to_dict()
    d.pop("mplus_lightning")
    if model.config.has_ltm:
        d.update(ltm_initial_size=memory.ltm.size, update_ltm_mode="immediate", update_ltm_frequency=60,
                 initial_rf_when_moving_stm_to_ltm=int(RELEASE_RECALL_FREQUENCY), decay_frequency=1)
    if model.config.add_selector:
        # How our retriever works, in the release's words: it reads the layer's hidden states (the official eager
        # attention path reads this flag), detached from the LM loss.
        d.update(map_from_hidden_states=True, detach_hidden_state=True)
    (out / "config.json").write_text(json.dumps(d, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    bos = []
    for k, v in model.state_dict().items():
        if k.endswith("memory_bos"):
            bos.append(v)
        elif k == "new_memory_embedding":
            tensors["new_memory_positional_emb"] = v.reshape(1, 1, -1)
        else:
            tensors[ours_to_official(k)] = v
    tensors["bos_embedding"] = torch.stack(bos)[:, None]
    tensors.update(memory.release_tensors())
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS))

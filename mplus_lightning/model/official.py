"""Checkpoint directories: the official release layout (YuWangX/mplus-8b, memoryllm-8b), our own export, and plain
HF Llama directories.

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
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .adapters import OFFICIAL_NAMES
from .configuration import MPlusConfig
from .memory import LongTermMemory, MemoryState

WEIGHTS = "model.safetensors"
TIED_HEAD = "llama.lm_head.weight"
INDEX = "model.safetensors.index.json"
_MEMORY_KEY = re.compile(r"^(memory|initialized|ltm\.\d+|ltm_keys\.\d+|ltm_ages\.\d+|ltm_recall_frequencies\.\d+)$")
_ADAPTER_KEY = re.compile(r"\.lora_([AB])\.(default|decoder_adapter)\.")
_RETRIEVER_KEY = re.compile(r"\.self_attn\.(query_proj|key_proj|encoder_query_proj)\.")
_OURS_TO_OFFICIAL_ADAPTER = {v: k for k, v in OFFICIAL_NAMES.items()}


# ---- reading safetensors (single file or sharded) ---------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """key -> file for a directory with model.safetensors or model.safetensors.index.json."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path / INDEX} is malformed ({e!r}): expected a JSON object with `weight_map`") from None
        files = {k: path / f for k, f in index.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{path / INDEX} names shard {f.name}, which is missing")
        return files
    single = path / WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor {INDEX}")
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def _read(files: dict[str, Path], keys) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


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


# ---- model ------------------------------------------------------------------------------------------------------
def _is_our_export(path: Path) -> bool:
    try:
        return "mplus_lightning" in json.loads((path / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def build_empty(config: MPlusConfig, dtype: torch.dtype, device) -> "MPlus":
    """An MPlus with uninitialised storage on `device` (no random init of billions of weights)."""
    from .mplus import MPlus

    with torch.device("meta"):
        model = MPlus(config)
    model.to_empty(device=device)
    # Non-persistent RoPE buffers are not in any checkpoint: rebuild them. Casting the model afterwards rounds
    # inv_freq to `dtype` as the official README's model.to(bfloat16) does (research/model.md §8).
    model.llama.model.rotary_emb = LlamaRotaryEmbedding(model.llama.config).to(device)
    return model.to(dtype)


def load_state_strict(model, state: dict[str, torch.Tensor], source: str) -> None:
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


def load_model(path, *, dtype=torch.float32, device="cpu"):
    path = Path(path)
    config = MPlusConfig.from_json(path / "config.json")
    files = _weight_files(path)
    ours = _is_our_export(path)
    weight_keys = [k for k in files if ours or not _MEMORY_KEY.match(k)]
    tensors = _read(files, weight_keys)
    state = tensors if ours else _official_weights(tensors, config.num_layers)
    if config.llama.get("tie_word_embeddings") and TIED_HEAD not in state:
        state[TIED_HEAD] = state["llama.model.embed_tokens.weight"]
    model = build_empty(config, dtype, device)
    load_state_strict(model, {k: v.to(dtype) for k, v in state.items()}, str(path))
    if config.llama.get("tie_word_embeddings"):
        model.llama.tie_weights()
    model.freeze_backbone()
    return model


def load_official_memory(path) -> MemoryState:
    """The short-term pool (and M+ long-term memory) stored inside an official release's weights."""
    path = Path(path)
    config = MPlusConfig.from_json(path / "config.json")
    files = _weight_files(path)
    if "memory" not in files:
        raise FileNotFoundError(f"{path} holds no memory: neither memory/ (our export) nor an official `memory` "
                                "tensor")
    L = config.num_layers
    names = ["memory"] + [k for k in files if k == "initialized" or k.startswith(("ltm.", "ltm_keys.", "ltm_ages."))]
    t = _read(files, names)
    rows = t["memory"]
    if rows.dim() != 3 or rows.shape[0] != L or rows.shape[2] != config.hidden_size:
        raise ValueError(f"`memory` has shape {tuple(rows.shape)}, config.json implies [{L}, N, {config.hidden_size}]")
    ltm = None
    if config.has_ltm:
        try:
            ltm_rows = torch.stack([t[f"ltm.{l}"] for l in range(L)])
            keys = torch.stack([t[f"ltm_keys.{l}"] for l in range(L)])
            ages = torch.stack([t[f"ltm_ages.{l}"] for l in range(L)]).round().long()
        except KeyError as e:
            raise ValueError(f"{path}: M+ checkpoint lacks long-term tensor {e}") from None
        ltm = LongTermMemory.from_tensors(ltm_rows, keys, ages, max(config.ltm_capacity, ltm_rows.shape[1]))
    initialized = bool(t["initialized"].item()) if "initialized" in t else True
    return MemoryState.from_rows(rows, config.num_tokens, ltm=ltm, initialized=initialized)


def load_llama(llama_dir, config: MPlusConfig, *, dtype=torch.float32, device="cpu"):
    """An MPlus around the weights of a plain HF Llama directory (adapters, BOS vectors, retrievers freshly made)."""
    from .mplus import MPlus

    path = Path(llama_dir)
    files = _weight_files(path)
    base = _read(files, list(files))
    with torch.device("cpu"):
        model = MPlus(config).to(dtype)   # fresh adapters/retrievers with their normal initialisation
    own = model.state_dict()
    state = dict(own)
    for key, t in base.items():
        ours = "llama." + key
        if ours not in own:
            ours = ours.replace(".weight", ".base_layer.weight")
        if ours not in own:
            raise ValueError(f"{path}: weight {key} has no place in an MPlus built from the given config")
        state[ours] = t.to(dtype)
    load_state_strict(model, state, str(path))
    model._init_memory_parameters()
    return model.to(device)


# ---- writing ----------------------------------------------------------------------------------------------------
def save_model(model, out_dir, memory: MemoryState | None = None) -> None:
    """Our self-contained export: config.json, model.safetensors (our key names), memory/."""
    save_model_state(model.config, model.state_dict(), out_dir, memory)


def save_model_state(config: MPlusConfig, state: dict[str, torch.Tensor], out_dir,
                     memory: MemoryState | None = None) -> None:
    """`save_model` from a (possibly gathered, e.g. FSDP full) state dict."""
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


def save_official(model, memory: MemoryState, out_dir) -> None:
    """The official release layout (what YuWangX/mplus-8b's loader expects), e.g. to run the official code on our
    weights. Rows are written in rank order; long-term rows get recall frequency 10 (fresh)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = model.config.to_dict()
    d.pop("mplus_lightning")
    if model.config.has_ltm:
        d.update(ltm_initial_size=memory.ltm.size, update_ltm_mode="immediate", update_ltm_frequency=60,
                 initial_rf_when_moving_stm_to_ltm=10, decay_frequency=1)
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
    tensors["memory"] = memory.ordered_rows()
    if memory.ltm is not None:
        for l in range(memory.num_layers):
            rows, keys, ages = memory.ltm.view(l)
            tensors[f"ltm.{l}"], tensors[f"ltm_keys.{l}"] = rows, keys
            tensors[f"ltm_ages.{l}"] = ages.to(rows.dtype)
            tensors[f"ltm_recall_frequencies.{l}"] = torch.full((memory.ltm.size,), 10.0, dtype=rows.dtype)
    else:
        tensors["initialized"] = torch.tensor(int(memory.initialized), dtype=torch.uint8)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS))

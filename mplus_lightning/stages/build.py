"""Building the model and its starting memory from a RunConfig, including stage transitions.

Stage 1 -> 2: same pool size; the retriever is new (fresh init, logged). Stage 2 -> 3 (ltm): the pool shrinks from
num_blocks*K rows to (num_blocks - num_ltm_blocks)*K; the oldest rows move into the long-term memory with keys from the
stage-2 retriever and their ages. Nothing is silently skipped: any other mismatch is an error naming the key.

The backbone's shape comes from where the weights do (init_from's export, model.path's config.json) or, for
init=tiny, from model.llama. A configured model.llama must agree with the weights' own; the run's saved config
records the backbone as built (`built_config`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from ..config import ConfigError, RunConfig
from ..model import LongTermMemory, MemoryState, MPlus, MPlusConfig
from ..model.formats import load_state_strict
from ..model.mplus import load_llama
from ..model.tensor_files import read_tensors, weight_files

log = logging.getLogger(__name__)


def _require_dir(path: str | None, what: str) -> Path:
    if not path:
        raise FileNotFoundError(f"{what}: no path given")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: directory {p} does not exist (set it in the config or as key=value)")
    return p


def build_model(cfg: RunConfig) -> MPlus:
    """The model a run starts from: init_from (previous stage) > model.init; trainable parts per the config."""
    model = _build_weights(cfg)
    model.freeze_backbone(cfg.model.train_backbone)
    return model.for_training()   # Lightning does not switch modes at fit start; loaders return eval-mode models


def _build_weights(cfg: RunConfig) -> MPlus:
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank
    if cfg.init_from:
        return _from_previous_stage(cfg, _require_dir(cfg.init_from, "init_from"))
    m = cfg.model
    later_stage = cfg.stage in ("stage2", "ltm")
    if later_stage and m.init in ("llama", "pretrained") and not m.path:
        raise ConfigError(f"init_from: stage {cfg.stage} continues the previous stage: set init_from=<its export "
                          "directory> (or model.path for model.init=" + m.init + ")")
    if m.init == "tiny":
        if later_stage:
            log.warning("stage %s starts from random weights: init_from is not set (set init_from=<the previous "
                        "stage's export> to continue it)", cfg.stage)
        return MPlus(m.to_mplus_config())
    if m.init == "llama":
        path = _require_dir(m.path, "model.path (a local HF Llama directory, e.g. Llama-3.1-8B)")
        import json
        llama = json.loads((path / "config.json").read_text())
        check_backbone(m.llama, llama, f"model.path {path}")
        return load_llama(path, m.to_mplus_config(llama))
    path = _require_dir(m.path, "model.path (an official release or our export)")
    model = MPlus.from_pretrained(path)
    check_backbone(m.llama, model.config.llama, f"model.path {path}")
    _check_same_architecture(model.config, m.to_mplus_config(model.config.llama), str(path))
    return model


def _check_same_architecture(have: MPlusConfig, want: MPlusConfig, source: str) -> None:
    for key in ("num_tokens", "num_blocks", "num_ltm_blocks", "add_selector", "selector_hidden_dim", "lora_r"):
        if getattr(have, key) != getattr(want, key):
            raise ValueError(f"{source} has {key}={getattr(have, key)} but the config asks for "
                             f"model.{key}={getattr(want, key)}")


FILE_FIELDS = ("architectures", "transformers_version", "_name_or_path")
"""config.json fields that describe the file, not the backbone: never compared, never recorded."""


def check_backbone(configured: dict[str, Any], have: dict[str, Any], source: str) -> None:
    """Raise ConfigError, one line per field, where the configured model.llama disagrees with the backbone of the
    weights in `source` (an empty model.llama takes theirs). A field `have` lacks is compared with its LlamaConfig
    default."""
    defaults = None
    differ = []
    for key, want in configured.items():
        if key in FILE_FIELDS:
            continue
        if key in have:
            got = have[key]
        else:
            if defaults is None:
                defaults = LlamaConfig(**{k: v for k, v in have.items() if k not in FILE_FIELDS})
            got = getattr(defaults, key, "(not set)")
        if got != want:
            differ.append(f"  model.llama.{key}: config {want!r}, {source}: {got!r}")
    if differ:
        raise ConfigError(f"model.llama disagrees with the backbone of {source} (leave model.llama empty to take "
                          "its backbone, or start from weights of this shape):\n" + "\n".join(differ))


def built_config(cfg: RunConfig, model: MPlus) -> RunConfig:
    """`cfg` with model.llama as the model was built (the export's or the Llama directory's backbone when the config
    left it out): what a run's saved config.yaml records."""
    llama = {k: v for k, v in model.config.llama.items() if k not in FILE_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llama=llama))


def _from_previous_stage(cfg: RunConfig, path: Path) -> MPlus:
    """This run's architecture with the previous stage's weights; only new retriever weights may be missing."""
    prev = MPlusConfig.from_json(path / "config.json")
    check_backbone(cfg.model.llama, prev.llama, f"init_from {path}")
    config = cfg.model.to_mplus_config(prev.llama)
    if config.num_tokens != prev.num_tokens:
        raise ValueError(f"init_from {path}: num_tokens {prev.num_tokens} -> {config.num_tokens} cannot change")
    model = MPlus(config)
    files = weight_files(path)
    state = read_tensors(files, list(files))
    own = model.state_dict()
    fresh = sorted(k for k in own if k not in state)
    if any("retriever" not in k for k in fresh):
        load_state_strict(model, state, f"init_from {path}")  # raises, naming the keys
    merged = dict(own)
    merged.update(state)
    load_state_strict(model, merged, f"init_from {path}")
    if fresh:
        log.info("init_from %s: %d retriever tensors are new in this stage and start from their init", path,
                 len(fresh))
    return model


def initial_memory(cfg: RunConfig, model: MPlus, seed: int) -> MemoryState:
    """The memory a run starts with: the previous stage's (resized), the checkpoint's, or a fresh one."""
    source = cfg.init_from or (cfg.model.path if cfg.model.init == "pretrained" else None)
    if source is None:
        return model.new_memory(seed=seed)
    if not MemoryState.saved_in(source):
        log.info("%s has no memory (a pretrain stage's export): starting from a fresh pool", source)
        return model.new_memory(seed=seed)
    memory = MemoryState.from_pretrained(source, dtype=model.dtype, device=model.device)
    return fit_pool(memory, model)


@torch.no_grad()
def fit_pool(memory: MemoryState, model: MPlus) -> MemoryState:
    """Resize a memory to the model's pool: shrinking moves the oldest rows into the long-term memory."""
    config = model.config
    N_old, N_new = memory.size, config.stm_rows
    if N_old < N_new:
        raise ValueError(f"the previous stage's pool has {N_old} rows per layer, this stage needs {N_new}: a pool "
                         "can shrink into the long-term memory but not grow")
    if config.has_ltm and memory.ltm is None:
        memory.ltm = LongTermMemory(config.num_layers, config.hidden_size, config.selector_hidden_dim,
                                    config.ltm_capacity, dtype=memory.dtype, device=memory.device)
    if N_old == N_new:
        return memory
    if not config.has_ltm:
        raise ValueError(f"pool of {N_old} rows does not fit this stage's {N_new} and there is no long-term memory "
                         "to move the rest into")
    move = N_old - N_new
    slots = memory.slots_in_rank_order()                                      # oldest first
    old_slots, keep_slots = slots[:, :move], slots[:, move:]
    d = memory.hidden_size
    moved = torch.gather(memory.rows, 1, old_slots[..., None].expand(-1, -1, d))
    moved_ages = torch.gather(memory.ages, 1, old_slots)
    memory.ltm.add(moved, model.ltm_keys(moved), moved_ages)
    rows = torch.gather(memory.rows, 1, keep_slots[..., None].expand(-1, -1, d))
    ages = torch.gather(memory.ages, 1, keep_slots)
    L = memory.num_layers
    log.info("stage transition: %d oldest rows per layer moved from the short-term pool to the long-term memory",
             move)
    return MemoryState(rows=rows.contiguous(), ranks=torch.arange(N_new, device=rows.device).expand(L, N_new).clone(),
                       ages=ages.contiguous(), num_tokens=memory.num_tokens, ltm=memory.ltm,
                       initialized=memory.initialized)

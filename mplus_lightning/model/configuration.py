"""The model's configuration: a Llama config plus the memory fields of the official release.

`config.json` in a release directory is a `LlamaConfig` JSON carrying extra attributes (`num_tokens`,
`num_blocks`, `num_ltm_blocks`, `lora_config`, ...). We read and write exactly that layout, so our exports and the
official checkpoints share one parser; our own additions live under the key `mplus_lightning`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

# Fields of config.json that describe memory, not the Llama backbone.
_MEMORY_FIELDS = {
    "num_tokens", "num_blocks", "num_ltm_blocks", "num_memory_tokens", "add_bos_embedding", "drop_memory_per_layer",
    "add_decoder_lora", "lora_config", "add_selector", "selector_hidden_dim", "num_selector_layers",
    "add_encoder_retriever", "detach_hidden_state", "map_from_hidden_states", "ltm_initial_size",
    "update_ltm_mode", "update_ltm_frequency", "initial_rf_when_moving_stm_to_ltm", "decay_frequency",
    "selector_layers", "_attn_implementation_autoset", "architectures", "mplus_lightning",
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def _is_float_dtype_name(name: Any) -> bool:
    dtype = getattr(torch, str(name), None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


@dataclass
class MemoryArchitecture:
    """The memory and adapter sizes a run chooses: the run config's `model` group and `MPlusConfig` both inherit
    them, so each has one type, one default and one docstring. Defaults are the official stage-1 values (MemoryLLM:
    no long-term memory, no retriever); the official stage 3 sets num_ltm_blocks: 10 and add_selector: true."""

    num_tokens: int = 256
    """K: memory rows written per update, and old rows the write pass sees (official: 256)."""
    num_blocks: int = 50
    """Blocks of K rows attended at read time, short-term pool and retrieved long-term rows together (official: 50,
    i.e. 12,800 rows)."""
    num_ltm_blocks: int = 0
    """Blocks of K rows retrieved per layer from the long-term memory (official stage 3: 10); the short-term pool
    keeps the other num_blocks - num_ltm_blocks. 0 = MemoryLLM, no long-term memory (stages 1-2)."""
    add_selector: bool = False
    """Build the per-layer retriever (query and key MLPs): required when num_ltm_blocks > 0; the official training
    adds it in stage 2."""
    add_encoder_retriever: bool = True
    """Also build the retriever's query MLP on the write pass (official: true; trained in stages 2-3, never used at
    inference)."""
    selector_hidden_dim: int = 256
    """s: width of retrieval keys and queries (official: 256)."""
    num_selector_layers: int = 2
    """Depth of each retriever MLP: 2 = Linear(d, 2s) - SiLU - Linear(2s, s) (official), 1 = Linear(d, s)."""
    lora_r: int = 16
    """Rank of the LoRA adapters on q/k/v/gate/up/down of every layer (official: 16)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: an adapter's output is multiplied by lora_alpha / lora_r (official: 32)."""
    lora_dropout: float = 0.1
    """Dropout on the adapters' input while training (official: 0.1)."""
    ltm_capacity: int = 153_600
    """Long-term rows kept per layer before the oldest leave (official steady state: about 150k)."""

    def architecture_fields(self) -> dict[str, Any]:
        """These fields as keyword arguments (to build one config's twin: run config <-> MPlusConfig)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MemoryArchitecture)}


@dataclass
class MPlusConfig(MemoryArchitecture):
    """Everything that shapes an M+ / MemoryLLM model. Names follow the official config.json.

    K = `num_tokens` rows are written per update. The model attends to `num_blocks` blocks of K rows at read time:
    `num_blocks - num_ltm_blocks` blocks of short-term pool (N rows) and `num_ltm_blocks` blocks retrieved from the
    long-term memory (K0 rows). `num_ltm_blocks = 0` is MemoryLLM.
    """

    llama: dict[str, Any] = field(default_factory=dict)
    """Arguments of transformers' `LlamaConfig` (hidden_size, num_hidden_layers, vocab_size, ...)."""
    drop_memory_per_layer: bool = True
    """Evict independently per layer (M+ always does); False = one random choice shared by all layers."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """The projections of every decoder layer that carry LoRA adapters."""
    two_adapters: bool = True
    """Separate `write` and `read` LoRA adapters (official add_decoder_lora); False = `write` does both."""
    rope_inv_freq_dtype: str | None = "float32"
    """The dtype of the rotary inverse frequencies in training, kept at load whatever the weights' dtype
    (config.json: mplus_lightning.rope_inv_freq_dtype). float32 for models trained here (bf16-mixed and FSDP2's
    param_dtype cast parameters, not this buffer); None (unrecorded: official releases, which were run after
    model.to(bfloat16)) = the frequencies take the weights' dtype."""

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.llama["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.llama["hidden_size"])

    @property
    def stm_rows(self) -> int:
        """N: rows per layer in the short-term pool."""
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def ltm_read_rows(self) -> int:
        """K0: long-term rows retrieved per layer at read time."""
        return self.num_ltm_blocks * self.num_tokens

    @property
    def has_ltm(self) -> bool:
        return self.num_ltm_blocks > 0

    @property
    def architecture(self) -> str:
        return "MPlus" if self.has_ltm else "MemoryLLM"

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        problems = []
        for name in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads"):
            if name not in self.llama:
                problems.append(f"llama.{name} is missing")
        if self.num_tokens < 1:
            problems.append(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 0 <= self.num_ltm_blocks < self.num_blocks:
            problems.append(
                f"need 0 <= num_ltm_blocks < num_blocks, got num_ltm_blocks={self.num_ltm_blocks}, "
                f"num_blocks={self.num_blocks}")
        if self.has_ltm and not self.add_selector:
            problems.append("num_ltm_blocks > 0 needs the retriever: set add_selector=true")
        if self.has_ltm and self.ltm_capacity < self.num_tokens:
            problems.append(f"ltm_capacity ({self.ltm_capacity}) must hold at least one block of {self.num_tokens}")
        if self.rope_inv_freq_dtype is not None and not _is_float_dtype_name(self.rope_inv_freq_dtype):
            problems.append(f"mplus_lightning.rope_inv_freq_dtype must name a torch floating dtype such as float32, "
                            f"got {self.rope_inv_freq_dtype!r}")
        if problems:
            raise ValueError("invalid MPlusConfig: " + "; ".join(problems))

    def llama_config(self) -> LlamaConfig:
        cfg = LlamaConfig(**self.llama)
        # What a plain LlamaForCausalLM of this config runs; MPlus's layers attend through model/attention.py.
        cfg._attn_implementation = "sdpa"
        return cfg

    # ---- config.json ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MPlusConfig":
        """Parse an official or exported config.json dict."""
        if "num_tokens" not in d or "num_blocks" not in d:
            raise ValueError(
                "config.json has no `num_tokens`/`num_blocks`: this is not an M+ or MemoryLLM checkpoint "
                "(a plain Llama directory is a training start: model.init=llama).")
        arch = (d.get("architectures") or ["MPlus"])[0]
        if arch not in ("MPlus", "MemoryLLM"):
            raise ValueError(f"config.json architectures={d.get('architectures')}: expected MPlus or MemoryLLM")
        ours = d.get("mplus_lightning", {})
        lora = d.get("lora_config") or {}
        num_ltm_blocks = int(d.get("num_ltm_blocks", 0)) if arch == "MPlus" else 0
        llama = {k: v for k, v in d.items() if k not in _MEMORY_FIELDS and k != "transformers_version"}
        return cls(
            llama=llama,
            num_tokens=int(d["num_tokens"]),
            num_blocks=int(d["num_blocks"]),
            num_ltm_blocks=num_ltm_blocks,
            drop_memory_per_layer=bool(d.get("drop_memory_per_layer", True)) or arch == "MPlus",
            lora_r=int(lora.get("r", 16)),
            lora_alpha=float(lora.get("lora_alpha", 32)),
            lora_dropout=float(lora.get("lora_dropout", 0.0)),
            lora_targets=tuple(lora.get("target_modules", LORA_TARGETS)),
            two_adapters=bool(d.get("add_decoder_lora", True)),
            add_selector=bool(d.get("add_selector", arch == "MPlus")),
            selector_hidden_dim=int(d.get("selector_hidden_dim", 256)),
            num_selector_layers=int(d.get("num_selector_layers", 2)),
            add_encoder_retriever=bool(d.get("add_encoder_retriever", False)),
            ltm_capacity=int(ours.get("ltm_capacity", cls.ltm_capacity)),
            rope_inv_freq_dtype=ours.get("rope_inv_freq_dtype"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout plus our own section."""
        d = dict(self.llama)
        d.update(
            architectures=[self.architecture],
            num_tokens=self.num_tokens,
            num_blocks=self.num_blocks,
            num_memory_tokens=self.num_blocks * self.num_tokens,
            num_ltm_blocks=self.num_ltm_blocks,
            add_bos_embedding=True,
            drop_memory_per_layer=self.drop_memory_per_layer,
            add_decoder_lora=self.two_adapters,
            lora_config=dict(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                             target_modules=list(self.lora_targets), inference_mode=False),
            add_selector=self.add_selector,
            selector_hidden_dim=self.selector_hidden_dim,
            num_selector_layers=self.num_selector_layers,
            add_encoder_retriever=self.add_encoder_retriever,
            mplus_lightning=dict(format_version=1, ltm_capacity=self.ltm_capacity),
        )
        if self.rope_inv_freq_dtype is not None:   # unrecorded stays unrecorded: a re-exported release loads as one
            d["mplus_lightning"]["rope_inv_freq_dtype"] = self.rope_inv_freq_dtype
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "MPlusConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a model directory needs config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "MPlusConfig":
        return dataclasses.replace(self, **changes)


def tiny_config(**overrides: Any) -> MPlusConfig:
    """A tiny random-weight configuration for tests and CPU demos (shape of the official fixtures)."""
    llama = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    llama.update(overrides.pop("llama", {}))
    base = dict(llama=llama, num_tokens=8, num_blocks=6, num_ltm_blocks=2, add_selector=True, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, selector_hidden_dim=16, ltm_capacity=64)
    base.update(overrides)
    return MPlusConfig(**base)

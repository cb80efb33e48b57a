"""The run configuration: typed OmegaConf dataclasses, merged as defaults <- YAML <- `key=value` overrides.

Every knob of the official recipe is a field here with the official value as its default (stage-1 values where the
stages differ; `experiments/stage2.yaml` and `ltm.yaml` set the others) and a docstring, which `mplus-fit --describe`
prints and `to_yaml` (`--print-config`, a run's config.yaml) writes as a comment above each key. The memory fields of
the `model` group are `MPlusConfig`'s own (`MemoryArchitecture`), converted by `ModelConfig.to_mplus_config` alone.
`data.params` is typed too: each data kind's DataModule declares the dataclass of its parameters (`params_schema`),
and `load` resolves data.params into every parameter of that kind. Unknown keys and wrong types are errors that name
the key. `load(path, overrides)` returns a validated `RunConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .model.configuration import MemoryArchitecture, MPlusConfig
from .typed_config import ConfigError, describe, merge, parse_overrides, read_yaml, summary, to_commented_yaml

STAGES = ("pretrain", "stage1", "stage2", "ltm")

DATAMODULES = {
    "synthetic": "mplus_lightning.data.stream:SyntheticDataModule",
    "fineweb": "mplus_lightning.data.fineweb:FineWebDataModule",
    "slimpajama": "mplus_lightning.data.slimpajama:SlimPajamaDataModule",
    "mixture": "mplus_lightning.data.mixture:MixtureDataModule",
    "facts": "mplus_lightning.data.facts:FactsDataModule",
}
"""data.kind -> "module:Class" of its DataModule, which takes data.params as keyword arguments and declares their
typed schema (a dataclass) as `params_schema`."""


@dataclass
class ModelConfig(MemoryArchitecture):
    """The model: where its weights come from, its memory and adapter sizes, what trains. The memory fields are
    `MPlusConfig`'s own (one default each); `to_mplus_config` is the one conversion."""

    init: str = "tiny"
    """Where the weights come from: `tiny` (random tiny Llama from `llama`), `llama` (a local HF Llama directory in
    `path`), `pretrained` (an official release or our export in `path`, memory included)."""
    path: Optional[str] = None
    """Local directory for init=llama / pretrained."""
    llama: dict[str, Any] = field(default_factory=dict)
    """LlamaConfig fields for init=tiny (hidden_size, num_hidden_layers, vocab_size, ...). With init_from or init=llama
    / pretrained the backbone is the weights' own: empty takes it, a field that disagrees with it is an error. A run's
    saved config.yaml records the backbone as built."""
    train_backbone: bool = False
    """Also train the Llama weights (official: frozen). For tiny models trained from scratch (the CPU demo)."""

    def to_mplus_config(self, llama: dict[str, Any] | None = None) -> MPlusConfig:
        """The model's configuration: these memory fields with `llama` (default: this group's `llama`)."""
        return MPlusConfig(llama=dict(self.llama if llama is None else llama), **self.architecture_fields())


@dataclass
class DataConfig:
    """The training data: which DataModule, its arguments, the repeat task's instruction."""

    kind: str = "synthetic"
    """DataModule: synthetic | fineweb | slimpajama | mixture | facts (see mplus_lightning/data)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that DataModule's constructor (paths, tokenizer, ratios, workers, ...), typed by the
    kind's schema (its `params_schema`): loading resolves them into every parameter of the kind, with its default
    where the config sets none; unknown keys and wrong types are errors."""
    instruction: str = "Repeat:"
    """Instruction of the repeat task (official `instruct`)."""


@dataclass
class StepConfig:
    """The training step: its step kinds, losses and schedules. Official config names in brackets."""

    full_context_ratio: float = 0.1
    """P(full-context LM step, no injection) [full_context_and_sentence_training_ratio]."""
    multi_chunk_ratio: float = 0.8
    """P(multi-chunk step: inject up to the scheduled number of chunks, read with the whole memory)
    [occassionally_cat_to_maximum_memory_ratio]; otherwise a single-chunk step reads only the new block."""
    num_contexts_schedule: list[list[int]] = field(default_factory=lambda: [[0, 50], [100_000, 100], [200_000, 200]])
    """[[from_step, max_chunks], ...]: chunks injected per multi-chunk step."""
    revisit: bool = True
    """Re-score a cached earlier target against the current memory [cache_data_for_longer_context]."""
    pass_ratio: float = 0.8
    """P(no revisit) when a revisit is possible."""
    empty_prob: float = 1.0
    """P(replace the cached target) after a normal step that follows a revisit (stage 3: 0.2)."""
    single_chunk_gradient: bool = True
    """Multi-chunk steps of one-chunk documents keep the gradient through the injection (official stages 1-2)."""
    mask_extra_tokens: int = 5
    """Repeat task: tokens masked from the loss after the instruction [num_of_additional_tokens_to_mask]."""
    max_seq_length: int = 2048
    """Longest target / full-context sequence."""
    retriever_loss: bool = False
    """Add the class-balanced BCE retriever losses (stages 2-3) on multi-chunk and revisit steps."""
    encoder_retriever_loss: bool = True
    """With retriever_loss: also train the encoder retriever (queries from the newest memory block) on the rows of
    the same target, as official stages 2-3 do (needs model.add_encoder_retriever)."""
    negative_loss_weight: float = 1.0
    """Weight of the negatives' half of each retriever BCE loss (official: 1)."""
    random_retriever_length: bool = True
    """Retriever queries come from a random-length prefix of the target, as in the official training."""


@dataclass
class OptimConfig:
    """The optimizer (AdamW, two parameter groups) and its learning-rate schedule."""

    lr: float = 3.68e-4
    """Learning rate of the main group (LoRA adapters, BOS vectors, new-memory embedding), as given: it does not
    scale with the GPU count. The official code multiplied a base rate by the GPUs of a node, so on its 8 GPUs it
    trained at 4.6e-5 x 8 = 3.68e-4 in stage 1 and 4.6e-6 x 8 = 3.68e-5 in stages 2-3: the shipped configs state
    these effective rates."""
    selector_lr: float = 1e-4
    """Learning rate of the selector group: every parameter whose name holds query_proj or key_proj (the retrievers'
    projectors), as grouped officially; official: 1e-4, never scaled."""
    weight_decay: float = 0.01
    """AdamW weight decay of both groups (official: 0.01, torch's default)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (official: torch's default [0.9, 0.999])."""
    schedule: str = "linear"
    """linear (decay to final_lr_factor over decay_steps, then constant) | constant."""
    final_lr_factor: float = 0.1
    """schedule=linear: the learning rate ends at lr * final_lr_factor (official stage 1: 0.1)."""
    decay_steps: int = 100_000
    """schedule=linear: steps of the linear decay, after which the rate stays constant (official stage 1: 100k)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over the first steps (either schedule; 0 = none, as official)."""
    grad_clip: float = 0.0
    """Gradient-norm clipping (0 = off, as official)."""


@dataclass
class TrainerConfig:
    """The Lightning Trainer: devices, precision, sharding, steps, validation, checkpoints and logs."""

    max_steps: int = 1_200_000
    """Optimizer steps of the run (official stage 1: 1.2M steps on 8 GPUs)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto | cpu | gpu | cuda."""
    devices: int = 1
    """Devices per node (official: 8 GPUs)."""
    num_nodes: int = 1
    """Nodes; each runs `devices` processes."""
    precision: str = "bf16-mixed"
    """Lightning precision: bf16-mixed (official: the model in bf16) | 32-true (CPU, tests) | 16-mixed."""
    strategy: str = "auto"
    """auto (one device) | fsdp2 (ModelParallelStrategy, fully_shard per decoder layer) | ddp."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, more compute; official: off)."""
    accumulate_grad_batches: int = 1
    """Samples (memory stages) or batches (pretrain) whose gradients add up before one optimizer step."""
    val_every_n_steps: int = 10_000
    """Validate every this many training steps (official: 10,000)."""
    val_batches: int = 50
    """Validation samples (memory stages) or batches (pretrain) per validation."""
    ckpt_every_n_steps: int = 10_000
    """Write a checkpoint every this many steps: a folder checkpoints/step=N/ with Lightning's checkpoint, each rank's
    memory and a manifest of checksums, written atomically."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept (at least 2, so a damaged newest one has an intact predecessor; -1: all) (official:
    3)."""
    log_every_n_steps: int = 10
    """Write the TensorBoard scalars every this many steps."""
    progress_bar: bool = True
    """Show Lightning's progress bar (false for logs written to files)."""
    seed: int = 42
    """Seeds the initial weights and step decisions (the same on every rank), each rank's evictions and starting
    pool, and Lightning's RNGs (official: 42)."""


@dataclass
class RunConfig:
    """One training run: the top-level keys plus the groups model, data, step, optim and trainer."""

    name: str = MISSING
    """Run name: outputs go to <run_dir>/<name>/ (checkpoints/, tensorboard/, config.yaml, export/)."""
    stage: str = "stage1"
    """pretrain (plain Llama, batched in-context data: backbones trained from scratch) | stage1 | stage2 | ltm."""
    run_dir: str = "checkpoints/runs"
    """Parent directory of the runs' output directories."""
    init_from: Optional[str] = None
    """Previous stage's export directory (<run>/export): weights and memory start there (pool resized as needed)."""
    resume: Optional[str] = None
    """`last` (this run's newest complete checkpoint) or a checkpoint folder (checkpoints/step=N): continue exactly
    where it stopped. Checkpoints after the one resumed from are moved to checkpoints/superseded/."""
    overwrite: bool = False
    """Start again from scratch in a run folder that already holds a run, deleting its checkpoints/, tensorboard/ and
    export/ first (without it such a folder is refused unless `resume` is set)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    step: StepConfig = field(default_factory=StepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / self.name


def _validate(cfg: RunConfig) -> None:
    problems = []
    if cfg.stage not in STAGES:
        problems.append(f"stage: {cfg.stage!r} is not one of {STAGES}")
    if cfg.data.kind not in DATAMODULES:
        problems.append(f"data.kind: {cfg.data.kind!r} is not one of {sorted(DATAMODULES)}")
    s = cfg.step
    for key in ("full_context_ratio", "multi_chunk_ratio", "pass_ratio", "empty_prob"):
        v = getattr(s, key)
        if not 0.0 <= v <= 1.0:
            problems.append(f"step.{key}: {v} is not a probability in [0, 1]")
    if not s.num_contexts_schedule or any(len(x) != 2 or x[1] < 1 for x in s.num_contexts_schedule):
        problems.append("step.num_contexts_schedule: expected [[from_step, max_chunks >= 1], ...]")
    if cfg.optim.schedule not in ("linear", "constant"):
        problems.append(f"optim.schedule: {cfg.optim.schedule!r} is not linear|constant")
    if cfg.model.init not in ("tiny", "llama", "pretrained"):
        problems.append(f"model.init: {cfg.model.init!r} is not tiny|llama|pretrained")
    if cfg.model.init == "tiny" and not cfg.model.llama and not cfg.init_from:
        problems.append("model.llama: init=tiny needs the LlamaConfig fields (hidden_size, num_hidden_layers, ...)")
    if cfg.stage == "ltm" and cfg.model.num_ltm_blocks < 1:
        problems.append("model.num_ltm_blocks: stage ltm needs a long-term memory (>= 1 block)")
    if cfg.stage != "ltm" and cfg.model.num_ltm_blocks > 0:
        problems.append(f"model.num_ltm_blocks: {cfg.stage} trains MemoryLLM (0); long-term memory is stage ltm")
    if s.retriever_loss and not cfg.model.add_selector:
        problems.append("step.retriever_loss: needs model.add_selector=true")
    o = cfg.optim
    for key in ("lr", "selector_lr"):
        if not getattr(o, key) > 0:
            problems.append(f"optim.{key}: {getattr(o, key)} must be > 0")
    if not o.weight_decay >= 0:
        problems.append(f"optim.weight_decay: {o.weight_decay} must be >= 0")
    if cfg.trainer.ckpt_every_n_steps < 1:
        problems.append(f"trainer.ckpt_every_n_steps: {cfg.trainer.ckpt_every_n_steps} must be >= 1 (a checkpoint "
                        "every N steps; set it above trainer.max_steps for one at the end only)")
    if cfg.model.lora_r < 1:
        problems.append(f"model.lora_r: {cfg.model.lora_r} must be >= 1 (the LoRA rank)")
    if not cfg.model.lora_alpha > 0:
        problems.append(f"model.lora_alpha: {cfg.model.lora_alpha} must be > 0")
    if cfg.trainer.strategy not in ("auto", "fsdp2", "ddp"):
        problems.append(f"trainer.strategy: {cfg.trainer.strategy!r} is not auto|fsdp2|ddp")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """defaults <- YAML file <- `a.b=value` overrides, type-checked; errors name the offending key."""
    sources = [read_yaml(path)] if path is not None else []
    if overrides:
        sources.append(parse_overrides(overrides))
    cfg: RunConfig = merge(RunConfig, sources, what="run config", missing_hint="{key}=... or `{key}:` in the YAML")
    _validate(cfg)
    cfg.data.params = dataclasses.asdict(data_params(cfg.data))
    return cfg


def datamodule_class(kind: str) -> type:
    """The DataModule class of `data.kind` (imported on first use)."""
    if kind not in DATAMODULES:
        raise ConfigError(f"data.kind: {kind!r} is not one of {sorted(DATAMODULES)}")
    module_name, cls_name = DATAMODULES[kind].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def data_params(data: DataConfig) -> Any:
    """`data.params` as an instance of the kind's schema: every parameter, defaults where unset. Errors name the key
    and the kind."""
    schema = datamodule_class(data.kind).params_schema
    where = f"data.kind={data.kind}"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data.params))
    except ConfigKeyError as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        known = ", ".join(_schema_keys(schema, key.split(".")[:-1]))
        raise ConfigError(f"data.params.{key}: unknown key for {where} (known: {known})") from None
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        raise ConfigError(f"data.params.{key}: {str(e).splitlines()[0]} ({where})") from None
    except (ValueError, TypeError) as e:   # the schema's own checks (e.g. a rule's lengths, the mixture's ratios)
        raise ConfigError(f"data.params ({where}): {e}") from None


def _schema_keys(schema: type, path: list[str]) -> list[str]:
    """The field names of `schema`, or of the nested dataclass at `path` (e.g. ["rule"])."""
    for part in path:
        hint = typing.get_type_hints(schema).get(part)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            break
        schema = hint
    return [f.name for f in dataclasses.fields(schema)]


def learning_rates(cfg: RunConfig) -> str:
    """One line with the learning rate of each optimizer parameter group and their schedule, as the run trains (no
    scaling by the GPU count): the first log line of a run and the head of `to_yaml`."""
    o = cfg.optim
    rates = f"main {o.lr:g}"
    if cfg.model.add_selector and cfg.stage != "pretrain":   # the groups of TrainingRecipe.configure_optimizers
        rates += f", selector {o.selector_lr:g}"
    if o.schedule == "linear":
        schedule = f"linear decay to {o.final_lr_factor:g}x over {o.decay_steps} steps, then constant"
    else:
        schedule = "constant"
    if o.warmup_steps > 0:
        schedule = f"linear warm-up over {o.warmup_steps} steps, then {schedule}"
    return f"learning rates: {rates} ({schedule})"


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, each key under a comment with its docstring, data.params under those of the
    kind's schema, headed by the learning rates (`load` reads it back)."""
    shown = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, params=data_params(cfg.data)))
    return f"# {learning_rates(cfg)}\n" + to_commented_yaml(shown)


def save(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def describe_fields(group: str | None = None) -> str:
    """Every run-config key (or those of `group`, e.g. `model` or `optim.lr`) with type, default and docstring."""
    return describe(RunConfig, group)


def groups_help() -> str:
    """One line per config group and top-level key (for `--help`)."""
    return summary(RunConfig)

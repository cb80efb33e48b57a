"""Typed configuration of the evaluations (OmegaConf structured dataclasses).

Precedence: the dataclass defaults <- `experiments/eval_<task>.yaml` (or `--config FILE`) <- the command-line flags
(`--model`, `--data`, ...) <- `key=value` overrides. Unknown keys and ill-typed values are errors that name the key
(the run config's loader, `typed_config.merge`). `mplus-evaluate TASK --describe` prints each key's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from ..typed_config import ConfigError, describe, merge, parse_overrides, read_yaml, to_commented_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CommonConfig:
    model: str = MISSING
    """Model directory: our export (config.json + model.safetensors + memory/) or an official release."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or tokenizer.json; default: the model directory."""
    data: Optional[str] = None
    """Data file or directory (see each task)."""
    out: Optional[str] = None
    """Output directory; default checkpoints/eval/<task>/<model directory name>."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16."""
    seed: int = 0
    """Seeds the random memory evictions, per item, so reruns and resumed runs are identical."""
    limit: Optional[int] = None
    """Evaluate only the first n items (per subset); None = all."""
    overwrite: bool = False
    """Discard results already in `out` instead of resuming."""
    progress: bool = True
    """Progress bars with ETA."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under out/tensorboard."""


@dataclass
class ShardedConfig(CommonConfig):
    devices: Optional[int] = None
    """Processes per node, each evaluating its share of the items with its own model and memories (one GPU each);
    None: as many as the launcher started (torchrun --nproc_per_node, SLURM tasks per node), else 1. Without a
    launcher, devices=N makes Lightning start the N processes."""
    num_nodes: Optional[int] = None
    """Nodes, each running `devices` processes; None: as the launcher says (torchrun --nnodes, SLURM_NNODES), else
    1."""


@dataclass
class RetentionConfig(ShardedConfig):
    dataset: str = "auto"
    """squad | nq | processed | auto (detected from the files under `data`)."""
    index: Optional[str] = "auto"
    """Index .npy selecting items: auto (indices_squad_3.npy / indices_nq_4.npy beside the data), none, or a path."""
    num_items: Optional[int] = 100
    """First n selected items (the paper uses 100)."""
    distractors: str = "auto"
    """auto (SQuAD train for squad and nq, the paper's choice; the processed layout's own file), squad_train,
    nq_train (the official NQ script), processed."""
    distractor_path: Optional[str] = None
    """Distractor source file; default found beside the data (../squad/train-v2.0.json for nq)."""
    distractor_min_tokens: Optional[int] = None
    """Concatenate source texts until this many tokens; None: 768 (squad_train), 513 (nq_train), 0 (processed)."""
    distractor_tokens: int = 512
    """Each distractor is cut to this many tokens."""
    distances: list[int] = field(default_factory=lambda: [0] + [10_000 * i for i in range(1, 17)])
    """Score after at least this many tokens were injected after the context (0 = right after it)."""
    context_tokens: int = 512
    """The context prompt is truncated to this many tokens (official)."""
    context_template: Optional[str] = None
    """Default per dataset: 'Context: {context}' (squad, nq), '{context}' (processed)."""
    question_template: Optional[str] = None
    """Default per dataset: 'Questions: {question} Answer:' (squad), 'Questions: {question}? Answer:' (nq),
    'Question: {question} Answer:' (processed)."""
    max_new_tokens: int = 10
    """Greedy tokens generated per answer (official: 10); the answer is scored up to the first EOS."""
    modes: list[str] = field(default_factory=lambda: ["mplus", "memoryllm"])
    """mplus: read with the long-term memory; memoryllm: read the short-term pool only (same injections)."""
    borderline: bool = True
    """Also ask every question without its context (the no-context 'borderline' accuracy)."""
    diagnose: bool = False
    """M+ mode: also record, per scoring point, where the context's rows are (short-term pool / long-term memory),
    the share of them each layer retrieved, and the score with an oracle retrieval (eval/diagnose.py); the
    retriever's recall of them is plotted in recall.png."""


@dataclass
class RecallConfig(RetentionConfig):
    """The retriever's recall (paper Fig. 6): the retention run with `diagnose` on, M+ mode only, no borderline."""

    modes: list[str] = field(default_factory=lambda: ["mplus"])
    """mplus (the recall is M+'s; memoryllm adds nothing to it)."""
    borderline: bool = False
    """Also ask every question without its context (not needed for the recall)."""
    diagnose: bool = True
    """Always on here: the recall comes from the diagnostics."""


@dataclass
class LongContextConfig(ShardedConfig):
    methods: list[str] = field(default_factory=lambda: ["mplus", "window"])
    """mplus, memoryllm (long-term memory off) and window (the backbone alone, LoRA off, on the last tokens)."""
    window_tokens: int = 2048
    """Tokens the memory model reads directly (generated tokens included)."""
    chunk_tokens: int = 512
    """Injected chunk size."""
    min_chunk_tokens: int = 16
    """An oldest chunk shorter than this is merged into the next one instead of written alone (short writes disturb
    the memory; the official README's minimum is 16)."""
    truncation: str = "tail"
    """tail (MemoryLLM scripts) or middle (official LongBench) when the prompt exceeds max_length."""
    prefill_block: int = 2048
    """The window baseline pre-fills long prompts in blocks of this many tokens."""
    truncate_at_newline: bool = False
    """Score only the first line of a prediction (official LongBench does so only for trec/triviaqa/samsum/lsht)."""


@dataclass
class LongBookConfig(LongContextConfig):
    task: str = "qa"
    """qa (longbook_qa_eng.jsonl) or event_qa (a user-supplied Event-QA file, see data/eval_sets/longbook.py)."""
    max_length: Optional[int] = None
    """Truncate the prompt to this many tokens; None = the whole book goes through memory."""
    baseline_max_length: int = 16_384
    """The window baseline reads the last this-many tokens (Llama-3.1-8B-16k in the paper)."""
    max_new_tokens: int = 40
    """Greedy tokens generated per answer."""
    template: Optional[str] = None
    """Prompt with {context} and {question} (qa) or {context}, {past_events}, {options} (event_qa)."""
    event_scoring: str = "letter"
    """event_qa: letter (highest next-token logit among the option letters) or loglik (option text likelihood)."""


@dataclass
class LongBenchConfig(LongContextConfig):
    subsets: list[str] = field(default_factory=lambda: ["2wikimqa", "hotpotqa", "qasper", "musique",
                                                        "multifieldqa_en", "narrativeqa"])
    """LongBench subsets to evaluate, each a <subset>.jsonl under `data` (the paper's six QA subsets)."""
    max_length: Optional[int] = 8192
    """8192 or 16384 in the paper (Tables 2-3)."""
    baseline_max_length: Optional[int] = None
    """The window baseline's input length; None = max_length."""
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {
        "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32})
    """Greedy tokens generated per answer, per subset (official LongBench's dataset2maxlen)."""
    prompts: Optional[str] = None
    """A dataset2prompt.json-style file overriding the official templates."""


@dataclass
class CostConfig(CommonConfig):
    lengths: list[int] = field(default_factory=lambda: [16_384, 32_768, 65_536, 131_072])
    """Input lengths in tokens."""
    methods: list[str] = field(default_factory=lambda: ["mplus", "memoryllm", "window"])
    """mplus, memoryllm (long-term memory emptied after every write, so it never grows) and window (the backbone
    alone over the whole input)."""
    window_tokens: int = 2048
    """Memory models inject length - window tokens, then predict the last token from window - 1 tokens."""
    chunk_tokens: int = 512
    """Injected chunk size."""
    prefill_block: int = 2048
    """The window baseline processes its input in blocks of this many tokens (same result, bounded mask size)."""
    repeats: int = 1
    """Timed repetitions per point (the minimum is reported)."""
    warmup: bool = True
    """One short untimed run of each method first (kernel selection, allocator warm-up)."""
    placements: list[str] = field(default_factory=lambda: ["device"])
    """Where M+'s long-term memory lives, one measurement each: device (rows and keys with the model),
    rows_on_host (rows in host memory, keys on the device: a read copies only its K0 rows per layer), all_on_host
    (rows and keys in host memory, as officially: a read also copies every key). Other methods: device only."""


@dataclass
class TextLossConfig(ShardedConfig):
    text_field: str = "text"
    """The field (JSON Lines) or column (parquet) holding each document's text."""
    num_documents: Optional[int] = 1000
    """The first n documents of `data` (the paper: 1,000)."""


@dataclass
class PositionLossConfig(TextLossConfig):
    models: list[str] = field(default_factory=list)
    """More checkpoints evaluated on the same documents and drawn on the same plot as `model` (e.g. the exports of
    stages 1 and 2 beside stage 3's)."""
    labels: list[str] = field(default_factory=list)
    """Plot labels of `model` then `models`; default: their directory paths, shortened to the last components
    that tell them apart."""
    chunk_tokens: int = 512
    """Each document goes through memory in chunks of this many tokens; a chunk is scored against the memory before
    it is written."""
    max_tokens: Optional[int] = 65_536
    """Documents are cut to their first this-many tokens."""
    bucket_tokens: int = 2048
    """Losses are averaged over buckets of this many token positions."""


@dataclass
class ShortContextConfig(TextLossConfig):
    methods: list[str] = field(default_factory=lambda: ["mplus", "backbone"])
    """mplus (reads with its memory, the checkpoint's), memoryllm (the same without the long-term memory) and
    backbone (the Llama alone: no memory, LoRA off, BOS first)."""
    max_tokens: int = 2048
    """Inputs are the first this-many tokens of each document (the paper: 2,048)."""


TASKS: dict[str, type] = {"retention": RetentionConfig, "longbook": LongBookConfig, "longbench": LongBenchConfig,
                          "cost": CostConfig, "recall": RecallConfig, "position-loss": PositionLossConfig,
                          "short-context": ShortContextConfig}


def default_yaml(task: str) -> Path:
    """experiments/eval_<task>.yaml (hyphens as underscores) of the working directory if there is one, else of this
    checkout."""
    name = Path("experiments") / f"eval_{task.replace('-', '_')}.yaml"
    return name.resolve() if name.is_file() else REPO_ROOT / name


def load_config(task: str, yaml_path: str | Path | None = None, overrides: list[str] = (),
                flags: dict[str, Any] | None = None, *, use_default_yaml: bool = True):
    """The resolved config object (a dataclass instance) of `task`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if yaml_path is None and use_default_yaml and default_yaml(task).is_file():
        yaml_path = default_yaml(task)
    sources = [read_yaml(yaml_path)] if yaml_path is not None else []
    if flags:
        sources.append(("command-line flags", OmegaConf.create({k: v for k, v in flags.items() if v is not None})))
    if overrides:
        sources.append(parse_overrides(overrides))
    return merge(TASKS[task], sources, what=f"{task} config", missing_hint="--{key} DIR")


def describe_fields(task: str, key: str | None = None) -> str:
    """Every key of `task`'s config (or just `key`) with type, default and docstring."""
    return describe(TASKS[task], key)


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg) -> str:
    """The resolved config as YAML, each key under a comment with its docstring (`load_config` reads it back)."""
    return to_commented_yaml(cfg)

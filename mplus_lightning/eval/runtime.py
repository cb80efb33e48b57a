"""What every evaluation needs at run time: loading a checkpoint and its tokenizer, the memory modes, greedy decoding,
the plain-window backbone baseline, and the per-run output directory with its resume manifest.

Memory modes. Every item starts from a *copy* of the checkpoint's memory (never a zeroed pool: the trained pool is
part of the model). MemoryLLM mode on an M+ checkpoint means reading without the long-term memory. The write pass
never looks at the long-term memory (it sees only the newest short-term block), and evictions use the same random
draws either way, so the short-term pool evolves identically with or without it. We therefore inject once and read
twice: `memory_view(mem, "memoryllm")` shares the short-term tensors and carries an *empty* LongTermMemory
(`MemoryState.with_empty_ltm`), which the read pass skips (so the prompt keeps its positions after the K0 reserved
slots, as in M+). For cost runs, where the long-term memory's growth is what is measured, `inject(...,
mode="memoryllm")` also empties it after every write (`ltm.clear()`), so the store never grows.

The window baseline is the backbone alone: the same HF decoder layers called with no adapter active (the base
weights alone), no memory prefix, the BOS token at position 0, and ordinary causal
attention. Long inputs are pre-filled in blocks, which gives the same result with a bounded mask size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..data.files import DataFormatError
from ..data.tokenizer import check_tokenizer, encode as encode, load_tokenizer as load_tokenizer  # the evaluations' too
from ..model.configuration import MPlusConfig
from ..model.decoding import decode_loop
from ..model.memory import MemoryState
from ..model.mplus import MemoryKVCache, MPlus
from ..typed_config import ConfigError
from .config import to_dict
from .fingerprint import check_complete, fingerprints
from .io import ResultStore, write_json

log = logging.getLogger(__name__)

BACKBONE_ADAPTER = None   # no adapter active: the layers run their base weights (MemoryDecoderLayer.forward)
MODES = ("mplus", "memoryllm")


class EvalInputError(ConfigError):
    """A user-facing problem with the inputs of an evaluation (paths, layouts, options); the CLI prints it as one
    line."""


# ---- devices and loading ----------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"device={name} but CUDA is not available (use device=cpu)")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise EvalInputError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise EvalInputError(f"model directory {path} does not exist: expected a directory with config.json and "
                             "model.safetensors (+ memory/), written by export/save_pretrained, or an official "
                             "release (YuWangX/mplus-8b, memoryllm-8b) downloaded to local disk")
    if not (path / "config.json").is_file():
        raise EvalInputError(f"model directory {path} has no config.json: expected an M+ / MemoryLLM checkpoint "
                             "directory (config.json + model.safetensors or model.safetensors.index.json)")
    # A truncated download or copy is named here; the loaders' own errors would not say which file it is.
    for name in ("config.json", "model.safetensors.index.json", "memory/memory.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise DataFormatError(f"{path / name}: not valid JSON ({e}): a truncated copy? re-export or "
                                      "re-download the model directory") from None
    check_complete(path)
    return path


def load_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[MPlus, MemoryState]:
    """The model and the memory stored with it (our export's memory/ or the official tensors)."""
    path = check_model_dir(path)
    model = MPlus.from_pretrained(path, dtype=dtype, device=device)   # in eval mode
    memory = MemoryState.from_pretrained(path, dtype=dtype, device=device)
    memory.check_compatible(model.config)
    if not memory.initialized:
        warnings.warn(f"{path}: the stored memory is uninitialised (never written); the first injection of every "
                      "item fills the whole pool", stacklevel=2)
    return model, memory


def load_model_config(path: str | Path) -> MPlusConfig:
    """The architecture of a checkpoint directory, from its config.json alone (no weights read)."""
    return MPlusConfig.from_json(check_model_dir(path) / "config.json")


def load_eval_tokenizer(cfg, model: MPlus | MPlusConfig) -> Any:
    """The tokenizer of an evaluation (`cfg.tokenizer`, default the model directory), checked against the model's
    vocabulary before the first item (an id past it would stop the run midway)."""
    config = model.config if isinstance(model, MPlus) else model
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    check_tokenizer(tokenizer, int(config.llama["vocab_size"]),
                    fix="pass the model's own tokenizer with --tokenizer (or tokenizer=PATH)")
    return tokenizer


def decode(tok, ids: list[int]) -> str:
    try:
        return tok.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tok.decode(list(ids))


# ---- memory modes -----------------------------------------------------------------------------------------------
def memory_view(memory: MemoryState, mode: str) -> MemoryState:
    """The memory as `mode` reads it: mplus = itself; memoryllm = same short-term pool, empty long-term memory."""
    if mode == "mplus" or memory.ltm is None:
        return memory
    if mode != "memoryllm":
        raise EvalInputError(f"memory mode must be one of {MODES}, got {mode!r}")
    return memory.with_empty_ltm()


def start_memory(base: MemoryState, mode: str = "mplus") -> MemoryState:
    """An independent copy of the checkpoint memory for one item (memoryllm: with an emptied long-term memory)."""
    mem = base.clone()
    if mode == "memoryllm" and mem.ltm is not None:
        mem.ltm.clear()
    return mem


def inject(model: MPlus, memory: MemoryState, ids: list[int], generator: torch.Generator, mode: str = "mplus"
           ) -> None:
    """Write one chunk and commit it; in memoryllm mode the long-term memory is emptied again afterwards."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="writing a chunk of")
        model.inject(memory, torch.tensor([ids], dtype=torch.long, device=model.device), generator=generator)
    if mode == "memoryllm" and memory.ltm is not None:
        memory.ltm.clear()


def item_generator(seed: int, *key: Any) -> torch.Generator:
    """A CPU generator seeded from (seed, key): the same item gets the same evictions in every (resumed) run."""
    digest = hashlib.sha256(json.dumps([seed, *key], default=str).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def strip_eos(ids: list[int], eos) -> list[int]:
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    out = []
    for t in ids:
        if t in eos_set:
            break
        out.append(t)
    return out


@torch.no_grad()
def generate_ids(model: MPlus, memory: MemoryState, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` against `memory` (new ids only, cut at EOS)."""
    out = model.generate(memory, torch.tensor([ids], dtype=torch.long, device=model.device),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return strip_eos(out[0, len(ids):].tolist(), model.llama.config.eos_token_id)


# ---- the plain-window backbone ----------------------------------------------------------------------------------
class Backbone:
    """The checkpoint's Llama without memory and without LoRA: the plain-window baseline."""

    def __init__(self, model: MPlus, prefill_block: int = 2048):
        if prefill_block < 1:
            raise EvalInputError(f"prefill_block must be >= 1, got {prefill_block}")
        self.model = model
        self.block = prefill_block
        self.bos = model.llama.config.bos_token_id
        self.eos = model.llama.config.eos_token_id

    def _with_bos(self, ids: list[int]) -> list[int]:
        ids = [t for t in ids if t != self.bos]
        return ([self.bos] if self.bos is not None else []) + ids

    def _run(self, h: torch.Tensor, start: int, cache: MemoryKVCache) -> torch.Tensor:
        m = self.model
        pos = m.rotary(h, torch.arange(start, start + h.shape[1], device=h.device)[None])
        for layer in m.layers:
            h = layer(h, adapter=BACKBONE_ADAPTER, position_embeddings=pos, rotary=m.rotary, cache=cache)
        return h

    def _prefill(self, ids: list[int], cache: MemoryKVCache) -> torch.Tensor:
        m = self.model
        x = torch.tensor([ids], dtype=torch.long, device=m.device)
        h = None
        for s in range(0, len(ids), self.block):
            h = self._run(m.llama.model.embed_tokens(x[:, s:s + self.block]), s, cache)
        return h[:, -1:]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.llama.lm_head(self.model.llama.model.norm(h))[:, -1]

    @torch.no_grad()
    def forward_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [B=1, n, V] of a whole (short) input, BOS prepended (for parity tests)."""
        seq = self._with_bos(ids)
        cache = MemoryKVCache(len(self.model.layers))
        x = torch.tensor([seq], dtype=torch.long, device=self.model.device)
        h = self._run(self.model.llama.model.embed_tokens(x), 0, cache)
        return self.model.llama.lm_head(self.model.llama.model.norm(h))

    @torch.no_grad()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        seq = self._with_bos(ids)
        cache = MemoryKVCache(len(self.model.layers), capacity=len(seq))
        return self._logits(self._prefill(seq, cache))

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy new ids after `ids` (BOS prepended), cut before the first EOS."""
        seq = self._with_bos(ids)
        cache = MemoryKVCache(len(self.model.layers), capacity=len(seq) + max_new_tokens)
        eos = [t for t in (self.eos if isinstance(self.eos, (list, tuple)) else [self.eos]) if t is not None]

        def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
            return self._logits(self._run(self.model.llama.model.embed_tokens(tokens), len(seq) + i, cache))

        new = decode_loop(self._logits(self._prefill(seq, cache)), step, max_new_tokens, stop_ids=eos)[0].tolist()
        return strip_eos(new, eos)


# ---- output directory -------------------------------------------------------------------------------------------
def default_out(task: str, model_dir: str) -> Path:
    """checkpoints/eval/<task>/<model directory name>, relative to the working directory (git-ignored here)."""
    return Path("checkpoints") / "eval" / task / Path(model_dir).resolve().name


class RunDir:
    """An output directory with a manifest of what shaped its per-item results: the settings (`fingerprint`) and the
    contents of the files read (`inputs`: the model directory, a separate tokenizer, the data files; see
    `mplus_lightning.eval.fingerprint`).

    Reopening it with different settings, or after any of those files changed (new weights at the same path), is an
    error naming what changed (results would mix); overwrite=true starts afresh.

    Results: `items.jsonl`, one line per finished work unit. In a run over several ranks, rank 0 appends to it and
    rank r > 0 to its own `items.rank<r>.jsonl` (`part_file`); `merge_parts` folds those into items.jsonl (at the
    end, and at the start of a run that resumes an interrupted one).
    """

    def __init__(self, out: str | Path, task: str, cfg, fingerprint: dict, key_fields: tuple[str, ...],
                 overwrite: bool = False, data_files: dict[str, Any] | None = None, *, create: bool = True):
        """`data_files`: {name: path} of the data the items come from (each a file or a directory). `create=False`
        only checks (reads nothing but the manifest): the process that writes calls `create` later."""
        self.path = Path(out)
        self.task, self.key_fields, self.overwrite = task, key_fields, overwrite
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.manifest = {"task": task, "fingerprint": fingerprint, "inputs": self._inputs(cfg, data_files or {}),
                         "config": to_dict(cfg)}
        manifest = self.path / "run.json"
        if not overwrite and manifest.is_file():
            recorded = json.loads(manifest.read_text())
            old = recorded.get("fingerprint", {})
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                k = diff[0]
                raise EvalInputError(
                    f"{self.path} holds results of a different {task} run ({k}: {old.get(k)!r} there, "
                    f"{fingerprint.get(k)!r} now; differing: {diff}). Use another --out or overwrite=true")
            if "inputs" in recorded:
                self._check_inputs(task, recorded["inputs"], self.manifest["inputs"])
            else:
                log.warning("%s: its results were recorded without the contents of the files they were computed "
                            "from; resuming without checking that the model and data are the same", self.path)
        self.store: ResultStore | None = None
        if create:
            self.create()

    def create(self) -> ResultStore:
        """Start (overwrite: after deleting earlier results) or resume: write the manifest, open items.jsonl (a line
        cut off mid-write is dropped) and fold in the part files an interrupted multi-rank run left."""
        if self.overwrite and self.path.exists():
            for name in ("items.jsonl", "run.json", *(p.name for p in self.parts())):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "tensorboard", ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "run.json", self.manifest)
        self.store = ResultStore(self.path / "items.jsonl", self.key_fields)
        self.merge_parts()
        return self.store

    def results(self) -> ResultStore:
        """items.jsonl as `create` left it (for the ranks that do not write it)."""
        return ResultStore(self.path / "items.jsonl", self.key_fields)

    def part_file(self, rank: int) -> Path:
        return self.path / f"items.rank{rank}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("items.rank*.jsonl"))

    def merge_parts(self) -> int:
        """Fold every rank's part file into items.jsonl and delete it; returns the number of records added."""
        added = 0
        for part in self.parts():
            new = [r for k, r in ResultStore(part, self.key_fields).records.items() if k not in self.store]
            self.store.extend(new)
            added += len(new)
            part.unlink()
        return added

    def _inputs(self, cfg, data_files: dict[str, Any]) -> dict[str, dict[str, str]]:
        """{name: {file: content fingerprint}} of the model directory, a separate tokenizer and the data files."""
        named = {"model": getattr(cfg, "model", None), "tokenizer": getattr(cfg, "tokenizer", None), **data_files}
        return {name: fingerprints(p, exclude=self.path) for name, p in named.items()
                if p is not None and Path(p).exists()}

    def _check_inputs(self, task: str, old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> None:
        for name in sorted(set(old) | set(new)):
            before, now = old.get(name, {}), new.get(name, {})
            for f in sorted(set(before) | set(now)):
                if before.get(f) == now.get(f):
                    continue
                what = ("was added since" if f not in before else "is gone" if f not in now
                        else f"changed since (content fingerprint {before[f]} there, {now[f]} now)")
                raise EvalInputError(
                    f"{self.path} holds {task} results computed from other contents of the {name}: {f} {what}. "
                    "Use another --out or overwrite=true")

    def file(self, name: str) -> Path:
        return self.path / name

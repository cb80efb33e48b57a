"""The paper's loss analyses: loss by position in long documents (Fig. 4) and loss on short inputs (Sec. 4.6.1).

**position-loss**: each held-out long document (e.g. a SlimPajama 32k-64k validation bucket) goes through a fresh
copy of the checkpoint's memory in chunks of `chunk_tokens`; every chunk is scored before it is written: the read
pass over the previous token and the chunk, against the memory that holds everything before it, gives the next-token
loss of each of the chunk's tokens (all tokens but the document's first are scored once). Losses are averaged per
bucket of `bucket_tokens` positions over all documents (token-weighted), for `model` and every checkpoint in
`models`, on one plot. Each checkpoint has its own resumable output folder under `out`.

**short-context**: the first `max_tokens` (2,048) tokens of each held-out document, read at once: M+ against the
checkpoint's memory (`mplus`; `memoryllm` without the long-term memory) and the backbone alone (`backbone`: no
memory, LoRA off, BOS first). Every method predicts the same targets (tokens 2..n from their prefixes). Reported:
the token-weighted mean loss, its perplexity, and the mean of per-document losses (the official validation's).

Both run through the Trainer (one document per step, sharded over ranks; workload.py) and write items.jsonl,
results.json, a plot and TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.eval_sets.datamodules import TextDataModule
from ..data.tokenizer import check_tokenizer
from . import plots
from .config import PositionLossConfig, ShortContextConfig
from .io import ResultStore, write_json
from .runtime import (
    MODES,
    Backbone,
    EvalInputError,
    RunDir,
    default_out,
    encode,
    inject,
    item_generator,
    load_eval_tokenizer,
    load_model_config,
    memory_view,
    resolve_device,
    resolve_dtype,
    start_memory,
)
from .workload import EvalModule, Loaded, run_workload, unique_labels

SHORT_METHODS = (*MODES, "backbone")


def _documents(cfg, task: str) -> TextDataModule:
    if not cfg.data:
        raise EvalInputError(f"{task} needs --data: held-out documents, a .jsonl[.gz|.zst] / .parquet file or a "
                             "folder of them (see mplus_lightning/data/eval_sets/texts.py)")
    limits = [n for n in (cfg.num_documents, cfg.limit) if n is not None]
    data = TextDataModule(cfg.data, text_field=cfg.text_field, limit=min(limits) if limits else None)
    data.setup()
    return data


def _encoder(tokenizer, bos: int | None):
    def enc(text: str) -> list[int]:
        return [t for t in encode(tokenizer, text) if t != bos]
    return enc


# ---- position-loss ------------------------------------------------------------------------------------------------
@torch.no_grad()
def position_losses(model, base, ids: list[int], chunk_tokens: int, bucket_tokens: int,
                    generator: torch.Generator) -> tuple[list[float], list[int]]:
    """(loss sum, tokens) per bucket of `bucket_tokens` positions of one document: chunk by chunk, each scored
    against a copy of `base` holding the chunks before it, then written."""
    buckets = max(1, math.ceil(len(ids) / bucket_tokens))
    sums = torch.zeros(buckets, dtype=torch.float64)
    counts = torch.zeros(buckets, dtype=torch.long)
    mem = start_memory(base, "mplus")
    for start in range(0, len(ids), chunk_tokens):
        end = min(start + chunk_tokens, len(ids))
        inputs = ids[max(start - 1, 0):end]                 # the previous token predicts the chunk's first
        if len(inputs) >= 2:
            logits = model.read(mem, torch.tensor([inputs], device=model.device))[0, :-1].float()
            nll = F.cross_entropy(logits, torch.tensor(inputs[1:], device=logits.device), reduction="none")
            positions = torch.arange(end - len(inputs) + 1, end)
            sums.index_add_(0, positions // bucket_tokens, nll.double().cpu())
            counts.index_add_(0, positions // bucket_tokens, torch.ones_like(positions))
        if end < len(ids):                                   # nothing is scored after the last chunk
            inject(model, mem, ids[start:end], generator)
    return sums.tolist(), counts.tolist()


def run_position_loss(cfg: PositionLossConfig, *, tokenizer=None) -> dict:
    """Loss by position for `cfg.model` and every checkpoint in `cfg.models`; the combined summary."""
    if cfg.chunk_tokens < 1 or cfg.bucket_tokens < 1 or (cfg.max_tokens is not None and cfg.max_tokens < 2):
        raise EvalInputError(f"chunk_tokens and bucket_tokens must be >= 1 and max_tokens >= 2, got "
                             f"{cfg.chunk_tokens}, {cfg.bucket_tokens}, {cfg.max_tokens}")
    paths = [cfg.model, *cfg.models]
    labels = list(cfg.labels) or unique_labels(paths)
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise EvalInputError(f"labels must name each of the {len(paths)} checkpoints (model, then models) once, "
                             f"got {list(cfg.labels)}")
    configs = [load_model_config(p) for p in paths]
    data = _documents(cfg, "position-loss")
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, configs[0])
    for path, config in zip(paths[1:], configs[1:]):
        check_tokenizer(tokenizer, int(config.llama["vocab_size"]),
                        fix=f"{path} has another vocabulary: compare checkpoints that share the tokenizer")
    out = Path(cfg.out or default_out("position-loss", cfg.model))
    device = resolve_device(cfg.device)
    curves, rank_zero = {}, True
    for label, path, config in zip(labels, paths, configs):
        one = dataclasses.replace(cfg, model=path, out=str(out / label.replace("/", "_")))
        fp = dict(model=str(path), tokenizer=str(cfg.tokenizer or cfg.model), data=str(cfg.data),
                  text_field=cfg.text_field, chunk_tokens=cfg.chunk_tokens, max_tokens=cfg.max_tokens,
                  bucket_tokens=cfg.bucket_tokens, seed=cfg.seed, dtype=str(resolve_dtype(cfg.dtype, device)))
        run = RunDir(one.out, "position-loss", one, fp, ("id",), overwrite=cfg.overwrite, data_files=data.files(),
                     create=False)
        module = PositionLossEvaluation(one, run, label=label, bos=config.llama.get("bos_token_id"),
                                        tokenizer=tokenizer)
        data.todo = None
        curves[label] = run_workload(one, module, data, device)
        rank_zero = module.trainer.is_global_zero
        module.loaded = Loaded()                            # one checkpoint in memory at a time
        del module
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {"task": "position-loss", "data": str(cfg.data), "num_documents": len(data.items),
               "chunk_tokens": cfg.chunk_tokens, "bucket_tokens": cfg.bucket_tokens, "max_tokens": cfg.max_tokens,
               "models": curves}
    summary["table"] = _position_table(summary)
    if rank_zero:
        write_json(out / "results.json", summary)
        plots.position_loss_plot(summary, out / "position_loss.png")
        if cfg.tensorboard:
            _tensorboard(out, {f"position_loss/{label}/loss": list(zip(c["bucket_start"], c["loss"]))
                               for label, c in curves.items()})
    return summary


def _position_table(summary: dict) -> str:
    curves = summary["models"]
    starts = max((c["bucket_start"] for c in curves.values()), key=len, default=[])
    step = max(1, len(starts) // 8)                        # at most ~8 columns
    cols = list(range(0, len(starts), step))
    lines = ["| checkpoint | mean | " + " | ".join(f"{starts[j] / 1000:g}k" if starts[j] >= 1000 else str(starts[j])
                                                  for j in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for label, c in curves.items():
        cells = [f"{c['loss'][j]:.3f}" if j < len(c["loss"]) and c["loss"][j] is not None else "-" for j in cols]
        lines.append(f"| {label} | {c['mean_loss']:.3f} | " + " | ".join(cells) + " |")
    return (f"position-loss (next-token loss by position; {summary['num_documents']} documents, chunks of "
            f"{summary['chunk_tokens']} tokens)\n\n" + "\n".join(lines))


class PositionLossEvaluation(EvalModule):
    """One record per document: loss sums and token counts per position bucket."""


    def __init__(self, cfg: PositionLossConfig, run: RunDir, *, label: str, bos: int | None, **loaded):
        super().__init__(cfg, run, **loaded)
        self.label, self.enc = label, _encoder(loaded["tokenizer"], bos)

    def todo(self, key: tuple, done: ResultStore) -> list[str]:
        return [] if key in done else ["loss"]

    def evaluate(self, row: dict, todo: list[str]) -> Iterator[dict]:
        ids = self.enc(row["text"])[: self.cfg.max_tokens]
        gen = item_generator(self.cfg.seed, "position-loss", row["id"])
        sums, counts = position_losses(self.model, self.memory, ids, self.cfg.chunk_tokens, self.cfg.bucket_tokens,
                                       gen)
        yield {"id": row["id"], "index": row["position"], "tokens": len(ids), "loss_sum": sums, "count": counts}

    def order(self, record: dict) -> tuple:
        return (self.position((record["id"],)),)

    def summarize(self) -> dict:
        recs = [r for r in self.run.store.records.values() if (r["id"],) in self.positions]
        width = max((len(r["count"]) for r in recs), default=0)
        sums, counts = [0.0] * width, [0] * width
        for r in recs:
            for b, (s, n) in enumerate(zip(r["loss_sum"], r["count"])):
                sums[b] += s
                counts[b] += n
        total = sum(counts)
        curve = {"model": str(self.cfg.model), "num_documents": len(recs),
                 "bucket_start": [b * self.cfg.bucket_tokens for b in range(width)],
                 "loss": [s / n if n else None for s, n in zip(sums, counts)], "tokens": counts,
                 "mean_loss": sum(sums) / total if total else float("nan"),
                 "new_items": self.num_todo, "skipped_items": self.num_items - self.num_todo}
        write_json(self.run.file("results.json"), curve)
        return curve


# ---- short-context ------------------------------------------------------------------------------------------------
def run_short_context(cfg: ShortContextConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    """M+ (and/or MemoryLLM mode) against the backbone on the same short inputs; the summary."""
    bad = [m for m in cfg.methods if m not in SHORT_METHODS]
    if bad or not cfg.methods:
        raise EvalInputError(f"methods must be a non-empty subset of {list(SHORT_METHODS)}, got {list(cfg.methods)}")
    if cfg.max_tokens < 2:
        raise EvalInputError(f"max_tokens must be >= 2 (a loss needs a target), got {cfg.max_tokens}")
    config = model.config if model is not None else load_model_config(cfg.model)
    device = model.device if model is not None else resolve_device(cfg.device)
    dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
    data = _documents(cfg, "short-context")
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, config)
    methods = list(dict.fromkeys(cfg.methods))
    if not config.has_ltm and "mplus" in methods:
        methods = [m for m in methods if m != "mplus"] or ["memoryllm"]
    fp = dict(model=str(cfg.model), tokenizer=str(cfg.tokenizer or cfg.model), data=str(cfg.data),
              text_field=cfg.text_field, max_tokens=cfg.max_tokens, dtype=str(dtype))
    run = RunDir(cfg.out or default_out("short-context", cfg.model), "short-context", cfg, fp, ("method", "id"),
                 overwrite=cfg.overwrite, data_files=data.files(), create=False)
    module = ShortContextEvaluation(cfg, run, methods=methods, bos=config.llama.get("bos_token_id"), model=model,
                                    memory=memory, tokenizer=tokenizer)
    return run_workload(cfg, module, data, device)


class ShortContextEvaluation(EvalModule):
    """One record per document and method: the loss sum over its targets and their number."""


    def __init__(self, cfg: ShortContextConfig, run: RunDir, *, methods: list[str], bos: int | None, **loaded):
        super().__init__(cfg, run, **loaded)
        self.methods, self.enc = methods, _encoder(loaded["tokenizer"], bos)

    def todo(self, key: tuple, done: ResultStore) -> list[str]:
        return [m for m in self.methods if (m, *key) not in done]

    def on_predict_start(self) -> None:
        self.backbone = Backbone(self.model)

    @torch.no_grad()
    def evaluate(self, row: dict, todo: list[str]) -> Iterator[dict]:
        ids = self.enc(row["text"])[: self.cfg.max_tokens]
        for method in todo:
            loss_sum = 0.0
            if len(ids) >= 2:
                if method == "backbone":     # [BOS] + ids: index i predicts token i + 1; drop BOS's prediction
                    logits = self.backbone.forward_logits(ids)[0, 1:-1]
                else:
                    view = memory_view(self.memory, method)
                    logits = self.model.read(view, torch.tensor([ids], device=self.model.device))[0, :-1]
                targets = torch.tensor(ids[1:], device=logits.device)
                loss_sum = float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            yield {"method": method, "id": row["id"], "index": row["position"], "tokens": max(len(ids) - 1, 0),
                   "loss_sum": loss_sum}

    def order(self, record: dict) -> tuple:
        return self.position((record["id"],)), SHORT_METHODS.index(record["method"])

    def summarize(self) -> dict:
        ids = [k for k, _ in sorted(self.positions.items(), key=lambda kv: kv[1])]
        scores = {}
        for m in self.methods:
            recs = [r for r in (self.run.store.get((m, *k)) for k in ids) if r and r["tokens"]]
            tokens = sum(r["tokens"] for r in recs)
            loss = sum(r["loss_sum"] for r in recs) / tokens if tokens else float("nan")
            scores[m] = {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
                         "document_loss": sum(r["loss_sum"] / r["tokens"] for r in recs) / len(recs) if recs
                         else float("nan"), "documents": len(recs), "tokens": tokens}
        lines = ["| method | loss | perplexity | mean per-document loss | documents | tokens |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {s['loss']:.4f} | {s['perplexity']:.3f} | {s['document_loss']:.4f} | {s['documents']} | "
                  f"{s['tokens']} |" for m, s in scores.items()]
        docs = max((s["documents"] for s in scores.values()), default=0)
        summary = {"task": "short-context", "model": str(self.cfg.model), "data": str(self.cfg.data),
                   "max_tokens": self.cfg.max_tokens, "num_documents": docs, "methods": scores,
                   "new_items": self.num_todo, "skipped_items": self.num_items - self.num_todo,
                   "table": f"short-context (inputs <= {self.cfg.max_tokens} tokens)\n\n" + "\n".join(lines)}
        write_json(self.run.file("results.json"), summary)
        (self.run.file("results.md")).write_text(summary["table"] + "\n")
        plots.short_context_plot(summary, self.run.file("short_context.png"))
        if self.cfg.tensorboard:
            _tensorboard(self.run.path, {f"short_context/{m}/{k}": [(0, s[k])] for m, s in scores.items()
                                         for k in ("loss", "perplexity", "document_loss")})
        return summary


def _tensorboard(out: Path, series: dict[str, list[tuple[int, float | None]]]) -> None:
    """Scalars {tag: [(step, value)]} into out/tensorboard, rewritten whole (None values left out)."""
    from torch.utils.tensorboard import SummaryWriter

    tb = Path(out) / "tensorboard"
    shutil.rmtree(tb, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tb))
    for tag, points in series.items():
        for step, value in points:
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, value, global_step=step)
    writer.close()

"""Long-context QA: LongBook QA / Event-QA (InfiniteBench) and LongBench (paper Fig. 2, Tables 2-3).

Per item the whole prompt (template with context and question) is tokenized and split by `build_long_input`: the
tail stays in the generation window, the rest is injected into a copy of the checkpoint memory in chunks, oldest
first; then greedy decoding with the per-dataset number of new tokens, scored by QA-F1 against the best gold answer.

Methods: `mplus` (reads with the long-term memory), `memoryllm` (the same injections, read without it; both are
scored from one injection stream when both are asked for), and `window`: the backbone alone (LoRA off, no memory)
on the last `baseline_max_length - max_new_tokens` tokens of the same prompt, BOS first.

Scores: LongBench per subset = 100 x mean QA-F1 rounded to 2 decimals, Avg = mean of the subsets (paper Tables 2-3);
LongBook QA = mean QA-F1 on 0-1 (paper Fig. 2); Event-QA = accuracy.
Items come from `LongBookDataModule` / `LongBenchDataModule` and run through the Trainer (`LongQAEvaluation`,
workload.py), sharded over ranks. Outputs: items.jsonl (resumable), results.json, results.md (the table),
tensorboard/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.eval_sets.datamodules import EvalDataModule, LongBenchDataModule, LongBookDataModule
from ..data.eval_sets.longbench import build_long_input, truncate
from ..data.eval_sets.longbook import LETTERS
from .config import LongBenchConfig, LongBookConfig, LongContextConfig
from .io import ResultStore, write_json
from .metrics import longbench_score, qa_f1
from .runtime import (
    MODES,
    Backbone,
    EvalInputError,
    RunDir,
    decode,
    default_out,
    encode,
    generate_ids,
    inject,
    item_generator,
    load_eval_tokenizer,
    load_model_config,
    memory_view,
    resolve_device,
    resolve_dtype,
    start_memory,
)
from .workload import EvalModule, run_workload

METHODS = (*MODES, "window")


@dataclass
class Work:
    """One item as its step sees it (a row of the DataModule)."""

    subset: str
    id: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    options: list[str] | None = None      # event QA
    answer_index: int | None = None       # event QA

    @classmethod
    def from_row(cls, row: dict) -> Work:
        options = list(row["options"]) or None
        return cls(row["subset"], row["id"], row["prompt"], list(row["answers"]), row["max_new_tokens"], options,
                   row["answer_index"] if options else None)


def _check_methods(cfg: LongContextConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise EvalInputError(f"methods must be a non-empty subset of {list(METHODS)}, got {list(cfg.methods)}")


def run_longbench(cfg: LongBenchConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    if not cfg.data:
        raise EvalInputError("longbench needs --data: the directory of LongBench's {subset}.jsonl files")
    _check_methods(cfg)
    data = LongBenchDataModule(cfg.data, subsets=cfg.subsets, prompts=cfg.prompts,
                               max_new_tokens=dict(cfg.max_new_tokens), limit=cfg.limit)
    baseline = cfg.baseline_max_length or cfg.max_length
    fp = dict(data=str(cfg.data), prompts={s: data.prompts[s] for s in data.data}, max_length=cfg.max_length,
              baseline_max_length=baseline, max_new_tokens=dict(cfg.max_new_tokens))
    return _run(cfg, "longbench", data, fp, cfg.max_length, baseline, model, memory, tokenizer)


def run_longbook(cfg: LongBookConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    if not cfg.data:
        raise EvalInputError("longbook needs --data: longbook_qa_eng.jsonl (or the Event-QA JSONL with task=event_qa)")
    _check_methods(cfg)
    if cfg.task == "event_qa" and cfg.event_scoring not in ("letter", "loglik"):
        raise EvalInputError(f"event_scoring must be letter or loglik, got {cfg.event_scoring!r}")
    data = LongBookDataModule(cfg.data, task=cfg.task, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                              limit=cfg.limit)
    fp = dict(data=str(cfg.data), task=cfg.task, template=data.template, max_length=cfg.max_length,
              baseline_max_length=cfg.baseline_max_length, max_new_tokens=cfg.max_new_tokens,
              event_scoring=cfg.event_scoring)
    return _run(cfg, "longbook", data, fp, cfg.max_length, cfg.baseline_max_length, model, memory, tokenizer)


def _run(cfg: LongContextConfig, task: str, data: EvalDataModule, fp: dict, max_length, baseline_max_length,
         model, memory, tokenizer) -> dict:
    config = model.config if model is not None else load_model_config(cfg.model)
    device = model.device if model is not None else resolve_device(cfg.device)
    dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, config)
    data.setup()
    methods = list(dict.fromkeys(cfg.methods))
    if not config.has_ltm and "mplus" in methods:
        methods = [m for m in methods if m != "mplus"] or ["memoryllm"]
    fp.update(model=str(cfg.model), tokenizer=str(cfg.tokenizer or cfg.model), window_tokens=cfg.window_tokens,
              chunk_tokens=cfg.chunk_tokens, min_chunk_tokens=cfg.min_chunk_tokens, truncation=cfg.truncation,
              truncate_at_newline=cfg.truncate_at_newline, seed=cfg.seed, dtype=str(dtype))
    run = RunDir(cfg.out or default_out(task, cfg.model), task, cfg, fp, ("method", "subset", "id"),
                 overwrite=cfg.overwrite, data_files=data.files(), create=False)
    module = LongQAEvaluation(cfg, run, task=task, methods=methods, max_length=max_length,
                              baseline_max_length=baseline_max_length, model=model, memory=memory,
                              tokenizer=tokenizer)
    return run_workload(cfg, module, data, device)


class LongQAEvaluation(EvalModule):
    """Per item: the memory methods from one injection stream of the prompt's older part, then the window
    baseline; one record per method."""

    key_columns = ("subset", "id")

    def __init__(self, cfg: LongContextConfig, run: RunDir, *, task: str, methods: list[str], max_length,
                 baseline_max_length, **loaded):
        super().__init__(cfg, run, **loaded)
        self.task, self.methods = task, methods
        self.max_length, self.baseline_max_length = max_length, baseline_max_length

    def todo(self, key: tuple, done: ResultStore) -> list[str]:
        return [m for m in self.methods if (m, *key) not in done]

    def on_predict_start(self) -> None:
        self.backbone = Backbone(self.model, self.cfg.prefill_block)

    def evaluate(self, row: dict, ms: list[str]) -> Iterator[dict]:
        cfg, tok, model, w = self.cfg, self.loaded.tokenizer, self.model, Work.from_row(row)
        bos = model.llama.config.bos_token_id
        ids = [t for t in encode(tok, w.prompt) if t != bos]
        if not ids:
            raise EvalInputError(f"{w.subset} item {w.id}: the prompt is empty after tokenization")
        gen_len = w.max_new_tokens if w.options is None else _option_budget(tok, w, cfg)
        mem_modes = [m for m in ms if m in MODES]
        if mem_modes:
            li = build_long_input(ids, gen_tokens=gen_len, window_tokens=cfg.window_tokens,
                                  chunk_tokens=cfg.chunk_tokens, max_length=self.max_length,
                                  truncation=cfg.truncation, min_chunk_tokens=cfg.min_chunk_tokens, bos_token_id=bos)
            gen = item_generator(cfg.seed, self.task, w.subset, w.id)
            mem = start_memory(self.memory, "mplus")
            for chunk in tqdm(li.chunks, desc="inject", unit="chunk", leave=False, disable=not cfg.progress):
                inject(model, mem, chunk, gen)
            for m in mem_modes:
                view = memory_view(mem, m)
                rec = _answer(cfg, tok, w, li.window,
                              generate=lambda n, v=view: generate_ids(model, v, li.window, n),
                              last_logits=lambda v=view: model.read(v, _t(model, li.window), logits_to_keep=1)[0, -1],
                              seq_logits=lambda seqs, v=view: [model.read(v, _t(model, s))[0] for s in seqs])
                rec.update(chunks=len(li.chunks), memory_tokens=li.memory_tokens, window_tokens=len(li.window),
                           truncated=li.truncated)
                yield {"method": m, "subset": w.subset, "id": w.id, **rec}
        if "window" in ms:
            limit = self.baseline_max_length
            win = truncate(ids, limit - gen_len, cfg.truncation) if limit else ids
            # the backbone's logits carry the BOS position first: drop it so index i predicts token i+1
            rec = _answer(cfg, tok, w, win, generate=lambda n: self.backbone.generate(win, n),
                          last_logits=lambda: self.backbone.last_logits(win)[0],
                          seq_logits=lambda seqs: [self.backbone.forward_logits(s)[0, 1:] for s in seqs])
            rec.update(window_tokens=len(win), truncated=len(ids) - len(win))
            yield {"method": "window", "subset": w.subset, "id": w.id, **rec}

    def order(self, record: dict) -> tuple:
        return self.position((record["subset"], record["id"])), METHODS.index(record["method"])

    def summarize(self) -> dict:
        data = self.trainer.datamodule
        keys = data.keys(self.key_columns)
        event_qa = bool(len(data.items)) and bool(data.items[0]["options"])
        summary = summarize(self.task, self.run, keys, self.methods, self.cfg, event_qa)
        write_json(self.run.file("results.json"), summary)
        self.run.file("results.md").write_text(summary["table"] + "\n")
        if self.cfg.tensorboard:
            _tensorboard(self.run, self.task, summary)
        return summary


# ---- answering one item ------------------------------------------------------------------------------------------
def _option_budget(tok, w: Work, cfg) -> int:
    """Event-QA: tokens kept free at the end of the window (loglik appends the longest option)."""
    if cfg.event_scoring == "letter":
        return 1
    return max(len(encode(tok, " " + o)) for o in w.options) + 1


def _letter_ids(tok, n: int) -> list[int]:
    out = []
    for letter in LETTERS[:n]:
        ids = encode(tok, " " + letter) or encode(tok, letter)
        out.append(ids[-1] if ids else 0)
    return out


def _t(model, ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=model.device)


def _answer(cfg, tok, w: Work, window: list[int], *, generate, last_logits, seq_logits) -> dict:
    """Generate and score (QA), or choose an option (Event-QA): by the next-token logits of the option letters, or
    by the mean log-likelihood of each option's text after the window."""
    if w.options is None:
        text = decode(tok, generate(w.max_new_tokens))
        scored = text.lstrip("\n").split("\n")[0] if cfg.truncate_at_newline else text
        return {"prediction": text, "qa_f1": qa_f1(scored, w.answers), "answers": w.answers}
    if cfg.event_scoring == "letter":
        logits = last_logits().float()
        letters = _letter_ids(tok, len(w.options))
        choice = int(torch.argmax(logits[letters]))
        values = logits[letters].tolist()
    else:
        opts = [encode(tok, " " + o) for o in w.options]
        values = []
        for logits, opt in zip(seq_logits([window + o for o in opts]), opts):
            logp = torch.log_softmax(logits.float(), -1)
            pos = torch.arange(len(window) - 1, len(window) - 1 + len(opt), device=logp.device)
            values.append(float(logp[pos, torch.tensor(opt, device=logp.device)].mean()))
        choice = max(range(len(values)), key=values.__getitem__)
    return {"prediction": LETTERS[choice], "choice": choice, "answer_index": w.answer_index,
            "correct": int(choice == w.answer_index), "scores": values}


# ---- results -----------------------------------------------------------------------------------------------------
def summarize(task: str, run: RunDir, keys: list[tuple[str, str]], methods: list[str], cfg, event_qa: bool) -> dict:
    """Scores per method and subset over the finished items (`keys`: (subset, id) in item order)."""
    subsets = list(dict.fromkeys(s for s, _ in keys))
    scores: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for m in methods:
        scores[m], counts[m] = {}, {}
        for s in subsets:
            recs = [run.store.get((m, subset, i)) for subset, i in keys if subset == s]
            recs = [r for r in recs if r]
            counts[m][s] = len(recs)
            if not recs:
                continue
            if "correct" in recs[0]:
                scores[m][s] = round(sum(r["correct"] for r in recs) / len(recs), 4)
            elif task == "longbench":
                scores[m][s] = longbench_score([r["qa_f1"] for r in recs])
            else:
                scores[m][s] = round(sum(r["qa_f1"] for r in recs) / len(recs), 4)
        if scores[m]:
            vals = list(scores[m].values())
            scores[m]["avg"] = round(sum(vals) / len(vals), 2 if task == "longbench" else 4)
    scale = "QA-F1 x100" if task == "longbench" else ("accuracy" if event_qa else "QA-F1 (0-1)")
    header = ["method", *subsets] + (["Avg"] if len(subsets) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        row = [m] + [f"{scores[m][s]}" if s in scores[m] else "-" for s in subsets]
        if len(subsets) > 1:
            row.append(f"{scores[m]['avg']}" if "avg" in scores[m] else "-")
        lines.append("| " + " | ".join(row) + " |")
    table = f"{task} ({scale}; items per subset: {counts[methods[0]] if methods else {}})\n\n" + "\n".join(lines)
    return {"task": task, "model": str(cfg.model), "scale": scale, "scores": scores, "counts": counts,
            "table": table}


def _tensorboard(run: RunDir, task: str, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tb = run.file("tensorboard")
    shutil.rmtree(tb, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tb))
    for m, per in summary["scores"].items():
        for s, v in per.items():
            writer.add_scalar(f"{task}/{m}/{s}", v, global_step=0)
    writer.add_text(f"{task}/table", summary["table"])
    writer.close()

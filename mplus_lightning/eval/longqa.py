"""Long-context QA: LongBook QA / Event-QA (InfiniteBench) and LongBench (paper Fig. 2, Tables 2-3).

Per item the whole prompt (template with context and question) is tokenized and split by `build_long_input`: the
tail stays in the generation window, the rest is injected into a copy of the checkpoint memory in chunks, oldest
first; then greedy decoding with the per-dataset number of new tokens, scored by QA-F1 against the best gold answer.

Methods: `mplus` (reads with the long-term memory), `memoryllm` (the same injections, read without it; both are
scored from one injection stream when both are asked for), and `window`: the backbone alone (LoRA off, no memory)
on the last `baseline_max_length - max_new_tokens` tokens of the same prompt, BOS first.

Scores: LongBench per subset = 100 x mean QA-F1 rounded to 2 decimals, Avg = mean of the subsets (paper Tables 2-3);
LongBook QA = mean QA-F1 on 0-1 (paper Fig. 2); Event-QA = accuracy.
Outputs: items.jsonl (resumable), results.json, results.md (the table), tensorboard/.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data.longbench import build_long_input, load_prompts, longbench_files, read_longbench, truncate
from .data.longbook import EVENT_TEMPLATE, LETTERS, QA_TEMPLATE, longbook_file, read_event_qa, read_longbook_qa
from .config import LongBenchConfig, LongBookConfig, LongContextConfig
from .io import write_json
from .metrics import longbench_score, qa_f1
from .runtime import (MODES, Backbone, EvalInputError, RunDir, decode, default_out, encode, generate_ids, inject,
                      item_generator, load_checkpoint, load_eval_tokenizer, memory_view, resolve_device, resolve_dtype,
                      start_memory)

METHODS = (*MODES, "window")


@dataclass
class Work:
    subset: str
    id: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    options: list[str] | None = None      # event QA
    answer_index: int | None = None       # event QA


def _setup(cfg: LongContextConfig, model, memory, tokenizer):
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise EvalInputError(f"methods must be a non-empty subset of {list(METHODS)}, got {list(cfg.methods)}")
    if model is None:
        device = resolve_device(cfg.device)
        model, memory = load_checkpoint(cfg.model, device, resolve_dtype(cfg.dtype, device))
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, model)
    methods = list(dict.fromkeys(cfg.methods))
    if not model.config.has_ltm and "mplus" in methods:
        methods = [m for m in methods if m != "mplus"] or ["memoryllm"]
    return model, memory, tokenizer, methods


def run_longbench(cfg: LongBenchConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    if not cfg.data:
        raise EvalInputError("longbench needs --data: the directory of LongBench's {subset}.jsonl files")
    data = read_longbench(cfg.data, cfg.subsets)
    prompts = load_prompts(cfg.prompts)
    missing = [s for s in data if s not in prompts or s not in cfg.max_new_tokens]
    if missing:
        raise EvalInputError(f"no prompt template / max_new_tokens for subset(s) {missing} (set prompts=FILE and "
                             "max_new_tokens.<subset>=N)")
    work = []
    for subset, items in data.items():
        for it in items[: cfg.limit] if cfg.limit is not None else items:
            work.append(Work(subset, it.id, it.prompt(prompts[subset]), it.answers, cfg.max_new_tokens[subset]))
    baseline = cfg.baseline_max_length or cfg.max_length
    fp = dict(data=str(cfg.data), prompts={s: prompts[s] for s in data}, max_length=cfg.max_length,
              baseline_max_length=baseline, max_new_tokens=dict(cfg.max_new_tokens))
    return _run(cfg, "longbench", work, fp, cfg.max_length, baseline, model, memory, tokenizer,
                data_files=longbench_files(cfg.data, list(data)))


def run_longbook(cfg: LongBookConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    if not cfg.data:
        raise EvalInputError("longbook needs --data: longbook_qa_eng.jsonl (or the Event-QA JSONL with task=event_qa)")
    if cfg.task == "qa":
        template = cfg.template or QA_TEMPLATE
        items = read_longbook_qa(cfg.data)
        items = items[: cfg.limit] if cfg.limit is not None else items
        work = [Work("longbook_qa", it.id, it.prompt(template), it.answers, cfg.max_new_tokens) for it in items]
    elif cfg.task == "event_qa":
        if cfg.event_scoring not in ("letter", "loglik"):
            raise EvalInputError(f"event_scoring must be letter or loglik, got {cfg.event_scoring!r}")
        template = cfg.template or EVENT_TEMPLATE
        items = read_event_qa(cfg.data)
        items = items[: cfg.limit] if cfg.limit is not None else items
        work = [Work("longbook_event_qa", it.id, it.prompt(template), [it.options[it.answer]], 0, it.options,
                     it.answer) for it in items]
    else:
        raise EvalInputError(f"longbook task must be qa or event_qa, got {cfg.task!r}")
    fp = dict(data=str(cfg.data), task=cfg.task, template=template, max_length=cfg.max_length,
              baseline_max_length=cfg.baseline_max_length, max_new_tokens=cfg.max_new_tokens,
              event_scoring=cfg.event_scoring)
    return _run(cfg, "longbook", work, fp, cfg.max_length, cfg.baseline_max_length, model, memory, tokenizer,
                data_files={"data": longbook_file(cfg.data, cfg.task)})


def _run(cfg: LongContextConfig, task: str, work: list[Work], fp: dict, max_length, baseline_max_length,
         model, memory, tokenizer, data_files: dict) -> dict:
    model, memory, tok, methods = _setup(cfg, model, memory, tokenizer)
    fp.update(model=str(cfg.model), tokenizer=str(cfg.tokenizer or cfg.model), window_tokens=cfg.window_tokens,
              chunk_tokens=cfg.chunk_tokens, min_chunk_tokens=cfg.min_chunk_tokens, truncation=cfg.truncation,
              truncate_at_newline=cfg.truncate_at_newline, seed=cfg.seed, dtype=str(model.dtype))
    run = RunDir(cfg.out or default_out(task, cfg.model), task, cfg, fp, ("method", "subset", "id"),
                 overwrite=cfg.overwrite, data_files=data_files)
    store = run.store
    backbone = Backbone(model, cfg.prefill_block)
    bos = model.llama.config.bos_token_id
    todo = [(w, [m for m in methods if (m, w.subset, w.id) not in store]) for w in work]
    todo = [(w, ms) for w, ms in todo if ms]
    bar = tqdm(total=sum(len(ms) for _, ms in todo), desc=task, unit="answer", disable=not cfg.progress)
    for w, ms in todo:
        ids = [t for t in encode(tok, w.prompt) if t != bos]
        if not ids:
            raise EvalInputError(f"{w.subset} item {w.id}: the prompt is empty after tokenization")
        gen_len = w.max_new_tokens if w.options is None else _option_budget(tok, w, cfg)
        mem_modes = [m for m in ms if m in MODES]
        if mem_modes:
            li = build_long_input(ids, gen_tokens=gen_len, window_tokens=cfg.window_tokens,
                                  chunk_tokens=cfg.chunk_tokens, max_length=max_length, truncation=cfg.truncation,
                                  min_chunk_tokens=cfg.min_chunk_tokens, bos_token_id=bos)
            gen = item_generator(cfg.seed, task, w.subset, w.id)
            mem = start_memory(memory, "mplus")
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
                store.add({"method": m, "subset": w.subset, "id": w.id, **rec})
                bar.update(1)
        if "window" in ms:
            win = truncate(ids, baseline_max_length - gen_len, cfg.truncation) if baseline_max_length else ids
            # the backbone's logits carry the BOS position first: drop it so index i predicts token i+1
            rec = _answer(cfg, tok, w, win, generate=lambda n: backbone.generate(win, n),
                          last_logits=lambda: backbone.last_logits(win)[0],
                          seq_logits=lambda seqs: [backbone.forward_logits(s)[0, 1:] for s in seqs])
            rec.update(window_tokens=len(win), truncated=len(ids) - len(win))
            store.add({"method": "window", "subset": w.subset, "id": w.id, **rec})
            bar.update(1)
    bar.close()
    summary = summarize(task, run, work, methods, cfg)
    write_json(run.file("results.json"), summary)
    run.file("results.md").write_text(summary["table"] + "\n")
    if cfg.tensorboard:
        _tensorboard(run, task, summary)
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
def summarize(task: str, run: RunDir, work: list[Work], methods: list[str], cfg) -> dict:
    subsets = list(dict.fromkeys(w.subset for w in work))
    scores: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for m in methods:
        scores[m], counts[m] = {}, {}
        for s in subsets:
            recs = [run.store.get((m, w.subset, w.id)) for w in work if w.subset == s]
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
    scale = "QA-F1 x100" if task == "longbench" else ("accuracy" if work and work[0].options else "QA-F1 (0-1)")
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

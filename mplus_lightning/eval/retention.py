"""Knowledge retention (the M+ paper's Fig. 3 and 8: SQuAD and NQ against the tokens injected after the context).

Per item: copy the checkpoint memory, inject the context (one chunk, truncated to `context_tokens`), then the same
fixed list of distractors; each time at least `d` tokens have been injected after the context (d in `distances`),
ask the question with greedy decoding and score the first `max_new_tokens` generated tokens by exact hit and QA-F1.
Both memory modes are scored from one injection stream (see runtime.py): M+ reads with its long-term memory,
MemoryLLM mode without. The borderline asks every question against the untouched checkpoint memory.

Theory (MemoryLLM paper §4.5): after t-1 further writes a fraction ((N-K)/N)^(t-1) of a block survives in the
short-term pool, so accuracy decays as a_t = a_b + (a_u - a_b) * ((N-K)/N)^(t-1), a_u = accuracy right after the
context, a_b = borderline (the paper writes only the part above the borderline, (a_u - a_b) * ((N-K)/N)^(t-1)).
Here t-1 is the number of distractor injections, counted per scoring point.

Outputs in `out`: items.jsonl (one line per item and mode, written as it finishes: a rerun resumes), results.json,
retention.png, tensorboard/ (scalars retention/<dataset>/<mode>/<metric> with step = distance in tokens).
With `diagnose`, M+ points also say where the context's rows are and how an oracle retrieval scores (diagnose.py).
"""

from __future__ import annotations

import logging
import shutil
import warnings

import torch
from tqdm.auto import tqdm

from .data.longbench import fill
from .data.retention import DISTRACTOR_MIN_TOKENS, build_distractors, load_retention_set
from . import plots
from .config import RetentionConfig
from .diagnose import diagnose_point, summarize_diagnostics
from .io import write_json
from .metrics import exact_hit, qa_f1
from .runtime import (MODES, EvalInputError, RunDir, decode, default_out, encode, generate_ids, inject,
                      item_generator, load_checkpoint, load_eval_tokenizer, memory_view, resolve_device, resolve_dtype,
                      start_memory)

log = logging.getLogger(__name__)


def _score(tok, pred_ids: list[int], answer: str) -> dict:
    text = decode(tok, pred_ids)
    return {"prediction": text, "exact_hit": int(exact_hit(text, answer)), "qa_f1": qa_f1(text, answer)}


def run_retention(cfg: RetentionConfig, *, model=None, memory=None, tokenizer=None) -> dict:
    """Run (or resume) a retention evaluation; returns the summary also written to results.json."""
    if not cfg.data:
        raise EvalInputError("retention needs --data: a SQuAD, NQ or processed retention directory "
                             "(see mplus_lightning/eval/data/retention.py for the layouts)")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise EvalInputError(f"modes must be a non-empty subset of {list(MODES)}, got {cfg.modes}")
    distances = sorted({int(d) for d in cfg.distances})
    if not distances or distances[0] < 0:
        raise EvalInputError(f"distances must be non-negative token counts, got {cfg.distances}")
    rset = load_retention_set(cfg.data, dataset=cfg.dataset, index=cfg.index, num_items=cfg.num_items,
                              distractors=cfg.distractors, distractor_path=cfg.distractor_path,
                              context_template=cfg.context_template, question_template=cfg.question_template)
    if model is None:
        device = resolve_device(cfg.device)
        model, memory = load_checkpoint(cfg.model, device, resolve_dtype(cfg.dtype, device))
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, model)
    bos = model.llama.config.bos_token_id

    def enc(text: str) -> list[int]:
        return [t for t in encode(tokenizer, text) if t != bos]

    modes = list(dict.fromkeys(cfg.modes))
    if not model.config.has_ltm and "mplus" in modes:
        log.warning("%s is a MemoryLLM checkpoint (no long-term memory): only the memoryllm mode is run", cfg.model)
        modes = [m for m in modes if m != "mplus"] or ["memoryllm"]

    # The same distractor list for every item (official test script), as token ids.
    min_tokens = cfg.distractor_min_tokens
    if min_tokens is None:
        min_tokens = DISTRACTOR_MIN_TOKENS[rset.distractor_source]
    distractors = build_distractors(rset.distractor_texts(), enc, total_tokens=distances[-1],
                                    min_tokens=min_tokens, max_tokens=cfg.distractor_tokens)
    available = sum(len(d) for d in distractors)
    if available < distances[-1]:
        reachable = [d for d in distances if d <= available]
        warnings.warn(f"{rset.distractor_path} yields only {available} distractor tokens: distances "
                      f"{[d for d in distances if d > available]} are dropped", stacklevel=2)
        distances = reachable
        if not distances:
            raise EvalInputError(f"no distance is reachable with {available} distractor tokens")

    items = rset.items[: cfg.limit] if cfg.limit is not None else rset.items
    fingerprint = dict(model=str(cfg.model), tokenizer=str(cfg.tokenizer or cfg.model), files=rset.files,
                       dataset=rset.name, distractors=rset.distractor_source, distractor_min_tokens=min_tokens,
                       distractor_tokens=cfg.distractor_tokens, distances=distances, context_tokens=cfg.context_tokens,
                       context_template=rset.context_template, question_template=rset.question_template,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, dtype=str(model.dtype),
                       diagnose=cfg.diagnose)
    run = RunDir(cfg.out or default_out("retention", cfg.model), "retention", cfg, fingerprint, ("kind", "id"),
                 overwrite=cfg.overwrite, data_files=rset.files)
    store = run.store

    def pending(item) -> list[str]:
        kinds = (["borderline"] if cfg.borderline else []) + modes
        return [k for k in kinds if (k, item.id) not in store]

    todo = [(i, it) for i, it in enumerate(items) if pending(it)]
    skipped = len(items) - len(todo)
    bar = tqdm(total=len(todo), desc=f"retention {rset.name}", unit="item", disable=not cfg.progress)
    for index, item in todo:
        kinds = pending(item)
        ctx_ids = enc(fill(rset.context_template, context=item.context))[: cfg.context_tokens]
        q_ids = enc(fill(rset.question_template, question=item.question))
        if not ctx_ids or not q_ids:
            raise EvalInputError(f"item {item.id}: empty context or question after tokenization")
        if "borderline" in kinds:
            pred = generate_ids(model, memory, q_ids, cfg.max_new_tokens)
            store.add({"kind": "borderline", "id": item.id, "index": index, "answer": item.answer,
                       **_score(tokenizer, pred, item.answer)})
        todo_modes = [k for k in kinds if k in MODES]
        if todo_modes:
            points = _retention_item(model, memory, tokenizer, cfg, index, item, ctx_ids, q_ids, distractors,
                                     distances, todo_modes)
            for mode in todo_modes:
                store.add({"kind": mode, "id": item.id, "index": index, "question": item.question,
                           "answer": item.answer, "points": points[mode]})
        bar.update(1)
    bar.close()
    summary = summarize(run, items, modes, distances, cfg, rset.name, model)
    summary.update(new_items=len(todo), skipped_items=skipped)
    write_json(run.file("results.json"), summary)
    plots.retention_plot(summary, run.file("retention.png"))
    if cfg.tensorboard:
        _tensorboard(run, summary)
    return summary


def _retention_item(model, base, tok, cfg, index, item, ctx_ids, q_ids, distractors, distances, modes) -> dict:
    """Inject the context then distractors into a copy of `base`; score every mode at every distance."""
    gen = item_generator(cfg.seed, "retention", item.id)
    mem = start_memory(base, "mplus")
    context_rows = None
    if cfg.diagnose and "mplus" in modes and mem.ltm is not None:
        with warnings.catch_warnings(), torch.no_grad():   # the rows the injection below writes (deterministic)
            warnings.filterwarnings("ignore", message="writing a chunk of")
            context_rows = model.write(mem, torch.tensor([ctx_ids], device=model.device))
    inject(model, mem, ctx_ids, gen)
    points: dict[str, list] = {m: [] for m in modes}
    injected = count = 0
    inner = tqdm(total=distances[-1], desc="distractor tokens", unit="tok", leave=False,
                 disable=not cfg.progress)
    for d in distances:
        while injected < d:
            chunk = distractors[count]
            inject(model, mem, chunk, gen)
            injected += len(chunk)
            count += 1
            inner.update(len(chunk))
        for m in modes:
            pred = generate_ids(model, memory_view(mem, m), q_ids, cfg.max_new_tokens)
            points[m].append({"distance": d, "tokens": injected, "injections": count,
                              **_score(tok, pred, item.answer)})
            if m == "mplus" and context_rows is not None:
                points[m][-1].update(diagnose_point(model, mem, context_rows, q_ids, cfg.max_new_tokens,
                                                    lambda ids: _score(tok, ids, item.answer)))
    inner.close()
    return points


def summarize(run: RunDir, items, modes, distances, cfg, dataset: str, model) -> dict:
    """Per-distance means over the finished items (in item order)."""
    store = run.store
    out: dict = {"task": "retention", "dataset": dataset, "model": str(cfg.model), "num_items": 0,
                 "distances": distances, "modes": {}, "borderline": None, "theory": {}}
    if cfg.borderline:
        recs = [store.get(("borderline", it.id)) for it in items]
        recs = [r for r in recs if r]
        if recs:
            out["borderline"] = {"exact_hit": sum(r["exact_hit"] for r in recs) / len(recs),
                                 "qa_f1": sum(r["qa_f1"] for r in recs) / len(recs), "n": len(recs)}
    N, K = model.config.stm_rows, model.config.num_tokens
    for mode in modes:
        recs = [store.get((mode, it.id)) for it in items]
        recs = [r for r in recs if r]
        if not recs:
            continue
        n = len(recs)
        curve = {"distances": distances, "n": n,
                 "exact_hit": [sum(r["points"][j]["exact_hit"] for r in recs) / n for j in range(len(distances))],
                 "qa_f1": [sum(r["points"][j]["qa_f1"] for r in recs) / n for j in range(len(distances))],
                 "tokens": [recs[0]["points"][j]["tokens"] for j in range(len(distances))],
                 "injections": [recs[0]["points"][j]["injections"] for j in range(len(distances))]}
        diagnostics = summarize_diagnostics([r["points"] for r in recs])
        if diagnostics:
            curve["diagnostics"] = diagnostics
        out["modes"][mode] = curve
        out["num_items"] = max(out["num_items"], n)
        base = out["borderline"] or {"exact_hit": 0.0, "qa_f1": 0.0}
        r = (N - K) / N
        t0 = curve["injections"][0]
        out["theory"][mode] = {"N": N, "K": K, "formula": "a_b + (a_u - a_b) * ((N-K)/N)^(t-1)", **{
            metric: [base[metric] + (curve[metric][0] - base[metric]) * r ** (t - t0) for t in curve["injections"]]
            for metric in ("exact_hit", "qa_f1")}}
    return out


def _tensorboard(run: RunDir, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tb = run.file("tensorboard")
    shutil.rmtree(tb, ignore_errors=True)   # rewritten whole at the end of every (resumed) run
    writer = SummaryWriter(log_dir=str(tb))
    ds = summary["dataset"]
    for mode, curve in summary["modes"].items():
        for j, d in enumerate(curve["distances"]):
            for metric in ("exact_hit", "qa_f1"):
                writer.add_scalar(f"retention/{ds}/{mode}/{metric}", curve[metric][j], global_step=d)
                writer.add_scalar(f"retention/{ds}/{mode}/theory_{metric}", summary["theory"][mode][metric][j],
                                  global_step=d)
                if "diagnostics" in curve:
                    writer.add_scalar(f"retention/{ds}/{mode}/oracle_{metric}",
                                      curve["diagnostics"][f"oracle_{metric}"][j], global_step=d)
    if summary["borderline"]:
        for d in summary["distances"]:
            for metric in ("exact_hit", "qa_f1"):
                writer.add_scalar(f"retention/{ds}/borderline/{metric}", summary["borderline"][metric], global_step=d)
    writer.close()

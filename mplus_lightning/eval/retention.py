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

Items run through the Trainer (`RetentionEvaluation`, workload.py): each rank takes its share of the items of the
`RetentionDataModule`; the outputs do not depend on the number of ranks.

Outputs in `out`: items.jsonl (one line per item and mode, written as it finishes: a rerun resumes), results.json,
retention.png, tensorboard/ (scalars retention/<dataset>/<mode>/<metric> with step = distance in tokens).
With `diagnose`, M+ points also say where the context's rows are and how an oracle retrieval scores (diagnose.py),
and results.json's `recall`, recall.png and the scalars recall/<dataset>/* give the retriever's recall of the
context's long-term rows by distance (paper Fig. 6; the `recall` task is this run with diagnose on).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ..data.eval_sets.datamodules import RetentionDataModule
from ..data.eval_sets.retention import RetentionItem
from ..model.configuration import MPlusConfig
from . import plots
from .config import RetentionConfig
from .diagnose import diagnose_point, summarize_diagnostics, summarize_recall
from .io import ResultStore, write_json
from .metrics import exact_hit, qa_f1
from .runtime import (
    MODES,
    EvalInputError,
    RunDir,
    decode,
    default_out,
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

log = logging.getLogger(__name__)
KINDS = ("borderline", *MODES)
"""Record kinds of an item, in the order they are written."""


def _score(tok, pred_ids: list[int], answer: str) -> dict:
    text = decode(tok, pred_ids)
    return {"prediction": text, "exact_hit": int(exact_hit(text, answer)), "qa_f1": qa_f1(text, answer)}


def run_retention(cfg: RetentionConfig, *, model=None, memory=None, tokenizer=None, task: str = "retention") -> dict:
    """Run (or resume) a retention evaluation through the Trainer (sharded over `cfg.devices` x `cfg.num_nodes`
    processes); returns the summary also written to results.json. `task="recall"` writes to the recall task's
    default output directory."""
    if not cfg.data:
        raise EvalInputError(f"{task} needs --data: a SQuAD, NQ or processed retention directory "
                             "(see mplus_lightning/data/eval_sets/retention.py for the layouts)")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise EvalInputError(f"modes must be a non-empty subset of {list(MODES)}, got {cfg.modes}")
    distances = sorted({int(d) for d in cfg.distances})
    if not distances or distances[0] < 0:
        raise EvalInputError(f"distances must be non-negative token counts, got {cfg.distances}")
    config = model.config if model is not None else load_model_config(cfg.model)
    device = model.device if model is not None else resolve_device(cfg.device)
    dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
    if tokenizer is None:
        tokenizer = load_eval_tokenizer(cfg, config)
    data = RetentionDataModule(
        cfg.data, dataset=cfg.dataset, index=cfg.index, num_items=cfg.num_items, limit=cfg.limit,
        distractors=cfg.distractors, distractor_path=cfg.distractor_path, context_template=cfg.context_template,
        question_template=cfg.question_template, tokenizer=tokenizer, bos_token_id=config.llama.get("bos_token_id"),
        context_tokens=cfg.context_tokens, distractor_tokens=cfg.distractor_tokens,
        distractor_min_tokens=cfg.distractor_min_tokens, distractor_total=distances[-1])
    rset = data.set
    data.setup()

    modes = list(dict.fromkeys(cfg.modes))
    if not config.has_ltm and "mplus" in modes:
        log.warning("%s is a MemoryLLM checkpoint (no long-term memory): only the memoryllm mode is run", cfg.model)
        modes = [m for m in modes if m != "mplus"] or ["memoryllm"]

    # The same distractor list for every item (official test script), as token ids.
    available = sum(len(d) for d in data.distractors["ids"])
    if available < distances[-1]:
        reachable = [d for d in distances if d <= available]
        warnings.warn(f"{rset.distractor_path} yields only {available} distractor tokens: distances "
                      f"{[d for d in distances if d > available]} are dropped", stacklevel=2)
        distances = reachable
        if not distances:
            raise EvalInputError(f"no distance is reachable with {available} distractor tokens")

    fingerprint = dict(model=str(cfg.model), tokenizer=str(cfg.tokenizer or cfg.model), files=rset.files,
                       dataset=rset.name, distractors=rset.distractor_source,
                       distractor_min_tokens=data.distractor_min_tokens, distractor_tokens=cfg.distractor_tokens,
                       distances=distances, context_tokens=cfg.context_tokens,
                       context_template=rset.context_template, question_template=rset.question_template,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, dtype=str(dtype), diagnose=cfg.diagnose)
    run = RunDir(cfg.out or default_out(task, cfg.model), "retention", cfg, fingerprint, ("kind", "id"),
                 overwrite=cfg.overwrite, data_files=rset.files, create=False)
    module = RetentionEvaluation(cfg, run, modes=modes, distances=distances, dataset=rset.name, config=config,
                                 model=model, memory=memory, tokenizer=tokenizer)
    return run_workload(cfg, module, data, device)


class RetentionEvaluation(EvalModule):
    """Per item: the borderline (the question against the untouched checkpoint memory), then one injection stream
    scored in every mode at every distance (`_retention_item`)."""


    def __init__(self, cfg: RetentionConfig, run: RunDir, *, modes: list[str], distances: list[int], dataset: str,
                 config: MPlusConfig, **loaded):
        super().__init__(cfg, run, **loaded)
        self.modes, self.distances, self.dataset, self.config = modes, distances, dataset, config
        self.kinds = (["borderline"] if cfg.borderline else []) + modes

    def todo(self, key: tuple, done: ResultStore) -> list[str]:
        return [k for k in self.kinds if (k, key[0]) not in done]

    def evaluate(self, row: dict, todo: list[str]) -> Iterator[dict]:
        cfg, tok = self.cfg, self.loaded.tokenizer
        item = RetentionItem(id=row["id"], context=row["context"], question=row["question"], answer=row["answer"])
        index = row["position"]
        if "borderline" in todo:
            pred = generate_ids(self.model, self.memory, row["question_ids"], cfg.max_new_tokens)
            yield {"kind": "borderline", "id": item.id, "index": index, "answer": item.answer,
                   **_score(tok, pred, item.answer)}
        todo_modes = [k for k in todo if k in MODES]
        if todo_modes:
            points = _retention_item(self.model, self.memory, tok, cfg, index, item, row["context_ids"],
                                     row["question_ids"], self.distractors, self.distances, todo_modes)
            for mode in todo_modes:
                yield {"kind": mode, "id": item.id, "index": index, "question": item.question,
                       "answer": item.answer, "points": points[mode]}

    def on_predict_start(self) -> None:
        self.distractors = self.trainer.datamodule.distractors.to_dict()["ids"]

    def order(self, record: dict) -> tuple:
        return self.position((record["id"],)), KINDS.index(record["kind"])

    def summarize(self) -> dict:
        ids = [k[0] for k in self.trainer.datamodule.keys(self.key_columns)]
        summary = summarize(self.run, ids, self.modes, self.distances, self.cfg, self.dataset, self.config)
        summary.update(new_items=self.num_todo, skipped_items=self.num_items - self.num_todo)
        write_json(self.run.file("results.json"), summary)
        plots.retention_plot(summary, self.run.file("retention.png"))
        if summary.get("recall"):
            plots.recall_plot(summary, self.run.file("recall.png"))
        if self.cfg.tensorboard:
            _tensorboard(self.run, summary)
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


def summarize(run: RunDir, ids: list[str], modes, distances, cfg, dataset: str, config: MPlusConfig) -> dict:
    """Per-distance means over the finished items (`ids`, in item order)."""
    store = run.store
    out: dict = {"task": "retention", "dataset": dataset, "model": str(cfg.model), "num_items": 0,
                 "distances": distances, "modes": {}, "borderline": None, "theory": {}}
    if cfg.borderline:
        recs = [store.get(("borderline", i)) for i in ids]
        recs = [r for r in recs if r]
        if recs:
            out["borderline"] = {"exact_hit": sum(r["exact_hit"] for r in recs) / len(recs),
                                 "qa_f1": sum(r["qa_f1"] for r in recs) / len(recs), "n": len(recs)}
    N, K = config.stm_rows, config.num_tokens
    for mode in modes:
        recs = [store.get((mode, i)) for i in ids]
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
            recall = summarize_recall([r["points"] for r in recs], K, config.ltm_read_rows)
            if recall:
                out["recall"] = {"mode": mode, "distances": distances, **recall}
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
    recall = summary.get("recall")
    for j, d in enumerate(recall["distances"] if recall else []):
        for metric in ("recall", "random_recall", "retrieved", "in_ltm"):
            if recall[metric][j] is not None:
                writer.add_scalar(f"recall/{ds}/{metric}", recall[metric][j], global_step=d)
    writer.close()

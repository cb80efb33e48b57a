"""The embedded default (`make demo`): a tiny M+ trained on CPU to store facts in memory and read them back.

    python -m mplus_lightning.demo [--quick] [--out checkpoints/demo] [--data data/generated/demo] [--seed 0]
                                   [--backbone data/demo_backbone]
    python -m mplus_lightning.demo --make-backbone      (make demo-backbone: regenerate data/demo_backbone)
    python -m mplus_lightning.demo --collect OUT [OUT ...]   (median and range over finished runs, e.g. seeds)

1. Writes a deterministic synthetic corpus of facts about people (birth city, birth year, employer) and question /
   answer pairs to `data/generated/demo/` (mplus_lightning/data/facts.py), with the backbone's tokenizer.
2. Trains a tiny Llama-shaped M+ through the three memory stages, starting from the committed backbone
   `data/demo_backbone/` (as the released M+ starts from a pretrained Llama), exactly as
       python -m mplus_lightning.fit --config experiments/demo_stage1.yaml   (MemoryLLM)
       python -m mplus_lightning.fit --config experiments/demo_stage2.yaml   (+ retriever training)
       python -m mplus_lightning.fit --config experiments/demo_ltm.yaml      (+ long-term memory)
   would (run in this process, with a progress line every 10% of each stage).
3. Runs the knowledge-retention evaluation (`python -m mplus_lightning.evaluate retention`, experiments/demo_eval.yaml)
   on facts about held-out people (never seen in training): inject the fact, then other facts as distractors, and
   ask the question at distances from 0 to far past the short-term pool's capacity, in M+ mode (long-term memory
   on) and MemoryLLM mode (the same memory read without its long-term part).
4. Prints a table and where the files are: checkpoints/demo/ (runs/<stage>/ with TensorBoard logs and the exported
   model, retention/ with results.json, retention.png and TensorBoard scalars, demo_summary.json).

`--quick` runs the same pipeline at a miniature size (a few steps per stage, a few evaluation items), for tests.

The backbone is the tiny Llama after the project's own pretrain stage (experiments/demo_pretrain.yaml: facts and
questions in its context window, seed 0), committed with its tokenizer (about 1 MB). `--make-backbone`
(`make demo-backbone`) regenerates it: the seed-0 corpus and tokenizer, then that stage, pinned like the demo, and
says whether the result is byte-identical to the committed file. Why one committed backbone: whether stage 1 learns
to look a fact up by name in memory or only to read the newest block depends on the pretrained backbone (1 of 7
pretrain runs tried gave one that learns the lookup), not on the corpus or the seed of the memory stages; from this
backbone it learned the lookup on every corpus seed tried (docs/demo-history.md, sections 8-9). `--seed S` draws
the corpus (people, attributes, held-out facts, distractors), the memory's initial rows, the memory stages' training
and the evaluation; the backbone and tokenizer are the same for every seed.

The same command, seed and commit print the same table on every machine with the same kind of CPU, under any load:
everything random is seeded, and what else chooses how floats are added up is pinned (`PINNED_ENV`). Training
forms its lookups abruptly after a plateau, so a rounding difference in the first steps can end in another table.
Run as a program, the demo restarts itself once in the pinned environment when it was not started in it
(`restart_pinned`), because the kernels and thread pools read these settings when torch starts.

How the recipe (corpus shape, pretrain stage, learning rates, step counts) was found: docs/demo-history.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import config as config_lib
from .data import facts as facts_lib
from .data.files import iter_jsonl
from .progress import Progress, silence_noise

ROOT = Path(__file__).resolve().parents[1]
STAGES = (("stage1", "demo_stage1.yaml"), ("stage2", "demo_stage2.yaml"), ("ltm", "demo_ltm.yaml"))
PRETRAIN = ("pretrain", "demo_pretrain.yaml")
BACKBONE = ROOT / "data" / "demo_backbone"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BACKBONE_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)
BACKBONE_SEED = 0
"""The corpus seed the committed backbone was pretrained on (`make_backbone`)."""
STAGE_SEED = config_lib.TrainerConfig.seed
"""The memory stages' `trainer.seed` for `--seed 0` (the config default, 42); seed S trains with STAGE_SEED + S."""
EVAL_CONFIG = "demo_eval.yaml"
TOKENIZER_VOCAB = 1024
"""Asked of the BPE trainer; the facts support fewer merges (about 830 tokens), all words become single tokens."""
FACT_TOKENS = 6
"""Tokens of every fact ("Fact: Tina Horvat Madrid."): one memory block of K = 6 rows (demo_stage1.yaml)."""
BUDGET_S = 15 * 60
TARGETS = {"distance0": 0.9,
           "far_share": 0.1, "far_mplus": 0.6, "far_memoryllm": 0.2,                 # the first distance < 10% ...
           "farthest_share": 0.01, "farthest_mplus": 0.5, "farthest_memoryllm": 0.1}   # ... and the last, if < 1%

QUICK_STAGE = ["trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.val_batches=2",
               "trainer.ckpt_every_n_steps=4", "data.params.val_samples=2"]
QUICK_PRETRAIN = ["data.params.batch_size=2"]
QUICK_EVAL = ["num_items=3", "distances=[0,12,48]", "max_new_tokens=2"]

PINNED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""One intra-op thread: a sum split over threads adds its parts in another order (measured: two threads changed the
memory stages' weights within 4 steps), and on a shared 2-core machine two threads that wait for each other's core
make a step 10-100x slower (40 ms against 0.3-7 s per step under load)."""
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
"""x86-64 CPUs with AVX2: torch's vectorized kernels and MKL's matrix products pick their code by what the CPU offers
(AVX-512 where it has it; MKL also blocks by the cache sizes it detects), and each code path rounds differently
(measured: torch's DEFAULT kernels or MKL's SSE2 branch instead of AVX2 changed the weights from the first stage).
Pinned to the AVX2 path (MKL's reproducibility mode: fixed cache sizes and reduction order). MKL documents this
branch as the same on every Intel CPU with AVX2; on other vendors' CPUs it uses its automatic branch, so an Intel
and an AMD machine may still differ (MKL_CBWR=COMPATIBLE would not, at about twice the matrix-product time)."""
PINNED_ENV = {**PINNED_THREADS, **PINNED_KERNELS}


def pinned_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the demo's pins (`PINNED_THREADS`; `PINNED_KERNELS` on CPUs with AVX2) in place of its own values."""
    pins = dict(PINNED_THREADS)
    if torch.cpu.get_capabilities().get("avx2", False):
        pins.update(PINNED_KERNELS)
    return {**env, **pins}


def environment_is_pinned() -> bool:
    return pinned_environment(os.environ) == dict(os.environ)


def restart_pinned(argv: list[str]) -> None:
    """Replace this process by `python -m mplus_lightning.demo ARGV` in the pinned environment, unless it already
    runs in it (torch read the settings when it started: changing them now would not reach its kernels)."""
    if not environment_is_pinned():
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "mplus_lightning.demo", *argv],
                  pinned_environment(os.environ))


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


# ---- 1. data -------------------------------------------------------------------------------------------------------
def prepare_data(data_dir: Path, seed: int = 0, tokenizer: Path | None = None) -> dict[str, Path]:
    """The facts corpus, the retention files and the tokenizer in `data_dir` (rewritten every time: cheap, and a
    stale corpus from another seed could otherwise mix with a new tokenizer). `tokenizer`: a tokenizer directory to
    copy (the backbone's), checked to write every fact as one block of `FACT_TOKENS` tokens; None: train one on the
    corpus (`train_tiny_tokenizer`)."""
    from .data.tokenizer import load_tokenizer, train_tiny_tokenizer

    corpus = facts_lib.generate_corpus(seed)
    paths = facts_lib.write_corpus(corpus, data_dir)
    tok_dir = data_dir / "tokenizer"
    if tokenizer is None:
        tok = train_tiny_tokenizer(facts_lib.tokenizer_texts(corpus), TOKENIZER_VOCAB, tok_dir)
    else:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer / name, tok_dir / name)
        tok = load_tokenizer(tok_dir)
        enc = facts_lib.FactEncoder(tok)
        for person in (*corpus.train, *corpus.val, *corpus.heldout):
            if len(enc.context(person)) != FACT_TOKENS:
                raise ValueError(f"the tokenizer in {tokenizer} writes {person.fact()!r} as "
                                 f"{len(enc.context(person))} tokens, not {FACT_TOKENS}: regenerate the backbone "
                                 "with `make demo-backbone`")
    paths["tokenizer"] = tok_dir
    log(f"  {len(corpus.train)} training people, {len(corpus.val)} validation people, {len(corpus.heldout)} held-out "
        f"people (disjoint name pairs); tokenizer of {len(tok)} tokens")
    log(f"  e.g. {corpus.heldout[0].fact()!r} -> {corpus.heldout[0].question()!r} "
        f"{corpus.heldout[0].value!r}")
    return paths


# ---- 2. training ---------------------------------------------------------------------------------------------------
def stage_config(yaml_name: str, out: Path, data_dir: Path, prev: Path | None, extra: list[str]):
    """The stage's run config: experiments/<yaml> with the demo's paths (and `extra` key=value overrides)."""
    overrides = [f"run_dir={out / 'runs'}", f"data.params.corpus={data_dir}",
                 f"data.params.tokenizer={data_dir / 'tokenizer'}", "trainer.progress_bar=false"]
    if prev is not None:
        overrides.append(f"init_from={prev}")
    return config_lib.load(ROOT / "experiments" / yaml_name, overrides + list(extra))


def train_stage(cfg) -> Path:
    """`fit.run(cfg)` with a progress callback, on a fresh run directory. Returns the export directory."""
    from . import fit

    if cfg.out_dir.exists():
        shutil.rmtree(cfg.out_dir)   # a fresh run every time (no stale checkpoints or TensorBoard events)
    fit.run(cfg, callbacks=[Progress(cfg.name, cfg.trainer.max_steps // 10)])
    return cfg.out_dir / "export"


# ---- 3. evaluation -------------------------------------------------------------------------------------------------
def eval_config(model_dir: Path, out: Path, data_dir: Path, extra: list[str]):
    from .eval.config import load_config

    flags = {"model": str(model_dir), "data": str(data_dir / facts_lib.RETENTION_DIR),
             "tokenizer": str(data_dir / "tokenizer"), "out": str(out / "retention"), "overwrite": True}
    return load_config("retention", ROOT / "experiments" / EVAL_CONFIG, list(extra), flags)


def stm_share(injections: int, n_rows: int, k: int) -> float:
    """Expected share of a fact's rows still in the short-term pool after `injections` further writes."""
    return ((n_rows - k) / n_rows) ** injections


def newest_fact_answers(items_file: Path, data_dir: Path) -> dict[str, dict[int, float]]:
    """Per mode and distance (> 0): the share of answers that are the answer of the most recently injected fact (a
    distractor) rather than of the fact asked about. High values mean the model reads the newest block of
    its memory instead of looking the person up by name."""
    by_text = {p.fact(): p for p in facts_lib.load_corpus(data_dir).train}
    texts = json.loads((data_dir / facts_lib.RETENTION_DIR / "unrelated_contexts_from_train.json").read_text())
    distractors = [by_text.get(t) for t in texts]

    counts: dict[str, dict[int, list[int]]] = {}
    for _, rec in iter_jsonl(items_file):
        if rec.get("kind") not in ("mplus", "memoryllm"):
            continue
        for point in rec["points"]:
            newest = distractors[point["injections"] - 1] if 0 < point["injections"] <= len(distractors) else None
            if newest is not None:
                c = counts.setdefault(rec["kind"], {}).setdefault(point["distance"], [0, 0])
                c[0] += newest.value in point["prediction"]
                c[1] += 1
    return {m: {d: hit / n for d, (hit, n) in by_d.items()} for m, by_d in counts.items()}


def summarize(results: dict, model_config, timings: dict[str, float], total_s: float,
              newest: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
    """The table rows and the demo's targets (`TARGETS`, `BUDGET_S`), from the retention results."""
    N, K = model_config.stm_rows, model_config.num_tokens
    modes = results["modes"]
    ref = modes.get("mplus") or next(iter(modes.values()))
    rows = []
    for j, d in enumerate(ref["distances"]):
        t = ref["injections"][j]
        rows.append({"distance": d, "tokens": ref["tokens"][j], "injections": t, "stm_share": stm_share(t, N, K),
                     **{m: modes[m]["exact_hit"][j] for m in modes},
                     **{f"{m}_newest": (newest or {}).get(m, {}).get(d) for m in modes}})
    far = next((r for r in rows if r["stm_share"] < TARGETS["far_share"]), None)
    farthest = rows[-1] if rows and rows[-1]["stm_share"] < TARGETS["farthest_share"] else None
    first = rows[0] if rows and rows[0]["distance"] == 0 else None
    targets = {
        "total_minutes": {"value": total_s / 60, "target": "<= 15", "met": total_s <= BUDGET_S},
        "distance0": {"value": {m: first[m] for m in modes} if first else None, "target": ">= 0.9 both modes",
                      "met": bool(first) and all(first[m] >= TARGETS["distance0"] for m in modes)},
        "far": _distance_target(far, modes, TARGETS["far_mplus"], TARGETS["far_memoryllm"]),
        "farthest": _distance_target(farthest, modes, TARGETS["farthest_mplus"], TARGETS["farthest_memoryllm"]),
    }
    return {"N": N, "K": K, "K0": model_config.ltm_read_rows, "num_items": results["num_items"],
            "borderline": (results.get("borderline") or {}).get("exact_hit"), "rows": rows, "targets": targets,
            "timings_s": timings, "total_s": total_s}


def _distance_target(row: dict | None, modes, mplus_min: float, memoryllm_max: float) -> dict[str, Any]:
    """M+ at least `mplus_min` and MemoryLLM mode at most `memoryllm_max` at this row's distance (None: not evaluated
    that far)."""
    return {"distance": row["distance"] if row else None, "stm_share": row["stm_share"] if row else None,
            "value": {m: row[m] for m in modes} if row else None,
            "target": f"M+ >= {mplus_min:.2f}, MemoryLLM mode <= {memoryllm_max:.2f}",
            "met": bool(row) and row.get("mplus", 0) >= mplus_min and row.get("memoryllm", 1) <= memoryllm_max}


def format_table(summary: dict) -> str:
    modes = [m for m in ("mplus", "memoryllm") if m in summary["rows"][0]]
    head = {"mplus": "M+", "memoryllm": "MemoryLLM mode"}
    newest_head = "newest fact's (" + " / ".join(head[m].split()[0] for m in modes) + ")"
    lines = ["(its rows in STM: expected share (1 - K/N)^t of the asked fact's rows still in the short-term pool after "
             "t more facts; newest fact's: answers that are the most recently injected fact's answer instead)",
             f"{'distance (tokens)':>17}  {'facts injected after':>20}  {'its rows in STM':>15}  "
             + "  ".join(f"{head[m]:>14}" for m in modes) + f"  {newest_head:>28}"]

    def newest(r):
        shares = [r.get(f"{m}_newest") for m in modes]
        return " / ".join("-" if s is None else f"{s:.2f}" for s in shares)

    for r in summary["rows"]:
        lines.append(f"{r['distance']:>17}  {r['injections']:>20}  {r['stm_share']:>15.1%}  "
                     + "  ".join(f"{r[m]:>14.2f}" for m in modes) + f"  {newest(r):>28}")
    if summary["borderline"] is not None:
        lines.append(f"no-context borderline (question asked without its fact): {summary['borderline']:.2f}")
    return "\n".join(lines)


def seed_table(summaries: list[dict[str, Any]]) -> tuple[str, int]:
    """Markdown table of several demo runs (one per seed): per distance and mode the median and the range, and
    which run is the median one (by M+ at the far distance). Returns (table, index of the median run)."""
    rows = [s["rows"] for s in summaries]
    modes = [m for m in ("mplus", "memoryllm") if m in rows[0][0]]
    if any([r["distance"] for r in run] != [r["distance"] for r in rows[0]] for run in rows):
        raise ValueError("the runs were evaluated at different distances: compare runs of one configuration")
    head = {"mplus": "M+", "memoryllm": "MemoryLLM mode"}
    lines = ["| tokens after the fact | " + " | ".join(str(r["distance"]) for r in rows[0]) + " |",
             "|---" * (len(rows[0]) + 1) + "|",
             "| its rows still in the short-term pool | "
             + " | ".join(f"{r['stm_share']:.1%}" for r in rows[0]) + " |"]
    for m in modes:
        cells = []
        for j in range(len(rows[0])):
            values = sorted(run[j][m] for run in rows)
            cells.append(f"{values[len(values) // 2]:.2f} ({values[0]:.2f}-{values[-1]:.2f})")
        lines.append(f"| {head[m]}: median (range) | " + " | ".join(cells) + " |")
    far = [s["targets"]["far"]["value"]["mplus"] if s["targets"]["far"]["value"] else 0.0 for s in summaries]
    median_run = sorted(range(len(far)), key=lambda i: far[i])[len(far) // 2]
    return "\n".join(lines), median_run


# ---- the backbone ----------------------------------------------------------------------------------------------
def check_backbone(backbone: Path) -> str:
    """sha256 of the backbone's weights; a one-line error when a file is missing."""
    missing = [name for name in BACKBONE_FILES if not (backbone / name).is_file()]
    if missing:
        raise FileNotFoundError(f"demo backbone {backbone} lacks {', '.join(missing)}: `make demo-backbone` "
                                "regenerates it (about 5 minutes), or pass --backbone DIR")
    return hashlib.sha256((backbone / "model.safetensors").read_bytes()).hexdigest()


def make_backbone(out: str | Path = BACKBONE, work: str | Path = "checkpoints/demo/backbone", *,
                  quick: bool = False) -> dict[str, Any]:
    """Regenerate the demo's backbone in `out`: the seed-0 corpus and its tokenizer, then the pretrain stage
    (experiments/demo_pretrain.yaml) in `work`, pinned like the demo; its export's files are copied to `out`.
    Returns {"sha256", "previous_sha256", "identical"} (identical: the weights equal what `out` held before)."""
    out, work = Path(out), Path(work)
    with _one_quiet_thread():
        try:
            previous = check_backbone(out)
        except FileNotFoundError:   # none there yet (or an incomplete one): nothing to compare with
            previous = None
        log(f"== backbone: seed-{BACKBONE_SEED} corpus and tokenizer -> {work / 'data'}")
        prepare_data(work / "data", BACKBONE_SEED)
        _, yaml_name = PRETRAIN
        extra = QUICK_STAGE + QUICK_PRETRAIN if quick else []
        cfg = stage_config(yaml_name, work, work / "data", None, extra)
        log(f"== backbone: python -m mplus_lightning.fit --config experiments/{yaml_name}  "
            f"[{cfg.trainer.max_steps} steps, batches of {cfg.data.params.get('batch_size')}]")
        t = time.perf_counter()
        export = train_stage(cfg)
        out.mkdir(parents=True, exist_ok=True)
        for name in BACKBONE_FILES:
            shutil.copyfile(export / name, out / name)
        digest = check_backbone(out)
    same = previous == digest
    log(f"  backbone written to {out} in {_fmt_s(time.perf_counter() - t)}: model.safetensors sha256 {digest[:16]}... "
        + ("(byte-identical to the one it replaced)" if same else
           "(new)" if previous is None else f"(DIFFERS from the one it replaced, {previous[:16]}...)"))
    return {"sha256": digest, "previous_sha256": previous, "identical": same}


# ---- main ----------------------------------------------------------------------------------------------------------
def run_demo(out: str | Path = "checkpoints/demo", data: str | Path = "data/generated/demo", *, quick: bool = False,
             seed: int = 0, backbone: str | Path = BACKBONE, stage_overrides: list[str] | None = None,
             eval_overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole demo; returns the summary (also written to <out>/demo_summary.json). Called in a process that was
    not started in the pinned environment (`PINNED_ENV`), it runs on one thread but with the kernels torch chose."""
    with _one_quiet_thread():
        return _run_demo(Path(out), Path(data), Path(backbone), quick=quick, seed=seed,
                         stage_overrides=stage_overrides, eval_overrides=eval_overrides)


@contextlib.contextmanager
def _one_quiet_thread():
    """One intra-op thread (`PINNED_THREADS`, also in a process started with more) and the demo's own progress lines
    only (`_quiet`); both restored afterwards, so that a caller in the same process gets its threads and logs back."""
    threads_before = torch.get_num_threads()
    levels_before = {name: logging.getLogger(name).level for name in QUIETED_LOGGERS}
    torch.set_num_threads(1)
    _quiet()
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        for name, level in levels_before.items():
            logging.getLogger(name).setLevel(level)


def _run_demo(out: Path, data_dir: Path, backbone: Path, *, quick: bool, seed: int,
              stage_overrides: list[str] | None, eval_overrides: list[str] | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    backbone_sha = check_backbone(backbone)
    timings: dict[str, float] = {}
    environment = {k: os.environ.get(k) for k in PINNED_ENV}
    settings = ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None) or "none of PINNED_ENV"
    log(f"pinned for a reproducible table: {settings}" if environment_is_pinned() else
        f"NOT in the pinned environment ({settings}): the table may differ from another run's; "
        "`python -m mplus_lightning.demo` pins it")

    log(f"== 1/4 data: facts corpus of seed {seed} -> {data_dir}, tokenizer of the backbone {backbone}")
    t = time.perf_counter()
    prepare_data(data_dir, seed, tokenizer=backbone)
    timings["data"] = time.perf_counter() - t

    prev = backbone
    seeds = [f"trainer.seed={STAGE_SEED + seed}"]
    for i, (stage, yaml_name) in enumerate(STAGES, start=1):
        extra = (QUICK_STAGE if quick else []) + seeds
        cfg = stage_config(yaml_name, out, data_dir, prev, extra + list(stage_overrides or []))
        m = cfg.model
        log(f"== 2/4 training {stage} ({i}/{len(STAGES)}): python -m mplus_lightning.fit --config "
            f"experiments/{yaml_name}  [{cfg.trainer.max_steps} steps, pool {m.num_blocks - m.num_ltm_blocks} x "
            f"{m.num_tokens} rows, {m.num_ltm_blocks * m.num_tokens} long-term rows read, from {prev}]")
        t = time.perf_counter()
        prev = train_stage(cfg)
        timings[stage] = time.perf_counter() - t
        log(f"  {stage} done in {_fmt_s(timings[stage])} -> {prev}")

    from .eval.retention import run_retention

    ecfg = eval_config(prev, out, data_dir, (QUICK_EVAL if quick else []) + [f"seed={seed}"]
                       + list(eval_overrides or []))
    log(f"== 3/4 retention evaluation: {ecfg.num_items} held-out facts, distances {list(ecfg.distances)} tokens, "
        f"modes {list(ecfg.modes)}")
    t = time.perf_counter()
    results = run_retention(ecfg)
    timings["eval"] = time.perf_counter() - t
    total = time.perf_counter() - t_start

    from .model import MPlusConfig
    newest = newest_fact_answers(Path(ecfg.out) / "items.jsonl", data_dir)
    summary = summarize(results, MPlusConfig.from_json(prev / "config.json"), timings, total, newest)
    summary["files"] = {"results": str(Path(ecfg.out) / "results.json"), "plot": str(Path(ecfg.out) / "retention.png"),
                        "tensorboard": str(out), "model": str(prev), "data": str(data_dir)}
    summary["quick"] = quick
    summary["seed"] = seed
    summary["backbone"] = {"path": str(backbone), "sha256": backbone_sha}
    summary["environment"] = {**environment, "torch": torch.__version__,
                              "cpu": torch.cpu.get_capabilities().get("cpu_name")}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    log(f"== 4/4 results: {summary['num_items']} held-out facts; short-term pool N={summary['N']} rows/layer, "
        f"K={summary['K']} rows per fact, K0={summary['K0']} long-term rows read")
    log(format_table(summary))
    tg = summary["targets"]
    log("timings: " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in timings.items()) + f"; total {_fmt_s(total)}")
    log(f"target: whole demo <= 15 min: {'met' if tg['total_minutes']['met'] else 'NOT met'} "
        f"({total / 60:.1f} min)")
    log(f"target: distance 0, both modes >= 0.90: {'met' if tg['distance0']['met'] else 'NOT met'} "
        f"({tg['distance0']['value']})")
    for key, share in (("far", TARGETS["far_share"]), ("farthest", TARGETS["farthest_share"])):
        target = tg[key]
        if target["distance"] is None:
            log(f"target: no distance was far enough for < {share:.0%} of the rows to be in the short-term pool")
        else:
            log(f"target: at {target['distance']} tokens ({target['stm_share']:.1%} of a fact's rows expected in the "
                f"short-term pool) {target['target']}: {'met' if target['met'] else 'NOT met'} ({target['value']})")
    log(f"files: plot {summary['files']['plot']}\n       results {summary['files']['results']}\n"
        f"       summary {out / 'demo_summary.json'}\n       model {prev}\n"
        f"       TensorBoard: tensorboard --logdir {out}")
    return summary


QUIETED_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "mplus_lightning.fit",
                   "mplus_lightning.stages.build")
"""Loggers the demo keeps at WARNING while it runs (its own progress lines say what happens)."""


def _quiet() -> None:
    """Keep the demo's output to its own progress lines (Lightning's banner and tips, known deprecations)."""
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_noise()   # every run's tips and known deprecations (fit does this too; the evaluation does not)
    # every demo stage runs in a fresh folder on an in-process stream: neither warning applies
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mplus_lightning.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/demo", help="outputs (runs, evaluation, summary)")
    p.add_argument("--data", default="data/generated/demo", help="generated corpus and tokenizer")
    p.add_argument("--quick", action="store_true", help="miniature run (a few steps, a few items): a smoke test")
    p.add_argument("--seed", type=int, default=0,
                   help="corpus, memory initialisation, memory-stage training and evaluation seed")
    p.add_argument("--backbone", default=str(BACKBONE),
                   help="pretrained tiny Llama to start from (default: %(default)s)")
    p.add_argument("--make-backbone", action="store_true",
                   help="instead of the demo: regenerate the backbone (seed-0 corpus + pretrain stage) into --backbone")
    p.add_argument("--collect", nargs="+", metavar="OUT",
                   help="instead of the demo: the median and range over finished demo runs (their --out folders)")
    p.add_argument("--train", nargs="*", default=[], metavar="key=value",
                   help="overrides for every training stage, e.g. trainer.max_steps=100")
    p.add_argument("--eval", nargs="*", default=[], metavar="key=value",
                   help="overrides for the retention evaluation, e.g. num_items=50")
    args = p.parse_args(argv)
    try:
        if args.collect:
            summaries = [json.loads((Path(o) / "demo_summary.json").read_text()) for o in args.collect]
            table, median = seed_table(summaries)
            print(table)
            print(f"median run (by M+ at the far distance): {args.collect[median]}")
            return 0
        if args.make_backbone:
            make_backbone(args.backbone, Path(args.out) / "backbone", quick=args.quick)
            return 0
        summary = run_demo(args.out, args.data, quick=args.quick, seed=args.seed, backbone=args.backbone,
                           stage_overrides=args.train, eval_overrides=args.eval)
    except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary else 1


if __name__ == "__main__":
    restart_pinned(sys.argv[1:])   # before anything runs: a restart starts torch afresh
    sys.exit(main())

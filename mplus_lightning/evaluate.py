"""Evaluate an M+ / MemoryLLM checkpoint (our export or an official release directory).

    mplus-evaluate retention     --model DIR --data data/squad [--out DIR] [key=value ...]
    mplus-evaluate recall        --model DIR --data data/squad            (the retriever's recall, paper Fig. 6)
    mplus-evaluate longbook      --model DIR --data data/infinitebench/longbook_qa_eng.jsonl
    mplus-evaluate longbench     --model DIR --data data/longbench [max_length=16384]
    mplus-evaluate position-loss --model STAGE3 --data BUCKETS/val/32k-64k models=[STAGE1,STAGE2]
    mplus-evaluate short-context --model DIR --data data/fineweb-edu-heldout
    mplus-evaluate cost          --model DIR [lengths=[16384,32768]]

(`python -m mplus_lightning.evaluate` is the same command.) Defaults come from experiments/eval_<task>.yaml (or
--config FILE); flags and key=value overrides win. Results go to --out (default checkpoints/eval/<task>/<model
name>): items.jsonl (one line per finished item; rerunning the same command resumes), results.json / cost.json, a
table (.md), a plot (.png) and TensorBoard scalars.

Every task but cost runs through Lightning's Trainer, one item per step: `devices=N` (and `num_nodes=M`), torchrun
or SLURM's srun divide the items among the processes, each with its own copy of the model on its own GPU; rank 0
gathers the outputs, which do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .eval.config import TASKS, ConfigError, describe_fields, load_config, to_yaml
from .typed_config import show_traceback, summary

HELP = {
    "retention": "knowledge retention on SQuAD / NaturalQA (accuracy vs tokens injected after the context)",
    "longbook": "LongBook QA (InfiniteBench En.QA) or a user-supplied LongBook Event-QA file",
    "longbench": "LongBench QA subsets (2wikimqa, hotpotqa, qasper, musique, multifieldqa_en, narrativeqa)",
    "cost": "peak memory and latency at 16k-128k input tokens",
    "recall": "the retriever's recall of a retention context's long-term rows by distance (retention, diagnose on)",
    "position-loss": "next-token loss by position in held-out long documents, for several checkpoints on one plot",
    "short-context": "loss and perplexity on short inputs (<= 2,048 tokens): M+ against the backbone alone",
}


EPILOG = """every task's config holds the common keys (model, tokenizer, data, out, device, dtype, seed, limit, ...)
plus its own: `mplus-evaluate TASK --help` lists them with one line each, `mplus-evaluate TASK --describe [KEY]`
prints each with its type, default and meaning, and `--print-config` the resolved config as commented YAML."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplus-evaluate", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for task in TASKS:
        s = sub.add_parser(task, help=HELP[task], description=HELP[task],
                           epilog=f"config keys (defaults: experiments/eval_{task}.yaml):\n" + summary(TASKS[task]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--model", help="checkpoint directory (our export or an official release)")
        s.add_argument("--data", help="data file or directory" + (" (unused)" if task == "cost" else ""))
        s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model directory)")
        s.add_argument("--out", help="output directory (default checkpoints/eval/<task>/<model name>)")
        s.add_argument("--config", help=f"YAML of defaults (default experiments/eval_{task}.yaml)")
        s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
        s.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
        s.add_argument("--limit", type=int, help="only the first N items (per subset)")
        s.add_argument("--overwrite", action="store_true", default=None, help="discard earlier results in --out")
        s.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                       help="no progress bars")
        s.add_argument("--debug", action="store_true",
                       help="show the traceback of a config or input error (also MPLUS_DEBUG=1)")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML, each key under its docstring, and exit")
        s.add_argument("--describe", nargs="?", const="", metavar="KEY",
                       help="print every config key (or just KEY) with its type, default and meaning, and exit")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. distances=[0,1000]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.describe is not None:
        try:
            print(describe_fields(args.task, args.describe or None), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = {k: getattr(args, k) for k in ("model", "data", "tokenizer", "out", "device", "dtype", "limit",
                                          "overwrite", "progress")}
    try:
        cfg = load_config(args.task, args.config, args.overrides, flags)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        result = run(args.task, cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:   # DataFormatError and EvalInputError are ValueErrors
        if show_traceback(args.debug):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # here: `--help` and errors stay light

    if rank_zero_only.rank == 0:                      # every process of a multi-process run has the result
        print(result.get("table") or json.dumps(_brief(result), indent=2))
    return 0


def run(task: str, cfg) -> dict:
    """Run one evaluation from a resolved config (also the Python entry point)."""
    from .eval.runtime import check_model_dir

    check_model_dir(cfg.model)
    if task in ("retention", "recall"):
        from .eval.retention import run_retention
        return run_retention(cfg, task=task)
    if task == "position-loss":
        from .eval.analyses import run_position_loss
        return run_position_loss(cfg)
    if task == "short-context":
        from .eval.analyses import run_short_context
        return run_short_context(cfg)
    if task == "longbook":
        from .eval.longqa import run_longbook
        return run_longbook(cfg)
    if task == "longbench":
        from .eval.longqa import run_longbench
        return run_longbench(cfg)
    from .eval.cost import run_cost
    return run_cost(cfg)


def _brief(result: dict) -> dict:
    if result.get("task") == "retention":
        brief = {"dataset": result["dataset"], "num_items": result["num_items"], "borderline": result["borderline"],
                 **{m: dict(zip(c["distances"], c["exact_hit"])) for m, c in result["modes"].items()}}
        if result.get("recall"):
            brief["recall"] = dict(zip(result["recall"]["distances"], result["recall"]["recall"]))
        return brief
    return result


if __name__ == "__main__":
    sys.exit(main())

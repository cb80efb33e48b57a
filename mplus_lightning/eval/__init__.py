"""Evaluation of M+ / MemoryLLM checkpoints: knowledge retention, LongBook QA, LongBench, and cost.

Entry point: `python -m mplus_lightning.evaluate {retention,longbook,longbench,cost} --model DIR ...`.
Modules: `data` (the readers of the retention, LongBook and LongBench sets), `metrics` (QA-F1, exact hit;
torchmetrics), `config` (the dataclass schema of every task), `runtime` (loading, memory modes, the plain-window
backbone), `retention`, `longqa`, `cost` (the runners), `diagnose` (retention diagnostics), `plots`, `io` (results).
"""

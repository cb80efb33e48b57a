"""Evaluation of M+ / MemoryLLM checkpoints: knowledge retention, LongBook QA, LongBench, and cost.

Entry point: `python -m mplus_lightning.evaluate {retention,longbook,longbench,cost} --model DIR ...`.
Modules: `metrics` (QA-F1, exact hit; torchmetrics), `config` (the dataclass schema of every task), `runtime`
(loading, memory modes, the plain-window backbone), `retention`, `longqa`, `cost` (the runners), `plots`, `io`.
Nothing heavy is imported here, so the data readers can use `mplus_lightning.eval.io` cheaply.
"""

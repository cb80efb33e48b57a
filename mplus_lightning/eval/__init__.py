"""Evaluation of M+ / MemoryLLM checkpoints: knowledge retention and the retriever's recall, LongBook QA, LongBench,
loss by position and on short inputs, and cost.

Entry point: `python -m mplus_lightning.evaluate {retention,recall,longbook,longbench,position-loss,short-context,cost}
--model DIR ...`. Modules: `workload` (the Trainer-driven run: one item per `predict_step`, sharded over ranks, rank 0
gathering), `metrics` (QA-F1, exact hit; torchmetrics), `config` (the dataclass schema of every task), `runtime`
(loading, memory modes, the plain-window backbone, the output directory), `retention`, `longqa`, `analyses`
(position-loss, short-context) and `cost` (the runners), `diagnose` (retention diagnostics and recall), `plots`,
`io` (results). The data readers and DataModules are in `mplus_lightning.data.eval_sets`.
"""

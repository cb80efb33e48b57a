"""Training data: the document -> sample rule, sharded and resumable streams, one DataModule per dataset.

* `sample`: `Sample`, `SampleRule`, `make_sample` (the official rule, in one place).
* `tokenizer`: `load_tokenizer`, `encode`, `check_tokenizer`, `train_tiny_tokenizer`.
* `stream`: `SampleStream` (rank/worker sharding, resume, epoch ends), `SampleLoader`, `collate_single`,
  `SampleDataModule` (carries ``samples_consumed`` in checkpoints), `SyntheticDataModule`.
* `fineweb`: `FineWebDataModule` (stage 1; fine-web-edu parquet / jsonl shards).
* `slimpajama`: the long-document bucket builder (``python -m mplus_lightning.data.slimpajama build``) and
  `SlimPajamaDataModule`.
* `mixture`: `MixtureDataModule` (stages 2/3: fine-web + buckets by ratio).
* `facts`: `FactsDataModule` (the CPU demo's generated facts about people).
* `files`: reading text/JSON/JSON Lines inputs with errors naming file and line (shared with the evaluation readers).
* `eval_sets`: the evaluation data: readers of the retention, LongBook, LongBench and held-out text files, and
  `RetentionDataModule`, `LongBookDataModule`, `LongBenchDataModule`, `TextDataModule` (items held and sharded by
  Hugging Face `datasets`; run by `python -m mplus_lightning.evaluate`).

`data.kind` in a run config names one of these DataModules: the registry is `mplus_lightning.config.DATAMODULES`;
each DataModule declares the typed schema of its `data.params` as `params_schema`.

Names are imported on first use, so that ``python -m mplus_lightning.data.slimpajama`` does not import its own module
twice and ``import mplus_lightning.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "sample", "SampleRule": "sample", "make_sample": "sample",
    "load_tokenizer": "tokenizer", "encode": "tokenizer", "check_tokenizer": "tokenizer",
    "train_tiny_tokenizer": "tokenizer",
    "DataFormatError": "files", "DocumentSource": "stream", "SampleDataModule": "stream", "SampleLoader": "stream",
    "SampleStream": "stream", "SourceSpec": "stream", "SyntheticDataModule": "stream",
    "SyntheticDocuments": "stream", "collate_single": "stream",
    "FineWebDataModule": "fineweb",
    "BUCKETS": "slimpajama", "SlimPajamaDataModule": "slimpajama", "build_buckets": "slimpajama",
    "MixtureDataModule": "mixture", "STAGE2_RATIOS": "mixture", "STAGE3_RATIOS": "mixture",
    "FactsDataModule": "facts",
    "RetentionDataModule": "eval_sets.datamodules", "LongBookDataModule": "eval_sets.datamodules",
    "LongBenchDataModule": "eval_sets.datamodules", "TextDataModule": "eval_sets.datamodules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

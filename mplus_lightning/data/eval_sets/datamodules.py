"""One LightningDataModule per evaluation: the items live in a Hugging Face `datasets.Dataset`, one item per step,
sharded over the ranks of the run (each rank a contiguous share, `datasets.distributed.split_dataset_by_node`).

The files are read by our readers (`retention`, `longbook`, `longbench`, `texts`), which check every record and name
the file and line of a bad one; their records become the `datasets.Dataset` (`Dataset.from_list`, in memory: no cache
files that could outlive a change of the data). Every item carries what evaluating it needs:

* `RetentionDataModule`: ``position, id, context, question, answer`` and, given a tokenizer, ``context_ids`` and
  ``question_ids`` (the filled templates, tokenized, context cut to `context_tokens`); the distractors, the same for
  every item, are `distractors` (a Dataset of token-id lists ``ids``, in injection order).
* `LongBookDataModule`, `LongBenchDataModule`: ``position, subset, id, prompt, answers, max_new_tokens`` and, for
  Event-QA, ``options`` and ``answer_index`` (-1 and [] otherwise).
* `TextDataModule`: ``position, id, text`` (held-out documents for the loss analyses).

``position`` is the item's place in the full item list: results are written in that order whatever the number of
ranks. A resumed evaluation sets `todo` (the positions still to evaluate) before the loader is built, so finished
items are left out before the items are divided among the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from ...typed_config import ConfigError
from ..files import DataFormatError
from ..tokenizer import encode
from .longbench import MAX_NEW_TOKENS, QA_SUBSETS, fill, load_prompts, longbench_files, read_longbench
from .longbook import EVENT_TEMPLATE, QA_TEMPLATE, longbook_file, read_event_qa, read_longbook_qa
from .retention import DISTRACTOR_MIN_TOKENS, RetentionSet, build_distractors, load_retention_set
from .texts import read_texts, text_files

datasets.disable_progress_bars()


def _as_is(item: dict) -> dict:
    """One item per step, as the dataset returns it (python values; nothing to stack)."""
    return item


class EvalDataModule(LightningDataModule):
    """The items of one evaluation (`items`, a `datasets.Dataset` built by `setup`), served one per step to
    `predict` / `test`, sharded by rank."""

    def __init__(self) -> None:
        super().__init__()
        self.items: datasets.Dataset | None = None
        self.todo: list[int] | None = None
        """Positions of the items still to evaluate (None: all); set by a resumed evaluation."""

    def read_items(self) -> list[dict]:
        """The item records, in order (subclasses)."""
        raise NotImplementedError

    def files(self) -> dict[str, str]:
        """{name: path} of the files the items come from (their contents identify the data of a run)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Read and check the data once (idempotent: the evaluation calls it before the Trainer does)."""
        if self.items is None:
            records = self.read_items()
            for i, rec in enumerate(records):
                rec["position"] = i
            self.items = datasets.Dataset.from_list(records)

    def keys(self, columns: Sequence[str]) -> list[tuple]:
        """The values of `columns` for every item, in order (cheap: only those columns are read)."""
        if not len(self.items):
            return []
        table = self.items.select_columns(list(columns)).to_dict()
        return list(zip(*(table[c] for c in columns)))

    def shard(self, rank: int, world_size: int) -> datasets.Dataset:
        """The items this rank evaluates: the `todo` ones, split into `world_size` contiguous shares."""
        if self.items is None:
            self.setup()
        items = self.items if self.todo is None else self.items.select(self.todo)
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            items = split_dataset_by_node(items, rank=rank, world_size=world_size)
        return items

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(self.shard(rank, world), batch_size=None, shuffle=False, collate_fn=_as_is)


class RetentionDataModule(EvalDataModule):
    """Knowledge-retention items (SQuAD v2 + index, NQ simplified + index, or the processed layout; see `retention`)
    and the distractors injected between a context and its question.

    Without a tokenizer the items carry text only and `distractors` stays None. With one, every item also carries
    its token ids (BOS ids removed: each memory layer has its own) and `distractors` holds the distractor token ids
    up to `distractor_total` tokens (the source texts concatenated until `distractor_min_tokens`, then cut to
    `distractor_tokens`; the same list for every item, as in the official test script).
    """

    def __init__(self, path: str | Path, *, dataset: str = "auto", index: str | None = "auto",
                 num_items: int | None = None, limit: int | None = None, distractors: str = "auto",
                 distractor_path: str | None = None, context_template: str | None = None,
                 question_template: str | None = None, tokenizer: Any = None, bos_token_id: int | None = None,
                 context_tokens: int = 512, distractor_tokens: int = 512, distractor_min_tokens: int | None = None,
                 distractor_total: int = 0) -> None:
        super().__init__()
        self.path = path
        self.limit = limit
        self.tokenizer, self.bos_token_id = tokenizer, bos_token_id
        self.context_tokens = context_tokens
        self.distractor_tokens, self.distractor_total = distractor_tokens, distractor_total
        self.set: RetentionSet = load_retention_set(
            path, dataset=dataset, index=index, num_items=num_items, distractors=distractors,
            distractor_path=distractor_path, context_template=context_template, question_template=question_template)
        self.distractor_min_tokens = (DISTRACTOR_MIN_TOKENS[self.set.distractor_source]
                                      if distractor_min_tokens is None else distractor_min_tokens)
        self.distractors: datasets.Dataset | None = None

    def encode(self, text: str) -> list[int]:
        return [t for t in encode(self.tokenizer, text) if t != self.bos_token_id]

    def read_items(self) -> list[dict]:
        items = self.set.items[: self.limit] if self.limit is not None else self.set.items
        records = []
        for it in items:
            rec = {"id": it.id, "context": it.context, "question": it.question, "answer": it.answer}
            if self.tokenizer is not None:
                rec["context_ids"] = self.encode(fill(self.set.context_template, context=it.context))[
                    : self.context_tokens]
                rec["question_ids"] = self.encode(fill(self.set.question_template, question=it.question))
                if not rec["context_ids"] or not rec["question_ids"]:
                    raise DataFormatError(f"{self.set.files['data']}: item {it.id}: empty context or question "
                                          "after tokenization")
            records.append(rec)
        return records

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.distractors is None and self.tokenizer is not None:
            ids = build_distractors(self.set.distractor_texts(), self.encode, total_tokens=self.distractor_total,
                                    min_tokens=self.distractor_min_tokens, max_tokens=self.distractor_tokens)
            self.distractors = datasets.Dataset.from_dict({"ids": ids})

    def files(self) -> dict[str, str]:
        return dict(self.set.files)


def _long_item(subset: str, id: str, prompt: str, answers: list[str], max_new_tokens: int,
               options: list[str] | None = None, answer_index: int | None = None) -> dict:
    return {"subset": subset, "id": id, "prompt": prompt, "answers": answers, "max_new_tokens": max_new_tokens,
            "options": list(options or []), "answer_index": -1 if answer_index is None else answer_index}


class LongBookDataModule(EvalDataModule):
    """LongBook QA (InfiniteBench `longbook_qa_eng.jsonl`, task ``qa``) or LongBook Event-QA (``event_qa``, the
    layout in `longbook`): one item per question, its prompt the template filled with the whole book."""

    def __init__(self, path: str | Path, *, task: str = "qa", template: str | None = None, max_new_tokens: int = 40,
                 limit: int | None = None) -> None:
        super().__init__()
        if task not in ("qa", "event_qa"):
            raise ConfigError(f"longbook task must be qa or event_qa, got {task!r}")
        self.path, self.task, self.limit, self.max_new_tokens = path, task, limit, max_new_tokens
        self.template = template or (QA_TEMPLATE if task == "qa" else EVENT_TEMPLATE)
        self.file = longbook_file(path, task)

    def read_items(self) -> list[dict]:
        if self.task == "qa":
            items = read_longbook_qa(self.path)
            items = items[: self.limit] if self.limit is not None else items
            return [_long_item("longbook_qa", it.id, it.prompt(self.template), it.answers, self.max_new_tokens)
                    for it in items]
        items = read_event_qa(self.path)
        items = items[: self.limit] if self.limit is not None else items
        return [_long_item("longbook_event_qa", it.id, it.prompt(self.template), [it.options[it.answer]], 0,
                           it.options, it.answer) for it in items]

    def files(self) -> dict[str, str]:
        return {"data": str(self.file)}


class LongBenchDataModule(EvalDataModule):
    """LongBench QA subsets (`{subset}.jsonl` under `path`, or one subset file), the official prompt templates
    (updated from `prompts`, a dataset2prompt.json-style file) and max-new-token table (updated from
    `max_new_tokens`); the first `limit` items of each subset."""

    def __init__(self, path: str | Path, *, subsets: Sequence[str] = QA_SUBSETS, prompts: str | None = None,
                 max_new_tokens: dict[str, int] | None = None, limit: int | None = None) -> None:
        super().__init__()
        self.path, self.limit = path, limit
        self.data = read_longbench(path, list(subsets))
        self.prompts = load_prompts(prompts)
        self.max_new_tokens = dict(MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
        missing = [s for s in self.data if s not in self.prompts or s not in self.max_new_tokens]
        if missing:
            raise ConfigError(f"no prompt template / max_new_tokens for subset(s) {missing} (set prompts=FILE and "
                              "max_new_tokens.<subset>=N)")

    def read_items(self) -> list[dict]:
        records = []
        for subset, items in self.data.items():
            for it in items[: self.limit] if self.limit is not None else items:
                records.append(_long_item(subset, it.id, it.prompt(self.prompts[subset]), it.answers,
                                          self.max_new_tokens[subset]))
        return records

    def files(self) -> dict[str, str]:
        return {k: str(v) for k, v in longbench_files(self.path, list(self.data)).items()}


class TextDataModule(EvalDataModule):
    """Held-out documents (JSON Lines / parquet with a text field; see `texts`): the first `limit` of them."""

    def __init__(self, path: str | Path, *, text_field: str = "text", limit: int | None = None) -> None:
        super().__init__()
        self.path, self.text_field, self.limit = path, text_field, limit
        text_files(path)                                   # a wrong path is named now, not at setup
        self.read: list[Path] = []

    def read_items(self) -> list[dict]:
        docs, self.read = read_texts(self.path, text_field=self.text_field, limit=self.limit)
        return docs

    def files(self) -> dict[str, str]:
        """The files the documents came from (after `setup`; reading stops at the last document needed)."""
        return {"data" if len(self.read) == 1 else f"data file {i + 1}": str(f) for i, f in enumerate(self.read)}

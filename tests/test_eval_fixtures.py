"""Shared builders for the evaluation tests (imported by the other test_eval_* files; no tests here).

Everything is tiny and written in the real on-disk formats: a random M+ checkpoint saved with an initialised memory,
a byte-level BPE tokenizer trained on the test corpus, and SQuAD v2 / NQ simplified / processed retention files,
LongBook and LongBench JSON Lines.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = ("river castle history engine garden music planet winter market doctor science bridge ocean forest "
         "village king queen army treaty church library museum island mountain desert city harbor railway "
         "painter poet student teacher factory temple empire council").split()
NAMES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens"]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def paragraph(rng: random.Random, sentences: int = 4) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def corpus(seed: int = 0, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    texts = [paragraph(rng) for _ in range(n)]
    texts += [f"Context: The capital is {c}. Questions: What is the capital? Answer: {c}" for c in NAMES]
    return texts


def make_tokenizer(out_dir: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer with <unk>=0, <s>=1, </s>=2 (the tiny config's bos/eos), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    assert fast.convert_tokens_to_ids("<s>") == 1 and fast.convert_tokens_to_ids("</s>") == 2
    return fast


def make_model(seed: int = 0, *, lora: bool = True, **overrides):
    """A tiny random M+ with non-zero LoRA B (so adapters matter), in eval mode."""
    from mplus_lightning import MPlus, tiny_config

    torch.manual_seed(seed)
    model = MPlus(tiny_config(**overrides)).eval()
    if lora:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return model


def make_checkpoint(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random M+ saved with an initialised memory (a few random chunks injected, long-term rows present)."""
    model = make_model(seed, **overrides)
    memory = model.new_memory(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        model.inject(memory, torch.randint(3, model.config.llama["vocab_size"], (1, 24), generator=g), generator=g)
    assert memory.initialized and (memory.ltm is None or memory.ltm.size > 0)
    model.save_pretrained(out_dir, memory=memory)
    return out_dir


def make_env(root: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): the tokenizer lives in the model directory, as in a release."""
    model_dir = make_checkpoint(root / "model")
    make_tokenizer(model_dir)
    return model_dir, model_dir


TINY_RETENTION = ["--no-progress", "distances=[0,64,128]", "distractor_tokens=32", "distractor_min_tokens=32"]
"""Retention settings that run in seconds on the tiny model."""


def squad_env(root: Path) -> tuple[Path, Path]:
    """(model dir with its tokenizer, a SQuAD folder with 6 dev paragraphs indexed 0, 2, 4, 5)."""
    model_dir, _ = make_env(root)
    return model_dir, write_squad(root / "data" / "squad", n_dev=6, n_train=40, index=[0, 2, 4, 5])


def retention_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`evaluate` arguments of a tiny retention run."""
    return ["retention", "--model", str(model_dir), "--data", str(data), "--out", str(out), *TINY_RETENTION, *extra]


# ---- retention data ---------------------------------------------------------------------------------------------
def squad_json(rng: random.Random, n_paragraphs: int, with_impossible: bool = True) -> dict:
    paragraphs = []
    for p in range(n_paragraphs):
        city = NAMES[p % len(NAMES)]
        ctx = f"{paragraph(rng, 2)} The capital is {city}. {paragraph(rng, 1)}"
        qas = [{"question": f"What is the capital number {p}?", "id": f"q{p}",
                "answers": [{"text": city, "answer_start": ctx.index(city)}], "is_impossible": False}]
        if with_impossible:
            qas.append({"question": "What is not here?", "id": f"imp{p}", "answers": [],
                        "plausible_answers": [{"text": "x", "answer_start": 0}], "is_impossible": True})
        paragraphs.append({"context": ctx, "qas": qas})
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": paragraphs}]}


def write_squad(d: Path, n_dev: int = 6, n_train: int = 40, index=None) -> Path:
    rng = random.Random(1)
    d.mkdir(parents=True, exist_ok=True)
    (d / "dev-v2.0.json").write_text(json.dumps(squad_json(rng, n_dev)))
    (d / "train-v2.0.json").write_text(json.dumps(squad_json(rng, n_train)))
    if index is not None:
        np.save(d / "indices_squad_3.npy", np.asarray(index, dtype=np.int64))
    return d


def nq_dev_line(i: int, question: str, long_tokens: list[str], short: tuple[int, int] | None) -> dict:
    toks = [{"token": "<P>", "html_token": True, "start_byte": 0, "end_byte": 0}]
    toks += [{"token": t, "html_token": False, "start_byte": 0, "end_byte": 0} for t in long_tokens]
    toks += [{"token": "</P>", "html_token": True, "start_byte": 0, "end_byte": 0}]
    short_answers = [] if short is None else [{"start_token": short[0] + 1, "end_token": short[1] + 1}]
    return {"example_id": 1000 + i, "question_text": question, "document_tokens": toks,
            "document_url": "http://x", "long_answer_candidates": [],
            "annotations": [{"annotation_id": i, "yes_no_answer": "NONE", "short_answers": short_answers,
                             "long_answer": {"start_token": 0, "end_token": len(toks), "candidate_index": 0}}]}


def nq_train_line(i: int, text_tokens: list[str]) -> dict:
    doc = " ".join(["<H1>", "Title", "</H1>", "<P>"] + text_tokens + ["</P>"])
    return {"example_id": 5000 + i, "question_text": "q", "document_text": doc, "long_answer_candidates": [],
            "annotations": [{"yes_no_answer": "NONE", "short_answers": [],
                             "long_answer": {"start_token": 3, "end_token": 4 + len(text_tokens) + 1}}]}


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


# ---- long-context data -------------------------------------------------------------------------------------------
def write_longbench(d: Path, subsets=("hotpotqa", "qasper"), n: int = 2, words: int = 150) -> Path:
    rng = random.Random(2)
    for s in subsets:
        rows = [{"input": f"What is the capital {i}?", "context": " ".join(rng.choice(WORDS) for _ in range(words))
                 + f" The capital is {NAMES[i]}.", "answers": [NAMES[i], f"city of {NAMES[i]}"], "length": words,
                 "dataset": s, "language": "en", "all_classes": None, "_id": f"{s}-{i}"} for i in range(n)]
        write_jsonl(d / f"{s}.jsonl", rows)
    return d


def write_longbook(path: Path, n: int = 2, words: int = 200) -> Path:
    rng = random.Random(3)
    rows = [{"id": i, "context": " ".join(rng.choice(WORDS) for _ in range(words)) + f" The hero went to {NAMES[i]}.",
             "input": "Where did the hero go?", "answer": [NAMES[i]], "options": []} for i in range(n)]
    return write_jsonl(path, rows)


def write_event_qa(path: Path, n: int = 2, words: int = 120) -> Path:
    rng = random.Random(4)
    rows = []
    for i in range(n):
        rows.append({"id": f"e{i}", "context": " ".join(rng.choice(WORDS) for _ in range(words)),
                     "past_events": [sentence(rng, 6) for _ in range(5)],
                     "options": [sentence(rng, 5) for _ in range(6)], "answer": i % 6})
    return write_jsonl(path, rows)


class one_thread:
    """Run torch on one intra-op thread inside the block (tiny models on a shared 2-core machine are several times
    faster without thread contention); restores the previous setting."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
        return False


@pytest.fixture(autouse=True)
def one_thread_per_test():
    """Autouse in every module that imports it: each test runs torch on one thread."""
    with one_thread():
        yield

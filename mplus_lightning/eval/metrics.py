"""Answer metrics of the retention and long-context benchmarks.

* QA-F1 is the token-level F1 of LongBench / InfiniteBench: both strings are normalised (lowercase, punctuation
  removed, the articles a/an/the removed, whitespace collapsed), split on whitespace, and scored by the multiset
  overlap of their tokens. With several gold answers an item scores the best of them. LongBench reports 100 x the
  mean rounded to 2 decimals, LongBook (M+ paper) the mean on a 0-1 scale; both are derived from `compute()`.
* Exact hit is the knowledge-retention metric of MemoryLLM: the gold answer, with a trailing "</s>" and surrounding
  whitespace removed, must occur verbatim (case-sensitive, no normalisation) in the generated text.

Both are also available as torchmetrics `Metric`s so they accumulate over batches and reduce across ranks.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 when either is empty or nothing is shared."""
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _as_answers(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    answers = [g for g in gold if isinstance(g, str)]
    if len(answers) != len(gold):
        raise TypeError(f"gold answers must be strings, got {gold!r}")
    return answers


def qa_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """QA-F1 of one prediction against one gold answer or the best of several (0..1)."""
    pred = normalize_answer(prediction).split()
    return max((token_f1(pred, normalize_answer(g).split()) for g in _as_answers(gold)), default=0.0)


def clean_target(answer: str) -> str:
    """The gold string as the exact-hit metric compares it: trailing "</s>" and surrounding whitespace removed."""
    answer = answer.strip()
    if answer.endswith("</s>"):
        answer = answer[: -len("</s>")]
    return answer.strip()


def exact_hit(prediction: str, gold: str | Sequence[str]) -> bool:
    """True iff some (cleaned, non-empty) gold answer occurs verbatim, case-sensitively, in `prediction`.

    An empty gold answer never hits (the official check `"" in output` would always be true).
    """
    return any(t and t in prediction for t in map(clean_target, _as_answers(gold)))


def longbench_score(f1_values: Sequence[float]) -> float:
    """A LongBench dataset score: 100 x mean QA-F1, rounded to 2 decimals (official eval.py)."""
    if not f1_values:
        return 0.0
    return round(100 * sum(f1_values) / len(f1_values), 2)


class _MeanOverItems(Metric):
    """Mean of a per-item score over all items seen (summed across ranks)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, prediction: str, gold) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, predictions: str | Sequence[str], golds) -> None:
        """`predictions`: one string or a list; `golds`: per prediction a string or a list of accepted answers."""
        if isinstance(predictions, (str, int)):
            predictions, golds = [predictions], [golds]
        if len(predictions) != len(golds):
            raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold entries")
        for p, g in zip(predictions, golds):
            self.total += float(self._score(p, g))
            self.count += 1

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.total / self.count


class QAF1Score(_MeanOverItems):
    """Mean QA-F1 (0..1), best gold answer per item. LongBench's number is `round(100 * compute(), 2)`."""

    def _score(self, prediction: str, gold) -> float:
        return qa_f1(prediction, gold)


class ExactHitAccuracy(_MeanOverItems):
    """Fraction of items whose gold answer occurs verbatim (case-sensitive) in the prediction."""

    def _score(self, prediction: str, gold) -> float:
        return float(exact_hit(prediction, gold))


class ChoiceAccuracy(_MeanOverItems):
    """Fraction of multiple-choice items answered with the right option index (LongBook Event-QA)."""

    def _score(self, prediction, gold) -> float:
        return float(int(prediction) == int(gold))

"""QA-F1 and exact hit on hand-worked cases."""

import pytest
import torch

from mplus_lightning.eval.metrics import (
    ChoiceAccuracy,
    ExactHitAccuracy,
    QAF1Score,
    clean_target,
    exact_hit,
    longbench_score,
    normalize_answer,
    qa_f1,
)


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and THE plum.", "apple pear and plum"),
    ("  Theatre   of the  Absurd ", "theatre of absurd"),        # 'the' inside a word survives
    ("U.S.A.", "usa"),
    ("a", ""),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1_hand_worked():
    # pred -> "cat sat on mat" (4 tokens), gold -> "cat on mat" (3): overlap 3, P = 3/4, R = 1, F1 = 6/7
    assert qa_f1("The cat sat on the mat.", "a cat on mat") == pytest.approx(6 / 7)
    # punctuation and case do not matter
    assert qa_f1("Paris.", "paris") == 1.0
    # overlap counts multiplicity: pred "cat cat cat" vs "cat": P = 1/3, R = 1 -> 0.5
    assert qa_f1("cat cat cat", "cat") == pytest.approx(0.5)
    # nothing shared
    assert qa_f1("Berlin", "Paris") == 0.0


def test_qa_f1_empty_prediction_and_articles_only():
    assert qa_f1("", "Paris") == 0.0
    assert qa_f1("the", "Paris") == 0.0          # normalises to nothing
    assert qa_f1("Paris", "") == 0.0


def test_qa_f1_takes_the_best_gold_answer():
    assert qa_f1("George Washington", ["Washington", "George Washington", "Lincoln"]) == 1.0
    # best of "Washington" (P 1/2, R 1 -> 2/3) and "Lincoln" (0)
    assert qa_f1("George Washington", ["Lincoln", "Washington"]) == pytest.approx(2 / 3)
    assert qa_f1("x", []) == 0.0


def test_exact_hit_is_case_sensitive_substring():
    out = "Paris is the capital of France"
    assert exact_hit(out, "Paris")
    assert not exact_hit(out, "paris")                       # case-sensitive, no normalisation
    assert exact_hit(out, " Paris</s>")                      # target: "</s>" and whitespace stripped
    assert clean_target(" Paris </s>") == "Paris"
    assert exact_hit(out, ["Berlin", "capital of"])          # any of several answers
    assert not exact_hit(out, ["Berlin", "Rome"])
    assert not exact_hit(out, "")                            # an empty gold answer never hits
    assert not exact_hit("", "Paris")


def test_longbench_score_scale_and_rounding():
    assert longbench_score([0.5, 1 / 3]) == 41.67
    assert longbench_score([]) == 0.0


def test_torchmetrics_accumulate_reset_and_merge():
    f1 = QAF1Score()
    f1.update(["The cat sat on the mat.", "Paris."], ["a cat on mat", ["Berlin", "paris"]])
    f1.update("", "anything")
    # merging another metric's state = what dist_reduce_fx="sum" does across ranks (mean over all items)
    other = QAF1Score()
    other.update(["Paris"], ["Paris"])
    f1.merge_state(other)
    assert float(f1.compute()) == pytest.approx((6 / 7 + 1 + 0 + 1) / 4)
    f1.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(f1.compute()) == 0.0

    hit = ExactHitAccuracy()
    hit.update(["Paris is nice", "it is paris"], ["Paris", "Paris"])
    assert float(hit.compute()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        hit.update(["a", "b"], ["a"])

    acc = ChoiceAccuracy()
    acc.update([1, 2, 3, 0], [1, 2, 0, 0])
    assert float(acc.compute()) == pytest.approx(0.75)
    assert isinstance(acc.compute(), torch.Tensor)


def test_qa_f1_counts_repeated_tokens_on_both_sides():
    # multiset overlap: 'cat cat' in 'cat cat dog' overlaps 2 -> P 1, R 2/3, F1 0.8 (a set overlap would give 0.4)
    assert qa_f1("cat cat", "cat cat dog") == pytest.approx(0.8)

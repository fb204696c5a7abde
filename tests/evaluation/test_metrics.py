"""Tests for moealign.evaluation.metrics against hand-worked numbers and the libraries called
directly."""

import math

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from moealign.evaluation.diagnostics import max_violation
from moealign.evaluation.metrics import (
    accuracy,
    bleu,
    exact_match,
    perplexity,
    rouge_l,
)

PREDICTIONS = ["the cat sat on the mat", "a quick brown fox", "hello world", "42"]
REFERENCES = ["the cat sat on a mat", "the quick brown fox jumps", "hello there world", "41"]


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(2.0 * math.log(5.0), 2) == pytest.approx(5.0)
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(1e6, 1) == math.inf


@pytest.mark.parametrize("n_tokens", [0, -3])
def test_perplexity_rejects_non_positive_token_count(n_tokens):
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity(1.0, n_tokens)


def test_exact_match_normalizes_whitespace_only_when_asked():
    predictions = ["  Paris ", "New   York", "rome"]
    references = ["Paris", "New York", "Rome"]
    assert exact_match(predictions, references) == pytest.approx(2 / 3)
    assert exact_match(predictions, references, normalize=False) == 0.0


def test_accuracy_on_lists_arrays_and_tensors():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert accuracy(np.array(["a", "b"]), ["a", "a"]) == 0.5
    assert accuracy(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0])) == 0.75


@pytest.mark.parametrize("metric", [exact_match, accuracy, bleu, rouge_l])
def test_length_mismatch_and_empty_input_raise(metric):
    with pytest.raises(ValueError, match="same length"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])


def test_bleu_hand_worked():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["a b c d"], ["e f g h"]) == 0.0
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths so no brevity penalty.
    expected = 100.0 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)


def test_bleu_matches_sacrebleu_corpus_bleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected)


def test_rouge_l_hand_worked():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["e f g"], ["a b c"]) == 0.0
    # LCS("the dog sat", "the cat sat on") = 2 tokens: P = 2/3, R = 2/4, F1 = 4/7.
    assert rouge_l(["the dog sat"], ["the cat sat on"]) == pytest.approx(4 / 7)


def test_rouge_l_matches_rouge_score_mean_f1():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)
    ]
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(np.mean(scores))


def test_max_violation_hand_worked():
    assert max_violation(torch.tensor([4.0, 0.0, 0.0, 0.0])).item() == pytest.approx(3.0)
    assert max_violation(torch.tensor([5.0, 5.0, 5.0])).item() == 0.0
    per_layer = max_violation(torch.tensor([[4.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 3.0]]))
    torch.testing.assert_close(per_layer, torch.tensor([3.0, 0.5], dtype=torch.float64))

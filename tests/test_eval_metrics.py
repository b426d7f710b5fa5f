"""Text statistics against hand-computed values."""

import math

import pytest

from colabridge.eval.metrics import distinct_n, repetition_rate, text_stats, unigram_entropy


def test_distinct_n():
    seqs = [[1, 2, 1, 2], [3]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 5)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 3)  # (1,2), (2,1), (1,2)
    assert distinct_n([[1]], 2) == 0.0


def test_unigram_entropy():
    assert unigram_entropy([[1, 2], [3, 4]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[7, 7, 7]]) == 0.0


def test_repetition_rate():
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([[1, 2, 3, 4, 5]], n=4) == 0.0


def test_text_stats_keys():
    assert set(text_stats([[1, 2, 3]])) == {"distinct_1", "distinct_2", "unigram_entropy", "repetition_4", "mean_length"}

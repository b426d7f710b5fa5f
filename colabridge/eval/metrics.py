"""Text statistics for generated vs real text: distinct-n, unigram entropy, repetition rate.

All functions take token-id sequences (lists of ints), so they are tokenizer-agnostic and cheap.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def ngrams(seq: Sequence[int], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / all n-grams over the corpus (0 when there is no n-gram)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(seqs: Sequence[Sequence[int]]) -> float:
    """Shannon entropy (nats) of the corpus unigram distribution."""
    counts = Counter(t for s in seqs for t in s)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def repetition_rate(seqs: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of the fraction of n-grams that already occurred earlier in the sequence."""
    rates = []
    for s in seqs:
        grams = ngrams(s, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def text_stats(seqs: Sequence[Sequence[int]]) -> dict:
    """The four statistics reported beside each other for generated and real text."""
    return {
        "distinct_1": distinct_n(seqs, 1),
        "distinct_2": distinct_n(seqs, 2),
        "unigram_entropy": unigram_entropy(seqs),
        "repetition_4": repetition_rate(seqs, 4),
        "mean_length": sum(len(s) for s in seqs) / max(len(seqs), 1),
    }

"""Unigram and bigram baselines: the floor a trained language model must clearly beat.

Counts come from the train split, add-alpha smoothing with alpha chosen on the validation split,
and the reported figure is the cross-entropy on the test split, scored on the same targets as the
model (every token but the first).
"""

from __future__ import annotations

import torch

from bk.data import Corpus

ALPHAS = (1e-3, 1e-2, 0.1, 0.3, 1.0)


def _counts(stream: torch.Tensor, order: int, vocab: int) -> torch.Tensor:
    if order == 1:
        return torch.bincount(stream[1:], minlength=vocab).double()
    pairs = stream[:-1] * vocab + stream[1:]
    return torch.bincount(pairs, minlength=vocab * vocab).double().view(vocab, vocab)


def _cross_entropy(log_probs: torch.Tensor, stream: torch.Tensor, order: int) -> float:
    if order == 1:
        return float(-log_probs[stream[1:]].mean())
    return float(-log_probs[stream[:-1], stream[1:]].mean())


def _log_probs(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    smoothed = counts + alpha
    return smoothed.log() - smoothed.sum(dim=-1, keepdim=True).log()


def ngram_cross_entropy(corpus: Corpus, order: int, split: str = "test") -> float:
    """Test cross-entropy in nats per token of a smoothed ``order``-gram model (1 or 2)."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (unigram) or 2 (bigram), got {order}")
    vocab = len(corpus.vocab)
    counts = _counts(corpus.train, order, vocab)
    alpha = min(ALPHAS, key=lambda a: _cross_entropy(_log_probs(counts, a), corpus.valid, order))
    return _cross_entropy(_log_probs(counts, alpha), getattr(corpus, split), order)

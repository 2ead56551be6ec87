"""What the tests share: Hypothesis strategies, the tiny float64 models, and a fake clock.

The tiny configuration (``TINY``, three layers; ``TINY_4_LAYERS``) is the one every model test
uses; a test that needs another shape says so with ``dataclasses.replace(TINY, ...)``.
``tiny_model`` is the cached float64 dense model the decoding and search tests share, and
``float64_model`` builds any model class from a seed for tests that change or train it.
``token_batches`` draws every token id (so Hypothesis shrinks them); ``random_tokens`` makes a
batch from a drawn seed, for tests that need many long or paired batches. ``decode`` steps a
model through a batch one position at a time, for the tests that decoding equals the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache

import torch
from hypothesis import strategies as st
from torch import nn

from bk.model import LanguageModel, ModelConfig

TINY = ModelConfig(vocab_size=17, d_model=16, n_layers=3, n_seq=16, n_experts=2, d_expert=16,
                   bk_channels=2)
TINY_4_LAYERS = replace(TINY, n_layers=4)
EOS = 5  # the end-of-sequence token of the decoding and search tests

model_seeds = st.integers(0, 4)  # few seeds: each builds (and caches) a model
seeds = st.integers(0, 2**31 - 1)  # for torch.Generator and other cheap randomness


@st.composite
def token_batches(draw: st.DrawFn, max_batch: int = 3, max_len: int = 8,
                  vocab: int = TINY.vocab_size, min_batch: int = 1,
                  min_len: int = 1) -> torch.Tensor:
    """An int64 ``(B, N)`` batch of token ids in ``[0, vocab)``, every id drawn."""
    b = draw(st.integers(min_batch, max_batch))
    n = draw(st.integers(min_len, max_len))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=b * n, max_size=b * n))
    return torch.tensor(ids, dtype=torch.int64).view(b, n)


def random_tokens(seed: int, batch: int, length: int,
                  vocab: int = TINY.vocab_size) -> torch.Tensor:
    """An int64 ``(batch, length)`` batch of token ids in ``[0, vocab)`` from a seeded generator."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def token_sequences(max_len: int = 6, vocab: int = TINY.vocab_size,
                    min_len: int = 1) -> st.SearchStrategy[torch.Tensor]:
    """A 1-D int64 sequence of token ids (a search prompt)."""
    return st.lists(st.integers(0, vocab - 1), min_size=min_len, max_size=max_len).map(
        lambda ids: torch.tensor(ids, dtype=torch.int64))


@torch.no_grad()
def decode(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``idx`` ``(B, N)``, N >= 1, decoded one position at a time from ``model.init_state``: the
    logits of every step stacked ``(B, N, V)`` and the N + 1 states (before each step, and
    after the last)."""
    states, logits = [model.init_state(idx.shape[0])], []
    for t in range(idx.shape[1]):
        step_logits, state = model.step(idx[:, t], states[-1])
        logits.append(step_logits)
        states.append(state)
    return torch.stack(logits, dim=1), states


def float64_model(seed: int, model_class: Callable[..., nn.Module] = LanguageModel,
                  config: ModelConfig = TINY, **options: object) -> nn.Module:
    """``model_class(config, **options)`` with initial weights from ``seed``, in float64, eval."""
    torch.manual_seed(seed)
    return model_class(config, **options).double().eval()


@cache
def tiny_model(seed: int, eos_boost: float = 0.0) -> LanguageModel:
    """The shared float64 tiny dense model (do not change it); ``eos_boost`` raises the EOS
    logit so that sequences do end."""
    model = float64_model(seed)
    with torch.no_grad():
        model.head.bias[EOS] += eos_boost
    return model


@st.composite
def small_models(draw: st.DrawFn, max_layers: int = 3) -> LanguageModel:
    """A float64 dense model of any small shape, every parameter drawn (so routing varies)."""
    config = ModelConfig(vocab_size=draw(st.integers(2, 20)), d_model=draw(st.integers(1, 12)),
                         n_layers=draw(st.integers(1, max_layers)), n_seq=8,
                         n_experts=draw(st.integers(1, 4)), d_expert=draw(st.integers(1, 12)),
                         bk_channels=draw(st.integers(1, 4)))
    model = float64_model(draw(seeds), config=config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


class FakeClock:
    """A clock only the calls made through it advance, so every timing is exact.

    ``costing(name, cost)`` is a call that takes exactly ``cost`` (or, given a sequence, the
    next of its costs on each call) and logs ``name``; ``advance`` is a wait of exactly that long.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds}")
        self.now += seconds

    def costing(self, name: str, cost: float | Sequence[float]) -> Callable[[], None]:
        costs = iter(cost) if isinstance(cost, Sequence) else None

        def call() -> None:
            self.log.append(name)
            self.advance(next(costs) if costs is not None else cost)

        return call


class Timed(nn.Module):
    """``model`` whose every forward pass costs exactly ``cost`` on ``clock``."""

    def __init__(self, model: nn.Module, clock: FakeClock, cost: float) -> None:
        super().__init__()
        self.model, self.clock, self.cost = model, clock, cost

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, *args: object, **kwargs: object) -> object:
        self.clock.advance(self.cost)
        return self.model(*args, **kwargs)

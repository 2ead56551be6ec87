"""Autoregressive generation, state-cached or by full recomputation.

The causal BK-Core makes the logits at position i a function of tokens 0..i only, and each layer's
recurrence carries a single complex number per channel from one position to the next
(``LanguageModel.init_state``/``step``). Cached generation therefore costs O(1) per new token;
for a plain ``LanguageModel`` the step runs as one compiled call (``bk.step_kernel``), otherwise
as ``model.step``;
``generate_recompute`` runs the full forward pass over the whole growing prefix for every new
token and is the reference for both equality and speed (the causal model accepts a prefix of any
length, also beyond ``cfg.n_seq``).

A sequence stops after emitting ``eos_id``: from then on it is padded with ``eos_id``, it is
dropped from the batch (its rows are no longer computed), and the call returns once every
sequence has stopped or ``max_new_tokens`` tokens were generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bk.model import DecodeState, LanguageModel, Work
from bk.step_kernel import StepKernel

Step = Callable[[torch.Tensor, DecodeState], tuple[torch.Tensor, DecodeState]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from logits: greedy (``temperature == 0``) or sampled from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens."""

    temperature: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def check(self, vocab_size: int) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                              or not 1 <= k <= vocab_size):
            raise ValueError(f"top_k must be None or an integer in [1, vocab_size={vocab_size}], "
                             f"got {k!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(self.generator).__name__}")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ``(R,)`` for logits ``(R, V)``."""
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model produced NaN or infinite logits; cannot choose a "
                                     "next token")
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        scaled = logits / self.temperature
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth = scaled.topk(self.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


def step_work(rows: int, layers: int) -> Work:
    """Work of one cached ``LanguageModel.step`` on ``rows`` tokens: every layer, one position."""
    n = rows * layers
    return Work(token_layers=n, expert_calls=n, positions=n)


def step_function(model: LanguageModel, kernel: bool = True) -> Step:
    """What cached decoding calls per token: a ``StepKernel`` built now (a snapshot of the
    weights) if ``kernel`` and the model is a plain ``LanguageModel``, else ``model.step``."""
    return StepKernel.of(model) if kernel and StepKernel.supports(model) else model.step


class CachedCursor:
    """Next-token logits of a batch of prefixes, advanced one token at a time with ``step``
    (``model.step`` or a ``StepKernel`` of the model)."""

    def __init__(self, model: LanguageModel, logits: torch.Tensor, state: DecodeState,
                 step: Step) -> None:
        self.model, self.logits, self.state, self.step = model, logits, state, step
        self.work = Work()

    @classmethod
    def start(cls, model: LanguageModel, prompt: torch.Tensor, step: Step) -> CachedCursor:
        """Feed ``prompt`` ``(B, P)`` one position at a time."""
        state = model.init_state(prompt.shape[0])
        for i in range(prompt.shape[1]):
            logits, state = step(prompt[:, i], state)
        cursor = cls(model, logits, state, step)
        cursor.work = step_work(prompt.numel(), len(state.g))
        return cursor

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not listed in ``rows`` (gathered, so dropped rows are not computed)."""
        self.state = self.state.select(rows)
        self.logits = self.logits.index_select(0, rows)

    def advance(self, tokens: torch.Tensor) -> None:
        self.logits, self.state = self.step(tokens, self.state)
        self.work = self.work + step_work(tokens.shape[0], len(self.state.g))


class RecomputeCursor:
    """The same interface by a full forward pass over each whole prefix for every token."""

    def __init__(self, model: nn.Module, prefix: torch.Tensor) -> None:
        self.model, self.prefix = model, prefix
        self.work = Work()
        self._forward()

    def _forward(self) -> None:
        out = self.model(self.prefix)
        self.logits = out.logits[:, -1]
        self.work = self.work + out.work

    def keep(self, rows: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)

    def advance(self, tokens: torch.Tensor) -> None:
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)
        self._forward()


Cursor = CachedCursor | RecomputeCursor


@dataclass
class Generation:
    """Prompt and generated tokens ``(B, P + T)`` (``T <= max_new_tokens``: the longest row);
    rows that stopped at EOS are padded with ``eos_id``. ``lengths`` ``(B,)`` counts each row's
    generated tokens including its EOS; ``work`` is the model work executed."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    work: Work


def check_model(model: nn.Module) -> None:
    for name in ("cfg", "init_state", "step"):
        if not hasattr(model, name):
            raise TypeError(f"model must be a bk.model.LanguageModel (with cfg, init_state and "
                            f"step); {type(model).__name__} has no {name!r}")


def check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_eos(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab_size}), got {eos_id!r}")


def continue_from(cursor: Cursor, prefix: torch.Tensor, max_new_tokens: int,
                  sampling: Sampling, eos_id: int | None) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prefix`` ``(B, P)``, whose next-token logits
    ``cursor`` holds; finished rows are dropped from the cursor."""
    b, p = prefix.shape
    # Without eos_id no row stops early, so the padding value never survives the final trim.
    out = torch.full((b, p + max_new_tokens), 0 if eos_id is None else eos_id,
                     dtype=torch.int64)
    out[:, :p] = prefix
    # A row still going at the last step generated max_new_tokens; one that stops at step t
    # generated t + 1. ``rows`` indexes the going rows in ``out``: all of them until one stops.
    lengths = torch.full((b,), max_new_tokens, dtype=torch.int64)
    active = torch.arange(b)
    rows: slice | torch.Tensor = slice(None)
    for t in range(max_new_tokens):
        tokens = sampling.choose(cursor.logits)
        out[rows, p + t] = tokens
        if t == max_new_tokens - 1:
            break
        if eos_id is not None:
            stopped = tokens == eos_id
            if bool(stopped.any()):
                lengths[active[stopped]] = t + 1
                going = (~stopped).nonzero().squeeze(1)
                if going.numel() == 0:
                    break
                active, tokens = active[going], tokens[going]
                rows = active
                cursor.keep(going)
        cursor.advance(tokens)
    return Generation(out[:, :p + int(lengths.max())], lengths, cursor.work)


@torch.no_grad()
def decode(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 1.0, top_k: int | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None, use_cache: bool = True,
           kernel: bool = True) -> Generation:
    """Generate after ``prompt`` ``(B, P)``; see ``generate`` for the arguments. ``use_cache``
    False recomputes every prefix; ``kernel`` False steps with ``model.step`` instead of a
    ``StepKernel`` (the same function, one torch operation at a time)."""
    check_model(model)
    model.check_tokens(prompt)
    check_count("max_new_tokens", max_new_tokens, 0)
    vocab = model.cfg.vocab_size
    check_eos(eos_id, vocab)
    sampling = Sampling(temperature, top_k, generator)
    sampling.check(vocab)
    if max_new_tokens == 0:
        return Generation(prompt.clone(), torch.zeros(prompt.shape[0], dtype=torch.int64), Work())
    if use_cache:
        cursor = CachedCursor.start(model, prompt, step_function(model, kernel))
    else:
        cursor = RecomputeCursor(model, prompt)
    return continue_from(cursor, prompt, max_new_tokens, sampling, eos_id)


def generate(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """State-cached generation: ``(B, P + T)`` tokens, prompt first, O(1) work per new token.

    ``temperature == 0`` is greedy; otherwise tokens are sampled from
    ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens (all when None) with
    ``generator``. A row stops after ``eos_id`` and is padded with ``eos_id``; ``T`` is the
    longest row's generated length (``decode(...).lengths`` gives every row's).
    """
    return decode(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                  eos_id=eos_id, generator=generator).tokens


def generate_recompute(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int | None = None,
                       eos_id: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``generate`` by a full forward pass over the whole prefix for every new token."""
    return decode(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                  eos_id=eos_id, generator=generator, use_cache=False).tokens

"""Learned sequence length: as it reads a sequence, a light predictor decides where to stop
computing.

Length bins ``L_0 < L_1 < ... < L_{K-1} = n_seq`` (``16, 32, ..., n_seq``). At each boundary
``L_j`` (``j < K - 1``) that a sequence reaches, the predictor reads the mean embedding of the
tokens read so far, ``0 .. L_j - 1``, and gives a stop score ``z_j`` (one linear map per
boundary). The sequence is computed up to its first boundary with ``z_j > 0`` (stop probability
``sigmoid(z_j) > 1/2``), or in full. A group of sequences with the same length ``L`` really runs
the base model on its first ``L`` tokens; because the model is causal the logits at positions
``< L`` are exactly those of the full-length run. Every original position is scored: the
positions that were not computed get the unigram distribution of the training targets seen in
fine-tuning (counts with an add-one prior, ``fallback_counts``).

Causality. An earlier version scored the bins from the mean embedding of the *whole* input, so
whether position ``i`` was computed (model logits or the fallback) depended on the tokens after
``i``: the logits at ``i`` read the future. Here the decision taken at ``L_j`` reads tokens
``< L_j`` only, and the logits at ``i`` depend on the decisions at boundaries ``<= i``: on
tokens ``0 .. i`` only. It also makes decoding exact: :meth:`step` takes the same decisions
from a running sum of the embeddings as the sequence is generated.

Training signal. Causality also means one full-length pass gives the loss of *every* bin: for
a sequence of length ``N`` and bin ``L``,

    CE(L) = (sum_{i<L} nll_model(i) + sum_{i>=L} nll_unigram(i)) / N,

so the predictor sees the exact cost of truncation. Its stop decisions are sampled as it would
take them, one boundary after the other: ``s_j = 1[z_j + g_j > 0]`` with logistic noise ``g_j``,
a straight-through binary Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017: hard sample
forward, the relaxation ``sigmoid((z_j + g_j) / tau)`` backward). The weight of bin ``k`` is
the probability-like stick-breaking product ``w_k = s_k prod_{j<k} (1 - s_j)`` (the last bin:
``prod_j (1 - s_j)``), exactly the one-hot of the first stop in the forward pass. The predictor's
objective is ``sum_k w_k (CE(L_k) + length_penalty * L_k / n_seq)``: its value is the cost of
the sampled length, its gradient moves stop probability towards the bins whose cost is lower.
The costs are detached, so the predictor does not change the language model; the language model
is trained on the cross-entropy at every position (any position may be computed under some
bin). Training therefore runs at full length; only inference truncates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bk.model import DecodeState, LanguageModel, ModelConfig, ModelOutput, Work
from bk.skip import Subset
from bk.technique import Forcing, Knob, TechniqueModel

BIN_WIDTH = 16
# The predictor's scores are its linear map times this gain: with the optimiser shared with the
# language model, it multiplies the predictor's effective learning rate, since the cost gaps
# it learns from are small (hundredths of a nat).
PREDICTOR_GAIN = 10.0
# Initial stop score at every boundary: the fine-tuned candidate starts as the dense model
# (no stop at inference), and training samples the full length most of the time.
STOP_PRIOR = -2.0


def length_bins(n_seq: int, width: int = BIN_WIDTH) -> tuple[int, ...]:
    """``width, 2 width, ..., n_seq`` (``n_seq`` is always the last bin)."""
    if width < 1 or n_seq < 1:
        raise ValueError(f"need n_seq >= 1 and width >= 1, got n_seq={n_seq}, width={width}")
    bins = tuple(range(width, n_seq, width))
    return (*bins, n_seq)


def truncate_positions(t: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of ``t`` ``(B, N, ...)``."""
    if not 1 <= length <= t.shape[1]:
        raise ValueError(f"cannot truncate {t.shape[1]} positions to {length}; expected "
                         f"1 <= length <= {t.shape[1]}")
    return t[:, :length]


def pad_positions(t: torch.Tensor, length: int, fill: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, L, ...)`` extended to ``length`` positions with ``fill`` (shape ``...``)."""
    if length < t.shape[1]:
        raise ValueError(f"cannot pad {t.shape[1]} positions to fewer ({length})")
    if fill.shape != t.shape[2:]:
        raise ValueError(f"fill must have shape {tuple(t.shape[2:])}, got {tuple(fill.shape)}")
    tail = fill.to(t.dtype).expand(t.shape[0], length - t.shape[1], *fill.shape)
    return torch.cat([t, tail], dim=1)


def first_stop_weights(stop: torch.Tensor) -> torch.Tensor:
    """Stop decisions ``(B, J)`` in [0, 1] -> weights ``(B, J + 1)`` of stopping first at each
    boundary, or never (the last column): ``s_k prod_{j<k} (1 - s_j)`` and ``prod_j (1 - s_j)``.
    For 0/1 decisions this is the one-hot of the first stop; for probabilities, the distribution
    of the stopping point."""
    reached = torch.cat([stop.new_ones(stop.shape[0], 1), torch.cumprod(1 - stop, dim=1)],
                        dim=1)  # (B, J + 1): no stop before boundary k
    return torch.cat([stop * reached[:, :-1], reached[:, -1:]], dim=1)


@dataclass(frozen=True)
class LengthDecodeState(DecodeState):
    """A :class:`DecodeState` plus what the stop decisions read: the sum of the embeddings of
    the tokens so far ``(B, d)`` and which sequences have stopped ``(B,)``."""

    read: torch.Tensor | None = None
    stopped: torch.Tensor | None = None


class LengthAdaptiveModel(TechniqueModel):
    """The ResNet-BK language model computing only a prefix of each input, decided causally.

    Shares every :class:`LanguageModel` parameter name; adds ``length_predictor`` (one stop
    score per bin boundary from the mean embedding read so far; absent when there is a single
    bin, hence no decision) and the buffer ``fallback_counts`` (training-target counts plus one,
    whose normalisation is the distribution used for positions not computed).

    Forcing (:meth:`forced`): the skippable unit is the position, and ``keep`` the share of each
    input's ``N`` positions computed (the target mean length ``keep * N``); the lengths are
    candidate lengths (the bins below ``N``, and ``N``). ``"uniform"``: every sequence gets the
    candidate nearest ``keep * N``; ``"per_token"``: each sequence a random length, uniform on
    an interval centred on ``keep * N`` and rounded stochastically to a neighbouring candidate,
    so the mean is ``keep * N`` (at least the first bin). The predictor does not run; lengths
    are drawn once per batch shape, outside the timed call.
    """

    KNOBS = (
        Knob("length_penalty", float, 0.1,
             "weight of the computed fraction L / n_seq in the predictor's objective", low=0.0,
             grid=(0.0, 0.05, 0.1, 0.2, 0.5), search=(0.0, 1.0)),
    )

    def __init__(self, cfg: ModelConfig, *, length_penalty: float = 0.1,
                 bin_width: int = BIN_WIDTH, gumbel_tau: float = 1.0) -> None:
        super().__init__(cfg)
        self.length_penalty = self.resolve_knobs({"length_penalty": length_penalty})[
            "length_penalty"]
        if not gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau!r}")
        self.gumbel_tau = float(gumbel_tau)
        self.bins = length_bins(cfg.n_seq, bin_width)
        self.length_predictor = None
        if len(self.bins) > 1:
            self.length_predictor = nn.Linear(cfg.d_model, len(self.bins) - 1)
            nn.init.zeros_(self.length_predictor.weight)
            nn.init.constant_(self.length_predictor.bias, STOP_PRIOR / PREDICTOR_GAIN)
        self.register_buffer("fallback_counts", torch.ones(cfg.vocab_size))
        self.forcing: Forcing | None = None
        self._forced_lengths: dict[tuple[int, int], torch.Tensor] = {}

    def candidates(self, n: int) -> torch.Tensor:
        """Lengths an input of ``n`` tokens may get: the boundaries below ``n``, then ``n``."""
        return torch.tensor([*(length for length in self.bins[:-1] if length < n), n])

    def stop_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """Stop score ``z_j`` ``(B, J)`` at each boundary ``L_j < N`` of ``idx`` ``(B, N)``,
        from the mean embedding of tokens ``0 .. L_j - 1`` (read, not trained, by the
        predictor)."""
        ends = self.candidates(idx.shape[1])[:-1]
        if not len(ends):
            return self.embed.weight.new_zeros(idx.shape[0], 0)
        read = self.embed(idx).detach().cumsum(dim=1)[:, ends - 1]  # (B, J, d)
        return self.stop_score(read / ends[:, None].to(read.dtype), slice(0, len(ends)))

    def stop_score(self, mean: torch.Tensor, boundary: int | slice) -> torch.Tensor:
        """``PREDICTOR_GAIN (w_j . mean + b_j)`` for mean embeddings ``(..., d)``."""
        weight, bias = self.length_predictor.weight, self.length_predictor.bias
        return PREDICTOR_GAIN * ((mean * weight[boundary]).sum(dim=-1) + bias[boundary])

    def length_probabilities(self, idx: torch.Tensor) -> torch.Tensor:
        """Probability ``(B, J + 1)`` of each candidate length under the predictor's stop
        probabilities ``sigmoid(z_j)`` (the distribution training samples from)."""
        return first_stop_weights(torch.sigmoid(self.stop_scores(idx)))

    def decide_lengths(self, idx: torch.Tensor) -> torch.Tensor:
        """Lengths ``(B,)``: the first boundary with a positive stop score, else ``N``."""
        stop = self.stop_scores(idx) > 0
        first = (~stop).to(torch.int64).cumprod(dim=1).sum(dim=1)  # J where no stop
        return self.candidates(idx.shape[1]).index_select(0, first)

    def fallback(self) -> torch.Tensor:
        """Log-probabilities ``(V,)`` output at positions that were not computed."""
        return torch.log(self.fallback_counts / self.fallback_counts.sum())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        if self.forcing is not None:
            return self.run_at_lengths(idx, self.forced_lengths(*idx.shape), targets)
        if self.training:
            return self.train_forward(idx, targets)
        return self.run_at_lengths(idx, self.decide_lengths(idx), targets)

    def run_at_lengths(self, idx: torch.Tensor, lengths: torch.Tensor,
                       targets: torch.Tensor | None = None) -> ModelOutput:
        """Run each sequence on its first ``lengths[b]`` tokens only, grouped by length (one
        :class:`Subset` of rows per length), and restore the outputs to the input length with
        the fallback distribution."""
        self.check_tokens(idx)
        b, n = idx.shape
        if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > n).any()):
            raise ValueError(f"lengths must have shape ({b},) with values in [1, {n}], got "
                             f"shape {tuple(lengths.shape)} and values {lengths.tolist()}")
        fill = self.fallback()
        logits, work = None, Work()
        for length in torch.unique(lengths).tolist():
            rows = Subset.where(lengths == length)
            whole = rows.size == b
            out = LanguageModel.forward(
                self, truncate_positions(idx if whole else rows.gather(idx), length))
            padded = pad_positions(out.logits, n, fill)
            if logits is None:
                logits = padded if whole else padded.new_empty(b, n, padded.shape[-1])
            if not whole:
                logits = rows.scatter(logits, padded)
            work = work + out.work
        computed = torch.arange(n)[None, :] < lengths[:, None]
        stats = {"length": lengths.to(logits.dtype)[:, None].expand(b, n),
                 "layers_per_token": computed.to(logits.dtype) * self.cfg.n_layers}
        return self.output(logits, targets, {}, work, stats)

    def train_forward(self, idx: torch.Tensor, targets: torch.Tensor | None) -> ModelOutput:
        """Full-length pass; the predictor samples its stops and is charged the exact cost of
        the length it sampled (``aux["length"]``)."""
        b, n = idx.shape
        full = LanguageModel.forward(self, idx, targets)
        if targets is not None:
            self.fallback_counts += torch.bincount(targets.reshape(-1),
                                                   minlength=self.cfg.vocab_size)
        scores = self.stop_scores(idx)
        u = torch.rand_like(scores)
        noisy = scores + torch.log(u) - torch.log1p(-u)  # logistic noise
        soft = torch.sigmoid(noisy / self.gumbel_tau)
        weights = first_stop_weights((noisy > 0).to(soft.dtype) + soft - soft.detach())
        lengths = self.candidates(n).index_select(0, weights.detach().argmax(dim=-1))
        stats = {"length": lengths.to(full.logits.dtype)[:, None].expand(b, n),
                 "layers_per_token": full.stats["layers_per_token"]}
        aux = dict(full.aux)
        if targets is not None and scores.shape[1]:
            fill = self.fallback()
            model_nll = F.cross_entropy(full.logits.transpose(1, 2), targets, reduction="none")
            fallback_nll = -fill.index_select(0, targets.reshape(-1)).view(b, n)
            cost = self.bin_cost(model_nll.detach(), fallback_nll.detach())
            aux["length"] = (weights * cost).sum(dim=-1).mean()
        return self.output(full.logits, targets, aux, full.work, stats)

    def bin_cost(self, model_nll: torch.Tensor, fallback_nll: torch.Tensor) -> torch.Tensor:
        """``CE(L) + length_penalty * L / n_seq`` per sequence and candidate length ``L``,
        ``(B, J + 1)``."""
        n = model_nll.shape[1]
        zero = model_nll.new_zeros(model_nll.shape[0], 1)
        model_prefix = torch.cat([zero, model_nll.cumsum(dim=1)], dim=1)  # sum over i < L
        fallback_prefix = torch.cat([zero, fallback_nll.cumsum(dim=1)], dim=1)
        lengths = self.candidates(n)
        ce = (model_prefix[:, lengths] + fallback_prefix[:, -1:] - fallback_prefix[:, lengths]) / n
        return ce + self.length_penalty * lengths.to(ce.dtype) / self.cfg.n_seq

    # -- forcing -----------------------------------------------------------------------------

    def forced(self, forcing: Forcing) -> LengthAdaptiveModel | None:
        if len(self.bins) == 1:  # a single bin: the model never decides a length
            return None
        forced = copy.copy(self)
        forced.forcing = forcing
        forced._forced_lengths = {}
        return forced

    def forced_lengths(self, b: int, n: int) -> torch.Tensor:
        """The forcing's lengths ``(b,)`` for inputs of ``n`` tokens, drawn once per shape."""
        if (b, n) not in self._forced_lengths:
            lengths = self.candidates(n).double()
            mean = self.forcing.keep * n
            if self.forcing.pattern == "uniform":
                nearest = (lengths - mean).abs().flip(0).argmin()  # ties: the longer
                chosen = lengths[len(lengths) - 1 - nearest].expand(b)
            else:
                generator = self.forcing.generator()
                spread = max(0.0, min(mean - float(lengths[0]), n - mean))
                uniform = torch.rand(b, generator=generator, dtype=torch.float64)
                wanted = (mean + spread * (2 * uniform - 1)).clamp(float(lengths[0]), n)
                above = torch.searchsorted(lengths, wanted).clamp(max=len(lengths) - 1)
                below = (above - 1).clamp(min=0)
                low, high = lengths[below], lengths[above]
                up = (wanted - low) / (high - low).clamp(min=1)  # P(high): the mean stays
                take_high = torch.rand(b, generator=generator, dtype=torch.float64) < up
                chosen = torch.where(take_high, high, low)
            self._forced_lengths[b, n] = chosen.long()
        return self._forced_lengths[b, n]

    # -- decoding ----------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> LengthDecodeState:
        self._check_not_forced()
        state = super().init_state(batch_size)
        dtype = self.embed.weight.dtype
        return LengthDecodeState(state.g, 0, read=torch.zeros(batch_size, self.cfg.d_model,
                                                              dtype=dtype),
                                 stopped=torch.zeros(batch_size, dtype=torch.bool))

    def step(self, tokens: torch.Tensor, state: LengthDecodeState
             ) -> tuple[torch.Tensor, LengthDecodeState]:
        """Logits ``(B, V)`` after ``tokens`` ``(B,)``: at a bin boundary a sequence decides
        from the tokens before it whether to stop; a stopped sequence is not computed (its
        logits are the fallback) and stays stopped."""
        self._check_not_forced()
        self.check_tokens(tokens[:, None])
        b, position = tokens.shape[0], state.position
        e = self.embed(tokens)
        stopped = state.stopped
        if position in self.bins[:-1]:
            mean = state.read / position
            stopped = stopped | (self.stop_score(mean, self.bins.index(position)) > 0)
        running = Subset.where(~stopped)
        logits = self.fallback().to(e.dtype).expand(b, -1)
        g = list(state.g)
        if running.size:
            whole = running.size == b
            x = e if whole else running.gather(e)
            for layer, block in enumerate(self.blocks):
                g_prev = g[layer] if whole or g[layer] is None else running.gather(g[layer])
                x, g_new = block.step(x, g_prev)
                g[layer] = g_new if whole else running.scatter(g[layer], g_new)
            out = self.head(self.norm(x))
            logits = out if whole else running.scatter(logits, out)
        return logits, LengthDecodeState(tuple(g), position + 1, read=state.read + e,
                                         stopped=stopped)

    def _check_not_forced(self) -> None:
        if self.forcing is not None:
            raise NotImplementedError("a forced model measures forward ceilings; it does not "
                                      "decode")

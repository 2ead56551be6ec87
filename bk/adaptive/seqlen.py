"""Learned sequence length: a light predictor picks how many leading positions to compute.

The predictor reads the mean embedding of the input and scores length bins ``16, 32, ...,
n_seq``. At inference each sequence gets its arg-max bin ``L``; sequences are grouped by ``L``
and each group really runs the base model on its first ``L`` tokens. Because the model is
causal, the logits at positions ``< L`` are exactly those of the full-length run. Every original
position is scored: the positions that were not computed get the unigram distribution of the
training targets seen in fine-tuning (counts with an add-one prior, ``fallback_counts``).

Training signal. Causality also means one full-length pass gives the loss of *every* bin: for
a sequence of length ``N`` and bin ``L``,

    CE(L) = (sum_{i<L} nll_model(i) + sum_{i>=L} nll_unigram(i)) / N,

so the predictor sees the exact cost of truncation. Its objective is
``sum_k w_k (CE(L_k) + length_penalty * L_k / n_seq)`` with ``w`` a straight-through
Gumbel-softmax sample of its bin distribution (Jang et al. 2017, eq. 2; hard one-hot forward,
soft gradient): the forward value is the cost of the sampled bin, the gradient moves probability
towards the bins whose cost is lower. The costs are detached, so the predictor does not change
the language model; the language model is trained on the cross-entropy at every position (any
position may be computed under some bin). Training therefore runs at full length; only
inference truncates.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bk.model import LanguageModel, ModelConfig, ModelOutput, Work

BIN_WIDTH = 16
# The predictor's scores are its linear map times this gain: with the optimiser shared with the
# language model, it multiplies the predictor's effective learning rate, since the cost gaps
# it learns from are small (hundredths of a nat).
PREDICTOR_GAIN = 10.0
# Initial score margin of the full-length bin: the fine-tuned candidate starts as the dense model.
FULL_LENGTH_PRIOR = 1.0


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


class LengthAdaptiveModel(LanguageModel):
    """The ResNet-BK language model computing only a predicted prefix of each input.

    Shares every :class:`LanguageModel` parameter name; adds ``length_predictor`` (bin scores
    from the mean input embedding) and the buffer ``fallback_counts`` (training-target counts
    plus one, whose normalisation is the distribution used for positions not computed).
    """

    def __init__(self, cfg: ModelConfig, *, length_penalty: float = 0.1,
                 bin_width: int = BIN_WIDTH, gumbel_tau: float = 1.0) -> None:
        super().__init__(cfg)
        if isinstance(length_penalty, bool) or not length_penalty >= 0:
            raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}")
        if not gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau!r}")
        self.length_penalty = float(length_penalty)
        self.gumbel_tau = float(gumbel_tau)
        self.bins = length_bins(cfg.n_seq, bin_width)
        self.length_predictor = nn.Linear(cfg.d_model, len(self.bins))
        nn.init.zeros_(self.length_predictor.weight)
        nn.init.zeros_(self.length_predictor.bias)
        with torch.no_grad():
            self.length_predictor.bias[-1] = FULL_LENGTH_PRIOR / PREDICTOR_GAIN
        self.register_buffer("fallback_counts", torch.ones(cfg.vocab_size))

    def bin_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """Predictor scores ``(B, bins)``; the embedding is read, not trained, by the predictor."""
        features = self.embed(idx).detach().mean(dim=1)
        return PREDICTOR_GAIN * self.length_predictor(features)

    def fallback(self) -> torch.Tensor:
        """Log-probabilities ``(V,)`` output at positions that were not computed."""
        return torch.log(self.fallback_counts / self.fallback_counts.sum())

    def lengths_of(self, choice: torch.Tensor, n: int) -> torch.Tensor:
        """Lengths ``(B,)`` of the chosen bins, capped at the input length ``n``."""
        return torch.tensor(self.bins).index_select(0, choice).clamp(max=n)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        if self.training:
            return self.train_forward(idx, targets)
        lengths = self.lengths_of(self.bin_scores(idx).argmax(dim=-1), idx.shape[1])
        return self.run_at_lengths(idx, lengths, targets)

    def run_at_lengths(self, idx: torch.Tensor, lengths: torch.Tensor,
                       targets: torch.Tensor | None = None) -> ModelOutput:
        """Run each sequence on its first ``lengths[b]`` tokens only, grouped by length, and
        restore the outputs to the input length with the fallback distribution."""
        self.check_tokens(idx)
        b, n = idx.shape
        if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > n).any()):
            raise ValueError(f"lengths must have shape ({b},) with values in [1, {n}], got "
                             f"shape {tuple(lengths.shape)} and values {lengths.tolist()}")
        fill = self.fallback()
        rows_of, outputs = [], []
        work = Work()
        for length in torch.unique(lengths).tolist():
            rows = (lengths == length).nonzero().squeeze(1)
            out = LanguageModel.forward(self, truncate_positions(idx.index_select(0, rows),
                                                                 length))
            rows_of.append(rows)
            outputs.append(pad_positions(out.logits, n, fill))
            work = work + out.work
        order = torch.cat(rows_of)
        logits = torch.cat(outputs).index_select(0, torch.argsort(order))
        length_per_token = lengths.to(logits.dtype)[:, None].expand(b, n)
        computed = torch.arange(n)[None, :] < lengths[:, None]
        stats = {"length": length_per_token,
                 "layers_per_token": computed.to(logits.dtype) * self.cfg.n_layers}
        ce = loss = None
        if targets is not None:
            ce = loss = F.cross_entropy(logits.reshape(b * n, -1), targets.reshape(-1))
        return ModelOutput(logits, loss, ce, work, stats)

    def train_forward(self, idx: torch.Tensor, targets: torch.Tensor | None) -> ModelOutput:
        """Full-length pass; outputs are scored as if truncated to a Gumbel-sampled bin."""
        b, n = idx.shape
        full = LanguageModel.forward(self, idx, targets)
        if targets is not None:
            self.fallback_counts += torch.bincount(targets.reshape(-1),
                                                   minlength=self.cfg.vocab_size)
        fill = self.fallback()
        weights = F.gumbel_softmax(self.bin_scores(idx), tau=self.gumbel_tau, hard=True)
        lengths = self.lengths_of(weights.argmax(dim=-1), n)
        computed = torch.arange(n)[None, :] < lengths[:, None]
        logits = torch.where(computed[..., None], full.logits, fill.expand(b, n, -1))
        stats = {"length": lengths.to(logits.dtype)[:, None].expand(b, n),
                 "layers_per_token": full.stats["layers_per_token"]}
        ce = loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.reshape(b * n, -1), targets.reshape(-1))
            model_nll = F.cross_entropy(full.logits.transpose(1, 2), targets, reduction="none")
            fallback_nll = -fill.index_select(0, targets.reshape(-1)).view(b, n)
            cost = self.bin_cost(model_nll.detach(), fallback_nll.detach())
            predictor = (weights * cost).sum(dim=-1).mean()
            loss = full.loss + predictor
        return ModelOutput(logits, loss, ce, full.work, stats)

    def bin_cost(self, model_nll: torch.Tensor, fallback_nll: torch.Tensor) -> torch.Tensor:
        """``CE(L_k) + length_penalty * L_k / n_seq`` per sequence and bin, ``(B, bins)``."""
        n = model_nll.shape[1]
        zero = model_nll.new_zeros(model_nll.shape[0], 1)
        model_prefix = torch.cat([zero, model_nll.cumsum(dim=1)], dim=1)  # sum over i < L
        fallback_prefix = torch.cat([zero, fallback_nll.cumsum(dim=1)], dim=1)
        lengths = torch.tensor(self.bins).clamp(max=n)
        ce = (model_prefix[:, lengths] + fallback_prefix[:, -1:] - fallback_prefix[:, lengths]) / n
        return ce + self.length_penalty * lengths.to(ce.dtype) / self.cfg.n_seq


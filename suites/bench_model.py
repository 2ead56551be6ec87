"""The dense ResNet-BK model: forward pass, training step, throughput, and what a forward is made
of: the aten operations it runs, and the share of its time each part takes."""

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bk.model import LanguageModel, ModelConfig
from bk.moe import MoEFeedForward

VOCAB = 80
SHAPES = {scale: ModelConfig.at_scale(scale, vocab_size=VOCAB) for scale in ("tiny", "small")}
PARTS = ("experts", "dispatch", "router", "bk_path", "rest")
_MODELS: dict[int, LanguageModel] = {}


def model(n_seq: int) -> LanguageModel:
    if n_seq not in _MODELS:
        torch.manual_seed(0)
        _MODELS[n_seq] = LanguageModel(ModelConfig(vocab_size=VOCAB, n_seq=n_seq))
    return _MODELS[n_seq]


def tokens(batch: int, n_seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_seq), generator=torch.Generator().manual_seed(1))


class Forward:
    """The two target workloads: 32 x 128 tokens, and 4 x 1024 tokens."""

    params = ["32x128", "4x1024"]
    param_names = ["batch_x_seq"]

    def setup(self, shape):
        batch, n_seq = map(int, shape.split("x"))
        self.model = model(n_seq).eval()
        self.x = tokens(batch, n_seq)

    def time_forward(self, shape):
        with torch.no_grad():
            self.model(self.x)

    def track_tokens_per_second(self, shape):
        with torch.no_grad():
            self.model(self.x)
            start = time.perf_counter()
            self.model(self.x)
            return self.x.numel() / (time.perf_counter() - start)

    track_tokens_per_second.unit = "tokens/s"


class TrainStep:
    def setup(self):
        self.model = model(128).train()
        self.x = tokens(32, 128)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def time_train_step(self):
        out = self.model(self.x, self.x)
        self.optimizer.zero_grad()
        out.loss.backward()
        self.optimizer.step()


# -- what a forward is made of ---------------------------------------------------------------


def shaped_model(shape: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(SHAPES[shape]).eval()


class _AtenCounter(TorchDispatchMode):
    """Counts aten operations, and among them those that compute (return no view or alias)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.computing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        alias = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
        self.computing += not alias or any(a.is_write for a in alias)
        return func(*args, **(kwargs or {}))


def aten_ops(net: LanguageModel, idx: torch.Tensor) -> tuple[int, int]:
    """aten operations one no-grad forward dispatches: all, and those that compute (views and
    detaches excluded). The numba kernels' work is no aten operation; each array they read
    or write costs one detach."""
    with torch.no_grad():
        net(idx)
        with _AtenCounter() as counter:
            net(idx)
    return counter.count, counter.computing


def instrument(net: LanguageModel, clock: dict[str, float],
               timer: Callable[[], float] = time.thread_time) -> None:
    """Time the methods that make up each part, on this model object only: each wrapped call
    adds its own time, less that of wrapped calls inside it, to ``clock[part]``. Times are CPU
    seconds of this thread (all of a one-thread forward runs on it), so that time the process
    spends preempted by others on a shared machine is no part's."""
    inner: list[float] = []

    def wrap(owner: object, name: str, part: str) -> None:
        method: Callable = getattr(owner, name)

        def timed(*args, **kwargs):
            inner.append(0.0)
            start = timer()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = timer() - start
                clock[part] += elapsed - inner.pop()
                if inner:
                    inner[-1] += elapsed

        setattr(owner, name, timed)

    for block in net.blocks:
        moe = block.moe
        unfuse_residual_sum(moe)
        wrap(moe, "route", "router")
        for name in ("sort", "stacked_weights", "gated_outputs"):
            wrap(moe, name, "dispatch")
        wrap(moe, "expert_outputs", "experts")
        for module in (block.potential, block.readout):
            wrap(module, "forward", "bk_path")
        wrap(block, "resolvent", "bk_path")


def unfuse_residual_sum(moe: MoEFeedForward) -> None:
    """Make ``moe.combine(y, groups, (x, m))`` two calls: ``moe.gated_outputs``, the gated
    expert outputs ``f`` in token order (the dispatch's part of the combine), then ``x + f + m``
    summed by torch, which a dense feed-forward pays too (the anatomy leaves it to "rest"). The
    result is the same bit for bit (floating-point sums commute); the fused pass that the
    model runs costs less than the two together."""
    moe.gated_outputs = moe.combine

    def combine(y, groups, residual=None, *, weights=None):
        f = moe.gated_outputs(y, groups, weights=weights)
        return f if residual is None else residual[0] + f + residual[1]

    moe.combine = combine


def part_shares(shape: str, repeats: int = 15) -> dict[str, float]:
    """Median share (percent) of each part in instrumented no-grad forwards of 32 x 128 tokens
    of the dense model of ``shape`` (see ``anatomy``)."""
    return anatomy(shaped_model(shape), tokens(32, 128), repeats)


def anatomy(net: LanguageModel, idx: torch.Tensor, repeats: int,
            timer: Callable[[], float] = time.thread_time) -> dict[str, float]:
    """Median share (percent) of each part in ``repeats`` instrumented no-grad forwards of
    ``idx`` (``timer``: thread CPU time, see ``instrument``); "rest" is what no part claims
    (norms, embedding, head, residual sums, checks, reshapes). The instrumented forward must
    give the model's logits exactly."""
    with torch.no_grad():
        expected = net(idx).logits
        clock = dict.fromkeys(PARTS, 0.0)
        instrument(net, clock, timer)
        torch.testing.assert_close(net(idx).logits, expected, rtol=0, atol=0)
        shares: dict[str, list[float]] = {part: [] for part in PARTS}
        for _ in range(repeats):
            clock.update(dict.fromkeys(PARTS, 0.0))
            start = timer()
            net(idx)
            total = timer() - start
            clock["rest"] += total - sum(clock.values())
            for part in PARTS:
                shares[part].append(100 * clock[part] / total)
    return {part: statistics.median(values) for part, values in shares.items()}


class ForwardAnatomy:
    """Per commit: aten operations per dense forward, and the share of the forward each part
    takes (MoE experts, MoE dispatch bookkeeping, router, BK path, rest), at the tiny model and
    at a small one (d=256, 8 layers, d_expert=512, 8 channels), 32 x 128 tokens, one thread."""

    params = (list(SHAPES), list(PARTS))
    param_names = ["shape", "part"]
    timeout = 600

    def setup_cache(self):
        return {shape: part_shares(shape) for shape in SHAPES}

    def track_share(self, shares, shape, part):
        return shares[shape][part]

    track_share.unit = "%"


class AtenOps:
    params = list(SHAPES)
    param_names = ["shape"]

    def setup(self, shape):
        self.ops = aten_ops(shaped_model(shape), tokens(32, 128))

    def track_aten_ops(self, shape):
        return self.ops[0]

    track_aten_ops.unit = "ops"

    def track_aten_computing_ops(self, shape):
        return self.ops[1]

    track_aten_computing_ops.unit = "ops"

"""bk.core: the resolvent diagonal (numba kernels), forward and forward+backward, and the
Python-loop reference it replaces."""

import time

import torch

from bk.core import resolvent_diag, resolvent_diag_loop

torch.set_num_threads(1)

BATCH = 8
SIZES = [256, 1024, 4096, 16384]
_INPUTS: dict[tuple, tuple] = {}


def inputs(n: int, dtype: str) -> tuple:
    """Cached (a, b, c, z, w): a random problem of batch 8 (requires_grad set) and an upstream
    gradient w. b c > 0 and Im z = 0.5, the regime of the language model."""
    key = (n, dtype)
    if key not in _INPUTS:
        real = getattr(torch, dtype)
        cplx = torch.complex64 if real == torch.float32 else torch.complex128
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(BATCH, n, generator=gen).to(real)
        b = (0.1 + torch.rand(BATCH, n - 1, generator=gen)).to(real)
        c = (0.1 + torch.rand(BATCH, n - 1, generator=gen)).to(real)
        z = torch.complex(torch.randn(BATCH, generator=gen), torch.full((BATCH,), 0.5)).to(cplx)
        w = torch.randn(BATCH, n, generator=gen).to(cplx)
        _INPUTS[key] = (*(t.requires_grad_() for t in (a, b, c, z)), w)
    return _INPUTS[key]


class ResolventForward:
    params = [SIZES, [True, False], ["float32", "float64"]]
    param_names = ["N", "causal", "dtype"]

    def setup(self, n, causal, dtype):
        *self.args, _ = inputs(n, dtype)
        resolvent_diag(*self.args, causal=causal)  # compiles (or loads) the kernels

    def time_forward(self, n, causal, dtype):
        with torch.no_grad():
            resolvent_diag(*self.args, causal=causal)


class ResolventForwardBackward:
    params = [SIZES, [True, False], ["float32", "float64"]]
    param_names = ["N", "causal", "dtype"]

    def setup(self, n, causal, dtype):
        *self.args, self.w = inputs(n, dtype)
        self.time_forward_backward(n, causal, dtype)

    def time_forward_backward(self, n, causal, dtype):
        torch.autograd.grad(resolvent_diag(*self.args, causal=causal), self.args, self.w)


class LoopReference:
    """The per-position Python loop (the reference), batch 8, N = 4096, float32, forward."""

    params = [[True, False]]
    param_names = ["causal"]
    number = 1
    repeat = (1, 3, 60.0)
    timeout = 600

    def setup(self, causal):
        *self.args, _ = inputs(4096, "float32")
        resolvent_diag(*self.args, causal=causal)

    def time_loop_forward(self, causal):
        with torch.no_grad():
            resolvent_diag_loop(*self.args, causal=causal)

    def track_speedup_vs_loop(self, causal):
        """t_fast / t_loop, timed in-process, alternating fast and loop runs (ABAB) so that
        drifting machine load hits both; best of each. Lower is better."""
        fast, loop = [], []
        with torch.no_grad():
            for _ in range(3):
                for _ in range(20):  # the fast call is ~1000x shorter: take more samples
                    start = time.perf_counter()
                    resolvent_diag(*self.args, causal=causal)
                    fast.append(time.perf_counter() - start)
                start = time.perf_counter()
                resolvent_diag_loop(*self.args, causal=causal)
                loop.append(time.perf_counter() - start)
        return min(fast) / min(loop)

    track_speedup_vs_loop.unit = "ratio"

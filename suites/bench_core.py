"""bk.core: the resolvent diagonal (numba kernels), forward and forward+backward; its cost
against a same-math reference kernel (bench/reference_kernel.py), its fixed cost per call, and
the Python-loop reference it replaces.

The ``track_*_time_ratio`` benchmarks are t_resolvent_diag / t_reference_kernel, timed
alternately in one process on one thread (bench.measure.paired_speedup): what the API costs
beyond the arithmetic (validation, layout copies, dtype conversion, dispatch). Lower is better;
1 is the kernel alone."""

import statistics
import timeit

import numpy as np
import torch

from bench import reference_kernel
from bench.measure import paired_speedup
from bk.core import resolvent_diag, resolvent_diag_loop

BATCH = 8
SIZES = [256, 1024, 4096, 16384]
_INPUTS: dict[tuple, tuple] = {}
_CASES: dict[str, tuple] = {}


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


# ------------------------------------------------------------------ against the same-math kernel

# "model BxCxN": as BKBlock.resolvent calls it: float32 potentials stored (B, N, C) passed as the
# transposed view (B, C, N), couplings 1 as numbers, z per channel, causal; the upstream gradient
# stored like the result, (B, N, C), as the model's backward passes it. "tensors RxN": float64
# (R, N) a, b, c and z per row.
CASES = ["model 32x4x128 causal", "model 32x8x128 causal", "tensors 8x4096 causal",
         "tensors 8x4096 full"]


def case(name: str) -> tuple:
    """Cached (api arguments, causal, reference problem, upstream gradient as torch and as
    reference columns) of a case."""
    if name not in _CASES:
        kind, shape, mode = name.split()
        gen = torch.Generator().manual_seed(0)
        if kind == "model":
            batch, channels, n = (int(x) for x in shape.split("x"))
            v = 0.3 * torch.randn(batch, n, channels, generator=gen)
            a = (-2.0 + v).transpose(1, 2).requires_grad_()
            z = torch.complex(torch.linspace(-3.5, -0.5, channels), torch.full((channels,), 0.7))
            args = (a, 1.0, 1.0, z.requires_grad_())
            rows = a.detach().reshape(-1, n).double()
            ones = torch.ones(rows.shape[0], n - 1, dtype=torch.float64)
            problem = reference_kernel.Problem.from_torch(rows, ones, ones,
                                                          z.detach().repeat(batch))
        else:
            rows, n = (int(x) for x in shape.split("x"))
            a = torch.randn(rows, n, generator=gen, dtype=torch.float64)
            b, c = (0.1 + torch.rand(rows, n - 1, generator=gen, dtype=torch.float64)
                    for _ in range(2))
            z = torch.complex(torch.randn(rows, generator=gen, dtype=torch.float64),
                              torch.full((rows,), 0.5, dtype=torch.float64))
            args = tuple(t.requires_grad_() for t in (a, b, c, z))
            problem = reference_kernel.Problem.from_torch(a, b, c, z)
        g = resolvent_diag(*args, causal=mode == "causal")
        w = torch.randn(g.shape, dtype=g.dtype, generator=gen)
        if kind == "model":  # the model's upstream gradient is stored like g: (B, N, C)
            w = w.transpose(1, 2).contiguous().transpose(1, 2)
        flat = w.reshape(-1, n).to(torch.complex128)
        columns = tuple(np.ascontiguousarray(x.numpy().T) for x in (flat.real, flat.imag))
        _CASES[name] = (args, mode == "causal", problem, w, columns)
    return _CASES[name]


def _tensors(args):
    return [t for t in args if isinstance(t, torch.Tensor)]


class ReferenceKernelRatio:
    """t_resolvent_diag / t_reference_kernel (see the module docstring); lower is better."""

    params = [CASES]
    param_names = ["case"]
    timeout = 300

    def setup(self, name):
        case(name)

    def track_forward_time_ratio(self, name):
        args, causal, problem, _, _ = case(name)
        # Tensors that need no gradient take the API's no-grad path, as inference does, without
        # a torch.no_grad() context per call: a model enters it once per forward, not per call.
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)

        def api():
            resolvent_diag(*args, causal=causal)

        speed = paired_speedup(lambda: reference_kernel.forward(problem, causal), api,
                               rounds=15, warmup=2, number=10)
        return 1 / speed.speedup

    def track_forward_backward_time_ratio(self, name):
        args, causal, problem, w, columns = case(name)
        tensors = _tensors(args)
        speed = paired_speedup(
            lambda: reference_kernel.forward_backward(problem, *columns, causal),
            lambda: torch.autograd.grad(resolvent_diag(*args, causal=causal), tensors, w),
            rounds=15, warmup=2, number=5)
        return 1 / speed.speedup

    track_forward_time_ratio.unit = "ratio"
    track_forward_backward_time_ratio.unit = "ratio"


class FixedCost:
    """Microseconds per call of a 1 x 1 problem: the cost of a call that does no work."""

    def setup(self):
        self.a = torch.zeros(1, 1, dtype=torch.float64)
        self.b = torch.zeros(1, 0, dtype=torch.float64)
        self.z = torch.tensor([0.5j], dtype=torch.complex128)

    def _per_call(self, call) -> float:
        timer = timeit.Timer(call)
        timer.timeit(100)
        return statistics.median(timer.repeat(7, 500)) / 500 * 1e6

    def track_fixed_cost_tensors(self):
        return self._per_call(lambda: resolvent_diag(self.a, self.b, self.b, self.z))

    def track_fixed_cost_numbers(self):
        return self._per_call(lambda: resolvent_diag(self.a, 1.0, 1.0, 0.5j, causal=True))

    track_fixed_cost_tensors.unit = "us"
    track_fixed_cost_numbers.unit = "us"


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
        """t_loop / t_resolvent_diag (the figure the docs quote), paired in one process on one
        thread: median of the per-round ratios. Higher is better."""
        with torch.no_grad():
            speed = paired_speedup(lambda: resolvent_diag_loop(*self.args, causal=causal),
                                   lambda: resolvent_diag(*self.args, causal=causal),
                                   rounds=3, warmup=1)
        return speed.speedup

    track_speedup_vs_loop.unit = "speedup"

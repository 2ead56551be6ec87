"""Tests for bk.core: the resolvent diagonal of a tridiagonal matrix (full and causal), its
exact gradients, the loop reference, the decoding step and the input validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bench import reference_kernel
from bk.core import causal_step, resolvent_diag, resolvent_diag_loop
from tests.strategies import seeds

F64, C128 = torch.float64, torch.complex128


# ------------------------------------------------------------------------------------ helpers


def tridiagonal(a, b, c, z):
    """The dense matrix T - zI in complex128, batched."""
    n = a.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1], c.shape[:-1], z.shape)
    m = torch.zeros(*batch, n, n, dtype=C128)
    idx = torch.arange(n)
    m[..., idx, idx] = a.to(C128) - z.to(C128)[..., None]
    m[..., idx[:-1], idx[1:]] = b.to(C128)
    m[..., idx[1:], idx[:-1]] = c.to(C128)
    return m


def dense_diag(a, b, c, z, causal):
    """Oracle: the diagonal of a dense inverse; for causal, of each leading block's inverse."""
    m = tridiagonal(a, b, c, z)
    if not causal:
        return torch.linalg.inv(m).diagonal(dim1=-2, dim2=-1)
    n = m.shape[-1]
    return torch.stack([torch.linalg.inv(m[..., : i + 1, : i + 1])[..., i, i] for i in range(n)],
                       dim=-1)


def random_problem(seed, batch, n, *, signs="positive", z_shape=None, dtype=F64, imag=None):
    """Random non-constant asymmetric a, b, c and complex z.

    signs="positive": b, c > 0 (b c > 0, T similar to a symmetric matrix), Im z in [0.1, 1.1].
    signs="mixed": b, c of both signs with |b|, |c| <= 0.35, Im z >= 1, so |b c| <= (Im z)^2/8:
    every leading and trailing block of T - zI is then well conditioned.
    """
    gen = torch.Generator().manual_seed(seed)
    a = 2 * torch.randn(*batch, n, generator=gen, dtype=F64)
    if signs == "positive":
        b = 0.2 + 1.3 * torch.rand(*batch, n - 1, generator=gen, dtype=F64)
        c = 0.2 + 1.3 * torch.rand(*batch, n - 1, generator=gen, dtype=F64)
        lo = 0.1
    else:
        b = 0.7 * torch.rand(*batch, n - 1, generator=gen, dtype=F64) - 0.35
        c = 0.7 * torch.rand(*batch, n - 1, generator=gen, dtype=F64) - 0.35
        lo = 1.0
    z_shape = batch if z_shape is None else z_shape
    re_z = torch.randn(z_shape, generator=gen, dtype=F64)
    im_z = lo + torch.rand(z_shape, generator=gen, dtype=F64) if imag is None else imag
    z = torch.complex(re_z, im_z * torch.ones_like(re_z))
    cdtype = C128 if dtype == F64 else torch.complex64
    return a.to(dtype), b.to(dtype), c.to(dtype), z.to(cdtype)


# Batch layouts (a, b, c, z batch shapes) including broadcasting of every argument.
LAYOUTS = [
    ((), (), (), ()),
    ((3,), (3,), (3,), (3,)),
    ((2, 3), (2, 3), (2, 3), (2, 3)),
    ((), (), (), (4,)),  # one problem, several shifts
    ((2, 1), (1,), (2, 3), (3,)),
    ((1,), (2, 1), (), (2, 1)),
]


def layout_problem(seed, layout, n, signs, dtype=F64):
    """A random problem whose a, b, c, z have the batch shapes of `layout`."""
    sa, sb, sc, sz = layout
    a, b, c, z = random_problem(seed, (), n, signs=signs, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    a = a + 0.5 * torch.randn(*sa, n, generator=gen, dtype=F64).to(dtype)
    b = b * (1 + 0.3 * torch.rand(*sb, n - 1, generator=gen, dtype=F64)).to(dtype)
    c = c * (1 + 0.3 * torch.rand(*sc, n - 1, generator=gen, dtype=F64)).to(dtype)
    z = z + torch.randn(sz, generator=gen, dtype=F64).to(z.dtype)
    return a, b, c, z


def upstream(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=gen, dtype=F64),
                         torch.randn(shape, generator=gen, dtype=F64))


problems = st.builds(
    dict,
    seed=seeds,
    layout=st.sampled_from(LAYOUTS),
    signs=st.sampled_from(["positive", "mixed"]),
)


# --------------------------------------------------------------------------- dense oracle


@given(p=problems, n=st.integers(1, 300))
def test_full_diagonal_equals_dense_inverse_diagonal(p, n):
    a, b, c, z = layout_problem(p["seed"], p["layout"], n, p["signs"])
    expected = dense_diag(a, b, c, z, causal=False)
    torch.testing.assert_close(resolvent_diag(a, b, c, z), expected, rtol=1e-9, atol=1e-12)


@given(p=problems, n=st.integers(1, 64))
def test_causal_diagonal_equals_leading_block_inverse(p, n):
    a, b, c, z = layout_problem(p["seed"], p["layout"], n, p["signs"])
    expected = dense_diag(a, b, c, z, causal=True)
    torch.testing.assert_close(resolvent_diag(a, b, c, z, causal=True), expected,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@given(p=problems, n=st.integers(1, 40))
def test_loop_reference_equals_dense_oracle(causal, p, n):
    a, b, c, z = layout_problem(p["seed"], p["layout"], n, p["signs"])
    torch.testing.assert_close(resolvent_diag_loop(a, b, c, z, causal=causal),
                               dense_diag(a, b, c, z, causal), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_a_single_position_is_the_scalar_resolvent(causal):
    a = torch.tensor([[0.5], [-2.0]], dtype=F64)
    b = c = torch.empty(2, 0, dtype=F64)
    z = 0.25 + 0.75j
    expected = (1 / (a.to(C128) - z))
    torch.testing.assert_close(resolvent_diag(a, b, c, z, causal=causal), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_python_number_and_broadcast_tensor_shift_agree(causal):
    a, b, c, _ = random_problem(0, (3,), 17)
    z = 0.3 + 0.8j
    g = resolvent_diag(a, b, c, z, causal=causal)
    assert g.shape == (3, 17)
    z3 = torch.tensor([z] * 3, dtype=C128)
    torch.testing.assert_close(g, resolvent_diag(a, b, c, z3, causal=causal), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_inputs_give_the_same_result(causal):
    a, b, c, z = random_problem(1, (4,), 33)
    at, bt, ct = (t.T.contiguous().T for t in (a, b, c))  # column-major copies
    assert not at.is_contiguous()
    torch.testing.assert_close(resolvent_diag(at, bt, ct, z[::1], causal=causal),
                               resolvent_diag(a, b, c, z, causal=causal), rtol=0, atol=0)


# ------------------------------------------------------------------------------- large N

LARGE_N = 65_536


def windowed(a, b, c, z, i, width, causal):
    """G_ii from a dense inverse of the window [i - width, i + width] (or [i - width, i] for
    causal) of T - zI. When |b_k c_k| <= (Im z)^2 / 8 the ratio recursions contract by a factor
    <= 2/9 per step, so the far field beyond the window contributes < (2/9)^width."""
    lo, hi = max(i - width, 0), i + 1 if causal else min(i + width + 1, a.shape[-1])
    m = tridiagonal(a[lo:hi], b[lo:hi - 1], c[lo:hi - 1], z)
    return torch.linalg.inv(m)[i - lo, i - lo]


@pytest.mark.parametrize("causal", [True, False])
def test_large_n_matches_windowed_dense_inverse(causal):
    a, b, c, z = random_problem(2, (), LARGE_N, signs="mixed", imag=1.0)
    g = resolvent_diag(a, b, c, z, causal=causal)
    assert torch.isfinite(torch.view_as_real(g)).all()
    for i in [0, 1, 777, LARGE_N // 2, LARGE_N - 2, LARGE_N - 1]:
        torch.testing.assert_close(g[i], windowed(a, b, c, z, i, 48, causal),
                                   rtol=1e-12, atol=1e-14)


def banded_diag_entry(a, b, c, z, i, causal):
    """G_ii by a banded LU solve of (T - zI) x = e_i (of the leading block for causal)."""
    linalg = pytest.importorskip("scipy.linalg")
    n = i + 1 if causal else a.shape[-1]
    ab = np.zeros((3, n), dtype=np.complex128)
    ab[0, 1:] = b[: n - 1].numpy()
    ab[1] = a[:n].numpy() - complex(z)
    ab[2, :-1] = c[: n - 1].numpy()
    rhs = np.zeros(n, dtype=np.complex128)
    rhs[i] = 1.0
    return complex(linalg.solve_banded((1, 1), ab, rhs)[i])


@pytest.mark.parametrize("causal", [True, False])
def test_large_n_near_real_axis_is_finite_bounded_and_matches_banded_solve(causal):
    """Im z = 0.01 and b c ~ 1: the recursions barely contract and determinant recursions
    overflow; the result must stay finite, obey Im G > 0 and |G| <= 1/Im z (b c > 0 makes T
    similar to a real symmetric matrix), and agree with an independent banded solve."""
    a, b, c, z = random_problem(3, (), LARGE_N, imag=0.01)
    g = resolvent_diag(a, b, c, z, causal=causal)
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert (g.imag > 0).all()
    assert (g.abs() <= 1 / 0.01 * (1 + 1e-9)).all()
    for i in [0, 4095, LARGE_N - 1]:
        expected = banded_diag_entry(a, b, c, z, i, causal)
        assert abs(complex(g[i]) - expected) <= 1e-8 * abs(expected)


@pytest.mark.parametrize("causal", [True, False])
def test_large_n_gradient_matches_a_directional_finite_difference(causal):
    a, b, c, z = random_problem(4, (2,), LARGE_N, signs="mixed")
    w = upstream((2, LARGE_N), 5)
    gen = torch.Generator().manual_seed(6)
    va, vb, vc = (torch.randn(t.shape, generator=gen, dtype=F64) for t in (a, b, c))
    vz = torch.complex(torch.randn(2, generator=gen, dtype=F64),
                       torch.randn(2, generator=gen, dtype=F64))

    def loss(h):
        g = resolvent_diag(a + h * va, b + h * vb, c + h * vc, z + h * vz, causal=causal)
        return (w.conj() * g).real.sum()

    inputs = [t.clone().requires_grad_() for t in (a, b, c, z)]
    g = resolvent_diag(*inputs, causal=causal)
    grads = torch.autograd.grad((w.conj() * g).real.sum(), inputs)
    directions = (va, vb, vc, vz)
    analytic = sum((gr.conj() * v).real.sum() for gr, v in zip(grads, directions, strict=True))
    h = 1e-6
    numeric = (loss(h) - loss(-h)) / (2 * h)
    assert abs(float(analytic) - float(numeric)) <= 1e-6 * abs(float(analytic))


# ------------------------------------------------------------------------------ gradients

GRAD_LAYOUTS = [
    ((3,), (3,), (3,), (3,)),
    ((2, 1), (1,), (2, 3), (3,)),
    ((), (), (), ()),
    ((2,), (), (2,), (1,)),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_gradcheck_passes_for_a_b_c_and_z(causal, layout, signs):
    for n in (1, 2, 7):
        inputs = [t.requires_grad_() for t in layout_problem(7 + n, layout, n, signs)]
        assert torch.autograd.gradcheck(lambda *x: resolvent_diag(*x, causal=causal), inputs)


@pytest.mark.parametrize("causal", [True, False])
@given(p=problems, n=st.integers(1, 30), seed=seeds)
def test_gradients_match_autograd_through_the_loop_reference(causal, p, n, seed):
    ours = [t.requires_grad_() for t in layout_problem(p["seed"], p["layout"], n, p["signs"])]
    ref = [t.detach().clone().requires_grad_() for t in ours]
    g = resolvent_diag(*ours, causal=causal)
    w = upstream(g.shape, seed)
    expected = torch.autograd.grad(resolvent_diag_loop(*ref, causal=causal), ref, w,
                                   materialize_grads=True)  # b, c are unused when n = 1
    for got, want in zip(torch.autograd.grad(g, ours, w), expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_gradients_are_returned_only_for_tensors_that_require_them():
    a, b, c, z = random_problem(8, (2,), 5)
    a.requires_grad_()
    (ga,) = torch.autograd.grad(resolvent_diag(a, b, c, 0.1 + 1j).real.sum(), [a])
    assert ga.shape == a.shape and ga.dtype == F64


def test_float32_gradients_are_float32_and_match_float64():
    a, b, c, z = random_problem(9, (3,), 50, dtype=torch.float32)
    lo = [t.requires_grad_() for t in (a, b, c, z)]
    hi = [t.detach().to(F64 if t.is_floating_point() else C128).requires_grad_() for t in lo]
    w = upstream((3, 50), 10)
    g_lo = torch.autograd.grad(resolvent_diag(*lo), lo, w.to(torch.complex64))
    g_hi = torch.autograd.grad(resolvent_diag(*hi), hi, w)
    for got, want, t in zip(g_lo, g_hi, lo, strict=True):
        assert got.dtype == t.dtype
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- causality


@given(seed=seeds, n=st.integers(2, 200), data=st.data())
def test_perturbing_the_future_leaves_the_causal_past_bit_identical(seed, n, data):
    a, b, c, z = random_problem(seed, (2,), n, signs=data.draw(st.sampled_from(["positive",
                                                                                  "mixed"])))
    j = data.draw(st.integers(1, n - 1))
    gen = torch.Generator().manual_seed(seed + 1)
    a2, b2, c2 = a.clone(), b.clone(), c.clone()
    a2[..., j:] += torch.randn(a2[..., j:].shape, generator=gen, dtype=F64)
    b2[..., j - 1:] *= 1.5
    c2[..., j - 1:] *= -0.5
    g, g2 = (resolvent_diag(*p, z, causal=True) for p in ((a, b, c), (a2, b2, c2)))
    assert torch.equal(g[..., :j], g2[..., :j])
    assert not torch.equal(g[..., j:], g2[..., j:])


# ------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("dtype", "cdtype"), [(torch.float32, torch.complex64), (F64, C128)])
def test_output_dtype_is_the_complex_counterpart_of_the_input(causal, dtype, cdtype):
    a, b, c, z = random_problem(11, (2,), 9, dtype=dtype)
    assert resolvent_diag(a, b, c, z, causal=causal).dtype == cdtype
    assert resolvent_diag(a, b, c, 0.5 + 1j, causal=causal).dtype == cdtype
    assert resolvent_diag_loop(a, b, c, z, causal=causal).dtype == cdtype


@pytest.mark.parametrize("causal", [True, False])
def test_float32_inputs_are_computed_in_double_and_rounded_once(causal):
    a, b, c, z = random_problem(12, (3,), 4096, dtype=torch.float32)
    g32 = resolvent_diag(a, b, c, z, causal=causal)
    g64 = resolvent_diag(a.double(), b.double(), c.double(), z.to(C128), causal=causal)
    assert torch.equal(g32, g64.to(torch.complex64))


# ---------------------------------------------------------------------------- causal_step


@pytest.mark.parametrize("z_kind", ["number", "tensor"])
def test_causal_step_reproduces_the_causal_scan(z_kind):
    a, b, c, z = random_problem(13, (3,), 64, signs="mixed")
    if z_kind == "number":
        z = complex(z[0])
    scan = resolvent_diag(a, b, c, z, causal=True)
    g = causal_step(a[..., 0], None, z, None)
    torch.testing.assert_close(g, scan[..., 0], rtol=1e-13, atol=0)
    for i in range(1, 64):
        g = causal_step(a[..., i], b[..., i - 1] * c[..., i - 1], z, g)
        torch.testing.assert_close(g, scan[..., i], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ bad inputs

GOOD = dict(a=torch.zeros(2, 4, dtype=F64), b=torch.ones(2, 3, dtype=F64),
            c=torch.ones(2, 3, dtype=F64), z=0.5 + 1j)


def replaced(**changes):
    return {**GOOD, **changes}


def with_value(name, index, value):
    t = GOOD[name].clone()
    t.view(-1)[index] = value
    return replaced(**{name: t})


BAD_INPUTS = [
    ("nan in a", with_value("a", 5, float("nan")), ValueError, "a contains NaN or Inf"),
    ("inf in a", with_value("a", 0, float("inf")), ValueError, "a contains NaN or Inf"),
    ("nan in b", with_value("b", 2, float("nan")), ValueError, "b contains NaN or Inf"),
    ("-inf in c", with_value("c", 4, -float("inf")), ValueError, "c contains NaN or Inf"),
    ("inf in c where b is 0", {**with_value("c", 1, float("inf")),
                               "b": torch.zeros(2, 3, dtype=F64)}, ValueError, "c contains"),
    ("nan z", replaced(z=complex(0.0, float("nan"))), ValueError, "z contains NaN"),
    ("inf z tensor", replaced(z=torch.tensor([1j, complex(float("inf"), 1)], dtype=C128)),
     ValueError, "z contains NaN"),
    ("real z", replaced(z=0.5), ValueError, r"Im z > 0"),
    ("z below the axis", replaced(z=0.5 - 1j), ValueError, r"Im z > 0.*-1"),
    ("z tensor on the axis", replaced(z=torch.tensor([1j, 0.5 + 0j], dtype=C128)), ValueError,
     r"Im z > 0"),
    ("real z tensor", replaced(z=torch.ones(2, dtype=F64)), ValueError, r"Im z > 0"),
    ("empty", replaced(a=torch.zeros(2, 0, dtype=F64), b=torch.zeros(2, 0, dtype=F64),
                       c=torch.zeros(2, 0, dtype=F64)), ValueError, "at least one entry"),
    ("scalar a", replaced(a=torch.tensor(1.0, dtype=F64)), ValueError, "at least one dim"),
    ("b too long", replaced(b=torch.ones(2, 4, dtype=F64)), ValueError,
     r"b must have N-1 = 3 entries.*\(2, 4\)"),
    ("c too short", replaced(c=torch.ones(2, 2, dtype=F64)), ValueError, "c must have N-1"),
    ("batch mismatch", replaced(b=torch.ones(3, 3, dtype=F64)), ValueError,
     r"batch shapes do not broadcast.*b \(3,\)"),
    ("z batch mismatch", replaced(z=torch.full((5,), 1j, dtype=C128)), ValueError,
     r"do not broadcast.*z \(5,\)"),
    ("integer a", replaced(a=torch.zeros(2, 4, dtype=torch.int64)), TypeError,
     "a must be real float32 or float64, got torch.int64"),
    ("complex b", replaced(b=torch.ones(2, 3, dtype=C128)), TypeError, "b must be real"),
    ("half c", replaced(c=torch.ones(2, 3, dtype=torch.float16)), TypeError, "c must be real"),
    ("mixed precision", replaced(c=torch.ones(2, 3, dtype=torch.float32)), TypeError,
     "share one dtype"),
    ("z precision", replaced(z=torch.full((2,), 1j, dtype=torch.complex64)), TypeError,
     "z must be torch.complex128 for torch.float64"),
    ("integer z tensor", replaced(z=torch.ones(2, dtype=torch.int64)), TypeError,
     "z must be a complex tensor"),
    ("z of a wrong type", replaced(z="1j"), TypeError, "z must be a Python number"),
    ("list a", replaced(a=[0.0, 0.0, 0.0, 0.0]), TypeError, "a must be a torch.Tensor"),
    ("string b", replaced(b="1"), TypeError, "b must be a torch.Tensor or a real number, got str"),
    ("bool c", replaced(c=True), TypeError, "c must be a torch.Tensor or a real number"),
    ("inf number c", replaced(c=float("inf")), ValueError, "c must be finite, got inf"),
    ("nan number b", replaced(b=float("nan"), c=1.0), ValueError, "b must be finite"),
]


@pytest.mark.parametrize("fn", [resolvent_diag, resolvent_diag_loop])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("case", "kwargs", "error", "message"), BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_every_bad_input_raises_a_helpful_error(fn, causal, case, kwargs, error, message):
    with pytest.raises(error, match=message):
        fn(**kwargs, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_a_singular_leading_block_raises_instead_of_returning_garbage(causal):
    # (1 - i)(-1 - i) = -2 = b c: the leading 2x2 block of T - iI is exactly singular.
    a = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    b = torch.tensor([2.0, 0.3], dtype=F64)
    c = torch.tensor([-1.0, 0.2], dtype=F64)
    with pytest.raises(FloatingPointError, match=re.escape("singular")):
        resolvent_diag(a, b, c, 1j, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_changing_the_output_in_place_makes_backward_raise_instead_of_using_it(causal):
    a, b, c, z = random_problem(14, (2,), 6)
    a.requires_grad_()
    g = resolvent_diag(a, b, c, z, causal=causal)
    g.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        g.real.sum().backward()


@pytest.mark.parametrize("causal", [True, False])
def test_an_empty_batch_gives_an_empty_result_and_gradient(causal):
    a, b, c, z = (t.requires_grad_() for t in random_problem(15, (0,), 5))
    g = resolvent_diag(a, b, c, z, causal=causal)
    assert g.shape == (0, 5)
    grads = torch.autograd.grad(g.real.sum(), [a, b, c, z])
    assert [t.shape for t in grads] == [(0, 5), (0, 4), (0, 4), (0,)]


# ----------------------------------------------------------------------- numbers as couplings


@pytest.mark.parametrize("causal", [True, False])
@given(p=problems, n=st.integers(1, 60), data=st.data())
def test_number_couplings_equal_tensors_full_of_them_and_the_dense_oracle(causal, p, n, data):
    a, _, _, z = layout_problem(p["seed"], p["layout"], n, p["signs"])
    if p["signs"] == "positive":
        b, c = (data.draw(st.floats(0.2, 1.5)) for _ in range(2))
    else:
        b, c = (data.draw(st.floats(-0.35, 0.35)) for _ in range(2))
    g = resolvent_diag(a, b, c, z, causal=causal)
    bt, ct = (torch.full((n - 1,), x, dtype=F64) for x in (b, c))
    assert torch.equal(g, resolvent_diag(a, bt, ct, z, causal=causal))
    torch.testing.assert_close(g, dense_diag(a, bt, ct, z, causal), rtol=1e-9, atol=1e-12)


def _outcome(call):
    """The result of call(), or None if it raised for a non-finite value (a value beyond
    float32's range is infinite in a float32 tensor: ValueError; as a number b * c overflows:
    FloatingPointError)."""
    try:
        return call()
    except (ValueError, FloatingPointError):
        return None


# Finite floats of every size: float32's subnormals, values that round to float32's largest
# and values beyond its range, which a float32 tensor holds as infinity.
_ANY_FINITE = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                        st.floats(-1e-38, 1e-38), st.floats(3.4e38, 3.41e38),
                        st.sampled_from([0.1, 0.3, -0.0, 1.0]))


@pytest.mark.parametrize("causal", [True, False])
@given(b=_ANY_FINITE, c=_ANY_FINITE)
@example(b=3.41e38, c=1e-39)  # b beyond float32's range: infinite, whatever c
@example(b=3.4028235e38, c=1e-39)  # b rounds down to float32's largest: finite
def test_float32_number_couplings_are_rounded_like_float32_tensors(causal, b, c):
    a, _, _, z = random_problem(16, (3,), 20, dtype=torch.float32)
    with np.errstate(over="ignore"):  # torch.full refuses values beyond float32's range
        full = [torch.from_numpy(np.full(19, x, dtype=np.float32)) for x in (b, c)]
    got = _outcome(lambda: resolvent_diag(a, b, c, z, causal=causal))
    want = _outcome(lambda: resolvent_diag(a, *full, z, causal=causal))
    assert (got is None) == (want is None)
    assert got is None or torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_with_number_couplings(causal):
    for n in (1, 2, 9):
        a, _, _, z = random_problem(17 + n, (2, 3), n, signs="mixed", z_shape=(3,))
        inputs = [a.requires_grad_(), z.requires_grad_()]
        assert torch.autograd.gradcheck(
            lambda a, z: resolvent_diag(a, 0.3, -0.2, z, causal=causal), inputs)


@pytest.mark.parametrize("causal", [True, False])
@given(p=problems, n=st.integers(1, 30), seed=seeds)
def test_number_coupling_gradients_match_autograd_through_the_loop(causal, p, n, seed):
    a, _, _, z = layout_problem(p["seed"], p["layout"], n, p["signs"])
    ours = [a.requires_grad_(), z.requires_grad_()]
    ref = [t.detach().clone().requires_grad_() for t in ours]
    g = resolvent_diag(ours[0], 0.25, 0.5, ours[1], causal=causal)
    w = upstream(g.shape, seed)
    expected = torch.autograd.grad(resolvent_diag_loop(ref[0], 0.25, 0.5, ref[1], causal=causal),
                                   ref, w)
    for got, want in zip(torch.autograd.grad(g, ours, w), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------- layouts
# The kernels run with rows in SIMD lanes and copy positions in tiles of 8: row counts that are
# not a multiple of the vector width, a single row, N of 1 and 2, N not a multiple of the tile,
# and the model's transposed view (positions outside the last batch axis) are checked against
# the dense oracle, forward and backward, with channel counts that get a kernel of their own (a
# constant count: 1, 2, 4, 8, 16) and counts that do not.

EDGE_SHAPES = [(1, 1), (1, 2), (1, 9), (3, 1), (3, 2), (3, 17), (5, 8), (7, 16), (9, 33),
               (13, 2), (2, 9), (4, 17), (8, 3), (16, 10)]


def edge_problem(batch, channels, n, transposed, dtype=F64):
    """a (batch, channels, n): contiguous, or the transposed view of a (batch, n, channels)
    tensor as the model passes it; z per channel."""
    gen = torch.Generator().manual_seed(100 * n + channels)
    if transposed:
        a = (2 * torch.randn(batch, n, channels, generator=gen, dtype=F64)).transpose(1, 2)
    else:
        a = 2 * torch.randn(batch, channels, n, generator=gen, dtype=F64)
    z = torch.complex(torch.randn(channels, generator=gen, dtype=F64),
                      0.3 + torch.rand(channels, generator=gen, dtype=F64))
    return a.to(dtype), z.to(C128 if dtype == F64 else torch.complex64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("couplings", ["numbers", "tensors"])
@pytest.mark.parametrize(("channels", "n"), EDGE_SHAPES)
def test_edge_layouts_match_the_dense_oracle_forward_and_backward(causal, transposed, couplings,
                                                                   channels, n):
    a, z = edge_problem(2, channels, n, transposed)
    gen = torch.Generator().manual_seed(n)
    if couplings == "numbers":
        b, c = 0.8, 1.1
        bt, ct = torch.full((n - 1,), b, dtype=F64), torch.full((n - 1,), c, dtype=F64)
    else:
        b = bt = 0.2 + torch.rand(2, channels, n - 1, generator=gen, dtype=F64)
        c = ct = 0.2 + torch.rand(2, channels, n - 1, generator=gen, dtype=F64)
    a.requires_grad_()
    g = resolvent_diag(a, b, c, z, causal=causal)
    torch.testing.assert_close(g, dense_diag(a.detach(), bt, ct, z, causal), rtol=1e-9,
                               atol=1e-12)
    w = upstream(g.shape, n)
    (got,) = torch.autograd.grad(g, [a], w)
    ref = a.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(resolvent_diag_loop(ref, bt, ct, z, causal=causal), [ref], w)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_the_result_and_the_gradient_are_stored_like_a(causal):
    a, z = edge_problem(3, 4, 20, transposed=True)
    a.requires_grad_()
    g = resolvent_diag(a, 1.0, 1.0, z, causal=causal)
    assert g.transpose(1, 2).is_contiguous()  # like a: positions outside the channels
    (ga,) = torch.autograd.grad(g.real.sum(), [a])
    assert ga.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(g, resolvent_diag(a.detach().contiguous(), 1.0, 1.0, z,
                                                 causal=causal), rtol=0, atol=0)


def test_a_plan_is_cached_per_signature_and_each_layout_dtype_and_coupling_gets_its_own():
    """resolvent_diag caches its checks and plan per (dtype, device, shape, strides of a; the
    same of b, c, z or their types): calls that alternate the layout, the precision and the
    kind of couplings on the same shape must each be planned for themselves."""
    a, z = edge_problem(3, 4, 20, transposed=True)
    bt = torch.full((3, 4, 19), 0.7, dtype=F64)
    want = dense_diag(a, bt, bt, z, causal=True)
    for _ in range(2):
        for x in (a, a.contiguous()):
            g = resolvent_diag(x, 0.7, 0.7, z, causal=True)
            assert g.stride() == x.stride()
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(resolvent_diag(x, bt, bt, z, causal=True), want,
                                       rtol=1e-9, atol=1e-12)
            g32 = resolvent_diag(x.float(), 0.7, 0.7, z.to(torch.complex64), causal=True)
            assert g32.dtype == torch.complex64
            torch.testing.assert_close(g32, want.to(torch.complex64), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="c must be finite"):
            resolvent_diag(a, 0.7, float("inf"), z, causal=True)


# -------------------------------------------------------------------------- reference kernel


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("rows", "n"), [(1, 1), (3, 2), (8, 300), (13, 64)])
def test_the_benchmark_reference_kernel_agrees_with_resolvent_diag(causal, rows, n):
    """bench/reference_kernel.py is the comparator of the asv ratios: same values and
    gradients, so that timing it against resolvent_diag compares equal work."""
    a, b, c, z = random_problem(30 + n, (rows,), n, signs="mixed")
    w = upstream((rows, n), 31)
    problem = reference_kernel.Problem.from_torch(a, b, c, z)
    ours = [t.requires_grad_() for t in (a, b, c, z)]
    g = resolvent_diag(*ours, causal=causal)
    grads = torch.autograd.grad(g, ours, w)
    gr, gi, *_ = reference_kernel.forward(problem, causal)
    torch.testing.assert_close(torch.complex(torch.from_numpy(gr.T), torch.from_numpy(gi.T)),
                               g.detach(), rtol=1e-10, atol=0)
    columns = (np.ascontiguousarray(x.numpy().T) for x in (w.real, w.imag))
    ga, gb, gc, gzr, gzi = reference_kernel.forward_backward(problem, *columns, causal)
    for got, want in zip((ga.T, gb.T, gc.T), grads[:3], strict=True):
        torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(got)), want,
                                   rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.complex(torch.from_numpy(gzr), torch.from_numpy(gzi)),
                               grads[3], rtol=1e-10, atol=1e-14)

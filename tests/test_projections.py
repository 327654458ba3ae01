"""Monotonic projections: GoMLX's coarse algorithm (spec G.7) and the exact L2 projection.

GoMLX cannot run here. The coarse projection is checked against GoMLX's own unit-test values (as given in the spec and
in GoMLX's ``optimizers_test.go``), the spec's extra case, and a literal float64 transcription of the spec's three
steps. The exact projection is checked against a literal pool-adjacent-violators loop, against scikit-learn's
isotonic regression, and by hypothesis properties (feasible, never farther than the coarse one, idempotent).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.isotonic import isotonic_regression

import gradstep
from gradstep.tools.projections import MonotonicProjection, monotonic_projection, monotonic_projection_exact

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Literal references (plain Python floats, one sequence at a time)


def coarse_reference(x: list[float], margin: list[float]) -> list[float]:
    """The spec's G.7 steps 1-3 for one sequence, with one margin per gap."""
    n = len(x)
    diff = [x[i + 1] - x[i] for i in range(n - 1)]

    d = list(diff)
    if n > 2:
        for _ in range(3):
            a = [max(d[i], margin[i]) for i in range(n - 1)]
            deficit = [d[i] - a[i] for i in range(n - 1)]
            shifted = [0.0] + deficit[:-1]  # toward higher indices
            d = [a[i] + shifted[i] for i in range(n - 1)]
    d = [max(d[i], margin[i]) for i in range(n - 1)]
    right = [x[0]]
    for gap in d:
        right.append(right[-1] + gap)

    d = list(diff)
    total0 = sum(d)
    if n > 2:
        for _ in range(3):
            a = [max(d[i], margin[i]) for i in range(n - 1)]
            deficit = [d[i] - a[i] for i in range(n - 1)]
            shifted = deficit[1:] + [0.0]  # toward lower indices
            d = [a[i] + shifted[i] for i in range(n - 1)]
    d = [max(d[i], margin[i]) for i in range(n - 1)]
    left = [x[0] - (sum(d) - total0)]
    for gap in d:
        left.append(left[-1] + gap)
    return [(r + sl) / 2 for r, sl in zip(right, left)]


def pav_reference(x: list[float], margin: list[float]) -> list[float]:
    """Exact projection for one sequence: classic stack PAV on x_i - c_i, then shift back."""
    offsets = [0.0]
    for m in margin:
        offsets.append(offsets[-1] + m)
    values = [xi - ci for xi, ci in zip(x, offsets)]
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) >= 2 and blocks[-1][0] / blocks[-1][1] < blocks[-2][0] / blocks[-2][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    fitted: list[float] = []
    for s, c in blocks:
        fitted += [s / c] * int(c)
    return [z + ci for z, ci in zip(fitted, offsets)]


def along(fn, x: torch.Tensor, margin: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply a one-sequence reference to every slice of ``x`` along ``dim`` (margin shaped like the differences)."""
    xs = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    ms = margin.movedim(dim, -1).reshape(-1, x.shape[dim] - 1)
    out = torch.tensor([fn(r.tolist(), m.tolist()) for r, m in zip(xs, ms)], dtype=x.dtype)
    return out.reshape(x.movedim(dim, -1).shape).movedim(-1, dim)


def diff_margin(x: torch.Tensor, margin: float, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim % x.dim()] -= 1
    return torch.full(shape, margin, dtype=x.dtype)


def gaps(y: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.diff(y, dim=dim)


# ---------------------------------------------------------------------------------------------------------------------
# GoMLX's unit-test values (margin 0.1)

GOMLX_CASES = [
    ([0.0, 1.0, 1.0, 2.0], -1, [0.0, 0.95, 1.05, 2.0]),
    ([1.0, 1.0], -1, [0.95, 1.05]),
    ([1.0, 1.0, 1.0], -1, [0.9, 1.0, 1.1]),
    ([[0.0], [1.1], [0.9], [2.0]], 0, [[0.0], [0.95], [1.05], [2.0]]),
    ([3.0, 2.0, 1.0, 0.0], -1, [1.35, 1.45, 1.55, 1.65]),  # the spec's further case
]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (F64, 1e-12)])
@pytest.mark.parametrize("values,dim,expected", GOMLX_CASES)
def test_coarse_reproduces_gomlx_unit_test_values(values, dim, expected, dtype, atol):
    x = torch.tensor(values, dtype=dtype)
    y = monotonic_projection(x, torch.tensor(0.1, dtype=dtype), dim)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, torch.tensor(expected, dtype=dtype), atol=atol, rtol=0)


def test_exact_agrees_with_coarse_where_coarse_is_optimal_and_is_closer_elsewhere():
    # [3,2,1,0]: both give the mean-preserving evenly spaced sequence, which is the exact projection.
    x = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(monotonic_projection_exact(x, 0.1), monotonic_projection(x, 0.1))
    # An isolated dip: PAV pools the two offending elements, and so does the coarse average of its two passes.
    x = torch.tensor([0.0, 1.0, 2.0, 1.5, 4.0, 5.0], dtype=F64)
    expected = torch.tensor([0.0, 1.0, 1.7, 1.8, 4.0, 5.0], dtype=F64)
    torch.testing.assert_close(monotonic_projection_exact(x, 0.1), expected)
    torch.testing.assert_close(monotonic_projection(x, 0.1), expected)
    # One high first value: the optimum pools all four (x - 0.1 i has mean 0.1); the coarse answer keeps the
    # mean of the input's two ends instead, and lands farther away.
    x = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    exact, coarse = monotonic_projection_exact(x, 0.1), monotonic_projection(x, 0.1)
    torch.testing.assert_close(exact, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    assert (exact - x).norm() < (coarse - x).norm() - 0.1


def test_coarse_matches_literal_spec_transcription_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    for shape, dim in [((5, 7), -1), ((4, 3, 6), 1), ((6, 2), 0), ((3, 2, 9), -1)]:
        x = torch.randn(shape, generator=gen, dtype=F64) * 2
        margin = diff_margin(x, 0.3, dim)
        torch.testing.assert_close(monotonic_projection(x, 0.3, dim), along(coarse_reference, x, margin, dim))


def test_margin_tensor_varies_per_gap_and_per_row():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    margin = torch.rand(4, 5, generator=gen, dtype=F64)  # one margin per gap and per row
    for fn, ref in [(monotonic_projection, coarse_reference), (monotonic_projection_exact, pav_reference)]:
        y = fn(x, margin, -1)
        torch.testing.assert_close(y, along(ref, x, margin, -1))
        assert (gaps(y, -1) >= margin - 1e-12).all()
    # A per-gap margin of shape [n-1] broadcasts over the rows.
    per_gap = torch.tensor([0.0, 0.5, 0.1, 1.0, 0.2], dtype=F64)
    torch.testing.assert_close(
        monotonic_projection_exact(x, per_gap), along(pav_reference, x, per_gap.expand(4, 5), -1)
    )


def test_exact_matches_literal_pav_and_sklearn_isotonic_regression():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 12, generator=gen, dtype=F64).cumsum(-1) * -0.3 + torch.randn(8, 12, generator=gen, dtype=F64)
    margin = 0.05
    y = monotonic_projection_exact(x, margin)
    torch.testing.assert_close(y, along(pav_reference, x, diff_margin(x, margin, -1), -1), rtol=0, atol=1e-12)
    offsets = margin * torch.arange(12, dtype=F64)
    for row_x, row_y in zip(x, y):
        iso = torch.from_numpy(isotonic_regression((row_x - offsets).numpy(), increasing=True))
        torch.testing.assert_close(row_y, iso + offsets, rtol=0, atol=1e-12)


def test_exact_is_the_closest_feasible_point_by_kkt():
    # KKT for min ||y-x||^2 s.t. y_{i+1}-y_i >= m: multipliers lam_i = sum_{j<=i} (x_j - y_j) >= 0,
    # zero where the gap is slack, and sum (x - y) = 0.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 9, generator=gen, dtype=F64)
    y = monotonic_projection_exact(x, 0.2)
    lam = torch.cumsum(x - y, dim=-1)
    assert lam[:, -1].abs().max() < 1e-12
    assert (lam[:, :-1] >= -1e-12).all()
    slack = gaps(y, -1) - 0.2
    assert (lam[:, :-1] * slack).abs().max() < 1e-12


def test_exact_gradient_is_the_block_average():
    x = torch.tensor([0.0, 2.0, 1.0, 3.0, 5.0, 4.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: monotonic_projection_exact(t, 0.1), (x,))
    assert torch.autograd.gradcheck(lambda t: monotonic_projection(t, 0.1), (x,))
    y = monotonic_projection_exact(x, 0.1)
    (g,) = torch.autograd.grad(y[1], x)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=F64))


def test_half_precision_is_computed_in_float32():
    x = torch.tensor([[1.0, 0.5, 0.25, 2.0]], dtype=torch.bfloat16)
    y = monotonic_projection_exact(x, 0.125)
    assert y.dtype == torch.bfloat16
    expected = monotonic_projection_exact(x.float(), 0.125).to(torch.bfloat16)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("fn", [monotonic_projection, monotonic_projection_exact])
def test_invalid_inputs_raise(fn):
    with pytest.raises(ValueError, match="length >= 2"):
        fn(torch.zeros(3, 1), 0.1, -1)
    with pytest.raises(ValueError, match="out of range"):
        fn(torch.zeros(3, 2), 0.1, 2)
    with pytest.raises(ValueError, match="broadcast"):
        fn(torch.zeros(3, 4), torch.zeros(4), -1)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.arange(4), 1, -1)
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(torch.tensor(1.0), 0.1, 0)


def test_projection_transform_projects_parameters_after_each_step():
    splits = torch.nn.Parameter(torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.0, 1.0, 2.0, 3.0]], dtype=F64))
    opt = gradstep.chain([splits], MonotonicProjection(margin=0.2, dim=-1, exact=True), lr=0.5)
    grad = torch.tensor([[0.0, -2.0, 2.0, 0.0], [4.0, 0.0, 0.0, -4.0]], dtype=F64)
    for _ in range(3):
        before = splits.detach().clone()
        splits.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(splits.detach(), monotonic_projection_exact(before - 0.5 * grad, 0.2))
        assert (gaps(splits.detach(), -1) >= 0.2 - 1e-12).all()
    coarse = MonotonicProjection(0.2, dim=0)
    assert "exact=False" in repr(coarse)
    w = torch.nn.Parameter(torch.tensor([[1.0], [0.0]], dtype=F64))
    opt = gradstep.chain([w], coarse, lr=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), monotonic_projection(torch.tensor([[1.0], [0.0]], dtype=F64), 0.2, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape[dim] = draw(st.integers(2, 7))
    numel = math.prod(shape)
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=numel, max_size=numel))
    margin = draw(st.sampled_from([0.0, 0.01, 0.5, 2.0]))
    return torch.tensor(values, dtype=F64).reshape(shape), margin, dim


TOL = 1e-9


@settings(max_examples=120, deadline=None)
@given(problems())
def test_both_outputs_are_increasing_with_the_margin(problem):
    x, margin, dim = problem
    for fn in (monotonic_projection, monotonic_projection_exact):
        y = fn(x, margin, dim)
        assert y.shape == x.shape
        assert (gaps(y, dim) >= margin - TOL).all(), fn.__name__


@settings(max_examples=120, deadline=None)
@given(problems())
def test_exact_is_never_farther_than_coarse_along_each_slice(problem):
    x, margin, dim = problem
    d_exact = (monotonic_projection_exact(x, margin, dim) - x).norm(dim=dim)
    d_coarse = (monotonic_projection(x, margin, dim) - x).norm(dim=dim)
    assert (d_exact <= d_coarse + TOL).all()


@settings(max_examples=120, deadline=None)
@given(problems())
def test_exact_projection_is_idempotent(problem):
    x, margin, dim = problem
    y = monotonic_projection_exact(x, margin, dim)
    torch.testing.assert_close(monotonic_projection_exact(y, margin, dim), y, rtol=0, atol=TOL)


@settings(max_examples=80, deadline=None)
@given(problems())
def test_batched_call_equals_slice_by_slice(problem):
    x, margin, dim = problem
    m = diff_margin(x, margin, dim)
    torch.testing.assert_close(monotonic_projection(x, margin, dim), along(coarse_reference, x, m, dim))
    torch.testing.assert_close(
        monotonic_projection_exact(x, margin, dim), along(pav_reference, x, m, dim), rtol=0, atol=TOL
    )


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_exact_leaves_a_feasible_input_bit_for_bit(problem, seed):
    x, margin, dim = problem
    gen = torch.Generator().manual_seed(seed)
    # Build a strictly feasible input along dim: a start value plus gaps above the margin.
    steps = margin + torch.rand(x.shape, generator=gen, dtype=F64) + 1e-3
    feasible = x.narrow(dim, 0, 1) + steps.cumsum(dim)
    assert torch.equal(monotonic_projection_exact(feasible, margin, dim), feasible)

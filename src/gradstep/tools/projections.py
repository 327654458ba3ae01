r"""Projections onto increasing sequences with a minimum gap (GoMLX's ``MonotonicProjection``, and the exact one).

Along one dimension of length :math:`n` of a tensor :math:`x`, the *feasible* set is

.. math::
    C = \{\, y : y_{i+1} - y_i \ge m_i \ \text{ for } i = 0, \dots, n-2 \,\}

for a margin :math:`m` (a scalar, or a tensor broadcastable to the shape of the consecutive differences). GoMLX uses
it to keep learned split points (KAN, piecewise-linear calibrators) ordered after every optimizer step.

* :func:`monotonic_projection` is GoMLX's *coarse* algorithm (``ml/train/optimizers``, ``MonotonicProjection``,
  v0.23.2): cheap, feasible, but not the closest point of :math:`C`.
* :func:`monotonic_projection_exact` is the Euclidean projection :math:`\arg\min_{y \in C} \lVert y - x\rVert_2`,
  which GoMLX's documentation says it lacks. With the offsets :math:`c_0 = 0`, :math:`c_i = \sum_{j<i} m_j`, the
  substitution :math:`z = y - c` turns :math:`C` into the non-decreasing sequences, so the projection is the
  isotonic regression of :math:`x - c` (pool-adjacent-violators, Ayer et al. 1955; Barlow et al. 1972, "Statistical
  Inference under Order Restrictions") shifted back by :math:`c`.
* :class:`MonotonicProjection` applies either one to parameters after every step of a gradstep chain.

Both functions act along any ``dim`` (negative allowed) and treat every other dimension as a batch, without a Python
loop over it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.ops import TensorList
from ..core.transform import GroupStep, Transform

__all__ = ["MonotonicProjection", "monotonic_projection", "monotonic_projection_exact"]

# GoMLX's fixed number of deficit-passing sweeps (it cannot build a data-dependent while loop in its graph).
_COARSE_SWEEPS = 3


def _check(x: Tensor, dim: int) -> tuple[int, int]:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a real floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a tensor with {x.dim()} dimensions")
    dim = dim % x.dim()
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"dim {dim} of x (shape {tuple(x.shape)}) must have length >= 2 to be made increasing")
    return dim, n


def _margin_last(x: Tensor, margin: float | Tensor, dim: int) -> Tensor:
    """The margin broadcast to the differences' shape (in ``x``'s layout), then moved so ``dim`` is last."""
    diff_shape = list(x.shape)
    diff_shape[dim] -= 1
    m = torch.as_tensor(margin, dtype=x.dtype, device=x.device)
    try:
        m = m.broadcast_to(diff_shape)
    except RuntimeError:
        raise ValueError(
            f"margin of shape {tuple(m.shape)} cannot be broadcast to the differences' shape {tuple(diff_shape)}"
        ) from None
    return m.movedim(dim, -1)


def _shift_up(t: Tensor) -> Tensor:
    """Shift one position toward higher indices along the last dim; the first slot becomes 0, the last value drops."""
    return torch.cat([torch.zeros_like(t[..., :1]), t[..., :-1]], dim=-1)


def _shift_down(t: Tensor) -> Tensor:
    """Shift one position toward lower indices along the last dim; the last slot becomes 0."""
    return torch.cat([t[..., 1:], torch.zeros_like(t[..., :1])], dim=-1)


def monotonic_projection(x: Tensor, margin: float | Tensor, dim: int = -1) -> Tensor:
    r"""GoMLX's coarse projection of ``x`` onto increasing sequences with gaps of at least ``margin`` along ``dim``.

    With :math:`d = x_{1:} - x_{:-1}` and :math:`K = 3` sweeps (none when :math:`n = 2`):

    1. *right-anchored*: repeat :math:`K` times :math:`a = \max(d, m)`, :math:`d \leftarrow a +
       \mathrm{shift}_{\uparrow}(d - a)` (a gap raised to the margin is paid for by shrinking the next gap);
       then :math:`d \leftarrow \max(d, m)` and :math:`R = \mathrm{cumsum}([x_0, d])` (keeps :math:`x_0`);
    2. *left-anchored*: the same with the deficit passed to the previous gap
       (:math:`\mathrm{shift}_{\downarrow}`), then :math:`L = \mathrm{cumsum}([x_0 - (\sum d_\text{new} -
       \sum d_\text{old}), d])` (keeps :math:`x_{n-1}`);
    3. return :math:`(R + L) / 2`, which satisfies the margin because both passes do.

    The result is feasible but in general not the closest feasible point; see :func:`monotonic_projection_exact`.
    It is differentiable (built from max, shifts and cumsum).

    Args:
        x: a real floating-point tensor.
        margin: the minimum gap, a number or a tensor broadcastable to the shape of the differences along ``dim``
            (``x.shape`` with ``n - 1`` at ``dim``).
        dim: the dimension to make increasing (negative allowed); it must have length >= 2.

    Returns:
        A tensor shaped like ``x``.

    Example::

        >>> import torch
        >>> from gradstep.tools.projections import monotonic_projection
        >>> monotonic_projection(torch.tensor([0.0, 1.0, 1.0, 2.0]), 0.1)
        tensor([0.0000, 0.9500, 1.0500, 2.0000])

    Reference: GoMLX ``optimizers.MonotonicProjection`` (github.com/gomlx/gomlx, v0.23.2); the same unit-test values.
    """
    dim, n = _check(x, dim)
    m = _margin_last(x, margin, dim)
    v = x.movedim(dim, -1)
    first = v[..., :1]
    d0 = v[..., 1:] - v[..., :-1]

    d = d0
    if n > 2:
        for _ in range(_COARSE_SWEEPS):
            a = torch.maximum(d, m)
            d = a + _shift_up(d - a)
    d = torch.maximum(d, m)  # feasible even where three sweeps were not enough
    right = torch.cumsum(torch.cat([first, d], dim=-1), dim=-1)

    d = d0
    if n > 2:
        for _ in range(_COARSE_SWEEPS):
            a = torch.maximum(d, m)
            d = a + _shift_down(d - a)
    d = torch.maximum(d, m)
    # Start low enough that the last element stays where it was.
    shifted_first = first - (d.sum(dim=-1, keepdim=True) - d0.sum(dim=-1, keepdim=True))
    left = torch.cumsum(torch.cat([shifted_first, d], dim=-1), dim=-1)

    return ((right + left) / 2).movedim(-1, dim)


def _pav_blocks(v: Tensor) -> Tensor:
    """Pool-adjacent-violators on every row of ``v`` (shape ``[R, n]``) at once: each element's block index.

    A stack of blocks (sum, count) per row; each new element is pushed, then the top two blocks are merged while
    their means decrease. Rows are processed together, so the loop runs over the ``n`` positions (and over the
    merges of the row that needs the most), never over rows.
    """
    rows, n = v.shape
    sums = torch.zeros_like(v)
    counts = torch.zeros_like(v)
    top = torch.zeros(rows, dtype=torch.long, device=v.device)  # number of blocks on each row's stack
    row_ids = torch.arange(rows, device=v.device)
    for i in range(n):
        sums[row_ids, top] = v[:, i]
        counts[row_ids, top] = 1.0
        top += 1
        while True:
            # Merge where the new top block's mean is below the one beneath it (a violation of monotonicity).
            below = (top - 2).clamp(min=0)
            upper = top - 1
            violating = (top >= 2) & (
                sums[row_ids, upper] * counts[row_ids, below] < sums[row_ids, below] * counts[row_ids, upper]
            )
            if not bool(violating.any()):
                break
            r, b, u = row_ids[violating], below[violating], upper[violating]
            sums[r, b] += sums[r, u]
            counts[r, b] += counts[r, u]
            sums[r, u] = 0.0
            counts[r, u] = 0.0
            top[violating] -= 1
    # Element j belongs to the block whose cumulative count first exceeds j.
    ends = torch.cumsum(counts, dim=1)
    positions = torch.arange(n, device=v.device, dtype=v.dtype).expand(rows, n).contiguous()
    return torch.searchsorted(ends, positions, right=True)


def monotonic_projection_exact(x: Tensor, margin: float | Tensor, dim: int = -1) -> Tensor:
    r"""The Euclidean projection of ``x`` onto increasing sequences with gaps of at least ``margin`` along ``dim``.

    .. math::
        y = \arg\min_{y} \lVert y - x \rVert_2 \quad\text{s.t.}\quad y_{i+1} - y_i \ge m_i,

    computed as :math:`y = c + \mathrm{iso}(x - c)` with :math:`c_i = \sum_{j<i} m_j` and :math:`\mathrm{iso}` the
    isotonic (non-decreasing) least-squares fit by pool-adjacent-violators: each maximal block of pooled elements
    takes the mean of its shifted values. Elements left alone by the pooling are returned bit for bit, so a
    feasible input (for instance the output of this function, up to rounding of the pooled means) is unchanged.

    The block structure is found without autograd; the block means are then recomputed differentiably, so the
    gradient of an output is the average of the incoming gradients over its block (the projection's Jacobian).
    Half-precision inputs are computed in float32 and cast back.

    Args:
        x: a real floating-point tensor.
        margin: the minimum gap, a number or a tensor broadcastable to the shape of the differences along ``dim``.
            Varying margins (along ``dim`` or across the batch) are handled exactly through the offsets :math:`c`.
        dim: the dimension to make increasing (negative allowed); it must have length >= 2.

    Returns:
        A tensor shaped like ``x``; never farther from ``x`` (L2, along each slice) than
        :func:`monotonic_projection`'s result.

    Example::

        >>> import torch
        >>> from gradstep.tools.projections import monotonic_projection_exact
        >>> monotonic_projection_exact(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.1)
        tensor([1.3500, 1.4500, 1.5500, 1.6500])
        >>> monotonic_projection_exact(torch.tensor([0.0, 1.0, 0.5, 2.0]), 0.0)
        tensor([0.0000, 0.7500, 0.7500, 2.0000])

    Reference: R. E. Barlow, D. J. Bartholomew, J. M. Bremner, H. D. Brunk, "Statistical Inference under Order
    Restrictions" (Wiley, 1972), the pool-adjacent-violators algorithm.
    """
    dim, n = _check(x, dim)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = _margin_last(work, margin, dim)
    v = work.movedim(dim, -1)
    batch_shape = v.shape[:-1]
    offsets = torch.cat([torch.zeros_like(m[..., :1]), torch.cumsum(m, dim=-1)], dim=-1)
    shifted = (v - offsets).reshape(-1, n)
    with torch.no_grad():
        blocks = _pav_blocks(shifted.detach())
    # Block means, recomputed with autograd; y = x + (mean - shifted) keeps singleton blocks exactly at x.
    sums = torch.zeros_like(shifted).scatter_add(1, blocks, shifted)
    counts = torch.zeros_like(shifted).scatter_add(1, blocks, torch.ones_like(shifted))
    means = torch.gather(sums, 1, blocks) / torch.gather(counts, 1, blocks)
    y = v + (means - shifted).reshape(*batch_shape, n)
    return y.movedim(-1, dim).to(x.dtype)


class MonotonicProjection(Transform):
    """After every step, project each parameter of the group onto increasing sequences along ``dim``.

    The transform leaves the update alone and acts in :meth:`after_step`, like GoMLX's per-step update hook
    (``train.AddPerStepUpdateGraphFn``) that its KAN layers use for their split points::

        >>> import torch, gradstep
        >>> from gradstep.tools.projections import MonotonicProjection
        >>> splits = torch.nn.Parameter(torch.tensor([0.0, 0.5, 1.0]))
        >>> opt = gradstep.chain([splits], MonotonicProjection(margin=0.1, exact=True), lr=1.0)
        >>> splits.grad = torch.tensor([0.0, -1.0, 1.0]); _ = opt.step()
        >>> splits.detach()
        tensor([0.0000, 0.7000, 0.8000])

    Args:
        margin: the minimum gap (see :func:`monotonic_projection`).
        dim: the dimension of each parameter to make increasing.
        exact: the Euclidean projection (:func:`monotonic_projection_exact`) instead of GoMLX's coarse one.

    Real parameters only: a complex parameter reaches :meth:`after_step` as a real view with a trailing pair
    dimension, which this transform does not interpret.
    """

    def __init__(self, margin: float | Tensor, dim: int = -1, *, exact: bool = False) -> None:
        self.margin = margin
        self.dim = dim
        self.exact = exact

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return updates

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        project = monotonic_projection_exact if self.exact else monotonic_projection
        for p in params:
            p.copy_(project(p, self.margin, self.dim))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(margin={self.margin!r}, dim={self.dim}, exact={self.exact})"

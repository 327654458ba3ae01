"""Per-tensor and per-row reductions: the one place where norms, inner products and means are computed.

Every transform that needs a reduction over a tensor (clipping, trust ratios, projections, cosines, row norms) calls
these functions, so that they can be made sharding-aware (local partial sums all-reduced over the mesh) in one place.
Per-tensor results come back as one vector with an entry per tensor; per-row results keep the tensor's rank
(shape ``(n, 1, ..., 1)``) so that they broadcast against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_norm", "row_dots", "row_means", "row_norms", "tensor_dots", "tensor_norms"]


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


def tensor_norms(xs: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of each tensor (over all its elements), as one vector, computed in one multi-tensor pass.

    A zero-size tensor has norm 0 (``_foreach_norm`` refuses the infinity norm of an empty tensor).
    """
    if not xs:
        return torch.zeros(0)
    if all(x.numel() > 0 for x in xs):
        return torch.stack([_wide(n) for n in torch._foreach_norm(list(xs), ord)])
    filled = [i for i, x in enumerate(xs) if x.numel() > 0]
    norms = torch.zeros(len(xs), dtype=_wide(xs[0]).dtype if xs[0].is_floating_point() else torch.float32)
    norms = norms.to(xs[0].device)
    if filled:
        norms[filled] = tensor_norms([xs[i] for i in filled], ord).to(norms.dtype)
    return norms


def global_norm(xs: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (0-d)."""
    if not xs:
        return torch.zeros(())
    return torch.linalg.vector_norm(tensor_norms(xs))


def tensor_dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """The inner product ``<x_i, y_i>`` over all elements of each pair of tensors, as one vector."""
    if not xs:
        return torch.zeros(0)
    products = torch._foreach_mul(list(xs), list(ys))
    return torch.stack([_wide(p).sum() for p in products])


def _rows(x: Tensor) -> Tensor:
    # reshape(n, -1) cannot infer -1 for an empty tensor; the row length is explicit.
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _row_shape(x: Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 1) if x.dim() > 0 else ()


def row_norms(xs: Sequence[Tensor]) -> list[Tensor]:
    """The L2 norm of each row (all dims but the first) of each tensor, shaped to broadcast against it.

    A 0-d tensor's "row" is the tensor itself.
    """
    return [
        torch.linalg.vector_norm(_rows(_wide(x)), dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x).abs()
        for x in xs
    ]


def row_dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """The inner product of each row pair (all dims but the first), shaped to broadcast against the tensors."""
    return [
        _rows(_wide(x) * _wide(y)).sum(dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x) * _wide(y)
        for x, y in zip(xs, ys)
    ]


def row_means(xs: Sequence[Tensor]) -> list[Tensor]:
    """The mean of each row (all dims but the first), shaped to broadcast against the tensor."""
    return [_rows(_wide(x)).mean(dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x) for x in xs]

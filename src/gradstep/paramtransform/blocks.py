"""Block views of the parameter-transforming optimizers (rai_toolbox's ``param_ndim`` reshape).

A *batched view* has shape ``(N, d1, ..., dm)``: ``N`` blocks of shape ``(d1, ..., dm)`` (see :func:`to_batch`). The
reductions over each block (Lp norms, top-k, signed argmax) are the per-row functions of
:mod:`gradstep.core.reductions`, applied to such views.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["block_ndim", "to_batch"]


def block_ndim(param_ndim: int | None, ndim: int) -> int:
    """The number of trailing dims that form each block, or ``ValueError`` naming the bad ``param_ndim``.

    ``None`` means the whole tensor; a negative value is an offset from ``ndim``. A 0-d tensor is one block whatever
    the (default) ``-1`` says, since it has no leading dim to batch over.
    """
    if param_ndim is None:
        return ndim
    if ndim == 0 and param_ndim == -1:
        return 0
    if abs(param_ndim) > ndim:
        raise ValueError(
            f"Invalid param_ndim: {param_ndim} for a tensor with ndim={ndim} (abs(param_ndim) <= ndim must hold)"
        )
    return param_ndim + ndim if param_ndim < 0 else param_ndim


def to_batch(x: Tensor, param_ndim: int | None) -> Tensor:
    """A view of ``x`` shaped ``(N, d1, ..., dm)`` whose blocks have ``param_ndim`` dims (rai_toolbox's reshape).

    For ``x`` of shape (3, 5, 2): ``0 -> (30, 1)``, ``1 -> (15, 2)``, ``2 -> (3, 5, 2)``, ``None -> (1, 3, 5, 2)``,
    ``-1 -> (3, 5, 2)``, ``-2 -> (15, 2)``, ``-3 -> (30, 1)``. The result is at least 2-d.
    """
    nd = block_ndim(param_ndim, x.ndim)
    delta = 1 + nd - x.ndim
    if delta > 0:
        x = x[(None,) * delta]
    elif delta < 0:
        x = x.view(math.prod(x.shape[: x.ndim - nd]), *x.shape[x.ndim - nd :])  # explicit: -1 fails when empty
    if x.ndim < 2:
        x = x.view(*x.shape, *(1,) * (2 - x.ndim))
    return x

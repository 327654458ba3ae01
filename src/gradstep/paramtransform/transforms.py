"""rai_toolbox's gradient transforms and ball projections as plain gradstep transforms, for any chain.

Each acts on every block of a tensor's batched view (the ``param_ndim`` group hyperparameter, shared by all of them
in a chain, exactly as :class:`~gradstep.paramtransform.ParamTransformingOptimizer` views tensors)::

    >>> import torch, gradstep
    >>> from gradstep.paramtransform.transforms import LpNormedGradient
    >>> from gradstep.optim.adam import ScaleByAdam
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> opt = gradstep.chain([w], LpNormedGradient(p=2), ScaleByAdam(), lr=1e-2)  # Adam on L2-normed rows

Gradient transforms (``update``) come first in a chain to act on the raw gradient; projections (``after_step``)
act on the parameters after the core's write. Differences from the wrapper classes: the chain's weight decay (if
any) enters before the transforms, where an inner SGD adds it after them; projections act on the parameters that
had a gradient this step (the wrappers project every parameter).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper
from ..core.ops import TensorList
from ..core.reductions import row_lp_norms
from ..core.transform import GroupStep, Transform
from ..transforms import ScaleBySign
from .blocks import block_ndim, to_batch
from .lp import CLAMP, DQ, EPSILON, TINY, Q, check_clamp, check_generator, project_l2_ball_, sample_q, top_q

__all__ = [
    "ClampedGradient",
    "L2BallProjection",
    "LinfBallProjection",
    "LpNormedGradient",
    "SignedGradient",
    "TopQGradient",
]


def _param_ndim(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    return None if ok else "must be an int or None"


PARAM_NDIM = Hyper("param_ndim", -1, _param_ndim, "ndim of each block (negative: offset from the tensor's; None: all)")


class _Blockwise(Transform):
    """A transform acting on each block of ``param_ndim``; checks that every tensor of a group has such blocks."""

    hypers: ClassVar[tuple[Hyper, ...]] = (PARAM_NDIM,)

    def check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            block_ndim(group["param_ndim"], p.ndim)

    @staticmethod
    def blocks(ctx: GroupStep, xs: TensorList) -> list[Tensor]:
        return [to_batch(x.contiguous(), ctx.hyper("param_ndim")) for x in xs]


class SignedGradient(ScaleBySign):
    """The sign of the direction (0 stays 0): rai_toolbox's ``SignedGradientOptim`` as a transform."""


class ClampedGradient(Transform):
    """Clamp every element of the direction to ``[clamp_min, clamp_max]`` (at least one given)."""

    elementwise = True
    hypers = CLAMP

    def check_group(self, group: dict[str, Any]) -> None:
        check_clamp(group)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        lo, hi = ctx.hyper("clamp_min"), ctx.hyper("clamp_max")
        return [torch.clamp(u, min=lo, max=hi) for u in updates]


class LpNormedGradient(_Blockwise):
    """Divide each block of the direction by ``max(||d||_p, div_by_zero_eps)`` (``p`` 1 or 2 in rai_toolbox)."""

    def __init__(self, p: float = 2, div_by_zero_eps: float = TINY) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"Invalid p: {p!r} (must be a real number > 0, or inf)")
        if isinstance(div_by_zero_eps, bool) or not div_by_zero_eps >= 0:
            raise ValueError(f"Invalid div_by_zero_eps: {div_by_zero_eps!r} (must be a real number >= 0)")
        self.p = p
        self.div_by_zero_eps = div_by_zero_eps

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        out = []
        for u, b in zip(updates, self.blocks(ctx, updates)):
            out.append((b / torch.clamp(row_lp_norms([b], self.p)[0], min=self.div_by_zero_eps)).view(u.shape))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class TopQGradient(_Blockwise):
    """Keep the ``round((1 - q) n)`` largest-magnitude entries of each block of ``n``; ``q`` required.

    With ``dq > 0``, ``q`` is drawn for every parameter at every step from ``generator`` (a host sync).
    """

    hypers = (Q, DQ, PARAM_NDIM)

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = check_generator(generator)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        q, dq = ctx.hyper("q"), ctx.hyper("dq")
        return [
            top_q(b, sample_q(q, dq, self.generator)).view(u.shape) for u, b in zip(updates, self.blocks(ctx, updates))
        ]


class L2BallProjection(_Blockwise):
    """After the step, scale each parameter block with ``||p|| > epsilon`` by ``epsilon / (||p|| + 1e-7)``."""

    hypers = (EPSILON, PARAM_NDIM)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return updates

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        for p, b in zip(params, self.blocks(ctx, params)):
            project_l2_ball_(b, ctx.hyper("epsilon"))  # renorm_, also on sharded blocks
            if b.data_ptr() != p.data_ptr():  # a non-contiguous parameter was projected in a copy
                p.copy_(b.view(p.shape))


class LinfBallProjection(Transform):
    """After the step, clamp every parameter element to ``[-epsilon, epsilon]``."""

    elementwise = True
    hypers = (EPSILON,)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return updates

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        eps = ctx.hyper("epsilon")
        for p in params:
            p.clamp_(min=-eps, max=eps)

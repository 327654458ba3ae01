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

Sharded parameters (FSDP2): the core steps each rank's local shard. A block that is the whole tensor
(``param_ndim=None``, or ``param_ndim`` equal to the tensor's ndim) then spans the split dim, so its norm or top-k
selection is computed as a whole-tensor reduction over the ranks (:mod:`gradstep.core.reductions`), which gives the
single-process result; smaller blocks lie within rows of dim 0, which every rank holds whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper
from ..core.ops import TensorList
from ..core.reductions import is_split, row_lp_norms, tensor_keep_top_k, tensor_norms, tensor_numels
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

    @staticmethod
    def split_whole_blocks(ctx: GroupStep, xs: TensorList) -> list[bool]:
        """For each tensor: whether its one block is the whole tensor and the tensor is split over ranks (FSDP2).

        Such a block's reductions must be whole-tensor ones: its batched view ``(1, *local_shape)`` holds only this
        rank's part. Decided from the ndims and the declared sharding, the same on every rank, so that every rank
        takes part in the same collectives.
        """
        param_ndim = ctx.hyper("param_ndim")
        spans = [block_ndim(param_ndim, x.ndim) == x.ndim for x in xs]
        if not any(spans):
            return spans
        return [s and split for s, split in zip(spans, is_split(xs))]

    @contextmanager
    def _named(self, ctx: GroupStep) -> Iterator[None]:
        """Name the transform and its param_ndim in a sharding the shared reductions do not support."""
        try:
            yield
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"{type(self).__name__} with param_ndim={ctx.hyper('param_ndim')!r} under this sharding: {exc}"
            ) from exc

    def block_lp_norms(self, ctx: GroupStep, xs: TensorList, blocks: list[Tensor], p: float) -> list[Tensor]:
        """The Lp norm of every block of each of ``xs`` (``blocks`` are their batched views), shaped against them."""
        whole = self.split_whole_blocks(ctx, xs)
        with self._named(ctx):
            if not any(whole):
                return row_lp_norms(blocks, p)
            norms: list[Tensor | None] = [None] * len(xs)
            rows = [i for i, w in enumerate(whole) if not w]
            for i, n in zip(rows, row_lp_norms([blocks[i] for i in rows], p) if rows else []):
                norms[i] = n
            split = [i for i, w in enumerate(whole) if w]
            for i, n in zip(split, _whole_norms([xs[i] for i in split], [blocks[i] for i in split], p)):
                norms[i] = n
        return [n for n in norms if n is not None]


def _whole_norms(xs: TensorList, blocks: list[Tensor], p: float) -> list[Tensor]:
    """The Lp norm of each whole tensor (reduced over the ranks), as the row norm of its one-block view would be:
    shaped ``(1, ..., 1)`` against the view, float32 for half precision."""
    norms = tensor_norms(xs, p).unbind(0)
    return [
        n.to(torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype).reshape((1,) * b.dim())
        for n, b in zip(norms, blocks)
    ]


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
        blocks = self.blocks(ctx, updates)
        norms = self.block_lp_norms(ctx, updates, blocks, self.p)
        return [(b / torch.clamp(n, min=self.div_by_zero_eps)).view(u.shape) for u, b, n in zip(updates, blocks, norms)]

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
        qs = [sample_q(q, dq, self.generator) for _ in updates]  # one draw per parameter, in order
        whole = self.split_whole_blocks(ctx, updates)
        out: list[Tensor | None] = [None] * len(updates)
        split = [i for i, w in enumerate(whole) if w]
        if split:
            with self._named(ctx):
                # k from the whole tensor's size, as in one process; the selection is made on the gathered tensor.
                sizes = tensor_numels([updates[i] for i in split]).tolist()
                ks = [round((1.0 - qs[i]) * int(n)) for i, n in zip(split, sizes)]
                for i, kept in zip(split, tensor_keep_top_k([updates[i] for i in split], ks)):
                    out[i] = kept
        with self._named(ctx):
            for i, (u, b) in enumerate(zip(updates, self.blocks(ctx, updates))):
                if not whole[i]:
                    out[i] = top_q(b, qs[i]).view(u.shape)
        return [o for o in out if o is not None]


class L2BallProjection(_Blockwise):
    """After the step, scale each parameter block with ``||p|| > epsilon`` by ``epsilon / (||p|| + 1e-7)``."""

    hypers = (EPSILON, PARAM_NDIM)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return updates

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        epsilon = ctx.hyper("epsilon")
        blocks = self.blocks(ctx, params)
        whole = self.split_whole_blocks(ctx, params)
        split = [i for i, w in enumerate(whole) if w]
        norms = dict(zip(split, _whole_norms([params[i] for i in split], [blocks[i] for i in split], 2)))
        for i, (p, b) in enumerate(zip(params, blocks)):
            if i in norms:
                _scale_into_ball_(b, norms[i], epsilon)
            else:
                with self._named(ctx):
                    project_l2_ball_(b, epsilon)  # renorm_, also on sharded blocks
            if b.data_ptr() != p.data_ptr():  # a non-contiguous parameter was projected in a copy
                p.copy_(b.view(p.shape))


def _scale_into_ball_(blocks: Tensor, norms: Any, epsilon: float) -> None:
    """:func:`~gradstep.paramtransform.lp.project_l2_ball_` with the blocks' norms given (whole-tensor ones, reduced
    over the ranks): the same operations in the same dtypes."""
    limit = torch.full_like(norms, epsilon)
    factor = torch.where(norms > limit, limit / (norms + 1e-7), torch.ones_like(norms))
    blocks.mul_(factor.to(blocks.dtype))


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

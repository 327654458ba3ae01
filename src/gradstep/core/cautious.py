r"""Cautious updates (Liang, Chen, Liu & Liu, 2024): drop the components of a step that disagree with the gradient.

Any optimizer becomes cautious with ``cautious=True`` (every :class:`~gradstep.core.optimizer.ChainedOptimizer`
accepts it: the core appends :class:`Cautious` to its chain), and :class:`Cautious` can end a hand-built chain.
"""

from __future__ import annotations

import math
from typing import Any

from .hypers import Hyper, boolean
from .ops import TensorList
from .reductions import tensor_numels, tensor_sums
from .transform import GroupStep, Transform, coef_is_zero

__all__ = ["Cautious"]


class Cautious(Transform):
    r"""Mask the direction where it disagrees in sign with the gradient, and rescale what is left.

    Per tensor, with direction :math:`u` and gradient :math:`g` (the chain's input: with coupled weight decay,
    :math:`g + \lambda p`), :math:`n` elements:

    .. math::
        \phi = \mathbb{1}[u \odot g > 0], \qquad u \leftarrow \frac{n}{\sum \phi + 1}\; \phi \odot u

    so the step keeps its average size. The ``+ 1`` is the authors' (it also guards a tensor with no agreeing
    component). The count is a per-tensor reduction through :mod:`gradstep.core.reductions` (exact under FSDP2).
    Reads ``cautious`` (a group with ``cautious=False`` is left alone).

    Liang, Chen, Liu & Liu, 2024. Cautious Optimizers: Improving Training with One Line of Code. arXiv:2411.16085.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.zeros(4))
        >>> opt = gradstep.SGD([w], lr=1.0, momentum=0.9, cautious=True)
        >>> w.grad = torch.tensor([1.0, 1.0, 1.0, 1.0]); _ = opt.step()
        >>> w.grad = torch.tensor([-0.5, -0.5, 1.0, 1.0]); _ = opt.step()   # buffer [0.4, 0.4, 1.9, 1.9]
        >>> w.detach()   # step 1: 4/5 of g; step 2: 4/3 of the agreeing components of the buffer
        tensor([-0.8000, -0.8000, -3.3333, -3.3333])
    """

    # The count runs over real views, which is what a complex parameter optimized as pairs of reals counts too.
    elementwise = True
    hypers = (Hyper("cautious", True, boolean, "mask step components whose sign disagrees with the gradient"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if not ctx.hyper("cautious") or not updates:
            return updates
        ops = ctx.ops
        grads = ctx.grads
        wd = ctx.param_hyper("weight_decay")
        if ctx.hyper("weight_decay_mode") == "coupled" and not coef_is_zero(wd) and not ctx.is_zero("weight_decay"):
            grads = ops.add(grads, ops.mul(ctx.params, wd))  # the gradient the chain saw (the core added wd * p)
        # 1 where u * g > 0, else 0, without a comparison kernel: max(sign(u * g), 0).
        mask = ops.sign(ops.mul(updates, grads))
        ops.clamp_(mask, 0.0, math.inf)
        numels = tensor_numels(mask)
        scale = numels / (tensor_sums(mask).to(numels.dtype) + 1)
        ops.mul_(mask, ctx.per_param(scale))
        ops.mul_(mask, updates)  # the mask's memory becomes the direction
        return mask

    def __repr__(self) -> str:
        return "Cautious()"


def with_cautious(transforms: Any, hypers: dict[str, Any]) -> tuple[Transform, ...]:
    """The chain, with :class:`Cautious` appended when ``hypers`` holds ``cautious=True`` and the chain has none.

    ``cautious=False`` on a chain without :class:`Cautious` is taken out of ``hypers`` (nothing to switch off).
    """
    chain = tuple(transforms)
    if "cautious" not in hypers or any(isinstance(t, Cautious) for t in chain):
        return chain
    if not Cautious.hypers[0].validate(hypers["cautious"]):
        del hypers["cautious"]
        return chain
    return (*chain, Cautious())

"""Generic transforms, usable in any chain (see :func:`gradstep.chain`).

Algorithm-specific transforms (Adam's moments, RMSProp's scaling, ...) live with their optimizer family in
:mod:`gradstep.optim`; the ones here are shared by several families or useful on their own.
"""

from __future__ import annotations

from typing import Any

import torch

from .core.hypers import Hyper, boolean, non_negative, unit_interval_closed
from .core.ops import TensorList
from .core.reductions import global_norm, tensor_norms
from .core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["ClipByGlobalNorm", "ClipByNorm", "ClipByValue", "Momentum", "ScaleBySign", "SqrtStepDecay"]


class Momentum(Transform):
    r"""Heavy-ball momentum with dampening and Nesterov's variant, as ``torch.optim.SGD``.

    .. math::
        b_1 = d_1,\qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, d_t,\qquad
        \text{out} = d_t + \mu\, b_t \ \text{(nesterov)}\ \text{ or } b_t

    with ``momentum`` :math:`\mu` and ``dampening`` :math:`\tau`. State: ``momentum_buffer`` (only when
    :math:`\mu \ne 0`). Polyak (1964), Sutskever et al. (2013).
    """

    elementwise = True
    hypers = (
        Hyper("momentum", 0.0, non_negative, "momentum factor"),
        Hyper("dampening", 0.0, unit_interval_closed, "dampening of the new direction in the buffer"),
        Hyper("nesterov", False, boolean, "Nesterov momentum"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"momentum_buffer": zeros} if group["momentum"] != 0 else {}

    def check_group(self, group: dict[str, Any]) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: True (Nesterov momentum requires a momentum and zero dampening)")

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        mu, damp = ctx.hyper("momentum"), ctx.hyper("dampening")
        if mu == 0:
            return updates
        ops = ctx.ops
        buf = ctx.buffer("momentum_buffer")
        ops.mul_(buf, mu)
        if damp == 0:
            ops.add_(buf, updates)
        else:
            # The buffer's first value is the undampened direction, as in torch.optim.SGD.
            first = (ctx.steps == 1).to(torch.float64)
            ops.add_scaled_(buf, updates, ctx.per_param(first + (1 - first) * (1 - damp)))
        if ctx.hyper("nesterov"):
            return ops.add(updates, ops.mul(buf, mu))
        return buf


class SqrtStepDecay(Transform):
    r"""GoMLX SGD's step decay: the direction is divided by :math:`\sqrt{t}` when ``sqrt_step_decay`` is on."""

    elementwise = True
    hypers = (Hyper("sqrt_step_decay", False, boolean, "divide the step by sqrt(t) (GoMLX SGD)"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if not ctx.hyper("sqrt_step_decay"):
            return updates
        return ctx.ops.div(updates, ctx.per_param(torch.sqrt(ctx.steps)))


class ScaleBySign(Transform):
    """The sign of the direction (signSGD, Bernstein et al., 2018)."""

    elementwise = True

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return ctx.ops.sign(updates)


class ClipByValue(Transform):
    """Clamp every element of the direction to ``[-clip_value, clip_value]`` (0: off)."""

    elementwise = True
    hypers = (Hyper("clip_value", 0.0, non_negative, "clamp each element of the direction (0: off)"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        c = ctx.hyper("clip_value")
        return ctx.ops.clamp(updates, -c, c) if c > 0 else updates


class ClipByNorm(Transform):
    r"""Scale each tensor of the direction by :math:`\min(1, c / \lVert d_i \rVert)` (``max_norm`` c; 0: off)."""

    hypers = (Hyper("max_norm", 0.0, non_negative, "per-tensor norm limit of the direction (0: off)"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        c = ctx.hyper("max_norm")
        if c <= 0:
            return updates
        norms = tensor_norms(updates).to(torch.float64)
        return ctx.ops.mul(updates, ctx.per_param(torch.clamp(c / norms, max=1.0)))


class ClipByGlobalNorm(Transform):
    r"""Scale the whole group's direction by :math:`\min(1, c / \lVert d \rVert)` (``max_global_norm`` c; 0: off).

    The pre-clip norm of the last step is kept on the transform as ``last_norm`` (a 0-d tensor) for logging.
    """

    hypers = (Hyper("max_global_norm", 0.0, non_negative, "global norm limit of the group's direction (0: off)"),)

    def __init__(self) -> None:
        self.last_norm: torch.Tensor | None = None

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        c = ctx.hyper("max_global_norm")
        if c <= 0:
            return updates
        norm = global_norm(updates)
        self.last_norm = norm.detach()
        return ctx.ops.mul(updates, torch.clamp(c / norm, max=1.0).to(updates[0].dtype))

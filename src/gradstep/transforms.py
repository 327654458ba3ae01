"""Generic transforms, usable in any chain (see :func:`gradstep.chain`).

Algorithm-specific transforms (Adam's moments, RMSProp's scaling, ...) live with their optimizer family in
:mod:`gradstep.optim`; the ones here are shared by several families or useful on their own.
"""

from __future__ import annotations

from typing import Any

import torch

from .core.hypers import Hyper, boolean, momentum_factor, non_negative, unit_interval_closed
from .core.ops import TensorList
from .core.reductions import global_norm, tensor_norms
from .core.transform import BufferInit, GroupStep, Transform, zeros
from .tools.clipping import clip_scale

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
    sparse_gradients = "accepted"  # as torch.optim.SGD: the (dense) buffer takes a sparse direction
    hypers = (
        Hyper("momentum", 0.0, momentum_factor, "momentum factor (in [0, 1])"),
        Hyper("dampening", 0.0, unit_interval_closed, "dampening of the new direction in the buffer"),
        Hyper("nesterov", False, boolean, "Nesterov momentum"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        # A tensor momentum (a scheduler's) may become non-zero: its buffer exists whatever its value now.
        mu = group["momentum"]
        return {"momentum_buffer": zeros} if isinstance(mu, torch.Tensor) or mu != 0 else {}

    def check_group(self, group: dict[str, Any]) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: True (Nesterov momentum requires a momentum and zero dampening)")

    def fused_kernel(self, group: dict[str, Any]) -> Any:
        # torch's SGD kernel: coupled weight decay, the momentum buffer as torch.optim.SGD keeps it.
        return _fused_sgd if group["weight_decay_mode"] == "coupled" else None

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        mu, damp = ctx.hyper("momentum"), ctx.hyper("dampening")
        if ctx.is_zero("momentum"):
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
            return ops.add(ops.mul(buf, mu), updates)  # dense + sparse: torch has no sparse + dense
        return buf


def _fused_sgd(group: dict[str, Any], params: TensorList, grads: TensorList, states: list[dict[str, Any]]) -> None:
    """One step of ``torch.optim.SGD(fused=True)``: the same kernel on the same buffers.

    torch's kernel starts a buffer from the gradient on its first step (``is_first_step``) and reads no step count;
    gradstep's buffers exist from the start, so parameters on their first step and the others are stepped apart.
    """
    momentum = group["momentum"]
    steps = [s["step"] for s in states]
    # One read of all the counts (one sync on a GPU), and only where a buffer exists to be started.
    first = torch.stack(steps).eq(0).tolist() if momentum != 0 else [False] * len(states)
    torch._foreach_add_(steps, 1)
    for is_first in (True, False):
        chosen = [i for i, f in enumerate(first) if f is is_first]
        if not chosen:
            continue
        torch._fused_sgd_(
            [params[i] for i in chosen],
            [grads[i] for i in chosen],
            [states[i]["momentum_buffer"] for i in chosen] if momentum != 0 else [],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=is_first,
        )


class SqrtStepDecay(Transform):
    r"""GoMLX SGD's step decay: the direction is divided by :math:`\sqrt{t}` when ``sqrt_step_decay`` is on."""

    elementwise = True
    sparse_gradients = "accepted"
    hypers = (Hyper("sqrt_step_decay", False, boolean, "divide the step by sqrt(t) (GoMLX SGD)"),)

    def is_identity(self, group: dict[str, Any]) -> bool:
        return not group["sqrt_step_decay"]

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
    r"""Clamp every element of the direction: :math:`d \leftarrow \mathrm{clamp}(d, -c, c)` (``clip_value`` c; 0: off).

    The rule of ``torch.nn.utils.clip_grad_value_`` and of rai_toolbox's clamped gradients (symmetric bounds),
    applied to the direction at this point of the chain, out of place. NaN elements stay NaN.
    """

    elementwise = True
    hypers = (Hyper("clip_value", 0.0, non_negative, "clamp each element of the direction to [-c, c] (0: off)"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        c = ctx.hyper("clip_value")
        return ctx.ops.clamp(updates, -c, c) if c > 0 else updates


class ClipByNorm(Transform):
    r"""Scale each tensor of the direction down to L2 norm ``max_tensor_norm`` (c; 0: off), ALF's per-tensor rule.

    .. math::
        s_i = c / \lVert d_i \rVert, \qquad d_i \leftarrow s_i\, d_i \ \text{ if } s_i < 1

    A zero tensor is left alone, and so is a tensor whose norm is NaN (spec A.4.3; see
    :mod:`gradstep.tools.clipping`). ALF's wrapper clips ``p.grad`` before the step; placed first in a chain this
    clips the gradient the same way, except that coupled weight decay (added before the chain) is clipped with it. For
    ALF's order exactly, with any optimizer, use :class:`~gradstep.tools.clipping.GradientClipping`.
    """

    hypers = (Hyper("max_tensor_norm", 0.0, non_negative, "L2 norm limit of each tensor of the direction (0: off)"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if ctx.is_zero("max_tensor_norm") or not updates:
            return updates
        c = ctx.hyper("max_tensor_norm")
        return ctx.ops.mul(updates, ctx.per_param(clip_scale(tensor_norms(updates), c)))


class ClipByGlobalNorm(Transform):
    r"""Scale the group's direction down to global L2 norm ``max_global_norm`` (c; 0: off), ALF's global rule.

    .. math::
        G = \sqrt{\textstyle\sum_i \lVert d_i \rVert^2}, \qquad s = c / G, \qquad d \leftarrow s\, d
        \ \text{ if } s < 1

    :math:`G = 0` and :math:`G` NaN leave the direction unchanged (spec A.4.3). The chain runs once per param group,
    so each group is clipped by its own norm; to clip across groups (ALF's wrapper, torch's ``clip_grad_norm_``),
    use :class:`~gradstep.tools.clipping.GradientClipping` or :func:`~gradstep.tools.clipping.clip_gradients`.

    The pre-clip norm is reported as ``last_norm`` (a 0-d tensor, read without a host sync): the norm of the last
    group processed, that is, of the step when the optimizer has one group. ``None`` until the first clipped step.
    """

    hypers = (Hyper("max_global_norm", 0.0, non_negative, "global L2 norm limit of the group's direction (0: off)"),)

    def __init__(self) -> None:
        self.last_norm: torch.Tensor | None = None

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        return group["max_global_norm"] > 0

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if ctx.is_zero("max_global_norm") or not updates:
            return updates
        c = ctx.hyper("max_global_norm")
        norm = global_norm(updates)
        self.last_norm = norm.detach()
        return ctx.ops.mul(updates, clip_scale(norm, c))

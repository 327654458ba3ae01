r"""Rprop: resilient backpropagation (Riedmiller & Braun, 1993), as torch.optim.Rprop (iRprop-).

Every element has its own step size :math:`\Delta` (state ``step_size``, initialised to ``lr``), grown by
:math:`\eta^+` while the gradient keeps its sign and shrunk by :math:`\eta^-` when it flips:

.. math::
    s = \operatorname{sign}(g_t\, g'_{t-1}), \qquad
    \Delta_t = \operatorname{clip}\left(\Delta_{t-1} \cdot
    \begin{cases}\eta^+ & s > 0\\ \eta^- & s < 0\\ 1 & s = 0\end{cases},\ \Delta_{\min}, \Delta_{\max}\right)

.. math::
    g'_t = \begin{cases} 0 & s < 0 \\ g_t & \text{otherwise}\end{cases} \ \text{(state ``prev``)}, \qquad
    p \leftarrow p - \operatorname{sign}(g'_t)\, \Delta_t

Only the sign of the gradient is used, so Rprop suits full-batch training. ``lr`` is the initial step size: as in
torch, changing it afterwards (a scheduler) does not change the steps.

Riedmiller & Braun, 1993. A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm. ICNN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from .asgd import lr_ratio

__all__ = ["Rprop", "ScaleByRprop"]


def _etas(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (etaminus, etaplus)"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a pair of real numbers"
    return None if 0.0 < value[0] < 1.0 < value[1] else "must satisfy 0 < etaminus < 1 < etaplus"


def _step_sizes(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (min_step, max_step)"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a pair of real numbers"
    return None if 0.0 <= value[0] <= value[1] else "must satisfy 0 <= min_step <= max_step"


def _filled_with_lr(lr: Any) -> BufferInit:
    value = float(lr)

    def init(param: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.full_like(param, value, dtype=dtype, memory_format=torch.preserve_format)

    return init


class ScaleByRprop(Transform):
    """Rprop's per-element step sizes (see the module docstring). State: ``prev``, ``step_size`` (torch's names)."""

    elementwise = True
    hypers = (
        Hyper("etas", (0.5, 1.2), _etas, "(etaminus, etaplus): step-size factors on a sign flip / a kept sign", False),
        Hyper("step_sizes", (1e-6, 50.0), _step_sizes, "(min_step, max_step): bounds of the step sizes", False),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"prev": zeros, "step_size": _filled_with_lr(group["lr"])}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        etaminus, etaplus = ctx.hyper("etas")
        lo, hi = ctx.hyper("step_sizes")
        prev, step_size = ctx.buffer("prev"), ctx.buffer("step_size")
        sign = ops.sign(ops.mul(updates, prev))
        kept = ops.clamp(sign, 0.0, 1.0)  # 1 where the sign was kept
        flipped = ops.clamp(sign, -1.0, 0.0)  # -1 where it flipped
        # The factor etaplus, etaminus or 1 from the sign, with multi-tensor ops: 1 + kept (etaplus - 1) + ...
        factor = ops.mul(kept, etaplus - 1.0)
        ops.add_scaled_(factor, flipped, 1.0 - etaminus)
        ops.add_(factor, 1.0)
        ops.mul_(step_size, factor)
        ops.copy_(step_size, ops.clamp(step_size, lo, hi))
        # iRprop-: after a flip, no step and no memory of the gradient.
        ops.add_(flipped, 1.0)
        kept_grad = ops.mul(updates, flipped)
        ops.copy_(prev, kept_grad)
        direction = ops.sign(kept_grad)
        ops.mul_(direction, step_size)
        # The core writes p - lr * d: the step is the step size itself, whatever lr is now (torch's semantics).
        lr = ctx.hyper("lr")
        if isinstance(lr, Tensor):
            ops.mul_(direction, lr_ratio(torch.ones((), dtype=torch.float64, device=lr.device), lr))
        else:
            ops.mul_(direction, 1.0 / lr if lr != 0 else 0.0)
        return direction


class Rprop(ChainedOptimizer):
    r"""Rprop, a drop-in for ``torch.optim.Rprop`` (lr 1e-2, etas (0.5, 1.2), step_sizes (1e-6, 50)).

    .. math::
        \Delta_t = \operatorname{clip}(\Delta_{t-1}\, \eta^{\pm}, \Delta_{\min}, \Delta_{\max}), \qquad
        p \leftarrow p - \operatorname{sign}(g'_t)\, \Delta_t

    See :mod:`gradstep.optim.rprop`. Riedmiller & Braun (1993).

    .. warning::
        Differences from torch.optim.Rprop: the step is written as the core's ``p - lr * d`` with
        ``d = sign(g') step_size / lr``, so ``lr = 0`` (and ``backoff_steps``) leave the parameter in place, where
        torch still steps by the clamped step sizes; ``lr_scale`` and per-parameter ``opt_args`` lrs scale the
        steps. The step-size factor is computed as ``1 + (etaplus - 1)`` (or ``1 - (1 - etaminus)``), equal to
        torch's up to one rounding. The core's ``weight_decay`` is available (torch's Rprop has none). No
        ``capturable``/``differentiable`` arguments.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = gradstep.Rprop([w], lr=0.1)
        >>> for _ in range(3):
        ...     w.grad = torch.tensor([1.0, -1.0]); _ = opt.step()
        >>> w.detach()  # steps 0.1, 0.12, 0.144
        tensor([-0.3640,  0.3640])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50.0),
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByRprop()],
            lr=lr,
            etas=etas,
            step_sizes=step_sizes,
            foreach=foreach,
            maximize=maximize,
            **options,
        )


register(
    Entry(
        "rprop",
        Rprop,
        "resilient backpropagation: per-element step sizes adapted from gradient signs (full batch)",
        "Riedmiller & Braun, 1993. A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
        ("torch.optim.Rprop",),
        example={"lr": 2e-2, "etas": (0.4, 1.3), "step_sizes": (1e-5, 0.5)},
        invalid=(({"etas": (1.2, 0.5)}, "etas"), ({"step_sizes": (1.0, 0.1)}, "step_sizes"), ({"lr": -1.0}, "lr")),
        lr_sets_initial_step=True,
    )
)

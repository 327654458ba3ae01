r"""Averaged SGD (Polyak & Juditsky, 1992), with torch.optim.ASGD's step-size schedule.

Per parameter, at step t, with :math:`\lambda` = ``lambd``, :math:`\alpha` = ``alpha`` and :math:`t_0` = ``t0``:

.. math::
    p_t = p_{t-1}(1 - \lambda \eta_t) - \eta_t g_t, \qquad
    \bar p_t = \bar p_{t-1} + \mu_t (p_t - \bar p_{t-1}),

.. math::
    \eta_1 = lr, \quad \eta_{t+1} = \frac{lr}{(1 + \lambda\, lr\, t)^{\alpha}}, \qquad
    \mu_1 = 1, \quad \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

The average :math:`\bar p` (state ``ax``) is what averaged SGD returns; the parameter itself follows plain SGD with
the decaying step :math:`\eta` (state ``eta``) and the decay :math:`\lambda`. With the default ``t0 = 1e6`` the
average is the parameter itself for the first million steps.

Polyak & Juditsky, 1992. Acceleration of Stochastic Approximation by Averaging. SIAM J. Control Optim. 30(4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, non_negative
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, scalar_state, zeros

__all__ = ["ASGD", "AveragedSGD", "lr_ratio"]


def lr_ratio(step_sizes: Tensor, lr: Any) -> Tensor:
    """``step_sizes / lr`` (0 where lr is 0): the direction that the core's ``p - lr * d`` turns into a step of the
    algorithm's own size (ASGD's eta, Rprop's step sizes)."""
    if isinstance(lr, Tensor):
        lr = lr.to(step_sizes)
        return torch.where(lr == 0, torch.zeros_like(step_sizes), step_sizes / lr)
    return step_sizes / lr if lr != 0 else torch.zeros_like(step_sizes)


class AveragedSGD(Transform):
    """ASGD's decayed step, its schedule and the running average (see the module docstring).

    State (torch's names): ``eta`` and ``mu`` (0-d, in torch's dtype for them: float32 unless float64 is the default
    dtype, so that they round as torch's do) and ``ax``, the average.
    """

    elementwise = True
    hypers = (
        Hyper("lambd", 1e-4, non_negative, "decay term lambda: p <- p (1 - lambda eta) - eta g"),
        Hyper("alpha", 0.75, non_negative, "power of the eta schedule lr / (1 + lambda lr t)^alpha"),
        Hyper("t0", 1e6, non_negative, "the step after which the average starts (mu = 1 / max(1, t - t0))"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"eta": scalar_state(float(group["lr"])), "mu": scalar_state(1.0), "ax": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        eta = torch.stack(ctx.buffer("eta")).to(torch.float64)
        direction = ops.add(updates, ops.mul(ctx.params, ctx.hyper("lambd")))
        ops.mul_(direction, ctx.per_param(lr_ratio(eta, ctx.hyper("lr"))))
        return direction

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        ops = ctx.ops
        averages = ctx.buffer("ax")
        mu = torch.stack(ctx.buffer("mu")).to(torch.float64)
        ops.lerp_(averages, ops.to(params, [a.dtype for a in averages]), ctx.per_param(mu))
        lr, lambd, t = ctx.hyper("lr"), ctx.hyper("lambd"), ctx.steps
        new_eta = lr / (1 + lambd * lr * t) ** ctx.hyper("alpha")
        new_mu = 1 / torch.clamp(t - ctx.hyper("t0"), min=1.0)
        etas, mus = ctx.buffer("eta"), ctx.buffer("mu")
        ops.copy_(etas, list(new_eta.to(etas[0].dtype).unbind(0)))
        ops.copy_(mus, list(new_mu.to(mus[0].dtype).unbind(0)))


class ASGD(ChainedOptimizer):
    r"""Averaged SGD, a drop-in for ``torch.optim.ASGD`` (lr 1e-2, lambd 1e-4, alpha 0.75, t0 1e6).

    .. math::
        p \leftarrow p(1 - \lambda\eta_t) - \eta_t g_t, \quad \bar p \leftarrow \bar p + \mu_t (p - \bar p), \quad
        \eta_{t+1} = \frac{lr}{(1+\lambda\, lr\, t)^\alpha}, \quad \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

    The average is ``optimizer.state[p]["ax"]``. Polyak & Juditsky (1992).

    .. warning::
        Differences from torch.optim.ASGD: the step is written as the core's ``p - lr * d`` with
        ``d = (eta / lr)(g + lambd p)``, so ``lr = 0`` (and ``backoff_steps``) leave the parameter in place where
        torch would still take the step ``eta`` computed from the previous lr; ``lr_scale`` and per-parameter
        ``opt_args`` lrs scale eta. ``ax`` is updated as ``ax + mu (p - ax)`` also while ``mu = 1`` (torch's
        per-tensor path copies ``p``): equal up to rounding. No ``capturable``/``differentiable`` arguments.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = gradstep.ASGD([w], lr=0.1, t0=0)
        >>> for _ in range(3):
        ...     w.grad = torch.ones(2); _ = opt.step()
        >>> float(opt.state[w]["mu"])  # 1 / (t - t0) after step t = 3
        0.3333333432674408
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [AveragedSGD()],
            lr=lr,
            lambd=lambd,
            alpha=alpha,
            t0=t0,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            **options,
        )


register(
    Entry(
        "asgd",
        ASGD,
        "averaged SGD with torch's decaying step size; the average is state['ax']",
        "Polyak & Juditsky, 1992. Acceleration of Stochastic Approximation by Averaging. SIAM J. Control Optim.",
        ("torch.optim.ASGD",),
        example={"lr": 5e-2, "lambd": 1e-3, "alpha": 0.6, "t0": 2.0, "weight_decay": 0.01},
        invalid=(({"lambd": -1.0}, "lambd"), ({"t0": -1.0}, "t0"), ({"alpha": -0.5}, "alpha")),
    )
)

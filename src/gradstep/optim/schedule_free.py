r"""Schedule-free SGD, AdamW and RAdam (Defazio et al., 2024): no learning-rate schedule, an average instead.

Three sequences per parameter: :math:`z` takes the base optimizer's steps, :math:`x` is a weighted average of the
:math:`z`'s, and the gradient is taken at their interpolation :math:`y`. At step :math:`k` (from 0), with
:math:`\gamma_k` the step's lr (``lr`` times the linear warm-up ``(k+1)/warmup_steps``, or RAdam's rectification):

.. math::
    \gamma_{max} = \max_{j \le k}\gamma_j,\quad w_k = (k+1)^r\,\gamma_{max}^{p},\quad
    c_{k+1} = w_k / \textstyle\sum_{j\le k} w_j

.. math::
    z_{k+1} = z_k - \gamma_k\, u_k,\qquad x_{k+1} = (1-c_{k+1})\, x_k + c_{k+1} z_{k+1},\qquad
    y_{k+1} = (1-\beta)\, z_{k+1} + \beta\, x_{k+1}

with :math:`u_k` the gradient at :math:`y_k` (SGD) or Adam's normalized gradient (AdamW, RAdam), plus ``wd * y``
(weight decay is taken at :math:`y`), :math:`p` = ``weight_lr_power`` and :math:`\beta` = ``momentum`` or
``betas[0]``. As in the reference, only :math:`z` is stored: the parameter holds :math:`y` in train mode and
:math:`x` in eval mode, and ``y`` is updated in place as ``y <- lerp(y, z, c) + gamma (beta (1 - c) - 1) u``.

Call ``opt.eval()`` before evaluating or saving the model (the parameters become :math:`x`, the average, which is
what to evaluate and keep) and ``opt.train()`` before training again. The counters (``k``, ``weight_sum``,
``lr_max``, ``scheduled_lr``, ``train_mode``) live in each param group, as in the reference.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.hypers import Hyper, boolean, one_of
from ..core.registry import Entry, register
from .schedule_free_step import (
    SCHEDULE_FREE_HYPERS,
    ScaleByScheduleFreeAdam,
    ScheduleFreeOptimizer,
    ScheduleFreeStep,
    schedule_free_weight,
)
from .schedule_free_step import interpolate as interpolate  # gradstep.wrappers' schedule-free wrapper imports it here

__all__ = ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree", "ScheduleFreeStep", "schedule_free_weight"]


def _open_unit(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "must be in (0, 1)"


class _SGDStep(ScheduleFreeStep):
    hypers = (
        Hyper("momentum", 0.9, _open_unit, "interpolation beta between z and the average x"),
        Hyper("weight_decay_mode", "coupled", one_of("coupled"), "coupled: g + wd*y (the reference's)"),
        *SCHEDULE_FREE_HYPERS,
    )


class SGDScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free SGD (Defazio et al., 2024); the math is in :mod:`gradstep.optim.schedule_free`.

    :math:`u_k = g(y_k) + \text{wd}\cdot y_k` and :math:`\beta` = ``momentum``. Call :meth:`train` and :meth:`eval`
    around training and evaluation (see the module docstring).

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682.

    .. warning::
        Differences from schedulefree ``SGDScheduleFree`` (1.4.1): the optimizer starts in train mode (the reference
        starts in eval mode and refuses a step before ``train()``; before the first step both are the same point).
        ``step`` is kept per parameter; the group also holds ``ckp1`` (the step's averaging weight). Gradients are
        never modified (the reference adds weight decay into ``p.grad``).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.SGDScheduleFree([w], lr=0.1)
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> opt.eval()   # w is now x, the average: evaluate or save it
        >>> opt.train()  # back to y before the next steps
        >>> opt.param_groups[0]["k"]
        3
    """

    _BETA = "momentum"
    _ADAM = False

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [_SGDStep("momentum")],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class AdamWScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free AdamW (Defazio et al., 2024); the math is in :mod:`gradstep.optim.schedule_free`.

    :math:`u_k = g / (\sqrt{v_k / (1-\beta_2^{k+1})} + \epsilon) + \text{wd}\cdot y_k` with
    :math:`v_k = \beta_2 v_{k-1} + (1-\beta_2) g^2` (no first moment: the interpolation is the momentum) and
    :math:`\beta` = ``betas[0]``. Call :meth:`train` and :meth:`eval` around training and evaluation.

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682.

    .. warning::
        Differences from schedulefree ``AdamWScheduleFree`` (1.4.1): the optimizer starts in train mode (the
        reference starts in eval mode and refuses a step before ``train()``); ``step`` is kept per parameter; the
        group also holds ``ckp1``, ``bias_correction2`` and ``adaptive``; ``betas[0] = 0`` is refused (the
        reference divides by it in ``eval()``); ``weight_decay_mode="coupled"`` is an addition. Gradients are never
        modified (the reference normalizes ``p.grad`` in place).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.AdamWScheduleFree([w], lr=0.01, warmup_steps=10)
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> opt.param_groups[0]["scheduled_lr"]  # lr * 1/10 in the first warm-up step
        0.001
        >>> sorted(opt.state[w])
        ['exp_avg_sq', 'step', 'z']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByScheduleFreeAdam(), ScheduleFreeStep("betas")],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class _RAdamStep(ScheduleFreeStep):
    hypers = (
        Hyper("silent_sgd_phase", True, boolean, "no step while the rectification is undefined (else SGD steps)"),
        *SCHEDULE_FREE_HYPERS[1:],  # no warm-up: the rectification is one
    )


class RAdamScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free RAdam (the reference's addition to Defazio et al., 2024): AdamW's with RAdam's rectification.

    The step's lr is :math:`\gamma_k = \text{lr}\cdot\rho_k`, :math:`\rho_k` RAdam's rectification
    :math:`\sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}` while
    :math:`\rho_t > 4`; before that the gradient is not normalized and :math:`\gamma_k = 0` (``silent_sgd_phase``,
    the default) or ``lr`` (SGD steps). No ``warmup_steps``: the rectification is the warm-up.

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682.
    Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond. ICLR. arXiv:1908.03265.

    .. warning::
        Differences from schedulefree ``RAdamScheduleFree`` (1.4.1): as :class:`AdamWScheduleFree`'s.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.RAdamScheduleFree([w], lr=0.01)
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> w.detach()  # the first steps are silent: the rectification is not defined yet
        tensor([ 1., -2.])
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        silent_sgd_phase: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByScheduleFreeAdam(), _RAdamStep("betas")],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            r=r,
            weight_lr_power=weight_lr_power,
            silent_sgd_phase=silent_sgd_phase,
            maximize=maximize,
            foreach=foreach,
            **options,
        )

    def _lr(self, group: dict[str, Any]) -> float:
        beta2 = group["betas"][1]
        step = group["k"] + 1
        beta2_t = beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t)
        group["adaptive"] = rho_t > 4.0
        if rho_t > 4.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        else:
            rect = float(not group["silent_sgd_phase"])
        return float(group["lr"]) * rect


_PAPER = "Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682"
for _entry in (
    Entry(
        "sgd_schedule_free",
        SGDScheduleFree,
        "Schedule-free SGD: no lr schedule, an average of the iterates; call train()/eval()",
        _PAPER,
        ("schedulefree SGDScheduleFree",),
        example={
            "lr": 0.05,
            "momentum": 0.8,
            "weight_decay": 0.01,
            "warmup_steps": 3,
            "r": 0.5,
            "weight_lr_power": 1.0,
        },
        invalid=(({"momentum": 1.0}, "momentum"), ({"warmup_steps": -1}, "warmup_steps"), ({"r": -1.0}, "r")),
    ),
    Entry(
        "adamw_schedule_free",
        AdamWScheduleFree,
        "Schedule-free AdamW: no lr schedule, an average of the iterates; call train()/eval()",
        _PAPER,
        ("schedulefree AdamWScheduleFree",),
        example={"lr": 0.01, "betas": (0.85, 0.99), "weight_decay": 0.01, "warmup_steps": 3, "r": 0.5},
        invalid=(({"betas": (0.0, 0.99)}, "betas"), ({"weight_lr_power": -1.0}, "weight_lr_power")),
    ),
    Entry(
        "radam_schedule_free",
        RAdamScheduleFree,
        "Schedule-free RAdam: rectified warm-up, no lr schedule, an average of the iterates; call train()/eval()",
        _PAPER,
        ("schedulefree RAdamScheduleFree",),
        example={"lr": 0.01, "betas": (0.85, 0.9), "weight_decay": 0.01, "silent_sgd_phase": False, "r": 0.5},
        invalid=(({"betas": (0.9, 1.0)}, "betas"), ({"silent_sgd_phase": 1}, "silent_sgd_phase")),
    ),
):
    register(_entry)

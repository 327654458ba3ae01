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

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, non_negative, non_negative_int, one_of
from ..core.ops import TensorList
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, param_copy, zeros
from .whole_model import GroupStateOptimizer, ParamWritingTransform

__all__ = ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree", "ScheduleFreeStep", "schedule_free_weight"]


def _open_unit(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "must be in (0, 1)"


def _sf_betas(value: Any) -> str | None:
    problem = beta_pair(value)
    if problem is None and not value[0] > 0:
        return "betas[0] must be in (0, 1) (the interpolation divides by it)"
    return problem


def schedule_free_weight(group: dict[str, Any], k: int, lr: float, r: float, power: float) -> float:
    """Record step ``k`` (from 0), of lr ``lr``, in ``group`` (``lr_max``, ``weight_sum``); return its weight ``c``.

    Shared by the schedule-free optimizers and :class:`~gradstep.wrappers.ScheduleFreeWrapper`.
    """
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** r) * (lr_max**power)
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    return weight / weight_sum if weight_sum != 0 else 0.0


def interpolate(params: Tensor, z: Tensor, weight: float) -> None:
    """``p <- lerp(p, z, weight)`` in place (fp32 ``z`` of bf16 parameters included): train/eval switches."""
    if params.dtype == z.dtype:
        params.lerp_(z.to(params.device), weight)
    else:
        params.copy_(params.to(z.dtype).lerp(z.to(params.device), weight))


_SF_HYPERS = (
    Hyper("warmup_steps", 0, non_negative_int, "linear warm-up of lr over this many steps"),
    Hyper("r", 0.0, non_negative, "polynomial weighting of the average: weights (k+1)^r"),
    Hyper("weight_lr_power", 2.0, non_negative, "the average weighs each step by lr_max^weight_lr_power"),
)


class ScheduleFreeStep(ParamWritingTransform):
    """The schedule-free update of ``y`` (the parameter) and ``z`` from the incoming direction ``u``.

    Reads the group values ``ckp1`` (the averaging weight) and ``scheduled_lr``; ``beta`` is the group's
    ``momentum`` or ``betas[0]``. State: ``z``.
    """

    elementwise = True
    group_values = ("ckp1", "scheduled_lr")
    hypers: ClassVar[tuple[Hyper, ...]] = _SF_HYPERS

    def __init__(self, beta: str) -> None:
        super().__init__()
        self.beta = beta

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"z": param_copy}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        beta = ctx.hyper("momentum") if self.beta == "momentum" else ctx.hyper("betas")[0]
        ckp1, lr = ctx.hyper("ckp1"), ctx.hyper("scheduled_lr")
        z = ctx.buffer("z")
        ctx.ops.lerp_(params, z, ckp1)
        ctx.ops.add_scaled_(params, grads, lr * (beta * (1 - ckp1) - 1))
        ctx.ops.add_scaled_(z, grads, -lr)

    def __repr__(self) -> str:
        return f"ScheduleFreeStep(beta={self.beta!r})"


class _SGDStep(ScheduleFreeStep):
    hypers = (
        Hyper("momentum", 0.9, _open_unit, "interpolation beta between z and the average x"),
        Hyper("weight_decay_mode", "coupled", one_of("coupled"), "coupled: g + wd*y (the reference's)"),
        *_SF_HYPERS,
    )


class ScaleByScheduleFreeAdam(Transform):
    """Adam's normalization of the gradient, ``g / (sqrt(v / (1 - beta2^(k+1))) + eps)``, then ``+ wd * y``.

    Reads the group values ``bias_correction2`` and ``adaptive`` (False in RAdam's first steps: the gradient passes
    unnormalized). State: ``exp_avg_sq``.
    """

    elementwise = True
    group_values = ("bias_correction2", "adaptive")
    hypers = (
        Hyper("betas", (0.9, 0.999), _sf_betas, "interpolation beta and decay rate of v", scalar=False),
        Hyper("eps", 1e-8, non_negative, "added to the denominator"),
        Hyper(
            "weight_decay_mode",
            "normalized",
            one_of("normalized", "coupled"),
            "normalized: wd*y added to the normalized gradient (the reference's); coupled: g + wd*y before it",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops, beta2 = ctx.ops, ctx.hyper("betas")[1]
        exp_avg_sq = ctx.buffer("exp_avg_sq")
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        out = updates
        if ctx.hyper("adaptive"):
            denom = ops.add(ops.sqrt(ops.div(exp_avg_sq, ctx.hyper("bias_correction2"))), ctx.hyper("eps"))
            out = ops.div(updates, denom)
        if ctx.hyper("weight_decay_mode") == "normalized" and not ctx.is_zero("weight_decay"):
            out = ops.add(out, ops.mul(ctx.params, ctx.hyper("weight_decay")))
        return out


class _ScheduleFree(GroupStateOptimizer):
    """What the three share: the group counters, the step's weights, and ``train()``/``eval()``."""

    _BETA = "betas"
    _ADAM = True

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        # Train mode from the start: a first step needs no train() call (x = y = z while nothing is stored).
        state = {"k": 0, "train_mode": True, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0, "ckp1": 0.0}
        return {**state, "bias_correction2": 1.0, "adaptive": True} if self._ADAM else state

    def _beta(self, group: dict[str, Any]) -> float:
        return float(group["momentum"] if self._BETA == "momentum" else group["betas"][0])

    def _lr(self, group: dict[str, Any]) -> float:
        """The step's lr: lr with the linear warm-up."""
        k, warmup = group["k"], group["warmup_steps"]
        return float(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)

    def _prepare_step(self, plans: list[Any]) -> None:
        self._fill_group_state()
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                f"{type(self).__name__} is in eval mode: call opt.train() before training steps (and opt.eval() "
                "before evaluating or saving the model)"
            )
        for group in self.param_groups:
            lr = self._lr(group)
            group["scheduled_lr"] = lr
            group["ckp1"] = schedule_free_weight(group, group["k"], lr, group["r"], group["weight_lr_power"])
            if self._ADAM:
                group["bias_correction2"] = 1 - group["betas"][1] ** (group["k"] + 1)
            group["k"] += 1

    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to ``x``, the average (to evaluate the model or save it)."""
        self._switch(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Switch the parameters to ``y``, where gradients are taken (before training steps)."""
        self._switch(train=True)

    def _switch(self, train: bool) -> None:
        for group in self.param_groups:
            if group.get("train_mode", True) == train:
                continue
            beta = self._beta(group)
            weight = 1 - beta if train else 1 - 1 / beta
            for p in group["params"]:
                z = self.state[p].get("z") if p in self.state else None
                if z is not None:
                    interpolate(p.data, z, weight)
            group["train_mode"] = train


class SGDScheduleFree(_ScheduleFree):
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


class AdamWScheduleFree(_ScheduleFree):
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
        *_SF_HYPERS[1:],  # no warm-up: the rectification is one
    )


class RAdamScheduleFree(_ScheduleFree):
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

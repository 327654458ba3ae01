r"""What the schedule-free optimizers are made of: the step of ``y`` and ``z``, the averaging weights, the group
counters and the ``train()``/``eval()`` switch, and Adam's normalization of the gradient before the step.

The math is in :mod:`gradstep.optim.schedule_free`, where the optimizers are.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, non_negative, non_negative_int, one_of
from ..core.ops import TensorList
from ..core.transform import BufferInit, GroupStep, Transform, param_copy, zeros
from .whole_model import GroupStateOptimizer, ParamWritingTransform

__all__ = [
    "ScaleByScheduleFreeAdam",
    "ScheduleFreeOptimizer",
    "ScheduleFreeStep",
    "interpolate",
    "schedule_free_weight",
]


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


SCHEDULE_FREE_HYPERS = (
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
    hypers: ClassVar[tuple[Hyper, ...]] = SCHEDULE_FREE_HYPERS

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


def _sf_betas(value: Any) -> str | None:
    problem = beta_pair(value)
    if problem is None and not value[0] > 0:
        return "betas[0] must be in (0, 1) (the interpolation divides by it)"
    return problem


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


class ScheduleFreeOptimizer(GroupStateOptimizer):
    """What the schedule-free optimizers share: the group counters, the step's weights, and ``train()``/``eval()``."""

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

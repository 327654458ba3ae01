r"""D-Adaptation's SGD (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

The gradients, times the step size, accumulate in :math:`s`; the parameters move towards :math:`z = x_0 - s`,
averaged by ``momentum``. The two passes over the model and the capped estimate are
:mod:`gradstep.optim.d_estimate`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.ops import TensorList
from ..core.reductions import WholeModelSum
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, param_copy, zeros
from .d_estimate import (
    COUPLED_DECAY_ONLY,
    DADAPT_PAPER,
    ESTIMATE_HYPERS,
    PRIMAL_AVERAGING,
    WHOLE_MODEL,
    DEstimate,
    DEstimateOptimizer,
    average_towards,
    frozen,
    per_tensor_sum,
)

__all__ = ["DAdaptSGD", "ScaleByDAdaptSGD"]


class ScaleByDAdaptSGD(DEstimate):
    """D-Adaptation's SGD (see :class:`DAdaptSGD`). State: ``z``, ``s``, ``x0``; group keys ``d``,
    ``numerator_weighted``, ``g0_norm``, ``k``."""

    hypers = (PRIMAL_AVERAGING, COUPLED_DECAY_ONLY, *ESTIMATE_HYPERS)
    stages = (("g0", 1), ("main", 2))

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "numerator_weighted": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"z": param_copy, "s": zeros, "x0": param_copy}

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        shared = {"lr": lr, "d": groups[0]["d"]}
        if groups[0]["k"] > 0:  # the first step's gradient norm scales every later step
            shared["g0"] = [groups[-1]["g0_norm"] ** 2]
            shared["dlr"] = shared["d"] * lr / groups[-1]["g0_norm"]
        return shared

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops = ctx.ops
        if stage == "g0":
            # The reference adds weight decay out of place here (its result is dropped): the raw gradient's norm.
            sums.add(ctx.params, per_tensor_sum(ops.mul(ctx.grads, ctx.grads)).unsqueeze(1))
            return
        s, dlr = ctx.buffer("s"), shared["dlr"]
        numerator = per_tensor_sum(ops.mul(grads, s)) * dlr
        ops.add_scaled_(s, grads, dlr)
        sums.add(ctx.params, torch.stack([numerator, per_tensor_sum(ops.mul(s, s))], dim=1))

    def absorb(self, stage: str, totals: list[float], shared: dict[str, Any]) -> None:
        super().absorb(stage, totals, shared)
        if stage == "g0":
            g0_norm = math.sqrt(totals[0])
            shared["g0_norm"] = g0_norm
            # A zero first gradient leaves nothing to scale by (the reference divides by zero): no step yet.
            shared["dlr"] = shared["d"] * shared["lr"] / g0_norm if g0_norm > 0 else 0.0

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first = groups[0]
        numerator_acum, sk_sq = shared["main"]
        if sk_sq == 0:
            if "g0_norm" in shared:
                groups[-1]["g0_norm"] = shared["g0_norm"]
            return None
        numerator_weighted = first["numerator_weighted"] + numerator_acum
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = 2 * numerator_weighted / math.sqrt(sk_sq)
            d = self.capped(d, d_hat, first["growth_rate"])
        g0_norm = shared.get("g0_norm", groups[-1].get("g0_norm"))
        return {"numerator_weighted": numerator_weighted, "d": d, "g0_norm": g0_norm}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if frozen(ctx):
            return
        z = ctx.buffer("z")
        ctx.ops.copy_(z, ctx.ops.sub(ctx.buffer("x0"), ctx.buffer("s")))
        average_towards(ctx, params, z, ctx.hyper("momentum"))


class DAdaptSGD(DEstimateOptimizer):
    r"""SGD with D-Adaptation (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

    With :math:`\text{dlr}_k = d_k\,\text{lr} / \lVert g_0\rVert` (the first step's gradient norm, over the model):

    .. math::
        r_{k+1} = r_k + \text{dlr}_k \textstyle\sum\langle g, s\rangle,\quad s \leftarrow s + \text{dlr}_k\, g,\quad
        d_{k+1} = \max\big(d_k, \min\big(\tfrac{2 r_{k+1}}{\sqrt{\sum \lVert s\rVert^2}},\
            d_k\cdot\text{growth\_rate}\big)\big)

    .. math::
        z = x_0 - s,\qquad p \leftarrow \mu\, p + (1-\mu)\, z

    (:math:`\mu` = ``momentum``; coupled weight decay adds ``wd * p`` to ``g``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptSGD`` (3.2): each group's ``weight_decay`` and ``momentum`` are its own
        (the reference applies the first group's to every group); a zero first gradient skips the step (the reference
        divides by zero); a group with ``lr = 0`` is not moved (the reference moves it to ``x0 - s``); ``step`` is
        kept (the reference keeps none); ``log_every`` and ``fsdp_in_use`` are not taken; gradients are never
        modified; ``lr = 0`` is accepted. As the reference, the first gradient norm leaves weight decay out.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptSGD([w], momentum=0.9)
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> sorted(opt.state[w])
        ['s', 'step', 'x0', 'z']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByDAdaptSGD()],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "dadapt_sgd",
        DAdaptSGD,
        "SGD with the step size estimated by D-Adaptation (dual averaging)",
        DADAPT_PAPER,
        ("dadaptation DAdaptSGD",),
        example={"lr": 1.0, "momentum": 0.9, "weight_decay": 0.01, "growth_rate": 2.0, "d0": 1e-2},
        invalid=(({"momentum": 1.5}, "momentum"), ({"d0": 0.0}, "d0")),
        sharding=WHOLE_MODEL,
    )
)

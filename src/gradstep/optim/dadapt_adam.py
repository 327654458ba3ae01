r"""D-Adaptation's Adam (Defazio & Mishchenko, 2023): Adam with the step size :math:`d` estimated for the model.

The two passes over the model and the capped estimate are :mod:`gradstep.optim.d_estimate`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, positive
from ..core.ops import TensorList
from ..core.reductions import WholeModelSum
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, zeros
from .d_estimate import (
    DADAPT_PAPER,
    DECAY_DOC,
    DECAY_MODES,
    ESTIMATE_HYPERS,
    WHOLE_MODEL,
    DEstimate,
    DEstimateOptimizer,
    adapted_decay,
    decay_mode_alias,
    frozen,
    per_tensor_sum,
)
from .whole_model import addcdiv_

__all__ = ["DAdaptAdam", "ScaleByDAdaptAdam"]


class ScaleByDAdaptAdam(DEstimate):
    """D-Adaptation's Adam (see :class:`DAdaptAdam`). State: ``s``, ``exp_avg``, ``exp_avg_sq``; group keys ``d``,
    ``numerator_weighted``, ``k``."""

    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the moments", scalar=False),
        Hyper("eps", 1e-8, positive, "added to sqrt(v)"),
        Hyper("weight_decay_mode", "coupled", DECAY_MODES, DECAY_DOC),
        Hyper("use_bias_correction", False, boolean, "Adam's bias correction in the step size"),
        *ESTIMATE_HYPERS,
        Hyper("layer_scale", 1.0, positive, "this group's step is layer_scale times the others' (its weight in d)"),
    )

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "numerator_weighted": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"s": zeros, "exp_avg": zeros, "exp_avg_sq": zeros}

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        first = groups[0]
        return {**super().begin(groups, lr), "betas": first["betas"], "sqrt_beta2": first["betas"][1] ** 0.5}

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops, dlr, layer_scale = ctx.ops, shared["dlr"], ctx.hyper("layer_scale")
        beta1, beta2 = shared["betas"]
        sqrt_beta2 = shared["sqrt_beta2"]
        s, exp_avg, exp_avg_sq = ctx.buffer("s"), ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        denom = ops.add(ops.sqrt(exp_avg_sq), ctx.hyper("eps"))
        numerator = per_tensor_sum(ops.mul(grads, ops.div(s, denom))) * (layer_scale * dlr)
        ops.mul_(exp_avg, beta1)
        ops.add_scaled_(exp_avg, grads, layer_scale * dlr * (1 - beta1))
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        ops.mul_(s, sqrt_beta2)
        ops.add_scaled_(s, grads, dlr * (1 - sqrt_beta2))
        sums.add(ctx.params, torch.stack([numerator, per_tensor_sum(ops.abs(s)) * layer_scale], dim=1))

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first, sqrt_beta2 = groups[0], shared["sqrt_beta2"]
        numerator_acum, sk_l1 = shared["main"]
        numerator_weighted = sqrt_beta2 * first["numerator_weighted"] + (1 - sqrt_beta2) * numerator_acum
        if sk_l1 == 0:
            return None
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = numerator_weighted / ((1 - sqrt_beta2) * sk_l1)
            d = self.capped(d, d_hat, first["growth_rate"])
        return {"numerator_weighted": numerator_weighted, "d": d}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if frozen(ctx):
            return
        ops = ctx.ops
        denom = ops.add(ops.sqrt(ctx.buffer("exp_avg_sq")), ctx.hyper("eps"))
        adapted_decay(ctx, params)
        addcdiv_(ops, params, ctx.buffer("exp_avg"), denom, -1.0)


class DAdaptAdam(DEstimateOptimizer):
    r"""Adam with D-Adaptation (Defazio & Mishchenko, 2023): the step size :math:`d` estimated for the whole model.

    With :math:`\text{dlr}_k = d_k\,\text{lr}\,\rho_k` (bias correction :math:`\rho_k` as in :class:`Prodigy`),
    :math:`\lambda` the group's ``layer_scale`` and :math:`\sqrt{\beta_2}` the decay of :math:`s`:

    .. math::
        r_{k+1} &= \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\textstyle\sum \lambda\,\text{dlr}_k
            \langle g, s / (\sqrt v + \epsilon)\rangle \\
        m &\leftarrow \beta_1 m + \lambda\,\text{dlr}_k (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \quad s \leftarrow \sqrt{\beta_2}\, s + \text{dlr}_k (1-\sqrt{\beta_2})\, g \\
        d_{k+1} &= \max\big(d_k, \min\big(\tfrac{r_{k+1}}{(1-\sqrt{\beta_2})\sum \lambda\lVert s\rVert_1},\
            d_k\cdot\text{growth\_rate}\big)\big),\qquad
        p \leftarrow p\,(1 - \text{wd}\cdot\text{dlr}_k) - m / (\sqrt v + \epsilon)

    (the decay factor with ``weight_decay_mode="adapted"``; the default, ``"coupled"``, adds ``wd * p`` to ``g``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptAdam`` (3.2): ``decouple`` is ``weight_decay_mode="adapted"``
        (accepted as an alias); ``log_every`` and ``fsdp_in_use`` are not taken (sums are all-reduced whenever
        parameters are sharded, over the step's sums, where the reference all-reduces its running numerator); a
        group with ``lr = 0`` is not moved (the reference steps it with its last ``exp_avg``); ``step`` is a float
        tensor also counted on skipped steps; gradients are never modified; ``lr = 0`` is accepted.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptAdam([w])
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> sorted(opt.state[w])
        ['exp_avg', 'exp_avg_sq', 's', 'step']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_bias_correction: bool = False,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        decouple: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        decay_mode_alias(decouple, options)
        super().__init__(
            params,
            [ScaleByDAdaptAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            use_bias_correction=use_bias_correction,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "dadapt_adam",
        DAdaptAdam,
        "Adam with the step size estimated by D-Adaptation",
        DADAPT_PAPER,
        ("dadaptation DAdaptAdam",),
        example={
            "lr": 1.0,
            "betas": (0.8, 0.99),
            "weight_decay": 0.01,
            "use_bias_correction": True,
            "growth_rate": 2.0,
            "d0": 1e-3,
        },
        invalid=(({"d0": -1.0}, "d0"), ({"growth_rate": 0.0}, "growth_rate"), ({"eps": 0.0}, "eps")),
        sharding=WHOLE_MODEL,
    )
)

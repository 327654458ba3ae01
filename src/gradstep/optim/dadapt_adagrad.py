r"""D-Adaptation's AdaGrad (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

The gradients, times the step size, accumulate in :math:`s`; the parameters move towards
:math:`z = x_0 - s / (\sqrt{\alpha} + \epsilon)`, averaged by ``momentum``. The two passes over the model and
the capped estimate are :mod:`gradstep.optim.d_estimate`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, positive
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

__all__ = ["DAdaptAdaGrad", "ScaleByDAdaptAdaGrad"]


class ScaleByDAdaptAdaGrad(DEstimate):
    """D-Adaptation's AdaGrad (see :class:`DAdaptAdaGrad`). State: ``alphak``, ``sk``, ``x0``; group keys ``d``,
    ``gsq_weighted``, ``sksq_weighted``, ``skl1``, ``k``."""

    hypers = (
        PRIMAL_AVERAGING,
        Hyper("eps", 1e-6, positive, "added to sqrt(alphak)"),
        COUPLED_DECAY_ONLY,
        *ESTIMATE_HYPERS,
    )
    stages = (("main", 3),)

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "gsq_weighted": 0.0, "sksq_weighted": 0.0, "skl1": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        def alphak(p: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.full_like(p, 1e-6, dtype=dtype)

        return {"alphak": alphak, "sk": zeros, "x0": param_copy}

    def model_lr(self, groups: list[dict[str, Any]]) -> float:
        return float(groups[0]["lr"])  # the reference's: the first group's lr is the lr of every group

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        d = groups[0]["d"]
        return {"lr": lr, "d": d, "dlr": d * lr}

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        ops, eps, dlr = ctx.ops, ctx.hyper("eps"), shared["dlr"]
        alphak, sk = ctx.buffer("alphak"), ctx.buffer("sk")

        def weighted_sk_sq() -> Tensor:
            return per_tensor_sum(ops.div(ops.mul(sk, sk), ops.add(ops.sqrt(alphak), eps)))

        old_weighted, old_l1 = weighted_sk_sq(), per_tensor_sum(ops.abs(sk))
        ops.addcmul_(alphak, grads, grads, 1.0)
        grad_sq = per_tensor_sum(ops.div(ops.mul(grads, grads), ops.add(ops.sqrt(alphak), eps)))
        ops.add_scaled_(sk, grads, dlr)
        changes = [weighted_sk_sq() - old_weighted, per_tensor_sum(ops.abs(sk)) - old_l1, grad_sq]
        sums.add(ctx.params, torch.stack(changes, dim=1))

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first, dlr = groups[0], shared["dlr"]
        weighted_change, l1_change, g_sq = shared["main"]
        sksq_weighted = first["sksq_weighted"] + weighted_change
        skl1 = first["skl1"] + l1_change
        if skl1 == 0:
            return None
        gsq_weighted = first["gsq_weighted"] + dlr * dlr * g_sq
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = (sksq_weighted - gsq_weighted) / skl1
            d = self.capped(d, d_hat, first["growth_rate"])
        return {"gsq_weighted": gsq_weighted, "skl1": skl1, "sksq_weighted": sksq_weighted, "d": d}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if frozen(ctx):
            return
        ops = ctx.ops
        z = ops.sub(
            ctx.buffer("x0"), ops.div(ctx.buffer("sk"), ops.add(ops.sqrt(ctx.buffer("alphak")), ctx.hyper("eps")))
        )
        if ctx.is_zero("momentum"):
            ops.copy_(params, z)
        else:
            average_towards(ctx, params, z, ctx.hyper("momentum"))


class DAdaptAdaGrad(DEstimateOptimizer):
    r"""AdaGrad with D-Adaptation (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

    With :math:`\text{dlr}_k = d_k\,\text{lr}` and :math:`w(x) = \sum x^2/(\sqrt{\alpha}+\epsilon)`:

    .. math::
        \alpha \leftarrow \alpha + g^2,\quad s \leftarrow s + \text{dlr}_k\, g,\quad
        G_{k+1} = G_k + \text{dlr}_k^2\, w(g),\quad
        d_{k+1} = \max\big(d_k, \min\big(\tfrac{w(s) - G_{k+1}}{\sum\lVert s\rVert_1},\
            d_k\cdot\text{growth\_rate}\big)\big)

    .. math::
        z = x_0 - s / (\sqrt{\alpha} + \epsilon),\qquad p \leftarrow \mu\, p + (1-\mu)\, z

    (:math:`\alpha_0 = 10^{-6}`; the sums run over the model, :math:`w(s)` and :math:`\lVert s\rVert_1` kept up to
    date by their changes as in the reference; :math:`\mu` = ``momentum``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptAdaGrad`` (3.2): sparse gradients are refused (the reference has a
        sparse path); each group's ``momentum`` is its own (the reference uses the first group's); a group with
        ``lr = 0`` is not moved; ``step`` is kept; ``log_every`` is not taken; gradients are never modified;
        ``lr = 0`` is accepted. Sharded parameters are supported (the reference refuses FSDP).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptAdaGrad([w])
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> sorted(opt.state[w])
        ['alphak', 'sk', 'step', 'x0']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByDAdaptAdaGrad()],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "dadapt_adagrad",
        DAdaptAdaGrad,
        "AdaGrad with the step size estimated by D-Adaptation (dual averaging)",
        DADAPT_PAPER,
        ("dadaptation DAdaptAdaGrad",),
        example={"lr": 1.0, "momentum": 0.5, "weight_decay": 0.01, "eps": 1e-5, "growth_rate": 2.0, "d0": 1e-2},
        invalid=(({"eps": 0.0}, "eps"), ({"momentum": -0.1}, "momentum")),
        sharding=WHOLE_MODEL,
    )
)

r"""Prodigy (Mishchenko & Defazio, 2024): Adam with a step size estimated from the distance travelled.

D-Adaptation's successor: its estimate :math:`d` weighs the gradients by :math:`d` itself, which lets it grow faster
from a small ``d0``. The two passes over the model and the capped estimate are :mod:`gradstep.optim.d_estimate`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, positive, unit_interval
from ..core.ops import TensorList
from ..core.reductions import WholeModelSum, is_split
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, param_copy, zeros
from .d_estimate import (
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

__all__ = ["Prodigy", "ScaleByProdigy"]


def _positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an int >= 1"


def _optional_beta(value: Any) -> str | None:
    return None if value is None else unit_interval(value)


class ScaleByProdigy(DEstimate):
    r"""Prodigy's estimate and Adam step (see :class:`Prodigy`). State: ``s``, ``p0``, ``exp_avg`` (without it
    when ``betas[0] = 0``), ``exp_avg_sq``; group keys ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``,
    ``k``."""

    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the moments", scalar=False),
        Hyper("beta3", None, _optional_beta, "decay rate of s and of the numerator (None: sqrt(betas[1]))"),
        Hyper("eps", 1e-8, positive, "added to sqrt(v), times d"),
        Hyper("weight_decay_mode", "adapted", DECAY_MODES, DECAY_DOC),
        Hyper("use_bias_correction", False, boolean, "Adam's bias correction in the step size"),
        Hyper("safeguard_warmup", False, boolean, "leave lr out of s (avoids a too large d in warm-up)"),
        *ESTIMATE_HYPERS,
        Hyper("d_coef", 1.0, positive, "multiplies the estimate of d (the preferred knob)"),
        Hyper("slice_p", 1, _positive_int, "estimate from every slice_p-th element only (memory; 1: all)"),
    )

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "d_max": group["d0"], "d_numerator": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        slice_p = group["slice_p"]

        def sliced_zeros(p: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros_like(p.reshape(-1)[::slice_p], dtype=dtype)

        def sliced_copy(p: Tensor, dtype: torch.dtype) -> Tensor:
            return p.detach().reshape(-1)[::slice_p].to(dtype=dtype, copy=True)

        # Shaped like the parameter when nothing is sliced (so that FSDP2 shards them like it).
        names: dict[str, BufferInit] = {"s": sliced_zeros, "p0": sliced_copy}
        if slice_p == 1:
            names = {"s": zeros, "p0": param_copy}
        if group["betas"][0] > 0:
            names["exp_avg"] = zeros
        names["exp_avg_sq"] = zeros
        return names

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops, slice_p = ctx.ops, ctx.hyper("slice_p")
        beta1, beta2 = shared["betas"]
        d, dlr = shared["d"], shared["dlr"]
        ratio = d / ctx.hyper("d0")  # d / d0 keeps the numerator's terms away from tiny values
        if slice_p == 1:
            sliced_grads, sliced_params = grads, ctx.params
        else:
            if any(is_split(ctx.params)):
                raise NotImplementedError("Prodigy's slice_p > 1 on sharded parameters (the slices would differ)")
            sliced_grads = [g.reshape(-1)[::slice_p] for g in grads]
            sliced_params = [p.reshape(-1)[::slice_p] for p in ctx.params]
        s, p0 = ctx.buffer("s"), ctx.buffer("p0")
        numerator = per_tensor_sum(ops.mul(sliced_grads, ops.sub(p0, sliced_params))) * (ratio * dlr)
        if beta1 > 0:
            exp_avg = ctx.buffer("exp_avg")
            ops.mul_(exp_avg, beta1)
            ops.add_scaled_(exp_avg, grads, d * (1 - beta1))
        exp_avg_sq = ctx.buffer("exp_avg_sq")
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, grads, grads, d * d * (1 - beta2))
        ops.mul_(s, shared["beta3"])
        ops.add_scaled_(s, sliced_grads, ratio * d if ctx.hyper("safeguard_warmup") else ratio * dlr)
        sums.add(ctx.params, torch.stack([numerator, per_tensor_sum(ops.abs(s))], dim=1))

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        first = groups[0]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(first["betas"][1])
        return {**super().begin(groups, lr), "betas": first["betas"], "beta3": beta3}

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first = groups[0]
        delta_numerator, d_denom = shared["main"]
        if d_denom == 0:
            return None
        d, d_max = shared["d"], first["d_max"]
        d_numerator = first["d_numerator"] * shared["beta3"] + delta_numerator
        d_hat = first["d_coef"] * d_numerator / d_denom
        if d == groups[-1]["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        return {"d_numerator": d_numerator, "d_denom": d_denom, "d": d, "d_max": d_max, "d_hat": d_hat}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if frozen(ctx):
            return
        ops, d, dlr = ctx.ops, ctx.hyper("d"), ctx.hyper("dlr")
        denom = ops.add(ops.sqrt(ctx.buffer("exp_avg_sq")), d * ctx.hyper("eps"))
        adapted_decay(ctx, params)
        if not ctx.is_zero("betas", 0):
            addcdiv_(ops, params, ctx.buffer("exp_avg"), denom, -dlr)
        else:
            addcdiv_(ops, params, grads, denom, -dlr * d)


class Prodigy(DEstimateOptimizer):
    r"""Prodigy: Adam with a step size estimated from the distance travelled (Mishchenko & Defazio, 2024).

    With :math:`\text{dlr}_k = d_k\,\text{lr}\,\rho_k` (:math:`\rho_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction``, else 1), over all parameters of the model:

    .. math::
        m &\leftarrow \beta_1 m + d_k(1-\beta_1) g,\qquad v \leftarrow \beta_2 v + d_k^2(1-\beta_2) g^2 \\
        s &\leftarrow \beta_3 s + \tfrac{d_k}{d_0}\,\text{dlr}_k\, g,\qquad
        r_{k+1} = \beta_3 r_k + \tfrac{d_k}{d_0}\,\text{dlr}_k \textstyle\sum \langle g, p_0 - p\rangle \\
        \hat d &= d_{coef}\, r_{k+1} / \textstyle\sum \lVert s \rVert_1,\qquad
        d_{k+1} = \min(\max_{j \le k+1} \hat d_j,\ d_k\cdot\text{growth\_rate}) \\
        p &\leftarrow p\,(1 - \text{wd}\cdot\text{dlr}_k) - \text{dlr}_k\, m / (\sqrt v + d_{k+1}\epsilon)

    (:math:`d_1 = \max(d_0, \hat d_1)`; ``safeguard_warmup`` uses :math:`d_k` instead of :math:`\text{dlr}_k` in
    :math:`s`; ``betas[0] = 0`` steps with :math:`d_{k+1} g` instead of :math:`m`; ``slice_p`` > 1 keeps :math:`s`
    and :math:`p_0` for every ``slice_p``-th element only.) ``lr`` scales the estimate; leave it at 1.

    Mishchenko & Defazio, 2024. Prodigy: An Expeditiously Adaptive Parameter-Free Learner. arXiv:2306.06101.

    .. warning::
        Differences from prodigyopt ``Prodigy`` (1.1.2):

        * ``decouple=True/False`` is ``weight_decay_mode="adapted"/"coupled"`` (``decouple`` is accepted as an alias).
          ``fsdp_in_use`` is not needed: sums over sharded parameters are all-reduced whenever they are sharded.
        * A group with ``lr = 0`` is not moved (the reference still applies its weight decay with the model's step
          size, and with ``betas[0] = 0`` a step from its gradient).
        * ``s`` and ``p0`` are shaped like the parameter (the reference flattens them), and ``p0`` is a copy also for
          an all-zero parameter (the reference keeps a 0-d zero). ``step`` is a float tensor, also counted on the
          steps the reference skips (every gradient so far zero, where the parameters do not move either).
        * Gradients are never modified (the reference adds coupled weight decay into ``p.grad``). ``lr = 0`` is
          accepted. The group also holds ``dlr`` (the step size of the last step) and ``skip``.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = gradstep.Prodigy([w], weight_decay=0.01)
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> opt.param_groups[0]["d"] > 1e-6  # the estimate grew from d0
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
        *,
        decouple: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        decay_mode_alias(decouple, options)
        super().__init__(
            params,
            [ScaleByProdigy()],
            lr=lr,
            betas=betas,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
            d0=d0,
            d_coef=d_coef,
            growth_rate=growth_rate,
            slice_p=slice_p,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "prodigy",
        Prodigy,
        "Adam with the step size estimated from the distance travelled (D-Adaptation's successor)",
        "Mishchenko & Defazio, 2024. Prodigy: An Expeditiously Adaptive Parameter-Free Learner. arXiv:2306.06101",
        ("prodigyopt Prodigy",),
        example={
            "lr": 0.2,
            "betas": (0.8, 0.99),
            "weight_decay": 0.01,
            "use_bias_correction": True,
            "safeguard_warmup": True,
            "d_coef": 2.0,
            "growth_rate": 1.5,
            "d0": 1e-2,
        },
        invalid=(({"d0": 0.0}, "d0"), ({"slice_p": 0}, "slice_p"), ({"beta3": 1.0}, "beta3")),
        sharding=WHOLE_MODEL,
    )
)

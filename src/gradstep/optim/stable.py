r"""StableAdamW: AdamW with the step of each tensor clipped by its update RMS (Wortsman et al., 2023,
"Stable and low-precision training for large-scale vision-language models", arXiv:2304.13013), as torch-optimi's.

Per parameter, at step t, with debiased betas :math:`\hat\beta_t = \beta\,(1-\beta^{t-1})/(1-\beta^t)` (so that
the moments are their own bias-corrected values):

.. math::
    m_t = \hat\beta_{1,t} m_{t-1} + (1-\hat\beta_{1,t}) g_t, \qquad
    v_t = \hat\beta_{2,t} v_{t-1} + (1-\hat\beta_{2,t}) g_t^2

.. math::
    \text{RMS}_t = \sqrt{\operatorname{mean}\big(g_t^2 / \max(v_t, \epsilon^2)\big)}, \qquad
    \eta_t = \text{lr} / \max(1, \text{RMS}_t)

.. math::
    p_t = p_{t-1}(1 - \eta_t\lambda) - \eta_t\, m_t / (\sqrt{v_t} + \epsilon)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.hypers import Hyper, beta_pair, non_negative, one_of
from ..core.ops import Direction, TensorList, uniform
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import tensor_norms, tensor_numels
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_is_zero, zeros
from .adam import AdamW

__all__ = ["ScaleByStableAdam", "StableAdamW"]


class ScaleByStableAdam(Transform):
    r"""Debiased Adam moments and the per-tensor update-RMS clip (see the module docstring).

    With ``weight_decay_mode="rms_clipped"`` (the default of :class:`StableAdamW`, optimi's) the decoupled decay
    uses the clipped learning rate: the direction is :math:`s\,(m/(\sqrt v + \epsilon) + \lambda p)` with
    :math:`s = 1/\max(1, \text{RMS})`, and the core applies no decay of its own. The RMS is a per-tensor reduction
    through :mod:`gradstep.core.reductions` (exact under FSDP2). State: ``exp_avg``, ``exp_avg_sq`` (optimi's).
    """

    hypers = (
        Hyper("betas", (0.9, 0.99), beta_pair, "decay rates of the first and second moments", scalar=False),
        Hyper("eps", 1e-6, non_negative, "term added to the denominator; eps^2 bounds v in the RMS"),
        Hyper(
            "weight_decay_mode",
            "rms_clipped",
            one_of("rms_clipped", "coupled", "decoupled", "proximal"),
            "rms_clipped: p*(1 - lr*wd/max(1, RMS)) (optimi); coupled, decoupled, proximal: the core's",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        power1, power2 = ctx.power(beta1), ctx.power(beta2)
        # 1 - beta_hat = (1 - beta) / (1 - beta^t), written as optimi's beta_hat = (beta^t - beta) / (beta^t - 1).
        beta1_hat, beta2_hat = (power1 - beta1) / (power1 - 1), (power2 - beta2) / (power2 - 1)
        ops.lerp_(exp_avg, updates, uniform(ctx.per_param(1 - beta1_hat)))
        ops.mul_(exp_avg_sq, uniform(ctx.per_param(beta2_hat)))
        ops.addcmul_(exp_avg_sq, updates, updates, uniform(ctx.per_param(1 - beta2_hat)))
        # RMS = ||g / max(sqrt(v), eps)|| / sqrt(n): optimi's sqrt(mean(g^2 / max(v, eps^2))), without the squares.
        denom = ops.sqrt(exp_avg_sq)
        ratio = ops.div(updates, ops.clamp(denom, eps, math.inf))
        rms = tensor_norms(ratio).to(torch.float64) / torch.sqrt(tensor_numels(ratio))
        scale = ctx.per_param(1.0 / rms.clamp(min=1.0))
        ops.add_(denom, eps)
        wd = ctx.param_hyper("weight_decay")
        if ctx.hyper("weight_decay_mode") == "rms_clipped" and not ctx.is_zero("weight_decay") and not coef_is_zero(wd):
            direction = ops.div(exp_avg, denom)
            ops.add_scaled_(direction, ctx.params, wd)
            ops.mul_(direction, scale)
            return direction
        return ops.quotient(exp_avg, denom, scale)


class StableAdamW(ChainedOptimizer):
    r"""StableAdamW: AdamW whose step size is divided, per tensor, by the update RMS when it exceeds 1.

    .. math::
        \eta_t = \frac{\text{lr}}{\max\big(1, \sqrt{\operatorname{mean}(g_t^2 / \max(v_t, \epsilon^2))}\big)},
        \qquad p_t = p_{t-1}(1 - \eta_t\lambda) - \eta_t\,\frac{m_t}{\sqrt{v_t} + \epsilon}

    with the bias-corrected moments :math:`m_t, v_t` kept through debiased betas (see
    :class:`ScaleByStableAdam`). The clip acts like Adafactor's update clipping, replacing a learning-rate warm-up
    for the second moment. Weight decay uses the clipped rate (``weight_decay_mode="rms_clipped"``, optimi's);
    ``"decoupled"`` decays with the unclipped lr.

    Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi & Schmidt, 2023. Stable and low-precision training for
    large-scale vision-language models. arXiv:2304.13013.

    .. warning::
        Differences from torch-optimi 0.3.3's ``optimi.StableAdamW``:

        * ``lr`` has a default (1e-3; optimi requires it). ``decouple_lr``/``max_lr`` (fully decoupled decay,
          :math:`1 - \eta_t\lambda/\text{lr}_{max}`) are not provided: give ``weight_decay=wd / max_lr`` for the
          same decay. ``kahan_sum``, ``triton`` and ``gradient_release`` are not provided (gradstep's
          ``stochastic_rounding`` serves bfloat16 parameters).
        * State: ``eps_sq`` is not kept (it is ``eps**2``); the step count is per parameter (optimi: per group,
          ``step`` in the param group).
        * With ``cautious=True`` and a non-zero weight decay the mask also sees the decay term (the direction holds
          it); optimi has no cautious option.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = gradstep.StableAdamW([w], lr=0.1, weight_decay=0.0)
        >>> w.grad = torch.tensor([0.2, -0.4]); _ = opt.step()   # m = g, v = g^2: lr * g / (|g| + eps)
        >>> w.detach()
        tensor([ 0.9000, -0.9000])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByStableAdam()],
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "stableadamw",
        StableAdamW,
        "AdamW with per-tensor update-RMS clipping of the step size (debiased betas)",
        "Wortsman et al., 2023. Stable and low-precision training for large-scale vision-language models. "
        "arXiv:2304.13013",
        ("torch-optimi StableAdamW",),
        example={"lr": 2e-2, "betas": (0.8, 0.95), "weight_decay": 0.05, "eps": 1e-5},
        invalid=(
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"eps": -1e-6}, "eps"),
            ({"weight_decay_mode": "fully_decoupled"}, "weight_decay_mode"),
        ),
        sharding="per-tensor reduction",
    )
)
register(
    Entry(
        "cautious_adamw",
        AdamW,
        "C-AdamW: AdamW with cautious updates (components that disagree with the gradient dropped, rest rescaled)",
        "Liang, Chen, Liu & Liu, 2024. Cautious Optimizers: Improving Training with One Line of Code. arXiv:2411.16085",
        ("C-AdamW (authors' code, float64 reference)",),
        preset={"cautious": True},
        example={"lr": 2e-2, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.1},
        invalid=(({"cautious": 1.5}, "cautious"),),
        sharding="per-tensor reduction",
    )
)

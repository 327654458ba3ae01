r"""LaProp (Ziyin, Wang & Ueda, 2020, arXiv:2002.04839): Adam's variant that normalises first and takes the momentum
of the normalised gradient, with the learning rate inside the momentum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, non_negative, non_negative_int, one_of
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_mul, zeros
from .adam import adam_denominator

__all__ = ["LaProp", "ScaleByLaProp"]


def _scalar_zero(param: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype, device=param.device)


class ScaleByLaProp(Transform):
    r"""LaProp's moments (see :class:`LaProp`).

    State: ``exp_avg`` (m, which holds the learning rate), ``exp_avg_sq`` (v), ``exp_avg_lr_1`` (the EMA of the
    learning rate, a 0-d tensor), and with options ``exp_mean_avg_beta2`` (centered) and ``max_exp_avg_sq``
    (amsgrad): pytorch_optimizer's names.
    """

    elementwise = True
    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the momentum and of v", scalar=False),
        Hyper("eps", 1e-15, non_negative, "term added to the denominator"),
        Hyper("centered", False, boolean, "subtract the squared EMA of g from v (after the warm-up steps)"),
        Hyper("steps_before_using_centered", 10, non_negative_int, "steps before the centering is used"),
        Hyper("amsgrad", False, boolean, "use the running maximum of v"),
        Hyper(
            "eps_mode",
            "torch",
            one_of("torch", "tf"),
            "where eps goes: 'torch': sqrt(v_hat) + eps, v_hat = v/(1-beta2^t); 'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_sq": zeros, "exp_avg_lr_1": _scalar_zero}
        if group["centered"]:
            names["exp_mean_avg_beta2"] = zeros
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        second = exp_avg_sq
        if ctx.hyper("centered"):
            mean = ctx.buffer("exp_mean_avg_beta2")
            ops.lerp_(mean, updates, 1 - beta2)
            use = (ctx.steps > ctx.hyper("steps_before_using_centered")).to(torch.float64)
            second = ops.sub(exp_avg_sq, ops.mul(ops.mul(mean, mean), ctx.per_param(use)))
        if ctx.hyper("amsgrad"):
            ops.maximum_(ctx.buffer("max_exp_avg_sq"), second)
            second = ctx.buffer("max_exp_avg_sq")
        if ctx.hyper("eps_mode") == "torch":
            denom = adam_denominator(ctx, second, beta2, eps)
        else:
            denom = ops.sqrt(second)
            ops.add_(denom, eps)
            ops.div_(denom, ctx.per_param(torch.sqrt(ctx.bias_correction(beta2))))
        # The learning rate enters the momentum (so a schedule acts on each gradient when it arrives), and the step is
        # normalised by the EMA of the learning rate instead of 1 - beta1^t; the core then multiplies by lr again.
        lr = coef_mul(ctx.param_hyper("lr"), ctx.param_hyper("lr_scale"))
        ops.mul_(exp_avg, beta1)
        ops.add_scaled_(exp_avg, ops.div(updates, denom), coef_mul(lr, 1 - beta1))
        lr_avg = ctx.buffer("exp_avg_lr_1")
        ops.mul_(lr_avg, beta1)
        ops.add_(lr_avg, coef_mul(lr, 1 - beta1))
        averages = torch.stack(lr_avg).to(torch.float64)
        # No learning rate yet (all zero): no step, as the reference's bias correction of 1 times a zero momentum.
        inverse = torch.where(averages == 0, torch.zeros_like(averages), 1.0 / averages)
        return ops.mul(exp_avg, ctx.per_param(inverse))


class LaProp(ChainedOptimizer):
    r"""LaProp: momentum of the RMS-normalised gradient (Adam with momentum and adaptivity separated).

    .. math::
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\text{lr}_t\, \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    .. math::
        a_t = \beta_1 a_{t-1} + (1-\beta_1)\,\text{lr}_t, \qquad p_t = p_{t-1} - \text{lr}_t\, m_t / a_t

    With a constant lr, :math:`a_t = \text{lr}(1-\beta_1^t)` and this is the paper's
    :math:`p_t = p_{t-1} - \text{lr}\, \hat m_t` for the momentum :math:`\hat m` of normalised gradients. Options:
    ``centered`` (subtract the squared EMA of g from v after ``steps_before_using_centered`` steps), ``amsgrad``,
    ``eps_mode="tf"`` (pytorch_optimizer's :math:`(\sqrt{v} + \epsilon)/\sqrt{1-\beta_2^t}`). Decoupled weight
    decay by default.

    Ziyin, Wang & Ueda, 2020. LaProp: Separating Momentum and Adaptivity in Adam. arXiv:2002.04839.

    .. warning::
        Differences from pytorch_optimizer 4.1.0's ``LaProp``:

        * Its denominator is :math:`(\sqrt{v + 10^{-15}} + \epsilon)/\sqrt{1-\beta_2^t}`: ``eps_mode="tf"`` gives
          the placement of eps; the :math:`10^{-15}` inside the root is not added (it moves results by less than
          :math:`10^{-15}/v`).
        * It decays the weights *after* the step (:math:`(p - \Delta)(1 - \text{lr}\lambda)`, official code's
          order); gradstep decays before, as AdamW (:math:`p(1 - \text{lr}\lambda) - \Delta`): they differ by
          :math:`\text{lr}\lambda\Delta`. Its coupled mode (``weight_decouple=False``) adds :math:`\lambda p` to the
          gradient after the step, where it has no effect; gradstep's ``weight_decay_mode="coupled"`` adds it
          before. ``fixed_decay`` is not provided.
        * Its foreach path computes the step sizes :math:`\text{lr}/a_t` in float32, also for float64 parameters;
          gradstep in the state dtype (its per-parameter path's float64).
        * ``exp_avg_lr_2`` is not kept (it is :math:`1-\beta_2^t`); ``exp_avg_lr_1`` is a 0-d tensor (a Python float
          there). The step count is per parameter; ``lr = 0`` gives no step (there: a step of the momentum).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = gradstep.LaProp([w], lr=0.1)
        >>> w.grad = torch.tensor([0.2, -0.4]); _ = opt.step()   # first step: lr * g / |g|
        >>> w.detach()
        tensor([ 0.9000, -0.9000])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        centered: bool = False,
        steps_before_using_centered: int = 10,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByLaProp()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            centered=centered,
            steps_before_using_centered=steps_before_using_centered,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "laprop",
        LaProp,
        "Momentum of the RMS-normalised gradient, learning rate inside the momentum",
        "Ziyin, Wang & Ueda, 2020. LaProp: Separating Momentum and Adaptivity in Adam. arXiv:2002.04839",
        ("LaProp (official code)", "pytorch_optimizer LaProp"),
        example={
            "lr": 1e-2,
            "betas": (0.8, 0.99),
            "eps": 1e-8,
            "weight_decay": 0.02,
            "centered": True,
            "steps_before_using_centered": 2,
            "amsgrad": True,
        },
        invalid=(
            ({"steps_before_using_centered": -1}, "steps_before_using_centered"),
            ({"eps_mode": "keras"}, "eps_mode"),
            ({"betas": (1.0, 0.9)}, "betas"),
        ),
    )
)

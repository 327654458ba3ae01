r"""MARS: variance reduction for adaptive optimizers (Yuan, Liu, Wu, Zhou & Gu, 2024, arXiv:2411.10438), AdamW flavour.

A parameter with at least two dimensions (or every one with ``optimize_1d``) steps on the corrected gradient

.. math::
    c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}), \qquad
    \tilde c_t = c_t / \max(1, \lVert c_t \rVert)

with AdamW's moments of :math:`\tilde c_t`; the others take plain AdamW with their own betas, learning rate and
weight decay (the authors' ``betas_1d``, ``lr_1d``, ``weight_decay_1d``). :math:`g_0 = 0`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, beta_pair, boolean, non_negative, one_of
from ..core.ops import PerTensorOps, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import tensor_norms
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["MARS", "ScaleByMARS"]


def _adam_direction(
    ops: PerTensorOps,
    ctx: GroupStep,
    index: list[int],
    inputs: TensorList,
    betas: tuple[float, float],
) -> TensorList:
    """AdamW's moments of ``inputs`` for the parameters ``index``, and ``m_hat / (sqrt(v_hat) + eps)``."""
    beta1, beta2 = betas
    pick = lambda items: [items[i] for i in index]  # noqa: E731
    exp_avg, exp_avg_sq = pick(ctx.buffer("exp_avg")), pick(ctx.buffer("exp_avg_sq"))
    ops.lerp_(exp_avg, inputs, 1 - beta1)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, inputs, inputs, 1 - beta2)
    second = exp_avg_sq
    if ctx.hyper("amsgrad"):
        second = pick(ctx.buffer("max_exp_avg_sq"))
        ops.maximum_(second, exp_avg_sq)
    bc1 = pick(ctx.per_param(ctx.bias_correction(beta1)))
    sqrt_bc2 = pick(ctx.per_param(torch.sqrt(ctx.bias_correction(beta2))))
    denom = ops.sqrt(second)
    if ctx.hyper("eps_mode") == "torch":  # the authors': (sqrt(v)/sqrt(bc2) + eps) * bc1
        ops.div_(denom, sqrt_bc2)
        ops.add_(denom, ctx.hyper("eps"))
    else:  # pytorch_optimizer's: (sqrt(v) + eps)/sqrt(bc2) * bc1
        ops.add_(denom, ctx.hyper("eps"))
        ops.div_(denom, sqrt_bc2)
    ops.mul_(denom, bc1)
    return ops.div(exp_avg, denom)


class ScaleByMARS(Transform):
    r"""MARS-AdamW's direction (see the module docstring); 1-D parameters get AdamW scaled to their own lr and decay.

    For a parameter on the AdamW side, the direction is :math:`f\,u + (f\lambda_{1d} - \lambda) p` with
    :math:`f` = ``lr_1d_factor``, so that the core's decoupled step :math:`p(1-\text{lr}\lambda) - \text{lr}\,d`
    is :math:`p(1 - f\,\text{lr}\,\lambda_{1d}) - f\,\text{lr}\,u`.

    State: ``exp_avg``, ``exp_avg_sq``, ``last_grad`` (the previous gradient), ``max_exp_avg_sq`` (amsgrad).
    """

    hypers = (
        Hyper("betas", (0.95, 0.99), beta_pair, "decay rates of the moments (MARS side)", scalar=False),
        Hyper("gamma", 0.025, non_negative, "strength of the gradient correction"),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("amsgrad", False, boolean, "use the running maximum of v"),
        Hyper(
            "eps_mode",
            "torch",
            one_of("torch", "tf"),
            "where eps goes: 'torch': sqrt(v_hat) + eps, v_hat = v/(1-beta2^t); 'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)",
        ),
        Hyper("optimize_1d", False, boolean, "MARS for parameters of fewer than 2 dims too (else AdamW)"),
        Hyper("betas_1d", (0.9, 0.95), beta_pair, "decay rates of the AdamW side", scalar=False),
        Hyper("lr_1d_factor", 1.0, non_negative, "lr of the AdamW side, as a multiple of lr"),
        Hyper("weight_decay_1d", 0.1, non_negative, "decoupled weight decay of the AdamW side"),
        Hyper("weight_decay_mode", "decoupled", one_of("decoupled"), "decoupled: p*(1 - lr*wd) (the authors')"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_sq": zeros, "last_grad": zeros}
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        everything = ctx.hyper("optimize_1d")
        mars = [i for i, p in enumerate(ctx.params) if everything or p.dim() >= 2]
        adamw = [i for i, p in enumerate(ctx.params) if not (everything or p.dim() >= 2)]
        out: list[Any] = [None] * len(updates)
        if mars:
            beta1, _ = ctx.hyper("betas")
            grads = [updates[i] for i in mars]
            last = [ctx.buffer("last_grad")[i] for i in mars]
            corrected = ops.sub(grads, last)
            ops.mul_(corrected, ctx.hyper("gamma") * (beta1 / (1 - beta1)))
            ops.add_(corrected, grads)
            ops.div_(corrected, ctx.per_param(tensor_norms(corrected).to(torch.float64).clamp(min=1.0)))
            for i, d in zip(mars, _adam_direction(ops, ctx, mars, corrected, ctx.hyper("betas"))):
                out[i] = d
        if adamw:
            direction = _adam_direction(ops, ctx, adamw, [updates[i] for i in adamw], ctx.hyper("betas_1d"))
            factor = ctx.hyper("lr_1d_factor")
            ops.mul_(direction, factor)
            wd = ctx.param_hyper("weight_decay")
            wd_list = [wd[i] for i in adamw] if isinstance(wd, list) else [wd] * len(adamw)
            extra = [factor * ctx.hyper("weight_decay_1d") - w for w in wd_list]
            if any(not isinstance(e, (int, float)) or e != 0 for e in extra):
                ops.add_scaled_(direction, [ctx.params[i] for i in adamw], extra)
            for i, d in zip(adamw, direction):
                out[i] = d
        ops.copy_(ctx.buffer("last_grad"), updates)
        return out


class MARS(ChainedOptimizer):
    r"""MARS-AdamW: AdamW on a variance-reduced gradient, with plain AdamW for 1-D parameters.

    .. math::
        \tilde c_t = \frac{c_t}{\max(1, \lVert c_t\rVert)},\quad
        c_t = g_t + \gamma\frac{\beta_1}{1-\beta_1}(g_t - g_{t-1}),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde c_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde c_t^2

    .. math::
        p_t = p_{t-1}(1 - \text{lr}\,\lambda) - \text{lr}\,
        \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    for parameters of at least 2 dims (all with ``optimize_1d=True``); the others take AdamW with ``betas_1d``,
    lr ``lr_1d`` (kept as ``lr_1d_factor = lr_1d / lr`` from the constructor's values, so a schedule of lr scales
    both, as in the original; 1 when lr is 0) and ``weight_decay_1d``. The norm of :math:`c_t` is a per-tensor
    reduction (exact under FSDP2).

    Yuan, Liu, Wu, Zhou & Gu, 2024. MARS: Unleashing the Power of Variance Reduction for Training Large Models.
    arXiv:2411.10438.

    .. warning::
        Differences from the authors' code and pytorch_optimizer 4.1.0's ``MARS``:

        * Only the AdamW flavour (``mars_type="adamw"``); ``"lion"`` and ``"shampoo"`` are not provided.
        * pytorch_optimizer's denominator is :math:`(\sqrt{v + 10^{-15}} + \epsilon)/\sqrt{1-\beta_2^t}` (its
          placement of eps is ``eps_mode="tf"``; the :math:`10^{-15}` is not added); the authors' is
          ``eps_mode="torch"``, the default.
        * Weight decay is decoupled only; pytorch_optimizer's ``weight_decouple=False`` adds :math:`\lambda p` to
          the gradient after the step (no effect but on its ``last_grad``) and ``fixed_decay`` are not provided.
        * With ``cautious=True`` the mask of a 1-D parameter sees the decay term :math:`(f\lambda_{1d}-\lambda)p`
          unless :math:`f\lambda_{1d} = \lambda`; pytorch_optimizer masks before the decay.
        * The step count is per parameter.

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gradstep.MARS(model.parameters(), lr=1e-2, lr_1d=1e-3)
        >>> model(torch.ones(4, 3)).sum().backward(); _ = opt.step()
        >>> sorted(opt.state[model.weight]), opt.param_groups[0]["lr_1d_factor"]
        (['exp_avg', 'exp_avg_sq', 'last_grad', 'step'], 0.1)
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        gamma: float = 0.025,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        optimize_1d: bool = False,
        lr_1d: float = 3e-3,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(lr_1d, (int, float)) or isinstance(lr_1d, bool) or lr_1d < 0:
            raise ValueError(f"Invalid lr_1d: {lr_1d!r} (must be a non-negative number)")
        # The ratio needs lr as a number: an invalid lr (a tensor of two elements, NaN, ...) is left to the core's
        # check, which names it; lr = 0 has no ratio.
        if non_negative(lr) is None and float(lr) > 0:
            options.setdefault("lr_1d_factor", lr_1d / float(lr))
        super().__init__(
            params,
            [ScaleByMARS()],
            lr=lr,
            betas=betas,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            optimize_1d=optimize_1d,
            betas_1d=betas_1d,
            weight_decay_1d=weight_decay_1d,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "mars",
        MARS,
        "AdamW on a variance-reduced (previous-gradient corrected) gradient; AdamW for 1-D parameters",
        "Yuan, Liu, Wu, Zhou & Gu, 2024. MARS: Unleashing the Power of Variance Reduction for Training Large Models. "
        "arXiv:2411.10438",
        ("MARS (authors' code)", "pytorch_optimizer MARS (mars_type='adamw')"),
        example={
            "lr": 1e-2,
            "betas": (0.9, 0.98),
            "gamma": 0.05,
            "eps": 1e-6,
            "weight_decay": 0.02,
            "amsgrad": True,
            "lr_1d_factor": 0.5,
            "betas_1d": (0.85, 0.9),
            "weight_decay_1d": 0.05,
        },
        invalid=(
            ({"gamma": -0.1}, "gamma"),
            ({"betas_1d": (0.9, 1.0)}, "betas_1d"),
            ({"lr_1d": -1.0}, "lr_1d"),
            ({"weight_decay_1d": -0.1}, "weight_decay_1d"),
        ),
        sharding="per-tensor reduction",
    )
)

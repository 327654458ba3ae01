r"""Adam variants with other moment estimates: AdaBelief and AdEMAMix (TAdam is in :mod:`.tadam`).

All keep Adam's skeleton (a first moment :math:`m`, a second moment, torch-style eps
:math:`\sqrt{\hat v} + \epsilon`, ``p <- p - lr * d``) and change one estimate:

* AdaBelief (Zhuang et al., 2020, arXiv:2010.07468) replaces :math:`v` by the variance of :math:`g` around :math:`m`;
* AdEMAMix (Pagliardini et al., 2024, arXiv:2409.03137) adds a slow EMA of the gradient to the numerator.

Weight decay is the core's (coupled L2, decoupled or proximal); each class picks its original's default.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.hypers import Hyper, beta_triple, boolean, non_negative, optional_positive
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from .adam import BETAS, adam_denominator

__all__ = ["AdEMAMix", "AdaBelief", "ScaleByAdEMAMix", "ScaleByAdaBelief"]


# --- AdaBelief ---------------------------------------------------------------------------------------------------


class ScaleByAdaBelief(Transform):
    r"""AdaBelief's moments and scaling: the second moment is the EMA of :math:`(g_t - m_t)^2`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon\,[\text{eps\_in\_belief}]

    .. math::
        \hat s_t = \max(\hat s_{t-1}, s_t)\ \text{(amsgrad)},\qquad
        d_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t / (1-\beta_2^t)} + \epsilon}

    State (the official code's and pytorch_optimizer's names): ``exp_avg``, ``exp_avg_var`` and, with ``amsgrad``,
    ``max_exp_avg_var``.
    """

    elementwise = True
    hypers = (
        BETAS,
        Hyper("eps", 1e-16, non_negative, "term added to the denominator (and to s every step if eps_in_belief)"),
        Hyper("amsgrad", False, boolean, "use the running maximum of s (pytorch_optimizer: ams_bound)"),
        Hyper("eps_in_belief", True, boolean, "add eps to s every step (paper, pytorch_optimizer); holocron: False"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_var": zeros}
        if group["amsgrad"]:
            names["max_exp_avg_var"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_avg_var = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_var")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        residual = ops.sub(updates, exp_avg)  # with the updated m, as every original does
        ops.mul_(exp_avg_var, beta2)
        ops.addcmul_(exp_avg_var, residual, residual, 1 - beta2)
        if ctx.hyper("eps_in_belief"):
            ops.add_(exp_avg_var, eps)
        second = exp_avg_var
        if ctx.hyper("amsgrad"):
            second = ctx.buffer("max_exp_avg_var")
            ops.maximum_(second, exp_avg_var)
        denom = adam_denominator(ctx, second, beta2, eps)  # a fresh tensor: scaled in place
        ops.mul_(denom, ctx.per_param(ctx.bias_correction(beta1)))
        return ops.quotient(exp_avg, denom)


class AdaBelief(ChainedOptimizer):
    r"""AdaBelief: Adam whose step adapts to the "belief" in the gradient, the variance of :math:`g` around :math:`m`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon

    .. math::
        p_t = p_{t-1} - \frac{\text{lr}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{s_t/(1-\beta_2^t)} + \epsilon}

    with :math:`m_0 = s_0 = 0`; ``amsgrad`` uses the running maximum of :math:`s`. The defaults are
    pytorch_optimizer's (and the official code's): eps 1e-16, eps added to :math:`s` every step
    (``eps_in_belief=True``), decoupled weight decay ``p <- p * (1 - lr * wd)`` (``weight_decay_mode="decoupled"``).
    holocron's AdaBelief is ``AdaBelief(params, eps=1e-8, eps_in_belief=False, weight_decay_mode="coupled")``.

    Zhuang et al., 2020. AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients.
    arXiv:2010.07468.

    .. warning::
        Differences from pytorch_optimizer ``AdaBelief`` (4.1.0):

        * ``rectify`` (RAdam's rectification, with ``n_sma_threshold`` and ``degenerated_to_sgd``) is not provided;
          its default (``rectify=False``) is what gradstep computes.
        * ``ams_bound`` is called ``amsgrad``; ``fixed_decay=True`` (``p * (1 - wd)``) is
          ``weight_decay=wd / lr`` in decoupled mode (for a constant lr). The ``**kwargs`` extras (``adanorm``,
          ``adam_debias``) are not provided.
        * The step count is per parameter (pytorch_optimizer: per group, also counting steps where a parameter had
          no gradient). pytorch_optimizer writes ``maximize`` and coupled decay into ``p.grad``; gradstep never
          modifies gradients.

        Differences from holocron ``AdaBelief`` (pylocron 0.3.0): only the defaults (see above). holocron inherits
        ``torch.optim.Adam``'s constructor and silently ignores ``maximize``, ``foreach``, ``capturable``,
        ``differentiable``, ``fused`` and ``decoupled_weight_decay``; gradstep honours ``maximize``, ``foreach`` and
        ``weight_decay_mode`` and has no other options. State is named ``exp_avg_var`` / ``max_exp_avg_var``
        (holocron: ``exp_avg_sq`` / ``max_exp_avg_sq``).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.optim.adaptive.AdaBelief([w], lr=0.1, eps=1e-8, eps_in_belief=False)
        >>> w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()
        >>> w.detach()  # sqrt(s_hat) = 0.9 |g| on the first step
        tensor([0.8889, 1.8889, 2.8889])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        eps_in_belief: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByAdaBelief()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            eps_in_belief=eps_in_belief,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


# --- AdEMAMix ----------------------------------------------------------------------------------------------------


class ScaleByAdEMAMix(Transform):
    r"""AdEMAMix's two first moments (fast :math:`m_1`, slow :math:`m_2`) over Adam's second moment.

    .. math::
        m_{1,t} = \beta_1 m_{1,t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        m_{2,t} = \beta_{3,t} m_{2,t-1} + (1-\beta_{3,t}) g_t

    .. math::
        d_t = \frac{m_{1,t}/(1-\beta_1^t) + \alpha_t\, m_{2,t}}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    :math:`m_2` is not bias-corrected. Without ``t_alpha_beta3`` (:math:`T`), :math:`\alpha_t = \alpha` and
    :math:`\beta_{3,t} = \beta_3`; with it, the paper's warm-up schedulers:
    :math:`\alpha_t = \min(t\alpha/T, \alpha)` and
    :math:`\beta_{3,t} = \min\big(\exp\frac{\ln\beta_1 \ln\beta_3}{(1-t/T)\ln\beta_3 + (t/T)\ln\beta_1}, \beta_3\big)`.

    State (holocron's and pytorch_optimizer's names): ``exp_avg`` (:math:`m_1`), ``exp_avg_sq`` (:math:`v`),
    ``exp_avg_slow`` (:math:`m_2`).
    """

    elementwise = True
    hypers = (
        Hyper("betas", (0.9, 0.999, 0.9999), beta_triple, "decay rates of m1, v and m2 (beta3)", scalar=False),
        Hyper("alpha", 5.0, non_negative, "weight of the slow EMA m2 in the numerator"),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("t_alpha_beta3", None, optional_positive, "warm-up steps of alpha and beta3 (None: no warm-up)"),
    )

    def check_group(self, group: dict[str, Any]) -> None:
        # The beta3 scheduler interpolates log(beta1) and log(beta3): both must be finite.
        beta1, _, beta3 = group["betas"]
        if group["t_alpha_beta3"] is not None and (beta1 == 0 or beta3 == 0):
            raise ValueError(f"Invalid betas: {group['betas']!r} (t_alpha_beta3 needs betas[0] > 0 and betas[2] > 0)")

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros, "exp_avg_slow": zeros}

    @staticmethod
    def schedules(steps: torch.Tensor, alpha: float, beta1: float, beta3: float, horizon: float | None) -> Any:
        """``(alpha_t, beta3_t)`` per step count (float64 vectors), or the constants when there is no warm-up."""
        if horizon is None:
            return alpha, beta3
        frac = steps / horizon
        alpha_t = torch.clamp(frac * alpha, max=alpha)
        log1, log3 = math.log(beta1), math.log(beta3)
        beta3_t = torch.clamp(torch.exp(log1 * log3 / ((1.0 - frac) * log3 + frac * log1)), max=beta3)
        return alpha_t, beta3_t

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2, beta3 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        alpha_t, beta3_t = self.schedules(ctx.steps, ctx.hyper("alpha"), beta1, beta3, ctx.hyper("t_alpha_beta3"))
        if isinstance(alpha_t, torch.Tensor):
            alpha_t, beta3_t = ctx.per_param(alpha_t), ctx.per_param(1 - beta3_t)
        else:
            beta3_t = 1 - beta3_t
        fast, second, slow = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq"), ctx.buffer("exp_avg_slow")
        ops.lerp_(fast, updates, 1 - beta1)
        ops.mul_(second, beta2)
        ops.addcmul_(second, updates, updates, 1 - beta2)
        ops.lerp_(slow, updates, beta3_t)  # beta3_t now holds the weight 1 - beta3_t of the new gradient
        numerator = ops.div(fast, ctx.per_param(ctx.bias_correction(beta1)))
        ops.add_scaled_(numerator, slow, alpha_t)
        return ops.quotient(numerator, adam_denominator(ctx, second, beta2, eps))


class AdEMAMix(ChainedOptimizer):
    r"""AdEMAMix: Adam plus a slow EMA of the gradient, mixed into the numerator with weight :math:`\alpha`.

    .. math::
        m_{1,t} = \beta_1 m_{1,t-1} + (1-\beta_1) g_t,\quad
        m_{2,t} = \beta_{3,t} m_{2,t-1} + (1-\beta_{3,t}) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    .. math::
        p_t = p_{t-1} - \text{lr}\,\frac{m_{1,t}/(1-\beta_1^t) + \alpha_t m_{2,t}}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    With ``t_alpha_beta3=None`` (default) :math:`\alpha_t = \alpha`, :math:`\beta_{3,t} = \beta_3`; with a number
    :math:`T` of warm-up steps, :math:`\alpha_t = \min(t\alpha/T, \alpha)` and :math:`\beta_{3,t}` rises from
    :math:`\beta_1` to :math:`\beta_3` (log-linearly in the half-life, see :class:`ScaleByAdEMAMix`). Weight decay is
    coupled (L2) by default, as in both originals; ``weight_decay_mode="decoupled"`` is pytorch_optimizer's
    ``weight_decouple=True``.

    Pagliardini, Ablin & Grangier, 2024. The AdEMAMix Optimizer: Better, Faster, Older. arXiv:2409.03137.

    .. warning::
        Differences from holocron ``AdEMAMix`` (pylocron 0.3.0): holocron has no warm-up schedulers
        (``t_alpha_beta3=None`` reproduces it) and does not validate ``alpha`` or the number of betas; its
        docstring describes ``alpha`` as a decay rate and lists an ``amsgrad`` argument that does not exist.

        Differences from pytorch_optimizer ``AdEMAMix`` (4.1.0): the step count (hence the schedules and the bias
        corrections) is per parameter, not per group; ``fixed_decay=True`` is ``weight_decay=wd / lr`` in decoupled
        mode (for a constant lr); the ``cautious`` and ``stable_adamw`` extras (``**kwargs``) are not provided;
        ``betas[2] = 1`` is rejected (pytorch_optimizer accepts it); a schedule with ``betas[0] = 0`` or
        ``betas[2] = 0`` raises ``ValueError`` at construction (pytorch_optimizer: a math domain error in ``step``);
        ``t_alpha_beta3`` must be > 0 (0 divides by zero there). gradstep supports complex parameters (as real
        pairs); pytorch_optimizer rejects them. It writes ``maximize`` and coupled decay into ``p.grad``; gradstep
        does not.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.optim.adaptive.AdEMAMix([w], lr=0.1)
        >>> w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()
        >>> opt.state[w]["exp_avg_slow"]  # (1 - beta3) g, not bias-corrected
        tensor([1.0000e-05, 2.0000e-05, 3.0000e-05])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        t_alpha_beta3: float | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByAdEMAMix()],
            lr=lr,
            betas=betas,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            t_alpha_beta3=t_alpha_beta3,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "adabelief",
        AdaBelief,
        "Adam with the variance of the gradient around its EMA as second moment",
        "Zhuang et al., 2020. AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients. "
        "arXiv:2010.07468",
        ("pytorch_optimizer AdaBelief", "holocron AdaBelief"),
        example={"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": True},
        invalid=(({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps"), ({"eps_in_belief": 1}, "eps_in_belief")),
    )
)
register(
    Entry(
        "ademamix",
        AdEMAMix,
        "Adam plus a slow gradient EMA in the numerator, with optional alpha/beta3 warm-up",
        "Pagliardini, Ablin & Grangier, 2024. The AdEMAMix Optimizer: Better, Faster, Older. arXiv:2409.03137",
        ("holocron AdEMAMix", "pytorch_optimizer AdEMAMix"),
        example={
            "lr": 1e-2,
            "betas": (0.8, 0.99, 0.999),
            "alpha": 3.0,
            "eps": 1e-6,
            "weight_decay": 0.02,
            "t_alpha_beta3": 50,
        },
        invalid=(
            ({"betas": (0.9, 0.999)}, "betas"),
            ({"alpha": -1.0}, "alpha"),
            ({"t_alpha_beta3": 0}, "t_alpha_beta3"),
        ),
    )
)

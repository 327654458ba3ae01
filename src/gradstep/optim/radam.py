r"""RAdam (with SAdam's softplus) and QHAdam: Adam variants that reshape the adaptive step.

RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond", arXiv:1908.03265). With
:math:`\rho_\infty = 2/(1-\beta_2) - 1` and, at step t, :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`:

.. math::
    r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\,\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\,\rho_t}},\qquad
    d_t = \begin{cases} r_t\, \hat m_t / s_t & \rho_t > \text{rectify\_threshold} \\
                        \hat m_t & \text{otherwise (} \hat m_t / s_t \text{ with force\_adaptive\_momentum)}
          \end{cases}

with :math:`\hat m_t = m_t/(1-\beta_1^t)` and :math:`s_t = \sqrt{\hat v_t} + \epsilon` (``eps_mode="torch"``) or
:math:`(\sqrt{v_t} + \epsilon)/\sqrt{1-\beta_2^t}` (``"tf"``). SAdam (Tong et al., 2019, "Calibrating the Adaptive
Learning Rate to Improve Convergence of ADAM", arXiv:1908.00700) replaces :math:`s_t` by
:math:`\mathrm{softplus}_\beta(s_t) = \log(1 + e^{\beta s_t})/\beta` when ``beta > 0``.

QHAdam (Ma & Yarats, 2019, "Quasi-hyperbolic momentum and Adam for deep learning", arXiv:1810.06801):

.. math::
    d_t = \frac{(1-\nu_1)\, g_t + \nu_1 \hat m_t}{\sqrt{(1-\nu_2)\, g_t^2 + \nu_2 \hat v_t} + \epsilon}

:class:`ScaleByRAdam` is also the direction of LAMB (``rectify=False``) and RaLars (``rectify_threshold=4``) in
:mod:`gradstep.optim.layerwise`; :func:`rectification` is the one place where :math:`r_t` is computed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.hypers import REQUIRED, Hyper, boolean, non_negative, one_of, unit_interval_closed
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from .adam import BETAS, adam_denominator

__all__ = ["QHAdam", "RAdam", "ScaleByQHAdam", "ScaleByRAdam", "rectification"]


def _at_least_4(value: Any) -> str | None:
    # Below 4 the rectification term is the square root of a negative number.
    if non_negative(value) is not None or float(value) < 4:
        return "must be a real number >= 4"
    return None


def _unit_pair(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (nu1, nu2)"
    for i, nu in enumerate(value):
        if unit_interval_closed(nu) is not None:
            return f"nus[{i}] must be in [0, 1]"
    return None


def rectification(steps: Tensor, beta2: float, threshold: float) -> tuple[Tensor, Tensor]:
    """RAdam's rectification term ``r_t`` and whether it applies (``rho_t > threshold``), per step count.

    ``steps`` is a float64 vector (one step count per parameter). ``r_t`` is 0 where rectification is off, so that
    its unused value (the square root of a negative number for ``rho_t < 4``) never reaches the update.
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = torch.pow(torch.tensor(beta2, dtype=torch.float64, device=steps.device), steps)
    rho = rho_inf - 2.0 * steps * beta2_t / (1.0 - beta2_t)
    on = rho > threshold
    r = torch.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return torch.where(on, r, torch.zeros_like(r)), on


class ScaleByRAdam(Transform):
    r"""Adam's moments and a (rectified) adaptive direction; see the module docstring.

    With ``rectify=False`` it is the Adam direction :math:`\hat m/s` (LAMB's). ``bias_correction=False`` drops
    :math:`1-\beta^t` from both moments (holocron's LAMB). State: ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    elementwise = True
    hypers = (
        BETAS,
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper(
            "eps_mode",
            "torch",
            one_of("torch", "tf"),
            "where eps goes: 'torch': sqrt(v_hat) + eps, v_hat = v/(1-beta2^t); 'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)",
        ),
        Hyper("bias_correction", True, boolean, "divide m and v by 1 - beta^t"),
        Hyper("beta", 0.0, non_negative, "SAdam: softplus_beta of the denominator when > 0 (0: off)"),
        Hyper("rectify", True, boolean, "RAdam's variance rectification (False: the plain Adam direction)"),
        Hyper("rectify_threshold", 5.0, _at_least_4, "rectify when rho_t > this (torch, fastai: 5; holocron: 4)"),
        Hyper("force_adaptive_momentum", False, boolean, "before rectification, m_hat/s instead of m_hat"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps, beta = ctx.hyper("eps"), ctx.hyper("beta")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        ones = torch.ones_like(ctx.steps)
        bc1, scale = ones, ones  # the direction is scale / bc1 * m / den
        if not ctx.hyper("bias_correction"):
            den = ops.sqrt(exp_avg_sq)  # both eps modes agree without bias correction
            ops.add_(den, eps)
        elif ctx.hyper("eps_mode") == "torch":
            bc1, den = ctx.bias_correction(beta1), adam_denominator(ctx, exp_avg_sq, beta2, eps)
        else:
            # TF eps, with torch.optim.RAdam's rounding: sqrt(bc2) * m / (sqrt(v) + eps).
            bc1, scale = ctx.bias_correction(beta1), torch.sqrt(ctx.bias_correction(beta2))
            den = ops.sqrt(exp_avg_sq)
            ops.add_(den, eps)
        if beta > 0:
            # SAdam smooths the whole denominator s; there is no foreach softplus, it is elementwise anyway.
            den = [F.softplus(s, beta) for s in ops.div(den, ctx.per_param(scale))]
            scale = torch.ones_like(scale)
        # Every direction below is m / den' with den' a fresh tensor: the core fuses the division into the write.
        if not ctx.hyper("rectify"):
            ops.mul_(den, ctx.per_param(bc1 / scale))
            return ops.quotient(exp_avg, den)
        r, on = rectification(ctx.steps, beta2, ctx.hyper("rectify_threshold"))
        if ctx.hyper("force_adaptive_momentum"):
            ops.mul_(den, ctx.per_param(bc1 / (torch.where(on, r, torch.ones_like(r)) * scale)))
            return ops.quotient(exp_avg, den)
        # Before rectification the step is bias-corrected momentum m / bc1, after it r * scale / bc1 * m / den.
        # torch.where per parameter (not a product with 0) keeps a 0/0 or an infinity of the unused adaptive branch
        # (eps = 0, v = 0; r = 0) out of the update.
        ops.mul_(den, ctx.per_param(bc1 / torch.where(on, r * scale, torch.ones_like(r))))
        return ops.quotient(exp_avg, ops.where(ctx.per_param(on), den, ctx.per_param(bc1)))


class ScaleByQHAdam(Transform):
    """QHAdam's quasi-hyperbolic direction (see the module docstring). State: ``exp_avg``, ``exp_avg_sq``."""

    elementwise = True
    hypers = (
        BETAS,
        Hyper(
            "nus", (1.0, 1.0), _unit_pair, "weights (nu1, nu2) of the moments against the current g, g^2", scalar=False
        ),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        nu1, nu2 = ctx.hyper("nus")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        num = ops.mul(exp_avg, ctx.per_param(nu1 / ctx.bias_correction(beta1)))
        if nu1 != 1:
            ops.add_scaled_(num, updates, 1 - nu1)
        second = ops.mul(exp_avg_sq, ctx.per_param(nu2 / ctx.bias_correction(beta2)))
        if nu2 != 1:
            ops.addcmul_(second, updates, updates, 1 - nu2)
        return ops.quotient(num, ops.add(ops.sqrt(second), ctx.hyper("eps")))


class RAdam(ChainedOptimizer):
    """RAdam, a drop-in for ``torch.optim.RAdam`` (TF-style eps, coupled weight decay); fastai's is a preset.

    ``decoupled_weight_decay=True`` (torch's flag) is ``weight_decay_mode="decoupled"``. fastai's RAdam is
    ``eps_mode="torch", weight_decay_mode="decoupled"`` with betas (0.9, 0.99), eps 1e-5 and optional SAdam ``beta``
    (registered as ``fastai_radam``).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = gradstep.optim.radam.RAdam([w], lr=0.1)
        >>> w.grad = torch.ones(3); _ = opt.step()  # rho_1 = 1: no rectification yet, a momentum step
        >>> w.detach()
        tensor([0.9000, 0.9000, 0.9000])

    .. warning::
        Differences from the originals. torch: none in the numbers; ``capturable`` and ``differentiable`` are not
        offered. fastai: weight decay never writes into ``p.grad`` (coupled mode); the momentum step before
        rectification is written ``lr * m_hat`` (fastai: ``lr / bc1 * m``), the same number up to rounding.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        beta: float = 0.0,
        **options: Any,
    ) -> None:
        if decoupled_weight_decay:
            options.setdefault("weight_decay_mode", "decoupled")
        options.setdefault("eps_mode", "tf")
        super().__init__(
            params,
            [ScaleByRAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            beta=beta,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class QHAdam(ChainedOptimizer):
    """QHAdam, a drop-in for ``qhoptim.pyt.QHAdam`` (its defaults and argument order); fastai's is a preset.

    ``decouple_weight_decay=True`` (qhoptim's flag) is ``weight_decay_mode="decoupled"``. fastai's QHAdam is betas
    (0.999, 0.999), nus (0.7, 1.0), decoupled weight decay (registered as ``fastai_qhadam``; fastai's ``nu_1, nu_2``
    are ``nus``).

    .. warning::
        Differences from the originals. qhoptim keeps the bias-corrected averages in ``exp_avg``/``exp_avg_sq`` and
        their weights in ``beta1_weight``/``beta2_weight``; gradstep keeps torch's raw moments (``exp_avg / (1 -
        beta1^t)`` is qhoptim's ``exp_avg``). qhoptim and fastai write coupled weight decay into ``p.grad``;
        gradstep never modifies gradients.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        nus: tuple[float, float] = (1.0, 1.0),
        weight_decay: float = 0.0,
        decouple_weight_decay: bool = False,
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        if decouple_weight_decay:
            options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByQHAdam()],
            lr=lr,
            betas=betas,
            nus=nus,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


_FASTAI = "fastai.optimizer (2.8.12)"
_RADAM = "Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond. arXiv:1908.03265"
_QH = "Ma & Yarats, 2019. Quasi-hyperbolic momentum and Adam for deep learning. arXiv:1810.06801"
for _entry in (
    Entry(
        "radam",
        RAdam,
        "rectified Adam (torch's RAdam; fastai's eps, SAdam's softplus and holocron's threshold as options)",
        _RADAM,
        ("torch.optim.RAdam", _FASTAI + " RAdam"),
        example={"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.02, "beta": 10.0},
        invalid=(
            ({"betas": (1.0, 0.9)}, "betas"),
            ({"rectify_threshold": 3.0}, "rectify_threshold"),
            ({"eps_mode": "keras"}, "eps_mode"),
            ({"beta": -1.0}, "beta"),
        ),
    ),
    Entry(
        "fastai_radam",
        RAdam,
        "fastai's RAdam (and SAdam with beta > 0): torch-style eps 1e-5, betas (0.9, 0.99), decoupled decay",
        _RADAM + "; SAdam: Tong et al., 2019. arXiv:1908.00700",
        (_FASTAI + " RAdam",),
        preset={
            "lr": REQUIRED,
            "betas": (0.9, 0.99),
            "eps": 1e-5,
            "eps_mode": "torch",
            "weight_decay_mode": "decoupled",
        },
        example={"lr": 1e-2, "betas": (0.85, 0.9), "weight_decay": 0.01, "beta": 5.0},
        invalid=(({"lr": -1.0}, "lr"),),
    ),
    Entry(
        "qhadam",
        QHAdam,
        "quasi-hyperbolic Adam: moments blended with the current gradient",
        _QH,
        ("qhoptim.pyt.QHAdam", _FASTAI + " QHAdam"),
        example={"lr": 1e-2, "betas": (0.95, 0.99), "nus": (0.7, 0.9), "eps": 1e-6, "weight_decay": 0.01},
        invalid=(({"nus": (1.5, 1.0)}, "nus"), ({"nus": (0.7,)}, "nus"), ({"eps": -1.0}, "eps")),
    ),
    Entry(
        "fastai_qhadam",
        QHAdam,
        "fastai's QHAdam: betas (0.999, 0.999), nus (0.7, 1.0), decoupled weight decay, lr required",
        _QH,
        (_FASTAI + " QHAdam",),
        preset={"lr": REQUIRED, "betas": (0.999, 0.999), "nus": (0.7, 1.0), "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "nus": (0.8, 0.9), "weight_decay": 0.01},
        invalid=(({"lr": -1.0}, "lr"),),
    ),
):
    register(_entry)

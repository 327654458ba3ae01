r"""Layer-wise scaled optimizers: LARS, LARC, LAMB and RaLars, all through one trust-ratio transform.

Each parameter tensor's direction :math:`u` is multiplied by a *trust ratio* computed from tensor norms
(:class:`TrustRatio`):

.. math::
    q = \min\Bigl(\frac{\eta\, \mathrm{clamp}(\lVert p' \rVert, c_{lo}, c_{hi})}{N + [\epsilon]},\ q_{max}\Bigr),
    \qquad N = \begin{cases} \lVert u \rVert & \text{LAMB, RaLars} \\
                             \lVert g \rVert + \lambda \lVert p' \rVert & \text{LARS, LARC} \end{cases},
    \qquad d = q\, u

with trust coefficient :math:`\eta` (``trust_coeff``), the norm clamp ``scale_clip`` :math:`(c_{lo}, c_{hi})`, the
cap ``max_trust_ratio`` :math:`q_{max}`, eps in the denominator with ``trust_eps``, weight decay :math:`\lambda` and
:math:`p' = p (1 - lr\,\lambda)` under decoupled weight decay (the parameter the step applies to), else :math:`p`.
``trust_zero="one"`` sets :math:`q = 1` when the clamped :math:`\lVert p' \rVert` or :math:`N` is zero;
``"formula"`` keeps the formula (a zero parameter then stays zero). ``weight_decay_mode="trust_ratio"`` adds
:math:`\lambda p` to :math:`u` before :math:`N` is measured (the LAMB paper's placement). ``p <- p - lr * d``.

* LARS (You et al., 2017, "Large Batch Training of Convolutional Networks", arXiv:1708.03888): :math:`u` is SGD
  momentum of :math:`g + \lambda p`, :math:`\eta = 1`, :math:`N = \lVert g \rVert + \lambda \lVert p \rVert`.
* LARC: LARS with :math:`\eta = 0.02`, eps, the ratio capped at 1 (``clip``), decoupled decay (fastai's Larc).
* LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
  arXiv:1904.00962): :math:`u = \hat m/(\sqrt{\hat v} + \epsilon) + \lambda p`, :math:`N = \lVert u \rVert`,
  :math:`\lVert p \rVert` clamped to [0, 10].
* RaLars: LAMB with RAdam's rectified direction (:class:`~gradstep.optim.radam.ScaleByRAdam`, threshold 4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import REQUIRED, Hyper, boolean, non_negative, non_negative_or_inf, one_of, positive
from ..core.ops import Coef, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import tensor_norms
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_is_zero, coef_mul
from ..transforms import Momentum
from .radam import ScaleByRAdam

__all__ = ["LAMB", "LARC", "LARS", "RaLars", "ScaleByStepBiasCorrection", "TrustRatio"]

DEFAULT_SCALE_CLIP = (0.0, 10.0)
NO_CLIP = (0.0, math.inf)


def _scale_clip_check(value: Any) -> str | None:
    ok = value is None or (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(non_negative_or_inf(v) is None for v in value)
        and value[0] <= value[1]
    )
    return None if ok else "must be None (meaning (0, 10)) or a pair (lo, hi) with 0 <= lo <= hi"


def _one(param: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.ones((), dtype=dtype, device=param.device)


def _vector(ctx: GroupStep, c: Coef) -> Tensor:
    """A coefficient (number, 0-d tensor or one value per parameter) as a float64 vector over the parameters."""
    device = ctx.steps.device
    if isinstance(c, (list, tuple)):
        return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in c])
    return torch.as_tensor(c, dtype=torch.float64, device=device).expand(len(ctx))


def _decoupled_factor(ctx: GroupStep, wd: Coef) -> Tensor:
    """``1 - lr * wd`` per parameter, with the learning rate the core applies (lr_scale, opt_args, backoff)."""
    lr = _vector(ctx, coef_mul(ctx.param_hyper("lr"), ctx.param_hyper("lr_scale")))
    if ctx.hyper("backoff_steps") > 0:
        lr = lr * (ctx.steps > ctx.hyper("backoff_steps"))
    return 1.0 - lr * _vector(ctx, wd)


class TrustRatio(Transform):
    """Layer-wise scaling of the direction by a trust ratio (see the module docstring).

    Args:
        denominator: ``"update"`` (N is the norm of the incoming direction: LAMB, RaLars) or ``"grad"`` (N is
            ``||g|| + wd * ||p'||`` with the raw gradient: LARS, LARC).

    State: ``trust_ratio`` (0-d, the last ratio, without the learning rate).
    """

    hypers = (
        Hyper("trust_coeff", 1.0, non_negative, "trust coefficient eta multiplying the ratio"),
        Hyper(
            "scale_clip", None, _scale_clip_check, "bounds (lo, hi) of ||p|| in the ratio; None: (0, 10)", scalar=False
        ),
        Hyper("max_trust_ratio", math.inf, positive, "cap of the ratio (LARC clip: 1; fastai Lamb: 10)"),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("trust_eps", False, boolean, "add eps to the trust-ratio denominator"),
        Hyper("trust_zero", "one", one_of("one", "formula"), "one: ratio 1 when a norm is 0; formula: no special case"),
        Hyper(
            "weight_decay_mode",
            "coupled",
            one_of("coupled", "decoupled", "proximal", "trust_ratio"),
            "coupled: g + wd*p; decoupled: p*(1 - lr*wd); proximal: p/(1 + lr*wd); trust_ratio: u + wd*p",
        ),
    )

    def __init__(self, denominator: str = "update") -> None:
        if denominator not in ("update", "grad"):
            raise ValueError(f"denominator must be 'update' or 'grad', got {denominator!r}")
        self.denominator = denominator
        # The norm of the incoming direction comes before its use: compiled, recompute it from the updated moments.
        self.recompute_when_compiled = denominator == "update"

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"trust_ratio": _one}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        wd = ctx.param_hyper("weight_decay")
        mode = ctx.hyper("weight_decay_mode")
        decays = not coef_is_zero(wd)
        if mode == "trust_ratio" and decays:
            updates = ops.add(updates, ops.mul(ctx.params, wd))
        p_norm = tensor_norms(ctx.params).to(torch.float64)
        if mode == "decoupled" and decays:
            # The core decays p before writing the step: measure the parameter the step applies to (fastai, pto).
            p_norm = p_norm * _decoupled_factor(ctx, wd).abs()
        lo, hi = ctx.hyper("scale_clip") or DEFAULT_SCALE_CLIP
        phi = p_norm.clamp(lo, hi)
        if self.denominator == "update":
            norm = tensor_norms(updates).to(torch.float64)
        else:
            norm = tensor_norms(ctx.grads).to(torch.float64)
            if decays:
                norm = norm + _vector(ctx, wd) * p_norm
        den = norm + ctx.hyper("eps") if ctx.hyper("trust_eps") else norm
        ratio = (ctx.hyper("trust_coeff") * phi / den).clamp(max=ctx.hyper("max_trust_ratio"))
        if ctx.hyper("trust_zero") == "one":
            ratio = torch.where((phi == 0) | (norm == 0), torch.ones_like(ratio), ratio)
        ops.copy_(ctx.buffer("trust_ratio"), list(ratio.unbind(0)))
        return ops.mul(updates, ctx.per_param(ratio))

    def __repr__(self) -> str:
        return f"TrustRatio(denominator={self.denominator!r})"


class ScaleByStepBiasCorrection(Transform):
    """Divide the direction by ``1 - beta1^t`` after the trust ratio (pytorch_optimizer's Lamb), when enabled."""

    hypers = (Hyper("step_bias_correction", False, boolean, "divide the step by 1 - beta1^t after the trust ratio"),)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if not ctx.hyper("step_bias_correction"):
            return updates
        return ctx.ops.div(updates, ctx.per_param(ctx.bias_correction(ctx.hyper("betas")[0])))


class LARS(ChainedOptimizer):
    """LARS, a drop-in for holocron's ``LARS`` (coupled weight decay inside the scaled direction).

    The momentum buffer (torch's SGD momentum, dampening, Nesterov) accumulates ``g + wd * p``; the ratio
    ``||p|| / (||g|| + wd ||p||)`` multiplies the buffer's output.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.optim.layerwise.LARS([w], lr=0.1, weight_decay=0.1)
        >>> w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()  # ratio 3.742 / (0.374 + 0.374) = 5
        >>> w.detach()
        tensor([0.9000, 1.8000, 2.7000])

    .. warning::
        Differences from holocron: ``scale_clip`` (default (0, 10)) clamps ``||p||`` as documented; holocron
        ignores it (pass ``scale_clip=(0, math.inf)`` for holocron's numbers when ``||p|| > 10``). holocron writes
        the weight decay into ``p.grad`` and requires a Python float ``lr``; gradstep does neither.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        scale_clip: tuple[float, float] | None = None,
        *,
        trust_coeff: float = 1.0,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [Momentum(), TrustRatio("grad")],
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            scale_clip=scale_clip,
            trust_coeff=trust_coeff,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class LARC(ChainedOptimizer):
    """LARC, fastai's ``Larc``: LARS with a trust coefficient, eps, and the ratio capped at 1 (``clip``).

    fastai's local lr ``min(lr, lr * eta * ||p|| / (||g|| + wd ||p|| + eps))`` is ``lr`` times the ratio capped at
    ``max_trust_ratio`` (1 with ``clip=True``, no cap with ``clip=False``). Decoupled weight decay by default
    (fastai's ``decouple_wd=True``); ``||p||`` is measured after the decay, as fastai does. fastai's ``mom`` is
    ``momentum``, ``wd`` is ``weight_decay``.

    .. warning::
        A parameter whose norm is 0 gets a ratio of 0 and never moves (fastai's formula, kept as the default:
        zero-initialised biases stay at zero). ``trust_zero="one"`` uses a ratio of 1 instead (apex's LARC,
        holocron). Differences from fastai: in coupled mode fastai counts the weight decay twice in the
        denominator (``||g + wd p|| + wd ||p||``, a bug); gradstep uses ``||g|| + wd ||p||``. fastai's ``local_lr``
        state is ``lr * trust_ratio``, its ``grad_avg`` is ``momentum_buffer``. gradstep never writes into ``p.grad``;
        ``clip`` is stored per group as ``max_trust_ratio``; ``lr`` has a default (1e-3).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.9,
        clip: bool = True,
        trust_coeff: float = 0.02,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("max_trust_ratio", 1.0 if clip else math.inf)
        options.setdefault("weight_decay_mode", "decoupled")
        options.setdefault("trust_zero", "formula")
        options.setdefault("trust_eps", True)
        options.setdefault("scale_clip", NO_CLIP)
        super().__init__(
            params,
            [Momentum(), TrustRatio("grad")],
            lr=lr,
            momentum=momentum,
            trust_coeff=trust_coeff,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class LAMB(ChainedOptimizer):
    """LAMB as in the paper: bias-corrected Adam direction, weight decay inside the trust ratio, ``||p||`` in [0, 10].

    Originals as options (``scale_clip=None`` means (0, 10), as in holocron):

    * holocron ``LAMB``: ``bias_correction=False``.
    * fastai ``Lamb``: ``weight_decay_mode="decoupled"`` (or ``"coupled"`` for ``decouple_wd=False``),
      ``scale_clip=(0, math.inf)``, ``max_trust_ratio=10``, betas (0.9, 0.99), eps 1e-5 (preset ``fastai_lamb``).
    * pytorch_optimizer ``Lamb``: ``bias_correction=False, step_bias_correction=True, trust_eps=True``, eps 1e-6,
      ``weight_decay_mode="decoupled"`` (``weight_decouple=True``) or ``"trust_ratio"`` (``False``).

    .. warning::
        Differences from the originals. holocron: no bias correction although its documentation shows it (an
        option here, on by default); ``scale_clip`` is per group (holocron: per optimizer); its ``local_lr`` state is
        ``trust_ratio``. fastai: ``mom``/``sqr_mom``/``wd`` are ``betas``/``weight_decay``, state ``grad_avg`` and
        ``sqr_avg`` is ``exp_avg`` and ``exp_avg_sq``, the ratio of RMS norms is written as a ratio of L2 norms (the
        same number), L2 decay is not written into ``p.grad``, ``lr`` has a default. pytorch_optimizer: the
        ``pre_norm``/``max_grad_norm``, ``grad_averaging=False``, ``fixed_decay``, ``adam``, ``rectify`` and
        ``adanorm`` options are not offered (RaLars is the rectified LAMB); the step count is per parameter, not per
        group; ``weight_norm`` and ``adam_norm`` are not kept.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scale_clip: tuple[float, float] | None = None,
        *,
        bias_correction: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "trust_ratio")
        options.setdefault("rectify", False)
        super().__init__(
            params,
            [ScaleByRAdam(), TrustRatio("update"), ScaleByStepBiasCorrection()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            scale_clip=scale_clip,
            bias_correction=bias_correction,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class RaLars(LAMB):
    """RaLars, a drop-in for holocron's ``RaLars``: LAMB on RAdam's rectified direction (rectified when rho_t > 4).

    Before rectification the direction is the bias-corrected momentum (Adam's with ``force_adaptive_momentum``).
    Per-tensor factors (r_t, bias corrections) cancel in the ratio except where eps or the weight decay mixes in.

    .. warning::
        Differences from holocron: ``force_adaptive_momentum`` and ``scale_clip`` are per group (holocron: per
        optimizer); its ``local_lr`` state is ``trust_ratio``; its group key ``sma_inf`` is not kept (it follows
        ``betas``, which holocron's cached value does not after a change of ``betas``).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        force_adaptive_momentum: bool = False,
        scale_clip: tuple[float, float] | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("rectify", True)
        options.setdefault("rectify_threshold", 4.0)
        options.setdefault("force_adaptive_momentum", force_adaptive_momentum)
        super().__init__(params, lr, betas, eps, weight_decay, scale_clip, **options)


_LARS_PAPER = "You, Gitman & Ginsburg, 2017. Large Batch Training of Convolutional Networks. arXiv:1708.03888"
_LAMB_PAPER = (
    "You et al., 2020. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes. arXiv:1904.00962"
)
_FASTAI = "fastai.optimizer (2.8.12)"
_CLIP_ERROR = ({"scale_clip": (10.0, 1.0)}, "scale_clip")
for _entry in (
    Entry(
        "lars",
        LARS,
        "layer-wise adaptive rate scaling over SGD momentum",
        _LARS_PAPER,
        ("holocron LARS",),
        example={"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "scale_clip": (0.0, 5.0)},
        invalid=(({"lr": -1.0}, "lr"), ({"momentum": -0.5}, "momentum"), _CLIP_ERROR),
        sharding="per-tensor reduction",
    ),
    Entry(
        "larc",
        LARC,
        "LARS with a trust coefficient and the local lr clipped at lr (fastai's Larc)",
        _LARS_PAPER,
        (_FASTAI + " Larc",),
        example={"lr": 0.1, "momentum": 0.8, "trust_coeff": 0.05, "weight_decay": 0.01, "trust_zero": "one"},
        invalid=(({"trust_coeff": -0.1}, "trust_coeff"), ({"trust_zero": "two"}, "trust_zero")),
        sharding="per-tensor reduction",
    ),
    Entry(
        "lamb",
        LAMB,
        "layer-wise adaptive Adam (the LAMB paper; holocron's, fastai's and pytorch_optimizer's as options)",
        _LAMB_PAPER,
        ("holocron LAMB", _FASTAI + " Lamb", "pytorch_optimizer 4.1.0 Lamb"),
        example={"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01, "max_trust_ratio": 5.0},
        invalid=(({"betas": (0.9, 1.0)}, "betas"), ({"max_trust_ratio": 0.0}, "max_trust_ratio"), _CLIP_ERROR),
        sharding="per-tensor reduction",
    ),
    Entry(
        "fastai_lamb",
        LAMB,
        "fastai's Lamb: ratio capped at 10 (no norm clamp), decoupled weight decay, eps 1e-5, lr required",
        _LAMB_PAPER,
        (_FASTAI + " Lamb",),
        preset={
            "lr": REQUIRED,
            "betas": (0.9, 0.99),
            "eps": 1e-5,
            "weight_decay_mode": "decoupled",
            "scale_clip": NO_CLIP,
            "max_trust_ratio": 10.0,
        },
        example={"lr": 1e-2, "betas": (0.85, 0.95), "weight_decay": 0.01},
        invalid=(({"lr": -1.0}, "lr"),),
        sharding="per-tensor reduction",
    ),
    Entry(
        "ralars",
        RaLars,
        "RAdam's rectified direction with LAMB's layer-wise scaling (holocron's RaLars)",
        "Liu et al., 2020. arXiv:1908.03265; " + _LARS_PAPER,
        ("holocron RaLars",),
        example={"lr": 1e-2, "betas": (0.85, 0.99), "weight_decay": 0.01, "force_adaptive_momentum": True},
        invalid=(({"eps": -1.0}, "eps"), ({"rectify_threshold": 2.0}, "rectify_threshold"), _CLIP_ERROR),
        sharding="per-tensor reduction",
    ),
):
    register(_entry)

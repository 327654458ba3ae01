r"""The Adam family: Adam, AdamW, Adamax and AdamTF (TensorFlow's epsilon).

Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980), per parameter, at step t:

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
    \qquad \hat v_t = \max(\hat v_{t-1}, v_t) \ \text{(amsgrad)}

.. math::
    \text{torch eps:}\quad d_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
    \qquad\qquad
    \text{tf eps:}\quad d_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

and ``p <- p - lr * d``. Weight decay is the core's: coupled (``Adam``), decoupled (``AdamW``, Loshchilov & Hutter,
2019, arXiv:1711.05101) or proximal. Adamax (same paper, section 7) replaces ``v`` by an infinity norm.

GoMLX's and fastai's Adam are recipes of these classes (see :mod:`gradstep.recipes`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.fused import float32_counts
from ..core.hypers import Hyper, beta_pair, boolean, non_negative, one_of
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["Adam", "AdamTF", "AdamW", "Adamax", "ScaleByAdam", "ScaleByAdamax", "adam_denominator"]

BETAS = Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the first and second moments", scalar=False)


def adam_denominator(ctx: GroupStep, second: TensorList, beta2: float, eps: float) -> TensorList:
    """torch-style ``sqrt(second / (1 - beta2^t)) + eps``, written as the originals do: ``sqrt(s)/sqrt(bc2) + eps``."""
    sqrt_bc2 = torch.sqrt(ctx.bias_correction(beta2))
    denom = ctx.ops.sqrt(second)  # fresh: divided and shifted in place
    ctx.ops.div_(denom, ctx.per_param(sqrt_bc2))
    ctx.ops.add_(denom, eps)
    return denom


class ScaleByAdam(Transform):
    """Adam's moments and bias-corrected scaling (see the module docstring).

    State: ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with ``amsgrad``, ``max_exp_avg_sq`` (torch's names).
    """

    elementwise = True
    hypers = (
        BETAS,
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("amsgrad", False, boolean, "use the running maximum of v (Reddi et al., 2018)"),
        Hyper(
            "eps_mode",
            "torch",
            one_of("torch", "tf"),
            "where eps goes: 'torch': sqrt(v_hat) + eps, v_hat = v/(1-beta2^t); 'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_sq": zeros}
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        return names

    def fused_kernel(self, group: dict[str, Any]) -> Any:
        # torch's kernels: the torch epsilon, coupled (Adam) or decoupled (AdamW) weight decay.
        if group["eps_mode"] != "torch" or group["weight_decay_mode"] not in ("coupled", "decoupled"):
            return None
        return _fused_adam

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        second = exp_avg_sq
        if ctx.hyper("amsgrad"):
            second = ctx.buffer("max_exp_avg_sq")
            ops.maximum_(second, exp_avg_sq)
        bc1 = ctx.bias_correction(beta1)
        sqrt_bc2 = torch.sqrt(ctx.bias_correction(beta2))
        # Both eps conventions as one denominator with the bias corrections folded in, written in place into the
        # fresh sqrt(v): torch: bc1 * (sqrt(v)/sqrt(bc2) + eps); tf: (sqrt(v) + eps) * bc1/sqrt(bc2).
        denom = ops.sqrt(second)
        ops.mul_(denom, ctx.per_param(bc1 / sqrt_bc2))
        eps_term = bc1 * eps if ctx.hyper("eps_mode") == "torch" else bc1 / sqrt_bc2 * eps
        ops.add_(denom, ctx.per_param(eps_term))
        return ops.quotient(exp_avg, denom)


def _fused_adam(group: dict[str, Any], params: TensorList, grads: TensorList, states: list[dict[str, Any]]) -> None:
    """One step of ``torch.optim.Adam``/``AdamW(fused=True)``: the same kernel on the same buffers."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    kernel = torch._fused_adamw_ if group["weight_decay_mode"] == "decoupled" else torch._fused_adam_
    beta1, beta2 = group["betas"]
    kernel(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
        float32_counts(steps),
        amsgrad=group["amsgrad"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


class ScaleByAdamax(Transform):
    r"""Adamax: :math:`u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)`, :math:`d = m_t / ((1-\beta_1^t)\, u_t)`.

    With ``eps_inside_max=False`` (GoMLX): :math:`u_t = \max(\beta_2 u_{t-1}, |g_t|)`, :math:`d = m_t / ((1-\beta_1^t)
    (u_t + \epsilon))`. State: ``exp_avg``, ``exp_inf`` (torch's names).
    """

    elementwise = True
    hypers = (
        BETAS,
        Hyper("eps", 1e-8, non_negative, "term added to |g| (torch) or to u (GoMLX)"),
        Hyper("eps_inside_max", True, boolean, "torch: max(b2*u, |g| + eps); GoMLX: max(b2*u, |g|) + eps"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_inf": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_inf = ctx.buffer("exp_avg"), ctx.buffer("exp_inf")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        ops.mul_(exp_inf, beta2)
        if ctx.hyper("eps_inside_max"):
            bound = ops.abs(updates)
            ops.add_(bound, eps)
            ops.maximum_(exp_inf, bound)
            return ops.quotient(exp_avg, exp_inf, ctx.per_param(1.0 / ctx.bias_correction(beta1)))
        ops.maximum_(exp_inf, ops.abs(updates))
        denom = ops.add(exp_inf, eps)
        ops.mul_(denom, ctx.per_param(ctx.bias_correction(beta1)))
        return ops.quotient(exp_avg, denom)


class Adam(ChainedOptimizer):
    """Adam, a drop-in for ``torch.optim.Adam`` (coupled weight decay by default).

    ``decoupled_weight_decay=True`` (torch's flag) is ``weight_decay_mode="decoupled"``. Core options
    (``weight_decay_mode``, ``nonfinite``, ``state_dtype``, ``clip_step``, ``backoff_steps``,
    ``lr_scale``, ``stochastic_rounding``) are keyword arguments; see :class:`~gradstep.ChainedOptimizer`.

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = gradstep.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
        >>> model(torch.ones(2, 4)).sum().backward(); _ = opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ) -> None:
        if decoupled_weight_decay:  # torch.optim.Adam's flag, as the core's weight_decay_mode
            options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay ``p <- p * (1 - lr * wd)``, a drop-in for ``torch.optim.AdamW``."""

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options)


class AdamTF(Adam):
    """ALF's AdamTF: Adam with TensorFlow's epsilon (``sqrt(v) + eps``, step ``lr * sqrt(1-b2^t) / (1-b1^t)``).

    Coupled weight decay, overridable per parameter through ``p.opt_args['weight_decay']`` (0 disables it), eps
    1e-7 as in ALF. ``amsgrad`` keeps the maximum of the raw ``v``.

    .. warning::
        Differences from ALF: state is created lazily per parameter, so a loaded state_dict is kept (ALF's first
        step wipes it) and a group added after the first step works (ALF raises ``KeyError``). ``opt_args`` values
        are validated.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        **options: Any,
    ) -> None:
        options.setdefault("eps_mode", "tf")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **options)


class Adamax(ChainedOptimizer):
    """Adamax, a drop-in for ``torch.optim.Adamax`` (lr 2e-3); ``eps_inside_max=False`` gives GoMLX's variant."""

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByAdamax()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


_KINGMA = "Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization. arXiv:1412.6980"
register(
    Entry(
        "adam",
        Adam,
        "Adam with coupled (L2) weight decay",
        _KINGMA,
        ("torch.optim.Adam", "ALF Adam (wrapped torch.optim.Adam)"),
        example={"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.03, "amsgrad": True},
        invalid=(({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"), ({"eps": -1e-8}, "eps")),
    )
)
register(
    Entry(
        "adamw",
        AdamW,
        "Adam with decoupled weight decay",
        "Loshchilov & Hutter, 2019. Decoupled Weight Decay Regularization. arXiv:1711.05101",
        ("torch.optim.AdamW", "ALF AdamW"),
        example={"lr": 2e-2, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.1},
        invalid=(({"weight_decay": -0.1}, "weight_decay"), ({"betas": (0.9, -0.1)}, "betas")),
    )
)
register(
    Entry(
        "adamtf",
        AdamTF,
        "Adam with TensorFlow's epsilon (ALF AdamTF), per-parameter weight decay",
        _KINGMA,
        ("ALF AdamTF",),
        example={"lr": 2e-2, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.02, "amsgrad": True},
        invalid=(({"eps": -1.0}, "eps"), ({"eps_mode": "keras"}, "eps_mode")),
    )
)
register(
    Entry(
        "adamax",
        Adamax,
        "Adam with an infinity-norm second moment",
        _KINGMA + " (section 7)",
        ("torch.optim.Adamax", "GoMLX Adam().Adamax()"),
        example={"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.02},
        invalid=(({"lr": -2e-3}, "lr"), ({"betas": (0.9,)}, "betas")),
    )
)

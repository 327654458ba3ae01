r"""Accumulated-gradient methods: Adagrad, Adadelta and SparseAdam (torch.optim's, sparse gradients as torch's).

Adagrad (Duchi, Hazan & Singer, 2011), with :math:`\eta` = ``lr_decay`` and :math:`s_0` = ``initial_accumulator_value``:

.. math::
    s_t = s_{t-1} + g_t^2, \qquad d_t = \frac{1}{1 + (t-1)\eta}\, \frac{g_t}{\sqrt{s_t} + \epsilon}

Adadelta (Zeiler, 2012, arXiv:1212.5701), with decay :math:`\rho`:

.. math::
    v_t = \rho v_{t-1} + (1-\rho) g_t^2, \qquad
    d_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \qquad
    u_t = \rho u_{t-1} + (1-\rho) d_t^2

SparseAdam is Adam (Kingma & Ba, 2015) restricted to the elements a sparse gradient holds: only those elements of
``exp_avg`` and ``exp_avg_sq`` decay and only those of the parameter move (the "lazy" Adam of embedding tables).

With a sparse gradient (``nn.Embedding(sparse=True)``), Adagrad and SparseAdam follow torch's sparse algorithm: the
gradient is coalesced (duplicate indices summed) and the state and the parameter change at its indices only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.fused import float32_counts
from ..core.hypers import Hyper, non_negative, positive, unit_interval_closed
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from .adam import BETAS

__all__ = ["Adadelta", "Adagrad", "ScaleByAdadelta", "ScaleByAdagrad", "ScaleBySparseAdam", "SparseAdam"]


def _like(grad: Tensor, values: Tensor) -> Tensor:
    """A sparse tensor with the (coalesced) gradient's indices and new values."""
    return torch.sparse_coo_tensor(grad._indices(), values, grad.size())


def _filled(value: float) -> BufferInit:
    def init(param: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.full_like(param, value, dtype=dtype, memory_format=torch.preserve_format)

    return init


class ScaleByAdagrad(Transform):
    """Adagrad's accumulated squares and lr decay (see the module docstring). State: ``sum`` (torch's name)."""

    elementwise = True
    sparse_gradients = "accepted"
    hypers = (
        Hyper("lr_decay", 0.0, non_negative, "eta: the step is divided by 1 + (t - 1) eta"),
        Hyper("initial_accumulator_value", 0.0, non_negative, "initial value of the sum of squares"),
        Hyper("eps", 1e-10, non_negative, "term added to the denominator"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"sum": _filled(float(group["initial_accumulator_value"]))}

    def fused_kernel(self, group: dict[str, Any]) -> Any:
        # torch's kernel: coupled weight decay (dense gradients; the core steps sparse ones apart).
        return _fused_adagrad if group["weight_decay_mode"] == "coupled" else None

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops, eps = ctx.ops, ctx.hyper("eps")
        decay = 1.0 / (1.0 + (ctx.steps - 1.0) * ctx.hyper("lr_decay"))
        sums = ctx.buffer("sum")
        if updates and updates[0].is_sparse:
            return [self._sparse(g, s, eps, c) for g, s, c in zip(updates, sums, ctx.per_param(decay))]
        ops.addcmul_(sums, updates, updates, 1.0)
        std = ops.sqrt(sums)  # fresh: shifted in place
        ops.add_(std, eps)
        return ops.quotient(updates, std, 1.0 if ctx.hyper("lr_decay") == 0 else ctx.per_param(decay))

    @staticmethod
    def _sparse(grad: Tensor, state_sum: Tensor, eps: float, decay: Any) -> Tensor:
        # torch.optim.Adagrad's sparse path: the update is nonlinear in g, so duplicate indices are summed first.
        grad = grad.coalesce()
        values = grad._values()
        state_sum.add_(_like(grad, values.pow(2)))
        std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
        return _like(grad, values / std_values * decay)


def _fused_adagrad(group: dict[str, Any], params: TensorList, grads: TensorList, states: list[dict[str, Any]]) -> None:
    """One step of ``torch.optim.Adagrad(fused=True)``: the same kernel on the same buffers."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    torch._fused_adagrad_(
        params,
        grads,
        [s["sum"] for s in states],
        float32_counts(steps),
        lr=group["lr"],
        lr_decay=group["lr_decay"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


class ScaleByAdadelta(Transform):
    """Adadelta's two running averages (see the module docstring). State: ``square_avg``, ``acc_delta``."""

    elementwise = True
    hypers = (
        Hyper("rho", 0.9, unit_interval_closed, "decay rate of the running averages"),
        Hyper("eps", 1e-6, non_negative, "term added inside both square roots"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"square_avg": zeros, "acc_delta": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        rho, eps = ctx.hyper("rho"), ctx.hyper("eps")
        square_avg, acc_delta = ctx.buffer("square_avg"), ctx.buffer("acc_delta")
        ops.mul_(square_avg, rho)
        ops.addcmul_(square_avg, updates, updates, 1 - rho)
        std = ops.sqrt(ops.add(square_avg, eps))
        delta = ops.sqrt(ops.add(acc_delta, eps))
        ops.div_(delta, std)
        ops.mul_(delta, updates)
        ops.mul_(acc_delta, rho)
        ops.addcmul_(acc_delta, delta, delta, 1 - rho)
        return delta


class ScaleBySparseAdam(Transform):
    """Adam on the elements a sparse gradient holds, as ``torch.optim.SparseAdam`` (see the module docstring).

    State: ``exp_avg``, ``exp_avg_sq`` (torch's names). Dense gradients are refused by the core.
    """

    elementwise = True
    sparse_gradients = "required"
    hypers = (BETAS, Hyper("eps", 1e-8, positive, "term added to the denominator"))

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        beta1, beta2 = ctx.hyper("betas")
        scale = ctx.per_param(torch.sqrt(ctx.bias_correction(beta2)) / ctx.bias_correction(beta1))
        out = []
        for grad, exp_avg, exp_avg_sq, s in zip(updates, ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq"), scale):
            grad = grad.coalesce()
            values = grad._values()
            if values.numel() == 0:
                out.append(grad)
                continue
            # Only the held elements decay: m += (1 - b1)(g - m) there, and likewise v; written as torch writes it.
            old_avg = exp_avg.sparse_mask(grad)._values()
            avg_update = values.sub(old_avg).mul_(1 - beta1)
            exp_avg.add_(_like(grad, avg_update))
            old_sq = exp_avg_sq.sparse_mask(grad)._values()
            sq_update = values.pow(2).sub_(old_sq).mul_(1 - beta2)
            exp_avg_sq.add_(_like(grad, sq_update))
            numer = avg_update.add_(old_avg)
            denom = sq_update.add_(old_sq).sqrt_().add_(ctx.hyper("eps"))
            out.append(_like(grad, numer.div_(denom).mul_(s)))
        return out


class Adagrad(ChainedOptimizer):
    r"""Adagrad, a drop-in for ``torch.optim.Adagrad`` (lr 1e-2, eps 1e-10), sparse gradients included.

    .. math::
        s_t = s_{t-1} + g_t^2, \qquad p \leftarrow p - \frac{lr}{1 + (t-1)\eta}\, \frac{g_t}{\sqrt{s_t} + \epsilon}

    Duchi, Hazan & Singer, 2011. Adaptive Subgradient Methods for Online Learning and Stochastic Optimization. JMLR 12.

    .. warning::
        Differences from torch.optim.Adagrad: state is created at the first step, not in the constructor, and from
        the group's own ``initial_accumulator_value`` (torch fills every group's ``sum`` from the constructor's value).
        No ``differentiable`` argument; ``fused`` as torch's (dense gradients take torch's fused kernel by
        default). With sparse gradients, coupled ``weight_decay`` (as torch), and also ``clip_step`` and
        ``nonfinite='zero'``, raise ``RuntimeError``.

    Example::

        >>> import torch, gradstep
        >>> emb = torch.nn.Embedding(10, 3, sparse=True)
        >>> opt = gradstep.Adagrad(emb.parameters(), lr=0.1, initial_accumulator_value=0.1)
        >>> emb(torch.tensor([1, 1, 4])).sum().backward(); _ = opt.step()
        >>> int((opt.state[emb.weight]["sum"] != 0.1).any(dim=1).sum())  # only rows 1 and 4 accumulated
        2
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByAdagrad()],
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            foreach=foreach,
            maximize=maximize,
            **options,
        )


class Adadelta(ChainedOptimizer):
    r"""Adadelta, a drop-in for ``torch.optim.Adadelta`` (lr 1.0, rho 0.9, eps 1e-6).

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad d_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t,
        \quad u_t = \rho u_{t-1} + (1-\rho) d_t^2, \quad p \leftarrow p - lr\, d_t

    Zeiler, 2012. ADADELTA: An Adaptive Learning Rate Method. arXiv:1212.5701.

    .. warning::
        Differences from torch.optim.Adadelta: no ``capturable`` or ``differentiable`` arguments.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByAdadelta()],
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            **options,
        )


class SparseAdam(ChainedOptimizer):
    r"""SparseAdam, a drop-in for ``torch.optim.SparseAdam``: Adam on the elements a sparse gradient holds.

    .. math::
        m \leftarrow m + (1-\beta_1)(g - m), \quad v \leftarrow v + (1-\beta_2)(g^2 - v) \quad
        \text{at the gradient's indices only}, \qquad
        p \leftarrow p - lr\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, \frac{m}{\sqrt v + \epsilon}

    A dense gradient raises ``RuntimeError`` naming the parameter (use :class:`~gradstep.Adam`). Kingma & Ba (2015).

    .. warning::
        Differences from torch.optim.SparseAdam: ``step`` is a 0-d tensor (torch keeps a Python int), ``lr=0`` is
        accepted (torch wants lr > 0). ``weight_decay`` (torch's SparseAdam has none, default 0) is decoupled, as
        AdamW's: it decays the whole parameter at every step, rows without a gradient included. The core options
        work except coupled weight decay, ``clip_step`` and ``nonfinite='zero'``, which need dense gradients.

    Example::

        >>> import torch, gradstep
        >>> emb = torch.nn.Embedding(10, 3, sparse=True)
        >>> opt = gradstep.SparseAdam(emb.parameters(), lr=1e-2)
        >>> emb(torch.tensor([2, 7])).sum().backward(); _ = opt.step()
        >>> int((opt.state[emb.weight]["exp_avg"] != 0).any(dim=1).sum())
        2
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")  # coupled decay would make the gradient dense
        super().__init__(params, [ScaleBySparseAdam()], lr=lr, betas=betas, eps=eps, maximize=maximize, **options)

    def _supports_complex(self) -> bool:
        return False  # as torch.optim.SparseAdam

    def _check_param(self, p: Tensor) -> None:
        # torch.optim.SparseAdam's construction-time refusals, with its messages.
        if p.is_sparse:
            raise ValueError("SparseAdam requires dense parameter tensors (the gradients are the sparse ones)")
        if p.is_complex():
            raise ValueError("SparseAdam does not support complex parameters")
        super()._check_param(p)


register(
    Entry(
        "adagrad",
        Adagrad,
        "Adagrad: steps scaled by the root of the accumulated squared gradients; sparse gradients as torch",
        "Duchi, Hazan & Singer, 2011. Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
        ("torch.optim.Adagrad",),
        example={"lr": 5e-2, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-8},
        invalid=(({"lr_decay": -0.1}, "lr_decay"), ({"initial_accumulator_value": -1.0}, "initial_accumulator_value")),
    )
)
register(
    Entry(
        "adadelta",
        Adadelta,
        "Adadelta: unit-corrected steps from running averages of squared gradients and squared steps",
        "Zeiler, 2012. ADADELTA: An Adaptive Learning Rate Method. arXiv:1212.5701",
        ("torch.optim.Adadelta",),
        example={"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.01},
        invalid=(({"rho": 1.5}, "rho"), ({"eps": -1e-6}, "eps"), ({"lr": -1.0}, "lr")),
    )
)
register(
    Entry(
        "sparseadam",
        SparseAdam,
        "Adam on the elements a sparse gradient holds (embedding tables); dense gradients are refused",
        "Kingma & Ba, 2015. Adam: A Method for Stochastic Optimization. arXiv:1412.6980",
        ("torch.optim.SparseAdam",),
        example={"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6},
        invalid=(({"eps": 0.0}, "eps"), ({"betas": (0.9, 1.0)}, "betas"), ({"lr": -1.0}, "lr")),
    )
)

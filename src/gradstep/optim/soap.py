r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024, arXiv:2409.11321).

Per parameter :math:`W` with gradient :math:`G`, each dimension :math:`i` of size at most ``max_precondition_dim``
keeps a Kronecker factor :math:`L_i` (Shampoo's statistics) and an orthogonal basis :math:`Q_i` of it.
:math:`\mathcal{P}(X)` rotates every such dimension of :math:`X` into its basis (:math:`X \times_i Q_i^\top`),
:math:`\mathcal{P}^{-1}` rotates back; dimensions above ``max_precondition_dim`` are left as they are. At step
:math:`t > 1` (the first step only gathers statistics):

.. math::
    G' = \mathcal{P}(G),\quad M_t = \beta_1 M_{t-1} + (1-\beta_1) G,\quad
    V_t = \beta_2 V_{t-1} + (1-\beta_2)\, G' \odot G',

.. math::
    N = \mathcal{P}^{-1}\!\big(\mathcal{P}(M_t) / (\sqrt{V_t} + \epsilon)\big),\qquad
    W \leftarrow \big(W - \text{lr}\,\tfrac{\sqrt{1-\beta_2^{t-1}}}{1-\beta_1^{t-1}}\, N\big)(1 - \text{lr}\,\lambda),

then, every step, :math:`L_i \leftarrow \beta_s L_i + (1-\beta_s)\, G_{(i)} G_{(i)}^\top` (:math:`G_{(i)}`: dimension
:math:`i` against all others) and, every ``precondition_frequency`` steps, one power iteration
:math:`Q_i \leftarrow \mathrm{QR}(L_i Q_i)` with the columns sorted by the estimated eigenvalues
:math:`\mathrm{diag}(Q_i^\top L_i Q_i)` (:math:`V` permuted alike). The first bases come from ``eigh``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import kronecker
from ..core.hypers import Hyper, beta_pair, boolean, non_negative, one_of
from ..core.ops import PER_TENSOR, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import whole_tensors
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_mul, zeros

__all__ = ["SOAP", "ScaleBySoap"]


def _positive_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "must be an int > 0"


def _optional_beta(value: Any) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    return None if ok else "must be None (betas[1]) or a number in [0, 1)"


def _merge_from_the_front(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """pytorch_optimizer's ``merge_small_dims``: neighbours multiplied from the first dim on while the product stays
    at most ``max_dim``. A tensor that merges into one dim keeps it whole (pytorch_optimizer: ``[1]``, which fails).
    (Distributed Shampoo's rule, :func:`gradstep.core.kronecker.merge_small_dims`, merges from the last dim.)"""
    merged, product = [], 1
    for size in shape:
        product *= size
        if product > max_dim:
            merged.append(product // size)
            product = size
    merged.append(product)
    return tuple(merged) if len(merged) > 1 else (math.prod(shape),)


@dataclass(frozen=True)
class _Layout:
    """A parameter as SOAP's factors see it: one block (never split), dims above the maximum without a factor."""

    shape: tuple[int, ...]
    channels_last: bool  # a 4-D NHWC tensor, read as NCHW before its dims are merged
    block: kronecker.BlockLayout

    @property
    def flags(self) -> tuple[bool, ...]:
        return self.block.preconditioned[0]

    def view(self, x: Tensor) -> Tensor:
        return (x.permute(0, 3, 1, 2) if self.channels_last else x).reshape(self.block.merged)

    def unview(self, x: Tensor) -> Tensor:
        if self.channels_last:
            n, h, w, c = self.shape
            return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return x.reshape(self.shape)

    def factors(self, packed: Tensor) -> list[Tensor]:
        return self.block.factor_views(packed)[0]


@functools.lru_cache(maxsize=4096)
def _soap_layout(
    shape: tuple[int, ...], max_dim: int, merge_dims: bool, precondition_1d: bool, channels_last: bool
) -> _Layout:
    # As pytorch_optimizer: a vector has a factor only with precondition_1d and is never merged; a scalar has none
    # unless merge_dims reads it as (1,); other tensors have one per dim of size at most max_dim.
    limit = max_dim
    dims = shape
    permute = False
    if len(shape) == 1:
        limit = max_dim if precondition_1d else 0
    elif not shape and not merge_dims:
        limit = 0
    elif merge_dims:
        permute = channels_last and len(shape) == 4
        dims = _merge_from_the_front((shape[0], shape[3], shape[1], shape[2]) if permute else shape, max_dim)
    block = kronecker.block_layout(dims, max_dim, merge=False, split=False, limit=limit)
    return _Layout(shape, permute, block)


def _layout(shape: torch.Size | tuple[int, ...], group: dict[str, Any]) -> _Layout:
    channels_last = group["data_format"] == "channels_last"
    return _soap_layout(
        tuple(shape), group["max_precondition_dim"], group["merge_dims"], group["precondition_1d"], channels_last
    )


class ScaleBySoap(Transform):
    r"""Adam's moments in the eigenbasis of Kronecker factors, the factors and their bases (SOAP's update).

    State: ``exp_avg`` (:math:`M`, shaped like the parameter), ``exp_avg_sq`` (:math:`V`, in the eigenbasis, shaped
    like the parameter), ``GG`` (the factors :math:`L_i`) and ``Q`` (their bases :math:`Q_i`), each one flat tensor
    holding the :math:`d_i \times d_i` matrices of the preconditioned dims in dim order
    (:meth:`~gradstep.core.kronecker.BlockLayout.factor_views`). The direction returned holds the bias correction
    and, with ``weight_decay_mode="decoupled_after_step"``, the weight decay, so that the core's
    :math:`p \leftarrow p - \text{lr}\, d` writes :math:`(p - \text{lr}\, s N)(1 - \text{lr}\,\lambda)`.
    """

    hypers = (
        Hyper("betas", (0.95, 0.95), beta_pair, "decay rates of the first and second moments", scalar=False),
        Hyper("shampoo_beta", None, _optional_beta, "decay rate of the Kronecker factors (None: betas[1])"),
        Hyper("eps", 1e-8, non_negative, "added to the root of the second moment"),
        Hyper("precondition_frequency", 10, _positive_int, "steps between two refreshes of the eigenbases"),
        Hyper("max_precondition_dim", 10000, _positive_int, "dims larger than this have no factor"),
        Hyper("merge_dims", False, boolean, "merge neighbouring dims while their product is at most the maximum"),
        Hyper("precondition_1d", False, boolean, "give vectors a factor too (n x n)"),
        Hyper("correct_bias", True, boolean, "Adam's bias correction of the step size"),
        Hyper("normalize_gradient", False, boolean, "divide the update by its root mean square (+ eps)"),
        Hyper(
            "data_format",
            "channels_first",
            one_of("channels_first", "channels_last"),
            "layout of 4-D tensors whose dims merge_dims merges (channels_last: NHWC, read as NCHW)",
        ),
        Hyper(
            "weight_decay_mode",
            "decoupled_after_step",
            one_of("decoupled_after_step", "decoupled", "coupled", "proximal"),
            "decoupled_after_step: p <- (p - lr*step)(1 - lr*wd), the authors' order; or one of the core's modes",
        ),
    )

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        return True  # same-layout parameters are batched: the group is not cut into chunks

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        def factors(param: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros(_layout(param.shape, group).block.factor_numel, dtype=dtype, device=param.device)

        return {"exp_avg": zeros, "exp_avg_sq": zeros, "GG": factors, "Q": factors}

    @torch.compiler.disable  # eigendecompositions and branches on the step count: eager, as the reference
    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = (float(b) for b in ctx.hyper("betas"))
        # Under FSDP2 every rank gathers the whole gradient and moments, computes the whole step, keeps its rows.
        grads, local_parts = whole_tensors(updates)
        sharded = local_parts is not list
        exp_avg = whole_tensors(ctx.buffer("exp_avg"))[0] if sharded else ctx.buffer("exp_avg")
        exp_avg_sq = whole_tensors(ctx.buffer("exp_avg_sq"))[0] if sharded else ctx.buffer("exp_avg_sq")
        layouts = [_layout(g.shape, ctx.group) for g in grads]
        for state, layout, whole in zip(ctx.states, layouts, grads):
            if state["GG"].numel() != layout.block.factor_numel:
                # Created from a local shard (FSDP2): the factors are those of the whole tensor, on every rank.
                state["GG"] = torch.zeros(layout.block.factor_numel, dtype=whole.dtype, device=whole.device)
                state["Q"] = torch.zeros_like(state["GG"])
        factors = [lay.factors(s["GG"]) for lay, s in zip(layouts, ctx.states)]
        bases = [lay.factors(s["Q"]) for lay, s in zip(layouts, ctx.states)]
        batched = ops is not PER_TENSOR
        counts = [int(c) for c in ctx.steps.tolist()]  # the first step and the refreshes are decided by the count
        first = [i for i, c in enumerate(counts) if c == 1]
        later = [i for i, c in enumerate(counts) if c > 1]
        steps: list[Tensor] = [torch.zeros_like(g) for g in grads]  # the first step only gathers statistics

        if later:
            lay = [layouts[i] for i in later]
            g, m, v = ([xs[i] for i in later] for xs in (grads, exp_avg, exp_avg_sq))
            q = [bases[i] for i in later]
            rotated = _rotate(g, q, lay, back=False, batched=batched)
            ops.lerp_(m, g, 1 - beta1)
            ops.lerp_(v, ops.mul(rotated, rotated), 1 - beta2)
            denom = ops.add(ops.sqrt(v), ctx.hyper("eps"))
            step = _rotate(ops.div(_rotate(m, q, lay, back=False, batched=batched), denom), q, lay, True, batched)
            if ctx.hyper("normalize_gradient"):
                rms = [s.square().mean().sqrt() + ctx.hyper("eps") for s in step]
                step = ops.div(step, rms)
            for i, s in zip(later, ops.mul(step, _bias_correction(ctx, later, beta1, beta2))):
                steps[i] = s
        out = local_parts(steps) if sharded else steps
        if later and ctx.hyper("weight_decay_mode") == "decoupled_after_step":
            for i, s in zip(later, _decay_after_step(ctx, later, [out[i] for i in later])):
                out[i] = s

        shampoo_beta = ctx.hyper("shampoo_beta")
        live = [i for i, (x, lay) in enumerate(zip(grads, layouts)) if x.numel() and any(lay.flags)]
        statistics = kronecker.kronecker_statistics(
            [layouts[i].view(grads[i]) for i in live], [layouts[i].flags for i in live], batched
        )
        shampoo_beta = beta2 if shampoo_beta is None else float(shampoo_beta)
        kronecker.accumulate_([f for i in live for f in factors[i]], [s for ss in statistics for s in ss], shampoo_beta)
        if first:
            matrices = [f for i in first for f in factors[i]]
            _, vectors = kronecker.eigenbases(matrices, epsilon=1e-30, batched=batched)  # the authors' 1e-30
            # Decreasing eigenvalues, as the refresh sorts them.
            targets = [b for i in first for b in bases[i]]
            if targets:
                torch._foreach_copy_(targets, [torch.flip(x, dims=[-1]) for x in vectors])
        frequency = ctx.hyper("precondition_frequency")
        due = [i for i in later if (counts[i] - 1) % frequency == 0 and factors[i]]
        if due:
            _refresh(due, factors, bases, exp_avg_sq, layouts, batched)
        if sharded:
            ops.copy_(ctx.buffer("exp_avg"), local_parts(exp_avg))
            ops.copy_(ctx.buffer("exp_avg_sq"), local_parts(exp_avg_sq))
        return out


def _rotate(
    xs: list[Tensor], bases: list[list[Tensor]], layouts: list[_Layout], back: bool, batched: bool
) -> list[Tensor]:
    """Each tensor into its eigenbases (``X x_i Q_i^T``), or ``back`` (``X x_i Q_i``); empty ones as they are."""
    keep = [i for i, x in enumerate(xs) if x.numel() and any(layouts[i].flags)]
    rotated = kronecker.apply_along_dims(
        [layouts[i].view(xs[i]) for i in keep],
        [bases[i] for i in keep],
        [layouts[i].flags for i in keep],
        transpose=back,
        batched=batched,
    )
    out = list(xs)
    for i, r in zip(keep, rotated):
        out[i] = layouts[i].unview(r)
    return out


def _refresh(
    due: list[int],
    factors: list[list[Tensor]],
    bases: list[list[Tensor]],
    exp_avg_sq: list[Tensor],
    layouts: list[_Layout],
    batched: bool,
) -> None:
    """The QR power-iteration refresh of the bases; ``exp_avg_sq`` (in the eigenbasis) follows their new order."""
    new, orders = kronecker.qr_power_iteration(
        [f for i in due for f in factors[i]], [b for i in due for b in bases[i]], batched=batched
    )
    torch._foreach_copy_([b for i in due for b in bases[i]], new)
    k = 0
    for i in due:
        v = layouts[i].view(exp_avg_sq[i])
        for dim, on in enumerate(layouts[i].flags):
            if on:
                v = v.index_select(dim, orders[k])
                k += 1
        exp_avg_sq[i].copy_(layouts[i].unview(v))


def _bias_correction(ctx: GroupStep, indices: list[int], beta1: float, beta2: float) -> list[Any]:
    """Adam's step-size correction at the moments' own count, one less than the step (the first step has none)."""
    if not ctx.hyper("correct_bias"):
        return [1.0] * len(indices)
    counts = ctx.steps[indices] - 1
    power = lambda b: torch.pow(torch.tensor(b, dtype=torch.float64, device=counts.device), counts)  # noqa: E731
    return ctx.per_param(torch.sqrt(1 - power(beta2)) / (1 - power(beta1)))


def _decay_after_step(ctx: GroupStep, indices: list[int], step: TensorList) -> TensorList:
    """``step * (1 - lr*wd) + wd * p``: the core's ``p - lr * d`` is then ``(p - lr * step)(1 - lr * wd)``."""
    wd = ctx.param_hyper("weight_decay")
    if not isinstance(wd, list) and ctx.is_zero("weight_decay"):
        return step
    lr: Any = coef_mul(ctx.param_hyper("lr"), ctx.param_hyper("lr_scale"))
    lrs: list[Any] = [lr[i] for i in indices] if isinstance(lr, (list, tuple)) else [lr] * len(indices)
    wds: list[Any] = [wd[i] for i in indices] if isinstance(wd, list) else [wd] * len(indices)
    keep: list[Any] = [1 - a * b for a, b in zip(lrs, wds)]
    params = [ctx.params[i] for i in indices]
    return ctx.ops.add(ctx.ops.mul(step, keep), ctx.ops.mul(params, wds))


class SOAP(ChainedOptimizer):
    r"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors (pytorch_optimizer 4.1.0's port).

    .. math::
        N = \mathcal{P}^{-1}\!\Big(\frac{\mathcal{P}(M_t)}{\sqrt{V_t} + \epsilon}\Big),\quad
        V_t = \beta_2 V_{t-1} + (1-\beta_2)\,\mathcal{P}(G)^{2},\quad
        W \leftarrow \Big(W - \text{lr}\,\frac{\sqrt{1-\beta_2^{t-1}}}{1-\beta_1^{t-1}} N\Big)(1-\text{lr}\,\lambda)

    where :math:`M_t` is the EMA of the gradient, :math:`\mathcal{P}` rotates each dimension (of size at most
    ``max_precondition_dim``) into the eigenbasis :math:`Q_i` of its Kronecker factor
    :math:`L_i = \mathrm{EMA}_{\beta_s}(G_{(i)} G_{(i)}^\top)`, refreshed by one QR power iteration every
    ``precondition_frequency`` steps (``eigh`` at the first step, which only gathers statistics); see
    :mod:`gradstep.optim.soap`. Vectors and scalars are Adam (AdamW) unless ``precondition_1d``.

    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, 2024. SOAP: Improving and Stabilizing
    Shampoo using Adam. arXiv:2409.11321.

    .. warning::
        Differences from pytorch_optimizer ``SOAP`` (4.1.0):

        * ``GG`` and ``Q`` hold each parameter's factors and bases flattened into one vector (pytorch_optimizer:
          lists of matrices, ``[]`` for a dimension without one), so that a checkpoint is a dict of tensors.
        * The QR of the eigenbasis refresh runs in the state's dtype (float32 for half precision);
          pytorch_optimizer casts to float32, which also rounds float64 state to float32.
        * ``merge_dims=True``: a tensor whose dimensions merge into one keeps it whole (pytorch_optimizer reshapes
          it to ``[1]`` and fails, e.g. for any matrix of at most ``max_precondition_dim`` elements); vectors are not
          merged (pytorch_optimizer fails on those up to ``max_precondition_dim``).
        * The step count is per parameter (pytorch_optimizer: per group, so a parameter that first gets a gradient
          later skips no step there); ``shampoo_beta``, ``precondition_frequency`` are read from the group at every
          step (pytorch_optimizer: fixed in the state at the first step).
        * Same-layout parameters are batched (``bmm``, batched ``eigh``/``qr``), and the bias correction and weight
          decay are folded into the direction the core writes: the same math, rounded differently. Ties between
          estimated eigenvalues keep their order (``stable`` sort). ``weight_decay_mode`` also offers the core's
          modes (the default is the authors' decay after the step).
        * Under FSDP2 every rank gathers the gradient and both moments of a sharded parameter and computes the
          whole step (three all-gathers of the parameter per step); ``GG`` and ``Q`` are whole on every rank.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = gradstep.SOAP([w], lr=0.01)
        >>> for _ in range(2):
        ...     w.grad = torch.arange(6.0).reshape(3, 2); _ = opt.step()
        >>> opt.state[w]["GG"].shape, opt.state[w]["Q"].shape  # a 3x3 and a 2x2 factor
        (torch.Size([13]), torch.Size([13]))
        >>> bool((w.grad * (w - 1)).sum() < 0)  # a descent step
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        weight_decay: float = 1e-2,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
        normalize_gradient: bool = False,
        data_format: str = "channels_first",
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleBySoap()],
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precondition_dim=max_precondition_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            correct_bias=correct_bias,
            normalize_gradient=normalize_gradient,
            data_format=data_format,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "soap",
        SOAP,
        "Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed by QR power iteration",
        "Vyas et al., 2024. SOAP: Improving and Stabilizing Shampoo using Adam. arXiv:2409.11321",
        ("pytorch_optimizer SOAP",),
        example={
            "lr": 1e-2,
            "betas": (0.9, 0.95),
            "shampoo_beta": 0.9,
            "weight_decay": 0.05,
            "precondition_frequency": 2,
            "max_precondition_dim": 4,
            "precondition_1d": True,
        },
        invalid=(
            ({"precondition_frequency": 0}, "precondition_frequency"),
            ({"max_precondition_dim": 0}, "max_precondition_dim"),
            ({"shampoo_beta": 1.0}, "shampoo_beta"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"data_format": "nhwc"}, "data_format"),
        ),
        sharding="whole-matrix",
    )
)

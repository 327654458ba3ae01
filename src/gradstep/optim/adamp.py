r"""AdamP: Adam whose step loses its radial component on scale-invariant weights.

Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights" (ICLR),
arXiv:2006.08217. With Adam's moments :math:`m_t, v_t` (as in :class:`~gradstep.optim.adam.Adam`, ``amsgrad``
included), the direction before the projection is

.. math::
    q_t = \frac{m_t}{(1-\beta_1^t)\, D_t}
    \qquad\text{or, with nesterov,}\qquad
    q_t = \frac{\beta_1 m_t + (1-\beta_1) g_t}{(1-\beta_1^t)\, D_t},
    \qquad D_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon .

For a tensor :math:`p` with ``ndim > 1`` (every non-empty tensor with ``project_all``), with
:math:`\cos(x, y) = \langle x, y\rangle / (\max(\lVert x\rVert, \epsilon) \max(\lVert y\rVert, \epsilon))`
(so a zero weight or a zero gradient has cosine 0):

1. channel-wise (``channel_wise``, ``ndim > 1`` only): if :math:`\max_i |\cos(g_i, p_i)| < \delta /
   \sqrt{\mathrm{numel}(p_i)}` over the rows :math:`p_i = p[i]`, then :math:`q_i \leftarrow q_i - \langle n_i,
   q_i\rangle n_i` for every row, with :math:`n_i = p_i / (\lVert p_i\rVert + \epsilon)`;
2. otherwise layer-wise: if :math:`|\cos(g, p)| < \delta / \sqrt{\mathrm{numel}(p)}`, the same with the whole tensor;
3. weight decay (``weight_decay_mode="decoupled_wd_ratio"``, the default):
   :math:`p \leftarrow p\,(1 - lr\cdot wd\cdot r) - lr\cdot q_t` with :math:`r` = ``wd_ratio`` when 1. or 2. projected
   the step, else 1.

:class:`TangentProjection` is the projection alone, around any transform (the paper's SGDP applies it to momentum
SGD).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.hypers import Hyper, boolean, non_negative, one_of
from ..core.ops import TensorList, evaluate
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import row_dots, row_norms, tensor_dots, tensor_norms, tensor_numels
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_is_zero, coef_mul
from .adam import ScaleByAdam

__all__ = ["AdamP", "ScaleByAdamNesterov", "TangentProjection"]


class ScaleByAdamNesterov(ScaleByAdam):
    r"""Adam's scaling with clovaai AdamP's Nesterov option: the numerator :math:`\beta_1 m_t + (1-\beta_1) g_t`.

    Without ``nesterov`` this is :class:`~gradstep.optim.adam.ScaleByAdam` (same state: ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with ``amsgrad``).
    """

    hypers = ScaleByAdam.hypers + (  # type: ignore[assignment]
        Hyper("nesterov", False, boolean, "numerator beta1*m + (1-beta1)*g instead of m (clovaai AdamP)"),
    )

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        adam = evaluate(super().update(ctx, updates))
        if not ctx.hyper("nesterov"):
            return adam
        # The denominator is linear in the numerator: beta1 * (Adam's direction) + (1 - beta1) * (g scaled the same).
        beta1, beta2 = ctx.hyper("betas")
        ops, eps = ctx.ops, ctx.hyper("eps")
        second = ctx.buffer("max_exp_avg_sq" if ctx.hyper("amsgrad") else "exp_avg_sq")
        bc1 = ctx.bias_correction(beta1)
        sqrt_bc2 = torch.sqrt(ctx.bias_correction(beta2))
        if ctx.hyper("eps_mode") == "torch":
            denom = ops.add(ops.div(ops.sqrt(second), ctx.per_param(sqrt_bc2)), eps)
            scaled_g = ops.div(ops.div(updates, denom), ctx.per_param(bc1))
        else:
            scaled_g = ops.mul(ops.div(updates, ops.add(ops.sqrt(second), eps)), ctx.per_param(sqrt_bc2 / bc1))
        out = ops.mul(adam, beta1)
        ops.add_scaled_(out, scaled_g, 1 - beta1)
        return out


def _abs_cosines(dots: Any, norms_x: Any, norms_y: Any, eps: float) -> Any:
    """``|<x, y>| / (max(|x|, eps) * max(|y|, eps))`` (torch's ``cosine_similarity`` rule: zero vectors give 0).

    Works on per-tensor vectors and on lists of per-row tensors alike.
    """
    if isinstance(dots, torch.Tensor):
        return dots.abs() / (norms_x.clamp_min(eps) * norms_y.clamp_min(eps))
    denom = torch._foreach_mul(torch._foreach_clamp_min(norms_x, eps), torch._foreach_clamp_min(norms_y, eps))
    return list(torch._foreach_div(torch._foreach_abs(dots), denom))


class TangentProjection(Transform):
    """Remove the radial component of ``inner``'s direction where gradient and weight are nearly orthogonal (AdamP).

    The cosine test reads the direction this transform receives (the gradient, after coupled weight decay when
    ``weight_decay_mode="coupled"``), the projection acts on ``inner``'s output; see the module docstring for the
    math. Weight decay mode ``"decoupled_wd_ratio"`` (declared here) is decoupled decay multiplied by ``wd_ratio``
    for the parameters whose step was projected; it is added to the direction, so that the core's
    ``p <- p - lr * d`` applies it.
    """

    own_hypers = (
        Hyper("delta", 0.1, non_negative, "cosine threshold: project when |cos| < delta / sqrt(dimension)"),
        Hyper("wd_ratio", 0.1, non_negative, "weight decay multiplier for projected parameters (decoupled_wd_ratio)"),
        Hyper("channel_wise", True, boolean, "test each output channel (row) first, then the whole tensor (clovaai)"),
        Hyper("project_all", False, boolean, "also project 1-D and 0-D tensors (holocron); clovaai: ndim > 1 only"),
        Hyper("eps", 1e-8, non_negative, "floor of the norms in the cosine, added to the norm of the weight"),
        Hyper(
            "weight_decay_mode",
            "decoupled_wd_ratio",
            one_of("decoupled_wd_ratio", "decoupled", "coupled", "proximal"),
            "decoupled_wd_ratio: p*(1 - lr*wd*r), r = wd_ratio if projected else 1 (clovaai); else the core's modes",
        ),
    )

    def __init__(self, inner: Transform) -> None:
        self.inner = inner
        names = {h.name for h in inner.hypers}
        # The inner transform's hyperparameters first, so that a shared one (eps) keeps the inner default.
        self.hypers = inner.hypers + tuple(h for h in self.own_hypers if h.name not in names)  # type: ignore[misc]

    def check_group(self, group: dict[str, Any]) -> None:
        self.inner.check_group(group)

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return self.inner.buffers(group)

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        self.inner.after_step(ctx, params)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        direction = evaluate(self.inner.update(ctx, updates))
        ops, params = ctx.ops, ctx.params
        eps, delta = ctx.hyper("eps"), ctx.hyper("delta")
        projected = torch.zeros(len(ctx), dtype=torch.bool, device=ctx.steps.device)
        out = list(direction)
        # Which tensors are tested, and how, depends on ndims only (never on values, nor on sizes: a rank's shard of a
        # sharded tensor may be empty where the tensor is not, and every rank must take part in the same reductions).
        # An empty tensor is harmless here: its cosine is 0 and its projection empty.
        tested = [i for i, p in enumerate(params) if p.dim() > 1 or ctx.hyper("project_all")]
        if tested:
            g, p, d = ([xs[i] for i in tested] for xs in (updates, params, direction))
            hit, new = _project_layer(ops, g, p, d, eps, delta)
            rows = [k for k, x in enumerate(p) if x.dim() > 1] if ctx.hyper("channel_wise") else []
            if rows:
                # The channel-wise test comes first: where it projects, the layer-wise result is not used.
                row_hit, row_new = _project_rows(
                    ops, [g[k] for k in rows], [p[k] for k in rows], [d[k] for k in rows], eps, delta
                )
                chosen = ops.where(list(row_hit.unbind(0)), row_new, [new[k] for k in rows])
                for k, x in zip(rows, chosen):
                    new[k] = x
                hit[rows] |= row_hit
            for k, i in enumerate(tested):
                out[i] = new[k]
            projected[tested] = hit

        wd = ctx.param_hyper("weight_decay")
        if ctx.hyper("weight_decay_mode") == "decoupled_wd_ratio" and not coef_is_zero(wd):
            ratio = 1.0 + projected.to(torch.float64) * (ctx.hyper("wd_ratio") - 1.0)
            out = ops.add(out, ops.mul(params, coef_mul(wd, ctx.per_param(ratio))))
        return out

    def __repr__(self) -> str:
        return f"TangentProjection({self.inner!r})"


def _project_layer(
    ops: Any, g: TensorList, p: TensorList, d: TensorList, eps: float, delta: float
) -> tuple[torch.Tensor, TensorList]:
    """Layer-wise test and projection: (which tensors pass the test, ``d`` projected where they do)."""
    cos = _abs_cosines(tensor_dots(g, p), tensor_norms(g), tensor_norms(p), eps)
    limit = delta / torch.sqrt(tensor_numels(p).to(device=cos.device, dtype=cos.dtype))
    unit = ops.div(p, list((tensor_norms(p) + eps).unbind(0)))
    projected = ops.sub(d, ops.mul(unit, list(tensor_dots(unit, d).unbind(0))))
    hit = cos < limit
    return hit, ops.where(list(hit.unbind(0)), projected, d)


def _project_rows(
    ops: Any, g: TensorList, p: TensorList, d: TensorList, eps: float, delta: float
) -> tuple[torch.Tensor, TensorList]:
    """Channel-wise test (every row below the threshold) and per-row projection of ``d``, for tensors of ndim > 1."""
    cos = _abs_cosines(row_dots(g, p), row_norms(g), row_norms(p), eps)
    largest = tensor_norms(cos, math.inf)  # the cosines are absolute values: their max is the inf-norm
    # The row length from the shape (x[0] does not exist in an empty shard); rows of length 0 are never tested out.
    sizes = [math.prod(x.shape[1:]) for x in p]
    limits = [delta / math.sqrt(n) if n else math.inf for n in sizes]
    limit = torch.tensor(limits, dtype=largest.dtype, device=largest.device)
    unit = ops.div(p, ops.add(row_norms(p), eps))
    return largest < limit, ops.sub(d, ops.mul(unit, row_dots(unit, d)))


class AdamP(ChainedOptimizer):
    """AdamP, a drop-in for clovaai's ``adamp.AdamP`` (same positional arguments); holocron's is a recipe (below).

    Example::

        >>> import torch, gradstep
        >>> conv = torch.nn.Conv2d(3, 4, 3)
        >>> opt = gradstep.optim.adamp.AdamP(conv.parameters(), lr=1e-2, weight_decay=1e-2, nesterov=True)
        >>> conv(torch.ones(1, 3, 5, 5)).sum().backward(); _ = opt.step()
        >>> sorted(opt.state[conv.weight])
        ['exp_avg', 'exp_avg_sq', 'step']

    holocron's ``AdamP(params, lr, betas, eps, weight_decay, amsgrad, delta)`` is
    ``AdamP(params, lr, betas, eps, weight_decay, delta, amsgrad=amsgrad, weight_decay_mode="coupled",
    channel_wise=False, project_all=True)``, except for the sign of the cosine (see below).

    .. warning::
        Differences from clovaai ``adamp.AdamP`` (0.3.0): none in the math. The cosine test reads the gradient
        after ``maximize`` and after coupled weight decay when ``weight_decay_mode="coupled"`` (clovaai has no
        coupled mode); ``amsgrad``, ``channel_wise``, ``project_all`` and the other weight-decay modes are
        additions. The decoupled decay is added to the step (``p - lr * (q + wd * r * p)``), the same numbers as
        clovaai's ``p * (1 - lr * wd * r) - lr * q`` up to rounding, and it is clipped with the step under
        ``clip_step``.

        Differences from holocron ``AdamP`` (pylocron 0.3.0): holocron tests the *signed* cosine
        (``cos < delta / sqrt(numel)``), so a gradient anti-aligned with the weight is projected and an exactly
        anti-parallel one gives a zero step; this is a bug (the paper and clovaai use ``|cos|``) and is not
        reproduced. holocron takes the cosine with a fixed eps of 1e-8 (here the group's ``eps``, which it uses for
        the projection), keeps ``delta`` on the optimizer rather than per group, has no channel-wise test, no
        ``wd_ratio`` (its decay is coupled L2) and no ``nesterov``, and projects 1-D and 0-D tensors: options here
        (``channel_wise=False``, ``weight_decay_mode="coupled"``, ``project_all=True``).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        amsgrad: bool = False,
        channel_wise: bool = True,
        project_all: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [TangentProjection(ScaleByAdamNesterov())],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            amsgrad=amsgrad,
            channel_wise=channel_wise,
            project_all=project_all,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "adamp",
        AdamP,
        "Adam without the radial step on scale-invariant weights (channel- then layer-wise), wd_ratio, nesterov",
        "Heo et al., 2021. AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights. "
        "arXiv:2006.08217",
        ("adamp.AdamP (clovaai 0.3.0)", "holocron.optim.AdamP (pylocron 0.3.0)"),
        example={
            "lr": 1e-2,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
            "weight_decay": 0.05,
            "delta": 0.3,
            "wd_ratio": 0.2,
            "nesterov": True,
            "amsgrad": True,
        },
        invalid=(
            ({"delta": -0.1}, "delta"),
            ({"wd_ratio": -1.0}, "wd_ratio"),
            ({"weight_decay_mode": "l1"}, "weight_decay_mode"),
            ({"betas": (0.9, 1.0)}, "betas"),
        ),
        sharding="per-tensor reduction",
    )
)

r"""NorMuon: Muon with a neuron-wise second moment of the orthogonalized update (Li et al., 2025, arXiv:2510.05491).

Per matrix parameter (tensors of 3+ dims flattened to ``(shape[0], rest)``), at step t:

.. math::
    B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad O_t = \mathrm{NS}_5\big((1-\mu) g_t + \mu B_t\big)\ (\text{or } B_t),

.. math::
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{row}}(O_t \odot O_t),\qquad
    \hat O_t = O_t / (\sqrt{v_t} + \epsilon)\ \text{(row by row)},

.. math::
    p_t = (1 - \text{lr}\,\lambda)\, p_{t-1} - \text{lr}\cdot c\, \hat O_t / (\lVert \hat O_t\rVert_F + \epsilon)

with :math:`c = s(A, B)\,\lVert O_t\rVert_F` (``update_scale="preserve_norm"``, the official code; :math:`s` as in
Muon's ``"original"``, or ``0.2\sqrt{\max(A, B)}`` with ``use_adjusted_lr``) or :math:`c = 0.2\sqrt{AB}`
(``"match_rms"``, the paper's Algorithm 1). :math:`v` has one entry per row (neuron).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, boolean, non_negative, one_of, unit_interval
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import row_means, tensor_norms, tensor_numels
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform
from .muon import NS_COEFFICIENTS, EmaMomentum, Orthogonalize

__all__ = ["NorMuon", "ScaleByNeuronNorm"]


def _per_row(param: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(param.shape[0], 1, dtype=dtype, device=param.device)


class ScaleByNeuronNorm(Transform):
    r"""Divide each row of an (orthogonalized) update by the root of its running mean square, then rescale.

    State: ``second_momentum_buffer`` (pytorch_optimizer's name), shape ``(rows, 1)``. Norms and element counts come
    from the shared reductions, so that under FSDP2 (rows split over ranks) they are the whole matrix's.
    """

    hypers = (
        Hyper("beta2", 0.95, unit_interval, "decay rate of the row-wise second moment"),
        Hyper("eps", 1e-10, non_negative, "added to the root of the second moment and to the norm"),
        Hyper("update_scale", "preserve_norm", one_of("preserve_norm", "match_rms"), "how the update is rescaled"),
        Hyper("use_adjusted_lr", False, boolean, "preserve_norm: shape factor 0.2 sqrt(max(A, B)) instead of Muon's"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"second_momentum_buffer": _per_row}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops, beta2, eps = ctx.ops, ctx.hyper("beta2"), ctx.hyper("eps")
        flat = [u.reshape(u.shape[0], math.prod(u.shape[1:])) for u in updates]
        original = tensor_norms(flat).to(torch.float64)
        second = ctx.buffer("second_momentum_buffer")
        ops.lerp_(second, row_means(ops.mul(flat, flat)), 1 - beta2)
        normed = ops.div(flat, ops.add(ops.sqrt(second), eps))
        norms = tensor_norms(normed).to(torch.float64) + eps
        numels = tensor_numels(flat)
        if ctx.hyper("update_scale") == "match_rms":
            scale = 0.2 * numels.sqrt() / norms
        else:
            cols = torch.tensor([float(f.shape[1]) for f in flat], dtype=torch.float64, device=numels.device)
            rows = numels / cols
            if ctx.hyper("use_adjusted_lr"):
                factor = 0.2 * torch.maximum(rows, cols).sqrt()
            else:
                factor = torch.clamp(rows / cols, min=1.0).sqrt()
            scale = original / norms * factor
        out = ops.mul(normed, ctx.per_param(scale))
        return [o.view(u.shape) for o, u in zip(out, updates)]


class NorMuon(ChainedOptimizer):
    r"""NorMuon: Muon whose orthogonalized update is normalized neuron by neuron (pytorch_optimizer 4.1.0's port).

    .. math::
        O_t = \mathrm{NS}_5(\text{momentum}_t),\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{row}}
        (O_t^2),\quad p_t = (1-\text{lr}\,\lambda) p_{t-1} - \text{lr}\cdot c\,
        \frac{O_t / (\sqrt{v_t}+\epsilon)}{\lVert O_t / (\sqrt{v_t}+\epsilon)\rVert_F + \epsilon}

    with :math:`c = s(A,B)\lVert O_t\rVert_F` (``"preserve_norm"``) or :math:`0.2\sqrt{AB}` (``"match_rms"``); see
    :mod:`gradstep.optim.normuon`. The momentum and the orthogonalization are Muon's transforms
    (:class:`~gradstep.optim.muon.EmaMomentum`, :class:`~gradstep.optim.muon.Orthogonalize`).

    Li, Liu, Liang, Chen & Zhao, 2025. NorMuon: Making Muon more efficient and scalable. arXiv:2510.05491.

    .. warning::
        Differences from pytorch_optimizer ``NorMuon`` (4.1.0):

        * Only the matrix part: pytorch_optimizer's ``use_muon=False`` groups (AdamW inside the same optimizer) are
          :func:`gradstep.partition` parts here (``adamw_*`` arguments are not taken).
        * ``weight_decouple`` is ``weight_decay_mode`` (``"decoupled"``, the default, or ``"coupled"``);
          ``ns_coeffs`` is ``ns_coefficients``, a triple or a schedule of triples given as numbers (its preset
          names, ``"polar_express"``, ..., are not looked up); the iteration's lower bound of the norm is ``ns_eps``
          (fixed 1e-7 there).
        * ``ns_dtype`` (default ``"bfloat16"``, pytorch_optimizer's fixed dtype), ``tensor_mode="batch"`` and
          ``split_size`` as in :class:`~gradstep.Muon`. The step count is per parameter (pytorch_optimizer: per group).
        * The scale is folded into the update before the lr (pytorch_optimizer scales the lr): the same math.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
        >>> opt = gradstep.NorMuon([w], lr=0.02, update_scale="match_rms", ns_dtype="float32")
        >>> w.grad = torch.ones(4, 6); _ = opt.step()
        >>> opt.state[w]["second_momentum_buffer"].shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 2e-2,
        momentum: float = 0.95,
        beta2: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        update_scale: str = "preserve_norm",
        use_adjusted_lr: bool = False,
        eps: float = 1e-10,
        *,
        ns_eps: float = 1e-7,
        ns_dtype: str | None = "bfloat16",
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [EmaMomentum(), Orthogonalize(scale_by_shape=False, eps_name="ns_eps"), ScaleByNeuronNorm()],
            lr=lr,
            momentum=momentum,
            beta2=beta2,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            update_scale=update_scale,
            use_adjusted_lr=use_adjusted_lr,
            eps=eps,
            ns_eps=ns_eps,
            ns_dtype=ns_dtype,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "normuon",
        NorMuon,
        "Muon with a neuron-wise (row) second moment of the orthogonalized update",
        "Li, Liu, Liang, Chen & Zhao, 2025. NorMuon: Making Muon more efficient and scalable. arXiv:2510.05491",
        ("pytorch_optimizer NorMuon",),
        example={
            "lr": 1e-2,
            "momentum": 0.9,
            "beta2": 0.9,
            "weight_decay": 0.05,
            "update_scale": "match_rms",
            "eps": 1e-8,
            "ns_dtype": None,
        },
        invalid=(
            ({"beta2": 1.0}, "beta2"),
            ({"update_scale": "rms"}, "update_scale"),
            ({"ns_steps": 0}, "ns_steps"),
        ),
        sharding="whole-matrix",
        min_ndim=2,
    )
)

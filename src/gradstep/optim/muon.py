r"""Muon: momentum orthogonalized by Newton–Schulz (Jordan et al., 2024; Liu et al., 2025, arXiv:2502.16982).

Per matrix parameter, at step t:

.. math::
    B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad
    \tilde B_t = (1-\mu) g_t + \mu B_t\ \text{(nesterov) or } B_t,\qquad
    O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t),

.. math::
    p_t = (1 - \text{lr}\,\lambda)\, p_{t-1} - \text{lr}\cdot s(A, B)\, O_t

with :math:`s = \sqrt{\max(1, A/B)}` (``"original"``) or :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``)
for an :math:`A \times B` matrix. The orthogonalization is :func:`gradstep.core.matrix.orthogonalize`, shared by
the matrix optimizers: same-shape matrices of a group are orthogonalized as one batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, boolean, non_negative, one_of
from ..core.matrix import NS_DTYPES, MatrixView, matrix_views, orthogonalize
from ..core.ops import PER_TENSOR, Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.owners import map_whole_tensors
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["EmaMomentum", "Muon", "Orthogonalize"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _is_triple(value: Any) -> bool:
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    return ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _coefficients(value: Any) -> str | None:
    if _is_triple(value):
        return None
    if isinstance(value, (tuple, list)) and value and all(_is_triple(v) for v in value):
        return None  # a schedule: one triple per iteration, the last one repeated
    return "must be a triple of finite numbers (a, b, c) or a non-empty sequence of such triples"


def _ns_steps(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 100
    return None if ok else "must be an int in [1, 100)"


def _split_size(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    return None if ok else "must be None or an int > 0"


def _int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "must be an int"


class EmaMomentum(Transform):
    r"""Momentum as an exponential moving average, with a Nesterov look-ahead (``torch.optim.Muon``'s).

    .. math::
        b_t = \mu b_{t-1} + (1-\mu) d_t,\qquad \text{out} = (1-\mu) d_t + \mu b_t\ \text{(nesterov) or } b_t

    State: ``momentum_buffer``.
    """

    elementwise = True
    hypers = (
        Hyper("momentum", 0.95, non_negative, "momentum factor (weight of the past in the moving average)"),
        Hyper("nesterov", True, boolean, "orthogonalize the Nesterov look-ahead instead of the buffer"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"momentum_buffer": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops, mu = ctx.ops, ctx.hyper("momentum")
        buf = ctx.buffer("momentum_buffer")
        ops.lerp_(buf, updates, 1 - mu)
        if not ctx.hyper("nesterov"):
            return buf
        out = ops.clone(updates)
        ops.lerp_(out, buf, mu)
        return out


class Orthogonalize(Transform):
    r"""Replace each matrix of the update by its Newton–Schulz orthogonalization, scaled by a shape factor.

    Tensors of more than two dimensions are flattened to ``(shape[0], rest)`` (``tensor_mode="flatten"``), read as
    a batch of matrices over their last two dimensions (``"batch"``) or refused (``None``); with ``split_size`` each
    tensor is first cut into blocks of that size along ``split_dim`` (fused QKV, heads), each orthogonalized on its
    own. ``split_size`` can be set per parameter through ``p.opt_args``. The scale :math:`s(A, B)` is read from each
    matrix's shape.
    """

    hypers = (
        Hyper(
            "ns_coefficients",
            NS_COEFFICIENTS,
            _coefficients,
            "quintic Newton–Schulz coefficients (a, b, c), or one triple per iteration (the last repeated)",
            False,
        ),
        Hyper("ns_steps", 5, _ns_steps, "Newton–Schulz iterations"),
        Hyper("eps", 1e-7, non_negative, "lower bound of the Frobenius norm the update is divided by"),
        Hyper(
            "adjust_lr_fn",
            None,
            one_of(None, "original", "match_rms_adamw"),
            "shape factor: sqrt(max(1, A/B)) (None, 'original') or 0.2 sqrt(max(A, B)) ('match_rms_adamw')",
        ),
        Hyper("ns_dtype", "bfloat16", one_of(None, *NS_DTYPES), "dtype of the iteration (None: the state's)"),
        Hyper(
            "tensor_mode",
            "flatten",
            one_of(None, "flatten", "batch"),
            "tensors of 3+ dims: one flattened matrix, a batch of matrices, or refused (None, as torch.optim.Muon)",
        ),
        Hyper("split_size", None, _split_size, "cut each tensor into blocks of this size along split_dim first"),
        Hyper("split_dim", 0, _int, "the dimension split_size cuts"),
    )

    def __init__(self, *, scale_by_shape: bool = True, eps_name: str = "eps") -> None:
        # NorMuon rescales after its own normalization, and its "eps" is that normalization's: it builds this
        # transform without the shape factor and with the iteration's epsilon under another name.
        self.scale_by_shape = scale_by_shape
        self.eps_name = eps_name
        kept = [h for h in type(self).hypers if scale_by_shape or h.name != "adjust_lr_fn"]
        self.hypers = tuple(Hyper(eps_name, h.default, h.check, h.doc) if h.name == "eps" else h for h in kept)  # type: ignore[misc,assignment]

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        # The eager path otherwise steps a group in chunks of ~4M elements: large matrices would then come one per
        # chunk and never be batched with their like.
        return True

    def check_group(self, group: dict[str, Any]) -> None:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            name = names[i] if names else f"parameter {i} of the group"
            if p.dim() > 2 and group["tensor_mode"] is None:
                label = f"parameter {names[i]!r}" if names else f"parameter {i} of the group"
                raise ValueError(
                    f"Invalid params: {label} has shape {tuple(p.shape)}, and with tensor_mode=None only 2-D "
                    "parameters are taken (as torch.optim.Muon); pass tensor_mode='flatten' to orthogonalize it as "
                    "one (shape[0], rest) matrix, or tensor_mode='batch' as a batch of matrices over its last two dims"
                )
            if p.dim() < 2:
                raise ValueError(
                    f"Invalid parameter {name} of shape {tuple(p.shape)}: a matrix optimizer takes tensors of 2 or "
                    "more dimensions (route vectors and scalars to an element-wise optimizer, see gradstep.partition)"
                )
            if group["split_size"] is not None and not -p.dim() <= group["split_dim"] < p.dim():
                raise ValueError(f"Invalid split_dim: {group['split_dim']} (parameter {i} has {p.dim()} dimensions)")

    def _scale(self, shape: torch.Size, fn: str | None) -> float:
        rows, cols = shape
        if fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        given: Any = ctx.param_hyper("split_size")
        split_sizes: list[int | None] = given if isinstance(given, list) else [given] * len(updates)
        mode, split_dim = ctx.hyper("tensor_mode"), ctx.hyper("split_dim")
        dtype = NS_DTYPES.get(ctx.hyper("ns_dtype") or "")
        coefficients, steps, eps = ctx.hyper("ns_coefficients"), ctx.hyper("ns_steps"), ctx.hyper(self.eps_name)
        fn = ctx.hyper("adjust_lr_fn") if self.scale_by_shape else None

        def orthogonalized(indices: list[int], wholes: list[Tensor]) -> list[Tensor]:
            views = matrix_views(wholes, mode, [split_sizes[i] for i in indices], split_dim)
            matrices = [m for v in views for m in v.matrices]
            results = orthogonalize(matrices, coefficients, steps, eps, dtype, batched=ctx.ops is not PER_TENSOR)
            if not self.scale_by_shape:
                return [view.assemble(results[i : i + len(view.matrices)]) for i, view in _starts(views)]
            out, scales, start = [], [], 0
            for view in views:
                mine = results[start : start + len(view.matrices)]
                start += len(view.matrices)
                factors = [self._scale(m.shape, fn) for m in view.matrices]
                if len(set(factors)) > 1:  # uneven split blocks: scale each block on its own
                    mine, factors = [r * f for r, f in zip(mine, factors)], [1.0]
                out.append(view.assemble(mine))
                scales.append(factors[0])
            return ctx.ops.mul(out, scales) if out else []

        # Under FSDP2 each rank holds some rows: each whole matrix is orthogonalized once, by its owner rank.
        return map_whole_tensors(updates, orthogonalized)


def _starts(views: list[MatrixView]) -> list[tuple[int, MatrixView]]:
    """Each view with the index of its first matrix in the flat list of all the views' matrices."""
    out, start = [], 0
    for view in views:
        out.append((start, view))
        start += len(view.matrices)
    return out


class Muon(ChainedOptimizer):
    r"""Muon: SGD-momentum whose update matrix is orthogonalized by a Newton–Schulz iteration (torch.optim.Muon).

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad O_t = \mathrm{NS}^{(a,b,c)}_k\big((1-\mu) g_t + \mu B_t\big),\qquad
        p_t = (1 - \text{lr}\,\lambda) p_{t-1} - \text{lr}\, s(A, B)\, O_t

    (without ``nesterov``, :math:`O_t = \mathrm{NS}(B_t)`), with :math:`s = \sqrt{\max(1, A/B)}` or, with
    ``adjust_lr_fn="match_rms_adamw"``, :math:`0.2\sqrt{\max(A, B)}`. Weight decay is decoupled, by the unscaled lr.
    Muon is for the hidden matrices of a network: route embeddings, the output head, biases and norms to an
    element-wise optimizer (:func:`gradstep.partition`, preset ``muon_adamw``).

    Jordan, Jin, Boza, You, Cesista, Newhouse & Bernstein, 2024. Muon: An optimizer for hidden layers in neural
    networks. https://kellerjordan.github.io/posts/muon/ — Liu et al., 2025. Muon is Scalable for LLM Training.
    arXiv:2502.16982.

    .. warning::
        Differences from ``torch.optim.Muon`` (torch 2.13), whose every option is provided with its default:

        * As torch, only 2-D parameters are taken by default (``tensor_mode=None``); with ``tensor_mode="flatten"``
          tensors of 3 or more dimensions are flattened to ``(shape[0], rest)`` as the original Muon code does
          (``gradstep.MuonAdamW`` sets it), with ``tensor_mode="batch"`` read as a batch of matrices
          (mixture-of-experts weights). ``split_size``/``split_dim`` orthogonalize blocks of a fused weight
          separately. The scale :math:`s` is read from each matrix so cut (torch: from ``shape[:2]``).
        * ``ns_dtype`` chooses the iteration's dtype; its default ``"bfloat16"`` is torch's (fixed there).
        * The update is :math:`\text{lr}\cdot(s\,O_t)` where torch computes :math:`(\text{lr}\,s)\cdot O_t`: the
          same math, rounded differently (below float64's ``1e-15``).
        * The step count ``step`` is kept per parameter (torch keeps no step); ``foreach=True`` (the default) batches
          same-shape matrices (``baddbmm``), torch loops over parameters (``addmm``). A matrix alone in its shape,
          and every matrix with ``foreach=False``, goes through torch's own 2-D ops and is orthogonalized to torch's
          bit; in a batch, CPU ``baddbmm`` rounds ``b A + c A^2`` and ``a X + B X`` in two steps where ``addmm``
          fuses them, so a bfloat16 result on a rounding tie can land one bfloat16 ulp from torch's.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.eye(3) * 2)
        >>> opt = gradstep.Muon([w], lr=0.1, weight_decay=0.0, nesterov=False, momentum=0.0, ns_dtype="float32")
        >>> w.grad = torch.eye(3); _ = opt.step()
        >>> bool(torch.allclose(w.detach(), torch.eye(3) * 2 - 0.1 * torch.eye(3), atol=0.05))
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: str | None = "bfloat16",
        tensor_mode: str | None = None,
        split_size: int | None = None,
        split_dim: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [EmaMomentum(), Orthogonalize()],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            tensor_mode=tensor_mode,
            split_size=split_size,
            split_dim=split_dim,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "muon",
        Muon,
        "Momentum orthogonalized by a Newton-Schulz iteration, for the hidden matrices of a network",
        "Jordan et al., 2024. Muon: An optimizer for hidden layers in neural networks; Liu et al., 2025. Muon is "
        "Scalable for LLM Training. arXiv:2502.16982",
        ("torch.optim.Muon",),
        example={
            "lr": 2e-2,
            "weight_decay": 0.05,
            "momentum": 0.9,
            "nesterov": False,
            "ns_steps": 6,
            "adjust_lr_fn": "match_rms_adamw",
            "ns_dtype": None,
            "tensor_mode": "flatten",
        },
        invalid=(
            ({"ns_steps": 0}, "ns_steps"),
            ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
            ({"adjust_lr_fn": "other"}, "adjust_lr_fn"),
            ({"momentum": -0.5}, "momentum"),
        ),
        sharding="whole-matrix",
        min_ndim=2,
    )
)

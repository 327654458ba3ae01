r"""Kronecker-factor math shared by the Kronecker-preconditioned optimizers (Shampoo, SOAP).

Such an optimizer keeps, for each preconditioned dimension :math:`k` of a tensor block :math:`G`, a factor
:math:`L_k \approx \sum_t G_{t,(k)} G_{t,(k)}^\top` (the contraction of :math:`G` with itself over every other
dimension), and preconditions along each dimension with a function of it: an inverse root :math:`L_k^{-1/r}`
(Shampoo) or its eigenbasis (SOAP). This module is the one place where

* a parameter is cut into preconditioned blocks (:func:`block_layout`): small dimensions merged (Distributed
  Shampoo's ``merge_small_dims``), every dimension split into blocks of at most ``max_dim`` (Shampoo's blocking), or
  dimensions larger than a limit left unpreconditioned (SOAP's ``max_precond_dim``);
* the factors of a parameter live in one flat state tensor (:meth:`BlockLayout.factor_views`), so that a checkpoint
  holds one tensor per parameter whatever its block structure;
* the statistics, the inverse roots and the eigenbases are computed for same-shape blocks together, one batched
  ``bmm``/``eigh`` per distinct shape, whatever the number of parameters (:func:`kronecker_statistics`,
  :func:`inverse_roots`, :func:`eigenbases`, :func:`apply_along_dims`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockLayout",
    "accumulate_",
    "apply_along_dims",
    "block_layout",
    "block_norms",
    "eigenbases",
    "inverse_roots",
    "kronecker_statistics",
    "merge_small_dims",
]


def merge_small_dims(shape: Sequence[int], threshold: int) -> tuple[int, ...]:
    """Distributed Shampoo's ``merge_small_dims``: drop dims of size 1, then merge neighbours, from the last dim
    backwards, while their product stays at most ``threshold``. A scalar becomes ``(1,)``, an empty tensor ``(0,)``.

    >>> merge_small_dims((32, 3, 8, 8), 1024), merge_small_dims((), 1024), merge_small_dims((5, 1, 7), 4)
    ((32, 192), (1,), (5, 7))
    """
    if 0 in shape:
        return (0,)
    squeezed = [s for s in reversed(shape) if s != 1] or [1]
    merged = [squeezed[0]]
    for size in squeezed[1:]:
        if merged[-1] * size <= threshold:
            merged[-1] *= size
        else:
            merged.append(size)
    return tuple(reversed(merged))


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into preconditioned blocks.

    Attributes:
        shape: the parameter's shape.
        merged: the shape the parameter is viewed as (after merging small dims).
        slices: per block, its index in the merged view (one slice per merged dim), in row-major block order.
        block_shapes: per block, its shape.
        preconditioned: per block, which of its dims have a factor.
        factor_offsets: per block, per preconditioned dim, where its ``d x d`` factor starts in the flat state.
        factor_numel: the size of the flat state holding every factor of the parameter.
    """

    shape: tuple[int, ...]
    merged: tuple[int, ...]
    slices: tuple[tuple[slice, ...], ...]
    block_shapes: tuple[tuple[int, ...], ...]
    preconditioned: tuple[tuple[bool, ...], ...]
    factor_offsets: tuple[tuple[int, ...], ...]
    factor_numel: int

    def blocks(self, tensor: Tensor) -> list[Tensor]:
        """The blocks of ``tensor`` (shaped like the parameter): views where the merge allows one."""
        merged = tensor.reshape(self.merged)
        if len(self.slices) == 1:
            return [merged]
        return [merged[index] for index in self.slices]

    def assemble(self, blocks: Sequence[Tensor]) -> Tensor:
        """The tensor shaped like the parameter from one tensor per block (in :attr:`slices` order)."""
        if len(blocks) == 1:
            return blocks[0].reshape(self.shape)
        out = blocks[0].new_empty(self.merged)
        for index, block in zip(self.slices, blocks):
            out[index] = block
        return out.reshape(self.shape)

    def factor_sizes(self) -> list[list[int]]:
        """Per block, the size of each of its factors."""
        return [
            [d for d, on in zip(shape, flags) if on] for shape, flags in zip(self.block_shapes, self.preconditioned)
        ]

    def factor_views(self, flat: Tensor) -> list[list[Tensor]]:
        """Per block, its ``d x d`` factors as views of the flat state ``flat`` (updates reach the state)."""
        return [
            [flat[o : o + d * d].view(d, d) for o, d in zip(offsets, sizes)]
            for offsets, sizes in zip(self.factor_offsets, self.factor_sizes())
        ]

    def identity_factors(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """A flat state whose every factor is the identity (the initial inverse roots and eigenbases)."""
        flat = torch.zeros(self.factor_numel, dtype=dtype, device=device)
        for views in self.factor_views(flat):
            for view in views:
                view.fill_diagonal_(1.0)
        return flat


@functools.lru_cache(maxsize=4096)
def block_layout(
    shape: tuple[int, ...], max_dim: int, *, merge: bool = True, split: bool = True, limit: float = math.inf
) -> BlockLayout:
    """The blocks of a parameter of ``shape``.

    Args:
        max_dim: with ``merge``, neighbouring dims are merged while their product is at most ``max_dim``; with
            ``split``, every (merged) dim is cut into blocks of ``max_dim`` (the last one smaller: Shampoo).
        merge: merge small dims (:func:`merge_small_dims`); without it a scalar is still read as ``(1,)``.
        split: cut dims into blocks; without it a parameter is one block.
        limit: dims larger than this get no factor (SOAP's ``max_precond_dim``; Shampoo: none, it splits).
    """
    merged = merge_small_dims(shape, max_dim) if merge else (tuple(shape) or (1,))
    if split and max_dim > 0:
        ranges = [[slice(a, min(a + max_dim, n)) for a in range(0, n, max_dim)] or [slice(0, 0)] for n in merged]
    else:
        ranges = [[slice(0, n)] for n in merged]
    slices = tuple(itertools.product(*ranges))
    block_shapes = tuple(tuple(s.stop - s.start for s in index) for index in slices)
    preconditioned = tuple(tuple(0 < d <= limit for d in shape_) for shape_ in block_shapes)
    offsets: list[tuple[int, ...]] = []
    total = 0
    for shape_, flags in zip(block_shapes, preconditioned):
        mine = []
        for d, on in zip(shape_, flags):
            if on:
                mine.append(total)
                total += d * d
        offsets.append(tuple(mine))
    return BlockLayout(tuple(shape), merged, slices, block_shapes, preconditioned, tuple(offsets), total)


def _buckets(
    tensors: Sequence[Tensor], extra: Sequence[object] | None = None, batched: bool = True
) -> dict[tuple[object, ...], list[int]]:
    """Indices of ``tensors`` grouped by shape, dtype and device (and ``extra[i]``): the batches of one kernel.
    Without ``batched`` each tensor is a batch of its own (the per-tensor reference path, ``foreach=False``)."""
    out: dict[tuple[object, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        key = (tuple(t.shape), t.dtype, t.device, extra[i] if extra is not None else None, None if batched else i)
        out.setdefault(key, []).append(i)
    return out


def kronecker_statistics(
    blocks: Sequence[Tensor], preconditioned: Sequence[Sequence[bool]], batched: bool = True
) -> list[list[Tensor]]:
    r"""Per block :math:`G`, per preconditioned dim :math:`k`: :math:`G_{(k)} G_{(k)}^\top`, the contraction of
    :math:`G` with itself over every other dim (``tensordot(G, G, [others, others])``). Same-shape blocks are
    stacked and contracted by one ``bmm`` per dim."""
    if not batched:  # the literal reference: Distributed Shampoo's tensordot, block by block
        return [
            [
                torch.tensordot(g, g, dims=[[i for i in range(g.dim()) if i != k]] * 2)
                for k, on in enumerate(flags)
                if on
            ]
            for g, flags in zip(blocks, preconditioned)
        ]
    out: list[list[Tensor]] = [[] for _ in blocks]
    for (shape, *_), idx in _buckets(blocks, [tuple(p) for p in preconditioned]).items():
        stacked = torch.stack([blocks[i] for i in idx])
        flags = preconditioned[idx[0]]
        for k, on in enumerate(flags):
            if not on:
                continue
            unfolded = stacked.movedim(k + 1, 1).reshape(len(idx), shape[k], -1)  # type: ignore[index]
            gram = torch.bmm(unfolded, unfolded.transpose(1, 2))
            for i, g in zip(idx, gram.unbind(0)):
                out[i].append(g)
    return out


def accumulate_(factors: Sequence[Tensor], statistics: Sequence[Tensor], beta: float) -> None:
    r""":math:`L \leftarrow \beta L + (1-\beta) S` in place (``beta == 1``: the AdaGrad sum :math:`L + S`), in
    Distributed Shampoo's order of operations (``mul_`` then ``add_`` with ``alpha``)."""
    if not factors:
        return
    if beta != 1.0:
        torch._foreach_mul_(list(factors), beta)
        torch._foreach_add_(list(factors), list(statistics), alpha=1 - beta)
    else:
        torch._foreach_add_(list(factors), list(statistics))


def eigenbases(
    matrices: Sequence[Tensor], epsilon: float = 0.0, batched: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    r"""The eigenvalues (ascending) and eigenvectors of each symmetric matrix :math:`A + \epsilon I`, by one batched
    ``torch.linalg.eigh`` per distinct shape.

    This is the exact refresh. An approximate one, a power iteration with a QR step started from the previous
    eigenvectors (SOAP's refresh, Distributed Shampoo's ``QREigendecompositionConfig``), belongs next to it, sharing
    :func:`_buckets` for the batching.
    """
    values: list[Tensor | None] = [None] * len(matrices)
    vectors: list[Tensor | None] = [None] * len(matrices)
    for idx in _buckets(matrices, batched=batched).values():
        stacked = torch.stack([matrices[i] for i in idx])
        if epsilon != 0.0:
            stacked = stacked + epsilon * torch.eye(stacked.shape[-1], dtype=stacked.dtype, device=stacked.device)
        lam, q = _eigh(stacked)
        for j, i in enumerate(idx):
            values[i], vectors[i] = lam[j], q[j]
    return values, vectors  # type: ignore[return-value]


def _eigh(stacked: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a batch, retried in float64 when a lower precision fails to converge (Distributed Shampoo's
    ``retry_double_precision``), returned in the batch's dtype."""
    try:
        return torch.linalg.eigh(stacked)  # type: ignore[no-any-return]
    except RuntimeError:
        if stacked.dtype == torch.float64:
            raise
        lam, q = torch.linalg.eigh(stacked.double())
        return lam.to(stacked.dtype), q.to(stacked.dtype)


def inverse_roots(
    matrices: Sequence[Tensor], roots: Sequence[float], epsilon: float, batched: bool = True
) -> list[Tensor]:
    r""":math:`A^{-1/r}` of each symmetric positive semi-definite matrix, as Distributed Shampoo's default
    (``EigenConfig`` with ``PerturbationConfig(perturb_before_computation=True)``) computes it:

    .. math::
        Q \Lambda Q^\top = A + \epsilon I,\qquad
        \Lambda \leftarrow \Lambda - \lambda_{\min} + \epsilon \ \text{ if } \lambda_{\min} < \epsilon,\qquad
        A^{-1/r} \approx Q \Lambda^{-1/r} Q^\top

    (the shift makes a matrix that rounding left slightly indefinite positive definite). Matrices of one shape and
    root are decomposed by one batched ``eigh``; the shift is decided per matrix, without a device sync.
    """
    out: list[Tensor | None] = [None] * len(matrices)
    for (*_, root, _), idx in _buckets(matrices, [float(r) for r in roots], batched).items():
        stacked = torch.stack([matrices[i] for i in idx])
        eye = torch.eye(stacked.shape[-1], dtype=stacked.dtype, device=stacked.device)
        lam, q = _eigh(stacked + epsilon * eye)
        lam_min = lam.min(dim=-1, keepdim=True).values
        lam = torch.where(lam_min < epsilon, lam - lam_min + epsilon, lam)
        scaled = q * lam.pow(-1.0 / float(root)).unsqueeze(-2)  # type: ignore[arg-type]
        for j, i in enumerate(idx):
            # One 2-D product per matrix (batched matmul rounds differently from the reference's ``mm``, and with
            # epsilon=1e-12 a nearly singular factor turns any rounding difference into a visible one).
            out[i] = scaled[j] @ q[j].T
    return out  # type: ignore[return-value]


def apply_along_dims(
    blocks: Sequence[Tensor],
    matrices: Sequence[Sequence[Tensor]],
    preconditioned: Sequence[Sequence[bool]],
    transpose: bool = False,
    batched: bool = True,
) -> list[Tensor]:
    r"""Multiply each block along each of its preconditioned dims by that dim's matrix.

    For dim :math:`k` with matrix :math:`M`, the block's index :math:`i_k` becomes
    :math:`\sum_i M_{i, i_k} G_{\dots i \dots}` (Distributed Shampoo's and SOAP's ``tensordot(G, M, [[0], [0]])``:
    :math:`M^\top` applied along the dim), or with ``transpose`` :math:`\sum_i M_{i_k, i} G_{\dots i \dots}`
    (SOAP's ``project_back``). Dims without a matrix are left as they are. Same-shape blocks with the same pattern
    are stacked: one ``bmm`` per dim.
    """
    if not batched:  # the literal reference: Distributed Shampoo's tensordot, rotating the dims, block by block
        return [_apply_literal(b, m, f, transpose) for b, m, f in zip(blocks, matrices, preconditioned)]
    out: list[Tensor | None] = [None] * len(blocks)
    for (shape, *_), idx in _buckets(blocks, [tuple(p) for p in preconditioned]).items():
        x = torch.stack([blocks[i] for i in idx])
        n = len(idx)
        for k, on in enumerate(preconditioned[idx[0]]):
            if not on:
                continue
            mats = torch.stack([matrices[i][sum(preconditioned[i][:k])] for i in idx])
            mats = mats if transpose else mats.transpose(1, 2)
            moved = x.movedim(k + 1, 1)
            rest = moved.shape[2:]
            product = torch.bmm(mats, moved.reshape(n, shape[k], -1))  # type: ignore[index]
            x = product.reshape(n, shape[k], *rest).movedim(1, k + 1)  # type: ignore[index]
        for j, i in enumerate(idx):
            out[i] = x[j]
    return out  # type: ignore[return-value]


def _apply_literal(block: Tensor, matrices: Sequence[Tensor], flags: Sequence[bool], transpose: bool) -> Tensor:
    mats = iter(matrices)
    for on in flags:
        if on:
            block = torch.tensordot(block, next(mats), dims=([0], [1 if transpose else 0]))
        else:
            block = block.permute(*range(1, block.dim()), 0)
    return block


def block_norms(blocks: Sequence[Tensor]) -> list[Tensor]:
    """The Frobenius norm of each block (0-d tensors), one ``torch._foreach_norm`` for all."""
    return list(torch._foreach_norm(list(blocks))) if blocks else []


def qr_power_iteration(
    matrices: Sequence[Tensor], bases: Sequence[Tensor], batched: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    r"""An approximate eigenbasis refresh (SOAP's): one power iteration from the previous eigenvectors, then QR.

    .. math::
        P = A Q,\qquad \hat\lambda = \mathrm{diag}(Q^\top A Q),\qquad
        Q \leftarrow \mathrm{QR}(P_{:, \sigma})_Q \quad (\sigma \text{ sorts } \hat\lambda \text{ decreasingly})

    Returns the new bases and each one's column order :math:`\sigma` (what was kept in the old basis follows it).
    Ties keep their order (a stable sort). The QR runs in at least float32 (``qr`` has no half-precision kernel);
    same-shape matrices are one batch.
    """
    new: list[Tensor | None] = [None] * len(matrices)
    orders: list[Tensor | None] = [None] * len(matrices)
    for idx in _buckets(matrices, batched=batched).values():
        a = torch.stack([matrices[i] for i in idx])
        q = torch.stack([bases[i] for i in idx])
        product = torch.bmm(a, q)
        estimates = (q * product).sum(dim=1)
        order = torch.argsort(estimates, dim=-1, descending=True, stable=True)
        power = product.gather(2, order.unsqueeze(1).expand_as(product))
        wide = torch.float32 if power.dtype in (torch.bfloat16, torch.float16) else power.dtype
        result = torch.linalg.qr(power.to(wide))[0].to(q.dtype)
        for j, i in enumerate(idx):
            new[i], orders[i] = result[j], order[j]
    return new, orders  # type: ignore[return-value]

r"""Matrix math shared by the matrix optimizers: views of tensors as matrices and the Newton–Schulz orthogonalization.

Elementwise optimizers see a parameter as a bag of numbers; matrix optimizers (Muon and its relatives) see it as one
or several matrices. This module is the one place where

* a parameter's update is cut into matrices (:func:`matrix_views`): a 2-D tensor is one matrix; a tensor of more
  dimensions is either flattened to ``(shape[0], rest)`` (convolutions, as the original Muon code does) or read as a
  batch of matrices over its last two dimensions (mixture-of-experts weights); a fused weight (QKV, attention heads)
  can first be split into equal blocks along one dimension;
* same-shape matrices are stacked and orthogonalized together (:func:`orthogonalize`): one ``baddbmm`` chain per
  distinct shape, whatever the number of parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MatrixView", "matrix_views", "newton_schulz", "newton_schulz_matrix", "orthogonalize"]

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(x: Tensor, coefficients: Sequence[Any], steps: int, eps: float) -> Tensor:
    r"""Approximate :math:`UV^\top` of each matrix of a batch ``(n, rows, cols)`` with ``rows <= cols``.

    The quintic iteration of Jordan et al. (the code of ``torch.optim.Muon``, batched):

    .. math::
        X_0 = G / \max(\lVert G\rVert_F, \epsilon),\qquad
        A = X X^\top,\quad X \leftarrow a X + (b A + c A^2) X

    ``coefficients`` is one triple, or a schedule of triples (iteration ``i`` uses entry ``min(i, len - 1)``, as
    the Polar Express schedules). Computed in ``x``'s dtype; ``x`` is not modified.
    """
    schedule = [coefficients] if _is_triple(coefficients) else list(coefficients)
    norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    x = x / norms
    for i in range(steps):
        a, b, c = schedule[min(i, len(schedule) - 1)]
        gram = torch.bmm(x, x.transpose(-2, -1))
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def newton_schulz_matrix(x: Tensor, coefficients: Sequence[Any], steps: int, eps: float) -> Tensor:
    """:func:`newton_schulz` of one ``(rows, cols)`` matrix through torch.optim.Muon's own 2-D ops (mm, addmm).

    Same math as the batched iteration, but CPU ``addmm`` rounds ``beta * input + alpha * (A @ B)`` once (a fused
    multiply-add in float32) where ``baddbmm`` rounds ``beta * input`` first: in bfloat16 a result that lands on a
    tie between two bfloat16 numbers then rounds the other way (one bfloat16 ulp). With torch's ops, a matrix alone in
    its shape bucket is orthogonalized to torch's bit.
    """
    schedule = [coefficients] if _is_triple(coefficients) else list(coefficients)
    x = x / x.norm().clamp(min=eps)
    for i in range(steps):
        a, b, c = schedule[min(i, len(schedule) - 1)]
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x


def _is_triple(value: Any) -> bool:
    return len(value) == 3 and all(isinstance(v, (int, float)) for v in value)


class MatrixView:
    """How one tensor is cut into matrices: the matrices (views or copies) and how to put their results back."""

    def __init__(self, tensor: Tensor, mode: str, split_size: int | None, split_dim: int) -> None:
        self.shape = tensor.shape
        blocks = [tensor] if not split_size else list(torch.split(tensor, split_size, dim=split_dim))
        self.split_dim = split_dim if split_size else None
        self.block_shapes = [b.shape for b in blocks]
        self.matrices: list[Tensor] = []
        self.counts: list[int] = []  # matrices per block
        for block in blocks:
            if block.dim() < 2:
                raise ValueError(
                    f"a matrix optimizer needs tensors of 2 or more dimensions, got shape {tuple(block.shape)}"
                )
            if block.dim() == 2:
                mats = [block]
            elif mode == "flatten":
                mats = [block.reshape(block.shape[0], math.prod(block.shape[1:]))]
            else:  # "batch": the leading dimensions index matrices
                mats = list(block.reshape(-1, block.shape[-2], block.shape[-1]).unbind(0))
            self.matrices += mats
            self.counts.append(len(mats))

    def assemble(self, results: list[Tensor]) -> Tensor:
        """The tensor shaped like the original from one result per matrix (in the order of :attr:`matrices`)."""
        blocks, start = [], 0
        for shape, count in zip(self.block_shapes, self.counts):
            part = results[start : start + count]
            start += count
            blocks.append(part[0].reshape(shape) if count == 1 else torch.stack(part).reshape(shape))
        if self.split_dim is None:
            return blocks[0]
        return torch.cat(blocks, dim=self.split_dim)


def matrix_views(
    tensors: Sequence[Tensor], mode: str, split_sizes: Sequence[int | None], split_dim: int
) -> list[MatrixView]:
    """Each tensor as matrices (see the module docstring); ``split_sizes`` has one entry per tensor."""
    return [MatrixView(t, mode, s, split_dim) for t, s in zip(tensors, split_sizes)]


def orthogonalize(
    matrices: Sequence[Tensor],
    coefficients: Sequence[Any],
    steps: int,
    eps: float,
    dtype: torch.dtype | None = None,
    batched: bool = True,
) -> list[Tensor]:
    """The Newton–Schulz orthogonalization of each matrix, in ``dtype`` (None: each matrix's own), cast back.

    A tall matrix is orthogonalized through its transpose (the Gram matrix is then the smaller one). With ``batched``,
    matrices of the same (wide) shape and dtype are stacked and run as one batch (``baddbmm``: a bfloat16 result on a
    rounding tie may come out one ulp from torch's, see :func:`newton_schulz_matrix`); otherwise, and for a matrix
    alone in its bucket, one at a time with torch's 2-D ops (the reference path).
    """
    out: list[Tensor | None] = [None] * len(matrices)
    buckets: dict[tuple[object, ...], list[int]] = {}
    wide: list[Tensor] = []
    for i, m in enumerate(matrices):
        w = m.transpose(0, 1) if m.shape[0] > m.shape[1] else m
        wide.append(w.to(dtype or m.dtype))
        key: tuple[object, ...] = (wide[i].shape, wide[i].dtype, wide[i].device) if batched else (i,)
        buckets.setdefault(key, []).append(i)
    for idx in buckets.values():
        if len(idx) == 1:  # torch's 2-D ops: its rounding, to the bit
            results = [newton_schulz_matrix(wide[idx[0]], coefficients, steps, eps)]
        else:
            results = list(newton_schulz(torch.stack([wide[i] for i in idx]), coefficients, steps, eps).unbind(0))
        for i, r in zip(idx, results):
            m = matrices[i]
            r = r.transpose(0, 1) if m.shape[0] > m.shape[1] else r
            out[i] = r.to(m.dtype)
    return out  # type: ignore[return-value]

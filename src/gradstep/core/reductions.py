"""Per-tensor and per-row reductions: the one place where norms, inner products and means are computed.

Every transform that needs a reduction over a tensor (clipping, trust ratios, projections, cosines, row norms) calls
these functions, so that they can be made sharding-aware (local partial sums all-reduced over the mesh) in one place.
Per-tensor results come back as one vector with an entry per tensor; per-row results keep the tensor's rank
(shape ``(n, 1, ..., 1)``) so that they broadcast against it.

Sharded tensors (FSDP2's DTensor parameters). A per-tensor reduction of a ``DTensor`` is computed as partial results on
the local shard (sums of squares, sums, maxima), all-reduced over the mesh dimensions the tensor is sharded on, and
finished: every rank gets the unsharded result, to float rounding, as a plain (replicated) tensor. The optimizer core
steps the *local* shards of DTensor parameters (plain tensors, fast and free of DTensor's missing ops); it declares
their sharding with :func:`sharded_as` around the step, and a per-tensor reduction of a list aligned with the declared
one is all-reduced the same way. Row reductions (all dims but the first) need no communication for shards along dim 0
(FSDP2's default: every row is whole on one rank); other placements raise ``NotImplementedError``.

Whole-model reductions (sums over every parameter of every group, D-Adaptation's and Prodigy's) are accumulated with
:class:`WholeModelSum`: each group's per-tensor partial sums are added as the groups are visited, and one all-reduce
per step finishes those of split tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "dim_means",
    "global_norm",
    "is_split",
    "keep_top_k",
    "row_dots",
    "row_lp_norms",
    "row_means",
    "row_norms",
    "row_signed_argmax",
    "sharded_as",
    "tensor_dots",
    "tensor_keep_top_k",
    "tensor_norms",
    "tensor_numels",
    "tensor_sums",
    "whole_tensors",
    "WholeModelSum",
]


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


# --- sharding -----------------------------------------------------------------------------------------------------
# One entry per tensor of the current step: the process groups its elements are split over ((): whole on every rank),
# and whether its shards split rows (any placement but Shard(0)).
_Sharding = tuple[tuple[Any, ...], bool]
_DECLARED: contextvars.ContextVar[list[_Sharding] | None] = contextvars.ContextVar("gradstep_sharding", default=None)
_WHOLE: _Sharding = ((), False)


def _is_dtensor(x: Any) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def sharding_of(x: Any) -> _Sharding:
    """How ``x`` is split: the process groups to all-reduce partial results over, and whether rows are split."""
    if not _is_dtensor(x):
        return _WHOLE
    groups = []
    splits_rows = False
    for dim, placement in enumerate(x.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            raise NotImplementedError(f"gradstep reductions of a DTensor placed as {placement} (only Shard/Replicate)")
        groups.append(x.device_mesh.get_group(dim))
        splits_rows = splits_rows or placement.dim != 0
    return tuple(groups), splits_rows


@contextlib.contextmanager
def sharded_as(tensors: Sequence[Any]) -> Iterator[None]:
    """Declare that the plain tensors reduced in this block are the local shards of ``tensors`` (DTensors or not).

    Within the block, a per-tensor reduction of a list as long as ``tensors`` is all-reduced like that of ``tensors``.
    Nothing is declared when none of ``tensors`` is a DTensor.
    """
    shardings = [sharding_of(t) for t in tensors]
    token = _DECLARED.set(shardings if any(groups for groups, _ in shardings) else None)
    try:
        yield
    finally:
        _DECLARED.reset(token)


def _local(x: Tensor) -> Tensor:
    return x.to_local() if _is_dtensor(x) else x  # type: ignore[attr-defined, no-any-return]


def _shardings(xs: Sequence[Tensor]) -> list[_Sharding] | None:
    """The sharding of each of ``xs`` (DTensors, or local shards declared by :func:`sharded_as`); None: all whole."""
    if torch.compiler.is_compiling():
        return None  # the compiled fast path steps plain tensors (and must not break its graph on a context var)
    if any(_is_dtensor(x) for x in xs):
        return [sharding_of(x) for x in xs]
    declared = _DECLARED.get()
    if declared is None:
        return None
    if len(declared) != len(xs):
        if all(d == declared[0] for d in declared):
            return [declared[0]] * len(xs)  # FSDP2: every tensor split alike, so any subset of them is too
        raise RuntimeError(
            f"a per-tensor reduction of {len(xs)} local shards inside a step declared for {len(declared)} tensors: "
            "its sharding is unknown"
        )
    return declared


def is_split(xs: Sequence[Tensor]) -> list[bool]:
    """Whether each of ``xs`` (DTensors, or local shards declared by :func:`sharded_as`) is split over ranks.

    A reduction over the whole of such a tensor needs the other ranks' parts: a batched view ``(1, *local_shape)``
    of a local shard is only this rank's part of a block that spans the split dim. Every rank gets the same answer.
    """
    shardings = _shardings(xs)
    if shardings is None:
        return [False] * len(xs)
    return [bool(groups) for groups, _ in shardings]


def _all_reduce(partials: Tensor, shardings: list[_Sharding] | None, op: str) -> Tensor:
    """All-reduce each entry of the per-tensor vector ``partials`` (``"sum"`` or ``"max"``) over its tensor's groups.

    Entries of tensors that are whole on every rank are left as they are (they already are the full result).
    """
    if shardings is None or not any(groups for groups, _ in shardings):
        return partials
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    # One collective per distinct set of groups (FSDP2: one for the whole group's parameters).
    by_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (groups, _) in enumerate(shardings):
        if groups:
            by_groups.setdefault(groups, []).append(i)
    out = partials.clone()
    for groups, idx in by_groups.items():
        chunk = out[idx].contiguous()
        for group in groups:
            dist.all_reduce(chunk, op=reduce_op, group=group)
        out[idx] = chunk
    return out


def _splits_rows(x: Any) -> bool:
    return _is_dtensor(x) and sharding_of(x)[1]


def _check_rows(xs: Sequence[Tensor]) -> list[Tensor]:
    """Local shards of ``xs`` for a row reduction (callers route DTensors that split rows to :func:`_gathered`)."""
    if torch.compiler.is_compiling():
        return list(xs)
    declared = _DECLARED.get()
    if declared is not None and any(split for _, split in declared):
        raise NotImplementedError("gradstep row reductions of shards that split rows (only Shard(0) keeps rows whole)")
    return [_local(x) for x in xs]


def _gathered(fn: Any, lists: Sequence[Sequence[Any]], same_shape: bool) -> list[Tensor] | None:
    """``fn`` over DTensors whose shards split rows, computed on the gathered tensors; None when there are none.

    A row reduction of such a tensor (a batched view ``(1, *shape)`` of a Shard(0) parameter is Shard(1)) is computed
    on the whole tensor, exactly as in one process: the result is replicated (``same_shape=False``: one value per row)
    or split back like the input (``same_shape=True``: selections such as :func:`keep_top_k`).
    """
    xs = lists[0]
    if torch.compiler.is_compiling() or not any(_splits_rows(x) for x in xs):
        return None
    from torch.distributed.tensor import DTensor, Replicate

    out = []
    for i, x in enumerate(xs):
        args = [[_full(items[i])] if isinstance(items[i], Tensor) else [items[i]] for items in lists]
        result = fn(*args)[0]
        if not _splits_rows(x):
            out.append(result)
            continue
        whole = DTensor.from_local(result, x.device_mesh, [Replicate()] * x.device_mesh.ndim, run_check=False)
        out.append(whole.redistribute(x.device_mesh, x.placements) if same_shape else whole)
    return out


def _full(x: Tensor) -> Tensor:
    return x.full_tensor() if _splits_rows(x) else x  # type: ignore[attr-defined, no-any-return]


def _like_rows(result: Tensor, x: Any, shape: tuple[int, ...]) -> Tensor:
    """A row reduction's local ``result`` as a DTensor split like ``x`` (global ``shape``), when ``x`` is one."""
    if not _is_dtensor(x):
        return result
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        result, x.device_mesh, x.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def tensor_norms(xs: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of each tensor (over all its elements), as one vector, computed in one multi-tensor pass.

    A zero-size tensor has norm 0 (``_foreach_norm`` refuses the infinity norm of an empty tensor). Sharded tensors
    (see the module's docstring): the norms of the whole tensors, the same on every rank.
    """
    return _tensor_norms(xs, ord, blas=True)


def _tensor_norms(xs: Sequence[Tensor], ord: float, blas: bool) -> Tensor:
    shardings = _shardings(xs)
    if shardings is None:
        return _local_norms(xs, ord, blas)
    norms = _local_norms([_local(x) for x in xs], ord, blas)
    if ord == math.inf:
        return _all_reduce(norms, shardings, "max")
    if not 0 < ord < math.inf:
        raise NotImplementedError(f"the {ord}-norm of sharded tensors")
    return _all_reduce(norms**ord, shardings, "sum") ** (1.0 / ord)


def _local_norms(xs: Sequence[Tensor], ord: float, blas: bool) -> Tensor:
    if not xs:
        return torch.zeros(0)
    if all(x.numel() > 0 for x in xs):
        if blas and ord == 2 and _blas_ready(xs):
            # A BLAS dot product reads a tensor about twice as fast as the norm kernel on the CPU.
            return torch.stack([torch.dot(x.view(-1), x.view(-1)) for x in xs]).sqrt()
        return torch.stack([_wide(n) for n in torch._foreach_norm(list(xs), ord)])
    filled = [i for i, x in enumerate(xs) if x.numel() > 0]
    norms = torch.zeros(len(xs), dtype=_wide(xs[0]).dtype if xs[0].is_floating_point() else torch.float32)
    norms = norms.to(xs[0].device)
    if filled:
        norms[filled] = _local_norms([xs[i] for i in filled], ord, blas).to(norms.dtype)
    return norms


def _blas_ready(xs: Sequence[Tensor]) -> bool:
    """Plain contiguous float32/float64 CPU tensors of one dtype (also under torch.compile, where the dot product
    measured faster than the compiled norm too)."""
    dtype = xs[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(type(x) is Tensor or type(x) is torch.nn.Parameter for x in xs)
        and all(x.dtype == dtype and x.device.type == "cpu" and x.is_contiguous() for x in xs)
    )


def tensor_sums(xs: Sequence[Tensor]) -> Tensor:
    """The sum of each tensor's elements, as one vector (float32 accumulation; float64 for float64 tensors).

    There is no multi-tensor sum kernel; a sum is one vectorised pass, far cheaper on the CPU than the max-abs norm.
    Sharded tensors: local sums, all-reduced.
    """
    if not xs:
        return torch.zeros(0)
    shardings = _shardings(xs)
    sums = torch.stack([_local(x).sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for x in xs])
    return _all_reduce(sums, shardings, "sum")


def tensor_numels(xs: Sequence[Tensor]) -> Tensor:
    """The number of elements of each tensor, as a float64 vector; for sharded tensors, of the whole tensor."""
    if not xs:
        return torch.zeros(0, dtype=torch.float64)
    counts = torch.tensor([float(_local(x).numel()) for x in xs], dtype=torch.float64, device=_local(xs[0]).device)
    return _all_reduce(counts, _shardings(xs), "sum")


def global_norm(xs: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (0-d), computed as ``torch.nn.utils.clip_grad_norm_`` does (to the
    bit: clipping by it is torch's)."""
    if not xs:
        return torch.zeros(())
    return torch.linalg.vector_norm(_tensor_norms(xs, 2.0, blas=False))


def tensor_dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """The inner product ``<x_i, y_i>`` over all elements of each pair of tensors, as one vector.

    Sharded tensors (``x_i`` and ``y_i`` split alike): local inner products, all-reduced.
    """
    if not xs:
        return torch.zeros(0)
    shardings = _shardings(xs)
    xs, ys = [_local(x) for x in xs], [_local(y) for y in ys]
    if all(x.numel() > 0 for x in xs) and _blas_ready(list(xs) + list(ys)):
        # A BLAS dot product reads both tensors once; a product and its sum write and read a temporary as well
        # (about 5x slower on the reference workload's CPU).
        return _all_reduce(torch.stack([torch.dot(x.view(-1), y.view(-1)) for x, y in zip(xs, ys)]), shardings, "sum")
    products = torch._foreach_mul(xs, ys)
    return _all_reduce(torch.stack([_wide(p).sum() for p in products]), shardings, "sum")


def _rows(x: Tensor) -> Tensor:
    # reshape(n, -1) cannot infer -1 for an empty tensor; the row length is explicit.
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _row_shape(x: Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 1) if x.dim() > 0 else ()


def row_norms(xs: Sequence[Tensor]) -> list[Tensor]:
    """The L2 norm of each row (all dims but the first) of each tensor, shaped to broadcast against it.

    A 0-d tensor's "row" is the tensor itself.
    """
    gathered = _gathered(row_norms, [xs], same_shape=False)
    if gathered is not None:
        return gathered
    return [_like_rows(n, x, _row_shape(x)) for n, x in zip(_row_norms(_check_rows(xs)), xs)]


def _row_norms(xs: Sequence[Tensor]) -> list[Tensor]:
    return [
        torch.linalg.vector_norm(_rows(_wide(x)), dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x).abs()
        for x in xs
    ]


def row_dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """The inner product of each row pair (all dims but the first), shaped to broadcast against the tensors."""
    gathered = _gathered(row_dots, [xs, ys], same_shape=False)
    if gathered is not None:
        return gathered
    dots = [
        _rows(_wide(x) * _wide(y)).sum(dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x) * _wide(y)
        for x, y in zip(_check_rows(xs), _check_rows(ys))
    ]
    return [_like_rows(d, x, _row_shape(x)) for d, x in zip(dots, xs)]


def row_means(xs: Sequence[Tensor]) -> list[Tensor]:
    """The mean of each row (all dims but the first), shaped to broadcast against the tensor."""
    gathered = _gathered(row_means, [xs], same_shape=False)
    if gathered is not None:
        return gathered
    means = [_rows(_wide(x)).mean(dim=1).reshape(_row_shape(x)) if x.dim() > 0 else _wide(x) for x in _check_rows(xs)]
    return [_like_rows(m, x, _row_shape(x)) for m, x in zip(means, xs)]


def dim_means(xs: Sequence[Tensor], dim: int) -> list[Tensor]:
    """The mean of each tensor over its dimension ``dim`` (``-1`` or ``-2``), kept as a size-1 dimension.

    Adafactor's and CAME's factored statistics: means over the last dimension (one value per row of the last two
    dims) and over the second-to-last (one per column). Sharded tensors: FSDP2 splits dim 0, so for a 2-d tensor the
    mean over dim ``-2`` spans the ranks and is all-reduced (sums and counts); every other one is local. Other
    placements raise ``NotImplementedError``. Half-precision tensors are reduced in float32.
    """
    if any(_is_dtensor(x) for x in xs):
        # Whole DTensors (not the core's declared local shards): reduced gathered, as in one process.
        return [dim_means([x.full_tensor() if _is_dtensor(x) else x], dim)[0] for x in xs]  # type: ignore[attr-defined]
    shardings = _shardings(xs)
    out: list[Tensor] = []
    spanning: dict[tuple[Any, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups, splits_rows = shardings[i] if shardings is not None else _WHOLE
        if groups and splits_rows:
            raise NotImplementedError("gradstep dim_means of shards not split along dim 0")
        if groups and x.dim() + dim == 0:
            spanning.setdefault(groups, []).append(i)
            out.append(_wide(x).sum(dim=dim, keepdim=True))
        elif x.shape[dim] == 0:
            out.append(_wide(x).sum(dim=dim, keepdim=True))  # zeros: the mean of nothing is taken as 0, not NaN
        else:
            out.append(_wide(x).mean(dim=dim, keepdim=True))
    if spanning:
        import torch.distributed as dist

        for groups, idx in spanning.items():
            # One collective per set of groups: every sum, and each tensor's local count along the split dim.
            counts = torch.tensor([float(xs[i].shape[dim]) for i in idx], dtype=out[idx[0]].dtype)
            flat = torch.cat([out[i].reshape(-1) for i in idx] + [counts.to(out[idx[0]].device)])
            for group in groups:
                dist.all_reduce(flat, group=group)
            offset = 0
            for k, i in enumerate(idx):
                n = out[i].numel()
                count = flat[len(flat) - len(idx) + k].clamp(min=1)
                out[i] = flat[offset : offset + n].view(out[i].shape) / count
                offset += n
    return out


# Per-row selections and Lp norms of *batched views* (``(N, d1, ..., dm)``, at least 2-d: rai_toolbox's blocks, see
# gradstep.paramtransform.to_batch). Each row is one block; its entries are taken in row-major order.


def row_lp_norms(xs: Sequence[Tensor], ord: float = 2.0) -> list[Tensor]:
    """The Lp norm of each row of each (at least 2-d) tensor, shaped ``(N, 1, ..., 1)``; ``ord=2`` is :func:`row_norms`.

    Half-precision tensors are reduced in float32, as by :func:`row_norms`.
    """
    if ord == 2:
        return row_norms(xs)
    gathered = _gathered(functools.partial(row_lp_norms, ord=ord), [xs], same_shape=False)
    if gathered is not None:
        return gathered
    norms = [torch.linalg.vector_norm(_rows(_wide(x)), ord=ord, dim=1).reshape(_row_shape(x)) for x in _check_rows(xs)]
    return [_like_rows(n, x, _row_shape(x)) for n, x in zip(norms, xs)]


def keep_top_k(xs: Sequence[Tensor], ks: Sequence[int]) -> list[Tensor]:
    """Copies of (at least 2-d) tensors keeping the ``k`` largest-magnitude entries of each row, zeros elsewhere.

    ``ks[i]`` applies to every row of ``xs[i]``; ``k == 0`` gives zeros. Ties are broken by ``torch.topk`` (as
    rai_toolbox's ``TopQGradientOptimizer`` breaks them).
    """
    gathered = _gathered(keep_top_k, [xs, ks], same_shape=True)
    if gathered is not None:
        return gathered
    out = [_keep_row_top_k(x, k) for x, k in zip(_check_rows(xs), ks)]
    return [_like_rows(o, x, tuple(x.shape)) for o, x in zip(out, xs)]


def _keep_row_top_k(x: Tensor, k: int) -> Tensor:
    flat = _rows(x)
    kept = torch.zeros_like(flat)
    if k > 0 and flat.numel() > 0:
        idx = torch.topk(flat.abs(), k, dim=1).indices
        kept.scatter_(1, idx, flat.gather(1, idx))
    return kept.view(x.shape)


def tensor_keep_top_k(xs: Sequence[Tensor], ks: Sequence[int]) -> list[Tensor]:
    """Copies of tensors keeping the ``ks[i]`` largest-magnitude entries of the whole of ``xs[i]``, zeros elsewhere.

    The selection of :func:`keep_top_k` on the one-row view ``x.reshape(1, numel)`` (ties broken by ``torch.topk``
    over the entries in row-major order). Sharded tensors: the selection is made on the whole tensor, gathered, so it
    is the unsharded one; each rank gets its own part of the result (a DTensor placed like the input, or the local
    shard of a tensor declared by :func:`sharded_as`). Gathering the local shards in rank order rebuilds the tensor
    only for shards along dim 0 over one mesh dim; other shardings raise ``NotImplementedError``.
    """
    shardings = _shardings(xs)
    out: list[Tensor] = []
    for i, (x, k) in enumerate(zip(xs, ks)):
        if _is_dtensor(x):
            from torch.distributed.tensor import DTensor, Replicate

            whole = _keep_flat_top_k(x.full_tensor(), k)  # type: ignore[attr-defined]
            mesh = x.device_mesh  # type: ignore[attr-defined]
            replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
            out.append(replicated.redistribute(mesh, x.placements))  # type: ignore[attr-defined]
            continue
        groups, splits_rows = shardings[i] if shardings is not None else _WHOLE
        if not groups:
            out.append(_keep_flat_top_k(x, k))
            continue
        if splits_rows or len(groups) != 1:
            raise NotImplementedError(
                "a top-k selection over a whole tensor whose local shards are not split along dim 0 over one mesh dim"
            )
        full, start = _gather_flat(x, groups[0])
        out.append(_keep_flat_top_k(full, k)[start : start + x.numel()].view(x.shape))
    return out


def _keep_flat_top_k(x: Tensor, k: int) -> Tensor:
    return _keep_row_top_k(x.reshape(1, x.numel()), k).view(x.shape)


def _gather_flat(x: Tensor, group: Any) -> tuple[Tensor, int]:
    """The whole tensor, flattened in row-major order, from every rank's local shard ``x`` (split along dim 0 over
    ``group``, possibly unevenly: FSDP2's last ranks may hold fewer rows, or none); and where this rank's part starts.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    flat = x.reshape(-1)
    count = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    counts_t = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count, group=group)
    counts = [int(c) for c in counts_t]
    start = sum(counts[: dist.get_rank(group)])
    width = max(counts)
    if width == 0:
        return flat.clone(), start
    padded = flat.new_zeros(width)  # all_gather needs equal sizes on every rank
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), start


def row_signed_argmax(xs: Sequence[Tensor]) -> list[Tensor]:
    """Per row of each (at least 2-d) tensor: ``sign(x_i*)`` at its largest-magnitude entry ``i*``, zeros elsewhere.

    ``i*`` is the first maximum in row-major order over the whole row, whatever its ndim. This is the negative
    linear minimisation oracle of the L1 ball (Frank-Wolfe).
    """
    gathered = _gathered(row_signed_argmax, [xs], same_shape=True)
    if gathered is not None:
        return gathered
    out = []
    for x in _check_rows(xs):
        flat = _rows(x)
        if flat.numel() == 0:
            out.append(x.clone())
            continue
        idx = torch.argmax(flat.abs(), dim=1, keepdim=True)
        signed = torch.zeros_like(flat)
        signed.scatter_(1, idx, torch.sign(flat.gather(1, idx)))
        out.append(signed.view(x.shape))
    return [_like_rows(o, x, tuple(x.shape)) for o, x in zip(out, xs)]


def whole_tensors(xs: Sequence[Tensor]) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Tensor]]]:
    """The whole tensors of local shards (declared by :func:`sharded_as`), and how to take this rank's part back.

    For updates that are a nonlinear function of a whole matrix (an orthogonalization): every rank gathers each
    tensor split along dim 0 over one mesh dim (FSDP2's sharding, uneven and empty shards included), computes on the
    whole, and keeps its rows with the returned function (applied to tensors shaped like the whole ones). Tensors that
    are not split come back as they are; other shardings raise ``NotImplementedError``.
    """
    shardings = _shardings(xs)
    if shardings is None or not any(groups for groups, _ in shardings):
        return list(xs), list
    wholes: list[Tensor] = []
    starts: list[int | None] = []
    for x, (groups, splits_rows) in zip(xs, shardings):
        if not groups:
            wholes.append(x)
            starts.append(None)
            continue
        if splits_rows or len(groups) != 1:
            raise NotImplementedError("a whole-matrix update of shards not split along dim 0 over one mesh dim")
        flat, start = _gather_flat(x, groups[0])
        wholes.append(flat.view(-1, *x.shape[1:]))
        starts.append(start)

    def parts(ys: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for y, x, start in zip(ys, xs, starts):
            out.append(y if start is None else y.reshape(-1)[start : start + x.numel()].view(x.shape))
        return out

    return wholes, parts


class WholeModelSum:
    """Sums over every parameter of the model, all groups together: the whole-model reduction.

    D-Adaptation and Prodigy estimate one step size from sums over the whole model (inner products and norms of all
    parameters). The optimizer adds each group's per-tensor partial sums (computed on plain tensors, or on the local
    shards declared by :func:`sharded_as`) with :meth:`add`, then :meth:`total` returns the model-wide sums, the same
    on every rank: partial sums of split tensors are all-reduced over their process groups, one collective per
    distinct set of groups (FSDP2: one in all), and those of whole tensors (replicated, or outside any sharding)
    are added once. Ranks must add the same tensors in the same order (as they step the same groups).
    """

    def __init__(self) -> None:
        self._whole: Tensor | None = None
        self._split: dict[tuple[Any, ...], Tensor] = {}

    def add(self, xs: Sequence[Tensor], partials: Tensor) -> None:
        """Add ``partials`` (shape ``(len(xs), k)``: row ``i`` holds this rank's partial sums of ``xs[i]``)."""
        if not len(xs):
            return
        shardings = _shardings(xs)
        partials = partials.reshape(len(xs), -1)
        by_groups: dict[tuple[Any, ...], list[int]] = {}
        for i in range(len(xs)):
            groups = shardings[i][0] if shardings is not None else ()
            by_groups.setdefault(groups, []).append(i)
        for groups, idx in by_groups.items():
            part = partials[idx].sum(dim=0)
            if not groups:
                self._whole = part if self._whole is None else self._whole + part
            else:
                self._split[groups] = self._split[groups] + part if groups in self._split else part

    def total(self, k: int, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
        """The ``k`` model-wide sums (zeros when nothing was added)."""
        out = torch.zeros(k, dtype=dtype, device=device)
        if self._whole is not None:
            out = out + self._whole.to(out)
        if self._split:
            import torch.distributed as dist

            for groups, part in self._split.items():
                part = part.to(out).contiguous()
                for group in groups:
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
                out = out + part
        return out

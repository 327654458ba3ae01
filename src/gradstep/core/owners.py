"""Whole-matrix updates of sharded parameters, each matrix computed once, by an owner rank.

A matrix optimizer's update is a nonlinear function of a whole matrix (Muon's orthogonalization), so the rows that
FSDP2 spreads over the ranks must meet somewhere. :func:`gradstep.core.reductions.whole_tensors` is the simple way:
every rank gathers every matrix and computes every update, then keeps its rows. :func:`map_whole_tensors` is the
scalable one:

1. one ``all_gather`` of the shard sizes (all tensors at once) gives every rank the same global shapes;
2. owners are assigned greedily, largest cost first, to the least-loaded rank (the same answer on every rank);
3. one ``all_to_all`` sends each shard to its matrix's owner;
4. each owner computes the updates of its matrices only;
5. one ``all_to_all`` sends every rank its rows of each result.

Per step and rank, that moves each local shard out and its result back: ``2 x (world - 1) / world`` times the local
shard bytes on average, in three collectives whatever the number of matrices (the gather-everything way receives
every whole matrix on every rank: ``(world - 1)`` times the local bytes, in two collectives per matrix), and the
Newton-Schulz work is divided among the ranks instead of repeated on each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .reductions import _shardings

__all__ = ["assign_owners", "map_whole_tensors"]

WholeFn = Callable[[list[int], list[Tensor]], Sequence[Tensor]]
"""``fn(indices, wholes)``: the update of each whole tensor ``wholes[k]`` (input number ``indices[k]``), shaped like
it. It may be called with no tensors (a rank that owns none)."""


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner rank of each item: largest cost first, each to the least-loaded rank (ties: lower index/rank)."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def matrix_cost(shape: Sequence[int]) -> float:
    """The work of orthogonalizing a tensor read as ``(shape[0], rest)``: ``rows x cols x min(rows, cols)``."""
    rows = shape[0] if shape else 1
    cols = 1
    for n in shape[1:]:
        cols *= n
    return float(rows * cols * min(rows, cols))


def map_whole_tensors(xs: Sequence[Tensor], fn: WholeFn) -> list[Tensor]:
    """``fn`` over the whole tensors whose local shards are ``xs``; this rank's part of each result.

    Without sharding (plain tensors, one process, inside ``torch.compile``) this is ``fn`` over ``xs``. Local shards
    declared by :func:`gradstep.core.reductions.sharded_as`, split along dim 0 over one mesh dim (FSDP2, uneven and
    empty shards included), are computed by one owner rank each (see the module docstring); tensors that are not
    split are computed on every rank alike. Other shardings raise ``NotImplementedError``.
    """
    shardings = _shardings(xs)
    if shardings is None or not any(groups for groups, _ in shardings):
        return list(fn(list(range(len(xs))), list(xs)))
    whole = [i for i, (groups, _) in enumerate(shardings) if not groups]
    by_group: dict[int, tuple[object, list[int]]] = {}
    for i, (groups, splits_rows) in enumerate(shardings):
        if not groups:
            continue
        if splits_rows or len(groups) != 1:
            raise NotImplementedError("a whole-matrix update of shards not split along dim 0 over one mesh dim")
        by_group.setdefault(id(groups[0]), (groups[0], []))[1].append(i)
    out: list[Tensor | None] = [None] * len(xs)
    if whole:
        for i, y in zip(whole, fn(whole, [xs[i] for i in whole])):
            out[i] = y
    for group, indices in by_group.values():
        for i, y in zip(indices, _owned(group, [xs[i] for i in indices], indices, fn)):
            out[i] = y
    return out  # type: ignore[return-value]


def _owned(group: object, xs: list[Tensor], indices: list[int], fn: WholeFn) -> list[Tensor]:
    """Each of ``xs`` (local shards over ``group``) computed by its owner: this rank's part of every result."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)  # type: ignore[arg-type]
    device = xs[0].device
    sizes = torch.tensor([x.numel() for x in xs], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes, group=group)  # type: ignore[arg-type]
    counts = [[int(n) for n in g.tolist()] for g in gathered]  # counts[rank][k]: elements of xs[k] on that rank
    shapes = []
    for k, x in enumerate(xs):
        row = 1
        for n in x.shape[1:]:
            row *= n
        total = sum(counts[r][k] for r in range(world))
        shapes.append((total // row if row else 0, *x.shape[1:]))
    owners = assign_owners([matrix_cost(s) for s in shapes], world)
    mine = [k for k in range(len(xs)) if owners[k] == rank]
    # One buffer dtype for the exchange: the widest of the tensors (a round trip through it is exact).
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)

    # Shards to their owners: to rank r go, in tensor order, the local shards of the tensors r owns.
    send = [xs[k].reshape(-1).to(dtype) for r in range(world) for k in range(len(xs)) if owners[k] == r]
    send_sizes = [sum(counts[rank][k] for k in range(len(xs)) if owners[k] == r) for r in range(world)]
    recv_sizes = [sum(counts[s][k] for k in mine) for s in range(world)]
    received = _exchange(send, send_sizes, recv_sizes, dtype, device, group)
    pieces: dict[int, list[Tensor]] = {k: [] for k in mine}
    offset = 0
    for s in range(world):
        for k in mine:
            pieces[k].append(received[offset : offset + counts[s][k]])
            offset += counts[s][k]
    wholes = [torch.cat(pieces[k]).view(shapes[k]).to(xs[k].dtype) for k in mine]
    results = list(fn([indices[k] for k in mine], wholes))

    # Results back: to rank s go, in tensor order, its rows of each result this rank owns.
    starts = {k: [sum(counts[r][k] for r in range(s)) for s in range(world)] for k in mine}
    flat = {k: y.reshape(-1).to(dtype) for k, y in zip(mine, results)}
    send = [flat[k][starts[k][s] : starts[k][s] + counts[s][k]] for s in range(world) for k in mine]
    returned = _exchange(send, recv_sizes, send_sizes, dtype, device, group)
    out, offset = [], 0
    by_owner = {r: [k for k in range(len(xs)) if owners[k] == r] for r in range(world)}
    local: dict[int, Tensor] = {}
    for r in range(world):
        for k in by_owner[r]:
            local[k] = returned[offset : offset + counts[rank][k]]
            offset += counts[rank][k]
    for k, x in enumerate(xs):
        out.append(local[k].view(x.shape).to(x.dtype))
    return out


def _exchange(
    send: list[Tensor],
    send_sizes: list[int],
    recv_sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
    group: object,
) -> Tensor:
    import torch.distributed as dist

    buffer = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(received, buffer, recv_sizes, send_sizes, group=group)  # type: ignore[arg-type]
    return received

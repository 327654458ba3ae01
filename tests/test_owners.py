"""Whole-matrix updates of FSDP2 shards computed by owner ranks (gradstep.core.owners), on 2 gloo ranks.

The optimizers that use it (Muon, NorMuon) are compared with one process under FSDP2 in test_distributed.py; here the
exchange itself: every result equals the function of the whole tensor, each tensor is computed by exactly one rank,
uneven and empty shards and mixed dtypes come back to the bit, and the owners balance the work.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradstep.core.owners import assign_owners, map_whole_tensors, matrix_cost

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
# (rows, cols) with 5 rows split 3/2, 1 row split 1/0 (rank 1 holds an empty shard), and one float32 tensor.
SHAPES = [((5, 4), torch.float64), ((1, 6), torch.float64), ((8, 3), torch.float32), ((6, 6), torch.float64)]


def whole_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, dtype in SHAPES]


def nonlinear(x: torch.Tensor) -> torch.Tensor:
    """A function of the whole tensor that its rows alone cannot give (every entry reads every row)."""
    return torch.tanh(x) * x.double().square().sum().to(x.dtype) + x.T.sum(0).sum()


def _rank(rank: int, port: int, queue: Any) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from gradstep.core.reductions import sharded_as

        mesh = init_device_mesh("cpu", (WORLD,))
        sharded = [distribute_tensor(x, mesh, [Shard(0)]) for x in whole_tensors()]
        locals_ = [d.to_local() for d in sharded]
        computed: list[int] = []

        def fn(indices: list[int], wholes: list[torch.Tensor]) -> list[torch.Tensor]:
            computed.extend(indices)
            return [nonlinear(w) for w in wholes]

        with sharded_as(sharded):
            parts = map_whole_tensors(locals_, fn)
        # Plain pickled bytes: a tensor sent through the queue as is lives in the rank's shared memory, gone with it.
        queue.put((rank, computed, pickle.dumps([p.clone() for p in parts]), [tuple(x.shape) for x in locals_]))
        dist.destroy_process_group()
    except Exception:
        queue.put((rank, "error", traceback.format_exc(), None))


@pytest.fixture(scope="module")
def ranks() -> dict[int, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(WORLD):
        rank, computed, parts, shapes = queue.get(timeout=180)
        assert computed != "error", parts
        results[rank] = (computed, pickle.loads(parts), shapes)
    for p in procs:
        p.join(timeout=60)
    return results


def test_each_tensor_is_computed_by_exactly_one_rank(ranks: dict[int, Any]) -> None:
    owned = sorted(i for computed, _, _ in ranks.values() for i in computed)
    assert owned == list(range(len(SHAPES)))
    assert all(ranks[r][0] for r in ranks)  # both ranks share the work


def test_every_rank_gets_its_rows_of_the_whole_result(ranks: dict[int, Any]) -> None:
    expected = [nonlinear(x) for x in whole_tensors()]
    assert ranks[1][2][1] == (0, 6) and ranks[1][1][1].shape == (0, 6)  # the empty shard
    for k, want in enumerate(expected):
        got = torch.cat([ranks[r][1][k] for r in range(WORLD)])
        assert got.dtype == want.dtype
        assert torch.equal(got, want), k


def test_without_sharding_it_is_the_function_itself() -> None:
    xs = whole_tensors()
    calls: list[list[int]] = []

    def fn(indices: list[int], wholes: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(indices)
        return [nonlinear(w) for w in wholes]

    out = map_whole_tensors(xs, fn)
    assert calls == [[0, 1, 2, 3]]
    assert all(torch.equal(a, nonlinear(b)) for a, b in zip(out, xs))


def test_owners_balance_the_cost_and_agree_for_equal_inputs() -> None:
    costs = [matrix_cost(s) for s in [(64, 64), (64, 64), (32, 32), (32, 32), (128, 16), (16, 16)]]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) <= sum(costs) / 2 + max(costs) / 2
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    assert matrix_cost((4, 2, 3)) == 4 * 6 * 4

"""Optimizer step time under FSDP2 (2 gloo ranks on the CPU) against one process, on the same model.

What is measured: ``optimizer.step()`` alone (no forward, backward, or FSDP2 all-gather and reduce-scatter), as the
median over ``--steps`` steps after ``--warmup`` steps. The model is ``--depth`` blocks of ``Linear(width, width)``
followed by ``LayerNorm(width)``, in float32 (4.2M parameters in 16 tensors by default). The gradients come from one
forward and backward pass and stay the same for every step. Each optimizer runs with its default hyperparameters and
``nonfinite="ignore"``, as in ``gradstep bench``, so it does the same work as torch.optim; ``--nonfinite error`` adds
the default check for non-finite gradients.

* Single process: the whole model, with 1 intra-op thread and then with 2 (the machine's cores).
* FSDP2: 2 ranks on 127.0.0.1 (gloo), 1 intra-op thread each, with ``fully_shard`` applied to every layer. Each rank
  steps its half of every tensor (its local shard), and the per-tensor reductions (LAMB's trust ratios, AdamP's
  cosines, NeroPlus's norms) are all-reduced across the ranks. Every timed step starts at a barrier, so a rank does
  not count the time it waits for the other one to arrive. The table gives the slower rank's median.

``ratio`` is the FSDP2 time per step divided by the single-process time (1 thread, then 2 threads). Each rank has
half the elementwise work, so 0.5 against 1 thread would be perfect scaling; the collectives of the per-tensor
reductions add to that. The two ranks and the 2-thread process use the same two cores. The machine is noisy, so
compare ratios within one run, not across runs.

    python -m gradstep.lab.bench_fsdp
    python -m gradstep.lab.bench_fsdp --only adamw lamb --width 512 --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.nonfinite import POLICIES
from ..core.registry import get

__all__ = ["DEFAULT_OPTIMIZERS", "main", "make_model", "single_process", "under_fsdp2"]

DEFAULT_OPTIMIZERS = ("adamw", "lamb", "adamp", "neroplus")
BATCH = 32
WORLD = 2


def make_model(width: int, depth: int) -> torch.nn.Sequential:
    """``depth`` blocks of Linear(width, width) and LayerNorm(width), float32, the same for every seed-0 call."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    return torch.nn.Sequential(*layers)


def _fill_grads(model: torch.nn.Module, width: int, rows: slice) -> None:
    x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(1))
    model(x[rows]).square().mean().backward()


def _build(name: str, params: Any, nonfinite: str) -> torch.optim.Optimizer:
    entry = get(name)
    required = {k: entry.example[k] for k in entry.required_args}
    return entry(params, **required, nonfinite=nonfinite)


def _step_times(opt: torch.optim.Optimizer, warmup: int, steps: int, sync: Callable[[], Any] | None) -> list[float]:
    """Seconds taken by each of ``steps`` calls of ``opt.step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        if sync is not None:
            sync()  # both ranks start the step together: neither one times its wait for the other
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def single_process(
    names: Sequence[str], width: int, depth: int, warmup: int, steps: int, threads: int, nonfinite: str
) -> dict[str, list[float]]:
    """Step times (seconds) of each optimizer on the whole model in this process, with ``threads`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for name in names:
            model = make_model(width, depth)
            _fill_grads(model, width, slice(None))
            out[name] = _step_times(_build(name, model.parameters(), nonfinite), warmup, steps, None)
        return out
    finally:
        torch.set_num_threads(before)


def _rank(
    rank: int,
    port: int,
    names: Sequence[str],
    width: int,
    depth: int,
    warmup: int,
    steps: int,
    nonfinite: str,
    out_dir: str,
) -> None:
    """One FSDP2 rank: the step times of each optimizer on its shards, written to ``out_dir/rank<r>.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        out = {}
        for name in names:
            model = make_model(width, depth)
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            n = BATCH // WORLD
            _fill_grads(model, width, slice(rank * n, (rank + 1) * n))
            out[name] = _step_times(_build(name, model.parameters(), nonfinite), warmup, steps, dist.barrier)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def under_fsdp2(
    names: Sequence[str], width: int, depth: int, warmup: int, steps: int, nonfinite: str
) -> list[dict[str, list[float]]]:
    """Step times (seconds) of each optimizer on each of 2 spawned FSDP2 ranks (one list per rank)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        args = (_free_port(), list(names), width, depth, warmup, steps, nonfinite, out_dir)
        mp.start_processes(_rank, args=args, nprocs=WORLD, join=True, start_method="spawn")
        results = []
        for rank in range(WORLD):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def _ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def table(
    names: Sequence[str],
    one: dict[str, list[float]],
    two: dict[str, list[float]],
    ranks: list[dict[str, list[float]]],
) -> str:
    """The markdown table of median ms/step and the FSDP2 / single-process ratios."""
    lines = [
        "| optimizer | single, 1 thread (ms) | single, 2 threads (ms) | FSDP2, 2 ranks x 1 thread (ms, slower rank) "
        "| ratio to 1 thread | ratio to 2 threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        fsdp = max(_ms(r[name]) for r in ranks)
        lines.append(
            f"| {name} | {_ms(one[name]):.2f} | {_ms(two[name]):.2f} | {fsdp:.2f} "
            f"| {fsdp / _ms(one[name]):.2f} | {fsdp / _ms(two[name]):.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradstep.lab.bench_fsdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=list(DEFAULT_OPTIMIZERS), help="registry names")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--nonfinite", choices=POLICIES, default="ignore")
    args = parser.parse_args(argv)
    for name in args.only:
        get(name)  # an unknown name fails here, before anything is spawned
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    sizes = dict(width=args.width, depth=args.depth, warmup=args.warmup, steps=args.steps, nonfinite=args.nonfinite)
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {n_params / 1e6:.2f}M float32 parameters "
        f"({args.depth} x Linear({args.width}, {args.width}) + LayerNorm); optimizer.step() only, median of "
        f"{args.steps} steps after {args.warmup}; nonfinite={args.nonfinite!r}",
        flush=True,
    )
    one = single_process(args.only, threads=1, **sizes)
    two = single_process(args.only, threads=2, **sizes)
    ranks = under_fsdp2(args.only, **sizes)
    print(table(args.only, one, two, ranks))


if __name__ == "__main__":
    main()

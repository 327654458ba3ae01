"""Step time of gradstep's optimizers against torch.optim and the peer packages, side by side in one run.

The workload is shaped like a small transformer (17.6M float32 parameters in 24 tensors: twelve 1024x1024, one
4096x1024, three 1024x256, eight 1024-vectors). Each implementation takes the same fixed gradients; the figure is the
median wall time of a step after warm-up. The machine is noisy (about ±20% between runs): compare ratios within one
run, not across runs.

    python benchmarks/step_time.py                      # every registered optimizer that has a peer
    python benchmarks/step_time.py --only adam lamb     # a few
    python benchmarks/step_time.py --scale 0.25         # a quarter of the workload, for a quick look
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradstep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def workload(scale: float) -> list[tuple[int, ...]]:
    d = max(8, int(1024 * scale**0.5))
    return [(d, d)] * 12 + [(4 * d, d)] + [(d, d // 4)] * 3 + [(d,)] * 8


def peers() -> dict[str, dict[str, Factory]]:
    """For each gradstep registry name, the other implementations to time (those that import here)."""
    table: dict[str, dict[str, Factory]] = {
        "sgd": {"torch foreach": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=True)},
        "adam": {"torch foreach": lambda p: torch.optim.Adam(p, foreach=True)},
        "adamw": {
            "torch foreach": lambda p: torch.optim.AdamW(p, foreach=True),
            "torch fused": lambda p: torch.optim.AdamW(p, fused=True),
        },
        "adamax": {"torch foreach": lambda p: torch.optim.Adamax(p, foreach=True)},
        "rmsprop": {"torch foreach": lambda p: torch.optim.RMSprop(p, foreach=True)},
    }
    try:
        pto = importlib.import_module("pytorch_optimizer")
        for name, cls in [("lamb", "Lamb"), ("adan", "Adan"), ("adabelief", "AdaBelief"), ("adamp", "AdamP")]:
            table.setdefault(name, {})["pytorch-optimizer"] = lambda p, c=cls: getattr(pto, c)(p)
        table.setdefault("radam", {})["torch foreach"] = lambda p: torch.optim.RAdam(p, foreach=True)
    except ImportError:
        pass
    try:
        from originals import holocron_optim

        ho = holocron_optim()
        for name, cls in [("lamb", "LAMB"), ("adan", "Adan"), ("ademamix", "AdEMAMix"), ("adamp", "AdamP")]:
            table.setdefault(name, {})["holocron"] = lambda p, c=cls: getattr(ho, c)(p)
    except ImportError:
        pass
    return table


def time_step(factory: Factory, shapes: list[tuple[int, ...]], steps: int, warmup: int) -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = factory(params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="registry names to time (default: those with a peer)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the reference workload")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = workload(args.scale)
    n = sum(torch.Size(s).numel() for s in shapes)
    table = peers()
    names = args.only or [name for name in gradstep.available() if name in table]
    print(f"# {n / 1e6:.1f}M float32 parameters in {len(shapes)} tensors, {args.threads} threads, torch {torch.__version__}")
    print("| optimizer | implementation | ms/step | x gradstep |")
    print("|---|---|---|---|")
    for name in names:
        entry = gradstep.get(name)
        lr = {"lr": 1e-3} if entry.preset.get("lr") is gradstep.REQUIRED else {}
        ours = time_step(lambda p, e=entry: e(p, **lr), shapes, args.steps, args.warmup)
        print(f"| {name} | gradstep | {ours:.1f} | 1.00 |", flush=True)
        for label, factory in table.get(name, {}).items():
            theirs = time_step(factory, shapes, args.steps, args.warmup)
            print(f"| {name} | {label} | {theirs:.1f} | {theirs / ours:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

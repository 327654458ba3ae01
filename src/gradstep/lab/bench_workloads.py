"""The workloads benchmark: Adam, AdamW and SGD as users meet them, against torch's fused and foreach optimizers.

``gradstep bench`` times every optimizer on one reference workload. This module times the three optimizers torch has
fused kernels for on the shapes that decide what a user sees:

- ``reference``: the 17.6M-parameter workload of ``gradstep bench`` (24 tensors);
- ``transformer-48``: 48 transformer blocks of width 128 (580 tensors, about 6M parameters);
- ``tiny-600``: 600 tensors of 64 elements (the per-step overhead alone);
- ``adamw-1M`` ... ``adamw-70M``: one shape family at 1M, 4M, 17M and 70M parameters.

Each row is a median of ``--steps`` steps after warm-up, in one process, one after the other, and its ratio to torch's
fused optimizer of the same algorithm in the same run. gradstep's rows: the default (``gradstep.AdamW(params)``: the
fused kernel with the default non-finite screen), the default without the screen (``nonfinite="ignore"``, the work
torch does), the chain (``fused=False``) and the compiled path (``compiled=True``; its first step, compilation
included, is reported apart and skipped above ``--compiled-max-tensors`` tensors).

    python -m gradstep.lab.bench_workloads                       # every workload (about 15 minutes on 2 cores)
    python -m gradstep.lab.bench_workloads --only tiny-600 --optimizers adamw
    python -m gradstep.lab.bench_workloads --screen --only reference transformer-48   # the screen's cost alone

``--screen`` measures what the default non-finite screen costs: the default optimizer and the same optimizer with
``nonfinite="ignore"``, on two copies of the workload, stepped in alternation (one step of each per round, their order
swapped every round), so that a loaded machine slows both alike. The ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo

import gradstep

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

HYPERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.01},
    "adam": {"lr": 1e-3},
    "sgd": {"lr": 1e-2, "momentum": 0.9},
}
TORCH: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
GRADSTEP: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": gradstep.AdamW,
    "adam": gradstep.Adam,
    "sgd": gradstep.SGD,
}


def reference_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """``gradstep bench``'s workload: 17.6M parameters in 24 tensors at scale 1."""
    d = max(8, int(1024 * scale**0.5))
    return [(d, d)] * 12 + [(4 * d, d)] + [(d, d // 4)] * 3 + [(d,)] * 8


def transformer_shapes(blocks: int = 48, width: int = 128, vocab: int = 512) -> list[tuple[int, ...]]:
    """A transformer's tensors: per block QKV, output, two MLP weights with their biases and two norms."""
    h = width
    block: list[tuple[int, ...]] = [(3 * h, h), (3 * h,), (h, h), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    block += [(h,)] * 4
    return block * blocks + [(vocab, h), (h,), (h,), (vocab, h)]


def _square(total: int) -> list[tuple[int, ...]]:
    d = int((total / 16) ** 0.5)
    return [(d, d)] * 16


def workloads() -> dict[str, list[tuple[int, ...]]]:
    return {
        "reference": reference_shapes(),
        "transformer-48": transformer_shapes(),
        "tiny-600": [(64,)] * 600,
        **{f"adamw-{m}M": _square(m * 2**20) for m in (1, 4, 17, 70)},
    }


def _params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return params


def time_steps(factory: Factory, shapes: list[tuple[int, ...]], device: str, steps: int, warmup: int) -> tuple:
    """(median ms per step, first step in s)."""
    torch._dynamo.reset()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    opt = factory(_params(shapes, device))
    sync()
    start = time.perf_counter()
    opt.step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, first


def screen_cost(name: str, shapes: list[tuple[int, ...]], device: str, rounds: int, warmup: int) -> dict[str, Any]:
    """The default screen against ``nonfinite="ignore"``, stepped in alternation (see the module docstring)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    hypers = HYPERS[name]
    screened = GRADSTEP[name](_params(shapes, device), **hypers)
    unscreened = GRADSTEP[name](_params(shapes, device), **hypers, nonfinite="ignore")
    times: dict[str, list[float]] = {"screened": [], "unscreened": []}
    pair = [("screened", screened), ("unscreened", unscreened)]
    for i in range(warmup + rounds):
        for label, opt in pair if i % 2 == 0 else pair[::-1]:
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["screened"], times["unscreened"])]
    return {
        "optimizer": name,
        "screened_ms": statistics.median(times["screened"]) * 1e3,
        "unscreened_ms": statistics.median(times["unscreened"]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_of_fastest": min(times["screened"]) / min(times["unscreened"]),
    }


def rows_for(
    name: str, shapes: list[tuple[int, ...]], device: str, steps: int, warmup: int, compiled: bool
) -> list[dict[str, Any]]:
    hypers = HYPERS[name]
    candidates: list[tuple[str, Factory]] = [
        ("torch fused", lambda ps: TORCH[name](ps, **hypers, fused=True)),
        ("torch foreach", lambda ps: TORCH[name](ps, **hypers, foreach=True)),
        ("gradstep default", lambda ps: GRADSTEP[name](ps, **hypers)),
        ("gradstep default, no screen", lambda ps: GRADSTEP[name](ps, **hypers, nonfinite="ignore")),
        ("gradstep chain", lambda ps: GRADSTEP[name](ps, **hypers, fused=False, nonfinite="ignore")),
    ]
    if compiled:
        candidates.append(
            ("gradstep compiled", lambda ps: GRADSTEP[name](ps, **hypers, compiled=True, nonfinite="ignore"))
        )
    rows = []
    for label, factory in candidates:
        ms, first = time_steps(factory, shapes, device, steps, warmup)
        rows.append({"optimizer": name, "implementation": label, "ms": ms, "first_step_s": first})
    base = rows[0]["ms"]
    for row in rows:
        row["x_torch_fused"] = row["ms"] / base
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"device {results['device']}, {results['threads']} threads, torch {results['torch']}",
        "",
        "| workload | tensors | parameters | optimizer | implementation | ms/step | x torch fused | first step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in results["workloads"]:
        for r in w["rows"]:
            lines.append(
                f"| {w['name']} | {w['tensors']} | {w['parameters'] / 1e6:.1f}M | {r['optimizer']} | "
                f"{r['implementation']} | {r['ms']:.2f} | {r['x_torch_fused']:.2f} | {r['first_step_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstep.lab.bench_workloads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = list(workloads())
    parser.add_argument("--only", nargs="+", choices=names, help="workloads to time (default: all)")
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(HYPERS), default=list(HYPERS), help="default: adamw adam sgd"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when present"
    )
    parser.add_argument(
        "--compiled-max-tensors",
        type=int,
        default=100,
        help="time the compiled path only on workloads with at most this many tensors (default: 100)",
    )
    parser.add_argument(
        "--screen", action="store_true", help="time the default screen against nonfinite='ignore' (alternating)"
    )
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gradstep-bench-inductor-"))
    results: dict[str, Any] = {
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "workloads": [],
    }
    for wname in args.only or names:
        shapes = workloads()[wname]
        optimizers = ["adamw"] if wname.startswith("adamw-") else args.optimizers
        entry: dict[str, Any] = {
            "name": wname,
            "tensors": len(shapes),
            "parameters": sum(torch.Size(s).numel() for s in shapes),
            "rows": [],
        }
        for name in optimizers:
            if args.screen:
                row = screen_cost(name, shapes, args.device, args.steps, args.warmup)
                entry["rows"].append(row)
                print(
                    f"{wname:15s} {name:6s} screened {row['screened_ms']:8.2f} ms, unscreened "
                    f"{row['unscreened_ms']:8.2f} ms: x{row['ratio']:.3f} "
                    f"(fastest steps x{row['ratio_of_fastest']:.3f})",
                    flush=True,
                )
                continue
            compiled = len(shapes) <= args.compiled_max_tensors
            for row in rows_for(name, shapes, args.device, args.steps, args.warmup, compiled):
                entry["rows"].append(row)
                print(
                    f"{wname:15s} {name:6s} {row['implementation']:28s} {row['ms']:9.2f} ms "
                    f"x{row['x_torch_fused']:.2f}",
                    flush=True,
                )
        results["workloads"].append(entry)
    if not args.screen:
        print()
        print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

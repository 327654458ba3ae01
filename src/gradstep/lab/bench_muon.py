"""Muon against torch.optim.Muon and pytorch_optimizer's Muon: one step's time, the same math on each side.

Workloads (2-D matrices only: Muon's parameters; every matrix gets a float32 gradient of ``N(0, 1e-4)``):

- ``reference``: 24 matrices of 512x512 (``--size``);
- ``transformer-48``: 48 transformer layers (``--layers``) of width 256 (``--width``), each a QKV matrix 768x256, an
  output matrix 256x256 and the two MLP matrices 1024x256 and 256x1024 (192 matrices, 37.7M parameters).

Each is timed twice: with the Newton-Schulz iteration in bfloat16 (torch's and pytorch_optimizer's fixed dtype,
gradstep's default ``ns_dtype``) and in float32. torch and pytorch_optimizer have no option for the latter, so for
those rows the benchmark replaces, while they step, torch's ``torch.optim._muon._zeropower_via_newtonschulz`` by the
same function without its ``bfloat16()`` cast (:func:`torch_newton_schulz_uncast`, line for line torch 2.13's) and
calls pytorch_optimizer's ``zero_power_via_newton_schulz_5`` with ``dtype=torch.float32``.

The hyperparameters are one configuration on all three sides (:data:`HYPERS`): lr 0.02, decoupled weight decay 0.1
(``p *= 1 - lr * wd``), momentum 0.95 with Nesterov (``buf.lerp_(g, 1 - m)``, update ``g.lerp(buf, m)``), 5
iterations of the quintic with Keller Jordan's coefficients (3.4445, -4.775, 2.0315), ``eps`` 1e-7 and the learning
rate scaled by ``sqrt(max(1, rows / cols))`` (torch's ``adjust_lr_fn=None``, pytorch_optimizer's
``use_adjusted_lr=False``). What differs is the implementation, not the math: torch orthogonalizes each matrix with
``addmm`` in a Python loop; pytorch_optimizer (``foreach`` on: its default) stacks the matrices of one shape into a
batch (a copy) and iterates with ``bmm``/``baddbmm`` into preallocated buffers, and writes the Nesterov blend into
``.grad`` in place; gradstep batches same-shape matrices (tall ones through their transpose) with ``baddbmm``.
Every gradient is restored from a copy before each step, outside the timed region (pytorch_optimizer's in-place blend
would otherwise shrink its gradients step after step towards the denormal range).

gradstep runs with its default non-finite screen (``nonfinite="error"``: one more read of each gradient and a host
sync per step, work the other two do not do); ``--no-screen`` gives it ``nonfinite="ignore"``.

Each row is the median of ``--steps`` timed steps after ``--warmup`` untimed ones. The three optimizers step in
alternation (one step each per round, the order rotated every round), each on its own copy of the workload, so that
a loaded machine slows all of them alike; the ratio is torch's (or pytorch_optimizer's) median over gradstep's.
``--profile`` adds, per row, one step under ``torch.profiler``: the share of its CPU time spent in matrix products
(``mm``, ``addmm``, ``bmm``, ``baddbmm``) and what the rest is.

    python -m gradstep.lab.bench_muon          # both workloads, both iterations (18 min on 2 busy cores)
    python -m gradstep.lab.bench_muon --only reference --iterations float32 --profile
    python -m gradstep.lab.bench_muon --width 1024 --threads 16   # the full-width transformer, on a larger machine
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.optim._muon as torch_muon
from torch import Tensor

import gradstep

from .bench_workloads import _params

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
HYPERS: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5}
ITERATIONS = ("bfloat16", "float32")
MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def reference_shapes(size: int = 512, count: int = 24) -> list[tuple[int, ...]]:
    """The reference workload: ``count`` square matrices."""
    return [(size, size)] * count


def transformer_shapes(layers: int = 48, width: int = 256) -> list[tuple[int, ...]]:
    """A transformer's matrices: per layer QKV, output and the two MLP weights (no embeddings, biases or norms)."""
    d = width
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def torch_newton_schulz_uncast(
    grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Tensor:
    """torch's ``_zeropower_via_newtonschulz`` (torch 2.13), line for line, without ``grad.bfloat16()``: it iterates
    in the gradient's dtype (float32 here; the parity tests' float64)."""
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _pytorch_optimizer() -> Any:
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    return pytorch_optimizer


def implementations(
    iteration: str, nonfinite: str = "error"
) -> dict[str, tuple[Factory, Callable[[], contextlib.AbstractContextManager]]]:
    """label -> (factory, the context each step runs in) for one iteration dtype."""
    f32 = iteration == "float32"
    plain: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    torch_ctx = (
        functools.partial(_patched, torch_muon, "_zeropower_via_newtonschulz", torch_newton_schulz_uncast)
        if f32
        else plain
    )
    table: dict[str, tuple[Factory, Callable[[], contextlib.AbstractContextManager]]] = {
        "torch.optim.Muon": (
            lambda ps: torch.optim.Muon(ps, **HYPERS, ns_coefficients=NS_COEFFICIENTS, eps=1e-7),
            torch_ctx,
        ),
        "gradstep.Muon": (
            lambda ps: gradstep.Muon(
                ps, **HYPERS, ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_dtype=iteration, nonfinite=nonfinite
            ),
            plain,
        ),
    }
    pto = _pytorch_optimizer()
    if pto is not None:
        from pytorch_optimizer.optimizer.muon import base as pto_base

        ns = functools.partial(pto_base.zero_power_via_newton_schulz_5, dtype=torch.float32)
        pto_ctx = functools.partial(_patched, pto_base, "zero_power_via_newton_schulz_5", ns) if f32 else plain
        table["pytorch_optimizer.Muon"] = (
            lambda ps: pto.Muon(
                [{"params": ps, "use_muon": True}],
                **HYPERS,
                ns_coeffs=NS_COEFFICIENTS,
                weight_decouple=True,
                use_adjusted_lr=False,
            ),
            pto_ctx,
        )
    return table


def matmul_share(step: Callable[[], object]) -> dict[str, Any]:
    """One step under the profiler: its CPU time, the share in matrix products, and the five costliest other ops."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    others = sorted((e for e in events if e.key not in MATMULS), key=lambda e: -e.self_cpu_time_total)[:5]
    return {
        "profiled_ms": total / 1e3,
        "matmul_share": matmul / total if total else 0.0,
        "top_other_ops": [(e.key, e.self_cpu_time_total / 1e3) for e in others],
    }


def time_alternating(
    shapes: list[tuple[int, ...]], iteration: str, steps: int, warmup: int, profile: bool, nonfinite: str = "error"
) -> list[dict[str, Any]]:
    """Every implementation on its own copy of ``shapes``, stepped in alternation (see the module docstring)."""
    table = implementations(iteration, nonfinite)
    opts = {}
    grads = {}
    for label, (factory, ctx) in table.items():
        params = _params(shapes, "cpu")
        grads[label] = [(p.grad, p.grad.clone()) for p in params if p.grad is not None]
        opts[label] = (factory(params), ctx)
    labels = list(opts)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + steps):
        k = i % len(labels)
        for label in labels[k:] + labels[:k]:
            opt, ctx = opts[label]
            for grad, original in grads[label]:
                grad.copy_(original)
            with ctx():
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
            if i >= warmup:
                times[label].append(elapsed)
    base = statistics.median(times["gradstep.Muon"])
    rows = []
    for label in labels:
        ms = statistics.median(times[label])
        row: dict[str, Any] = {"implementation": label, "iteration": iteration, "ms": ms * 1e3, "x_gradstep": ms / base}
        if profile:
            opt, ctx = opts[label]
            with ctx():
                row.update(matmul_share(opt.step))
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['threads']} threads, torch {results['torch']}, load average before/after "
        f"{results['load_before']} / {results['load_after']}",
        "",
        "| workload | iteration | implementation | ms/step | x gradstep | matmul share |",
        "|---|---|---|---|---|---|",
    ]
    for w in results["workloads"]:
        for r in w["rows"]:
            share = f"{r['matmul_share']:.0%}" if "matmul_share" in r else "-"
            lines.append(
                f"| {w['name']} | {r['iteration']} | {r['implementation']} | {r['ms']:.1f} | "
                f"{r['x_gradstep']:.2f} | {share} |"
            )
    return "\n".join(lines)


def _load() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradstep.lab.bench_muon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=["reference", "transformer-48"], help="default: both")
    parser.add_argument("--iterations", nargs="+", choices=ITERATIONS, default=list(ITERATIONS))
    parser.add_argument("--size", type=int, default=512, help="the reference workload's matrices (default: 512)")
    parser.add_argument("--layers", type=int, default=48, help="the transformer's layers (default: 48)")
    parser.add_argument("--width", type=int, default=256, help="the transformer's width (default: 256)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per implementation (default: 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each row")
    parser.add_argument(
        "--no-screen", action="store_true", help="gradstep with nonfinite='ignore' (default: its non-finite screen)"
    )
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    nonfinite = "ignore" if args.no_screen else "error"
    workloads = {
        "reference": reference_shapes(args.size),
        "transformer-48": transformer_shapes(args.layers, args.width),
    }
    results: dict[str, Any] = {
        "threads": args.threads,
        "torch": torch.__version__,
        "load_before": _load(),
        "width": args.width,
        "layers": args.layers,
        "size": args.size,
        "gradstep_nonfinite": nonfinite,
        "workloads": [],
    }
    for name in args.only or list(workloads):
        shapes = workloads[name]
        entry: dict[str, Any] = {
            "name": name,
            "matrices": len(shapes),
            "parameters": sum(torch.Size(s).numel() for s in shapes),
            "rows": [],
        }
        for iteration in args.iterations:
            for row in time_alternating(shapes, iteration, args.steps, args.warmup, args.profile, nonfinite):
                entry["rows"].append(row)
                share = f" matmul {row['matmul_share']:.0%}" if "matmul_share" in row else ""
                print(
                    f"{name:15s} {iteration:9s} {row['implementation']:24s} {row['ms']:9.2f} ms "
                    f"x{row['x_gradstep']:.2f}{share}  (load {_load()})",
                    flush=True,
                )
        results["workloads"].append(entry)
    results["load_after"] = _load()
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

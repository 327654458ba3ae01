"""The device check: gradstep's eager, fused and compiled paths on an accelerator, against a float64 CPU reference,
and their step times against torch's fused optimizers on the same device.

Run where a GPU is present (it picks ``cuda`` when torch sees one, else the CPU, so the same script is tested in CI
without a GPU)::

    python -m gradstep.lab.cuda_check --out cuda-check.json        # checks, then timings (a few minutes on a GPU)
    python -m gradstep.lab.cuda_check --quick                      # tiny sizes: what the test suite runs on the CPU

Correctness: each optimizer and path steps a few float32 tensors on the device for ``--check-steps`` steps with a
fixed gradient function; the same run in float64 on the CPU (gradstep's eager path, itself held to the originals by
the parity tests) is the reference. The bound is derived from float32 precision, ``steps * 64 * 2**-24`` relative
(each step's update carries a few float32 roundings, amplified at most a few times by the normalisations), far below
what a wrong formula gives. Timing: median milliseconds per step after warm-up, the ratio to torch's fused
optimizer of the same algorithm where torch has one, else to torch's fused AdamW.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from .bench_workloads import reference_shapes, time_steps, transformer_shapes

CHECKED = ("adamw", "adam", "sgd", "lamb", "adan")
"""The optimizers checked and timed: the three torch has fused kernels for, one per-tensor reduction, one with
three moments."""

HYPERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.05, "betas": (0.9, 0.99)},
    "adam": {"lr": 1e-2, "weight_decay": 0.01},
    "sgd": {"lr": 5e-2, "momentum": 0.9, "nesterov": True},
    "lamb": {"lr": 1e-2, "weight_decay": 0.01},
    "adan": {"lr": 1e-2, "weight_decay": 0.02},
}

TORCH_FUSED: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((64, 32), (32,), (8, 4, 3, 3), ())


def pick_device(name: str) -> torch.device:
    """``auto``: ``cuda`` when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _grad(p: torch.Tensor, t: int, i: int) -> torch.Tensor:
    return torch.sin(3 * p + t + i) + 0.3 * p


def _params(shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter((torch.rand(s, generator=gen, dtype=torch.float64) * 3 - 1.5).to(dtype).to(device))
        for s in shapes
    ]


def _run(
    opt_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: list[torch.Tensor], steps: int
) -> list[torch.Tensor]:
    opt = opt_factory(params)
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = _grad(p.detach(), t, i)
        opt.step()
    return [p.detach().to("cpu", torch.float64) for p in params]


def paths(compiled: bool = True) -> dict[str, dict[str, Any]]:
    """gradstep's paths as constructor options (fused is tried, and skipped where refused)."""
    chosen: dict[str, dict[str, Any]] = {"eager": {"fused": False}, "fused": {"fused": True}}
    if compiled:
        chosen["compiled"] = {"compiled": True}
    return chosen


def check(device: torch.device, steps: int, compiled: tuple[str, ...] = CHECKED) -> list[dict[str, Any]]:
    """Each optimizer and path on ``device`` in float32 against the float64 CPU eager run."""
    import gradstep

    bound = steps * 64 * 2.0**-24
    rows = []
    for name in CHECKED:
        hypers = HYPERS[name]
        cpu64 = _params(CHECK_SHAPES, torch.float64, torch.device("cpu"))
        reference = _run(functools.partial(gradstep.create, name, **hypers, fused=False), cpu64, steps)
        for path, options in paths(name in compiled).items():
            row: dict[str, Any] = {"optimizer": name, "path": path, "device": str(device), "steps": steps}
            row["bound"] = bound
            try:
                got = _run(
                    functools.partial(gradstep.create, name, **hypers, **options),
                    _params(CHECK_SHAPES, torch.float32, device),
                    steps,
                )
            except (TypeError, ValueError) as exc:  # a path this optimizer does not offer
                row.update(status="not offered", reason=str(exc).splitlines()[0][:160])
                rows.append(row)
                continue
            worst = max(
                float((a - b).abs().max()) / max(float(a.abs().max()), float(b.abs().max()), 1e-30)
                for a, b in zip(reference, got)
            )
            row.update(status="ok" if worst <= bound else "FAIL", max_relative_difference=worst)
            rows.append(row)
    return rows


def check_screen(device: torch.device) -> list[dict[str, Any]]:
    """The default non-finite screen on ``device``: a NaN, an infinity, or a finite gradient whose elements would
    overflow a float32 sum, in one of many tensors; the first two must be refused naming the parameter, leaving
    everything as it was, the third must be stepped."""
    import gradstep
    from gradstep.core.nonfinite import NonFiniteError

    rows = []
    for label, value, refused in (("nan", float("nan"), True), ("-inf", float("-inf"), True), ("3e38", 3e38, False)):
        params = _params(tuple((64,) for _ in range(50)), torch.float32, device)
        opt = gradstep.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.zeros_like(p)
        bad = torch.zeros(64, device=device)
        bad[5:7] = value
        params[37].grad = bad
        before = [p.detach().clone() for p in params]
        try:
            opt.step()
            outcome = "stepped"
        except NonFiniteError as exc:
            outcome = "refused" if "[37]" in str(exc) else f"refused, naming another parameter: {exc}"
        unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, params))
        ok = outcome == ("refused" if refused else "stepped") and unchanged == refused
        rows.append(
            {
                "optimizer": "adamw",
                "path": f"screen {label}",
                "status": "ok" if ok else "FAIL",
                "outcome": outcome,
                "unchanged": unchanged,
                "device": str(device),
            }
        )
    return rows


def workloads(scale: float) -> dict[str, list[tuple[int, ...]]]:
    """The reference workload (17.6M parameters, 24 tensors) and a 48-block transformer (580 tensors, ~6M)."""
    width = max(8, int(128 * scale**0.5))
    return {"reference": reference_shapes(scale), "transformer-48": transformer_shapes(48, width)}


def _time(
    make: Callable[..., torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    device: torch.device,
    steps: int,
    warmup: int,
) -> tuple[float, float]:
    """(median ms per step, first step in s): the workloads benchmark's timer."""
    ms, first = time_steps(make, shapes, str(device), steps, warmup)
    return ms, first


def timings(
    device: torch.device,
    scale: float,
    steps: int,
    warmup: int,
    compiled_max_tensors: int = 100,
    compiled: tuple[str, ...] = CHECKED,
) -> list[dict[str, Any]]:
    import gradstep

    rows = []
    for workload, shapes in workloads(scale).items():
        base_fused, _ = _time(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), shapes, device, steps, warmup)
        for name in CHECKED:
            hypers = HYPERS[name]
            torch_ms = None
            if name in TORCH_FUSED:
                torch_ms, _ = _time(
                    functools.partial(TORCH_FUSED[name], **hypers, fused=True), shapes, device, steps, warmup
                )
            for path, options in paths(name in compiled and len(shapes) <= compiled_max_tensors).items():
                row: dict[str, Any] = {"workload": workload, "optimizer": name, "path": path, "device": str(device)}
                try:
                    ms, first = _time(
                        functools.partial(gradstep.create, name, **hypers, **options, nonfinite="ignore"),
                        shapes,
                        device,
                        steps,
                        warmup,
                    )
                except (TypeError, ValueError) as exc:
                    row.update(status="not offered", reason=str(exc).splitlines()[0][:160])
                    rows.append(row)
                    continue
                reference_ms = torch_ms if torch_ms is not None else base_fused
                row.update(
                    ms=ms,
                    first_step_s=first,
                    torch_fused_ms=reference_ms,
                    torch_reference="torch fused " + (name if torch_ms is not None else "adamw"),
                    ratio=ms / reference_ms,
                )
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradstep.lab.cuda_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cuda or cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, few steps, the compiled path checked for AdamW alone and not timed (the CPU test)",
    )
    parser.add_argument("--check-steps", type=int, default=20, help="steps of each correctness run (default 20)")
    parser.add_argument("--scale", type=float, default=1.0, help="workload size factor (default 1.0: 17.6M params)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first (default 5)")
    parser.add_argument("--skip-timings", action="store_true", help="correctness only")
    parser.add_argument(
        "--compiled",
        nargs="*",
        choices=CHECKED,
        default=list(CHECKED),
        help="the optimizers whose compiled path is checked and timed (default: all; compiling takes a while)",
    )
    parser.add_argument(
        "--compiled-max-tensors",
        type=int,
        default=100,
        help="time the compiled path only on workloads with at most this many tensors (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.check_steps, args.scale, args.steps, args.warmup = 5, 0.001, 2, 1
    device = pick_device(args.device)
    results: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    compiled = ("adamw",) if args.quick else tuple(args.compiled)
    results["checks"] = check(device, args.check_steps, compiled) + check_screen(device)
    for row in results["checks"]:
        shown = row.get("max_relative_difference", row.get("reason", row.get("outcome", "")))
        print(f"check {row['optimizer']:6} {row['path']:9} {row['status']:12} {shown}", flush=True)
    if not args.skip_timings:
        limit = 0 if args.quick else args.compiled_max_tensors
        results["timings"] = timings(device, args.scale, args.steps, args.warmup, limit, compiled)
        for row in results["timings"]:
            if row.get("status") == "not offered":
                continue
            print(
                f"time {row['workload']:15} {row['optimizer']:6} {row['path']:9} {row['ms']:9.3f} ms "
                f"x{row['ratio']:.2f} of {row['torch_reference']} (first step {row['first_step_s']:.1f} s)",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    failed = [r for r in results["checks"] if r["status"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

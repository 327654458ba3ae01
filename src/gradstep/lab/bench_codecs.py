"""State codecs on the CPU: state bytes per parameter, time and peak extra memory of one AdamW step.

``python -m gradstep.lab.bench_codecs`` prints a Markdown table (BENCHMARKS.md, "Compact optimizer state") for
gradstep's AdamW with each ``state_codec`` (eager, and compiled with ``:compiled``), torch's AdamW and, where they
are installed and run, torchao's AdamW8bit/AdamW4bit and bitsandbytes' AdamW8bit. Two models: ``1M`` (a 1024 x 512
embedding and two 512 x 512 linears) and ``17M`` (a 16384 x 768 embedding and a 768-3072-768 MLP, 17.3M parameters).

Each optimizer gets random gradients, takes two steps (state created, compiled code built), then the best of
``--reps`` timed steps is reported; the peak extra memory is the most CPU memory torch held during one more step
above what it held before it (the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradstep

KINDS = (
    "fp32,bf16,bf16+ecc,int8,int4,fp8,fp32:compiled,int8:compiled,int4:compiled,torch,torchao-8bit,torchao-4bit,"
    "bnb-8bit"
)


def model_of(size: str) -> nn.Module:
    torch.manual_seed(0)
    if size == "17M":
        return nn.Sequential(nn.Embedding(16384, 768), nn.LayerNorm(768), nn.Linear(768, 3072), nn.Linear(3072, 768))
    if size == "1M":
        return nn.Sequential(nn.Embedding(1024, 512), nn.LayerNorm(512), nn.Linear(512, 512), nn.Linear(512, 512))
    raise ValueError(f"size must be 1M or 17M, got {size!r}")


def optimizer_of(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``CODEC`` or ``CODEC:compiled`` (gradstep's AdamW), ``torch``, ``torchao-8bit``/``-4bit``, ``bnb-8bit``."""
    if kind.startswith("torchao-"):
        import torchao.optim

        return {"torchao-8bit": torchao.optim.AdamW8bit, "torchao-4bit": torchao.optim.AdamW4bit}[kind](params, lr=1e-3)
    if kind == "bnb-8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-3)
    if kind == "torch":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    codec, _, mode = kind.partition(":")
    return gradstep.AdamW(params, lr=1e-3, state_codec=codec, compiled=mode == "compiled")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (torchao's quantized subclasses: their codes and scales)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            parts = [value.codes, value.scale] if hasattr(value, "codes") else [value]  # type: ignore[attr-defined]
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def peak_extra_bytes(step: Callable[[], Any]) -> int:
    """The most CPU memory torch held during ``step()`` above what it held before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    events.sort(key=lambda e: e["ts"])
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - before


def measure(kind: str, size: str, reps: int) -> dict[str, float]:
    params = list(model_of(size).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = optimizer_of(kind, params)
    opt.step()
    opt.step()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - start)
    numel = sum(p.numel() for p in params)
    return {"numel": numel, "step": best, "peak": peak_extra_bytes(opt.step), "bytes": state_bytes(opt) / numel}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1M,17M", help="comma-separated: 1M, 17M")
    parser.add_argument("--kinds", default=KINDS, help="comma-separated optimizers (see optimizer_of)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps (the best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("| model | optimizer | state bytes / parameter | step | vs fp32 eager | peak extra memory |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        reference = None
        for kind in args.kinds.split(","):
            try:
                m = measure(kind, size, args.reps)
            except Exception as error:  # a library that does not run here: say so, go on
                print(f"| {size} | {kind} | did not run: {type(error).__name__}: {str(error)[:100]} | | | |")
                continue
            reference = m["step"] if kind == "fp32" else reference
            ratio = f"{m['step'] / reference:.2f}x" if reference else ""
            print(
                f"| {size} ({m['numel'] / 1e6:.1f}M) | {kind} | {m['bytes']:.2f} | {m['step'] * 1e3:.1f} ms | {ratio} "
                f"| {m['peak'] / 2**20:.1f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()

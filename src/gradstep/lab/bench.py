"""The speed benchmark: every optimizer's step time against the memory-bandwidth floor, torch and the peers.

An optimizer step is memory-bound: it must read the parameter, its gradient and each state tensor, and write the
parameter and each state tensor back, ``4 * (3 + 2 * state_tensors)`` bytes per float32 parameter (Adam: 28). The
floor is that many bytes at the bandwidth of an in-place elementwise op (``x *= c``) over the same tensors, measured
in the same run. The workload is shaped like a small transformer: 17.6M float32 parameters in 24 tensors (twelve
1024x1024, one 4096x1024, three 1024x256, eight 1024-vectors); ``--scale`` shrinks it.

Each row: median ms/step over ``--steps`` steps after warm-up, x floor, ratio to torch's fused AdamW, ratio to each
installed peer of the same algorithm, first-step time (compilation included for the compiled path), state bytes per
parameter and the step's peak extra memory (allocations during one step, from the profiler; CPU only). The machine is
noisy: compare ratios within one run, not across runs.

gradstep runs with ``nonfinite="ignore"`` by default: the same work as torch.optim and the peers, none of which checks
gradients. ``--modes screened`` adds a compiled row with the default ``nonfinite="error"`` screen, to show its cost (one
more read of the gradients and one host sync per step). First steps are measured with an empty inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``): what a user's first run pays; later runs load the compiled code from the cache.

Optimizers that cannot take the workload as it is are adapted from their registry entry, and each adaptation is
printed with the results: an optimizer that needs a closure (L-BFGS) steps with a cheap one (a linear loss whose
gradient is the fixed one already in ``.grad``: the closure's cost, one dot product over the parameters, is in every
row of that optimizer, the peers' too); a matrix optimizer (``Entry.min_ndim``: Muon) gets only the workload's tensors
of that many dimensions; one that takes sparse gradients only (SparseAdam) is left out; one without a compiled path
runs eager only. An optimizer with a ``train()`` method (schedule-free) is put in training mode before its first step.

    gradstep bench                          # every registered optimizer, eager and compiled (about 20 minutes)
    gradstep bench --only adam lamb --scale 0.25
    gradstep bench --only adamw --modes compiled screened
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch._dynamo

from ..core.nonfinite import POLICIES
from ..core.registry import entries, get
from .peers import implementations

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

SAME_AS_PEERS: dict[str, dict[str, float]] = {"sgd": {"momentum": 0.9}, "fastai_sgd": {"momentum": 0.9}}
"""Hyperparameters that give gradstep the configuration its peers run in :func:`gradstep.lab.peers.implementations`."""


MODES = ("eager", "compiled", "screened")
"""gradstep's rows: the eager path, the fast path, and the fast path with the default non-finite screen."""


def _gradstep_factory(name: str, mode: str, nonfinite: str = "ignore") -> Factory:
    entry = get(name)
    hypers = {**{k: entry.example[k] for k in entry.required_args}, **SAME_AS_PEERS.get(name, {})}
    accepted = entry.hyperparameters()
    if mode == "screened":
        nonfinite = "error"
    if "compiled" in accepted:
        hypers["compiled"] = mode != "eager"
    if "nonfinite" in accepted:
        hypers["nonfinite"] = nonfinite

    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return entry(params, **hypers)

    return build


def workload(scale: float = 1.0) -> list[tuple[int, ...]]:
    d = max(8, int(1024 * scale**0.5))
    return [(d, d)] * 12 + [(4 * d, d)] + [(d, d // 4)] * 3 + [(d,)] * 8


def excluded(name: str) -> str | None:
    """Why ``name`` is not timed on the workload, or ``None``: read from its registry entry's capabilities."""
    if get(name).capabilities.sparse_only:
        return "takes sparse gradients only; the workload's gradients are dense"
    return None


def adaptations(name: str, shapes: list[tuple[int, ...]], modes: tuple[str, ...]) -> list[str]:
    """How the workload or the modes are changed for ``name`` (empty when it runs as every other optimizer)."""
    entry = get(name)
    notes = []
    min_ndim = getattr(entry, "min_ndim", 0)
    if min_ndim > 1:
        kept = _eligible(name, shapes)
        notes.append(
            f"only the workload's {min_ndim}-D or larger tensors ({len(kept)} of {len(shapes)}, "
            f"{sum(torch.Size(s).numel() for s in kept) / 1e6:.2f}M of "
            f"{sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f}M parameters): it refuses the others"
        )
    if entry.capabilities.closure_required:
        notes.append("steps with a closure (a linear loss; the closure's dot product is timed too, the peers' as well)")
    if "compiled" not in entry.hyperparameters() and any(m != "eager" for m in modes):
        notes.append("no compiled path: eager row only")
    return notes


def _eligible(name: str, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    min_ndim = getattr(get(name), "min_ndim", 0)
    return [s for s in shapes if len(s) >= min_ndim]


def _modes_for(name: str, modes: tuple[str, ...]) -> tuple[str, ...]:
    return modes if "compiled" in get(name).hyperparameters() else tuple(m for m in modes if m == "eager")


def _linear_loss_closure(params: list[torch.nn.Parameter]) -> Callable[[], float]:
    """A closure for optimizers that need one: the loss ``sum(p . g)`` for the fixed gradients ``g`` already in
    ``.grad``, so the closure computes no gradient and its cost is one read of the parameters and gradients."""
    pairs = [(p.detach().view(-1), p.grad.detach().view(-1)) for p in params if p.grad is not None]

    def closure() -> float:
        return float(torch.stack([torch.dot(p, g) for p, g in pairs]).sum())

    return closure


def _params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return params


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth(shapes: list[tuple[int, ...]], device: str, repeats: int = 20) -> float:
    """Bytes per second of ``x *= c`` over the workload's tensors (read and write: 8 bytes per element)."""
    xs = [p.detach() for p in _params(shapes, device)]
    n = sum(x.numel() for x in xs)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch._foreach_mul_(xs, 0.999)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 8 * n / best


@contextlib.contextmanager
def _silenced_fds() -> Iterator[None]:
    """Standard output and error silenced at the file-descriptor level: the profiler's C++ side writes its own
    messages there (``profiler_start``, ``Memory block of unknown size``), which would land among the results."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _peak_extra_bytes(step: Callable[[], object]) -> int:
    """Peak bytes allocated during one step on the CPU, from the profiler's allocation and free events.

    The raw events are read because the profiler's per-op totals attribute frees to enclosing annotations. State the
    step creates counts too: measure after a first step.
    """
    from torch.profiler import ProfilerActivity, profile

    with _silenced_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


@dataclass
class Row:
    optimizer: str
    implementation: str
    ms: float
    floor_ms: float
    first_step_s: float
    state_bytes: int
    peak_extra_mb: float | None

    @property
    def x_floor(self) -> float:
        return self.ms / self.floor_ms


def measure(
    factory: Factory,
    shapes: list[tuple[int, ...]],
    device: str,
    steps: int,
    warmup: int,
    closure: bool = False,
) -> tuple:
    """Median ms/step, first-step seconds, state bytes per parameter, peak extra MB; ``closure``: step(closure)."""
    torch._dynamo.reset()  # each measurement compiles from scratch: first-step times are comparable
    timed = _Timed(factory, shapes, device, closure)
    for _ in range(warmup):
        timed.step()
    for _ in range(steps):
        timed.time_one()
    return timed.result()


def measure_rotated(
    factories: dict[str, Factory],
    shapes: list[tuple[int, ...]],
    device: str,
    steps: int,
    warmup: int,
    closure: bool = False,
) -> dict[str, tuple]:
    """:func:`measure` for several implementations of one optimizer (by label), their timed steps taken in rotation.

    Each round times one step of every implementation, starting from a different one each round, so that a change
    in the machine's load (other processes, frequency) falls on all of them alike instead of on whichever was timed
    during it; every implementation keeps its own parameters and state. Compiled code is reset once, before the
    first implementation is built. An implementation that fails on this workload is reported and left out.
    """
    torch._dynamo.reset()
    timed: dict[str, _Timed] = {}
    for label, factory in factories.items():
        try:
            timed[label] = _Timed(factory, shapes, device, closure)
            for _ in range(warmup):
                timed[label].step()
        except Exception as exc:  # a peer that fails on this workload is reported, not fatal
            print(f"# {label}: {type(exc).__name__}: {exc}")
            timed.pop(label, None)
    labels = list(timed)
    for round_ in range(steps):
        for i in range(len(labels)):
            timed[labels[(round_ + i) % len(labels)]].time_one()
    return {label: timed[label].result() for label in labels}


class _Timed:
    """One implementation under measurement: its parameters, optimizer, first-step time and timed steps."""

    def __init__(self, factory: Factory, shapes: list[tuple[int, ...]], device: str, closure: bool) -> None:
        self.device = device
        self.params = _params(shapes, device)
        self.opt = factory(self.params)
        train = getattr(self.opt, "train", None)
        if callable(train):  # schedule-free optimizers step in training mode
            train()
        self.loss = _linear_loss_closure(self.params) if closure else None
        self.times: list[float] = []
        self.first = self.time_one(record=False)

    def step(self) -> object:
        return self.opt.step(self.loss) if self.loss is not None else self.opt.step()

    def time_one(self, record: bool = True) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if record:
            self.times.append(elapsed)
        return elapsed

    def result(self) -> tuple:
        n = sum(p.numel() for p in self.params)
        state = sum(
            v.numel() * v.element_size()
            for s in self.opt.state.values()
            if isinstance(s, dict)
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        peak = _peak_extra_bytes(self.step) / 2**20 if self.device == "cpu" else None
        return statistics.median(self.times) * 1e3, self.first, round(state / n), peak


def run(
    names: list[str] | None = None,
    scale: float = 1.0,
    steps: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    modes: tuple[str, ...] = ("eager", "compiled"),
    peers: bool = True,
    report: Callable[[Row], None] | None = None,
    nonfinite: str = "ignore",
    notes: list[str] | None = None,
    rotate: bool = False,
) -> tuple[float, list[Row]]:
    """Measure; returns the bandwidth (bytes/s) and one row per (optimizer, implementation).

    ``rotate``: time each optimizer's implementations in rotation (:func:`measure_rotated`), one after the other
    otherwise (:func:`measure`, each compiled from scratch).

    ``notes`` receives one line per optimizer left out or adapted (see :func:`excluded`, :func:`adaptations`).
    """
    shapes = workload(scale)
    bw = bandwidth(shapes, device)
    table = implementations() if peers else {}
    rows: list[Row] = []
    for name in names or [e.name for e in entries()]:
        entry = get(name)
        reason = excluded(name)
        for line in [f"left out: {reason}"] if reason else adaptations(name, shapes, modes):
            print(f"# {name}: {line}")
            if notes is not None:
                notes.append(f"{name}: {line}")
        if reason:
            continue
        own_shapes = _eligible(name, shapes)
        own_n = sum(torch.Size(s).numel() for s in own_shapes)
        state_tensors = entry.capabilities.state_tensors + (1 if name in SAME_AS_PEERS else 0)
        floor_ms = 4 * (3 + 2 * state_tensors) * own_n / bw * 1e3
        candidates = [
            (f"gradstep {mode}", _gradstep_factory(name, mode, nonfinite)) for mode in _modes_for(name, modes)
        ]
        candidates += list(table.get(name, {}).items())
        closure = entry.capabilities.closure_required
        if rotate:
            results = measure_rotated(dict(candidates), own_shapes, device, steps, warmup, closure)
            for label, (ms, first, state, peak) in results.items():
                row = Row(name, label, ms, floor_ms, first, state, peak)
                rows.append(row)
                if report is not None:
                    report(row)
            continue
        for label, factory in candidates:
            try:
                ms, first, state, peak = measure(factory, own_shapes, device, steps, warmup, closure)
            except Exception as exc:  # a peer that fails on this workload is reported, not fatal
                print(f"# {name} {label}: {type(exc).__name__}: {exc}")
                continue
            row = Row(name, label, ms, floor_ms, first, state, peak)
            rows.append(row)
            if report is not None:
                report(row)
    return bw, rows


def _fused_adamw_ms(rows: list[Row], shapes: list[tuple[int, ...]], device: str, steps: int, warmup: int) -> float:
    for row in rows:
        if row.optimizer == "adamw" and row.implementation == "torch fused":
            return row.ms
    return measure(lambda p: torch.optim.AdamW(p, fused=True), shapes, device, steps, warmup)[0]


def markdown(bw: float, rows: list[Row], fused_adamw_ms: float, notes: list[str] | None = None) -> str:
    lines = [
        f"bandwidth {bw / 1e9:.1f} GB/s; torch fused AdamW {fused_adamw_ms:.1f} ms/step",
        "",
        "| optimizer | implementation | ms/step | x floor | x torch fused AdamW | x gradstep compiled "
        "| first step (s) | state B/param | peak extra MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fast = {r.optimizer: r.ms for r in rows if r.implementation == "gradstep compiled"}
    for r in rows:
        vs_fast = f"{r.ms / fast[r.optimizer]:.2f}" if r.optimizer in fast else "-"
        peak = "-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.0f}"
        lines.append(
            f"| {r.optimizer} | {r.implementation} | {r.ms:.1f} | {r.x_floor:.2f} | {r.ms / fused_adamw_ms:.2f} "
            f"| {vs_fast} | {r.first_step_s:.2f} | {r.state_bytes} | {peak} |"
        )
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradstep bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="registry names to time (default: all)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the reference workload's parameter count (default: %(default)s; 0.25 is a quick run)",
    )
    parser.add_argument(
        "--steps", type=int, default=15, help="timed steps per row; the median is reported (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps after the first (timed apart as 'first step') and before the timed ones "
        "(default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the parameters live: cpu or cuda (default: %(default)s, cuda when available)",
    )
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled path")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, help="gradstep's rows (default: eager compiled; --eager-only: eager)"
    )
    parser.add_argument(
        "--nonfinite",
        default="ignore",
        choices=POLICIES,
        help="gradstep's non-finite policy in the eager and compiled rows (default: ignore, the peers' behaviour)",
    )
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep the user's inductor cache (first steps then reuse it)"
    )
    parser.add_argument("--no-peers", action="store_true", help="time gradstep only")
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="time each optimizer's implementations in rotation, one step of each per round, so that the machine's "
        "changing load falls on all of them alike (default: one after the other)",
    )
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = workload(args.scale)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"# {n / 1e6:.1f}M float32 parameters in {len(shapes)} tensors, device {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")  # fmt: skip
    modes = tuple(args.modes) if args.modes else ("eager",) if args.eager_only else ("eager", "compiled")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradstep-bench-inductor-")

    def report(row: Row) -> None:
        print(f"  {row.optimizer:18s} {row.implementation:20s} {row.ms:8.1f} ms  x floor {row.x_floor:5.2f}")

    notes: list[str] = []
    bw, rows = run(
        args.only,
        args.scale,
        args.steps,
        args.warmup,
        args.device,
        modes,
        not args.no_peers,
        report,
        args.nonfinite,
        notes,
        args.rotate,
    )
    fused = _fused_adamw_ms(rows, shapes, args.device, args.steps, args.warmup)
    print()
    print(markdown(bw, rows, fused, notes))
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump({"bandwidth": bw, "fused_adamw_ms": fused, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

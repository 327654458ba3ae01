"""The ``gradstep`` command line (also ``python -m gradstep``).

::

    gradstep list [--verbose] [--json]                    every optimizer: paper, originals, defaults, state size
    gradstep info NAME [--json]                           one optimizer in full
    gradstep compare OPT [OPT ...] [--task digits-mlp] [--lr auto] [--epochs N | --steps N] [--out DIR] [--json [PATH]]
    gradstep lr-find OPT [--task digits-mlp] [--start-lr 1e-7] [--end-lr 10] [--steps 100] [--out DIR]
    gradstep bench [--only NAME ...] [--scale 0.25] ...   the speed benchmark (gradstep.bench)
    gradstep inspect CHECKPOINT [--json] [--convert-to adam|adamw|sgd --output PATH]

An optimizer on the command line is ``name`` or ``name:key=value,key=value`` with Python literals as values
(``adam:lr=3e-3,betas=(0.9,0.99)``; quote it for the shell when it holds parentheses or strings). The tasks are
those of :mod:`gradstep.tasks`: ``digits-mlp`` (alias ``digits``), ``digits-cnn``, ``char-lm``, ``rosenbrock`` and
``rastrigin``.

``compare`` writes ``results.json``, ``loss-curves.png`` (and ``trajectories.png`` for the 2-D functions,
``lr-sweep.png`` with ``--lr auto``) and ``report.html``, which embeds the pictures, into ``--out`` (default
``gradstep-out/compare-TASK``); ``--no-report`` writes nothing. ``lr-find`` writes ``lr-find.png`` and
``lr-find.json`` the same way (default ``gradstep-out/lr-find-TASK``).

Errors are one line on stderr, ``gradstep: error: ...``: exit status 2 for a bad command line (unknown optimizer or
task, malformed or invalid hyperparameter, an output path that cannot be written, a checkpoint that cannot be
read), 1 when something the command needs is missing (scikit-learn) or fails while running (with the environment
variable ``GRADSTEP_TRACEBACK=1``, such a failure shows its traceback). This module parses and
prints; training is :mod:`gradstep.tasks`, pictures :mod:`gradstep.plots`, the HTML :mod:`gradstep.report`,
checkpoints :mod:`gradstep.checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import torch

from . import __version__
from .core.hypers import REQUIRED, Hyper
from .core.optimizer import CORE_HYPERS
from .core.registry import Entry, entries, get, parse_spec

__all__ = ["main"]

PROG = "gradstep"
USAGE_ERROR = 2
RUNTIME_ERROR = 1

_CORE = {h.name: h for h in CORE_HYPERS}


class CommandError(Exception):
    """A failure reported as one line on stderr; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors reduced to the one line ``gradstep: error: ...`` (no usage block)."""

    def error(self, message: str) -> NoReturn:
        # Subparsers are "gradstep compare" etc.; name the subcommand in the message, not in the prefix.
        where = self.prog[len(PROG) :].strip()
        raise CommandError(f"{where}: {message}" if where else message)


# --- describing optimizers --------------------------------------------------------------------------------------


def _instance(entry: Entry) -> torch.optim.Optimizer:
    """A throwaway instance with the entry's defaults (a preset's required values get a placeholder)."""
    placeholders = {k: entry.example.get(k, 1e-3) for k in entry.required_args}
    return entry([torch.nn.Parameter(torch.zeros(4, 4))], **placeholders)


def _required(entry: Entry) -> list[str]:
    return list(entry.required_args)


def _defaults(entry: Entry) -> dict[str, Any]:
    """Every hyperparameter's default (``REQUIRED`` where a preset has none)."""
    return entry.hyperparameters()


def _declared(entry: Entry) -> dict[str, Hyper]:
    declared = getattr(_instance(entry), "declared_hypers", None)
    return declared() if callable(declared) else {}


def _key_hypers(defaults: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters worth a compact listing: the algorithm's own, lr, weight decay, and core options whose
    default this optimizer changes (AdamW's decoupled decay)."""
    keep = {"lr", "weight_decay"}
    chosen = {
        k: v
        for k, v in defaults.items()
        if k not in _CORE or k in keep or (v is not REQUIRED and v != _CORE[k].default)
    }
    # lr first: it is what one reads and changes first.
    return dict(sorted(chosen.items(), key=lambda kv: kv[0] != "lr"))


def _fmt_value(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return repr(value)


def _fmt_spec(name: str, hypers: dict[str, Any]) -> str:
    """``name:k=v,...`` as typed on the command line (no spaces inside tuples)."""
    if not hypers:
        return name
    return name + ":" + ",".join(f"{k}={repr(v).replace(', ', ',')}" for k, v in hypers.items())


def _jsonable(value: Any) -> Any:
    if value is REQUIRED:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _short_paper(paper: str) -> str:
    """``"Kingma & Ba, 2015. Adam: ..."`` -> ``"Kingma & Ba, 2015"``."""
    return paper.split(". ", 1)[0].split("; ", 1)[0]


def _describe(entry: Entry) -> dict[str, Any]:
    """Everything ``list --json`` and ``info --json`` say about one optimizer."""
    caps = entry.capabilities
    defaults = _defaults(entry)
    declared = _declared(entry)
    return {
        "name": entry.name,
        "class": f"{entry.cls.__module__}.{entry.cls.__qualname__}",
        "summary": entry.summary,
        "paper": entry.paper,
        "originals": list(entry.originals),
        "preset": _jsonable(entry.preset),
        "required": _required(entry),
        "hyperparameters": _jsonable(defaults),
        "docs": {name: declared[name].doc for name in defaults if name in declared},
        "core_hyperparameters": [name for name in defaults if name in _CORE],
        "example": _fmt_spec(entry.name, entry.example),
        "capabilities": {
            "state_tensors": caps.state_tensors,
            "state_bytes_per_param": caps.state_bytes_per_param,
            "supports_complex": caps.supports_complex,
            "supports_sparse": caps.supports_sparse,
            "closure_required": caps.closure_required,
            "sharding": caps.sharding,
        },
    }


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns padded to their widest cell; the columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cmd_list(args: argparse.Namespace) -> int:
    all_entries = entries()
    if args.json:
        print(json.dumps([_describe(e) for e in all_entries], indent=2))
        return 0
    if args.verbose:
        print("\n\n".join(_info_text(e) for e in all_entries))
        return 0
    rows = [["name", "state/param", "complex", "sharding", "paper", "summary"]]
    details = []
    for e in all_entries:
        caps = e.capabilities
        rows.append(
            [e.name, f"{caps.state_bytes_per_param} B", _yes(caps.supports_complex), caps.sharding]
            + [_short_paper(e.paper), e.summary]
        )
        key = _key_hypers(_defaults(e))
        details.append(
            [
                "    originals: " + ("; ".join(e.originals) if e.originals else "-"),
                "    " + "  ".join(f"{k}={_fmt_value(v)}" for k, v in key.items()),
            ]
        )
    header, *body = _table(rows)
    print(header)
    for line, lines in zip(body, details):
        print(line)
        print("\n".join(lines))
    print(
        f"\n{len(all_entries)} optimizers. `{PROG} info NAME` or `{PROG} list --verbose`: the full paper reference and"
    )
    print(
        "every hyperparameter with its doc. Core options shared by all (foreach, nonfinite, ...) are not shown above."
    )
    return 0


def _info_text(entry: Entry) -> str:
    d = _describe(entry)
    caps = d["capabilities"]
    defaults = _defaults(entry)
    lines = [
        f"{entry.name}: {entry.summary}",
        f"  class:      {d['class']}",
        f"  paper:      {entry.paper}",
        "  originals:  " + ("\n              ".join(entry.originals) if entry.originals else "-"),
        f"  state:      {caps['state_bytes_per_param']} bytes per float32 parameter element "
        f"({caps['state_tensors']} parameter-sized tensor(s))",
        f"  complex:    {_yes(caps['supports_complex'])}   sparse: {_yes(caps['supports_sparse'])}   "
        f"closure required: {_yes(caps['closure_required'])}",
        f"  sharding:   {caps['sharding']}",
    ]
    if entry.preset:
        preset = ", ".join(f"{k}={_fmt_value(v)}" for k, v in entry.preset.items())
        lines.append(f"  preset of:  {entry.cls.__name__} with {preset}")
    if entry.example:
        lines.append(f'  example:    {PROG} compare "{d["example"]}"')
    for title, names in (
        ("hyperparameters", [k for k in defaults if k not in _CORE]),
        ("core options (every gradstep optimizer)", [k for k in defaults if k in _CORE]),
    ):
        if not names:
            continue
        lines.append(f"  {title}:")
        rows = [[name, _fmt_value(defaults[name]), d["docs"].get(name, "")] for name in names]
        lines.extend("    " + line for line in _table(rows))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    entry = _entry(args.name)
    if args.json:
        print(json.dumps(_describe(entry), indent=2))
    else:
        print(_info_text(entry))
    return 0


def _entry(name: str) -> Entry:
    try:
        return get(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


# --- shared by the commands that train ---------------------------------------------------------------------------


class _Candidate:
    """One optimizer of a comparison, validated before any training starts.

    ``lr_supplied``: the command will give the lr itself (``--lr``, the sweep, the range test), so a preset whose lr
    has no default is accepted without one.
    """

    def __init__(self, spec: str, lr_supplied: bool = False) -> None:
        self.spec = spec
        try:
            name, self.hypers = parse_spec(spec)
        except ValueError as exc:
            message = str(exc)
            if "not a literal" in message:
                message += " (strings need quotes, e.g. eps_mode='tf')"
            raise CommandError(message) from None
        self.entry = _entry(name)
        missing = [k for k in _required(self.entry) if k not in self.hypers and not (lr_supplied and k == "lr")]
        if missing:
            need = ", ".join(missing)
            raise CommandError(f"{self.entry.name} has no default {need}: give one, e.g. {name}:{missing[0]}=1e-3")
        # Build it once on a stand-in parameter so a bad value fails now, not after the others have trained.
        self.build([torch.nn.Parameter(torch.zeros(2, 2))], lr=self.default_lr())

    def default_lr(self) -> float:
        """The lr this spec runs with when nothing else sets it (a preset without one: its example's)."""
        if "lr" in self.hypers:
            return float(self.hypers["lr"])
        lr = self.entry.hyperparameters().get("lr", REQUIRED)
        return float(self.entry.example.get("lr", 1e-3) if lr is REQUIRED else lr)

    def build(self, params: Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        hypers = dict(self.hypers) if lr is None else {**self.hypers, "lr": lr}
        try:
            return self.entry(params, **hypers)
        except (ValueError, TypeError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise CommandError(f"{self.spec}: {message}") from None


def _task_class(name: str) -> Any:
    from . import tasks

    key = tasks.ALIASES.get(name, name)
    if key not in tasks.TASKS:
        raise CommandError(f"unknown task {name!r}; available: {', '.join(tasks.TASKS)}")
    return tasks.TASKS[key]


def _make_task(args: argparse.Namespace) -> Any:
    from . import tasks

    cls = _task_class(args.task)
    try:
        return cls(seed=args.seed, batch_size=args.batch_size)
    except tasks.MissingDependency as exc:
        raise CommandError(str(exc), RUNTIME_ERROR) from None


def _check_file_writable(path: str, flag: str) -> None:
    """Fail before any work when ``flag PATH`` cannot be written (the file itself is written at the end)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandError(f"{flag} {path}: is a directory")
    if not os.path.isdir(directory):
        raise CommandError(f"{flag} {path}: directory {directory} does not exist")
    target = path if os.path.exists(path) else directory
    if not os.access(target, os.W_OK):
        raise CommandError(f"{flag} {path}: permission denied")


def _check_out_dir(path: str) -> None:
    """Fail before any work when ``--out DIR`` cannot be created or written; nothing is created yet (a command
    line found bad later leaves no empty directory behind)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"--out {path}: exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CommandError(f"--out {path}: cannot create it: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--out {path}: permission denied")


def _make_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--out {path}: cannot create it: {exc.strerror or exc}", RUNTIME_ERROR) from None


def _positive(name: str, value: float | None, integer: bool = True) -> None:
    if value is not None and not value > 0:
        raise CommandError(f"{name} must be {'>= 1' if integer else '> 0'}, got {value}")


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    # Tiny matrix products: extra intra-op threads cost more than they give, and when other processes share the
    # cores their spinning makes the timings swing by 10x or more. main() may run in-process (tests, notebooks):
    # the caller's setting comes back afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Progress:
    """tqdm bars on stderr, one per run, or nothing when disabled, not a terminal, or tqdm is not installed."""

    def __init__(self, enabled: bool) -> None:
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self.tqdm = tqdm
            except ImportError:
                pass

    @contextlib.contextmanager
    def bar(self, total: int | None, desc: str) -> Iterator[Callable[[float], None] | None]:
        if self.tqdm is None:
            yield None
            return
        bar = self.tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step", dynamic_ncols=True)

        def on_step(loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

        try:
            yield on_step
        finally:
            bar.close()


def _write_json(data: Any, path: str, flag: str) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise CommandError(f"{flag} {path}: {exc.strerror or exc}", RUNTIME_ERROR) from None


def _plots() -> Any:
    """:mod:`gradstep.plots` if matplotlib can be imported, else None (after a one-line warning)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"{PROG}: warning: matplotlib is not installed, so no plots: pip install 'gradstep[cli]'", file=sys.stderr
        )
        return None
    from . import plots

    return plots


def _versions() -> dict[str, str]:
    return {"gradstep": __version__, "torch": torch.__version__, "python": platform.python_version()}


# --- compare ----------------------------------------------------------------------------------------------------


def _parse_lr(text: str | None) -> str | float | None:
    if text is None or text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise CommandError(f"--lr: expected 'auto' or a positive number, got {text!r}")
    return value


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import tasks

    for flag, value in (
        ("--epochs", args.epochs),
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--eval-every", args.eval_every),
        ("--sweep-steps", args.sweep_steps),
    ):
        _positive(f"compare: {flag}", value)
    if args.epochs is not None and args.steps is not None:
        raise CommandError("compare: give --epochs or --steps, not both")
    lr_mode = _parse_lr(args.lr)
    candidates = [_Candidate(spec, lr_supplied=lr_mode is not None) for spec in args.optimizers]
    cls = _task_class(args.task)
    if args.target is not None and (cls.target is None or not math.isfinite(args.target)):
        raise CommandError(f"compare: --target needs a finite number and a task with a target, got {args.target}")
    if args.out is None:
        args.out = os.path.join("gradstep-out", f"compare-{cls.name}")
    if not args.no_report:
        _check_out_dir(args.out)
    if args.json not in (None, "-"):
        _check_file_writable(args.json, "--json")
    task = _make_task(args)

    target = task.target
    if args.target is not None:
        target = tasks.Target(target.metric, args.target, target.higher_is_better)
    per_epoch = task.steps_per_epoch()
    steps = args.steps if args.steps is not None else (args.epochs or task.default_epochs) * per_epoch
    progress = _Progress(not args.no_progress and sys.stderr.isatty())
    log = sys.stderr if args.json == "-" else sys.stdout

    sweeps: list[tasks.SweepResult] = []
    lrs: list[float | None] = []
    with _threads(args.threads):
        for cand in candidates:
            if "lr" in cand.hypers or lr_mode is None:
                lrs.append(None)
            elif lr_mode == "auto":
                sweep_steps = args.sweep_steps or min(steps, max(10, steps // 5))
                with progress.bar(None, f"{cand.spec} lr sweep") as on_step:
                    sweep = tasks.sweep_lr(
                        task, cand.build, cand.default_lr(), sweep_steps, label=cand.spec, on_step=on_step
                    )
                sweeps.append(sweep)
                lrs.append(sweep.best_lr)
            else:
                lrs.append(float(lr_mode))
        histories = []
        for cand, lr in zip(candidates, lrs):
            with progress.bar(steps, cand.spec) as on_step:
                histories.append(_train_one(task, cand, lr, steps, args.eval_every, target, on_step))

    report = {
        "command": " ".join([PROG, *map(shlex.quote, args.argv)]),
        "task": task.name,
        "description": task.description,
        "metrics": [{"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better} for m in task.metrics],
        "target": None
        if target is None
        else {"metric": target.metric, "value": target.value, "higher_is_better": target.higher_is_better},
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "batch_size": task.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "lr_mode": lr_mode,
        **_versions(),
        "results": [
            {**h.to_dict(), "optimizer": c.entry.name, "hyperparameters": _jsonable(c.hypers)}
            for c, h in zip(candidates, histories)
        ],
        "sweeps": [s.to_dict() for s in sweeps],
    }

    if args.json != "-":
        from .report import summary_table

        header, rows = summary_table(report)
        epochs = f"{steps / per_epoch:g} epochs of {per_epoch} steps" if per_epoch else ""
        print(f"task: {task.description}; {steps} steps ({epochs}), batch size {task.batch_size}, seed {args.seed}")
        print("\n".join(_table([header, *rows], right=range(1, len(header)))))
        for h in histories:
            if h.diverged is not None:
                print(f"{h.label} diverged at {h.diverged}")
    if not args.no_report:
        written = _write_compare_report(report, task, histories, sweeps, args.out)
        print(f"wrote {', '.join(written)} in {args.out}", file=log)
    if args.json is not None:
        _write_json(report, args.json, "--json")
    return 0


def _train_one(
    task: Any,
    cand: _Candidate,
    lr: float | None,
    steps: int,
    eval_every: int | None,
    target: Any,
    on_step: Callable[[float], None] | None,
) -> Any:
    """Train one candidate; the history records the lr the optimizer was built with (its first group's)."""
    from . import tasks

    built: list[torch.optim.Optimizer] = []

    def make(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        built.append(cand.build(params, lr))
        return built[-1]

    history = tasks.train(task, make, steps, label=cand.spec, eval_every=eval_every, target=target, on_step=on_step)
    group_lr = built[0].param_groups[0].get("lr") if built else None
    history.lr = float(group_lr) if isinstance(group_lr, (int, float, torch.Tensor)) else None
    return history


def _write_compare_report(
    report: dict[str, Any], task: Any, histories: list[Any], sweeps: list[Any], out: str
) -> list[str]:
    from . import report as html_report
    from .tasks import Function2D

    _make_out_dir(out)
    plots = _plots()
    images: dict[str, str] = {}
    if plots is not None:
        subtitle = f"{report['steps']} steps, batch size {report['batch_size']}, seed {report['seed']}"
        if report["lr_mode"] == "auto":
            subtitle += ", lr from a sweep"
        images["Loss curves"] = plots.plot_curves(histories, task, os.path.join(out, "loss-curves.png"), subtitle)
        if isinstance(task, Function2D):
            images["Trajectories"] = plots.plot_trajectories(histories, task, os.path.join(out, "trajectories.png"))
        if sweeps:
            order = [i for i, h in enumerate(histories) if any(s.label == h.label for s in sweeps)]
            images["Learning-rate sweep"] = plots.plot_lr_sweep(sweeps, os.path.join(out, "lr-sweep.png"), order)
    report["artifacts"] = {caption: os.path.basename(p) for caption, p in images.items()}
    _write_json(report, os.path.join(out, "results.json"), "--out")
    html_report.compare_html(report, images, os.path.join(out, "report.html"))
    return ["report.html", "results.json", *(os.path.basename(p) for p in images.values())]


# --- lr-find ----------------------------------------------------------------------------------------------------


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from . import tasks

    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        _positive(f"lr-find: {flag}", value)
    if args.steps < 3:
        raise CommandError(f"lr-find: --steps must be >= 3, got {args.steps}")
    if not (0 < args.start_lr < args.end_lr and math.isfinite(args.end_lr)):
        raise CommandError(f"lr-find: need 0 < --start-lr < --end-lr, got {args.start_lr:g} and {args.end_lr:g}")
    if not 0 <= args.smoothing < 1:
        raise CommandError(f"lr-find: --smoothing must be in [0, 1), got {args.smoothing}")
    if not args.diverge > 1:
        raise CommandError(f"lr-find: --diverge must be > 1, got {args.diverge}")
    cand = _Candidate(args.optimizer, lr_supplied=True)
    cls = _task_class(args.task)
    if args.out is None:
        args.out = os.path.join("gradstep-out", f"lr-find-{cls.name}")
    if not args.no_report:
        _check_out_dir(args.out)
    if args.json not in (None, "-"):
        _check_file_writable(args.json, "--json")
    task = _make_task(args)
    log = sys.stderr if args.json == "-" else sys.stdout
    if "lr" in cand.hypers:
        print(
            f"{PROG}: note: lr={cand.hypers['lr']!r} in {cand.spec} is ignored: the test sets the lr", file=sys.stderr
        )
    progress = _Progress(not args.no_progress and sys.stderr.isatty())
    with _threads(args.threads), progress.bar(args.steps, f"{cand.spec} lr-find") as on_step:
        result = tasks.lr_range_test(
            task,
            cand.build,
            args.start_lr,
            args.end_lr,
            args.steps,
            label=cand.spec,
            smoothing=args.smoothing,
            diverge=args.diverge,
            on_step=on_step,
        )
    data = {
        "command": " ".join([PROG, *map(shlex.quote, args.argv)]),
        "task": task.name,
        "description": task.description,
        "optimizer": cand.entry.name,
        "hyperparameters": _jsonable({k: v for k, v in cand.hypers.items() if k != "lr"}),
        "batch_size": task.batch_size,
        "seed": args.seed,
        "smoothing": args.smoothing,
        **_versions(),
        **result.to_dict(),
    }
    ran = f"{len(result.lrs)} of {args.steps} steps, lr {args.start_lr:g} to {args.end_lr:g}"
    print(f"lr-find {cand.spec} on {task.name}: {ran}", file=log)
    if result.stopped:
        print(f"stopped early: {result.stopped}", file=log)
    if not args.no_report:
        _make_out_dir(args.out)
    if result.suggested_lr is None:
        if not args.no_report:
            _write_json(data, os.path.join(args.out, "lr-find.json"), "--out")
        raise CommandError(
            f"lr-find: only {len(result.lrs)} steps before the loss blew up, too few to suggest an lr; lower "
            "--start-lr or give more --steps",
            RUNTIME_ERROR,
        )
    low = min(result.smoothed)
    print(f"lowest smoothed loss {low:.4g} at lr {result.min_loss_lr:.3g}", file=log)
    if result.steepest_lr is not None:
        print(f"steepest fall at lr {result.steepest_lr:.3g}", file=log)
    print(f"suggested lr: {result.suggested_lr:.3g} (the lowest smoothed loss's lr / 10)", file=log)
    if result.stopped is None:
        print("the loss was still falling at --end-lr: a larger --end-lr may find a better lr", file=log)
    suggestion = _fmt_spec(cand.entry.name, {**cand.hypers, "lr": float(f"{result.suggested_lr:.3g}")})
    print(f"try: {PROG} compare {shlex.quote(suggestion)} --task {task.name}", file=log)
    if not args.no_report:
        written = ["lr-find.json"]
        plots = _plots()
        if plots is not None:
            title = f"LR range test: {cand.spec} on {task.name} (batch size {task.batch_size}, seed {args.seed})"
            plots.plot_lr_find(result, os.path.join(args.out, "lr-find.png"), title)
            written.insert(0, "lr-find.png")
            data["artifacts"] = {"plot": "lr-find.png"}
        _write_json(data, os.path.join(args.out, "lr-find.json"), "--out")
        print(f"wrote {', '.join(written)} in {args.out}", file=log)
    if args.json is not None:
        _write_json(data, args.json, "--json")
    return 0


# --- bench ------------------------------------------------------------------------------------------------------


def _option_values(argv: Sequence[str], option: str) -> list[str]:
    """The values given to ``option`` in ``argv`` (``--opt a b``, ``--opt=a``), for checks before the run."""
    values: list[str] = []
    for i, arg in enumerate(argv):
        if arg == option:
            for value in argv[i + 1 :]:
                if value.startswith("-") and not _is_number(value):
                    break
                values.append(value)
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cmd_bench(argv: list[str]) -> int:
    """``gradstep bench ...``: :func:`gradstep.bench.main` with its errors as one line (see :func:`main`)."""
    from . import bench

    for name in _option_values(argv, "--only"):
        try:
            get(name)
        except ValueError as exc:
            raise CommandError(f"bench: --only: {exc}") from None
    for path in _option_values(argv, "--json")[-1:]:
        _check_file_writable(path, "bench: --json")
    before = torch.get_num_threads()
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise CommandError(f"bench: {message}")

    # bench.main builds its own argparse parser: its usage errors are made one line here, for its run only.
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        return int(bench.main(argv) or 0)
    except (ValueError, OSError) as exc:
        raise CommandError(f"bench: {exc}", RUNTIME_ERROR) from None
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]
        torch.set_num_threads(before)


# --- inspect ----------------------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _load_checkpoint(path: str, allow_pickle: bool) -> Any:
    import pickle
    import re
    import zipfile

    if not os.path.exists(path):
        raise CommandError(f"inspect: {path}: no such file")
    if os.path.isdir(path):
        raise CommandError(f"inspect: {path}: is a directory")
    try:
        # torch.save writes a zip archive (a pickle, starting with its protocol byte 0x80, before torch 1.6).
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"
        if not (legacy or zipfile.is_zipfile(path)):
            raise CommandError(
                f"inspect: {path} is not a torch checkpoint (not a file torch.save writes)", RUNTIME_ERROR
            )
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused and not allow_pickle:
            raise CommandError(
                f"inspect: {path} holds {refused.group(1)} objects, which torch.load(weights_only=True) refuses; "
                "if you trust the file, pass --allow-pickle",
                RUNTIME_ERROR,
            ) from None
        raise CommandError(f"inspect: {path} cannot be read: {_first_line(text, exc)}", RUNTIME_ERROR) from None
    except OSError as exc:
        raise CommandError(f"inspect: {path}: {exc.strerror or exc}") from None
    except CommandError:
        raise
    except Exception as exc:  # torch.load raises RuntimeError and others for damaged files
        raise CommandError(
            f"inspect: {path} is not a torch checkpoint: {_first_line(str(exc), exc)}", RUNTIME_ERROR
        ) from None


def _first_line(text: str, exc: BaseException) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _select_state_dict(obj: Any, path: str, key: str | None) -> tuple[str, dict[str, Any]]:
    from .tools.checkpoint import find_state_dicts

    found = list(find_state_dicts(obj))
    if key is not None:
        for where, sd in found:
            if where == key:
                return where, sd
        known = ", ".join(repr(w) for w, _ in found) or "none"
        raise CommandError(f"inspect: {path} has no optimizer state_dict at key {key!r} (found: {known})")
    if not found:
        raise CommandError(
            f"inspect: {path} holds no optimizer state_dict (a dict with 'state' and 'param_groups')", RUNTIME_ERROR
        )
    if len(found) > 1:
        keys = ", ".join(repr(w) for w, _ in found)
        raise CommandError(f"inspect: {path} holds {len(found)} optimizer state_dicts (at {keys}); choose with --key")
    return found[0]


def _inspect_text(summary: dict[str, Any], path: str, key: str) -> list[str]:
    where = f" (the optimizer state_dict at key {key!r})" if key else ""
    lines = [f"checkpoint: {path}{where}"]
    step = summary["global_step"]
    lines.append(f"optimizer:  {summary['optimizer']}" + (f", global step {step}" if step is not None else ""))
    lines.append(
        f"groups:     {len(summary['groups'])}; parameters: {summary['parameters']} "
        f"({summary['parameters_with_state']} with state)"
    )
    first: dict[str, Any] = {}
    for i, group in enumerate(summary["groups"]):
        hypers = group["hyperparameters"]
        if i == 0:
            first = hypers
            shown = hypers
            rest = ""
        else:
            shown = {k: v for k, v in hypers.items() if first.get(k, object()) != v}
            rest = " (the rest as group 0)" if shown else " (all as group 0)"
        text = "  ".join(f"{k}={v!r}" for k, v in shown.items())
        lines.append(f"  group {i} ({group['params']} params): {text}{rest}".rstrip())
    if summary["state"]:
        rows = [["state", "tensors", "dtype", "elements", "memory", ""]]
        for name, s in summary["state"].items():
            extra = ""
            if "min" in s:
                extra = f"values {s['min']:g}" + (f" .. {s['max']:g}" if s["max"] != s["min"] else "")
            if s["other"]:
                extra = (extra + "; " if extra else "") + f"{s['other']} non-tensor value(s)"
            rows.append(
                [
                    name,
                    str(s["tensors"]),
                    ",".join(s["dtypes"]) or "-",
                    f"{s['elements']:,}",
                    _human_bytes(s["bytes"]),
                    extra,
                ]
            )
        lines.extend("  " + line for line in _table(rows, right=(1, 3, 4)))
    else:
        lines.append("  no state (no step was taken)")
    per = summary["bytes_per_param_element"]
    total = f"state memory: {_human_bytes(summary['state_bytes'])}"
    if per is not None:
        total += f", {per:.2f} bytes per parameter element"
    lines.append(total)
    return lines


def _set_at(container: Any, key: str, value: Any) -> Any:
    """``container`` with the object at the dotted ``key`` replaced by ``value`` (``""``: ``value`` itself)."""
    if not key:
        return value
    head, _, rest = key.partition(".")
    if isinstance(container, dict):
        match = next(k for k in container if str(k) == head)
        container[match] = _set_at(container[match], rest, value)
    elif isinstance(container, list):
        container[int(head)] = _set_at(container[int(head)], rest, value)
    else:  # a tuple: rebuilt
        items = list(container)
        items[int(head)] = _set_at(items[int(head)], rest, value)
        return type(container)(items)
    return container


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .tools.checkpoint import ConversionError, convert, summarize

    if args.convert_to is not None and args.output is None:
        raise CommandError("inspect: --convert-to needs --output PATH")
    if args.output is not None:
        if args.convert_to is None:
            raise CommandError("inspect: --output needs --convert-to adam|adamw|sgd")
        _check_file_writable(args.output, "--output")
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise CommandError("inspect: --output must not be the checkpoint itself")
    obj = _load_checkpoint(args.checkpoint, args.allow_pickle)
    key, sd = _select_state_dict(obj, args.checkpoint, args.key)
    summary = summarize(sd)
    converted = None
    if args.convert_to is not None:
        try:
            converted = convert(sd, args.convert_to)
        except ConversionError as exc:
            raise CommandError(f"inspect: {args.checkpoint}: {exc}", RUNTIME_ERROR) from None
    if args.json:
        data = {"checkpoint": args.checkpoint, "key": key, **summary}
        if converted is not None:
            data["converted"] = {"to": converted["gradstep"]["optimizer"], "output": args.output}
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(_inspect_text(summary, args.checkpoint, key)))
    if converted is not None:
        try:
            torch.save(_set_at(obj, key, converted), args.output)
        except OSError as exc:
            raise CommandError(f"--output {args.output}: {exc.strerror or exc}", RUNTIME_ERROR) from None
        cls = converted["gradstep"]["optimizer"]
        lookup = "".join(f"[{int(k) if k.isdigit() else repr(k)}]" for k in key.split(".")) if key else ""
        log = sys.stderr if args.json else sys.stdout
        print(f"converted {summary['optimizer']} to gradstep.{cls}: wrote {args.output}", file=log)
        print(f"load it with gradstep.{cls}(params).load_state_dict(torch.load({args.output!r}){lookup})", file=log)
    return 0


# --- entry point ------------------------------------------------------------------------------------------------


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help=f"write {what} as JSON to PATH; without PATH (or '-'), print the JSON instead of the text",
    )


def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    parser = _Parser(prog=PROG, description="gradstep: PyTorch optimizers from one small composable core.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="every registered optimizer", description="List every registered optimizer.")
    p.add_argument("-v", "--verbose", action="store_true", help="paper, originals and every hyperparameter")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", help="one optimizer in full", description="Show one optimizer in full.")
    p.add_argument("name", help="registry name, e.g. adamw")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_cmd_info)

    tasks_help = f"the task: {', '.join(TASKS)} (default: digits-mlp)"
    p = sub.add_parser(
        "compare",
        help="train a small model with each optimizer and compare",
        description="Train the same model from the same initial weights, on the same minibatches, with each "
        "optimizer; print a table and write loss curves (PNG), a self-contained HTML report and JSON. OPT is NAME "
        "or NAME:key=value,... with Python literals, e.g. 'adam:lr=3e-3,betas=(0.9,0.99)'.",
    )
    p.add_argument("optimizers", nargs="+", metavar="OPT", help="optimizer spec")
    p.add_argument("--task", default="digits-mlp", help=tasks_help)
    p.add_argument("--epochs", type=int, help="epochs (default: the task's, e.g. 10 for digits-mlp)")
    p.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs")
    p.add_argument("--batch-size", type=int, help="minibatch size (default: the task's, 64 or 32)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: 0)")
    p.add_argument(
        "--lr",
        metavar="auto|LR",
        help="'auto': pick each optimizer's lr by a short sweep first; a number: the lr of every optimizer whose "
        "spec has none (default: each optimizer's own default)",
    )
    p.add_argument("--sweep-steps", type=int, help="steps per lr in the --lr auto sweep (default: a fifth of the run)")
    p.add_argument("--target", type=float, help="the value of the task's 'steps to target' metric (e.g. 0.9)")
    p.add_argument(
        "--eval-every", type=int, help="steps between evaluations (default: once per epoch; every step for 2-D tasks)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the models are small, and more threads only add noise to the timings)",
    )
    p.add_argument("--out", metavar="DIR", help="where the report goes (default: gradstep-out/compare-TASK)")
    p.add_argument("--no-report", action="store_true", help="write no files (the table only)")
    _add_json(p, "the results, with every curve,")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (none either when not a TTY)")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test",
        description="The LR range test (Smith, 2017): train once while the lr grows exponentially from --start-lr "
        "to --end-lr, smooth the loss, and suggest the lr of the lowest smoothed loss divided by 10.",
    )
    p.add_argument("optimizer", metavar="OPT", help="optimizer spec (its lr, if any, is ignored)")
    p.add_argument("--task", default="digits-mlp", help=tasks_help)
    p.add_argument("--start-lr", type=float, default=1e-7, help="first lr (default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last lr (default: 10)")
    p.add_argument("--steps", type=int, default=100, help="steps from start to end (default: 100)")
    p.add_argument(
        "--smoothing", type=float, default=0.9, help="EMA factor of the smoothed loss (default: 0.9, ~10 steps)"
    )
    p.add_argument(
        "--diverge",
        type=float,
        default=4.0,
        help="stop once the smoothed loss is this many times its minimum (default: 4)",
    )
    p.add_argument("--batch-size", type=int, help="minibatch size (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the plot and JSON go (default: gradstep-out/lr-find-TASK)",
    )
    p.add_argument("--no-report", action="store_true", help="write no files")
    _add_json(p, "the lrs, losses and suggestions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_lr_find)

    # Parsed by gradstep.bench itself (main() hands it the rest of the command line); listed here for --help.
    sub.add_parser(
        "bench",
        help="the speed benchmark (gradstep bench --help)",
        description="The speed benchmark; its options are gradstep.bench's (gradstep bench --help).",
        add_help=False,
    )

    p = sub.add_parser(
        "inspect",
        help="summarise an optimizer checkpoint; convert torch.optim's to gradstep's",
        description="Summarise the optimizer state_dict in CHECKPOINT (a torch.save file: the state_dict itself or "
        "a dict holding it): optimizer, groups, hyperparameters, state tensors, dtypes and memory. With "
        "--convert-to, write a copy whose torch.optim Adam/AdamW/SGD state_dict is replaced by the gradstep one.",
    )
    p.add_argument("checkpoint", help="a file written by torch.save")
    p.add_argument("--key", help="where the state_dict is in the checkpoint, e.g. optimizer or optimizer_states.0")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--convert-to", choices=("adam", "adamw", "sgd"), help="convert a torch.optim state_dict")
    p.add_argument("--output", metavar="PATH", help="where --convert-to writes the converted checkpoint")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load with weights_only=False (runs code in the file: only for files you trust)",
    )
    p.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            # Everything after "bench" is gradstep.bench's own command line.
            return _cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(args.run(args))
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gradstep list | head`: the reader left; stop quietly (and keep Python from complaining at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        # Anything else is a failure while running (an optimizer that raises on a task, a full disk): one line too,
        # unless the traceback is asked for.
        if os.environ.get("GRADSTEP_TRACEBACK"):
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        print(f"{PROG}: error: {detail} (GRADSTEP_TRACEBACK=1 shows where)", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())

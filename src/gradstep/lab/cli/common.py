"""What the commands share: exit statuses and errors, formatting, the optimizers and tasks named on the command line,
output paths, progress bars and the lab's optional imports."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import torch

from ... import __version__
from ...core.hypers import REQUIRED
from ...core.optimizer import CORE_HYPERS
from ...core.registry import Entry, get, parse_spec

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


def _required(entry: Entry) -> list[str]:
    return list(entry.required_args)


def _defaults(entry: Entry) -> dict[str, Any]:
    """Every hyperparameter's default (``REQUIRED`` where a preset has none)."""
    return entry.hyperparameters()


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


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns padded to their widest cell; the columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _entry(name: str) -> Entry:
    from ...routing import presets

    preset = presets().get(name.lower())  # partitions (muon_adamw): built on a model, so not in the registry
    if preset is not None:
        return preset
    try:
        return get(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


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
    from .. import tasks

    key = tasks.ALIASES.get(name, name)
    if key not in tasks.TASKS:
        raise CommandError(f"unknown task {name!r}; available: {', '.join(tasks.TASKS)}")
    return tasks.TASKS[key]


def _make_task(args: argparse.Namespace) -> Any:
    from .. import tasks

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


_REPORT_FILES = ("results.json", "report.html", "lr-find.json")


def _out_dir(path: str | None, default: str, overwrite: bool) -> str:
    """The directory a command writes into. A report is never replaced without a word: the default directory
    becomes ``DEFAULT-2``, ``DEFAULT-3``, ... when it already holds one; a ``--out`` given holding one is refused
    unless ``--overwrite``."""

    def holds_report(directory: str) -> bool:
        return any(os.path.exists(os.path.join(directory, name)) for name in _REPORT_FILES)

    if path is None:
        path, n = default, 1
        while holds_report(path) and not overwrite:
            n += 1
            path = f"{default}-{n}"
    elif holds_report(path) and not overwrite:
        raise CommandError(f"--out {path}: already holds a report; pass --overwrite to replace it, or another --out")
    _check_out_dir(path)
    return path


def _make_out_dir(path: str, status: int = RUNTIME_ERROR) -> None:
    """Create ``--out DIR`` and make sure a file can be written in it (``os.access`` says yes to root, even under
    /proc): the commands call it before training, so a report that could not be written fails first."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CommandError(f"--out {path}: cannot write there: {exc.strerror or exc}", status) from None


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
    """:mod:`gradstep.lab.plots` if matplotlib can be imported, else None (after a one-line warning)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"{PROG}: warning: matplotlib is not installed, so no plots: pip install 'gradstep[cli]'", file=sys.stderr
        )
        return None
    from .. import plots

    return plots


def _versions() -> dict[str, str]:
    return {"gradstep": __version__, "torch": torch.__version__, "python": platform.python_version()}

"""The ``gradstep`` command line: list the optimizers, show one, compare some on a small task.

::

    gradstep list [--verbose] [--json]
    gradstep info NAME [--json]
    gradstep compare adamw sgd:lr=0.1,momentum=0.9 rmsprop [--epochs 10] [--batch-size 64] [--seed 0] [--json PATH]

An optimizer on the command line is ``name`` or ``name:key=value,key=value`` with Python literals as values
(``adam:lr=3e-3,betas=(0.9,0.99)``; quote it for the shell when it holds parentheses or strings).

Errors are one line on stderr, ``gradstep: error: ...``: exit status 2 for a bad command line (unknown optimizer,
malformed or invalid hyperparameter, unwritable ``--json`` path), 1 when something the command needs is missing
(scikit-learn) or fails while running. This module only parses and prints; the training is :mod:`gradstep.tasks`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
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
    hyper_lines = []
    for e in all_entries:
        caps = e.capabilities
        rows.append(
            [e.name, f"{caps.state_bytes_per_param} B", _yes(caps.supports_complex), caps.sharding]
            + [_short_paper(e.paper), e.summary]
        )
        key = _key_hypers(_defaults(e))
        hyper_lines.append("    " + "  ".join(f"{k}={_fmt_value(v)}" for k, v in key.items()))
    header, *body = _table(rows)
    print(header)
    for line, hypers in zip(body, hyper_lines):
        print(line)
        print(hypers)
    print(f"\n{len(all_entries)} optimizers. `{PROG} info NAME` or `{PROG} list --verbose`: paper, originals, every")
    print("hyperparameter with its doc. Core options shared by all (foreach, nonfinite, ...) are not shown above.")
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


# --- compare ----------------------------------------------------------------------------------------------------


class _Candidate:
    """One optimizer of a comparison, validated before any training starts."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        try:
            name, self.hypers = parse_spec(spec)
        except ValueError as exc:
            message = str(exc)
            if "not a literal" in message:
                message += " (strings need quotes, e.g. eps_mode='tf')"
            raise CommandError(message) from None
        self.entry = _entry(name)
        missing = [k for k in _required(self.entry) if k not in self.hypers]
        if missing:
            need = ", ".join(missing)
            raise CommandError(f"{self.entry.name} has no default {need}: give one, e.g. {name}:{missing[0]}=1e-3")
        # Build it once on a stand-in parameter so a bad value fails now, not after the others have trained.
        self.build([torch.nn.Parameter(torch.zeros(2, 2))])

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        try:
            return self.entry(params, **self.hypers)
        except (ValueError, TypeError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise CommandError(f"{self.spec}: {message}") from None


def _check_writable(path: str) -> None:
    """Fail before training when ``--json PATH`` cannot be written (the file itself is written at the end)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandError(f"--json {path}: is a directory")
    if not os.path.isdir(directory):
        raise CommandError(f"--json {path}: directory {directory} does not exist")
    target = path if os.path.exists(path) else directory
    if not os.access(target, os.W_OK):
        raise CommandError(f"--json {path}: permission denied")


def _progress(enabled: bool, total: int, desc: str) -> tuple[Callable[[float], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr (``on_step``, ``close``), or nothing when disabled or tqdm is not installed."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step", dynamic_ncols=True)

    def on_step(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    return on_step, bar.close


def _fmt_number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import tasks

    if args.epochs < 1:
        raise CommandError(f"compare: --epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise CommandError(f"compare: --batch-size must be >= 1, got {args.batch_size}")
    if args.threads < 1:
        raise CommandError(f"compare: --threads must be >= 1, got {args.threads}")
    candidates = [_Candidate(spec) for spec in args.optimizers]
    if args.json is not None:
        _check_writable(args.json)
    try:
        task = tasks.TASKS[args.task](seed=args.seed, batch_size=args.batch_size)
    except tasks.MissingDependency as exc:
        raise CommandError(str(exc), RUNTIME_ERROR) from None

    # Tiny matrix products: extra intra-op threads cost more than they give, and when other processes share the
    # cores their spinning makes the timings swing by 10x or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    show_progress = not args.no_progress and sys.stderr.isatty()
    total = args.epochs * task.steps_per_epoch()
    histories = []
    try:
        for cand in candidates:
            on_step, close = _progress(show_progress, total, cand.spec)
            try:
                histories.append(tasks.train(task, cand.build, args.epochs, label=cand.spec, on_step=on_step))
            finally:
                close()
    finally:
        # main() may be called in-process (tests, notebooks): leave torch as we found it.
        torch.set_num_threads(threads)

    epochs = f"{args.epochs} epoch" + ("s" if args.epochs != 1 else "")
    print(f"task: {task.description}; {epochs}, batch size {args.batch_size}, seed {args.seed}")
    rows = [["optimizer", "train loss", "best test loss", "test acc", "best test acc", "time (s)"]]
    for h in histories:
        s = h.summary()
        rows.append(
            [
                h.label,
                "diverged" if h.diverged is not None else _fmt_number(s["final_train_loss"]),
                _fmt_number(s["best_test_loss"]),
                _fmt_number(s["final_test_accuracy"]),
                _fmt_number(s["best_test_accuracy"]),
                f"{h.wall_time:.2f}",
            ]
        )
    print("\n".join(_table(rows, right=range(1, 6))))
    for h in histories:
        if h.diverged is not None:
            print(f"{h.label} diverged at {h.diverged}")

    if args.json is not None:
        report = {
            "task": task.name,
            "description": task.description,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "torch": torch.__version__,
            "gradstep": __version__,
            "results": [
                {**h.to_dict(), "optimizer": c.entry.name, "hyperparameters": _jsonable(c.hypers)}
                for c, h in zip(candidates, histories)
            ],
        }
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
        except OSError as exc:
            raise CommandError(f"--json {args.json}: {exc.strerror or exc}", RUNTIME_ERROR) from None
    return 0


# --- entry point ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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

    from .tasks import TASKS

    p = sub.add_parser(
        "compare",
        help="train a small model with each optimizer and compare",
        description="Train the same model from the same initial weights, on the same minibatches, with each "
        "optimizer. OPT is NAME or NAME:key=value,... with Python literals, e.g. "
        "'adam:lr=3e-3,betas=(0.9,0.99)'.",
    )
    p.add_argument("optimizers", nargs="+", metavar="OPT", help="optimizer spec")
    p.add_argument("--task", choices=sorted(TASKS), default="digits", help="the task (default: digits)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the models are small, and more threads only add noise to the timings)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results, with per-epoch curves, to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not a TTY)")
    p.set_defaults(run=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

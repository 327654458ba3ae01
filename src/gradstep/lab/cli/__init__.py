"""The ``gradstep`` command line (also ``python -m gradstep``).

::

    gradstep list [--verbose] [--json]                    every optimizer: paper, originals, defaults, state size
    gradstep info NAME [--json]                           one optimizer in full
    gradstep compare OPT [OPT ...] [--task digits-mlp] [--lr auto] [--epochs N | --steps N] [--out DIR] [--json [PATH]]
    gradstep lr-find OPT [--task digits-mlp] [--start-lr 1e-7] [--end-lr 10] [--steps 100] [--out DIR]
    gradstep bench [--only NAME ...] [--scale 0.25] ...   the speed benchmark (gradstep.lab.bench)
    gradstep inspect CHECKPOINT [--json] [--convert-to adam|adamw|sgd --output PATH]

An optimizer on the command line is ``name`` or ``name:key=value,key=value`` with Python literals as values
(``adam:lr=3e-3,betas=(0.9,0.99)``; quote it for the shell when it holds parentheses or strings). The tasks are
those of :mod:`gradstep.lab.tasks`: ``digits-mlp`` (alias ``digits``), ``digits-cnn``, ``char-lm``, ``rosenbrock`` and
``rastrigin``.

``compare`` writes ``results.json``, ``loss-curves.png`` (and ``trajectories.png`` for the 2-D functions,
``lr-sweep.png`` with ``--lr auto``) and ``report.html``, which embeds the pictures, into ``--out`` (default
``gradstep-out/compare-TASK``); ``--no-report`` writes nothing. ``lr-find`` writes ``lr-find.png`` and
``lr-find.json`` the same way (default ``gradstep-out/lr-find-TASK``). A report is never replaced silently: when the
default directory already holds one, the run goes to ``compare-TASK-2``, ``-3``, ... (the command says where); a
``--out DIR`` that holds one is refused unless ``--overwrite`` is given. The output directory is created, and a file
written in it, before any training, so a report that could not be written fails first. ``compare`` refuses the
same optimizer twice (``adamw adamw``, or ``adamw adamw:lr=1e-3``, which is its default): two identical runs.

The header of ``compare`` says how long the runs were in the task's terms: steps alone for the 2-D functions
(every step sees the whole function: there are no epochs, batches or random draws), whole epochs and the steps left
over for the others. Where the train loss ends above the test loss, a note says why (char-lm: the test text is
easier to predict than the training text; no dropout or smoothing is involved).

Exit statuses: 0 done; 2 bad input, with nothing run (unknown optimizer or task, malformed or invalid
hyperparameter, the same optimizer twice, an output path that cannot be written, a report already in ``--out``, a
checkpoint that cannot be read or holds no optimizer state_dict); 1 when something the command needs is missing
(scikit-learn) or fails while running (with the environment variable ``GRADSTEP_TRACEBACK=1``, such a failure shows
its traceback); 130 interrupted (Ctrl-C). Errors are one line on stderr, ``gradstep: error: ...``; an unknown
optimizer name comes with the closest registered one (``adamww``: did you mean ``adamw``?). This module parses and
prints; training is :mod:`gradstep.lab.tasks`, pictures :mod:`gradstep.lab.plots`, the HTML
:mod:`gradstep.lab.report`, checkpoints :mod:`gradstep.tools.checkpoint`.

One module per command: :mod:`~gradstep.lab.cli.list_info` (``list``, ``info``), :mod:`~gradstep.lab.cli.compare`,
:mod:`~gradstep.lab.cli.lr_find`, :mod:`~gradstep.lab.cli.bench`, :mod:`~gradstep.lab.cli.inspect`; what they share is
in :mod:`~gradstep.lab.cli.common`. This module builds the parser and runs a command (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ... import __version__
from .bench import _cmd_bench
from .common import PROG, RUNTIME_ERROR, USAGE_ERROR, CommandError, _Parser
from .compare import _cmd_compare
from .inspect import _cmd_inspect
from .list_info import _cmd_info, _cmd_list
from .lr_find import _cmd_lr_find

__all__ = ["PROG", "RUNTIME_ERROR", "USAGE_ERROR", "CommandError", "build_parser", "main"]


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help=f"write {what} as JSON to PATH; without PATH (or '-'), print the JSON instead of the text",
    )


def build_parser() -> argparse.ArgumentParser:
    from ..tasks import TASKS

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
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the report goes (default: gradstep-out/compare-TASK, or compare-TASK-2, -3, ... when it already "
        "holds one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the report already in --out DIR")
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
        help="where the plot and JSON go (default: gradstep-out/lr-find-TASK, or lr-find-TASK-2, -3, ... when it "
        "already holds one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out DIR")
    p.add_argument("--no-report", action="store_true", help="write no files")
    _add_json(p, "the lrs, losses and suggestions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_lr_find)

    # Parsed by gradstep.lab.bench itself (main() hands it the rest of the command line); listed here for --help.
    sub.add_parser(
        "bench",
        help="the speed benchmark (gradstep bench --help)",
        description="The speed benchmark; its options are gradstep.lab.bench's (gradstep bench --help).",
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
            # Everything after "bench" is gradstep.lab.bench's own command line.
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

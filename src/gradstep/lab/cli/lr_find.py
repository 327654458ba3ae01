"""``gradstep lr-find``: the LR range test of one optimizer on a task, with its picture and JSON."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from .common import (
    PROG,
    RUNTIME_ERROR,
    USAGE_ERROR,
    CommandError,
    _Candidate,
    _check_file_writable,
    _fmt_spec,
    _jsonable,
    _make_out_dir,
    _make_task,
    _out_dir,
    _plots,
    _positive,
    _Progress,
    _task_class,
    _threads,
    _versions,
    _write_json,
)


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from .. import tasks

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
    if not args.no_report:
        args.out = _out_dir(args.out, os.path.join("gradstep-out", f"lr-find-{cls.name}"), args.overwrite)
    if args.json not in (None, "-"):
        _check_file_writable(args.json, "--json")
    task = _make_task(args)
    if not args.no_report:
        _make_out_dir(args.out, USAGE_ERROR)  # before training: a report that cannot be written fails now
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

"""``gradstep compare``: optimizers trained side by side on one task: a table, JSON, pictures and an HTML report."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .common import (
    PROG,
    USAGE_ERROR,
    CommandError,
    _Candidate,
    _check_file_writable,
    _jsonable,
    _make_out_dir,
    _make_task,
    _out_dir,
    _plots,
    _positive,
    _Progress,
    _table,
    _task_class,
    _threads,
    _versions,
    _write_json,
)


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
    from .. import tasks

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
    seen: dict[str, str] = {}
    for cand in candidates:
        # Two specs building the same optimizer would be two identical runs: refused, naming both.
        resolved = {**cand.entry.hyperparameters(), **cand.hypers}
        if lr_mode is not None and "lr" not in cand.hypers:
            resolved["lr"] = lr_mode
        key = cand.entry.name + repr(sorted(resolved.items(), key=lambda kv: kv[0]))
        if key in seen:
            same = "is given twice" if seen[key] == cand.spec else f"is the same optimizer as {seen[key]}"
            raise CommandError(f"compare: {cand.spec} {same}; give each optimizer once")
        seen[key] = cand.spec
    cls = _task_class(args.task)
    if args.target is not None and (cls.target is None or not math.isfinite(args.target)):
        raise CommandError(f"compare: --target needs a finite number and a task with a target, got {args.target}")
    if not args.no_report:
        args.out = _out_dir(args.out, os.path.join("gradstep-out", f"compare-{cls.name}"), args.overwrite)
    if args.json not in (None, "-"):
        _check_file_writable(args.json, "--json")
    task = _make_task(args)
    if not args.no_report:
        _make_out_dir(args.out, USAGE_ERROR)  # before training: a report that cannot be written fails now

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
        "full_batch": isinstance(task, tasks.Function2D),
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
        "note": _train_above_test_note(task, histories),
    }

    if args.json != "-":
        from ..report import run_length, summary_table

        header, rows = summary_table(report)
        print(f"task: {task.description}; {run_length(report)}")
        print("\n".join(_table([header, *rows], right=range(1, len(header)))))
        for h in histories:
            if h.diverged is not None:
                print(f"{h.label} diverged at {h.diverged}")
        if report["note"]:
            print(f"note: {report['note']}")
    if not args.no_report:
        written = _write_compare_report(report, task, histories, sweeps, args.out)
        print(f"wrote {', '.join(written)} in {args.out}", file=log)
    if args.json is not None:
        _write_json(report, args.json, "--json")
    return 0


def _train_above_test_note(task: Any, histories: list[Any]) -> str | None:
    """Why the train loss ends above the test loss, when it does (the task says why; the table alone would puzzle)."""
    above = []
    for h in histories:
        train, test = h.summary().get("final_train_loss"), h.summary().get("final_test_loss")
        if isinstance(train, float) and isinstance(test, float) and train > test:
            above.append(h.label)
    if not above:
        return None
    why = getattr(task, "train_above_test", "") or "both are scored with the final weights, without dropout"
    return f"train loss above test loss for {', '.join(above)}: {why}"


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
    from .. import tasks

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
    from .. import report as html_report
    from ..tasks import Function2D

    _make_out_dir(out)
    plots = _plots()
    images: dict[str, str] = {}
    if plots is not None:
        subtitle = html_report.run_length(report)
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

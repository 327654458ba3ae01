"""Training quality of compact optimizer state: the table and figure of docs/state-codecs.md, "Training quality".

``python -m gradstep.lab.codec_quality --out DIR`` trains every optimizer with every ``state_codec`` on each task
and seed with ``gradstep compare`` (the same code, the same specs, ``optimizer:state_codec="codec"``, and the
task's default length: digits-mlp 220 steps, char-lm 168), so all codecs of an optimizer start from the same
initial weights and see the same minibatches. Into ``DIR`` it writes each run's JSON (``TASK-SEED.json``, what
``gradstep compare --json`` writes), the Markdown table (``codecs-quality.md``, also printed) and the figure
(``codecs-quality.png``).

The table gives each codec's final train and test loss per task, mean over the seeds, with the change from fp32
state in percent (of the means), and whether the codec meets its target: no change worse than :data:`TARGETS`
(int8 1%, int4 and int4+sr 3%, bf16+ecc 0.5%) in any of the columns; a codec missing it shows its worst change.
The figure has one panel per task and optimizer: the test loss at each evaluation, mean over the seeds, a line per
codec. ``--no-run`` rebuilds both from the JSON files already in ``DIR``.

The full configuration (4 optimizers x 5 codecs x 2 tasks x 3 seeds, 120 runs) took 5 minutes on one CPU core,
nearly all of it char-lm.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

OPTIMIZERS = ("adamw", "lion", "lamb", "adan")
CODECS = ("fp32", "int8", "int4", "int4+sr", "bf16+ecc")
TASKS = ("digits-mlp", "char-lm")
SEEDS = (0, 1, 2)
TARGETS = {"int8": 1.0, "int4": 3.0, "int4+sr": 3.0, "bf16+ecc": 0.5}
"""The most a codec may lose against fp32 state, in percent of the final loss (codecs not named: no target)."""

BASELINE = "fp32"
METRICS = (("train_loss", "train loss"), ("test_loss", "test loss"))
"""The final values the table reports for each task: the key in the JSON's ``final_<key>``, and the column label."""

# The colours of the figure before int4+sr (fp32, int8, int4, bf16+ecc), so that a codec keeps its colour; int4+sr
# takes the next one. bf16+ecc is dashed: it lies on top of fp32, which must stay visible underneath.
_COLOR_INDEX = {"fp32": 0, "int8": 1, "int4": 2, "bf16+ecc": 3, "int4+sr": 4}
_DASHED = {"bf16+ecc"}

Report = dict[str, Any]
"""What ``gradstep compare --json`` writes for one task and seed."""


def spec(optimizer: str, codec: str) -> str:
    """The command line's spec of ``optimizer`` with ``codec`` state, as in the doc's commands (and the JSON's
    ``label``)."""
    return f'{optimizer}:state_codec="{codec}"'


def json_path(out: str, task: str, seed: int) -> str:
    return os.path.join(out, f"{task}-{seed}.json")


# --- running ------------------------------------------------------------------------------------------------------


def run_compare(
    task: str, seed: int, specs: Sequence[str], path: str, steps: int | None = None, threads: int = 1
) -> Report:
    """One ``gradstep compare`` of ``specs`` on ``task`` with ``seed``, its JSON written to ``path``; returns it.

    The command line itself runs (in this process), not a copy of its loop, so the numbers are the ones its users
    get. Its per-run table goes nowhere: the summary over seeds is what this module prints.
    """
    from .cli import main

    argv = ["compare", *specs, "--task", task, "--seed", str(seed), "--threads", str(threads)]
    argv += ["--no-progress", "--no-report", "--json", path]
    if steps is not None:
        argv += ["--steps", str(steps)]
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    if status != 0:
        raise RuntimeError(f"gradstep {' '.join(argv)} exited with status {status}")
    return load_report(path)


def load_report(path: str) -> Report:
    with open(path, encoding="utf-8") as f:
        report: Report = json.load(f)
    return report


def run_all(
    out: str,
    optimizers: Sequence[str] = OPTIMIZERS,
    codecs: Sequence[str] = CODECS,
    tasks: Sequence[str] = TASKS,
    seeds: Sequence[int] = SEEDS,
    steps: int | None = None,
    threads: int = 1,
) -> dict[str, list[Report]]:
    """Every comparison: per task, one report per seed (in ``seeds``' order). All specs of a task and seed go to one
    ``compare``, in the doc's order (optimizer by optimizer, codec by codec)."""
    os.makedirs(out, exist_ok=True)
    specs = [spec(o, c) for o in optimizers for c in codecs]
    runs: dict[str, list[Report]] = {}
    for task in tasks:
        for seed in seeds:
            start = time.perf_counter()
            report = run_compare(task, seed, specs, json_path(out, task, seed), steps, threads)
            runs.setdefault(task, []).append(report)
            print(f"{task} seed {seed}: {len(specs)} runs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return runs


def load_all(out: str, tasks: Sequence[str] = TASKS, seeds: Sequence[int] = SEEDS) -> dict[str, list[Report]]:
    """The reports :func:`run_all` wrote into ``out`` (``--no-run``)."""
    return {task: [load_report(json_path(out, task, seed)) for seed in seeds] for task in tasks}


# --- the table ----------------------------------------------------------------------------------------------------


def result(report: Report, label: str) -> dict[str, Any]:
    """The run called ``label`` (its spec) in one report."""
    for r in report["results"]:
        if r["label"] == label:
            return dict(r)
    raise KeyError(f"no run {label!r} in the {report['task']} report of seed {report['seed']}")


def mean_final(reports: Sequence[Report], label: str, metric: str) -> float:
    """The final ``metric`` of run ``label``, mean over the seeds' reports; NaN where a run diverged (JSON holds no
    NaN: a non-finite value is written as null)."""
    values = [result(r, label)[f"final_{metric}"] for r in reports]
    return math.fsum(math.nan if v is None else v for v in values) / len(values)


def change(value: float, baseline: float) -> float:
    """``value``'s change from ``baseline``, in percent of the baseline."""
    return (value / baseline - 1) * 100


def target_cell(codec: str, changes: Sequence[float]) -> str:
    """``1.0%: met``, or ``3.0%: **not met** (+9.4%)`` with the worst change; empty for a codec without a target."""
    if codec not in TARGETS:
        return ""
    target = TARGETS[codec]
    worst = max(changes, key=lambda c: math.inf if math.isnan(c) else c)  # a diverged run is the worst
    verdict = "met" if worst <= target else f"**not met** ({worst:+.1f}%)"
    return f"{target:.1f}%: {verdict}"


def codec_row(runs: dict[str, list[Report]], optimizer: str, codec: str) -> list[str]:
    """One row: the mean final losses of ``optimizer`` with ``codec`` state per task and, but for the baseline, each
    one's change from the baseline's mean (a change of means, not a mean of per-seed changes) and the target."""
    cells, changes = [optimizer, codec], []
    for reports in runs.values():
        for metric, _ in METRICS:
            value = mean_final(reports, spec(optimizer, codec), metric)
            if codec == BASELINE:
                cells.append(f"{value:.4f}")
                continue
            changes.append(change(value, mean_final(reports, spec(optimizer, BASELINE), metric)))
            cells.append(f"{value:.4f} ({changes[-1]:+.2f}%)")
    return [*cells, "" if codec == BASELINE else target_cell(codec, changes)]


def table_rows(runs: dict[str, list[Report]], optimizers: Sequence[str], codecs: Sequence[str]) -> list[list[str]]:
    """The cells of the table, header first, then a row per optimizer and codec (the doc's order)."""
    header = ["optimizer", "state_codec", *(f"{task} {label}" for task in runs for _, label in METRICS)]
    return [[*header, "target: no worse than"], *(codec_row(runs, o, c) for o in optimizers for c in codecs)]


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """The rows as a Markdown table, in the doc's layout (no padding; the header's rule as ``|---|``)."""
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


# --- the figure ---------------------------------------------------------------------------------------------------


def mean_curve(reports: Sequence[Report], label: str, metric: str = "test_loss") -> tuple[list[int], list[float]]:
    """The evaluation steps and the ``metric`` at each, mean over the seeds' reports. Every seed evaluates at the
    same steps; a run that diverged stops early, so the curve is cut at the shortest."""
    curves = [result(r, label)["curves"] for r in reports]
    n = min(len(c[metric]) for c in curves)
    means = [
        math.fsum(math.nan if c[metric][i] is None else c[metric][i] for c in curves) / len(curves) for i in range(n)
    ]
    return list(curves[0]["step"][:n]), means


def plot_quality(runs: dict[str, list[Report]], optimizers: Sequence[str], codecs: Sequence[str], path: str) -> str:
    """The test loss against the step, mean over the seeds: a row of panels per task, a panel per optimizer, a line
    per codec. Writes the PNG at ``path`` and returns it."""
    from .plots import _figure, _save, color

    fig = _figure(2.8 * len(optimizers), 2.45 * len(runs))
    axes = fig.subplots(len(runs), len(optimizers), squeeze=False)
    seeds = len(next(iter(runs.values())))
    for row, (task, reports) in enumerate(runs.items()):
        for col, optimizer in enumerate(optimizers):
            ax = axes[row][col]
            for i, codec in enumerate(codecs):
                steps, losses = mean_curve(reports, spec(optimizer, codec))
                style = "--" if codec in _DASHED else "-"
                ax.plot(steps, losses, style, color=color(_COLOR_INDEX.get(codec, i)), linewidth=1.3, label=codec)
            ax.set_title(f"{task}: {optimizer}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"test loss (mean of {seeds} seed{'s' if seeds > 1 else ''})", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(title="state_codec", fontsize=8, title_fontsize=8)
    return _save(fig, path)


# --- the command line ---------------------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gradstep.lab.codec_quality",
        description="Train each optimizer with each state codec (gradstep compare) and print the table and draw "
        "the figure of docs/state-codecs.md's 'Training quality'.",
    )
    parser.add_argument("--out", default="codec-quality", help="where the JSON, table and figure go")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optimizer names")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated state codecs (fp32 is added)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated compare tasks")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the task's default epochs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--no-run", action="store_true", help="use the JSON files already in --out; train nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    optimizers, tasks = _names(args.optimizers), _names(args.tasks)
    seeds = [int(s) for s in _names(args.seeds)]
    codecs = _names(args.codecs)
    if BASELINE not in codecs:  # every change is measured from it
        codecs.insert(0, BASELINE)
    if args.no_run:
        runs = load_all(args.out, tasks, seeds)
    else:
        runs = run_all(args.out, optimizers, codecs, tasks, seeds, args.steps, args.threads)
    table = markdown_table(table_rows(runs, optimizers, codecs))
    with open(os.path.join(args.out, "codecs-quality.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)
    figure = plot_quality(runs, optimizers, codecs, os.path.join(args.out, "codecs-quality.png"))
    print(f"wrote {figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

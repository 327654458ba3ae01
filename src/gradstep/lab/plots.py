"""The pictures of ``gradstep compare`` and ``gradstep lr-find``, as PNG files (matplotlib, Agg).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, never through ``pyplot``:
no window opens, no global backend is switched, and nothing is left open in a notebook that imports this module.
matplotlib is imported when a function is called (``pip install 'gradstep[cli]'``); without it they raise
:class:`~gradstep.lab.tasks.MissingDependency`.

Each function takes what :mod:`gradstep.lab.tasks` returns and a path, writes the PNG and returns the path. An
optimizer keeps its colour from one figure to the next (the ``index``-th colour of matplotlib's ``tab10``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .tasks import Function2D, History, LRFinderResult, MissingDependency, SweepResult, Task

__all__ = ["legend_label", "plot_curves", "plot_lr_find", "plot_lr_sweep", "plot_trajectories", "smooth"]

DPI = 110
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("plots need matplotlib: pip install 'gradstep[cli]' (or matplotlib)") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | os.PathLike[str]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    # No "Software" metadata with matplotlib's version: the same run gives the same bytes on any install.
    fig.savefig(os.fspath(path), dpi=DPI, format="png", metadata={"Software": None})
    return os.fspath(path)


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def smooth(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as the LR range test's): ``beta=0`` returns the values."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def legend_label(spec: str, lr: float | None = None) -> str:
    """One format for every optimizer: ``sgd (lr=0.1, momentum=0.9)``, ``adamw (lr=0.001)``. The lr is added
    where the spec does not say it (a default, ``--lr``, or the sweep's choice)."""
    from ..core.registry import parse_spec

    try:
        name, hypers = parse_spec(spec)
    except ValueError:  # not a spec (a label given by hand): shown as it is
        return spec if lr is None else f"{spec} (lr={lr:.3g})"
    if lr is not None and "lr" not in hypers:
        hypers = {"lr": float(f"{lr:.3g}"), **hypers}
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in hypers.items())
    return f"{name} ({shown})" if shown else name


def _label(h: History) -> str:
    return legend_label(h.label, h.lr)


def _use_log(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 20


def plot_curves(histories: Sequence[History], task: Task, path: str | os.PathLike[str], subtitle: str = "") -> str:
    """The loss curves: the minibatch loss of every step (faint, with its moving average), then each evaluated
    metric (for a 2-D task: the function's value and the distance to the minimum) against the step."""
    panels: list[tuple[str, str]] = []
    if not isinstance(task, Function2D):
        panels.append(("step_loss", "training loss (minibatches, smoothed)"))
    for m in task.metrics:
        if isinstance(task, Function2D) or m.key != "train_loss":
            panels.append((m.key, m.label))
    fig = _figure(4.6 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    higher = {m.key for m in task.metrics if m.higher_is_better}
    for ax, (key, title) in zip(axes, panels):
        seen: list[float] = []  # what sets the y-range: the smoothed curves, not the spikes of single minibatches
        for i, h in enumerate(histories):
            if key == "step_loss":
                ys = h.step_loss
                xs = list(range(1, len(ys) + 1))
                window = max(1, len(ys) // 25)
                if window > 1:
                    ax.plot(xs, ys, color=color(i), alpha=0.18, linewidth=0.7)
                ys = smooth(ys, 1 - 2 / (window + 1))
            else:
                xs, ys = h.eval_steps, h.curves.get(key, [])
            ax.plot(xs, ys, color=color(i), linewidth=1.6, label=_label(h))
            if h.diverged is not None and xs:
                ax.plot(xs[-1:], ys[-1:], marker="x", markersize=9, color=color(i))
            seen.extend(ys)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if key == "step_loss" else title)
        if key in higher:
            # Every evaluation of the runs that went to the end, the first ones included (an accuracy from 0.1).
            values = [v for h in histories if h.diverged is None for v in h.curves.get(key, []) if math.isfinite(v)]
            if values:
                ax.set_ylim(max(0.0, min(values) - 0.02), min(1.0, max(values)) + 0.02)
        elif _use_log(seen):
            ax.set_yscale("log")
            finite = [v for v in seen if math.isfinite(v)]
            ax.set_ylim(min(finite) / 1.5, max(finite) * 1.5)
        ax.grid(True, alpha=0.3)
    title = task.description + (f"\n{subtitle}" if subtitle else "")
    fig.suptitle(title, fontsize=10)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=min(4, len(histories)), fontsize=9
    )
    return _save(fig, path)


def _function_grid(task: Function2D, n: int = 240) -> tuple[Any, Any, Any]:
    import torch

    x0, x1, y0, y1 = task.extent
    xs = torch.linspace(x0, x1, n, dtype=torch.float64)
    ys = torch.linspace(y0, y1, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx.numpy(), gy.numpy(), task.function(gx, gy).numpy()


def plot_trajectories(histories: Sequence[History], task: Function2D, path: str | os.PathLike[str]) -> str:
    """Each optimizer's path over the function's contour plot, one panel each (start: white circle; minimum: star)."""
    from matplotlib.colors import LogNorm

    n = len(histories)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.3 * cols, 4.0 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    gx, gy, gz = _function_grid(task)
    levels: Any = 30
    norm: Any = None
    if task.log_contours:
        lo = max(float(gz.min()), 1e-3)
        levels = [lo * (float(gz.max()) / lo) ** (k / 30) for k in range(31)]
        norm = LogNorm(vmin=lo, vmax=float(gz.max()))
        gz = gz.clip(min=lo)
    for ax in axes[n:]:
        ax.set_visible(False)
    for i, (ax, h) in enumerate(zip(axes, histories)):
        ax.contourf(gx, gy, gz, levels=levels, norm=norm, cmap="viridis", alpha=0.85)
        if task.log_contours:  # on Rastrigin's egg box, lines over the colours would only add noise
            ax.contour(gx, gy, gz, levels=levels, norm=norm, colors="white", linewidths=0.3, alpha=0.5)
        if h.trajectory:
            xs = [p[0] for p in h.trajectory]
            ys = [p[1] for p in h.trajectory]
            ax.plot(xs, ys, color=color(i), linewidth=1.4, marker="o", markersize=1.8)
            ax.plot(xs[-1:], ys[-1:], marker="o", markersize=6, color=color(i), markeredgecolor="black")
        ax.plot(*task.start, marker="o", markersize=7, color="white", markeredgecolor="black")
        ax.plot(*task.minimum, marker="*", markersize=13, color="gold", markeredgecolor="black")
        x0, x1, y0, y1 = task.extent
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        final = h.final("loss")
        status = "diverged" if h.diverged is not None else (f"f = {final:.3g}" if final is not None else "")
        ax.set_title(f"{_label(h)}\n{status}, {h.steps} steps", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_aspect("equal")
    fig.suptitle(task.description, fontsize=10)
    fig.legend(handles=_trajectory_keys(), loc="outside lower center", ncol=4, fontsize=9)
    return _save(fig, path)


def _trajectory_keys() -> list[Any]:
    """What the trajectories' markers mean, for their legend."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color="white", marker="o", markersize=7, markeredgecolor="black", linestyle="none",
               label="start"),
        Line2D([], [], color="gray", marker="o", markersize=1.8, linewidth=1.4, label="path (a dot per step)"),
        Line2D([], [], color="gray", marker="o", markersize=6, markeredgecolor="black", linestyle="none",
               label="end"),
        Line2D([], [], color="gold", marker="*", markersize=13, markeredgecolor="black", linestyle="none",
               label="minimum"),
    ]  # fmt: skip


def plot_lr_sweep(sweeps: Sequence[SweepResult], path: str | os.PathLike[str], colors: Sequence[int] = ()) -> str:
    """``--lr auto``: each optimizer's score (mean minibatch loss at the end of a short run) against the lr tried;
    the chosen lr is the filled marker, a diverged run an ``x`` at the top."""
    fig = _figure(8.4, 4.4)
    ax = fig.subplots()
    finite = [s for r in sweeps for s in r.scores if math.isfinite(s)]
    top = max(finite) * 1.5 if finite else 1.0
    for i, r in enumerate(sweeps):
        c = color(colors[i] if i < len(colors) else i)
        pts = [(lr, s) for lr, s in zip(r.lrs, r.scores) if math.isfinite(s)]
        label = legend_label(r.label)
        bad = [lr for lr, s in zip(r.lrs, r.scores) if not math.isfinite(s)]
        if bad:
            # Why the curve ends: said on the plot, at the lr where the run diverged.
            label += f": diverged at lr={bad[0]:.3g}"
            ax.plot(bad, [top] * len(bad), linestyle="none", marker="x", color=c)
            ax.annotate(
                f"diverged at lr={bad[0]:.3g}", (bad[0], top), textcoords="offset points", xytext=(-7, -9 * i),
                ha="right", va="center", fontsize=7, color=c,
            )  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker="o", markersize=4, label=label)
        best = dict(zip(r.lrs, r.scores))[r.best_lr]
        if math.isfinite(best):
            ax.plot([r.best_lr], [best], marker="o", markersize=10, color=c, markeredgecolor="black")
    ax.set_xscale("log")
    if _use_log(finite):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mean minibatch loss, last quarter of the run")
    steps = sweeps[0].steps if sweeps else 0
    ax.set_title(
        f"learning-rate sweep ({steps} steps per lr; large dot: the lr chosen)\n"
        "a curve ends one lr past its best, where the loss rises again, or where the run diverged (x)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_lr_find(result: LRFinderResult, path: str | os.PathLike[str], title: str = "") -> str:
    """The LR range test: minibatch loss (faint) and its smoothed curve against the lr (log scale), with the
    suggested lr (solid), the lr of the lowest smoothed loss (dotted) and of the steepest fall (dashed)."""
    fig = _figure(7.0, 4.4)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color=color(0), alpha=0.25, linewidth=0.8, label="minibatch loss")
    ax.plot(result.lrs, result.smoothed, color=color(0), linewidth=1.8, label="smoothed")
    marks = (
        (result.suggested_lr, "-", color(3), "suggested"),
        (result.min_loss_lr, ":", "black", "lowest smoothed loss"),
        (result.steepest_lr, "--", color(2), "steepest fall"),
    )
    for lr, style, c, what in marks:
        if lr is not None:
            ax.axvline(lr, linestyle=style, color=c, linewidth=1.3, label=f"{what}: {lr:.3g}")
    ax.set_xscale("log")
    if result.smoothed:
        # The smoothed curve from its start to a little below its minimum; single minibatches and the blow-up at
        # the end may leave the frame.
        low = min(result.smoothed)
        high = max(result.smoothed[0], low) * 1.25
        if high > low:
            ax.set_ylim(low - 0.15 * (high - low), high)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or f"LR range test: {result.label}", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)

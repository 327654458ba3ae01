"""The comparison's table and its self-contained HTML report.

Both read the results dict that ``gradstep compare --json`` writes (see :func:`gradstep.lab.cli` for its keys), so the
terminal table, the HTML table and the JSON always hold the same numbers. The HTML embeds its PNG files as base64
``data:`` URIs, so the one file can be mailed or attached to an issue; it also links the files next to it.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["compare_html", "summary_table"]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def summary_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per optimizer: lr, the final value of every metric (and the best of those not measured
    on the training set), steps to the target, and the training time.

    A diverged run shows ``diverged`` where its final values would be; its best values are those before it
    diverged.
    """
    metrics = report["metrics"]
    target = report.get("target")
    header = ["optimizer", "lr"]
    for m in metrics:
        header.append(m["label"])
        if m["key"] != "train_loss":
            header.append(f"best {m['label']}")
    if target is not None:
        label = next((m["label"] for m in metrics if m["key"] == target["metric"]), target["metric"])
        header.append(f"steps to {label} {'>=' if target['higher_is_better'] else '<='} {target['value']:g}")
    header.append("time (s)")
    rows = []
    for r in report["results"]:
        row = [r["label"], "-" if r.get("lr") is None else f"{r['lr']:.3g}"]
        for m in metrics:
            key = m["key"]
            row.append("diverged" if r["diverged"] is not None else _fmt(r.get(f"final_{key}")))
            if key != "train_loss":
                row.append(_fmt(r.get(f"best_{key}")))
        if target is not None:
            row.append("-" if r["steps_to_target"] is None else str(r["steps_to_target"]))
        row.append(f"{r['wall_time']:.2f}")
        rows.append(row)
    return header, rows


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: 600; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; border-radius: 3px; }
pre { padding: 0.6em; overflow-x: auto; }
.note { color: #666; font-size: 0.9em; }
"""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], best_row: int | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            numeric = j > 0 and (cell == "-" or _is_number(cell))
            cells.append(f"<td{' class=num' if numeric else ''}>{html.escape(cell)}</td>")
        out.append(f"<tr{' class=best' if i == best_row else ''}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _best_row(report: dict[str, Any]) -> int | None:
    """The row of the best final value of the target's metric (the headline metric), among runs that finished."""
    target = report.get("target")
    if target is None:
        return None
    key, higher = target["metric"], target["higher_is_better"]
    scored = [
        (i, r.get(f"final_{key}"))
        for i, r in enumerate(report["results"])
        if r["diverged"] is None and r.get(f"final_{key}") is not None
    ]
    if not scored:
        return None
    return (max if higher else min)(scored, key=lambda t: t[1])[0]


def compare_html(report: dict[str, Any], images: dict[str, str], path: str | os.PathLike[str]) -> str:
    """Write the report of one comparison to ``path``.

    Args:
        report: the results dict (``gradstep compare --json``).
        images: caption -> PNG path, in display order; each is embedded, and linked by its name relative to the
            report's directory.
    """
    e = html.escape
    header, rows = summary_table(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gradstep compare: {e(report['task'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>gradstep compare: {e(report['task'])}</h1>",
        f"<p>{e(report['description'])}.<br>{e(_setting(report))}</p>",
        f"<p>Note: {e(report['note'])}.</p>" if report.get("note") else "",
        f"<pre>{e(report.get('command', ''))}</pre>",
        "<h2>Results</h2>",
        _html_table(header, rows, _best_row(report)),
        '<p class="note">Final values are at the last evaluation; "best" is the best evaluation; steps to target '
        "counts optimizer steps at the first evaluation that met it. Time is spent in training steps (evaluation "
        "excluded), on one CPU thread unless told otherwise. Bold: the best final value of the target's metric.</p>",
    ]
    notes = [f"{r['label']} diverged at {r['diverged']}" for r in report["results"] if r["diverged"] is not None]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    directory = os.path.dirname(os.path.abspath(path))
    for caption, image in images.items():
        name = os.path.relpath(os.path.abspath(image), directory)
        parts.append(f"<h2>{e(caption)}</h2>")
        parts.append(f'<p><a href="{e(name)}"><img src="{_data_uri(image)}" alt="{e(caption)}"></a></p>')
    sweeps = report.get("sweeps") or []
    if sweeps:
        parts.append("<h2>The sweep's runs</h2>")
        parts.append(
            f"<p>Each optimizer ran {sweeps[0]['steps']} steps at each lr from the same initial weights; the lr with "
            "the lowest mean minibatch loss over the last quarter of its run was used above.</p>"
        )
        sweep_rows = [
            [
                s["label"],
                f"{s['best_lr']:.3g}",
                ", ".join(_sweep_point(lr, sc) for lr, sc in zip(s["lrs"], s["scores"])),
            ]
            for s in sweeps
        ]
        parts.append(_html_table(["optimizer", "chosen lr", "lr: score"], sweep_rows))
    parts.append("<h2>Optimizers</h2><table><tr><th>spec</th><th>optimizer</th><th>given hyperparameters</th></tr>")
    for r in report["results"]:
        given = ", ".join(f"{k}={v!r}" for k, v in r.get("hyperparameters", {}).items()) or "(defaults)"
        cells = (f"<code>{e(r['label'])}</code>", e(r.get("optimizer", "")), e(given))
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    parts.append(
        f'<p class="note">gradstep {e(str(report.get("gradstep")))}, torch {e(str(report.get("torch")))}, '
        f"Python {e(str(report.get('python')))}. The numbers are in results.json.</p>"
    )
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return os.fspath(path)


def _sweep_point(lr: float, score: float | None) -> str:
    return f"{lr:.2g}: {_fmt(score)}" if score is not None else f"{lr:.2g}: diverged"


def run_length(report: dict[str, Any]) -> str:
    """How long the run was, in words that fit the task: steps alone for a 2-D function (every step sees the whole
    function: no epochs, no batches, nothing the seed draws), whole epochs plus the steps left over otherwise."""
    steps, per_epoch = report["steps"], report.get("steps_per_epoch")
    if report.get("full_batch"):
        return f"{steps} steps on the whole function (no minibatches)"
    text = f"{steps} steps"
    if per_epoch:
        epochs, rest = divmod(steps, per_epoch)
        if epochs == 0:
            text += f" ({rest} of the {per_epoch} steps of an epoch)"
        else:
            text += f" ({epochs} epoch{'s' if epochs > 1 else ''} of {per_epoch} steps"
            text += f" and {rest} steps)" if rest else ")"
    return text + f", batch size {report['batch_size']}, seed {report['seed']}"


def _setting(report: dict[str, Any]) -> str:
    text = run_length(report)
    if report.get("lr_mode") == "auto":
        text += ", learning rates chosen by a short sweep (--lr auto)"
    return text + "."

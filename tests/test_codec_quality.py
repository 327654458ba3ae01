"""gradstep.lab.codec_quality on a tiny configuration: the table agrees with the JSON runs it wrote, and the figure
is a PNG. The means and changes are recomputed here from the JSON files, not with the module's helpers."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from cli_helpers import check_png
from gradstep.lab import codec_quality

OPTIMIZER = "adamw"
CODECS = ("fp32", "int4")
TASK = "digits-mlp"
SEEDS = (0, 1)  # two, so that the table's mean is a mean
STEPS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The command run once: its output folder and what it printed."""
    out = tmp_path_factory.mktemp("quality")
    argv = ["--out", str(out), "--optimizers", OPTIMIZER, "--codecs", ",".join(CODECS), "--tasks", TASK]
    argv += ["--seeds", ",".join(map(str, SEEDS)), "--steps", str(STEPS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # capsys is per test; this fixture is per module
        assert codec_quality.main(argv) == 0
    return out, printed.getvalue()


def final(out: Path, codec: str, metric: str) -> list[float]:
    """The final ``metric`` of ``codec``'s run in each seed's JSON file."""
    values = []
    for seed in SEEDS:
        report = json.loads((out / f"{TASK}-{seed}.json").read_text())
        assert report["steps"] == STEPS and report["seed"] == seed and report["task"] == TASK
        (r,) = [r for r in report["results"] if r["hyperparameters"] == {"state_codec": codec}]
        assert r["optimizer"] == OPTIMIZER
        values.append(r["curves"][metric][-1])
    return values


def cells(table: str) -> list[list[str]]:
    lines = table.strip().splitlines()
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert lines[1] == "|---|---|---|---|---|"
    return [line[2:-2].split(" | ") for line in lines[:1] + lines[2:]]


def test_the_table_has_the_docs_layout(run: tuple[Path, str]) -> None:
    out, printed = run
    table = (out / "codecs-quality.md").read_text()
    assert printed.strip() == table.strip()
    rows = cells(table)
    assert rows[0] == [
        "optimizer", "state_codec", f"{TASK} train loss", f"{TASK} test loss", "target: no worse than"
    ]  # fmt: skip
    assert [row[:2] for row in rows[1:]] == [[OPTIMIZER, codec] for codec in CODECS]
    assert rows[1][-1] == ""  # fp32 is the baseline: no target


def test_the_table_holds_the_mean_over_seeds_and_the_change_from_fp32(run: tuple[Path, str]) -> None:
    out, _ = run
    rows = {row[1]: row for row in cells((out / "codecs-quality.md").read_text())[1:]}
    changes = []
    for column, metric in ((2, "train_loss"), (3, "test_loss")):
        base = sum(final(out, "fp32", metric)) / len(SEEDS)
        assert float(rows["fp32"][column]) == pytest.approx(base, abs=5e-5)
        mean = sum(final(out, "int4", metric)) / len(SEEDS)
        expected = 100 * (mean - base) / base
        match = re.fullmatch(r"(\d+\.\d{4}) \(([+-]\d+\.\d{2})%\)", rows["int4"][column])
        assert match, rows["int4"][column]
        assert float(match[1]) == pytest.approx(mean, abs=5e-5)
        assert float(match[2]) == pytest.approx(expected, abs=5e-3 + 1e-9)
        changes.append(expected)
    worst = max(changes)
    verdict = "met" if worst <= 3.0 else f"**not met** ({worst:+.1f}%)"
    assert rows["int4"][-1] == f"3.0%: {verdict}"


def test_no_run_rebuilds_the_same_table_and_the_figure_is_a_png(run: tuple[Path, str]) -> None:
    out, _ = run
    table = (out / "codecs-quality.md").read_text()
    (out / "codecs-quality.png").unlink()
    argv = ["--out", str(out), "--optimizers", OPTIMIZER, "--codecs", "int4", "--tasks", TASK, "--no-run"]
    assert codec_quality.main([*argv, "--seeds", ",".join(map(str, SEEDS))]) == 0
    assert (out / "codecs-quality.md").read_text() == table  # fp32 is added as the baseline
    check_png(out / "codecs-quality.png")

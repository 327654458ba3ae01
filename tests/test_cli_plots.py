"""What people look at: compare's PNG curves, trajectories and HTML report, ``--lr auto``, ``lr-find``, and the tasks
behind them (the CNN, the character-level LM, Rosenbrock and Rastrigin).

Every command runs for real, in-process, on a few steps. A PNG is checked by its signature and by decoding it with
PIL and with matplotlib; an HTML report must embed those very files (base64) and link them; the JSON must hold the
numbers the table, the trajectory and the sweep are made of, which are recomputed here where they can be.
"""

from __future__ import annotations

import json
import math
import random
import sys
from html import unescape
from pathlib import Path

import pytest
import torch

import gradstep
from cli_helpers import check_png, embedded_pngs, run_main, table_row
from gradstep.lab import tasks


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Commands write their default --out directory (and inspect's outputs) into the working directory.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rosenbrock(x: float, y: float) -> float:
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def rastrigin(x: float, y: float) -> float:
    return 20 + x * x + y * y - 10 * (math.cos(2 * math.pi * x) + math.cos(2 * math.pi * y))


# --- compare: files ---------------------------------------------------------------------------------------------


def test_compare_writes_curves_json_and_an_html_report_that_embeds_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "report"
    extra = tmp_path / "extra.json"
    args = ["compare", "adamw:lr=0.01", "sgd:lr=0.1,momentum=0.9", "--steps", "12", "--eval-every", "4"]
    status, out, err = run_main(capsys, *args, "--out", str(out_dir), "--json", str(extra))
    assert status == 0, err
    assert f"wrote report.html, results.json, loss-curves.png in {out_dir}" in out
    report = json.loads((out_dir / "results.json").read_text())
    assert json.loads(extra.read_text())["results"] == report["results"]
    assert report["artifacts"] == {"Loss curves": "loss-curves.png"}
    width, height = check_png(out_dir / "loss-curves.png")
    assert width > height > 200

    html = (out_dir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert embedded_pngs(html) == [(out_dir / "loss-curves.png").read_bytes()]
    assert 'href="loss-curves.png"' in html
    assert "<script" not in html and "http" not in html  # self-contained: nothing is fetched
    for r in report["results"]:
        assert r["curves"]["step"] == [0, 4, 8, 12]
        row = table_row(out, r["label"])
        assert row[3] == f"{r['final_test_loss']:.4f}"
        # The HTML table holds the same numbers as the printed one.
        cells = "".join(f"<td class=num>{cell}</td>" for cell in row[1:])
        assert f"<td>{r['label']}</td>{cells}" in html


def test_compare_and_lr_find_write_into_gradstep_out_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(capsys, "compare", "adam:lr=0.1", "--task", "rosenbrock", "--steps", "5")
    assert status == 0, err
    written = Path("gradstep-out", "compare-rosenbrock")
    assert out.endswith(f"in {written}\n")
    assert sorted(p.name for p in written.iterdir()) == [
        "loss-curves.png",
        "report.html",
        "results.json",
        "trajectories.png",
    ]
    status, out, err = run_main(capsys, "lr-find", "adam", "--task", "rosenbrock", "--steps", "20")
    assert status == 0, err
    assert sorted(p.name for p in Path("gradstep-out", "lr-find-rosenbrock").iterdir()) == [
        "lr-find.json",
        "lr-find.png",
    ]


def test_compare_report_of_a_diverged_run_still_draws_and_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = run_main(capsys, "compare", "sgd:lr=1e6", "adam", "--steps", "6", "--out", str(tmp_path))
    assert status == 0, err
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["results"][0]["diverged"] is not None
    check_png(tmp_path / "loss-curves.png")
    html = (tmp_path / "report.html").read_text()
    assert f"<li>sgd:lr=1e6 diverged at {report['results'][0]['diverged']}</li>" in unescape(html)


def test_compare_without_matplotlib_warns_once_and_writes_json_and_html(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    status, out, err = run_main(capsys, "compare", "adam", "--steps", "3", "--out", str(tmp_path))
    assert status == 0
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]
    assert embedded_pngs((tmp_path / "report.html").read_text()) == []


# --- compare: the 2-D functions and --lr auto -------------------------------------------------------------------


def test_compare_rosenbrock_with_lr_auto_draws_trajectories_and_uses_each_sweeps_best_lr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["compare", "adam", "sgd:momentum=0.9", "--task", "rosenbrock", "--lr", "auto", "--steps", "30"]
    status, out, err = run_main(capsys, *args, "--sweep-steps", "8", "--out", str(tmp_path))
    assert status == 0, err
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["lr_mode"] == "auto"
    names = ["loss-curves.png", "trajectories.png", "lr-sweep.png"]
    assert list(report["artifacts"].values()) == names
    for name in names:
        check_png(tmp_path / name)
    html = (tmp_path / "report.html").read_text()
    assert embedded_pngs(html) == [(tmp_path / name).read_bytes() for name in names]

    for r, sweep in zip(report["results"], report["sweeps"]):
        assert sweep["label"] == r["label"] and sweep["steps"] == 8
        # The run used the sweep's lr, which has the lowest score of the lrs tried ...
        assert r["lr"] == sweep["best_lr"]
        scores = {lr: s for lr, s in zip(sweep["lrs"], sweep["scores"]) if s is not None}
        assert scores[sweep["best_lr"]] == min(scores.values())
        # ... on a grid spaced by sqrt(10) (rounded to three digits), grown past the default grid of 7 if the best
        # lr was at an edge.
        assert len(sweep["lrs"]) >= 7
        for a, b in zip(sweep["lrs"], sweep["lrs"][1:]):
            assert b / a == pytest.approx(math.sqrt(10), rel=0.01)
        assert sweep["best_lr"] not in (sweep["lrs"][0], sweep["lrs"][-1])
        assert f"{r['lr']:.3g}" == table_row(out, r["label"])[1]

        # The trajectory: the start, then one point per step; the reported values are the function there.
        traj = r["trajectory"]
        assert traj[0] == [-2.0, 2.0] and len(traj) == r["steps"] + 1 == 31
        assert r["curves"]["loss"] == pytest.approx([rosenbrock(*p) for p in traj], rel=1e-12)
        x, y = traj[-1]
        assert r["final_distance"] == pytest.approx(math.hypot(x - 1, y - 1), rel=1e-12)
        assert r["best_loss"] == min(r["curves"]["loss"])
        reached = [s for s, v in zip(r["curves"]["step"], r["curves"]["loss"]) if v <= 1e-3]
        assert r["steps_to_target"] == (reached[0] if reached else None)


def rosenbrock_gradient(x: float, y: float) -> tuple[float, float]:
    return -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def rastrigin_gradient(x: float, y: float) -> tuple[float, float]:
    return 2 * x + 20 * math.pi * math.sin(2 * math.pi * x), 2 * y + 20 * math.pi * math.sin(2 * math.pi * y)


@pytest.mark.parametrize(
    ("task", "gradient"),
    [(tasks.Rosenbrock, rosenbrock_gradient), (tasks.Rastrigin, rastrigin_gradient)],
    ids=["rosenbrock", "rastrigin"],
)
def test_a_plain_sgd_step_on_a_2d_function_follows_its_analytic_gradient(task, gradient) -> None:
    t = task()
    history = tasks.train(t, lambda ps: gradstep.SGD(ps, lr=1e-3), steps=2)
    (x0, y0), (x1, y1), (x2, y2) = history.trajectory
    assert (x0, y0) == t.start
    gx, gy = gradient(x0, y0)
    assert (x1, y1) == pytest.approx((x0 - 1e-3 * gx, y0 - 1e-3 * gy), rel=1e-12)
    gx, gy = gradient(x1, y1)
    assert (x2, y2) == pytest.approx((x1 - 1e-3 * gx, y1 - 1e-3 * gy), rel=1e-12)
    f = rosenbrock if task is tasks.Rosenbrock else rastrigin
    assert history.step_loss == pytest.approx([f(x0, y0), f(x1, y1)], rel=1e-12)
    assert t.evaluate(t.init_model())["distance"] == pytest.approx(math.dist(t.start, t.minimum))
    # The global minimum is where the task says, with value 0.
    model = t.init_model()
    with torch.no_grad():
        model.xy.copy_(torch.tensor(t.minimum, dtype=torch.float64))
    assert t.evaluate(model) == {"loss": pytest.approx(0.0, abs=1e-12), "distance": 0.0}


class Bowl(tasks.Function2D):
    """x^2 + y^2: plain SGD multiplies the point by (1 - 2 lr) per step, so the best lr of a short run is known."""

    name = "bowl"
    start = (1.0, -1.0)
    minimum = (0.0, 0.0)
    target = tasks.Target("loss", 1e-6)

    @staticmethod
    def function(x, y):
        return x**2 + y**2


def test_sweep_lr_grows_the_grid_while_the_best_lr_is_at_its_edge() -> None:
    result = tasks.sweep_lr(Bowl(), lambda ps, lr: gradstep.SGD(ps, lr=lr), center=1e-3, steps=4)
    # |1 - 2 lr| is smallest at 0.5: on the grid 1e-3 * 10^(k/2), 0.316 beats 0.1 (0.37 vs 0.8 per step) and 1.0
    # (1.0: no progress). The first grid (3.16e-5 .. 3.16e-2) had its best at the top edge, so it grew by 0.1,
    # 0.316 and 1.0, and stopped once the best (0.316) was inside.
    assert result.lrs == [3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3, 0.01, 0.0316, 0.1, 0.316, 1.0]
    assert result.best_lr == 0.316
    # A score is the mean loss over the last quarter of the run: here, the loss before the 4th step.
    assert result.scores[result.lrs.index(0.316)] == pytest.approx(2 * (1 - 2 * 0.316) ** 6, rel=1e-9)
    assert result.scores[-1] == pytest.approx(2.0)


def test_sweep_lr_goes_lower_when_every_lr_diverges() -> None:
    # On the bowl, SGD with lr > 1 grows the point by |1 - 2 lr| per step: in 150 steps the loss overflows for
    # lr >= 9.49 (17.97^300 > 1e308) but not for lr 3.0 (5^300). The first grid (9.49, 30, 94.9) diverges entirely,
    # so it grows downwards: 3.0 (finite but huge), 0.949, 0.3 (the best: 0.4 per step) and 0.0949 (0.81 per step),
    # and stops there, having grown four times.
    result = tasks.sweep_lr(Bowl(), lambda ps, lr: gradstep.SGD(ps, lr=lr), center=30.0, steps=150, points=3)
    assert result.lrs == [0.0949, 0.3, 0.949, 3.0, 9.49, 30.0, 94.9]
    assert [math.isfinite(s) for s in result.scores] == [True] * 4 + [False] * 3
    assert result.best_lr == 0.3


# --- lr-find ----------------------------------------------------------------------------------------------------


def test_lr_find_writes_its_plot_and_json_and_suggests_a_tenth_of_the_best_lr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["lr-find", "adamw", "--steps", "40", "--start-lr", "1e-4", "--end-lr", "10", "--smoothing", "0.9"]
    status, out, err = run_main(capsys, *args, "--out", str(tmp_path))
    assert status == 0, err
    check_png(tmp_path / "lr-find.png")
    data = json.loads((tmp_path / "lr-find.json").read_text())
    lrs, losses, smoothed = data["lrs"], data["losses"], data["smoothed"]
    assert data["optimizer"] == "adamw" and data["task"] == "digits-mlp"
    # An exponential sweep from start to end over the steps asked for (fewer if it stopped early).
    assert lrs[0] == 1e-4 and len(lrs) == len(losses) == len(smoothed) <= 40
    ratio = (10 / 1e-4) ** (1 / 39)
    assert all(b / a == pytest.approx(ratio, rel=1e-9) for a, b in zip(lrs, lrs[1:]))
    if data["stopped"] is None:
        assert len(lrs) == 40 and lrs[-1] == pytest.approx(10)
    # The smoothed loss is the bias-corrected EMA of the minibatch losses.
    avg, expected = 0.0, []
    for i, v in enumerate(losses):
        avg = 0.9 * avg + 0.1 * v
        expected.append(avg / (1 - 0.9 ** (i + 1)))
    assert smoothed == pytest.approx(expected, rel=1e-9)
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    assert data["min_loss_lr"] == lrs[best]
    assert data["suggested_lr"] == pytest.approx(lrs[best] / 10)
    assert data["steepest_lr"] in lrs[:best]
    rounded = float(f"{data['suggested_lr']:.3g}")
    assert f"suggested lr: {rounded:.3g}" in out
    assert f"try: gradstep compare adamw:lr={rounded!r} --task digits-mlp" in out
    # The first minibatch is the initial model's, with the task's first batch.
    task = tasks.DigitsMLP()
    assert losses[0] == pytest.approx(task.loss(task.init_model(), next(task.batches(0))).item(), rel=1e-6)


def test_lr_find_stops_when_the_loss_blows_up(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lr-find", "sgd", "--task", "rosenbrock", "--start-lr", "1e-6", "--end-lr", "1", "--steps", "60"]
    status, out, err = run_main(capsys, *args, "--no-report", "--json")
    assert status == 0, err
    data = json.loads(out)
    assert data["stopped"] is not None and len(data["lrs"]) < 60
    # The smoothed loss at the end passed 4x its minimum (or a loss was no longer finite).
    assert data["smoothed"][-1] > 4 * min(data["smoothed"]) or "loss became" in data["stopped"]


def test_lr_find_with_too_few_steps_before_the_blow_up_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lr-find", "sgd", "--task", "rosenbrock", "--start-lr", "1", "--end-lr", "10", "--steps", "10"]
    status, _, err = run_main(capsys, *args, "--no-report")
    assert status == 1
    assert err.startswith("gradstep: error: lr-find: only ") and err.count("\n") == 1


# --- the other tasks --------------------------------------------------------------------------------------------


def test_compare_runs_the_cnn_and_the_character_lm(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "adamw:lr=3e-3", "--task", "digits-cnn", "--steps", "3", "--no-report", "--json"]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    (r,) = json.loads(out)["results"]
    assert r["steps"] == 3 and r["curves"]["step"] == [0, 3]
    assert 0 <= r["final_test_accuracy"] <= 1

    args = [
        "compare",
        "adamw:lr=3e-3",
        "--task",
        "char-lm",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--no-report",
        "--json",
    ]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    report = json.loads(out)
    (r,) = report["results"]
    assert report["target"] == {"metric": "test_loss", "value": 2.0, "higher_is_better": False}
    # Before training, the model predicts the next character about uniformly over the 97 symbols.
    assert r["curves"]["test_loss"][0] == pytest.approx(math.log(97), abs=0.3)
    assert len(r["step_loss"]) == 2


def test_cnn_is_a_convolutional_model_on_8x8_images() -> None:
    task = tasks.DigitsCNN(seed=0)
    model = task.init_model()
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    x, y = next(task.batches(0))
    assert model(x).shape == (len(y), 10)
    assert [tuple(p.shape) for p in model.parameters()][:2] == [(16, 1, 3, 3), (16,)]


def test_stdlib_text_is_read_in_a_fixed_order_and_falls_back_to_other_files(tmp_path: Path) -> None:
    (tmp_path / "textwrap.py").write_text("A" * 5)
    (tmp_path / "heapq.py").write_text("B" * 5)
    (tmp_path / "zz.py").write_text("Z" * 5)
    (tmp_path / "aa.py").write_text("Y" * 5)
    (tmp_path / "notes.txt").write_text("not python")
    # The listed modules first, in their order; then the other .py files, sorted.
    assert tasks.load_stdlib_text(17, root=str(tmp_path)) == "AAAAABBBBBYYYYYZZ"
    with pytest.raises(tasks.MissingDependency, match="20 of 21"):
        tasks.load_stdlib_text(21, root=str(tmp_path))
    # The real standard library gives the same text every time.
    assert tasks.load_stdlib_text(4000) == tasks.load_stdlib_text(4000)


def test_char_lm_batches_are_next_character_windows_of_the_training_text() -> None:
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(32, 127)) for _ in range(3000)) + "\t\u00e9\n"
    task = tasks.CharLM(seed=1, batch_size=8, seq_len=16, text=text, hidden=8, embed=4)
    codes = tasks.encode_text(text)
    assert codes[-3:].tolist() == [96, 96, 0]  # tab and é are the extra symbol (97th); newline is VOCAB[0]
    assert torch.equal(torch.cat([task.train_tokens, task.test_tokens]), codes)
    assert len(task.test_tokens) == int(len(codes) * 0.125)
    batches = list(task.batches(0))
    assert sum(len(x) for x, _ in batches) == task.windows == len(task.train_tokens) // 16 - 1
    where = {tuple(task.train_tokens[s : s + 16].tolist()): s for s in range(len(task.train_tokens) - 16)}
    starts = []
    for x, y in batches:
        assert x.shape[1] == y.shape[1] == 16
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
        starts += [where[tuple(row.tolist())] for row in x]
    # Every window once, all from one offset (below seq_len) in steps of seq_len, in a shuffled order.
    offset = starts[0] % 16
    assert sorted(starts) == [offset + 16 * i for i in range(task.windows)]
    assert starts != sorted(starts)
    assert [x.tolist() for x, _ in batches] == [x.tolist() for x, _ in task.batches(0)]

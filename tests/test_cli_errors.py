"""Errors a newcomer meets, and the command line's exit statuses as docs/cli.md gives them: 0 done, 1 a failure
while running, 2 bad input (command line, output path, checkpoint)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import gradstep
from cli_helpers import run_main
from gradstep.core.registry import get, parse_spec

FAST = ("--task", "rosenbrock", "--steps", "2", "--no-progress")


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


# --- library errors -----------------------------------------------------------------------------------------------


def test_an_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww' \(did you mean 'adamw'\?\); available: "):
        get("adamww")
    with pytest.raises(ValueError, match=r"unknown optimizer 'qqqqzz'; available: ") as info:
        get("qqqqzz")
    assert "did you mean" not in str(info.value)


def test_create_of_a_preset_without_its_lr_names_the_preset() -> None:
    with pytest.raises(ValueError, match=r"^fastai_adam needs a value of lr \(no default\)$"):
        gradstep.create("fastai_adam", [torch.nn.Parameter(torch.zeros(2))])


def test_a_parameter_in_two_groups_is_refused_by_name() -> None:
    shared, other = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(2,\)\) of param group 1 is already in param group 0"):
        gradstep.AdamW([{"params": [shared]}, {"params": [other, shared]}])
    named = [{"params": [shared], "param_names": ["w"]}, {"params": [other, shared], "param_names": ["b", "w"]}]
    with pytest.raises(ValueError, match=r"parameter 'w' of param group 1 is already in param group 0"):
        gradstep.AdamW(named)
    opt = gradstep.AdamW([shared])
    with pytest.raises(ValueError, match="already in param group 0"):
        opt.add_param_group({"params": iter([other, shared])})
    assert len(opt.param_groups) == 1  # the refused group changed nothing


def test_a_spec_is_answered_in_the_syntax_it_was_written_in() -> None:
    with pytest.raises(ValueError, match=r"'adamw:lr' must look like name:key=value,\.\.\.$"):
        parse_spec("adamw:lr")
    with pytest.raises(ValueError, match=r"must look like name:key=value,\.\.\.$"):
        parse_spec("adamw:lr=")
    with pytest.raises(ValueError, match=r"'adamw\(lr\)' must look like name\(key=value, \.\.\.\)$"):
        parse_spec("adamw(lr)")


def test_every_eps_mode_description_says_the_same_thing() -> None:
    descriptions = set()
    for name in gradstep.available():
        opt = get(name)._probe()
        declared = getattr(opt, "declared_hypers", dict)()
        if "eps_mode" in declared:
            descriptions.add(declared["eps_mode"].doc)
    assert len(descriptions) == 1, descriptions
    (text,) = descriptions
    assert "'torch': sqrt(v_hat) + eps" in text and "'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)" in text


# --- command line: status 2 ---------------------------------------------------------------------------------------


def test_an_unknown_name_on_the_command_line_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(capsys, "info", "adamww")
    assert status == 2 and out == "" and "did you mean 'adamw'?" in err


def test_a_spec_without_a_value_gets_the_command_line_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(capsys, "compare", "adamw:lr", *FAST)
    assert status == 2 and out == ""
    assert "name:key=value,..." in err and "name(key" not in err


@pytest.mark.parametrize("specs", [["adamw", "adamw"], ["adamw", "ADAMW:lr=0.001"]])
def test_compare_refuses_the_same_optimizer_twice(capsys: pytest.CaptureFixture[str], specs: list[str]) -> None:
    status, out, err = run_main(capsys, "compare", *specs, *FAST)
    assert status == 2 and out == ""
    assert specs[1] in err and "give each optimizer once" in err
    assert not Path("gradstep-out").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [["compare", "sgd"], ["lr-find", "sgd", "--steps", "3"]])
def test_an_out_dir_where_nothing_can_be_written_fails_before_training(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    # /proc accepts no new directory, even from root (for whom os.access says yes).
    status, out, err = run_main(capsys, *command, "--task", "rosenbrock", "--no-progress", "--out", "/proc/nope")
    assert status == 2
    assert out == ""  # nothing trained: no table
    assert err.startswith("gradstep: error: --out /proc/nope: ") and err.count("\n") == 1


def test_an_explicit_out_holding_a_report_is_refused_without_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "report"
    assert run_main(capsys, "compare", "sgd", *FAST, "--out", str(out_dir))[0] == 0
    first = (out_dir / "results.json").read_text()
    status, out, err = run_main(capsys, "compare", "adam", *FAST, "--out", str(out_dir))
    assert status == 2 and out == "" and "--overwrite" in err
    assert (out_dir / "results.json").read_text() == first  # untouched
    status, _, err = run_main(capsys, "compare", "adam", *FAST, "--out", str(out_dir), "--overwrite")
    assert status == 0, err
    assert json.loads((out_dir / "results.json").read_text())["results"][0]["optimizer"] == "adam"


def test_a_repeated_run_writes_a_new_numbered_default_directory(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        status, out, err = run_main(capsys, "compare", "sgd", *FAST)
        assert status == 0, err
    base = Path("gradstep-out")
    names = ["compare-rosenbrock", "compare-rosenbrock-2", "compare-rosenbrock-3"]
    assert sorted(p.name for p in base.iterdir()) == names
    assert f"in {base / 'compare-rosenbrock-3'}" in out
    status, _, _ = run_main(capsys, "lr-find", "sgd", "--task", "rosenbrock", "--steps", "3", "--no-progress")
    status, _, _ = run_main(capsys, "lr-find", "sgd", "--task", "rosenbrock", "--steps", "3", "--no-progress")
    assert (base / "lr-find-rosenbrock" / "lr-find.json").exists()
    assert (base / "lr-find-rosenbrock-2" / "lr-find.json").exists()


# --- bench --------------------------------------------------------------------------------------------------------


def test_bench_silences_what_the_profiler_writes_to_the_file_descriptors(capfd: pytest.CaptureFixture[str]) -> None:
    from gradstep.lab import bench

    print("before", flush=True)
    with bench._silenced_fds():
        os.write(1, b"profiler_start\n")  # what the profiler's C++ side does: below sys.stdout
        os.write(2, b"Memory block of unknown size\n")
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and err == ""


def test_bench_help_gives_every_option_its_meaning_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "bench", "--help")
    assert status == 0
    text = " ".join(out.split())
    for option, default in (("--scale", "1.0"), ("--steps", "15"), ("--warmup", "3"), ("--threads", "2")):
        assert f"{option} {option.strip('-').upper()} " in text and f"(default: {default}" in text, option
    assert "(default: cpu" in text or "(default: cuda" in text


# --- compare's header ---------------------------------------------------------------------------------------------


def test_a_2d_function_is_reported_in_steps_without_epochs_or_batches(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(capsys, "compare", "sgd", *FAST, "--no-report")
    assert status == 0, err
    header = out.splitlines()[0]
    assert header.endswith("; 2 steps on the whole function (no minibatches)")
    assert "epoch" not in header and "batch size" not in header


def test_run_length_counts_whole_epochs_and_the_steps_left_over() -> None:
    from gradstep.lab.report import run_length

    base = {"steps_per_epoch": 14, "batch_size": 32, "seed": 0}
    assert run_length({**base, "steps": 150}) == "150 steps (10 epochs of 14 steps and 10 steps), batch size 32, seed 0"
    assert run_length({**base, "steps": 14}).startswith("14 steps (1 epoch of 14 steps),")
    assert run_length({**base, "steps": 5}).startswith("5 steps (5 of the 14 steps of an epoch),")


def test_a_train_loss_above_the_test_loss_is_explained(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gradstep.lab.cli.compare import _train_above_test_note
    from gradstep.lab.tasks import CharLM
    from gradstep.lab.tasks.training import History

    history = History("adamw", "char-lm", steps_requested=10)
    history.curves = {"train_loss": [2.4], "test_loss": [2.0]}
    history.eval_steps = [10]
    note = _train_above_test_note(CharLM.__new__(CharLM), [history])
    assert note is not None and note.startswith("train loss above test loss for adamw: the test text")
    history.curves = {"train_loss": [1.9], "test_loss": [2.0]}
    assert _train_above_test_note(CharLM.__new__(CharLM), [history]) is None


# --- plots --------------------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions draw, kept instead of saved."""
    from gradstep.lab import plots

    drawn: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or str(path))
    return drawn


def test_every_legend_writes_an_optimizer_in_one_format() -> None:
    from gradstep.lab.plots import legend_label

    assert legend_label("sgd:lr=0.1,momentum=0.9") == "sgd (lr=0.1, momentum=0.9)"
    assert legend_label("adamw", 0.001) == "adamw (lr=0.001)"
    assert legend_label("sgd(lr=0.1, momentum=0.9)", 0.5) == "sgd (lr=0.1, momentum=0.9)"  # the spec's lr wins
    assert legend_label("adam:betas=(0.9,0.99)", 3e-3) == "adam (lr=0.003, betas=(0.9, 0.99))"
    assert legend_label("lamb") == "lamb"


def test_curves_have_axis_labels_and_show_every_accuracy(figures: list) -> None:
    from gradstep.lab import plots
    from gradstep.lab.tasks import DigitsMLP
    from gradstep.lab.tasks.training import History

    task = DigitsMLP.__new__(DigitsMLP)
    h = History("adamw", "digits-mlp", steps_requested=2, lr=1e-3)
    h.step_loss, h.eval_steps = [2.3, 1.0], [0, 1, 2]
    h.curves = {"train_loss": [2.3, 1.0, 0.5], "test_loss": [2.3, 1.1, 0.6], "test_accuracy": [0.1, 0.9, 0.97]}
    plots.plot_curves([h], task, "unused.png")
    (fig,) = figures
    axes = fig.axes
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    low, high = axes[-1].get_ylim()
    assert low <= 0.1 and high >= 0.97  # the first evaluation (0.1) is inside the panel
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["adamw (lr=0.001)"]


def test_trajectories_have_a_legend_for_their_markers(figures: list) -> None:
    from gradstep.lab import plots
    from gradstep.lab.tasks import Rosenbrock
    from gradstep.lab.tasks.training import History

    h = History("sgd:lr=0.001", "rosenbrock", steps_requested=1)
    h.trajectory, h.eval_steps, h.curves = [[-2.0, 2.0], [-1.9, 1.9]], [0, 1], {"loss": [409.0, 300.0]}
    plots.plot_trajectories([h], Rosenbrock(), "unused.png")
    (fig,) = figures
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["start", "path (a dot per step)", "end", "minimum"]
    assert fig.axes[0].get_xlabel() == "x" and fig.axes[0].get_ylabel() == "y"


def test_the_lr_sweep_says_where_a_curve_ends_because_it_diverged(figures: list) -> None:
    from gradstep.lab import plots
    from gradstep.lab.tasks import SweepResult

    sweep = SweepResult("lamb", [0.01, 0.1, 0.316, 1.0], [2.0, 1.0, 1.5, math.inf], best_lr=0.1, steps=8)
    plots.plot_lr_sweep([sweep], "unused.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert "lamb: diverged at lr=1" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "diverged at lr=1" in [t.get_text() for t in ax.texts]  # on the plot, beside the x
    assert "where the run diverged" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


# --- the exit statuses the docs give ------------------------------------------------------------------------------


def test_the_documented_exit_statuses_are_the_ones_returned(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradstep.lab import cli

    doc = " ".join((cli.__doc__ or "").split())
    assert "Exit statuses: 0 done; 2 bad input" in doc and "1 when something" in doc and "130 interrupted" in doc
    assert run_main(capsys, "--version")[0] == 0
    assert run_main(capsys, "info", "adamww")[0] == 2

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    status, out, err = run_main(capsys, "info", "adamw")
    assert status == 130 and err == "gradstep: interrupted\n"

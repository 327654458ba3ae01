"""The command line (gradstep.lab.cli): list, info, compare's table and JSON, bench, bad input; and the digits task.

Most commands run in-process through ``gradstep.lab.cli.main([...])``, which returns the exit status; a few run for real
as ``python -m gradstep`` and as the installed ``gradstep`` script, to cover the entry points and the process's own
exit status and streams. The pictures, the HTML report, lr-find and the other tasks are in test_cli_plots.py;
``inspect`` is in test_cli_inspect.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradstep
from cli_helpers import run_main, run_module, table_row
from gradstep.core.hypers import REQUIRED
from gradstep.core.registry import entries
from gradstep.lab import cli, tasks
from gradstep.lab.cli import common as cli_common

NAMES = gradstep.available()


@pytest.fixture(scope="module")
def digits() -> tasks.Split:
    return tasks.load_digits()


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Commands write their default --out directory (and inspect's outputs) into the working directory.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def one_thread():
    # What `gradstep compare` does: tiny matrices, and extra threads only contend with other test processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def as_json(value):
    """How a default appears in the JSON: tuples as lists, inf and nan (not JSON) as the strings 'inf', 'nan'."""
    if isinstance(value, tuple):
        return [as_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def rows_of(out: str) -> dict[str, list[str]]:
    """`gradstep list`: each optimizer's row and the indented lines under it."""
    rows: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if not line.strip() or line.startswith(f"{len(NAMES)} optimizers"):
            current = None
        elif not line.startswith(" "):
            current = line.split()[0]
            rows[current] = [line]
        elif current is not None:
            rows[current].append(line)
    return rows


# --- list and info ----------------------------------------------------------------------------------------------


def test_list_names_every_optimizer_with_its_capabilities_paper_and_originals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_main(capsys, "list")
    assert status == 0
    rows = rows_of(out)
    for entry in entries():
        assert entry.name in rows, entry.name
        caps = entry.capabilities
        row, *details = rows[entry.name]
        cells = row.split()
        assert cells[1:3] == [str(caps.state_bytes_per_param), "B"]
        assert cells[3] == ("yes" if caps.supports_complex else "no")
        assert entry.summary in row
        assert entry.paper.split(".")[0].split(";")[0] in row
        originals = next(line for line in details if line.strip().startswith("originals:"))
        for original in entry.originals:
            assert original in originals, (entry.name, original)


def test_list_shows_each_optimizers_lr_default_and_marks_required_lr(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "list")
    assert status == 0
    rows = rows_of(out)
    for entry in entries():
        hypers = rows[entry.name][-1]
        expected = "lr=required" if entry.preset.get("lr") is REQUIRED else f"lr={entry.hyperparameters()['lr']!r}"
        assert expected in hypers.split(), (entry.name, hypers)


def test_list_json_has_every_name_with_its_hyperparameters(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(capsys, "list", "--json")
    assert status == 0 and err == ""
    listed = {item["name"]: item for item in json.loads(out)}
    assert sorted(listed) == NAMES
    for entry in entries():
        item = listed[entry.name]
        defaults = entry.hyperparameters()
        assert set(item["hyperparameters"]) == set(defaults)
        for name, value in defaults.items():
            if entry.preset.get(name) is REQUIRED:
                assert item["hyperparameters"][name] is None and name in item["required"]
            elif isinstance(value, tuple) or value is None or isinstance(value, (bool, int, float, str)):
                assert item["hyperparameters"][name] == as_json(value), name
        assert item["paper"] == entry.paper
        assert item["originals"] == list(entry.originals)
        assert item["capabilities"]["state_bytes_per_param"] == entry.capabilities.state_bytes_per_param
        assert item["capabilities"]["sharding"] == entry.capabilities.sharding


def test_list_verbose_gives_every_hyperparameter_with_its_doc(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "list", "--verbose")
    assert status == 0
    adamw = out.split("\n\n")[NAMES.index("adamw")]
    assert adamw.startswith("adamw: ")
    declared = gradstep.AdamW([torch.nn.Parameter(torch.zeros(1))]).declared_hypers()
    lines = adamw.splitlines()
    for name, hyper in declared.items():
        line = next((ln for ln in lines if ln.split() and ln.split()[0] == name), None)
        assert line is not None, name
        assert hyper.doc in line


def test_info_adam_shows_betas_paper_originals_and_state_size(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "info", "adam")
    assert status == 0
    entry = gradstep.get("adam")
    assert entry.paper in out
    for original in entry.originals:
        assert original in out
    betas = next(line for line in out.splitlines() if line.split()[:1] == ["betas"])
    assert "(0.9, 0.999)" in betas and "decay rates" in betas
    # Adam keeps two float32 moments per parameter element.
    assert "state:      8 bytes per float32 parameter element (2 parameter-sized tensor(s))" in out


def test_info_json_matches_the_registry_entry(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "info", "fastai_adam", "--json")
    assert status == 0
    item = json.loads(out)
    assert item["name"] == "fastai_adam"
    assert item["required"] == ["lr"]
    assert item["hyperparameters"]["betas"] == [0.9, 0.99]
    assert item["docs"]["betas"]
    # The example is a spec the command line accepts.
    assert cli_common._Candidate(item["example"]).hypers == gradstep.get("fastai_adam").example


# --- compare ----------------------------------------------------------------------------------------------------


def test_compare_as_a_module_prints_one_row_per_optimizer_and_writes_the_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    specs = ["adamw", "sgd:lr=0.1"]
    proc = run_module("compare", *specs, "--epochs", "2", "--json", str(path), "--no-report", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "gradstep-compare").exists()
    report = json.loads(path.read_text())
    results = report["results"]
    assert [r["label"] for r in results] == specs
    assert [r["optimizer"] for r in results] == ["adamw", "sgd"]
    assert results[1]["hyperparameters"] == {"lr": 0.1}
    steps_per_epoch = math.ceil(len(tasks.load_digits().y_train) / 64)
    assert report["steps"] == 2 * steps_per_epoch and report["steps_per_epoch"] == steps_per_epoch
    for r in results:
        assert r["steps"] == 2 * steps_per_epoch
        assert len(r["step_loss"]) == r["steps"]
        assert r["diverged"] is None
        assert r["wall_time"] > 0
        # The initial model, then once per epoch.
        assert r["curves"]["step"] == [0, steps_per_epoch, 2 * steps_per_epoch]
        for name in ("train_loss", "test_loss", "test_accuracy"):
            curve = r["curves"][name]
            assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
        assert all(0.0 <= a <= 1.0 for a in r["curves"]["test_accuracy"])
        assert r["final_test_accuracy"] == r["curves"]["test_accuracy"][-1]
        assert r["best_test_accuracy"] == max(r["curves"]["test_accuracy"])
        assert r["best_test_loss"] == min(r["curves"]["test_loss"])
        # Steps to the target: the first evaluation with accuracy >= 0.95, or None.
        reached = [s for s, a in zip(r["curves"]["step"], r["curves"]["test_accuracy"]) if a >= 0.95]
        assert r["steps_to_target"] == (reached[0] if reached else None)
        # The printed row holds the same numbers as the file.
        row = table_row(proc.stdout, r["label"])
        assert row[1] == f"{r['lr']:.3g}"
        assert row[2:7] == [
            f"{r['final_train_loss']:.4f}",
            f"{r['final_test_loss']:.4f}",
            f"{r['best_test_loss']:.4f}",
            f"{r['final_test_accuracy']:.4f}",
            f"{r['best_test_accuracy']:.4f}",
        ]
        assert row[7] == ("-" if r["steps_to_target"] is None else str(r["steps_to_target"]))
    assert [r["lr"] for r in results] == [1e-3, 0.1]  # AdamW's default lr, and the one given
    # Two epochs of SGD at lr 0.1 and of AdamW learn something: better than chance (0.1) on ten classes.
    assert all(r["final_test_accuracy"] > 0.3 for r in results)


def test_compare_json_without_a_path_prints_only_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "sgd:lr=0.05", "--task", "digits", "--steps", "5", "--no-report", "--json"]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    report = json.loads(out)  # nothing but the JSON on stdout
    (result,) = report["results"]
    assert result["steps"] == 5 and len(result["step_loss"]) == 5
    assert report["task"] == "digits-mlp"  # "digits" is its old name
    assert report["command"] == "gradstep " + " ".join(args)


def test_compare_lr_number_applies_to_specs_without_an_lr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    args = ["compare", "adam", "fastai_sgd", "sgd:lr=0.2", "--lr", "0.03", "--steps", "3", "--no-report"]
    status, _, err = run_main(capsys, *args, "--json", str(path))
    assert status == 0, err
    # fastai_sgd has no default lr: --lr supplies it.
    assert [r["lr"] for r in json.loads(path.read_text())["results"]] == [0.03, 0.03, 0.2]


def test_compare_accepts_tuple_values_and_presets_with_lr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    specs = ["adam:lr=3e-3,betas=(0.9,0.99)", "fastai_sgd:lr=0.1,momentum=0.9"]
    status, out, err = run_main(capsys, "compare", *specs, "--epochs", "1", "--no-report", "--json", str(path))
    assert status == 0, err
    results = json.loads(path.read_text())["results"]
    assert results[0]["hyperparameters"] == {"lr": 3e-3, "betas": [0.9, 0.99]}
    assert results[1]["hyperparameters"] == {"lr": 0.1, "momentum": 0.9}
    assert sum(line.split()[:1] == [spec] for spec in specs for line in out.splitlines()) == 2


def test_compare_marks_a_diverging_optimizer_and_goes_on(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    args = ["compare", "sgd:lr=1e6", "adamw", "--epochs", "2", "--no-report", "--json", str(path)]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    # NaN and Infinity are not JSON: the file must hold none.
    report = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    results = report["results"]
    assert results[0]["diverged"] is not None
    assert results[0]["steps"] < report["steps"]
    assert results[1]["diverged"] is None
    assert "sgd:lr=1e6 diverged" in out
    assert table_row(out, "sgd:lr=1e6")[2] == "diverged"


def test_compare_target_option_sets_the_threshold(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    args = ["compare", "adamw:lr=0.01", "--steps", "20", "--eval-every", "2", "--target", "0.5", "--no-report"]
    status, out, err = run_main(capsys, *args, "--json", str(path))
    assert status == 0, err
    (r,) = json.loads(path.read_text())["results"]
    assert r["target"] == {"metric": "test_accuracy", "value": 0.5}
    assert r["curves"]["step"] == list(range(0, 21, 2))
    first = next(s for s, a in zip(r["curves"]["step"], r["curves"]["test_accuracy"]) if a >= 0.5)
    assert r["steps_to_target"] == first
    assert "steps to test acc >= 0.5" in out


# --- bench ------------------------------------------------------------------------------------------------------


def test_bench_runs_gradstep_bench_with_the_rest_of_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bench.json"
    before = torch.get_num_threads()
    args = ["--only", "sgd", "adam", "--scale", "0.0005", "--steps", "1", "--warmup", "0", "--eager-only"]
    status, out, err = run_main(capsys, "bench", *args, "--no-peers", "--json", str(path))
    assert status == 0, err
    rows = json.loads(path.read_text())["rows"]
    assert [(r["optimizer"], r["implementation"]) for r in rows] == [
        ("sgd", "gradstep eager"),
        ("adam", "gradstep eager"),
    ]
    assert all(r["ms"] > 0 for r in rows)
    assert "| adam | gradstep eager |" in out
    # bench sets its own thread count; the command puts the caller's back.
    assert torch.get_num_threads() == before


def test_bench_help_is_bench_own(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "bench", "--help")
    assert status == 0
    assert out.startswith("usage: gradstep bench") and "--scale" in out


# --- bad input --------------------------------------------------------------------------------------------------


BAD = [
    (["compare", "nosuchopt"], "nosuchopt"),
    (["compare", "adam:lr="], "adam:lr="),
    (["compare", "adam:lr"], "adam:lr"),
    (["compare", "adam:lr=-1"], "lr"),
    (["compare", "adam:foo=1"], "foo"),
    (["compare", "adam:eps_mode=tf"], "quotes"),
    (["compare", "adamw", "--json", "/nonexistent/dir/x.json"], "/nonexistent/dir"),
    (["compare", "adamw", "--task", "mnist"], "mnist"),
    (["compare", "adamw", "--lr", "fast"], "--lr"),
    (["compare", "adamw", "--lr", "-1"], "--lr"),
    (["compare", "fastai_adam"], "lr"),
    (["compare", "adamw", "--epochs", "0"], "--epochs"),
    (["compare", "adamw", "--epochs", "ten"], "--epochs"),
    (["compare", "adamw", "--epochs", "1", "--steps", "2"], "--steps"),
    (["lr-find", "nosuchopt"], "nosuchopt"),
    (["lr-find", "adam", "--task", "nope"], "nope"),
    (["lr-find", "adam", "--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
    (["lr-find", "adam", "--json", "/nonexistent/dir/x.json"], "/nonexistent/dir"),
    (["bench", "--only", "nosuchopt"], "nosuchopt"),
    (["bench", "--frobnicate"], "--frobnicate"),
    (["bench", "--scale", "big"], "--scale"),
    (["bench", "--json", "/nonexistent/dir/b.json"], "/nonexistent/dir"),
    (["inspect", "/nonexistent/opt.pt"], "/nonexistent/opt.pt"),
    (["inspect", "x.pt", "--convert-to", "adam"], "--output"),
    (["inspect", "x.pt", "--convert-to", "lion", "--output", "y.pt"], "lion"),
    (["info", "nosuchopt"], "nosuchopt"),
    (["frobnicate"], "frobnicate"),
    ([], "required"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=[" ".join(a) or "no-command" for a, _ in BAD])
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(
    capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    status, out, err = run_main(capsys, *args)
    assert status == 2
    # Nothing was trained or printed: the check comes before the work (the output paths included).
    assert out == ""
    assert err.startswith("gradstep: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert named in err
    assert not Path("gradstep-out").exists()  # no empty report directory left behind


@pytest.mark.parametrize("command", ["compare", "lr-find"])
def test_an_out_dir_that_cannot_be_created_is_refused_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    # A directory under a regular file cannot exist (root or not: permissions play no part).
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    status, out, err = run_main(capsys, command, "sgd", "--out", str(blocker / "report"))
    assert status == 2 and out == ""
    assert err.startswith("gradstep: error: --out ") and err.count("\n") == 1
    status, _, err = run_main(capsys, command, "sgd", "--out", str(blocker))
    assert status == 2 and "not a directory" in err


def test_bad_input_to_the_installed_script_is_one_line_without_traceback() -> None:
    script = Path(sys.executable).with_name("gradstep")
    args = [str(script), "compare", "adamw", "adam:lr=-1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("gradstep: error: adam:lr=-1: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_a_failure_while_training_is_one_line_with_status_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the optimizer broke\nsecond line")

    monkeypatch.setattr(tasks, "train", broken)
    status, out, err = run_main(capsys, "compare", "sgd", "--steps", "2", "--no-report")
    assert status == 1 and out == ""
    assert err == "gradstep: error: RuntimeError: the optimizer broke (GRADSTEP_TRACEBACK=1 shows where)\n"
    monkeypatch.setenv("GRADSTEP_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="the optimizer broke"):
        cli.main(["compare", "sgd", "--steps", "2", "--no-report"])


def test_help_exits_0_and_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    for command in ("list", "info", "compare", "lr-find", "bench", "inspect"):
        assert command in out


def test_compare_leaves_the_callers_torch_thread_count_alone(capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    assert run_main(capsys, "compare", "sgd", "--steps", "2", "--threads", "1", "--no-report")[0] == 0
    assert torch.get_num_threads() == 2


# --- the digits task and train() --------------------------------------------------------------------------------


def test_two_optimizers_start_from_identical_initial_weights(digits: tasks.Split) -> None:
    task = tasks.DigitsMLP(seed=3, data=digits)
    seen: dict[str, list[torch.Tensor]] = {}
    final: dict[str, list[torch.Tensor]] = {}

    def factory(name: str):
        def make(params):
            params = list(params)
            seen[name] = [p.detach().clone() for p in params]
            final[name] = params
            return gradstep.create(name, params, lr=0.05)

        return make

    tasks.train(task, factory("adam"), epochs=1)
    tasks.train(task, factory("sgd"), epochs=1)
    assert len(seen["adam"]) == len(seen["sgd"]) == 4
    for a, b in zip(seen["adam"], seen["sgd"]):
        assert torch.equal(a, b)
    # Both trained (the weights moved), and differently: the runs really were two optimizers on one start.
    assert not torch.equal(final["adam"][0], seen["adam"][0])
    assert not torch.equal(final["adam"][0], final["sgd"][0])


def test_initial_weights_depend_on_the_seed_and_leave_the_global_rng_alone(digits: tasks.Split) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    w0 = tasks.DigitsMLP(seed=0, data=digits).init_model()[0].weight
    assert torch.equal(torch.rand(3), expected)
    w0_again = tasks.DigitsMLP(seed=0, data=digits).init_model()[0].weight
    w1 = tasks.DigitsMLP(seed=1, data=digits).init_model()[0].weight
    assert torch.equal(w0, w0_again)
    assert not torch.equal(w0, w1)


def test_minibatches_cover_the_training_set_once_per_epoch_in_a_fixed_order(digits: tasks.Split) -> None:
    task = tasks.DigitsMLP(seed=0, batch_size=100, data=digits)
    first = [y for _, y in task.batches(0)]
    again = [y for _, y in task.batches(0)]
    other = [y for _, y in task.batches(1)]
    assert [len(y) for y in first] == [100] * 13 + [len(digits.y_train) - 1300]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # Every training image exactly once per epoch (as a multiset: the digits hold a few duplicate images).
    xs = torch.cat([x for x, _ in task.batches(0)])
    assert sorted(map(tuple, xs.tolist())) == sorted(map(tuple, digits.x_train.tolist()))
    assert torch.equal(torch.cat(first).bincount(), digits.y_train.bincount())


def test_digits_split_is_stratified_and_standardised_on_the_training_set(digits: tasks.Split) -> None:
    n = len(digits.y_train) + len(digits.y_test)
    assert n == 1797 and digits.x_train.shape[1] == 64
    assert abs(len(digits.y_test) / n - 0.25) < 0.01
    train_share = digits.y_train.bincount().double() / len(digits.y_train)
    test_share = digits.y_test.bincount().double() / len(digits.y_test)
    assert (train_share - test_share).abs().max() < 0.01
    assert digits.x_train.mean(0).abs().max() < 1e-5
    # Features that vary in training have unit deviation there (constant pixels stay 0); the test set is scaled
    # with the training statistics, so its mean is near, not exactly, 0.
    std = digits.x_train.std(0, unbiased=False)
    assert torch.allclose(std[std > 0], torch.ones(int((std > 0).sum())), atol=1e-4)
    assert digits.x_test.mean(0).abs().max() > 1e-5


def test_training_is_deterministic_and_evaluates_the_start_and_every_epoch(digits: tasks.Split) -> None:
    task = tasks.DigitsMLP(seed=0, data=digits)
    runs = [tasks.train(task, lambda ps: gradstep.create("adamw", ps), epochs=2, label="adamw") for _ in range(2)]
    assert runs[0].curves == runs[1].curves and runs[0].step_loss == runs[1].step_loss
    assert {k: len(v) for k, v in runs[0].curves.items()} == {"train_loss": 3, "test_loss": 3, "test_accuracy": 3}
    per_epoch = task.steps_per_epoch()
    assert runs[0].eval_steps == [0, per_epoch, 2 * per_epoch]
    assert runs[0].curves["train_loss"][2] < runs[0].curves["train_loss"][1] < runs[0].curves["train_loss"][0]
    # The first minibatch loss is the initial model's loss on that batch.
    model = task.init_model()
    assert runs[0].step_loss[0] == pytest.approx(task.loss(model, next(task.batches(0))).item(), rel=1e-6)


def test_training_stops_at_a_non_finite_gradient_and_the_history_stays_valid_json(digits: tasks.Split) -> None:
    # gradstep's default policy raises NonFiniteError on a NaN gradient; train() records it instead.
    task = tasks.DigitsMLP(seed=0, data=digits)
    history = tasks.train(task, lambda ps: gradstep.create("sgd", ps, lr=1e6), epochs=3, label="sgd")
    assert history.diverged is not None
    assert history.steps < 3 * task.steps_per_epoch()
    assert len(history.step_loss) == history.steps
    json.dumps(history.to_dict(), allow_nan=False)


def test_history_best_is_the_lowest_loss_and_the_highest_accuracy() -> None:
    curves = {"test_loss": [0.5, 0.2, 0.3], "test_accuracy": [0.1, 0.9, 0.8]}
    h = tasks.History("x", "digits-mlp", 3, curves=curves, higher_is_better=("test_accuracy",))
    assert h.best("test_loss") == 0.2 and h.best("test_accuracy") == 0.9
    assert h.final("test_loss") == 0.3 and h.final("train_loss") is None


def test_train_rejects_zero_steps_and_zero_epochs(digits: tasks.Split) -> None:
    task = tasks.DigitsMLP(data=digits)
    with pytest.raises(ValueError, match="epochs"):
        tasks.train(task, lambda ps: gradstep.create("sgd", ps), epochs=0)
    with pytest.raises(ValueError, match="steps"):
        tasks.train(task, lambda ps: gradstep.create("sgd", ps), steps=0)


def test_progress_bars_go_to_stderr_and_close(capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli_common._Progress(True)  # what compare uses when stderr is a terminal
    with progress.bar(3, "adamw") as on_step:
        assert on_step is not None
        for loss in (2.0, 1.5, 1.25):
            on_step(loss)
    out, err = capsys.readouterr()
    assert out == ""
    # tqdm redraws at most every 0.1 s, so which count shows depends on timing; the bar and its total do not.
    assert "adamw:" in err and "/3 [" in err
    assert err.endswith("\r")  # leave=False: the bar erases itself when it closes
    with cli_common._Progress(False).bar(3, "off") as on_step:
        assert on_step is None

"""The command line (gradstep.cli) and the comparison task it trains (gradstep.tasks).

Most commands run in-process through ``gradstep.cli.main([...])``, which returns the exit status; a few run for real
as ``python -m gradstep`` and as the installed ``gradstep`` script, to cover the entry points and the process's own
exit status and streams.
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
from gradstep import cli, tasks
from gradstep.core.hypers import REQUIRED
from gradstep.core.registry import entries

NAMES = gradstep.available()


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradstep", *args], capture_output=True, text=True, timeout=120, check=False
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def digits() -> tasks.Split:
    return tasks.load_digits()


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


# --- list and info ----------------------------------------------------------------------------------------------


def test_list_names_every_registered_optimizer_with_its_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "list")
    assert status == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for entry in entries():
        assert entry.name in rows, entry.name
        caps = entry.capabilities
        row = rows[entry.name].split()
        assert row[1:3] == [str(caps.state_bytes_per_param), "B"]
        assert row[3] == ("yes" if caps.supports_complex else "no")
        assert entry.summary in rows[entry.name]


def test_list_shows_each_optimizers_lr_default_and_marks_required_lr(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "list")
    assert status == 0
    lines = out.splitlines()
    for entry in entries():
        row = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == entry.name)
        hypers = lines[row + 1]
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


def test_info_adam_from_the_installed_script_shows_betas_and_its_paper() -> None:
    script = Path(sys.executable).with_name("gradstep")
    proc = subprocess.run([str(script), "info", "adam"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    entry = gradstep.get("adam")
    assert entry.paper in proc.stdout
    for original in entry.originals:
        assert original in proc.stdout
    betas = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["betas"])
    assert "(0.9, 0.999)" in betas and "decay rates" in betas


def test_info_json_matches_the_registry_entry(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "info", "fastai_adam", "--json")
    assert status == 0
    item = json.loads(out)
    assert item["name"] == "fastai_adam"
    assert item["required"] == ["lr"]
    assert item["hyperparameters"]["betas"] == [0.9, 0.99]
    assert item["docs"]["betas"]
    # The example is a spec the command line accepts.
    assert cli._Candidate(item["example"]).hypers == gradstep.get("fastai_adam").example


# --- compare ----------------------------------------------------------------------------------------------------


def test_compare_as_a_module_prints_one_row_per_optimizer_and_writes_the_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    specs = ["adamw", "sgd:lr=0.1"]
    proc = run_module("compare", *specs, "--epochs", "2", "--json", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(path.read_text())
    results = report["results"]
    assert [r["label"] for r in results] == specs
    assert [r["optimizer"] for r in results] == ["adamw", "sgd"]
    assert results[1]["hyperparameters"] == {"lr": 0.1}
    steps_per_epoch = math.ceil(len(tasks.load_digits().y_train) / 64)
    for r in results:
        assert r["steps"] == 2 * steps_per_epoch
        assert r["diverged"] is None
        assert r["wall_time"] > 0
        for name in ("train_loss", "test_loss", "test_accuracy"):
            curve = r["curves"][name]
            assert len(curve) == 2 and all(math.isfinite(v) for v in curve)
        assert all(0.0 <= a <= 1.0 for a in r["curves"]["test_accuracy"])
        assert r["final_test_accuracy"] == r["curves"]["test_accuracy"][-1]
        assert r["best_test_accuracy"] == max(r["curves"]["test_accuracy"])
        assert r["best_test_loss"] == min(r["curves"]["test_loss"])
        # The printed row holds the same numbers as the file.
        row = next(line for line in proc.stdout.splitlines() if line.split()[:1] == [r["label"]]).split()
        assert row[1:5] == [
            f"{r['final_train_loss']:.4f}",
            f"{r['best_test_loss']:.4f}",
            f"{r['final_test_accuracy']:.4f}",
            f"{r['best_test_accuracy']:.4f}",
        ]
    # Two epochs of SGD at lr 0.1 and of AdamW learn something: better than chance (0.1) on ten classes.
    assert all(r["final_test_accuracy"] > 0.3 for r in results)


def test_compare_accepts_tuple_values_and_presets_with_lr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    specs = ["adam:lr=3e-3,betas=(0.9,0.99)", "fastai_sgd:lr=0.1,momentum=0.9"]
    status, out, err = run_main(capsys, "compare", *specs, "--epochs", "1", "--json", str(path))
    assert status == 0, err
    results = json.loads(path.read_text())["results"]
    assert results[0]["hyperparameters"] == {"lr": 3e-3, "betas": [0.9, 0.99]}
    assert results[1]["hyperparameters"] == {"lr": 0.1, "momentum": 0.9}
    assert sum(line.split()[:1] == [spec] for spec in specs for line in out.splitlines()) == 2


def test_compare_marks_a_diverging_optimizer_and_goes_on(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    status, out, err = run_main(capsys, "compare", "sgd:lr=1e6", "adamw", "--epochs", "2", "--json", str(path))
    assert status == 0, err
    # NaN and Infinity are not JSON: the file must hold none.
    report = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    results = report["results"]
    assert results[0]["diverged"] is not None
    assert len(results[0]["curves"].get("train_loss", [])) < 2
    assert results[1]["diverged"] is None
    assert "sgd:lr=1e6 diverged" in out


BAD = [
    (["compare", "nosuchopt"], "nosuchopt"),
    (["compare", "adam:lr="], "adam:lr="),
    (["compare", "adam:lr=-1"], "lr"),
    (["compare", "adam:foo=1"], "foo"),
    (["compare", "adam:eps_mode=tf"], "quotes"),
    (["compare", "adamw", "--json", "/nonexistent/dir/x.json"], "/nonexistent/dir"),
    (["compare", "fastai_adam"], "lr"),
    (["compare", "adamw", "--epochs", "0"], "--epochs"),
    (["compare", "adamw", "--epochs", "ten"], "--epochs"),
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
    # Nothing was trained or printed: the check comes before the work (the json path included).
    assert out == ""
    assert err.startswith("gradstep: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert named in err


def test_bad_input_as_a_real_process_has_no_traceback() -> None:
    proc = run_module("compare", "adamw", "adam:lr=-1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("gradstep: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_help_exits_0_and_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    for command in ("list", "info", "compare"):
        assert command in out


def test_compare_leaves_the_callers_torch_thread_count_alone(capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    assert run_main(capsys, "compare", "sgd", "--epochs", "1", "--threads", "1")[0] == 0
    assert torch.get_num_threads() == 2


# --- the task ---------------------------------------------------------------------------------------------------


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


def test_training_is_deterministic_and_records_one_value_per_epoch(digits: tasks.Split) -> None:
    task = tasks.DigitsMLP(seed=0, data=digits)
    runs = [tasks.train(task, lambda ps: gradstep.create("adamw", ps), epochs=2, label="adamw") for _ in range(2)]
    assert runs[0].curves == runs[1].curves
    assert {k: len(v) for k, v in runs[0].curves.items()} == {"train_loss": 2, "test_loss": 2, "test_accuracy": 2}
    assert runs[0].curves["train_loss"][1] < runs[0].curves["train_loss"][0]


def test_training_stops_at_a_non_finite_gradient_and_the_history_stays_valid_json(digits: tasks.Split) -> None:
    # gradstep's default policy raises NonFiniteError on a NaN gradient; train() records it instead.
    task = tasks.DigitsMLP(seed=0, data=digits)
    history = tasks.train(task, lambda ps: gradstep.create("sgd", ps, lr=1e6), epochs=3, label="sgd")
    assert history.diverged is not None
    assert len(history.curves.get("train_loss", [])) < 3
    json.dumps(history.to_dict(), allow_nan=False)


def test_history_best_is_the_lowest_loss_and_the_highest_accuracy() -> None:
    h = tasks.History("x", "digits", 3, {"test_loss": [0.5, 0.2, 0.3], "test_accuracy": [0.1, 0.9, 0.8]})
    assert h.best("test_loss") == 0.2 and h.best("test_accuracy") == 0.9
    assert h.final("test_loss") == 0.3 and h.final("train_loss") is None


def test_train_rejects_zero_epochs(digits: tasks.Split) -> None:
    with pytest.raises(ValueError, match="epochs"):
        tasks.train(tasks.DigitsMLP(data=digits), lambda ps: gradstep.create("sgd", ps), epochs=0)

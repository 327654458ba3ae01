"""``gradstep inspect``: summarising optimizer checkpoints, and converting torch.optim's Adam/AdamW/SGD state_dicts.

The conversion is judged by what it is for: a run trained for a while with torch.optim, saved, converted by the
command line and resumed with gradstep must follow the trajectory torch.optim would have followed (float64, tight
tolerance). A control run resumed without the converted state must not, so the comparison can fail.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import gradstep
from cli_helpers import run_main
from gradstep.tools.checkpoint import ConversionError, convert, summarize

K, M = 4, 5  # steps before the checkpoint, steps after it


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Commands write their default --out directory (and inspect's outputs) into the working directory.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def make_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(
        16, 1, generator=gen, dtype=torch.float64
    )


def groups(model: torch.nn.Module, **first: float) -> list[dict]:
    """Two groups: the first layer (with ``first``'s overrides) and the last."""
    return [{"params": list(model[0].parameters()), **first}, {"params": list(model[2].parameters())}]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


TORCH_RUNS = {
    "adam, coupled decay, amsgrad": (
        lambda gs: torch.optim.Adam(gs, lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True),
        "adam",
        gradstep.Adam,
    ),
    "adamw": (lambda gs: torch.optim.AdamW(gs, lr=2e-2, weight_decay=0.2), "adamw", gradstep.AdamW),
    "adam to gradstep adamw keeps coupled decay": (
        lambda gs: torch.optim.Adam(gs, lr=2e-2, weight_decay=0.1),
        "adamw",
        gradstep.AdamW,
    ),
    "sgd, momentum and dampening": (
        lambda gs: torch.optim.SGD(gs, lr=5e-2, momentum=0.9, dampening=0.3, weight_decay=0.01),
        "sgd",
        gradstep.SGD,
    ),
    "sgd, nesterov": (lambda gs: torch.optim.SGD(gs, lr=5e-2, momentum=0.8, nesterov=True), "sgd", gradstep.SGD),
    "sgd, no momentum": (lambda gs: torch.optim.SGD(gs, lr=5e-2), "sgd", gradstep.SGD),
}


@pytest.mark.parametrize("case", list(TORCH_RUNS))
def test_a_torch_run_converted_by_the_cli_resumes_in_gradstep_exactly_as_torch_goes_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    make_torch, target, gradstep_cls = TORCH_RUNS[case]
    model = make_model()
    opt = make_torch(groups(model, lr=1e-2))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # leaves initial_lr in the groups
    train(model, opt, range(K))
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "converted.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": K}, ckpt)

    status, stdout, err = run_main(capsys, "inspect", str(ckpt), "--convert-to", target, "--output", str(out))
    assert status == 0, err
    assert f"wrote {out}" in stdout
    converted = torch.load(out, weights_only=True)
    assert converted["epoch"] == K and converted["model"].keys() == model.state_dict().keys()

    # torch.optim goes on ...
    train(model, opt, range(K, K + M))
    expected = params_of(model)
    # ... and gradstep, from the checkpoint, with its defaults until the converted state_dict is loaded.
    resumed = make_model()
    resumed.load_state_dict(converted["model"])
    new = gradstep_cls(groups(resumed))
    new.load_state_dict(converted["optimizer"])
    assert new.param_groups[0]["initial_lr"] == scheduler.base_lrs[0]
    train(resumed, new, range(K, K + M))
    for got, want in zip(params_of(resumed), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    # Control: without the saved state (moments, step counts, hyperparameters) the trajectory is another one.
    control = make_model()
    control.load_state_dict(converted["model"])
    train(control, gradstep_cls(groups(control), lr=1e-3), range(K, K + M))
    assert max((a - b).abs().max().item() for a, b in zip(params_of(control), expected)) > 1e-6


def test_an_unconverted_torch_state_dict_loads_like_the_converted_one() -> None:
    # gradstep's load_state_dict fills the hyperparameters torch's groups lack with its defaults, as torch does.
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, range(1))
    direct, converted = gradstep.Adam(model.parameters()), gradstep.Adam(model.parameters())
    direct.load_state_dict(opt.state_dict())
    converted.load_state_dict(convert(opt.state_dict(), "adam"))
    for p in model.parameters():
        for key, value in converted.state[p].items():
            assert torch.equal(direct.state[p][key], value), key


def test_convert_takes_the_weight_decay_mode_from_torch_or_else_from_the_target() -> None:
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), weight_decay=0.1)
    adamw = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    train(model, adam, range(1))
    train(model, adamw, range(1))
    mode = lambda sd: {g["weight_decay_mode"] for g in sd["param_groups"]}  # noqa: E731
    assert mode(convert(adam.state_dict(), "adamw")) == {"coupled"}
    assert mode(convert(adamw.state_dict(), "adam")) == {"decoupled"}
    # torch before 2.6 saved no decoupled_weight_decay: then the target says which it was.
    old = adamw.state_dict()
    for g in old["param_groups"]:
        del g["decoupled_weight_decay"]
    assert mode(convert(old, "adamw")) == {"decoupled"} and mode(convert(old, "adam")) == {"coupled"}
    converted = convert(adamw.state_dict(), "adamw")
    for g in converted["param_groups"]:
        # torch's flags that gradstep has no counterpart of are dropped; fused= is gradstep's own option too (its
        # default, None: torch's kernel wherever the group allows it).
        assert not {"capturable", "differentiable", "decoupled_weight_decay"} & set(g)
        assert g["fused"] is None
    assert converted["gradstep"] == {"optimizer": "AdamW", "global_step": 1}


def test_convert_drops_the_none_momentum_buffers_of_torch_sgd() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, range(2))
    sd = opt.state_dict()
    # What torch saves, in some versions, for SGD without momentum.
    sd["state"] = {i: {"momentum_buffer": None} for i in range(4)}
    converted = convert(sd, "sgd")
    assert converted["state"] == {}
    new = gradstep.SGD(model.parameters())
    new.load_state_dict(converted)
    assert new.param_groups[0]["lr"] == 0.1 and new.param_groups[0]["momentum"] == 0


def test_convert_refuses_another_optimizers_state_dict() -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nadam = torch.optim.NAdam(model.parameters())
    mine = gradstep.Adam(model.parameters())
    for opt in (sgd, nadam, mine):
        train(model, opt, range(1))
    with pytest.raises(ConversionError, match="torch.optim.SGD"):
        convert(sgd.state_dict(), "adam")
    with pytest.raises(ConversionError, match="not a torch.optim.Adam/AdamW"):
        convert(nadam.state_dict(), "adam")
    with pytest.raises(ConversionError, match="already a gradstep state_dict"):
        convert(mine.state_dict(), "adam")


# --- the summary ------------------------------------------------------------------------------------------------


def test_inspect_summarises_a_gradstep_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = make_model()
    opt = gradstep.AdamW(groups(model, weight_decay=0.0), lr=3e-3, amsgrad=True)
    train(model, opt, range(3))
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)

    status, out, err = run_main(capsys, "inspect", str(path), "--json")
    assert status == 0, err
    info = json.loads(out)
    assert info["optimizer"] == "gradstep.AdamW" and info["global_step"] == 3 and info["key"] == ""
    assert [g["params"] for g in info["groups"]] == [2, 2]
    assert info["groups"][0]["hyperparameters"]["weight_decay"] == 0.0
    assert info["groups"][1]["hyperparameters"]["weight_decay"] == 0.01
    assert info["groups"][1]["hyperparameters"]["betas"] == [0.9, 0.999]
    assert info["parameters"] == info["parameters_with_state"] == 4
    # Every number recomputed from the tensors themselves.
    state = opt.state_dict()["state"]
    n_elements = sum(p.numel() for p in model.parameters())
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        s = info["state"][name]
        assert s["tensors"] == 4 and s["elements"] == n_elements
        assert s["bytes"] == sum(st[name].numel() * st[name].element_size() for st in state.values())
        assert s["dtypes"] == ["float64"]
    assert info["state"]["step"]["min"] == info["state"]["step"]["max"] == 3
    total = sum(v.numel() * v.element_size() for st in state.values() for v in st.values())
    assert info["state_bytes"] == total
    assert info["bytes_per_param_element"] == pytest.approx(total / n_elements)

    status, out, _ = run_main(capsys, "inspect", str(path))
    assert status == 0
    assert "optimizer:  gradstep.AdamW, global step 3" in out
    assert "group 1 (2 params): weight_decay=0.01 (the rest as group 0)" in out
    assert f"{total / n_elements:.2f} bytes per parameter element" in out


def test_inspect_shows_a_partitions_routing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 6), torch.nn.Linear(6, 7))
    opt = gradstep.from_config("muon_adamw", model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    path = tmp_path / "partition.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    status, out, err = run_main(capsys, "inspect", str(path))
    assert status == 0, err
    assert "gradstep.partition (matrix: gradstep.Muon, elementwise: gradstep.AdamW)" in out
    routing = out[out.index("routing:") :].splitlines()[1:6]
    assert routing[0].split() == ["parameter", "shape", "part", "group", "why"]
    assert routing[1].split() == ["1.weight", "6x4", "matrix", "0", "hidden", "2-D", "weight"]
    assert routing[2].split() == ["0.weight", "7x4", "elementwise", "0", "embedding"]
    assert routing[4].split() == ["2.weight", "7x6", "elementwise", "0", "output", "head"]


def test_inspect_finds_the_state_dict_inside_a_checkpoint_or_asks_for_a_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = make_model()
    first, second = torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    train(model, first, range(2))
    train(model, second, range(1))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": model.state_dict(), "optimizer_states": [first.state_dict(), second.state_dict()]}, path)

    status, out, err = run_main(capsys, "inspect", str(path))
    assert status == 2 and out == ""
    assert "2 optimizer state_dicts (at 'optimizer_states.0', 'optimizer_states.1'); choose with --key" in err

    out_path = tmp_path / "converted.ckpt"
    args = ["inspect", str(path), "--key", "optimizer_states.1", "--convert-to", "sgd", "--output", str(out_path)]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    assert "optimizer:  torch.optim.SGD" in out
    assert "load_state_dict(torch.load(" in out and "['optimizer_states'][1])" in out
    converted = torch.load(out_path, weights_only=True)
    assert converted["optimizer_states"][1]["gradstep"]["optimizer"] == "SGD"
    assert "gradstep" not in converted["optimizer_states"][0]  # the other one is left as it was
    assert torch.equal(converted["state_dict"]["0.weight"], model.state_dict()["0.weight"])


def test_inspect_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def error(*args: str, status: int) -> str:
        got, out, err = run_main(capsys, "inspect", *args)
        assert got == status and err.startswith("gradstep: error: inspect: ") and err.count("\n") == 1, err
        return err

    # A checkpoint that cannot be read is bad input: status 2, as documented (1 is for failures while running).
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert "is not a torch checkpoint" in error(str(text), status=2)
    damaged = tmp_path / "damaged.pt"
    torch.save({"state": {}, "param_groups": []}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:200])  # a zip archive cut short
    assert "damaged.pt" in error(str(damaged), status=2)

    pickled = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    assert "holds argparse.Namespace objects" in error(str(pickled), status=2)
    assert "--allow-pickle" in error(str(pickled), status=2)
    assert "holds no optimizer state_dict" in error(str(pickled), "--allow-pickle", status=2)

    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, range(1))
    path = tmp_path / "sgd.pt"
    torch.save(sgd.state_dict(), path)
    assert "looks like a torch.optim.SGD" in error(str(path), "--convert-to", "adam", "--output", "x.pt", status=2)
    assert "must not be the checkpoint" in error(str(path), "--convert-to", "sgd", "--output", str(path), status=2)
    assert "no optimizer state_dict at key 'opt'" in error(str(path), "--key", "opt", status=2)
    assert not Path("x.pt").exists()


def test_summarize_counts_parameters_without_state() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    model[2].weight.grad = torch.ones_like(model[2].weight)  # only one parameter has a gradient
    opt.step()
    info = summarize(opt.state_dict())
    assert info["parameters"] == 4 and info["parameters_with_state"] == 1
    assert info["optimizer"] == "torch.optim.Adam" and info["global_step"] is None
    assert info["bytes_per_param_element"] == pytest.approx((2 * 4 * 8 + 4) / 4)

"""gradstep.partition: routing by role, one optimizer over several, its checkpoints, schedulers and report."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gradstep
from gradstep.routing import MuonAdamW, Partition, classify, model_scope, presets

PARTS = {"matrix": "muon(lr=0.02, ns_dtype='float32')", "elementwise": "adamw(lr=3e-3)"}


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.norm = torch.nn.LayerNorm(8)
        self.gate = torch.nn.Parameter(torch.tensor(0.5))
        self.lm_head = torch.nn.Linear(8, 11, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.gate * self.block(self.embed(x))))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        x = torch.arange(t, t + 6) % 11
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), (x + 1) % 11).backward()
        opt.step()


def test_classifier_roles_and_reasons() -> None:
    roles = classify(TinyLM())
    assert roles == {
        "embed.weight": ("elementwise", "embedding"),
        "block.0.weight": ("matrix", "hidden 2-D weight"),
        "block.0.bias": ("elementwise", "bias"),
        "block.2.weight": ("matrix", "hidden 2-D weight"),
        "block.2.bias": ("elementwise", "bias"),
        "norm.weight": ("elementwise", "norm (LayerNorm)"),
        "norm.bias": ("elementwise", "norm (LayerNorm)"),
        "gate": ("elementwise", "scalar"),
        "lm_head.weight": ("elementwise", "output head"),
    }
    assert classify(TinyLM(tied=True))["embed.weight"] == ("elementwise", "embedding tied to the output head")


def test_partition_steps_like_its_parts_stepped_separately() -> None:
    model, reference = TinyLM(), TinyLM()
    opt = gradstep.partition(model, PARTS)
    matrices = [reference.block[0].weight, reference.block[2].weight]
    others = [p for p in reference.parameters() if all(p is not m for m in matrices)]
    muon = gradstep.from_config(PARTS["matrix"], matrices)
    adamw = gradstep.from_config(PARTS["elementwise"], others)

    class Both(torch.optim.Optimizer):  # the hand-written way: two optimizers side by side
        def __init__(self) -> None:
            self.param_groups = muon.param_groups + adamw.param_groups

        def zero_grad(self, set_to_none: bool = True) -> None:
            muon.zero_grad()
            adamw.zero_grad()

        def step(self, closure: object = None) -> None:  # type: ignore[override]
            muon.step()
            adamw.step()

    _train(model, opt, 5)
    _train(reference, Both(), 5)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(model.block[0].weight, TinyLM().block[0].weight)


def test_schedulers_see_every_group_and_the_state_dict_round_trips() -> None:
    model = TinyLM()
    opt = gradstep.partition(model, PARTS)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2)
    sched.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.02 / 4, 3e-3 / 4]
    assert [g["lr"] for g in opt.parts["matrix"].param_groups] == [0.02 / 4]

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert len(saved["state"]) == len(list(model.parameters()))

    resumed_model = TinyLM()
    resumed_model.load_state_dict(model.state_dict())
    resumed = gradstep.partition(resumed_model, PARTS)
    resumed.load_state_dict(saved)
    assert [g["lr"] for g in resumed.param_groups] == [0.02 / 4, 3e-3 / 4]
    _train(model, opt, 3, start=2)
    _train(resumed_model, resumed, 3, start=2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_a_state_dict_of_other_parts_is_refused() -> None:
    opt = gradstep.partition(TinyLM(), PARTS)
    other = gradstep.partition(TinyLM(), {"elementwise": "adamw", "matrix": "muon"})
    with pytest.raises(ValueError, match="parts"):
        opt.load_state_dict(other.state_dict())


def test_overrides_by_glob_and_module_type() -> None:
    opt = gradstep.partition(
        TinyLM(), PARTS, overrides=[("block.2.*", "elementwise"), (torch.nn.LayerNorm, "elementwise")]
    )
    routes = {r.name: r for r in opt.routes()}
    assert routes["block.2.weight"].part == "elementwise" and "block.2.*" in routes["block.2.weight"].reason
    assert routes["norm.weight"].reason == "override 'LayerNorm'"
    assert routes["block.0.weight"].part == "matrix"


def test_unclaimed_and_twice_claimed_parameters_are_errors_naming_them() -> None:
    with pytest.raises(ValueError, match=r"parameter gate \(\) goes to part 'elementwise' \(scalar\)"):
        gradstep.partition(TinyLM(), {"matrix": "muon"})
    with pytest.raises(ValueError, match=r"block\.0\.weight is claimed twice"):
        gradstep.partition(TinyLM(), PARTS, overrides=[("block.0.*", "matrix"), ("*.weight", "elementwise")])
    with pytest.raises(ValueError, match="claimed by no rule"):
        gradstep.partition(TinyLM(), PARTS, roles=False, overrides=[("block.*", "matrix")])


def test_report_and_repr_list_every_parameter() -> None:
    opt = gradstep.partition(TinyLM(tied=True), PARTS)
    report = opt.report()
    assert "embed.weight" in report and "embedding tied to the output head" in report
    assert "block.0.weight  16x8" in report and "matrix (Muon)" in report
    assert report in repr(opt)
    assert len(opt.routes()) == len(list(TinyLM(tied=True).parameters())) == 8


def test_zero_grad_and_closure() -> None:
    model = TinyLM()
    opt = gradstep.partition(model, PARTS)
    x = torch.arange(6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), x % 11)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, Partition)


def test_muon_adamw_preset_on_a_model_and_in_a_model_scope() -> None:
    model = TinyLM()
    direct = MuonAdamW(model)
    with model_scope(model):
        scoped = presets()["muon_adamw"](model.parameters(), lr=0.02)
    assert direct.report() == scoped.report()
    assert [g["lr"] for g in direct.param_groups] == [0.02, 0.02 * 0.015]
    bare = MuonAdamW([torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))])
    assert [r.part for r in bare.routes()] == ["matrix", "elementwise"]
    with pytest.raises(ValueError, match="adamw_lr_ratio"):
        MuonAdamW(model, adamw_lr_ratio=-1.0)


def test_deepcopy_steps_identically() -> None:
    model = TinyLM()
    opt = gradstep.partition(model, PARTS)
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.block[0].weight
    _train(model, opt, 2, start=2)
    _train(model2, opt2, 2, start=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _snapshot(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    return [(f"{p}:{k}", v.clone()) for p, s in opt.state_dict()["state"].items() for k, v in s.items()]


def test_a_dict_refused_by_the_second_part_leaves_the_first_part_unchanged() -> None:
    model = TinyLM()
    opt = gradstep.partition(model, PARTS)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    _train(model, opt, 1, start=2)  # the live state now differs from the saved one
    before = _snapshot(opt)
    lrs = [g["lr"] for g in opt.param_groups]
    broken = copy.deepcopy(saved)
    last = max(broken["state"])  # a parameter of the second part ("elementwise")
    broken["state"][last]["exp_avg"] = torch.zeros(99)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(broken)
    after = _snapshot(opt)
    assert [k for k, _ in before] == [k for k, _ in after]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, after))
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_a_dict_with_other_group_counts_is_refused_before_any_part_loads() -> None:
    model = TinyLM()
    opt = gradstep.partition(model, PARTS)
    _train(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["partition"]["matrix"]["groups"] = 2
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(sd)


def test_presets_build_from_config_and_create() -> None:
    model = TinyLM()
    built = gradstep.from_config("muon_adamw(lr=0.01, adamw_lr_ratio=0.1)", model)
    assert isinstance(built, MuonAdamW)
    assert [g["lr"] for g in built.param_groups] == [0.01, 0.01 * 0.1]
    same = gradstep.from_config({"name": "muon_adamw", "lr": 0.01, "adamw_lr_ratio": 0.1}, model)
    assert same.report() == built.report()
    assert isinstance(gradstep.create("MUON_ADAMW", model), MuonAdamW)
    assert "muon_adamw" not in gradstep.available()  # the generic matrix steps bare tensors: presets stay out
    with pytest.raises(ValueError, match="muon_adamw"):
        gradstep.from_config("muon_adamx", model)
    with pytest.raises(ValueError, match="adamw_lr_ratio"):
        gradstep.from_config("muon_adamw(adamw_lr_ratio=0)", model)


def test_the_routes_travel_in_the_state_dict_and_inspect_shows_them() -> None:
    from gradstep.tools.checkpoint import summarize

    model = TinyLM(tied=True)
    opt = gradstep.from_config("muon_adamw", model)
    _train(model, opt, 1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    summary = summarize(saved)
    assert summary["optimizer"] == "gradstep.partition (matrix: gradstep.Muon, elementwise: gradstep.AdamW)"
    expected = [(r.name, list(r.shape), r.part, r.group, r.reason) for r in opt.routes()]
    assert [(r["name"], r["shape"], r["part"], r["group"], r["reason"]) for r in summary["routes"]] == expected
    assert ("embed.weight", "embedding tied to the output head") in [
        (r["name"], r["reason"]) for r in summary["routes"]
    ]
    resumed = gradstep.from_config("muon_adamw", model)
    resumed.load_state_dict(saved)  # the routes are information: loading ignores them

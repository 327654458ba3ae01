"""Parity of SGDScheduleFree, AdamWScheduleFree and RAdamScheduleFree with schedulefree 1.4.1, in both modes.

Every run: 200 float64 steps, a scalar, a bias, a 2-D and a 4-D parameter in two groups with different
hyperparameters, a fresh gradient ``sin(3p + t + i) + 0.3p`` computed from each side's own parameters. The parameters
(``y``, train mode) are compared after every step; every 50 steps both sides switch to eval mode, where the parameters
(``x``, the average) are compared, and back; the state the reference keeps (``z``, ``exp_avg_sq``) and its group
counters (``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr``) are compared every 10 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import schedulefree
import torch
from torch import Tensor

from gradstep.optim.schedule_free import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from parity import gradient, make_params, relative_difference, split_groups
from test_parity_adaptive import SHAPES, Config, same

TOL = 1e-6
GROUP_KEYS = ("weight_sum", "lr_max", "scheduled_lr")


@dataclass
class ModeParity:
    """Largest relative differences: parameters in train mode, in eval mode, state, group counters."""

    diffs: dict[str, float] = field(default_factory=dict)
    moved: float = float("inf")

    def note(self, key: str, value: float) -> None:
        if not value <= self.diffs.get(key, 0.0):
            self.diffs[key] = value

    def assert_within(self, tol: float = TOL) -> None:
        bad = {k: v for k, v in self.diffs.items() if not v <= tol}
        assert not bad, f"parity beyond {tol:g}: {bad}"
        assert self.moved >= 1e-3, f"parameters barely moved ({self.moved:.2e}): parity proves little"


def run_both_modes(reference: Any, mine: Any, config: Config, steps: int = 200) -> ModeParity:
    ref_params, gs_params = make_params(SHAPES), make_params(SHAPES)
    initial = [p.detach().clone() for p in gs_params]
    ref = config.build(reference, split_groups(ref_params), same)
    gs = config.build(mine, split_groups(gs_params), lambda h: {**h, **config.gradstep_only})
    ref.train()
    gs.train()
    result = ModeParity()

    def compare(mode: str) -> None:
        for i, (a, b) in enumerate(zip(ref_params, gs_params)):
            result.note(f"{mode} param {i}", relative_difference(a, b))

    for t in range(1, steps + 1):
        for opt, params in ((ref, ref_params), (gs, gs_params)):

            def closure(params: list[Tensor] = params, t: int = t) -> Tensor:
                for i, p in enumerate(params):
                    p.grad = gradient(p.detach(), t, i)
                return torch.zeros(())

            opt.step(closure)
        compare("train")
        if t % 10 == 0 or t <= 3:
            for i, (a, b) in enumerate(zip(ref_params, gs_params)):
                for key, value in ref.state[a].items():
                    result.note(f"state {i} {key}", relative_difference(value, gs.state[b][key]))
            for rg, gg in zip(ref.param_groups, gs.param_groups):
                assert rg["k"] == gg["k"] == t
                for key in GROUP_KEYS:
                    result.note(f"group {key}", abs(rg[key] - gg[key]) / max(abs(rg[key]), 1e-300))
        if t % 50 == 0:
            ref.eval()
            gs.eval()
            compare("eval")
            ref.train()
            gs.train()
            compare("train again")
    result.moved = min(relative_difference(p, p0) for p, p0 in zip(gs_params, initial))
    return result


SGD_CONFIGS = {
    "decay-warmup-group": Config(
        {"lr": 0.1, "momentum": 0.8}, {"weight_decay": 0.01}, {"lr": 0.05, "warmup_steps": 20}
    ),
    "r-power-momentum-per-tensor": Config(
        {"lr": 0.2, "r": 0.5, "weight_lr_power": 1.0},
        {"momentum": 0.95},
        {"weight_decay": 0.1},
        gradstep_only={"foreach": False},
    ),
    "long-warmup-unweighted": Config(
        {"lr": 0.05, "warmup_steps": 50, "weight_lr_power": 0.0}, {}, {"momentum": 0.5, "r": 1.0}
    ),
}


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_sgd_schedule_free_matches_schedulefree_in_both_modes(config: Config) -> None:
    run_both_modes(schedulefree.SGDScheduleFree, SGDScheduleFree, config).assert_within()


ADAMW_CONFIGS = {
    "decay-warmup-eps-group": Config(
        {"lr": 0.01, "betas": (0.9, 0.99)}, {"weight_decay": 0.01}, {"lr": 0.02, "warmup_steps": 20, "eps": 1e-6}
    ),
    "r-power-betas-per-tensor": Config(
        {"lr": 0.02, "r": 0.5, "weight_lr_power": 1.0},
        {"betas": (0.8, 0.999)},
        {"weight_decay": 0.1},
        gradstep_only={"foreach": False},
    ),
    "long-warmup-big-eps": Config({"lr": 0.005, "warmup_steps": 50, "eps": 1e-4}, {}, {"betas": (0.95, 0.9), "r": 1.0}),
}


@pytest.mark.parametrize("config", ADAMW_CONFIGS.values(), ids=ADAMW_CONFIGS.keys())
def test_adamw_schedule_free_matches_schedulefree_in_both_modes(config: Config) -> None:
    run_both_modes(schedulefree.AdamWScheduleFree, AdamWScheduleFree, config).assert_within()


RADAM_CONFIGS = {
    "decay-lr-betas-group": Config({"lr": 0.01}, {"weight_decay": 0.01}, {"lr": 0.02, "betas": (0.9, 0.99)}),
    "sgd-phase-r-per-tensor": Config(
        {"lr": 0.02, "silent_sgd_phase": False, "r": 0.5},
        {"betas": (0.8, 0.9)},
        {"weight_decay": 0.1, "eps": 1e-6},
        gradstep_only={"foreach": False},
    ),
    "power-group-sgd-phase": Config(
        {"lr": 0.01, "weight_lr_power": 1.0, "betas": (0.9, 0.95)}, {}, {"silent_sgd_phase": False}
    ),
}


@pytest.mark.parametrize("config", RADAM_CONFIGS.values(), ids=RADAM_CONFIGS.keys())
def test_radam_schedule_free_matches_schedulefree_in_both_modes(config: Config) -> None:
    run_both_modes(schedulefree.RAdamScheduleFree, RAdamScheduleFree, config).assert_within()


@pytest.mark.parametrize("cls", [SGDScheduleFree, AdamWScheduleFree, RAdamScheduleFree], ids=lambda c: c.__name__)
def test_eval_train_round_trip_and_a_step_in_eval_mode(cls: Any) -> None:
    params = make_params(SHAPES)
    opt = cls(params, lr=0.02)
    for t in range(1, 11):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    assert all(g["train_mode"] is False for g in opt.param_groups)
    assert any(relative_difference(a, b) > 1e-6 for a, b in zip(x, y)), "premise: x and y differ"
    opt.eval()  # a second switch to the same mode does nothing
    assert all(torch.equal(a, p.detach()) for a, p in zip(x, params))
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(x, params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in state.items())
    opt.train()
    for a, p in zip(y, params):
        assert relative_difference(a, p) <= 1e-12  # y -> x -> y is exact up to rounding

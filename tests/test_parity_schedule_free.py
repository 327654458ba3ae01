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

import gradstep
from gradstep.optim.schedule_free import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from gradstep.wrappers import ScheduleFreeWrapper
from parity import gradient, make_params, relative_difference, split_groups
from test_parity_adaptive import SHAPES, SHAPES_NO_SCALAR, Config, same

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
    return run_built(
        lambda groups: config.build(reference, groups, same),
        lambda groups: config.build(mine, groups, lambda h: {**h, **config.gradstep_only}),
        steps,
    )


def _state_of(opt: Any, p: Tensor, key: str) -> Tensor:
    """A state tensor of ``p``: the optimizer's own, or (a wrapper) its inner optimizer's."""
    state = opt.state[p]
    return state[key] if key in state else opt.inner.state[p][key]


def run_built(
    make_reference: Any, make_gradstep: Any, steps: int = 200, shapes: tuple[tuple[int, ...], ...] = SHAPES
) -> ModeParity:
    ref_params, gs_params = make_params(shapes), make_params(shapes)
    initial = [p.detach().clone() for p in gs_params]
    ref = make_reference(split_groups(ref_params))
    gs = make_gradstep(split_groups(gs_params))
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
                    # x and y of the literal reference are the parameter, compared in both modes
                    if isinstance(value, Tensor) and key not in ("step", "x", "y"):
                        result.note(f"state {i} {key}", relative_difference(value, _state_of(gs, b, key)))
            for rg, gg in zip(ref.param_groups, gs.param_groups):
                assert rg["k"] == gg.get("k", t) == t
                for key in (k for k in GROUP_KEYS if k in rg):
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


WRAPPER_CONFIGS: dict[str, tuple[Any, dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = {
    # name: (inner class, inner hypers, per-group inner hypers, wrapper settings)
    "sgd-momentum-decay-at-y": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.5},
        [{}, {"lr": 0.02, "weight_decay": 0.01}],
        {"momentum": 0.8, "weight_decay_at_y": 0.01},
    ),
    "nesterov-r-power": (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        [{"lr": 0.05}, {}],
        {"momentum": 0.95, "r": 0.5, "weight_lr_power": 1.0},
    ),
    "adagrad-decay": (
        torch.optim.Adagrad,
        {"lr": 0.05, "lr_decay": 0.01},
        [{"weight_decay": 0.01}, {}],
        {"momentum": 0.5, "weight_decay_at_y": 0.1},
    ),
}


# The fast wrapper swaps bytes through a uint8 view, which a 0-d tensor refuses: it runs without the scalar, and the
# literal reference (which keeps x, y and z) with it.
REFERENCE_WRAPPERS = {
    "fast-no-scalar": (schedulefree.ScheduleFreeWrapper, SHAPES_NO_SCALAR),
    "literal": (schedulefree.ScheduleFreeWrapperReference, SHAPES),
}


@pytest.mark.parametrize("case", WRAPPER_CONFIGS.values(), ids=WRAPPER_CONFIGS.keys())
@pytest.mark.parametrize("gradstep_inner", [False, True], ids=["torch-inner", "gradstep-inner"])
@pytest.mark.parametrize("wrapper", REFERENCE_WRAPPERS.values(), ids=REFERENCE_WRAPPERS.keys())
def test_schedule_free_wrapper_matches_schedulefree_in_both_modes(
    case: Any, gradstep_inner: bool, wrapper: Any
) -> None:
    reference_cls, shapes = wrapper
    inner, hypers, per_group, settings = case
    # gradstep's counterpart of the torch inner optimizer (gradstep.SGD for torch.optim.SGD, ...), or torch's own.
    mine_inner = getattr(gradstep, inner.__name__) if gradstep_inner else inner

    def groups_of(groups: list[list[Tensor]]) -> list[dict[str, Any]]:
        return [{"params": g, **h} for g, h in zip(groups, per_group)]

    def reference(groups: list[list[Tensor]]) -> Any:
        return reference_cls(inner(groups_of(groups), **hypers), **settings)

    def mine(groups: list[list[Tensor]]) -> Any:
        return ScheduleFreeWrapper(mine_inner(groups_of(groups), **hypers), **settings)

    run_built(reference, mine, shapes=shapes).assert_within()

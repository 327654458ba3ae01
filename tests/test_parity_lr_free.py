"""Parity of Prodigy (prodigyopt 1.1.2) and DAdaptAdam, DAdaptSGD, DAdaptAdaGrad (dadaptation 3.2), with state.

Every run: 200 float64 steps of ``run_with_state`` (a scalar, a bias, a 2-D and a 4-D parameter in two groups, the
relative difference of every parameter after every step and of every state tensor the reference keeps), plus the
estimate the references keep in the param groups (``d`` and the sums it is made of), compared at the end.

The references estimate one step size for the whole model and take the lr of the first group (or the largest): both
groups have the same lr. DAdaptSGD applies the first group's ``weight_decay`` and ``momentum`` to every group (gradstep
applies each group's own), so its groups share them; its groups differ in nothing the reference reads per group.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import dadaptation
import prodigyopt
import pytest
import torch
from torch import Tensor

from gradstep.optim.lr_free import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD, Prodigy
from test_parity_adaptive import SHAPES, Config, StateMap, run_with_state, same

TOL = 1e-6


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _run(
    reference: Any,
    mine: Any,
    config: Config,
    state_map: StateMap,
    group_keys: tuple[str, ...],
) -> None:
    built: list[torch.optim.Optimizer] = []

    def keep(factory: Callable[[list[list[Tensor]]], Any]) -> Callable[[list[list[Tensor]]], Any]:
        def make(groups: list[list[Tensor]]) -> Any:
            built.append(factory(groups))
            return built[-1]

        return make

    with contextlib.redirect_stdout(io.StringIO()):  # the references print a line about decoupled decay
        result = run_with_state(
            keep(lambda groups: config.build(reference, groups, same)),
            keep(lambda groups: config.build(mine, groups, lambda h: {**h, **config.gradstep_only})),
            state_map,
            shapes=SHAPES,
        )
    result.assert_within(TOL)
    ref, gs = built
    for ref_group, gs_group in zip(ref.param_groups, gs.param_groups):
        assert gs_group["k"] == ref_group["k"] == 200
        for key in group_keys:
            want, got = float(ref_group[key]), float(gs_group[key])
            assert abs(got - want) <= TOL * max(abs(want), 1e-30), (key, got, want)
    assert gs.param_groups[0]["d"] > 10 * gs.param_groups[0]["d0"], "the estimate never grew: the run proves little"


PRODIGY_CONFIGS = {
    "decoupled-safeguard-group": Config(
        {"lr": 0.3, "betas": (0.9, 0.99), "d_coef": 2.0, "d0": 1e-4},
        {"weight_decay": 0.01},
        {"eps": 1e-6, "safeguard_warmup": True},
    ),
    "coupled-bias-correction-growth": Config(
        {"use_bias_correction": True, "growth_rate": 1.05, "beta3": 0.9, "decouple": False, "d0": 1e-4},
        {"weight_decay": 0.1},
        {},
    ),
    "no-momentum-sliced": Config(
        {"lr": 0.1, "betas": (0.0, 0.99), "d0": 1e-4, "slice_p": 3}, {}, {"weight_decay": 0.05, "slice_p": 2}
    ),
}
PRODIGY_STATE: StateMap = {
    "s": ("s", _flat),
    "p0": ("p0", _flat),
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
}


@pytest.mark.parametrize("config", PRODIGY_CONFIGS.values(), ids=PRODIGY_CONFIGS.keys())
def test_prodigy_matches_prodigyopt(config: Config) -> None:
    _run(prodigyopt.Prodigy, Prodigy, config, PRODIGY_STATE, ("d", "d_max", "d_numerator", "d_hat"))


DADAPT_ADAM_CONFIGS = {
    "coupled-layer-scale": Config({"lr": 0.1, "d0": 1e-4}, {"weight_decay": 0.01}, {"eps": 1e-6, "layer_scale": 0.5}),
    "decoupled-bias-correction": Config(
        {"decouple": True, "use_bias_correction": True, "betas": (0.8, 0.99)},
        {"weight_decay": 0.05},
        {"layer_scale": 2.0},
        gradstep_only={"foreach": False},
    ),
    "growth-betas-eps": Config(
        {"growth_rate": 1.1, "betas": (0.95, 0.9), "d0": 1e-3}, {}, {"weight_decay": 0.1, "eps": 1e-4}
    ),
}
DADAPT_ADAM_STATE: StateMap = {"s": "s", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


@pytest.mark.parametrize("config", DADAPT_ADAM_CONFIGS.values(), ids=DADAPT_ADAM_CONFIGS.keys())
def test_dadapt_adam_matches_dadaptation(config: Config) -> None:
    _run(dadaptation.DAdaptAdam, DAdaptAdam, config, DADAPT_ADAM_STATE, ("d", "numerator_weighted"))


DADAPT_SGD_CONFIGS = {
    "momentum": Config({"momentum": 0.9}, {}, {}),
    "decay-d0": Config({"lr": 0.1, "weight_decay": 0.01, "d0": 1e-3}, {}, {}, gradstep_only={"foreach": False}),
    "momentum-growth-decay": Config({"momentum": 0.5, "growth_rate": 1.2, "weight_decay": 0.001}, {}, {}),
}
DADAPT_SGD_STATE: StateMap = {"z": "z", "s": "s", "x0": "x0"}


@pytest.mark.parametrize("config", DADAPT_SGD_CONFIGS.values(), ids=DADAPT_SGD_CONFIGS.keys())
def test_dadapt_sgd_matches_dadaptation(config: Config) -> None:
    _run(dadaptation.DAdaptSGD, DAdaptSGD, config, DADAPT_SGD_STATE, ("d", "numerator_weighted", "g0_norm"))


DADAPT_ADAGRAD_CONFIGS = {
    "decay-eps-groups": Config({"d0": 1e-2}, {"weight_decay": 0.01}, {"eps": 1e-4}),
    "momentum-d0": Config({"momentum": 0.9, "d0": 1e-3}, {"eps": 1e-5}, {}),
    "growth-momentum-decay": Config({"growth_rate": 1.1, "momentum": 0.5, "d0": 1e-2}, {}, {"weight_decay": 0.05}),
}
DADAPT_ADAGRAD_STATE: StateMap = {"alphak": "alphak", "sk": "sk", "x0": "x0"}


@pytest.mark.parametrize("config", DADAPT_ADAGRAD_CONFIGS.values(), ids=DADAPT_ADAGRAD_CONFIGS.keys())
def test_dadapt_adagrad_matches_dadaptation(config: Config) -> None:
    keys = ("d", "gsq_weighted", "sksq_weighted", "skl1")
    _run(dadaptation.DAdaptAdaGrad, DAdaptAdaGrad, config, DADAPT_ADAGRAD_STATE, keys)


def test_different_group_lrs_are_refused_before_anything_changes() -> None:
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = Prodigy([{"params": [p]}, {"params": [q], "lr": 0.5}])
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match=r"lr.*\(Prodigy estimates one step size"):
        opt.step()
    assert not opt.state[p] and torch.equal(p.detach(), torch.ones(3))

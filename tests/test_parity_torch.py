"""Parity with torch.optim: gradstep's drop-ins follow torch's built-ins step for step.

Each case runs torch's optimizer (``foreach=False``: torch's literal per-tensor loop) and gradstep's for 200 float64
steps from the same parameters (a scalar, a vector, a 4-D tensor and a matrix, in two groups with different
hyperparameters), feeding each side a gradient of its own current parameters (see ``parity.py``), and checks the
largest relative difference over the run. Both gradstep paths are held to it: the multi-tensor kernels
(``foreach=True``) and the per-tensor reference (``foreach=False``). Hyperparameters are deliberately far from the
defaults (large eps, several betas, weight decay, momentum in one group only) so that a misplaced term would show.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradstep
from parity import run_side_by_side, torch_groups

TOL = 1e-6

# name -> (torch class, gradstep class, {config id: (shared hypers, group 0 hypers, group 1 hypers)})
Config = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]

SGD_CONFIGS: dict[str, Config] = {
    # dampening differs per group; torch keeps the first buffer undampened, so must gradstep
    "momentum-dampening-wd": (
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"lr": 0.05},
        {"lr": 0.02, "momentum": 0.5, "dampening": 0.4, "weight_decay": 0.05},
    ),
    "nesterov-wd": (
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
        {"lr": 0.04},
        {"lr": 0.1, "momentum": 0.6, "weight_decay": 0.0},
    ),
    # maximize negates the gradient before the coupled decay is added; group 1 has no momentum buffer at all
    "maximize-momentum-wd": (
        {"momentum": 0.7, "maximize": True, "weight_decay": 0.03},
        {"lr": 0.01},
        {"lr": 0.005, "momentum": 0.0},
    ),
    "plain-wd": ({"weight_decay": 0.1}, {"lr": 0.1}, {"lr": 0.03, "weight_decay": 0.0}),
}

RMSPROP_CONFIGS: dict[str, Config] = {
    "plain": ({"alpha": 0.9, "eps": 1e-3}, {"lr": 0.01}, {"lr": 0.003, "alpha": 0.95, "eps": 0.05}),
    "centered-momentum-wd": (
        {"alpha": 0.9, "eps": 1e-4, "centered": True, "momentum": 0.5, "weight_decay": 0.01},
        {"lr": 0.005},
        {"lr": 0.002, "momentum": 0.8, "weight_decay": 0.05, "eps": 1e-2},
    ),
    # one group centered with momentum, the other neither
    "mixed-groups-maximize": (
        {"alpha": 0.95, "eps": 1e-3, "centered": True, "momentum": 0.3, "maximize": True},
        {"lr": 0.002},
        {"lr": 0.004, "centered": False, "momentum": 0.0, "weight_decay": 0.02},
    ),
}

ADAM_CONFIGS: dict[str, Config] = {
    "wd": (
        {"betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.02},
        {"lr": 0.02},
        {"lr": 0.005, "betas": (0.9, 0.99), "weight_decay": 0.1},
    ),
    "amsgrad-wd": (
        {"betas": (0.85, 0.9), "eps": 1e-4, "weight_decay": 0.01, "amsgrad": True},
        {"lr": 0.01},
        {"lr": 0.03, "eps": 1e-2, "weight_decay": 0.0},
    ),
    "amsgrad-maximize": (
        {"betas": (0.7, 0.98), "eps": 1e-3, "amsgrad": True, "maximize": True},
        {"lr": 0.002},
        {"lr": 0.001, "amsgrad": False, "weight_decay": 0.05},
    ),
}

ADAMW_CONFIGS: dict[str, Config] = {
    "no-amsgrad": (
        {"betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1},
        {"lr": 0.02},
        {"lr": 0.005, "weight_decay": 0.0, "betas": (0.9, 0.9)},
    ),
    "amsgrad": (
        {"betas": (0.9, 0.98), "eps": 1e-4, "weight_decay": 0.05, "amsgrad": True},
        {"lr": 0.01},
        {"lr": 0.03, "weight_decay": 0.3, "eps": 1e-2},
    ),
}

ADAMAX_CONFIGS: dict[str, Config] = {
    "wd": (
        {"betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.05},
        {"lr": 0.02},
        {"lr": 0.005, "weight_decay": 0.0, "betas": (0.95, 0.999)},
    ),
    "wd-maximize": (
        {"betas": (0.85, 0.99), "eps": 1e-2, "weight_decay": 0.01, "maximize": True},
        {"lr": 0.003},
        {"lr": 0.001, "eps": 1e-4},
    ),
}

CASES = [
    pytest.param(torch_cls, gs_cls, config, id=f"{name}-{cid}")
    for name, torch_cls, gs_cls, configs in [
        ("SGD", torch.optim.SGD, gradstep.SGD, SGD_CONFIGS),
        ("RMSprop", torch.optim.RMSprop, gradstep.RMSprop, RMSPROP_CONFIGS),
        ("Adam", torch.optim.Adam, gradstep.Adam, ADAM_CONFIGS),
        ("AdamW", torch.optim.AdamW, gradstep.AdamW, ADAMW_CONFIGS),
        ("Adamax", torch.optim.Adamax, gradstep.Adamax, ADAMAX_CONFIGS),
    ]
    for cid, config in configs.items()
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize(("torch_cls", "gs_cls", "config"), CASES)
def test_gradstep_matches_torch_optim_for_200_float64_steps(
    torch_cls: type[torch.optim.Optimizer], gs_cls: type[torch.optim.Optimizer], config: Config, foreach: bool
) -> None:
    shared, group0, group1 = config
    result = run_side_by_side(
        lambda groups: torch_cls(torch_groups(groups, group0, group1), foreach=False, **shared),
        lambda groups: gs_cls(torch_groups(groups, group0, group1), foreach=foreach, **shared),
        steps=200,
    )
    result.assert_within(TOL)


# The harness must be able to fail: a small, plausible mistake in the update rule is far above the tolerance.
@pytest.mark.parametrize(
    ("torch_cls", "torch_hypers", "gs_cls", "gs_hypers"),
    [
        # eps added to sqrt(v) before the bias correction (TF style) instead of after it
        (torch.optim.Adam, {"eps": 1e-3}, gradstep.Adam, {"eps": 1e-3, "eps_mode": "tf"}),
        # weight decay decoupled instead of coupled
        (
            torch.optim.Adam,
            {"weight_decay": 0.05},
            gradstep.Adam,
            {"weight_decay": 0.05, "weight_decay_mode": "decoupled"},
        ),
        # fastai's momentum of raw gradients instead of torch's momentum of scaled ones
        (torch.optim.RMSprop, {"momentum": 0.5}, gradstep.RMSprop, {"momentum": 0.5, "momentum_on": "grad"}),
        # dampening missing
        (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.2}, gradstep.SGD, {"momentum": 0.9}),
    ],
    ids=["adam-tf-eps", "adam-decoupled-wd", "rmsprop-momentum-on-grad", "sgd-no-dampening"],
)
def test_parity_harness_detects_a_different_update_rule(
    torch_cls: type[torch.optim.Optimizer],
    torch_hypers: dict[str, Any],
    gs_cls: type[torch.optim.Optimizer],
    gs_hypers: dict[str, Any],
) -> None:
    lrs = ({"lr": 0.01}, {"lr": 0.02})
    result = run_side_by_side(
        lambda groups: torch_cls(torch_groups(groups, *lrs), foreach=False, **torch_hypers),
        lambda groups: gs_cls(torch_groups(groups, *lrs), **gs_hypers),
        steps=50,
    )
    assert result.max_diff > 100 * TOL, result.table()


def test_adam_accepts_torch_decoupled_weight_decay_flag() -> None:
    """``torch.optim.Adam(..., decoupled_weight_decay=True)`` is a drop-in: same flag, same trajectory."""

    def run(make: Any) -> torch.Tensor:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
        opt = make([p])
        for t in range(50):
            p.grad = torch.sin(3 * p.detach() + t) + 0.3 * p.detach()
            opt.step()
        return p.detach()

    ours = run(lambda ps: gradstep.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True))
    torch_ = run(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True))
    coupled = run(lambda ps: gradstep.Adam(ps, lr=1e-2, weight_decay=0.1))
    assert torch.allclose(ours, torch_, rtol=1e-12, atol=0)
    assert not torch.allclose(ours, coupled, rtol=1e-6, atol=0)

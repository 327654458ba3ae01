"""Parity of Adafactor and CAME with their originals, parameters and every state tensor the original keeps.

Every run (``run_with_state`` of test_parity_adaptive.py): 200 float64 steps, a scalar, a bias vector, a 2-D weight
and a 4-D conv weight dealt into two parameter groups with different hyperparameters, a fresh deterministic gradient
from each side's own parameters, every parameter compared after every step and every state tensor of the original
(mapped to gradstep's key) after steps 1-3 and every 10th, to 1e-6 relative.

* ``Adafactor`` against ``torch.optim.Adafactor`` (its for-loop and foreach implementations), and in the paper's
  option mode (relative step, update clipping, parameter scaling, warm-up init, first moment) against HF
  transformers' ``Adafactor``. HF computes in the parameter's dtype (float32 casts only for float16/bfloat16
  parameters), so in float64 the two agree to float64 rounding and the bound needs no float32 allowance.
  HF's factored state drops the reduced dimension (``(..., n)``, ``(..., m)``); torch's, which gradstep keeps, has
  it as size 1. HF's ``exp_avg`` is gradstep's times lr (gradstep keeps the momentum of the step per unit lr).
* ``CAME`` against came_pytorch's ``CAME`` (same state names and shapes).

The originals' ``RMS`` entries (the parameter's RMS, recorded at each step; came_pytorch never reads it) are not kept
by gradstep, and are the only state left out of the comparison.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers.optimization as hf
from came_pytorch import CAME as OriginalCAME

from gradstep import CAME, Adafactor
from parity import torch_groups
from test_parity_adaptive import TOL, StateMap, run_with_state

TORCH_STATE: StateMap = {"row_var": "row_var", "col_var": "col_var", "variance": "variance"}
HF_STATE: StateMap = {
    "exp_avg_sq_row": ("row_var", lambda t: t.squeeze(-1)),
    "exp_avg_sq_col": ("col_var", lambda t: t.squeeze(-2)),
    "exp_avg_sq": "variance",
}
CAME_STATE: StateMap = {
    key: key
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg_res_row", "exp_avg_res_col")
}
IGNORED = ("RMS",)  # see the module docstring


# --- Adafactor against torch.optim.Adafactor -------------------------------------------------------------------------
TORCH_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "defaults, a second group's lr": ({}, {}, {"lr": 0.05}),
    "maximize, weight decay, beta2_decay, eps, d": (
        {"lr": 0.02, "beta2_decay": -0.5, "eps": (1e-10, 1e-2), "d": 1.5, "weight_decay": 0.05, "maximize": True},
        {"weight_decay": 0.0, "d": 1.0},
        {"beta2_decay": -0.9},
    ),
    "large lr (the 1/sqrt(t) cap acts), eps2, foreach": (
        {"lr": 0.5, "eps": (None, 1e-4), "weight_decay": 0.01, "foreach": True},
        {"lr": 0.003},
        {"eps": (1e-6, 1e-3), "d": 3.0},
    ),
}


@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_adafactor_matches_torch_adafactor(name: str) -> None:
    common, group0, group1 = TORCH_CONFIGS[name]

    def build(cls: Any, groups: list[list[torch.Tensor]]) -> Any:
        return cls(torch_groups(groups, group0, group1), **common)

    result = run_with_state(
        lambda groups: build(torch.optim.Adafactor, groups), lambda groups: build(Adafactor, groups), TORCH_STATE
    )
    result.assert_within(TOL)


# --- Adafactor's paper options against HF transformers ---------------------------------------------------------------
# (HF's hyperparameters, gradstep's for the same rule); per group: (HF's, gradstep's).
HF_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[dict[str, Any], dict[str, Any]]]] = {
    "HF defaults (relative step, parameter scaling, clipping)": (
        {"lr": None},
        {"lr": 1e-2, "eps": (1e-30, 1e-3)},
        ({"scale_parameter": False}, {"scale_parameter": False}),
    ),
    "fixed lr, no scaling, first moment, clip_threshold, decay_rate": (
        {
            "lr": 3e-3,
            "relative_step": False,
            "scale_parameter": False,
            "beta1": 0.9,
            "clip_threshold": 1.5,
            "decay_rate": -0.6,
        },
        {
            "lr": 3e-3,
            "relative_step": False,
            "scale_parameter": False,
            "beta1": 0.9,
            "d": 1.5,
            "beta2_decay": -0.6,
            "eps": (1e-30, 1e-3),
        },
        ({"scale_parameter": True}, {"scale_parameter": True}),
    ),
    "warm-up init, first moment, eps": (
        {"lr": None, "warmup_init": True, "beta1": 0.5, "eps": (1e-25, 1e-2)},
        {"lr": 1e-6, "warmup_init": True, "beta1": 0.5, "eps": (1e-25, 1e-2)},
        ({"clip_threshold": 2.0}, {"d": 2.0}),
    ),
}


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_adafactor_options_match_hf_transformers(name: str) -> None:
    hf_common, gs_common, (hf_group1, gs_group1) = HF_CONFIGS[name]
    lr = gs_common["lr"]
    # HF's exp_avg is the momentum of the step (lr included); gradstep's is per unit lr.
    state = {**HF_STATE, "exp_avg": ("exp_avg", lambda t: t * lr)}
    result = run_with_state(
        lambda groups: hf.Adafactor(torch_groups(groups, {}, hf_group1), **hf_common),
        lambda groups: Adafactor(torch_groups(groups, {}, gs_group1), **gs_common),
        state,
        ignored=IGNORED,
    )
    result.assert_within(TOL)


# --- CAME against came_pytorch --------------------------------------------------------------------------------------
CAME_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "paper's betas, a second group's lr": ({"lr": 2e-3}, {}, {"lr": 5e-4}),
    "weight decay, clip_threshold, betas": (
        {"lr": 1e-3, "weight_decay": 0.05, "clip_threshold": 0.5, "betas": (0.8, 0.95, 0.99)},
        {"weight_decay": 0.0},
        {"clip_threshold": 2.0},
    ),
    "eps, fast instability average": (
        {"lr": 3e-3, "eps": (1e-20, 1e-8), "betas": (0.5, 0.9, 0.9)},
        {"betas": (0.9, 0.999, 0.5)},
        {"eps": (1e-12, 1e-4)},
    ),
}


@pytest.mark.parametrize("name", CAME_CONFIGS)
def test_came_matches_came_pytorch(name: str) -> None:
    common, group0, group1 = CAME_CONFIGS[name]

    def build(cls: Any, groups: list[list[torch.Tensor]]) -> Any:
        return cls(torch_groups(groups, group0, group1), **common)

    result = run_with_state(
        lambda groups: build(OriginalCAME, groups), lambda groups: build(CAME, groups), CAME_STATE, ignored=IGNORED
    )
    result.assert_within(TOL)


def test_factored_state_shapes_and_memory() -> None:
    w, b = torch.nn.Parameter(torch.ones(6, 4, 3)), torch.nn.Parameter(torch.ones(3))
    opt = Adafactor([w, b])
    came = CAME([w, b], lr=1e-3)
    for o in (opt, came):
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        o.step()
    assert opt.state[w]["row_var"].shape == (6, 4, 1) and opt.state[w]["col_var"].shape == (6, 1, 3)
    assert opt.state[w]["variance"] is None and opt.state[b]["row_var"] is None
    assert opt.state[b]["variance"].shape == (3,)
    assert came.state[w]["exp_avg_sq_row"].shape == (6, 4) and came.state[w]["exp_avg_res_col"].shape == (6, 3)
    assert came.state[b]["exp_avg_res_row"] is None and came.state[b]["exp_avg_sq"].shape == (3,)


def test_adafactor_refuses_bad_options_naming_them() -> None:
    w = torch.nn.Parameter(torch.ones(2, 2))
    for hypers, name in (
        ({"beta2_decay": 0.5}, "beta2_decay"),
        ({"d": 0.9}, "d"),
        ({"beta1": 1.5}, "beta1"),
        ({"eps": (-1.0, 1e-3)}, "eps"),
        ({"warmup_init": 1}, "warmup_init"),
    ):
        with pytest.raises(ValueError, match=name):
            Adafactor([w], **hypers)
    with pytest.raises(ValueError, match="lr"):
        CAME([w])

"""Parity with fastai 2.8.12: the ``fastai_sgd``, ``fastai_rmsprop`` and ``fastai_adam`` presets follow fastai's
``SGD``, ``RMSProp`` and ``Adam`` factories step for step.

fastai's optimizer is not a ``torch.optim.Optimizer``: it takes a list of lists of parameters (one list per group),
per-group values go through ``set_hyper(name, [v0, v1])``, ``step()`` takes no closure, and its L2 mode writes
``wd * p`` into ``p.grad``. ``parity.run_side_by_side_fastai`` handles all of that; each case runs 200 float64 steps
with two groups that have different values, and checks the largest relative difference over the run.

fastai's names map to torch's: ``mom`` -> ``momentum`` (``betas[0]`` for Adam), ``sqr_mom`` -> ``alpha``
(``betas[1]`` for Adam), ``wd`` -> ``weight_decay``, ``decouple_wd=False`` -> ``weight_decay_mode="coupled"``.

The second part checks the values fastai's own tests pin down (spec F.3.1 to F.3.3) against gradstep directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastai import optimizer as fastai_optimizer

import gradstep
from parity import fastai_set_hypers, run_side_by_side_fastai, torch_groups

TOL = 1e-6

# fastai's factory defaults, needed to build Adam's betas pair when a case sets only one of mom and sqr_mom
FASTAI_ADAM_DEFAULTS = {"mom": 0.9, "sqr_mom": 0.99}


def torch_names(kind: str, fastai_hypers: dict[str, Any]) -> dict[str, Any]:
    """One group's fastai hyperparameters under gradstep's (torch's) names."""
    out: dict[str, Any] = {}
    for name, value in fastai_hypers.items():
        if name == "wd":
            out["weight_decay"] = value
        elif name == "mom" and kind != "adam":
            out["momentum"] = value
        elif name == "sqr_mom" and kind != "adam":
            out["alpha"] = value
        elif name not in ("mom", "sqr_mom"):
            out[name] = value  # lr, eps
    if kind == "adam":
        merged = {**FASTAI_ADAM_DEFAULTS, **fastai_hypers}
        out["betas"] = (merged["mom"], merged["sqr_mom"])
    return out


FACTORIES: dict[str, Callable[..., Any]] = {
    "sgd": fastai_optimizer.SGD,
    "rmsprop": fastai_optimizer.RMSProp,
    "adam": fastai_optimizer.Adam,
}

# kind -> {case id: (decouple_wd, {fastai hyperparameter: [group 0 value, group 1 value]})}
CASES: dict[str, dict[str, tuple[bool, dict[str, list[Any]]]]] = {
    "sgd": {
        "decoupled-mom": (True, {"lr": [0.05, 0.02], "mom": [0.9, 0.5], "wd": [0.01, 0.05]}),
        "decoupled-no-mom": (True, {"lr": [0.1, 0.03], "wd": [0.02, 0.0]}),
        # L2 through p.grad, with momentum in one group only
        "coupled-mom": (False, {"lr": [0.03, 0.01], "mom": [0.8, 0.0], "wd": [0.05, 0.1]}),
        "coupled-no-mom": (False, {"lr": [0.1, 0.05], "wd": [0.1, 0.02]}),
    },
    "rmsprop": {
        # fastai ignores the factory's eps; the fastai side gets it through set_hyper (spec F.3.2)
        "decoupled-no-mom": (
            True,
            {"lr": [0.01, 0.003], "sqr_mom": [0.9, 0.95], "eps": [1e-3, 0.05], "wd": [0.01, 0.1]},
        ),
        "decoupled-mom": (True, {"lr": [0.002, 0.004], "mom": [0.9, 0.5], "sqr_mom": [0.99, 0.9], "eps": [1e-4, 1e-2]}),
        "coupled-mom-in-one-group": (
            False,
            {"lr": [0.003, 0.001], "mom": [0.0, 0.8], "sqr_mom": [0.95, 0.99], "eps": [1e-3, 1e-3], "wd": [0.05, 0.02]},
        ),
    },
    "adam": {
        # fastai's defaults: mom 0.9, sqr_mom 0.99, eps 1e-5, wd 0.01 decoupled; only lr differs per group
        "defaults": (True, {"lr": [0.01, 0.003]}),
        "decoupled": (
            True,
            {"lr": [0.02, 0.005], "mom": [0.8, 0.0], "sqr_mom": [0.95, 0.9], "eps": [1e-3, 1e-2], "wd": [0.1, 0.0]},
        ),
        "coupled": (
            False,
            {"lr": [0.01, 0.02], "mom": [0.85, 0.9], "sqr_mom": [0.999, 0.9], "eps": [1e-4, 1e-3], "wd": [0.05, 0.01]},
        ),
    },
}


Factory = Callable[[list[list[torch.Tensor]]], Any]


def make_fastai(kind: str, decouple_wd: bool, hypers: dict[str, list[Any]]) -> Factory:
    def build(groups: list[list[torch.Tensor]]) -> Any:
        kwargs: dict[str, Any] = {"decouple_wd": decouple_wd, "lr": hypers["lr"][0]}
        if "mom" in hypers:
            # RMSProp and SGD choose their callbacks from the factory's mom: give the largest so that a group with
            # momentum gets the momentum callback (a group with mom 0 then just keeps its last gradient)
            kwargs["mom"] = max(hypers["mom"])
        return fastai_set_hypers(FACTORIES[kind](groups, **kwargs), **hypers)

    return build


def make_gradstep(kind: str, decouple_wd: bool, hypers: dict[str, list[Any]]) -> Factory:
    per_group = [torch_names(kind, {k: v[i] for k, v in hypers.items()}) for i in range(2)]
    mode = {} if decouple_wd else {"weight_decay_mode": "coupled"}

    def build(groups: list[list[torch.Tensor]]) -> Any:
        return gradstep.create(f"fastai_{kind}", torch_groups(groups, *per_group), lr=hypers["lr"][0], **mode)

    return build


@pytest.mark.parametrize(
    ("kind", "decouple_wd", "hypers"),
    [
        pytest.param(kind, decouple, hypers, id=f"{kind}-{cid}")
        for kind, cases in CASES.items()
        for cid, (decouple, hypers) in cases.items()
    ],
)
def test_fastai_preset_matches_fastai_for_200_float64_steps(
    kind: str, decouple_wd: bool, hypers: dict[str, list[Any]]
) -> None:
    result = run_side_by_side_fastai(make_fastai(kind, decouple_wd, hypers), make_gradstep(kind, decouple_wd, hypers))
    result.assert_within(TOL)


def test_fastai_rmsprop_ignores_its_eps_argument_so_its_runs_match_eps_1e_8() -> None:
    # fastai's RMSProp never passes eps on (spec F.3.2): eps=0.5 still runs with 1e-8, which is gradstep's default.
    def fastai_side(groups: list[list[torch.Tensor]]) -> Any:
        opt = fastai_optimizer.RMSProp(groups, lr=0.001, eps=0.5)
        assert [h["eps"] for h in opt.hypers] == [1e-8, 1e-8]
        return opt

    result = run_side_by_side_fastai(
        fastai_side, lambda groups: gradstep.create("fastai_rmsprop", torch_groups(groups), lr=0.001)
    )
    result.assert_within(TOL)


def test_fastai_parity_harness_detects_a_different_eps() -> None:
    # The reason the eps cases above set eps on the fastai side: gradstep honours eps=1e-3, fastai would not.
    result = run_side_by_side_fastai(
        lambda groups: fastai_optimizer.RMSProp(groups, lr=0.003, eps=1e-3),
        lambda groups: gradstep.create("fastai_rmsprop", torch_groups(groups), lr=0.003, eps=1e-3),
        steps=50,
    )
    assert result.max_diff > 100 * TOL, result.table()


# --- fastai's documented check values (spec F.3.1 to F.3.3), against gradstep alone ----------------------------------


def test_fastai_sgd_check_values_from_spec_f31() -> None:
    # lr .1, mom .9, p = i, g = i/10 (the same gradient both steps):
    # step 1 -> 0.99 i; step 2 -> i (1 - 0.1 (0.1 + 0.19))
    params = [torch.tensor([float(i)], dtype=torch.float64) for i in range(4)]
    for i, p in enumerate(params):
        p.grad = torch.tensor([i / 10], dtype=torch.float64)
    opt = gradstep.create("fastai_sgd", params, lr=0.1, momentum=0.9)
    opt.step()
    torch.testing.assert_close([p.item() for p in params], [0.99 * i for i in range(4)], rtol=1e-12, atol=1e-12)
    opt.step()
    expected = [i * (1 - 0.1 * (0.1 + 0.19)) for i in range(4)]
    torch.testing.assert_close([p.item() for p in params], expected, rtol=1e-12, atol=1e-12)


def test_fastai_rmsprop_check_values_from_spec_f32() -> None:
    # lr .1, p = [1, 2, 3], g = [.1, .2, .3]: step 1 -> [0, 1, 2] (a step of 10 lr sign(g), as sqrt(0.01 g^2) = 0.1|g|);
    # step 2 moves each element by -0.1 g / (sqrt((0.01 * 0.99 + 0.01) g^2) + 1e-8)
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = [0.1, 0.2, 0.3]
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt = gradstep.create("fastai_rmsprop", [p], lr=0.1)
    opt.step()
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-5)
    after1 = [p0 - 0.1 * gi / (math.sqrt(0.01 * gi**2) + 1e-8) for p0, gi in zip([1.0, 2.0, 3.0], g)]
    torch.testing.assert_close(p.tolist(), after1, rtol=1e-12, atol=1e-12)
    opt.step()
    step2 = [-0.1 * gi / (math.sqrt((0.01 * 0.99 + 0.01) * gi**2) + 1e-8) for gi in g]
    torch.testing.assert_close(p.tolist(), [a + s for a, s in zip(after1, step2)], rtol=1e-12, atol=1e-12)
    # the spec's step-2 value for the first element, as written there
    spec_step2 = -0.1 * 0.1 / (math.sqrt((0.01 * 0.99 + 0.01) * 0.1**2) + 1e-8)
    assert abs((p[0].item() - after1[0]) - spec_step2) < 1e-12


def test_fastai_adam_first_step_from_spec_f33() -> None:
    # Step 1 of fastai's Adam is lr g / (|g| + eps) after the default decoupled decay p (1 - lr 0.01), eps 1e-5.
    p = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    g = torch.tensor([0.3, -0.02, 1e-4, -4.0], dtype=torch.float64)
    p0 = p.clone()
    p.grad = g.clone()
    gradstep.create("fastai_adam", [p], lr=0.1).step()
    expected = p0 * (1 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-5)
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)

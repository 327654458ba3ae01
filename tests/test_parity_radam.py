"""Parity of RAdam (with SAdam) and QHAdam with torch.optim.RAdam, fastai's RAdam/QHAdam and qhoptim's QHAdam.

Every run: 200 float64 steps, a scalar, a bias vector, a 2-D weight and a 4-D conv weight dealt into two parameter
groups with different hyperparameters, a fresh deterministic gradient ``sin(3p + t + i) + 0.3p`` computed from each
side's own parameters, the relative difference of every parameter after every step, and that of every state value the
original keeps (mapped to gradstep's name, or derived from gradstep's state where the original stores another form)
after steps 1-3 and every 10th.

:func:`run_parity` is also used by ``test_parity_layerwise.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastai.optimizer as fastai_optim
import pytest
import qhoptim.pyt as qhoptim
import torch
from torch import Tensor

from gradstep.core.registry import get
from gradstep.optim.radam import QHAdam, RAdam, rectification
from parity import fastai_set_hypers, gradient, make_params, relative_difference, split_groups, torch_groups

SHAPES: tuple[tuple[int, ...], ...] = ((), (16,), (8, 16), (4, 3, 3, 3))
"""A scalar, a bias, a 2-D weight and a conv weight; groups: {scalar, 2-D weight} and {bias, conv weight}."""

TOL = 1e-6

Derived = Callable[[dict[str, Any], dict[str, Any], Tensor], Any]
"""``f(gradstep state, gradstep group, parameter before the step)``: the value the original keeps under its key."""
StateMap = dict[str, "str | Derived"]


# --- the side-by-side runner, with state ---------------------------------------------------------------------------


@dataclass
class Parity:
    """Largest relative differences over a run, per parameter and per (parameter, state key); how far each moved."""

    params: dict[str, float] = field(default_factory=dict)
    states: dict[str, float] = field(default_factory=dict)
    moved: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        rows = [f"  param {k}: {v:.3e} (moved {self.moved[k]:.3e})" for k, v in self.params.items()]
        return "\n".join(rows + [f"  state {k}: {v:.3e}" for k, v in self.states.items()])

    def assert_within(self, tol: float = TOL, min_move: float = 1e-3, frozen: Sequence[str] = ()) -> None:
        """All differences within ``tol``; every parameter moved by ``min_move`` except those named in ``frozen``."""
        bad = {k: v for k, v in {**self.params, **self.states}.items() if not v <= tol}
        assert not bad, f"parity beyond {tol:g}:\n{self.report()}"
        still = {k: v for k, v in self.moved.items() if not v >= min_move and k not in frozen}
        assert not still, f"parameters barely moved, parity proves little:\n{self.report()}"


def _note(table: dict[str, float], key: str, value: float) -> None:
    if not value <= table.get(key, 0.0):  # keeps a NaN
        table[key] = value


def _tensor(value: Any) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).detach()


def run_parity(
    make_reference: Callable[[list[list[Tensor]]], Any],
    make_gradstep: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    state_map: StateMap,
    *,
    prepare: Callable[[list[Tensor]], None] | None = None,
    steps: int = 200,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
) -> Parity:
    """Step the original and gradstep from the same float64 values (``prepare`` may edit them first, in place);
    compare every parameter after every step, and every mapped state value after steps 1-3 and every 10th.

    ``state_map`` maps each state key of the original to gradstep's key or to a :data:`Derived` function. Every
    value the original keeps (tensors and numbers, ``step`` apart, which must equal the step count on both sides)
    must be mapped, so that no state escapes the comparison. The gradient is written into ``p.grad`` before a plain
    ``step()``: fastai takes no closure and writes L2 decay into ``p.grad``.
    """
    ref_params, gs_params = make_params(shapes), make_params(shapes)
    if prepare is not None:
        with torch.no_grad():
            prepare(ref_params)
            prepare(gs_params)
    initial = [p.detach().clone() for p in gs_params]
    ref_opt = make_reference(split_groups(ref_params))
    gs_opt = make_gradstep(split_groups(gs_params))
    group_of = {id(p): g for g in gs_opt.param_groups for p in g["params"]}
    names = [f"{i}:{tuple(s)}" for i, s in enumerate(shapes)]
    result = Parity(params=dict.fromkeys(names, 0.0))
    for t in range(1, steps + 1):
        before = [p.detach().clone() for p in gs_params]
        for opt, params in ((ref_opt, ref_params), (gs_opt, gs_params)):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
        for name, ref_p, gs_p, p_before in zip(names, ref_params, gs_params, before):
            _note(result.params, name, relative_difference(ref_p, gs_p))
            if not (t <= 3 or t % 10 == 0):
                continue  # state after the first steps and every 10th: an error in a running average persists
            ref_state, gs_state = ref_opt.state[ref_p], gs_opt.state[gs_p]
            kept = {k for k, v in ref_state.items() if isinstance(v, (Tensor, float, int)) and not isinstance(v, bool)}
            unmapped = kept - set(state_map) - {"step"}
            assert not unmapped, f"state {sorted(unmapped)} of the original is not compared"
            assert float(gs_state["step"]) == t
            if "step" in ref_state:
                assert float(ref_state["step"]) == t
            for ref_key, target in state_map.items():
                if isinstance(target, str):
                    assert (ref_key in ref_state) == (target in gs_state), f"{ref_key} / {target} kept on one side"
                if ref_key not in ref_state:
                    continue
                mine = gs_state[target] if isinstance(target, str) else target(gs_state, group_of[id(gs_p)], p_before)
                _note(
                    result.states, f"{name} {ref_key}", relative_difference(_tensor(ref_state[ref_key]), _tensor(mine))
                )
    result.moved = {n: relative_difference(p, p0) for n, p, p0 in zip(names, gs_params, initial)}
    return result


FASTAI_ADAM_STATE: StateMap = {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq"}
TORCH_ADAM_STATE: StateMap = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def _bc(state: dict[str, Any], beta: float) -> float:
    return 1.0 - beta ** float(state["step"])


# qhoptim keeps the bias-corrected averages and the weights (1 - beta^t) / (1 - beta) of its recursion.
QHOPTIM_STATE: StateMap = {
    "exp_avg": lambda s, g, p: s["exp_avg"] / _bc(s, g["betas"][0]),
    "exp_avg_sq": lambda s, g, p: s["exp_avg_sq"] / _bc(s, g["betas"][1]),
    "beta1_weight": lambda s, g, p: _bc(s, g["betas"][0]) / (1 - g["betas"][0]),
    "beta2_weight": lambda s, g, p: _bc(s, g["betas"][1]) / (1 - g["betas"][1]),
}


# --- RAdam vs torch.optim.RAdam --------------------------------------------------------------------------------------

TORCH_RADAM_CASES = {
    "defaults-lr": ({}, {"lr": 1e-2}, {"lr": 3e-3, "betas": (0.8, 0.99)}),
    "coupled-wd": ({}, {"lr": 5e-3, "weight_decay": 0.05, "eps": 1e-6}, {"lr": 2e-2, "betas": (0.95, 0.9)}),
    "decoupled-wd-maximize": (
        {"decoupled_weight_decay": True, "maximize": True},
        {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.98)},
        {"lr": 4e-3, "weight_decay": 0.01, "eps": 1e-4},
    ),
}


@pytest.mark.parametrize("case", TORCH_RADAM_CASES)
def test_radam_matches_torch_radam(case: str) -> None:
    common, a, b = TORCH_RADAM_CASES[case]
    # The last case runs gradstep's per-tensor reference path (foreach=False), the others the foreach kernels.
    foreach = False if case == "decoupled-wd-maximize" else None
    result = run_parity(
        lambda gs: torch.optim.RAdam(torch_groups(gs, a, b), **common),
        lambda gs: RAdam(torch_groups(gs, a, b), foreach=foreach, **common),
        TORCH_ADAM_STATE,
    )
    result.assert_within()


# --- RAdam vs fastai RAdam (and SAdam) -------------------------------------------------------------------------------

FASTAI_RADAM_CASES = {
    # (fastai factory kwargs, fastai per-group hypers, gradstep per-group hypers, gradstep kwargs)
    "radamw": (
        {"lr": 1e-2, "wd": 0.01},
        {"lr": [1e-2, 3e-3]},
        ({"lr": 1e-2}, {"lr": 3e-3}),
        {"weight_decay": 0.01},
    ),
    "sadam-l2": (
        {"lr": 1e-2, "mom": 0.8, "sqr_mom": 0.95, "wd": 0.02, "decouple_wd": False},
        {"beta": [10.0, 3.0], "mom": [0.8, 0.9]},
        ({"beta": 10.0, "betas": (0.8, 0.95)}, {"beta": 3.0, "betas": (0.9, 0.95)}),
        {"weight_decay": 0.02, "weight_decay_mode": "coupled"},
    ),
    "sadam-eps0": (
        {"lr": 5e-3, "eps": 0.0, "wd": 0.05},
        {"beta": [5.0, 0.0], "sqr_mom": [0.99, 0.9]},
        ({"beta": 5.0}, {"beta": 0.0, "betas": (0.9, 0.9)}),
        {"lr": 5e-3, "eps": 0.0, "weight_decay": 0.05},
    ),
}


@pytest.mark.parametrize("case", FASTAI_RADAM_CASES)
def test_radam_matches_fastai_radam(case: str) -> None:
    fastai_kwargs, fastai_groups, (a, b), gs_kwargs = FASTAI_RADAM_CASES[case]
    result = run_parity(
        lambda gs: fastai_set_hypers(fastai_optim.RAdam(gs, **fastai_kwargs), **fastai_groups),
        lambda gs: get("fastai_radam")(torch_groups(gs, a, b), **{"lr": 1e-2, **gs_kwargs}),
        FASTAI_ADAM_STATE,
    )
    result.assert_within()


def test_fastai_radam_spec_check_values() -> None:
    # Spec F.3.4: betas (0.9, 0.99): rho_t <= 5 for t <= 5, so five momentum steps of m_hat = g give 0.95 * p0.
    p0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = torch.nn.Parameter(p0.clone())
    opt = get("fastai_radam")([w], lr=0.1)
    for _ in range(5):
        w.grad = 0.1 * p0
        opt.step()
    torch.testing.assert_close(w.detach(), 0.95 * p0, rtol=1e-12, atol=0)


def test_rectification_starts_where_each_original_says() -> None:
    steps = torch.arange(1, 9, dtype=torch.float64)
    # Spec F.3.4 / X.6: beta2 = 0.99, torch's and fastai's rho_t > 5 first holds at t = 6.
    _, on = rectification(steps, 0.99, 5.0)
    assert on.tolist() == [False] * 5 + [True] * 3
    # Spec H.3: beta2 = 0.999, holocron's sma_t > 4 first holds at t = 5, torch's > 5 at t = 6.
    r4, on4 = rectification(steps, 0.999, 4.0)
    _, on5 = rectification(steps, 0.999, 5.0)
    assert on4.tolist() == [False] * 4 + [True] * 4
    assert on5.tolist() == [False] * 5 + [True] * 3
    # r_t is a damping factor in (0, 1) once on, and exactly 0 (never NaN) before.
    assert torch.all((r4[on4] > 0) & (r4[on4] < 1))
    assert torch.all(r4[~on4] == 0)


def test_sadam_without_eps_stays_finite_on_zero_gradients() -> None:
    # fastai adds eps only when it is non-zero; SAdam's softplus keeps the denominator positive, and before
    # rectification the unused adaptive branch (0/0 when v = 0 and eps = 0) must not leak into the step.
    for beta in (5.0, 0.0):
        w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        z = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = RAdam([w, z], lr=0.1, betas=(0.9, 0.99), eps=0.0, eps_mode="torch", beta=beta)
        steps = 8 if beta > 0 else 5  # beta = 0: only the momentum steps are defined for a zero gradient
        for _ in range(steps):
            w.grad, z.grad = torch.ones(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            opt.step()
        assert torch.isfinite(w).all() and torch.all(w < 1)
        assert torch.equal(z.detach(), torch.zeros(3, dtype=torch.float64))
        assert torch.isfinite(opt.state[z]["exp_avg"]).all()


# --- QHAdam vs qhoptim and fastai -----------------------------------------------------------------------------------

QHOPTIM_CASES = {
    "nus-betas": ({}, {"lr": 1e-2, "nus": (0.7, 1.0), "betas": (0.995, 0.999)}, {"lr": 3e-3}),
    "coupled-wd": (
        {},
        {"lr": 5e-3, "nus": (0.8, 0.9), "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01},
        {"lr": 1e-2, "nus": (0.5, 0.7), "weight_decay": 0.05},
    ),
    "decoupled-wd-eps0": (
        {"decouple_weight_decay": True},
        {"lr": 1e-2, "weight_decay": 0.1, "nus": (0.9, 0.95)},
        {"lr": 2e-2, "eps": 0.0, "nus": (0.6, 0.8)},
    ),
}


@pytest.mark.filterwarnings("ignore:This overload of add_ is deprecated:UserWarning")
@pytest.mark.filterwarnings("ignore:This overload of addcdiv_ is deprecated:UserWarning")
@pytest.mark.parametrize("case", QHOPTIM_CASES)
def test_qhadam_matches_qhoptim(case: str) -> None:
    common, a, b = QHOPTIM_CASES[case]
    result = run_parity(
        lambda gs: qhoptim.QHAdam(torch_groups(gs, a, b), **common),
        lambda gs: QHAdam(torch_groups(gs, a, b), **common),
        QHOPTIM_STATE,
    )
    result.assert_within()


FASTAI_QHADAM_CASES = {
    "defaults": ({"lr": 1e-2}, {"lr": [1e-2, 3e-3]}, ({"lr": 1e-2}, {"lr": 3e-3}), {}),
    "decoupled-wd-nus": (
        {"lr": 1e-2, "mom": 0.99, "sqr_mom": 0.995, "wd": 0.01},
        {"nu_1": [0.9, 0.6], "nu_2": [0.8, 1.0]},
        ({"nus": (0.9, 0.8)}, {"nus": (0.6, 1.0)}),
        {"betas": (0.99, 0.995), "weight_decay": 0.01},
    ),
    "l2": (
        {"lr": 5e-3, "wd": 0.02, "eps": 1e-6, "decouple_wd": False},
        {"mom": [0.9, 0.999]},
        ({"betas": (0.9, 0.999)}, {}),
        {"lr": 5e-3, "eps": 1e-6, "weight_decay": 0.02, "weight_decay_mode": "coupled"},
    ),
}


@pytest.mark.parametrize("case", FASTAI_QHADAM_CASES)
def test_qhadam_matches_fastai_qhadam(case: str) -> None:
    fastai_kwargs, fastai_groups, (a, b), gs_kwargs = FASTAI_QHADAM_CASES[case]
    result = run_parity(
        lambda gs: fastai_set_hypers(fastai_optim.QHAdam(gs, **fastai_kwargs), **fastai_groups),
        lambda gs: get("fastai_qhadam")(torch_groups(gs, a, b), **{"lr": 1e-2, **gs_kwargs}),
        FASTAI_ADAM_STATE,
    )
    result.assert_within()


def test_fastai_qhadam_spec_check_values() -> None:
    # Spec F.3.5: fastai's defaults, lr 0.1, g = [.1, .2, .3]: a step of -0.1 per element, twice.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    opt = get("fastai_qhadam")([w], lr=0.1)
    for expected in ([0.9, 1.9, 2.9], [0.8, 1.8, 2.8]):
        w.grad = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "hypers", "name"),
    [
        (RAdam, {"rectify_threshold": 3.5}, "rectify_threshold"),
        (RAdam, {"beta": -1.0}, "beta"),
        (RAdam, {"eps_mode": "keras"}, "eps_mode"),
        (QHAdam, {"nus": (0.5, 1.5)}, "nus"),
        (QHAdam, {"nus": 0.5}, "nus"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(cls: type, hypers: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **hypers)

"""Parity of gradstep's LBFGS with torch.optim.LBFGS: parameters and every state entry, step by step.

Each run: a scalar, a bias vector, a 2-D and a 4-D float64 parameter (one param group, as LBFGS allows), 60
``step(closure)`` calls (each up to ``max_iter`` iterations: hundreds of iterations in all) on an objective that moves
with the step number (so the runs do not simply converge and stop), both optimizers from the same start. The objective
couples the parameters through their concatenation ``z``: a Rosenbrock-like chain
``sum (a_t - z_k)^2 + b * sum (z_{k+1} - z_k^2)^2``. After every step the parameters are
compared, and every state entry torch keeps (``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``,
``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``) after steps 1-3 and every 10th: counters exactly,
tensors and numbers to 1e-6 relative (``max|a - b| / max|a|``). gradstep does torch's arithmetic in torch's order, so
the runs agree to the bit in practice; the bound leaves room for another BLAS's dot product.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from gradstep import LBFGS
from parity import make_params, relative_difference

SHAPES = ((), (6,), (3, 5), (2, 3, 2, 2))
STEPS = 60
TOL = 1e-6
STATE_KEYS = (
    "func_evals",
    "n_iter",
    "d",
    "t",
    "old_dirs",
    "old_stps",
    "ro",
    "H_diag",
    "prev_flat_grad",
    "prev_loss",
    "al",
)


def objective(params: list[Tensor], t: int, coupling: float) -> Tensor:
    z = torch.cat([p.reshape(-1) for p in params])
    target = 1.0 + 0.3 * math.sin(0.37 * t)
    return ((target - z) ** 2).sum() + coupling * ((z[1:] - z[:-1] ** 2) ** 2).sum()


def _difference(ref: Any, mine: Any, where: str) -> float:
    """Largest relative difference between two state values (tensors, numbers, lists of them, None)."""
    if ref is None or mine is None:
        assert ref is None and mine is None, f"{where}: {ref!r} vs {mine!r}"
        return 0.0
    if isinstance(ref, list):
        assert isinstance(mine, list) and len(mine) == len(ref), f"{where}: lengths {len(ref)} vs {len(mine)}"
        return max((_difference(r, m, f"{where}[{i}]") for i, (r, m) in enumerate(zip(ref, mine))), default=0.0)
    if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(mine, int):
        assert ref == mine, f"{where}: {ref} vs {mine}"
        return 0.0
    a = torch.as_tensor(ref, dtype=torch.float64).detach()
    b = torch.as_tensor(mine, dtype=torch.float64).detach()
    return relative_difference(a, b)


def run(hypers: dict[str, Any], coupling: float, steps: int = STEPS) -> tuple[dict[str, float], int]:
    """Max relative difference per parameter and per state key over the run, and the iterations torch ran."""
    ref_params, gs_params = make_params(SHAPES), make_params(SHAPES)
    initial = [p.detach().clone() for p in gs_params]
    ref, mine = torch.optim.LBFGS(ref_params, **hypers), LBFGS(gs_params, **hypers)
    worst: dict[str, float] = {}
    for t in range(1, steps + 1):
        for opt, params in ((ref, ref_params), (mine, gs_params)):

            def closure(opt: Any = opt, params: list[Tensor] = params, t: int = t) -> Tensor:
                opt.zero_grad()
                loss = objective(params, t, coupling)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert isinstance(loss, Tensor)
        for i, (a, b) in enumerate(zip(ref_params, gs_params)):
            worst[f"param {i} {SHAPES[i]}"] = max(worst.get(f"param {i} {SHAPES[i]}", 0.0), relative_difference(a, b))
        if not (t <= 3 or t % 10 == 0):
            continue  # the state at the first steps and every 10th: a difference persists (the history), so it shows
        ref_state, my_state = ref.state[ref_params[0]], mine.state[gs_params[0]]
        assert set(ref_state) == set(my_state), f"step {t}: keys {sorted(ref_state)} vs {sorted(my_state)}"
        for key in ref_state:
            worst[key] = max(worst.get(key, 0.0), _difference(ref_state[key], my_state[key], f"step {t} {key}"))
    assert set(STATE_KEYS) <= set(worst), f"state never compared: {sorted(set(STATE_KEYS) - set(worst))}"
    moved = min(relative_difference(p, p0) for p, p0 in zip(gs_params, initial))
    assert moved > 1e-2, f"the parameters barely moved ({moved:.2e}): parity proves little"
    return worst, ref.state[ref_params[0]]["n_iter"]


CONFIGS = {
    "fixed step": ({"lr": 0.5, "max_iter": 5, "history_size": 4}, 0.1),
    "strong_wolfe, short history, tolerances": (
        {
            "lr": 1.0,
            "max_iter": 10,
            "history_size": 3,
            "tolerance_grad": 1e-5,
            "tolerance_change": 1e-7,
            "line_search_fn": "strong_wolfe",
        },
        2.0,
    ),
    "strong_wolfe, torch defaults": ({"line_search_fn": "strong_wolfe"}, 2.0),
    "strong_wolfe, max_eval below max_iter": (
        {"lr": 0.8, "max_iter": 8, "max_eval": 6, "history_size": 20, "line_search_fn": "strong_wolfe"},
        2.0,
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_lbfgs_matches_torch_params_and_every_state_entry(name: str) -> None:
    hypers, coupling = CONFIGS[name]
    worst, iterations = run(hypers, coupling)
    assert iterations > 2 * STEPS, "the runs stopped at their first iteration each step: parity proves little"
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"{name}: beyond {TOL:g}: {bad}"


def test_history_is_bounded_and_al_has_history_size_slots() -> None:
    params = make_params(SHAPES)
    opt = LBFGS(params, history_size=3, max_iter=10, line_search_fn="strong_wolfe")
    for t in range(1, 6):

        def closure(t: int = t) -> Tensor:
            opt.zero_grad()
            loss = objective(params, t, 2.0)
            loss.backward()
            return loss

        opt.step(closure)
    state = opt.state[params[0]]
    assert len(state["old_dirs"]) == len(state["old_stps"]) == len(state["ro"]) == 3
    assert len(state["al"]) == 3


def test_refusals_change_nothing_and_name_the_problem() -> None:
    params = make_params(SHAPES)
    opt = LBFGS(params)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="parameter groups"):
        LBFGS([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(ValueError, match="history_size"):
        LBFGS(params, history_size=0)
    before = [p.detach().clone() for p in params]

    def nan_closure() -> Tensor:
        opt.zero_grad()
        loss = objective(params, 1, 1.0) * float("nan")
        loss.backward()
        return loss

    from gradstep.core.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError):
        opt.step(nan_closure)
    assert not opt.state and all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    skipping = LBFGS(params, nonfinite="skip")
    skipping.step(nan_closure)
    assert not skipping.state and all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_a_group_given_as_a_generator_keeps_every_parameter() -> None:
    params = make_params(SHAPES)
    assert LBFGS([{"params": iter(params)}]).param_groups[0]["params"] == params
    assert LBFGS(iter(params)).param_groups[0]["params"] == params


def test_named_parameters_are_accepted_and_named() -> None:
    model = torch.nn.Linear(3, 2).double()
    opt = LBFGS(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="twice"):
        LBFGS([model.weight, model.weight])
    with pytest.raises(TypeError, match="params"):
        LBFGS(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_torch_state_dict_loads_and_resumes_to_the_bit(line_search_fn: str | None) -> None:
    hypers = {"lr": 0.5, "max_iter": 4, "history_size": 3, "line_search_fn": line_search_fn}
    ref_params = make_params(SHAPES)
    ref = torch.optim.LBFGS(ref_params, **hypers)

    def closure_of(opt: Any, params: list[Tensor], t: int) -> Any:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective(params, t, 2.0)
            loss.backward()
            return loss

        return closure

    for t in range(1, 4):
        ref.step(closure_of(ref, ref_params, t))
    params = [p.detach().clone().requires_grad_(True) for p in ref_params]
    mine = LBFGS(params, **hypers)
    mine.load_state_dict(ref.state_dict())
    for t in range(4, 8):
        ref.step(closure_of(ref, ref_params, t))
        mine.step(closure_of(mine, params, t))
    assert all(torch.equal(a, b) for a, b in zip(ref_params, params))
    bad = ref.state_dict()
    bad["state"][0]["d"] = torch.zeros(3)
    before = [v.clone() for v in mine.state[params[0]]["old_dirs"]]
    with pytest.raises(ValueError, match="'d'"):
        mine.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, mine.state[params[0]]["old_dirs"]))


def _trained(hypers: dict[str, Any], steps: int = 3) -> tuple[LBFGS, list[Tensor]]:
    params = make_params(SHAPES)
    opt = LBFGS(params, **hypers)
    for t in range(1, steps + 1):

        def closure(t: int = t) -> Tensor:
            opt.zero_grad()
            loss = objective(params, t, 2.0)
            loss.backward()
            return loss

        opt.step(closure)
    return opt, params


def _snapshot(opt: LBFGS) -> Any:
    return copy.deepcopy((opt.state_dict(), [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_set_hyper_is_validated_and_a_refused_value_changes_nothing() -> None:
    opt = LBFGS(make_params(SHAPES), lr=0.5)
    for name, value in [("lr", float("nan")), ("lr", -1.0), ("history_size", 0), ("line_search_fn", "armijo")]:
        before = dict(opt.param_groups[0])
        with pytest.raises(ValueError, match=name):
            opt.set_hyper(name, value)
        assert opt.param_groups[0] == before
    opt.set_hyper("lr", 0.25)
    opt.set_hyper("line_search_fn", "strong_wolfe")
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["line_search_fn"] == "strong_wolfe"


def test_a_refused_state_dict_leaves_the_optimizer_bitwise_unchanged() -> None:
    """Each entry of torch's mixed state (numbers, 0-d tensors, lists) is checked before anything is written."""
    hypers = {"lr": 0.5, "max_iter": 4, "history_size": 3, "line_search_fn": "strong_wolfe"}
    opt, _ = _trained(hypers)
    source, _ = _trained(hypers, steps=5)
    good = source.state_dict()
    before = _snapshot(opt)
    corruptions: list[tuple[str, str, Any]] = [
        ("t", "t", float("nan")),
        ("H_diag", "H_diag", torch.tensor(float("inf"))),
        ("prev_loss", "prev_loss", "low"),
        ("func_evals", "func_evals", -1),
        ("n_iter", "n_iter", 2.5),
        ("ro", "ro[0]", "x"),
        ("ro", "ro", [torch.tensor(1.0)] * 4),  # longer than history_size
        ("al", "al", [None]),  # shorter than the history
        ("old_dirs", "old_dirs", []),
        ("prev_flat_grad", "prev_flat_grad", None),
    ]
    for key, named, value in corruptions:
        bad = copy.deepcopy(good)
        if named.endswith("[0]"):
            bad["state"][0][key][0] = value
        else:
            bad["state"][0][key] = value
        bad["param_groups"][0]["lr"] = 0.123  # would show if the groups were written first
        with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
            opt.load_state_dict(bad)
        assert _same(_snapshot(opt), before), key
    opt.load_state_dict(good)
    assert _same(opt.state_dict()["state"], good["state"])


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_tensor_lr_of_any_one_element_shape_steps_as_the_number(shape: tuple[int, ...]) -> None:
    hypers = {"max_iter": 4, "history_size": 3}
    number, number_params = _trained({**hypers, "lr": 0.5})
    tensor, tensor_params = _trained({**hypers, "lr": torch.full(shape, 0.5)})
    assert all(torch.equal(a, b) for a, b in zip(number_params, tensor_params))
    with pytest.raises(ValueError, match="lr"):
        LBFGS(make_params(SHAPES), lr=torch.tensor([0.5, 0.5]))


def test_params_none_is_refused_naming_params() -> None:
    with pytest.raises(TypeError, match="params"):
        LBFGS(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        LBFGS(torch.zeros(3, requires_grad=True))


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_complex_parameters_step_as_torchs_to_the_bit(line_search_fn: str | None) -> None:
    """Complex parameters are pairs of reals in the flat vector, as in torch.optim.LBFGS (which supports them)."""
    gen = torch.Generator().manual_seed(3)
    start = [
        torch.randn(4, 3, dtype=torch.complex128, generator=gen),
        torch.randn(5, dtype=torch.float64, generator=gen),
    ]
    sides = []
    for cls in (torch.optim.LBFGS, LBFGS):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = cls(params, lr=0.5, max_iter=5, history_size=4, line_search_fn=line_search_fn)
        for t in range(1, 6):

            def closure(opt: Any = opt, params: list[Tensor] = params, t: int = t) -> Tensor:
                opt.zero_grad()
                z, x = params
                loss = ((z - 1j * t / 5).abs() ** 2).sum() + ((x - z.real[0, :1].sum()) ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        sides.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*sides))
    assert not torch.equal(sides[1][0], start[0])

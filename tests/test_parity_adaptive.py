"""Parity of TAdam, AdaBelief and AdEMAMix with holocron and pytorch_optimizer, parameters and state.

Every run: 200 float64 steps, a scalar, a bias vector, a 2-D weight and a 4-D conv weight dealt into two parameter
groups with different hyperparameters, a fresh deterministic gradient ``sin(3p + t + i) + 0.3p`` computed from each
side's own parameters, the relative difference of every parameter after every step, and that of every state tensor
the original keeps (mapped to gradstep's name) after steps 1-3 and every 10th. Where an original cannot run a case
(holocron TAdam crashes on 0-d parameters), gradstep is compared with a literal float64 per-tensor loop of the
documented math instead.

``run_with_state`` is also used by ``test_parity_adan.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytorch_optimizer
import torch
from torch import Tensor

from gradstep.optim.adaptive import AdaBelief, AdEMAMix
from gradstep.optim.tadam import TAdam
from originals import holocron_optim
from parity import gradient, make_params, relative_difference, split_groups, torch_groups

SHAPES: tuple[tuple[int, ...], ...] = ((), (16,), (8, 16), (4, 3, 3, 3))
"""A scalar, a bias, a 2-D weight and a conv weight; groups: {scalar, 2-D} and {bias, conv}."""

SHAPES_NO_SCALAR: tuple[tuple[int, ...], ...] = ((1,),) + SHAPES[1:]
"""For originals that crash on 0-d parameters: a one-element vector takes the scalar's place."""

TOL = 1e-6
StateMap = dict[str, "str | tuple[str, Callable[[Tensor], Tensor]]"]


# --- the side-by-side runner, with state ---------------------------------------------------------------------------


@dataclass
class StateParity:
    """Largest relative differences seen over a run, on parameters and on each mapped state tensor."""

    params: dict[str, float] = field(default_factory=dict)
    states: dict[str, float] = field(default_factory=dict)
    moved: dict[str, float] = field(default_factory=dict)

    def worst(self) -> tuple[float, float]:
        return max(self.params.values(), default=0.0), max(self.states.values(), default=0.0)

    def report(self) -> str:
        rows = [f"  param {k}: {v:.3e} (moved {self.moved[k]:.3e})" for k, v in self.params.items()]
        rows += [f"  state {k}: {v:.3e}" for k, v in self.states.items()]
        return "\n".join(rows)

    def assert_within(self, tol: float = TOL, min_move: float = 1e-3) -> None:
        bad = {k: v for k, v in {**self.params, **self.states}.items() if not v <= tol}
        assert not bad, f"parity beyond {tol:g}:\n{self.report()}"
        still = {k: v for k, v in self.moved.items() if not v >= min_move}
        assert not still, f"parameters barely moved, parity proves little:\n{self.report()}"


def _note(table: dict[str, float], key: str, value: float) -> None:
    if not value <= table.get(key, 0.0):  # keeps a NaN
        table[key] = value


def run_with_state(
    make_reference: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    make_gradstep: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    state_map: StateMap,
    *,
    ignored: Sequence[str] = (),
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    n_groups: int = 2,
    steps: int = 200,
) -> StateParity:
    """Step both optimizers from the same float64 values; compare parameters after every step, state after steps
    1-3 and every 10th.

    ``state_map`` maps each state key of the original to gradstep's key, or to ``(key, f)`` where the original keeps
    ``f(gradstep's tensor)``. Every tensor the original keeps must be mapped or listed in ``ignored`` (a key the
    original's documented bug owns), so that no state escapes the comparison.
    """
    ref_params, gs_params = make_params(shapes), make_params(shapes)
    initial = [p.detach().clone() for p in gs_params]
    ref_opt = make_reference(split_groups(ref_params, n_groups))
    gs_opt = make_gradstep(split_groups(gs_params, n_groups))
    names = [f"{i}:{tuple(s)}" for i, s in enumerate(shapes)]
    result = StateParity(params=dict.fromkeys(names, 0.0))

    for t in range(1, steps + 1):
        for opt, params in ((ref_opt, ref_params), (gs_opt, gs_params)):

            def closure(params: list[Tensor] = params, t: int = t) -> Tensor:
                for i, p in enumerate(params):
                    p.grad = gradient(p.detach(), t, i)
                return torch.zeros(())

            opt.step(closure)
        for name, ref_p, gs_p in zip(names, ref_params, gs_params):
            _note(result.params, name, relative_difference(ref_p, gs_p))
            if not (t <= 3 or t % 10 == 0):
                continue  # state at the first steps and every 10th: a state error persists (EMAs), so it shows there
            ref_state, gs_state = ref_opt.state[ref_p], gs_opt.state[gs_p]
            kept = {k for k, v in ref_state.items() if isinstance(v, Tensor) and k != "step"}
            unmapped = kept - set(state_map) - set(ignored)
            assert not unmapped, f"state {sorted(unmapped)} of the original is not compared"
            if "step" in ref_state:
                assert float(gs_state["step"]) == float(ref_state["step"]) == t
            for ref_key, target in state_map.items():
                if ref_key not in ref_state:
                    continue
                gs_key, convert = (target, None) if isinstance(target, str) else target
                assert gs_key in gs_state, f"gradstep keeps no {gs_key!r} where the original keeps {ref_key!r}"
                mine = gs_state[gs_key] if convert is None else convert(gs_state[gs_key])
                _note(result.states, f"{name} {ref_key}", relative_difference(ref_state[ref_key], mine))
    result.moved = {n: relative_difference(p, p0) for n, p, p0 in zip(names, gs_params, initial)}
    return result


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one parity run: shared ones and each group's own (in the original's names)."""

    common: dict[str, Any]
    group0: dict[str, Any]
    group1: dict[str, Any]
    gradstep_only: dict[str, Any] = field(default_factory=dict)

    def build(self, cls: Any, groups: list[list[Tensor]], rename: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        per_group = [rename(self.group0), rename(self.group1)][: len(groups)]
        return cls(torch_groups(groups, *per_group), **rename(self.common))


def same(hypers: dict[str, Any]) -> dict[str, Any]:
    return dict(hypers)


# --- TAdam ---------------------------------------------------------------------------------------------------------


class ReferenceTAdam(torch.optim.Optimizer):
    """Holocron's TAdam as a literal float64 per-tensor loop (0-d parameters included, where holocron crashes)."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, dof=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, dof=dof)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                    state["W_t"] = torch.tensor([beta1 / (1 - beta1)], dtype=torch.float64)
                state["step"] += 1
                t = state["step"]
                g = p.grad + wd * p
                m, v, big_w = state["exp_avg"], state["exp_avg_sq"], float(state["W_t"])
                d = p.numel()
                nu = d if group["dof"] is None else group["dof"]
                w = (nu + d) / (nu + float(((g - m) ** 2 / (v + eps)).sum()))
                m.copy_(big_w / (big_w + w) * m + w / (big_w + w) * g)
                state["W_t"] = torch.tensor([big_w * (2 * beta1 - 1) / beta1 + w], dtype=torch.float64)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                second = v
                if group["amsgrad"]:
                    second = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], v)
                denom = torch.sqrt(second / (1 - beta2**t)) + eps
                p.sub_(lr / (1 - beta1**t) * m / denom)
        return loss


TADAM_CONFIGS = {
    "amsgrad-wd-dof2": Config(
        {"amsgrad": True, "weight_decay": 0.01, "dof": 2.0}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}
    ),
    "eps-betas-dof50-per-tensor": Config(
        {"eps": 1e-6, "betas": (0.95, 0.9)},
        {"lr": 2e-2, "dof": 50.0},
        {"lr": 1e-2, "weight_decay": 0.05},
        gradstep_only={"foreach": False},
    ),
    "big-eps-group-amsgrad": Config(
        {"lr": 3e-2, "eps": 1e-4}, {"betas": (0.6, 0.999)}, {"amsgrad": True, "dof": 0.5, "weight_decay": 0.1}
    ),
}
TADAM_STATE = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq", "W_t": "W_t"}


@pytest.mark.parametrize("config", TADAM_CONFIGS.values(), ids=TADAM_CONFIGS.keys())
def test_tadam_matches_holocron_on_params_and_state(config: Config) -> None:
    holocron = holocron_optim()
    result = run_with_state(
        lambda groups: config.build(holocron.TAdam, groups, same),
        lambda groups: config.build(TAdam, groups, lambda h: {**h, **config.gradstep_only}),
        TADAM_STATE,
        shapes=SHAPES_NO_SCALAR,
    )
    result.assert_within()


@pytest.mark.parametrize("config", TADAM_CONFIGS.values(), ids=TADAM_CONFIGS.keys())
def test_tadam_matches_float64_reference_with_a_scalar_parameter(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(ReferenceTAdam, groups, same),
        lambda groups: config.build(TAdam, groups, lambda h: {**h, **config.gradstep_only}),
        TADAM_STATE,
    )
    result.assert_within()


def test_holocron_tadam_cannot_step_a_scalar_parameter_but_gradstep_can() -> None:
    # The reason the scalar case is checked against the float64 reference instead of holocron.
    p, q = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    p.grad, q.grad = torch.tensor(0.5), torch.tensor(0.5)
    with pytest.raises(RuntimeError):
        holocron_optim().TAdam([p], lr=0.1).step()
    opt = TAdam([q], lr=0.1)
    opt.step()
    assert opt.state[q]["W_t"].shape == (1,)
    assert torch.isfinite(q).all() and float(opt.state[q]["exp_avg"]) > 0


def test_tadam_first_steps_follow_the_spec_check_values() -> None:
    # Spec H.4: p=[1,2,3], g=[.1,.2,.3], lr=.1 -> W=8 and p unchanged to 4 decimals after step 1; p ~ 0.9999 after 2.
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    opt = TAdam([w], lr=0.1)
    w.grad = torch.tensor([0.1, 0.2, 0.3])
    opt.step()
    assert float(opt.state[w]["W_t"]) == pytest.approx(8.0)
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([4.8e-9, 9.5e-9, 1.4e-8]), rtol=0.05)
    assert torch.allclose(w.detach(), torch.tensor([1.0, 2.0, 3.0]), atol=5e-5)
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.9999, 1.9999, 2.9999]), atol=5e-5)


def test_tadam_rejects_beta1_zero_and_a_non_positive_dof() -> None:
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="betas"):
        TAdam([w], betas=(0.0, 0.999))
    with pytest.raises(ValueError, match="dof"):
        TAdam([w], dof=0.0)


# --- AdaBelief -----------------------------------------------------------------------------------------------------


ADABELIEF_HOLOCRON_CONFIGS = {
    "amsgrad-wd": Config(
        {"amsgrad": True, "weight_decay": 0.01, "eps": 1e-8}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}
    ),
    "eps-betas-per-tensor": Config(
        {"eps": 1e-6, "betas": (0.95, 0.9)},
        {"lr": 2e-2},
        {"lr": 1e-2, "weight_decay": 0.05},
        gradstep_only={"foreach": False},
    ),
    "tiny-eps-group-amsgrad": Config(
        {"lr": 3e-2, "eps": 1e-10}, {"betas": (0.5, 0.999)}, {"amsgrad": True, "weight_decay": 0.1}
    ),
}
# holocron: no eps inside s, coupled L2, and its eps default (1e-8) where a config leaves eps out.
HOLOCRON_ADABELIEF = {"eps": 1e-8, "eps_in_belief": False, "weight_decay_mode": "coupled"}


@pytest.mark.parametrize("config", ADABELIEF_HOLOCRON_CONFIGS.values(), ids=ADABELIEF_HOLOCRON_CONFIGS.keys())
def test_adabelief_matches_holocron_on_params_and_state(config: Config) -> None:
    holocron = holocron_optim()
    result = run_with_state(
        lambda groups: config.build(holocron.AdaBelief, groups, same),
        lambda groups: AdaBelief(
            torch_groups(groups, config.group0, config.group1),
            **{**HOLOCRON_ADABELIEF, **config.common, **config.gradstep_only},
        ),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_var", "max_exp_avg_sq": "max_exp_avg_var"},
    )
    result.assert_within()


ADABELIEF_PTO_CONFIGS = {
    "ams-bound-decoupled": Config(
        {"ams_bound": True, "weight_decay": 0.1}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}
    ),
    "coupled-and-decoupled-groups-per-tensor": Config(
        {"eps": 1e-8, "betas": (0.95, 0.9)},
        {"lr": 2e-2, "weight_decouple": False, "weight_decay": 0.01},
        {"lr": 1e-2, "weight_decay": 0.05},
        gradstep_only={"foreach": False},
    ),
    "maximize-group-ams-bound": Config(
        {"lr": 3e-2, "maximize": True}, {"betas": (0.5, 0.999), "eps": 1e-12}, {"ams_bound": True}
    ),
}


def from_pto(hypers: dict[str, Any]) -> dict[str, Any]:
    """pytorch_optimizer's names to gradstep's: ams_bound -> amsgrad, weight_decouple -> weight_decay_mode."""
    out = dict(hypers)
    if "ams_bound" in out:
        out["amsgrad"] = out.pop("ams_bound")
    if "weight_decouple" in out:
        out["weight_decay_mode"] = "decoupled" if out.pop("weight_decouple") else "coupled"
    return out


@pytest.mark.parametrize("config", ADABELIEF_PTO_CONFIGS.values(), ids=ADABELIEF_PTO_CONFIGS.keys())
def test_adabelief_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.AdaBelief, groups, same),
        lambda groups: config.build(AdaBelief, groups, lambda h: {**from_pto(h), **config.gradstep_only}),
        {"exp_avg": "exp_avg", "exp_avg_var": "exp_avg_var", "max_exp_avg_var": "max_exp_avg_var"},
    )
    result.assert_within()


def test_adabelief_holocron_recipe_gives_the_spec_check_value() -> None:
    # Spec H.5: p=[1,2,3], g=[.1,.2,.3], lr=.1, holocron's math: step 1 -> p - 0.1/0.9 (sqrt(s_hat) = 0.9|g|).
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = AdaBelief([w], lr=0.1, **HOLOCRON_ADABELIEF)
    w.grad = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) - 0.1 / 0.9, atol=1e-7)


def test_adabelief_eps_in_belief_adds_eps_to_the_state_every_step() -> None:
    # With a zero gradient the residual is 0, so s is exactly the accumulated eps: eps * sum(beta2^k).
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = AdaBelief([w], betas=(0.9, 0.5), eps=1e-3)
    for _ in range(3):
        w.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
    expected = 1e-3 * (1 + 0.5 + 0.25)
    assert torch.allclose(opt.state[w]["exp_avg_var"], torch.full((3,), expected, dtype=torch.float64))
    off = AdaBelief([w], betas=(0.9, 0.5), eps=1e-3, eps_in_belief=False)
    w.grad = torch.zeros(3, dtype=torch.float64)
    off.step()
    assert torch.count_nonzero(off.state[w]["exp_avg_var"]) == 0


# --- AdEMAMix ------------------------------------------------------------------------------------------------------


ADEMAMIX_HOLOCRON_CONFIGS = {
    "wd-groups": Config({"weight_decay": 0.01}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99, 0.999)}),
    "alpha-eps-per-tensor": Config(
        {"alpha": 2.0, "eps": 1e-6},
        {"lr": 2e-2, "weight_decay": 0.05},
        {"lr": 1e-2, "betas": (0.95, 0.9, 0.99)},
        gradstep_only={"foreach": False},
    ),
    "fast-betas-group-alpha": Config({"lr": 3e-2, "betas": (0.5, 0.99, 0.9)}, {"alpha": 8.0}, {"eps": 1e-10}),
}
ADEMAMIX_STATE = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "exp_avg_slow": "exp_avg_slow"}


@pytest.mark.parametrize("config", ADEMAMIX_HOLOCRON_CONFIGS.values(), ids=ADEMAMIX_HOLOCRON_CONFIGS.keys())
def test_ademamix_matches_holocron_on_params_and_state(config: Config) -> None:
    holocron = holocron_optim()
    result = run_with_state(
        lambda groups: config.build(holocron.AdEMAMix, groups, same),
        lambda groups: config.build(AdEMAMix, groups, lambda h: {**h, **config.gradstep_only}),
        ADEMAMIX_STATE,
    )
    result.assert_within()


ADEMAMIX_PTO_CONFIGS = {
    "warmup-50-decoupled": Config(
        {"t_alpha_beta3": 50, "weight_decay": 0.1, "weight_decouple": True},
        {"lr": 1e-2},
        {"lr": 5e-3, "betas": (0.8, 0.99, 0.999)},
    ),
    "group-warmup-300-per-tensor": Config(
        {"alpha": 2.0},
        {"lr": 2e-2, "t_alpha_beta3": 300},
        {"lr": 1e-2, "weight_decay": 0.05},
        gradstep_only={"foreach": False},
    ),
    "maximize-fractional-warmup": Config(
        {"lr": 3e-2, "maximize": True, "t_alpha_beta3": 120.5},
        {"betas": (0.5, 0.99, 0.9)},
        {"eps": 1e-10, "weight_decay": 0.01},
    ),
}


@pytest.mark.parametrize("config", ADEMAMIX_PTO_CONFIGS.values(), ids=ADEMAMIX_PTO_CONFIGS.keys())
def test_ademamix_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.AdEMAMix, groups, same),
        lambda groups: config.build(AdEMAMix, groups, lambda h: {**from_pto(h), **config.gradstep_only}),
        ADEMAMIX_STATE,
    )
    result.assert_within()


def test_ademamix_warmup_schedules_reach_alpha_and_beta3_at_the_horizon() -> None:
    # The paper's schedulers: alpha_t linear to alpha at T; beta3_t from beta1 (t=0) to beta3 (t=T), capped after.
    from gradstep.optim.adaptive import ScaleByAdEMAMix

    steps = torch.tensor([0.0, 25.0, 50.0, 80.0], dtype=torch.float64)
    alpha_t, beta3_t = ScaleByAdEMAMix.schedules(steps, 4.0, 0.9, 0.999, 50)
    assert alpha_t.tolist() == pytest.approx([0.0, 2.0, 4.0, 4.0])
    assert beta3_t[0] == pytest.approx(0.9) and beta3_t[2] == pytest.approx(0.999) and beta3_t[3] == 0.999
    # Halfway in t, the half-life 1/ln(beta) is halfway between those of beta1 and beta3.
    half_life = -1 / math.log(float(beta3_t[1]))
    assert half_life == pytest.approx(0.5 * (-1 / math.log(0.9)) + 0.5 * (-1 / math.log(0.999)))
    assert ScaleByAdEMAMix.schedules(steps, 4.0, 0.9, 0.999, None) == (4.0, 0.999)


def test_ademamix_rejects_a_warmup_with_zero_betas() -> None:
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="betas"):
        AdEMAMix([w], betas=(0.0, 0.999, 0.9999), t_alpha_beta3=10)
    AdEMAMix([w], betas=(0.0, 0.999, 0.9999))  # without warm-up, beta1 = 0 is fine
    with pytest.raises(ValueError, match="t_alpha_beta3"):
        AdEMAMix([w], t_alpha_beta3=0)


# --- the multi-tensor path equals the per-tensor reference ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "hypers"),
    [
        (TAdam, {"lr": 2e-2, "betas": (0.8, 0.99), "weight_decay": 0.01, "amsgrad": True, "dof": 3.0}),
        (AdaBelief, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
        (AdEMAMix, {"lr": 1e-2, "alpha": 3.0, "t_alpha_beta3": 20, "weight_decay": 0.02}),
    ],
    ids=["tadam", "adabelief", "ademamix"],
)
def test_foreach_and_per_tensor_paths_agree_in_float32(cls: Any, hypers: dict[str, Any]) -> None:
    results = []
    for foreach in (True, False):
        params = make_params(SHAPES, dtype=torch.float32)
        opt = cls(torch_groups(split_groups(params), {}, {"lr": hypers["lr"] / 2}), foreach=foreach, **hypers)
        for t in range(1, 31):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert relative_difference(a, b) <= 1e-6


def test_adabelief_complex_parameter_matches_pytorch_optimizer() -> None:
    # Both treat a complex tensor as pairs of reals (pytorch_optimizer through view_as_real).
    start = torch.polar(
        torch.linspace(0.5, 1.5, 6, dtype=torch.float64), torch.linspace(0.0, 3.0, 6, dtype=torch.float64)
    )
    theirs, mine = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    pto_opt = pytorch_optimizer.AdaBelief([theirs], lr=1e-2, weight_decay=0.05, ams_bound=True)
    gs_opt = AdaBelief([mine], lr=1e-2, weight_decay=0.05, amsgrad=True)
    for t in range(1, 51):
        for p, opt in ((theirs, pto_opt), (mine, gs_opt)):
            p.grad = torch.sin(p.detach() + t) + 0.3 * p.detach()
            opt.step()
    assert relative_difference(torch.view_as_real(theirs), torch.view_as_real(mine)) <= 1e-6
    assert relative_difference(torch.view_as_real(mine), torch.view_as_real(start)) >= 1e-3

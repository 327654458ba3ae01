"""Parity of Lion, ADOPT, MARS, LaProp, StableAdamW and cautious updates with their originals, parameters and state.

Every run (``run_with_state``): 200 float64 steps, a scalar, a bias vector, a 2-D weight and a 4-D conv weight dealt
into two parameter groups with different hyperparameters, a fresh deterministic gradient computed from each side's
own parameters, the relative difference of every parameter after every step and of every state tensor the original
keeps. Each algorithm is held to its installed original (lion-pytorch, pytorch_optimizer, torch-optimi) and, where
the issue asks for it, to a float64 reference written below from the paper and the authors' code.

Every original compared here computes in the parameters' dtype (float64), so the bound is 1e-6 throughout.
pytorch_optimizer's LaProp is run on its per-parameter path: its foreach path computes the step sizes in float32 even
for float64 parameters (``test_laprop_foreach_path_of_pytorch_optimizer_rounds_step_sizes_to_float32`` bounds that).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lion_pytorch
import optimi
import pytest
import pytorch_optimizer
import torch
from torch import Tensor

import gradstep
from gradstep.core.cautious import Cautious
from gradstep.optim.adam_variants import ADOPT, LaProp
from gradstep.optim.lion import Lion
from gradstep.optim.mars import MARS
from gradstep.optim.stable import StableAdamW
from parity import relative_difference
from test_parity_adaptive import TOL, Config, run_with_state, same

# --- float64 references, literal per-tensor loops of the papers' algorithms ---------------------------------------


class _Reference(torch.optim.Optimizer):
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1
                    self.step_param(group, p, p.grad, state, state["step"])
        return loss

    def step_param(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], t: int) -> None:
        raise NotImplementedError


class ReferenceADOPT(_Reference):
    """Taniguchi et al. (2024), Algorithm 2 as the authors' code writes it (the first step only sets v = g^2)."""

    def __init__(
        self,
        params: Any,
        lr=1e-3,
        betas=(0.9, 0.9999),
        eps=1e-6,
        weight_decay=0.0,
        decouple=False,
        clip_lambda: Callable[[int], float] | None = lambda t: t**0.25,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple))
        self.clip_lambda = clip_lambda

    def step_param(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], t: int) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if t == 1:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        if wd != 0:
            if group["decouple"]:
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
        if t == 1:
            state["exp_avg_sq"] = g * g
            return
        normed = g / torch.clamp(torch.sqrt(state["exp_avg_sq"]), min=group["eps"])
        if self.clip_lambda is not None:
            c = self.clip_lambda(t)
            normed = torch.clamp(normed, -c, c)
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * normed
        p.sub_(lr * state["exp_avg"])
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g


class ReferenceMARS(_Reference):
    """Yuan et al. (2024), MARS-AdamW as the authors' code writes it, with AdamW for 1-D parameters."""

    def __init__(
        self,
        params: Any,
        lr=3e-3,
        betas=(0.95, 0.99),
        gamma=0.025,
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        optimize_1d=False,
        lr_1d=3e-3,
        betas_1d=(0.9, 0.95),
        weight_decay_1d=0.1,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            optimize_1d=optimize_1d,
            lr_1d_factor=lr_1d / lr,
            betas_1d=betas_1d,
            weight_decay_1d=weight_decay_1d,
        )
        super().__init__(params, defaults)

    def step_param(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], t: int) -> None:
        if t == 1:
            for key in ("exp_avg", "exp_avg_sq", "last_grad") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                state[key] = torch.zeros_like(p)
        mars = group["optimize_1d"] or p.dim() >= 2
        beta1, beta2 = group["betas"] if mars else group["betas_1d"]
        lr = group["lr"] if mars else group["lr"] * group["lr_1d_factor"]
        p.mul_(1 - lr * (group["weight_decay"] if mars else group["weight_decay_1d"]))
        x = g
        if mars:
            x = g + group["gamma"] * beta1 / (1 - beta1) * (g - state["last_grad"])
            norm = torch.linalg.vector_norm(x)
            x = x / norm if norm > 1 else x
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * x
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * x * x
        second = state["exp_avg_sq"]
        if group["amsgrad"]:
            second = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], second)
        denom = torch.sqrt(second / (1 - beta2**t)) + group["eps"]
        p.sub_(lr * state["exp_avg"] / (1 - beta1**t) / denom)
        state["last_grad"] = g.clone()


class ReferenceLaProp(_Reference):
    """Ziyin et al. (2020), Algorithm 1 with the lr inside the momentum (the official code), AdamW's decay."""

    def __init__(
        self,
        params: Any,
        lr=4e-4,
        betas=(0.9, 0.999),
        eps=1e-15,
        weight_decay=0.0,
        centered=False,
        steps_before_using_centered=10,
        amsgrad=False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            centered=centered,
            steps_before_using_centered=steps_before_using_centered,
            amsgrad=amsgrad,
        )
        super().__init__(params, defaults)

    def step_param(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], t: int) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if t == 1:
            state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), lr_avg=0.0)
            if group["centered"]:
                state["exp_mean_avg_beta2"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        second = state["exp_avg_sq"]
        if group["centered"]:
            state["exp_mean_avg_beta2"] = beta2 * state["exp_mean_avg_beta2"] + (1 - beta2) * g
            if t > group["steps_before_using_centered"]:
                second = second - state["exp_mean_avg_beta2"] ** 2
        if group["amsgrad"]:
            second = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], second)
        denom = torch.sqrt(second / (1 - beta2**t)) + group["eps"]
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * lr * g / denom
        state["lr_avg"] = beta1 * state["lr_avg"] + (1 - beta1) * lr
        p.mul_(1 - lr * group["weight_decay"])
        p.sub_(lr * state["exp_avg"] / state["lr_avg"])


class ReferenceCautiousAdamW(_Reference):
    """Liang et al. (2024), C-AdamW: AdamW's update masked where it disagrees with the gradient, rescaled."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step_param(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], t: int) -> None:
        beta1, beta2 = group["betas"]
        if t == 1:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        u = (state["exp_avg"] / (1 - beta1**t)) / (torch.sqrt(state["exp_avg_sq"] / (1 - beta2**t)) + group["eps"])
        mask = (u * g > 0).to(g.dtype)
        u = u * mask * (mask.numel() / (mask.sum() + 1))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(group["lr"] * u)


# --- Lion ----------------------------------------------------------------------------------------------------------

LION_CONFIGS = {
    "wd-groups": Config({"weight_decay": 0.1}, {"lr": 3e-3}, {"lr": 1e-3, "betas": (0.8, 0.95)}),
    "betas-per-tensor": Config(
        {"betas": (0.95, 0.98)}, {"lr": 5e-3, "weight_decay": 0.5}, {"lr": 2e-3}, gradstep_only={"foreach": False}
    ),
    "slow-momentum-group-decay": Config({"lr": 1e-2, "betas": (0.5, 0.999)}, {}, {"weight_decay": 1.0}),
}


@pytest.mark.parametrize("config", LION_CONFIGS.values(), ids=LION_CONFIGS.keys())
def test_lion_matches_lion_pytorch_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(lion_pytorch.Lion, groups, same),
        lambda groups: config.build(Lion, groups, lambda h: {**h, **config.gradstep_only}),
        {"exp_avg": "exp_avg"},
    )
    result.assert_within(TOL)


def test_lion_decoupled_weight_decay_of_lion_pytorch_is_weight_decay_over_the_initial_lr() -> None:
    # lion-pytorch's decoupled_weight_decay=True decays by lr / lr_0 * wd: gradstep's weight_decay = wd / lr_0.
    result = run_with_state(
        lambda groups: lion_pytorch.Lion(
            [{"params": groups[0]}, {"params": groups[1], "lr": 1e-3}],
            lr=3e-3,
            weight_decay=3e-4,
            decoupled_weight_decay=True,
        ),
        lambda groups: Lion([{"params": groups[0]}, {"params": groups[1], "lr": 1e-3}], lr=3e-3, weight_decay=0.1),
        {"exp_avg": "exp_avg"},
    )
    result.assert_within(TOL)


# --- ADOPT ---------------------------------------------------------------------------------------------------------

ADOPT_CONFIGS = {
    "coupled-wd-groups": Config({"weight_decay": 0.01}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}),
    "decoupled-eps-per-tensor": Config(
        {"eps": 1e-3, "betas": (0.95, 0.9), "weight_decouple": True},
        {"lr": 2e-2, "weight_decay": 0.1},
        {"lr": 1e-2},
        gradstep_only={"foreach": False},
    ),
    "no-clip-slow-v": Config({"lr": 3e-2, "clip_exponent": None}, {"betas": (0.5, 0.999)}, {"eps": 1e-8}),
    "clip-0.4-maximize": Config({"clip_exponent": 0.4, "maximize": True}, {"lr": 1e-2}, {"lr": 2e-2, "eps": 1e-2}),
}


def _adopt_reference_names(hypers: dict[str, Any]) -> dict[str, Any]:
    out = dict(hypers)
    if "clip_exponent" in out:
        exponent = out.pop("clip_exponent")
        out["clip_lambda"] = None if exponent is None else (lambda t, e=exponent: math.pow(t, e))
    return out


def _adopt_pto(hypers: dict[str, Any]) -> dict[str, Any]:
    return _adopt_reference_names(hypers)


def _adopt_authors(hypers: dict[str, Any]) -> dict[str, Any]:
    out = _adopt_reference_names(hypers)
    if "weight_decouple" in out:
        out["decouple"] = out.pop("weight_decouple")
    return out


def _adopt_gradstep(config: Config) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def rename(hypers: dict[str, Any]) -> dict[str, Any]:
        out = dict(hypers)
        if "weight_decouple" in out:
            out["weight_decay_mode"] = "decoupled" if out.pop("weight_decouple") else "coupled"
        return {**out, **config.gradstep_only}

    return rename


@pytest.mark.parametrize("config", ADOPT_CONFIGS.values(), ids=ADOPT_CONFIGS.keys())
def test_adopt_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.ADOPT, groups, _adopt_pto),
        lambda groups: config.build(ADOPT, groups, _adopt_gradstep(config)),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    )
    result.assert_within(TOL)


@pytest.mark.parametrize(
    "config",
    [c for k, c in ADOPT_CONFIGS.items() if "maximize" not in k],
    ids=[k for k in ADOPT_CONFIGS if "max" not in k],
)
def test_adopt_matches_the_float64_reference_of_the_paper(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(ReferenceADOPT, groups, _adopt_authors),
        lambda groups: config.build(ADOPT, groups, _adopt_gradstep(config)),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    )
    result.assert_within(TOL)


def test_adopt_first_step_only_sets_the_second_moment() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = ADOPT([w], lr=0.1)
    w.grad = torch.tensor([0.5, 3.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.equal(opt.state[w]["exp_avg_sq"], w.grad * w.grad)
    assert not opt.state[w]["exp_avg"].any()
    # Step 2: g / sqrt(v) = 1, within the clip 2**0.25: m = 0.1 * g/|g|.
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.99, -2.01], dtype=torch.float64))


# --- MARS ----------------------------------------------------------------------------------------------------------

MARS_CONFIGS = {
    "wd-groups-ams-default-lr-1d": Config(
        {"lr": 1e-2, "weight_decay": 0.02, "amsgrad": True},
        {},
        {"lr": 5e-3, "betas": (0.9, 0.98), "gamma": 0.1},
    ),
    "optimize-1d-per-tensor": Config(
        {"optimize_1d": True, "eps": 1e-6},
        {"lr": 2e-2, "weight_decay": 0.1},
        {"lr": 1e-2, "gamma": 0.0},
        gradstep_only={"foreach": False},
    ),
    "betas-1d-wd-1d": Config(
        {"lr": 3e-2, "lr_1d": 1e-2, "betas_1d": (0.8, 0.9), "weight_decay_1d": 0.3},
        {"betas": (0.8, 0.999)},
        {"gamma": 0.5, "weight_decay": 0.05},
    ),
}
MARS_STATE = {
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "last_grad": "last_grad",
    "max_exp_avg_sq": "max_exp_avg_sq",
}


def _mars_gradstep(config: Config, **extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda hypers: {**hypers, **config.gradstep_only, **extra}


def _mars_pto(hypers: dict[str, Any]) -> dict[str, Any]:
    out = dict(hypers)
    if "amsgrad" in out:
        out["ams_bound"] = out.pop("amsgrad")
    return out


@pytest.mark.parametrize("config", MARS_CONFIGS.values(), ids=MARS_CONFIGS.keys())
def test_mars_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.MARS, groups, _mars_pto),
        lambda groups: config.build(MARS, groups, _mars_gradstep(config, eps_mode="tf")),
        MARS_STATE,
    )
    result.assert_within(TOL)


@pytest.mark.parametrize("config", MARS_CONFIGS.values(), ids=MARS_CONFIGS.keys())
def test_mars_matches_the_float64_reference_of_the_authors(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(ReferenceMARS, groups, same),
        lambda groups: config.build(MARS, groups, _mars_gradstep(config)),
        MARS_STATE,
    )
    result.assert_within(TOL)


def test_mars_corrected_gradient_is_clipped_to_unit_norm() -> None:
    # gamma = 0 makes c = g: a 2-D gradient of norm 5 enters the moments as g / 5.
    w = torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    opt = MARS([w], lr=0.1, gamma=0.0, betas=(0.5, 0.5))
    w.grad = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    opt.step()
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([[0.3, 0.4]], dtype=torch.float64))
    assert torch.equal(opt.state[w]["last_grad"], w.grad)


# --- LaProp --------------------------------------------------------------------------------------------------------

LAPROP_CONFIGS = {
    "groups-eps": Config({"eps": 1e-8}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}),
    "centered-ams-per-tensor": Config(
        {"centered": True, "steps_before_using_centered": 5},
        {"lr": 2e-2, "ams_bound": True},
        {"lr": 1e-2, "betas": (0.95, 0.9)},
        gradstep_only={"foreach": False},
    ),
    "maximize-ams-big-eps": Config(
        {"lr": 3e-2, "maximize": True, "ams_bound": True}, {"betas": (0.5, 0.999), "eps": 1e-3}, {}
    ),
}
LAPROP_STATE = {
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "exp_mean_avg_beta2": "exp_mean_avg_beta2",
    "max_exp_avg_sq": "max_exp_avg_sq",
}


def _laprop_gradstep(config: Config, **extra: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def rename(hypers: dict[str, Any]) -> dict[str, Any]:
        out = dict(hypers)
        if "ams_bound" in out:
            out["amsgrad"] = out.pop("ams_bound")
        return {**out, **config.gradstep_only, **extra}

    return rename


@pytest.mark.parametrize("config", LAPROP_CONFIGS.values(), ids=LAPROP_CONFIGS.keys())
def test_laprop_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    def reference(groups: list[list[Tensor]]) -> torch.optim.Optimizer:
        common = dict(config.common)
        steps_before = common.pop("steps_before_using_centered", 10)
        built = Config(common, config.group0, config.group1)
        return built.build(
            lambda g, **h: pytorch_optimizer.LaProp(g, steps_before_using_centered=steps_before, foreach=False, **h),
            groups,
            same,
        )

    result = run_with_state(
        reference, lambda groups: config.build(LaProp, groups, _laprop_gradstep(config, eps_mode="tf")), LAPROP_STATE
    )
    result.assert_within(TOL)


LAPROP_REFERENCE_CONFIGS = {
    "wd-groups": Config({"weight_decay": 0.05, "eps": 1e-8}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}),
    "centered-ams-per-tensor": LAPROP_CONFIGS["centered-ams-per-tensor"],
    "group-wd-big-eps": Config({"lr": 3e-2}, {"betas": (0.5, 0.999), "eps": 1e-3}, {"weight_decay": 0.2}),
}


@pytest.mark.parametrize("config", LAPROP_REFERENCE_CONFIGS.values(), ids=LAPROP_REFERENCE_CONFIGS.keys())
def test_laprop_matches_the_float64_reference_of_the_paper(config: Config) -> None:
    def rename(hypers: dict[str, Any]) -> dict[str, Any]:
        out = dict(hypers)
        if "ams_bound" in out:
            out["amsgrad"] = out.pop("ams_bound")
        return out

    result = run_with_state(
        lambda groups: config.build(ReferenceLaProp, groups, rename),
        lambda groups: config.build(LaProp, groups, _laprop_gradstep(config)),
        LAPROP_STATE,
    )
    result.assert_within(TOL)


def test_laprop_foreach_path_of_pytorch_optimizer_rounds_step_sizes_to_float32() -> None:
    # Its step sizes lr / a_t are float32 numbers (relative error <= 2**-24 each); over 200 steps the parameters stay
    # within a few hundred float32 roundings of gradstep's float64 run, far above float64 rounding.
    config = LAPROP_CONFIGS["groups-eps"]
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.LaProp, groups, same),
        lambda groups: config.build(LaProp, groups, _laprop_gradstep(config, eps_mode="tf")),
        LAPROP_STATE,
    )
    params, _ = result.worst()
    assert params <= 200 * 2.0**-24, result.report()


# --- StableAdamW ---------------------------------------------------------------------------------------------------

STABLE_CONFIGS = {
    "wd-groups": Config({"lr": 1e-2, "weight_decay": 0.05}, {}, {"lr": 5e-3, "betas": (0.8, 0.99)}),
    "clipping-per-tensor": Config(
        {"lr": 2e-2, "betas": (0.5, 0.999), "eps": 1e-8},
        {"weight_decay": 0.0},
        {"lr": 1e-2, "weight_decay": 0.2},
        gradstep_only={"foreach": False},
    ),
    "big-eps-fast-betas": Config({"lr": 3e-2, "eps": 1e-2}, {"betas": (0.9, 0.9)}, {"betas": (0.7, 0.95)}),
}


def _optimi_names(hypers: dict[str, Any]) -> dict[str, Any]:
    out = dict(hypers)
    if "betas" in out:
        out["beta1"], out["beta2"] = out.pop("betas")
    return out


@pytest.mark.parametrize("config", STABLE_CONFIGS.values(), ids=STABLE_CONFIGS.keys())
def test_stableadamw_matches_optimi_on_params_and_state(config: Config) -> None:
    def reference(groups: list[list[Tensor]]) -> torch.optim.Optimizer:
        common = dict(config.common)
        per_group = [_optimi_names(config.group0), _optimi_names(config.group1)]
        return optimi.StableAdamW([{"params": g, **h} for g, h in zip(groups, per_group)], **common)

    result = run_with_state(
        reference,
        lambda groups: config.build(StableAdamW, groups, lambda h: {**h, **config.gradstep_only}),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
        ignored=("eps_sq",),  # eps ** 2, a constant gradstep reads from the group
    )
    result.assert_within(TOL)


def test_stableadamw_clips_the_step_by_the_update_rms() -> None:
    # Step 2 with a gradient 10x the first: v = (0.01 g1^2 ... ) so the RMS > 1 and the step shrinks by it.
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = StableAdamW([w], lr=1.0, betas=(0.0, 0.5), weight_decay=0.0, eps=0.0)
    w.grad = torch.full((4,), 1.0, dtype=torch.float64)
    opt.step()
    w.grad = torch.full((4,), 10.0, dtype=torch.float64)
    before = w.detach().clone()
    opt.step()
    # v = (1/3) 1 + (2/3) 100 = 67; RMS = sqrt(100 / 67); step = lr / RMS * 10 / sqrt(67) = 1.
    v = 1 / 3 + 2 / 3 * 100
    expected = 10 / math.sqrt(v) / math.sqrt(100 / v)
    assert torch.allclose(before - w.detach(), torch.full((4,), expected, dtype=torch.float64))


# --- Cautious ------------------------------------------------------------------------------------------------------

CAUTIOUS_PTO = {
    "lion-decoupled": (pytorch_optimizer.Lion, Lion, Config({"weight_decay": 0.1}, {"lr": 3e-3}, {"lr": 1e-3})),
    "lion-coupled": (
        pytorch_optimizer.Lion,
        Lion,
        Config({"weight_decay": 0.05, "weight_decouple": False}, {"lr": 5e-3}, {"betas": (0.8, 0.95)}),
    ),
    "adopt": (pytorch_optimizer.ADOPT, ADOPT, ADOPT_CONFIGS["coupled-wd-groups"]),
    "mars": (
        pytorch_optimizer.MARS,
        MARS,
        # lr_1d = lr and equal decays: the AdamW side's direction holds no decay term (see MARS's warning)
        Config({"lr": 1e-2, "weight_decay": 0.05, "weight_decay_1d": 0.05, "lr_1d": 1e-2}, {}, {"gamma": 0.1}),
    ),
    "laprop": (pytorch_optimizer.LaProp, LaProp, LAPROP_CONFIGS["groups-eps"]),
}
CAUTIOUS_STATE = {**MARS_STATE, **LAPROP_STATE}
# pytorch_optimizer's AdEMAMix(cautious=True) is not among them: it masks the fast EMA alone, before adding the slow
# one, where gradstep masks the whole step (docs/differences.md).


def _gradstep_names(hypers: dict[str, Any]) -> dict[str, Any]:
    out = dict(hypers)
    if "weight_decouple" in out:
        out["weight_decay_mode"] = "decoupled" if out.pop("weight_decouple") else "coupled"
    if "ams_bound" in out:
        out["amsgrad"] = out.pop("ams_bound")
    return out


@pytest.mark.parametrize("case", CAUTIOUS_PTO.values(), ids=CAUTIOUS_PTO.keys())
def test_cautious_matches_pytorch_optimizer_cautious_variants(case: tuple[Any, Any, Config]) -> None:
    reference, mine, config = case
    extra = {"eps_mode": "tf"} if mine in (MARS, LaProp) else {}
    result = run_with_state(
        lambda groups: config.build(lambda g, **h: reference(g, cautious=True, **h), groups, same),
        lambda groups: config.build(mine, groups, lambda h: {**_gradstep_names(h), **extra, "cautious": True}),
        CAUTIOUS_STATE,
    )
    result.assert_within(TOL)


CAUTIOUS_ADAMW = {
    "groups": Config({"weight_decay": 0.05}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.8, 0.99)}),
    "per-tensor": Config(
        {"eps": 1e-6}, {"lr": 2e-2}, {"lr": 1e-2, "weight_decay": 0.2}, gradstep_only={"foreach": False}
    ),
    "fast-betas": Config({"lr": 3e-2, "betas": (0.5, 0.9)}, {}, {"weight_decay": 0.0}),
}


@pytest.mark.parametrize("config", CAUTIOUS_ADAMW.values(), ids=CAUTIOUS_ADAMW.keys())
def test_cautious_adamw_matches_the_float64_reference_of_the_paper(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(ReferenceCautiousAdamW, groups, same),
        lambda groups: config.build(gradstep.AdamW, groups, lambda h: {**h, **config.gradstep_only, "cautious": True}),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    )
    result.assert_within(TOL)


def test_cautious_is_one_transform_at_the_end_of_any_chain_and_a_group_can_opt_out() -> None:
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = gradstep.LAMB([{"params": [w]}, {"params": [b], "cautious": False}], lr=0.1, cautious=True)
    assert isinstance(opt.transforms[-1], Cautious) and sum(isinstance(t, Cautious) for t in opt.transforms) == 1
    assert [g["cautious"] for g in opt.param_groups] == [True, False]
    plain = gradstep.LAMB([torch.nn.Parameter(torch.ones(3))], lr=0.1, cautious=False)
    assert not any(isinstance(t, Cautious) for t in plain.transforms) and "cautious" not in plain.defaults
    built = gradstep.chain(
        [torch.nn.Parameter(torch.ones(3))], gradstep.transforms.Momentum(), Cautious(), momentum=0.9
    )
    assert built.defaults["cautious"] is True
    with pytest.raises(ValueError, match="cautious"):
        gradstep.AdamW([torch.nn.Parameter(torch.ones(3))], cautious="yes")


def test_cautious_zeroes_disagreeing_components_and_rescales_the_rest() -> None:
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = gradstep.SGD([w], lr=1.0, momentum=0.9, cautious=True)
    w.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((4,), -0.8, dtype=torch.float64))  # all agree: 4 / (4 + 1)
    w.grad = torch.tensor([-0.5, -0.5, 1.0, 1.0], dtype=torch.float64)  # buffer [0.4, 0.4, 1.9, 1.9]
    opt.step()
    expected = torch.tensor([-0.8, -0.8, -0.8 - 1.9 * 4 / 3, -0.8 - 1.9 * 4 / 3], dtype=torch.float64)
    assert torch.allclose(w.detach(), expected)


def test_laprop_lr_average_matches_pytorch_optimizer_exp_avg_lr_1_under_a_changing_lr() -> None:
    # pytorch_optimizer keeps the EMA of the lr as a Python float (run_with_state compares tensors only): here it is
    # compared by hand, with an lr that changes every step, which is where the EMA differs from lr * (1 - beta1^t).
    params = [torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_(True) for _ in range(2)]
    ref = pytorch_optimizer.LaProp([params[0]], lr=1e-2, betas=(0.8, 0.99), foreach=False)
    mine = LaProp([params[1]], lr=1e-2, betas=(0.8, 0.99), eps_mode="tf")
    for t in range(1, 31):
        for opt, p in ((ref, params[0]), (mine, params[1])):
            opt.param_groups[0]["lr"] = 1e-2 * (1 + 0.5 * math.sin(t))
            p.grad = torch.sin(3 * p.detach() + t)
            opt.step()
        assert float(mine.state[params[1]]["exp_avg_lr_1"]) == pytest.approx(
            ref.state[params[0]]["exp_avg_lr_1"], rel=1e-12
        )
    assert relative_difference(params[0], params[1]) <= TOL

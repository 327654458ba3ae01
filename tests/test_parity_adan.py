"""Parity of Adan with pytorch_optimizer (the official formulation), holocron (where its bugs do not act) and a float64
reference of the documented math (everything the originals cannot check).

holocron's Adan never updates its previous gradient (so its delta is g itself) and decays twice (coupled L2 plus the
proximal division). Neither bug acts when ``betas[1] = 0`` and ``weight_decay = 0``: delta then reaches only holocron's
``exp_avg_sq`` (its EMA of differences) and ``prev_grad``, which are the two states left out of that comparison.
pytorch_optimizer crashes on 0-d parameters when clipping (``max_grad_norm > 0``) and clips over all groups together,
so clipping is compared with it on one group without a scalar, and with the float64 reference on two groups with one.
Its ``maximize`` gets the first step's gradient difference wrong (2g instead of 0): maximize is checked against the
reference only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import torch

from gradstep.optim.adan import Adan
from originals import holocron_optim
from parity import gradient, make_params, relative_difference, split_groups, torch_groups
from test_parity_adaptive import SHAPES_NO_SCALAR, Config, from_pto, run_with_state, same

ADAN_STATE = {"exp_avg": "exp_avg", "exp_avg_diff": "exp_avg_diff", "exp_avg_sq": "exp_avg_sq"}


def pto_names(hypers: dict[str, Any]) -> dict[str, Any]:
    """pytorch_optimizer's ``weight_decouple`` is gradstep's decoupled mode; without it, Adan decays proximally."""
    out = from_pto(hypers)
    if out.get("weight_decay_mode") == "coupled":
        out["weight_decay_mode"] = "proximal"
    return out


# --- pytorch_optimizer ---------------------------------------------------------------------------------------------


PTO_CONFIGS = {
    "proximal-groups": Config(
        {"weight_decay": 0.02}, {"lr": 1e-2}, {"lr": 5e-3, "weight_decay": 0.1, "betas": (0.9, 0.9, 0.95)}
    ),
    "decoupled-per-tensor": Config(
        {"weight_decouple": True, "weight_decay": 0.05, "eps": 1e-6},
        {"lr": 2e-2},
        {"lr": 1e-2, "betas": (0.5, 0.7, 0.999)},
        gradstep_only={"foreach": False},
    ),
    "fast-betas-mixed-decay": Config(
        {"lr": 3e-2},
        {"betas": (0.8, 0.99, 0.9)},
        {"weight_decay": 0.01, "weight_decouple": True},
    ),
}


@pytest.mark.parametrize("config", PTO_CONFIGS.values(), ids=PTO_CONFIGS.keys())
def test_adan_matches_pytorch_optimizer_on_params_and_state(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(pytorch_optimizer.Adan, groups, same),
        lambda groups: config.build(Adan, groups, lambda h: {**pto_names(h), **config.gradstep_only}),
        # pytorch_optimizer keeps the negated previous gradient.
        {**ADAN_STATE, "previous_grad": ("prev_grad", torch.neg)},
    )
    result.assert_within()


def _float64_squared_global_norm(param_groups: Any, device: Any = None, **_: Any) -> torch.Tensor:
    """pytorch_optimizer's ``get_global_gradient_norm`` without its float32 cast: the squared global norm in float64."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    return torch.stack([g.double().square().sum() for g in grads]).sum().reshape(1)


CLIPPING = Config({"lr": 1e-2, "max_grad_norm": 3.0, "weight_decay": 0.02}, {}, {})
CLIPPING_STEPS = 200


def _clipping_run() -> Any:
    # The gradients' global norm (about 11 at the start) stays above max_grad_norm: clipping acts on every step.
    return run_with_state(
        lambda groups: CLIPPING.build(pytorch_optimizer.Adan, groups, same),
        lambda groups: CLIPPING.build(Adan, groups, same),
        {**ADAN_STATE, "previous_grad": ("prev_grad", torch.neg)},
        shapes=SHAPES_NO_SCALAR,
        n_groups=1,
        steps=CLIPPING_STEPS,
    )


def test_adan_gradient_clipping_matches_pytorch_optimizer_on_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytorch_optimizer casts the per-tensor norms to float32 before it squares and sums them. With that one cast
    # replaced by float64 the formula is compared to float64 rounding, on parameters and every state tensor; the
    # cast's own effect is bounded in the next test.
    monkeypatch.setattr(pytorch_optimizer.optimizer.adan, "get_global_gradient_norm", _float64_squared_global_norm)
    _clipping_run().assert_within()


def test_adan_gradient_clipping_with_pytorch_optimizers_float32_norm_within_float32_rounding() -> None:
    # Unpatched, each step's clipping factor carries the float32 rounding of the norm: a cast of each of the 4 norms,
    # a square, 3 additions, a square root, the eps addition and the division, at most 8 roundings of u = 2^-24 each,
    # and which way each one rounds depends on the CPU's float64 reductions (SIMD width, threads). A step moves a
    # parameter by lr * |d| <= 1e-2 * 3 (the Adan direction stays below 3 here), a relative change of the factor by
    # 8u moves that step by at most twice as much, and parameters stay within [-1.5, 1.5]: over 200 steps the
    # parameters' relative difference is at most 200 * 2 * 3e-2 * 8u < 6e-6 on any machine, while a wrong clipping
    # formula (no square root, clipping off, the norm of one tensor) differs by more than 1e-3. Single-element state
    # tensors are left out here: their relative difference is unbounded where an element crosses zero.
    unit_roundoff = 2.0**-24
    bound = CLIPPING_STEPS * 2 * 3e-2 * 8 * unit_roundoff
    result = _clipping_run()
    worst = max(result.params.values())
    assert worst <= bound, result.report()
    assert min(result.moved.values()) >= 1e-3, result.report()


# --- holocron, where its bugs do not act -----------------------------------------------------------------------------


HOLOCRON_CONFIGS = {
    "groups-betas": Config({"betas": (0.98, 0.0, 0.99)}, {"lr": 1e-2}, {"lr": 5e-3, "betas": (0.9, 0.0, 0.9)}),
    "amsgrad-eps-per-tensor": Config(
        {"amsgrad": True, "eps": 1e-6},
        {"lr": 2e-2, "betas": (0.5, 0.0, 0.999)},
        {"lr": 1e-2, "betas": (0.95, 0.0, 0.95)},
        gradstep_only={"foreach": False},
    ),
    "group-amsgrad": Config({"lr": 3e-2, "betas": (0.7, 0.0, 0.9)}, {"amsgrad": True}, {"eps": 1e-10}),
}


@pytest.mark.parametrize("config", HOLOCRON_CONFIGS.values(), ids=HOLOCRON_CONFIGS.keys())
def test_adan_matches_holocron_where_its_bugs_do_not_act(config: Config) -> None:
    # weight_decay stays 0; proximal mode (gradstep's default) then does nothing, as holocron's double decay.
    holocron = holocron_optim()
    result = run_with_state(
        lambda groups: config.build(holocron.Adan, groups, same),
        lambda groups: config.build(Adan, groups, lambda h: {**h, **config.gradstep_only}),
        {"exp_avg": "exp_avg", "exp_avg_delta": "exp_avg_sq", "max_exp_avg_delta": "max_exp_avg_sq"},
        ignored=("exp_avg_sq", "prev_grad"),  # holocron's EMA of g - 0 and its never-updated previous gradient
    )
    result.assert_within()


def test_holocron_adan_bug_acts_outside_that_regime() -> None:
    # Why the holocron comparison needs betas[1] = 0: with the default betas, its frozen prev_grad changes the steps.
    holocron = holocron_optim()
    ref, mine = make_params(), make_params()
    ref_opt, gs_opt = holocron.Adan(ref, lr=1e-2), Adan(mine, lr=1e-2)
    for t in range(1, 11):
        for params, opt in ((ref, ref_opt), (mine, gs_opt)):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
    assert all(torch.count_nonzero(ref_opt.state[p]["prev_grad"]) == 0 for p in ref)
    assert all(torch.equal(gs_opt.state[p]["prev_grad"], p.grad) for p in mine)
    assert max(relative_difference(a, b) for a, b in zip(ref, mine)) > 1e-4


# --- float64 reference of the documented math -----------------------------------------------------------------------


class ReferenceAdan(torch.optim.Optimizer):
    """Adan as documented (gradstep's docstring), as a literal float64 loop: per-group clipping, amsgrad, all three
    weight-decay modes."""

    def __init__(
        self,
        params: Any,
        lr=1e-3,
        betas=(0.98, 0.92, 0.99),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        max_grad_norm=0.0,
        weight_decay_mode="proximal",
        maximize=False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            max_grad_norm=max_grad_norm,
            weight_decay_mode=weight_decay_mode,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps, wd, mode = group["lr"], group["eps"], group["weight_decay"], group["weight_decay_mode"]
            params = group["params"]
            grads = [-p.grad if group["maximize"] else p.grad.clone() for p in params]
            if mode == "coupled":
                grads = [g + wd * p for g, p in zip(grads, params)]
            if group["max_grad_norm"] > 0:
                norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
                grads = [g * min(1.0, group["max_grad_norm"] / (norm + eps)) for g in grads]
            for p, g in zip(params, grads):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for name in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"):
                        state[name] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                delta = torch.zeros_like(g) if t == 1 else g - state["prev_grad"]
                m = state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
                v = state["exp_avg_diff"] = beta2 * state["exp_avg_diff"] + (1 - beta2) * delta
                n = state["exp_avg_sq"] = beta3 * state["exp_avg_sq"] + (1 - beta3) * (g + beta2 * delta) ** 2
                second = n
                if group["amsgrad"]:
                    second = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], n)
                denom = torch.sqrt(second / (1 - beta3**t)) + eps
                q = (m / (1 - beta1**t) + beta2 * v / (1 - beta2**t)) / denom
                if mode == "decoupled":
                    p.mul_(1 - lr * wd)
                p.sub_(lr * q)
                if mode == "proximal":
                    p.div_(1 + lr * wd)
                state["prev_grad"] = g.clone()
        return loss


REFERENCE_CONFIGS = {
    "amsgrad-group-clip-mixed-decay": Config(
        {"amsgrad": True, "weight_decay": 0.02},
        {"lr": 1e-2, "max_grad_norm": 3.0},
        {"lr": 5e-3, "betas": (0.9, 0.9, 0.95), "weight_decay_mode": "decoupled"},
    ),
    "coupled-clip-per-tensor": Config(
        {"weight_decay_mode": "coupled", "weight_decay": 0.05, "max_grad_norm": 2.0},
        {"lr": 2e-2},
        {"lr": 1e-2, "amsgrad": True},
        gradstep_only={"foreach": False},
    ),
    "maximize-tight-clip-proximal": Config(
        {"lr": 3e-2, "betas": (0.5, 0.7, 0.999), "eps": 1e-6, "maximize": True},
        {"max_grad_norm": 0.5},
        {"weight_decay": 0.1},
    ),
}


@pytest.mark.parametrize("config", REFERENCE_CONFIGS.values(), ids=REFERENCE_CONFIGS.keys())
def test_adan_matches_float64_reference_of_the_documented_math(config: Config) -> None:
    result = run_with_state(
        lambda groups: config.build(ReferenceAdan, groups, same),
        lambda groups: config.build(Adan, groups, lambda h: {**h, **config.gradstep_only}),
        {**ADAN_STATE, "prev_grad": "prev_grad", "max_exp_avg_sq": "max_exp_avg_sq"},
    )
    result.assert_within()


def test_adan_maximize_has_no_gradient_difference_on_the_first_step_unlike_pytorch_optimizer() -> None:
    # pytorch_optimizer stores -g as the previous gradient before negating g for maximize, so its first delta is 2g:
    # that is why maximize is checked against the float64 reference, not against it.
    mine, theirs = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gs_opt, pto_opt = Adan([mine], lr=0.1, maximize=True), pytorch_optimizer.Adan([theirs], lr=0.1, maximize=True)
    for p, opt in ((mine, gs_opt), (theirs, pto_opt)):
        p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        opt.step()
    assert torch.count_nonzero(gs_opt.state[mine]["exp_avg_diff"]) == 0
    assert torch.count_nonzero(pto_opt.state[theirs]["exp_avg_diff"]) == 3


def test_adan_first_step_has_no_gradient_difference() -> None:
    # Official Adan: delta_1 = 0, so v stays 0 and n = (1 - beta3) g^2 after the first step.
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = Adan([w], lr=0.1, betas=(0.9, 0.8, 0.7))
    g = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    state = opt.state[w]
    assert torch.count_nonzero(state["exp_avg_diff"]) == 0
    assert torch.allclose(state["exp_avg_sq"], 0.3 * g * g)
    assert torch.equal(state["prev_grad"], g)
    # m_hat = g and n_hat = g^2: the first step is lr * sign(g) (up to eps).
    assert torch.allclose(w.detach(), torch.tensor([0.9, 1.9, 2.9], dtype=torch.float64))


def test_adan_clipping_scales_the_whole_group_by_one_factor() -> None:
    # Two tensors with norms 3 and 4 (global norm 5), max_grad_norm 1: both gradients enter the moments scaled by 1/5.
    a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = Adan([a, b], max_grad_norm=1.0, eps=0.0)
    a.grad, b.grad = torch.tensor([3.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    opt.step()
    assert float(opt.state[a]["prev_grad"]) == pytest.approx(0.6)
    assert float(opt.state[b]["prev_grad"]) == pytest.approx(0.8)
    assert float(a.grad) == 3.0  # the user's gradient is untouched


def test_adan_foreach_and_per_tensor_paths_agree_in_float32() -> None:
    hypers = {"lr": 1e-2, "betas": (0.9, 0.9, 0.95), "weight_decay": 0.02, "amsgrad": True, "max_grad_norm": 5.0}
    results = []
    for foreach in (True, False):
        params = make_params(dtype=torch.float32)
        opt = Adan(torch_groups(split_groups(params), {}, {"lr": 5e-3}), foreach=foreach, **hypers)
        for t in range(1, 31):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert relative_difference(a, b) <= 1e-6


def test_adan_complex_parameter_matches_pytorch_optimizer() -> None:
    # Both treat a complex tensor as pairs of reals (pytorch_optimizer through view_as_real).
    start = torch.polar(
        torch.linspace(0.5, 1.5, 6, dtype=torch.float64), torch.linspace(0.0, 3.0, 6, dtype=torch.float64)
    )
    theirs, mine = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    pto_opt = pytorch_optimizer.Adan([theirs], lr=1e-2, weight_decay=0.05, max_grad_norm=1.0)
    gs_opt = Adan([mine], lr=1e-2, weight_decay=0.05, max_grad_norm=1.0)
    for t in range(1, 51):
        for p, opt in ((theirs, pto_opt), (mine, gs_opt)):
            p.grad = torch.sin(p.detach() + t) + 0.3 * p.detach()
            opt.step()
    assert relative_difference(torch.view_as_real(theirs), torch.view_as_real(mine)) <= 1e-6
    assert relative_difference(torch.view_as_real(mine), torch.view_as_real(start)) >= 1e-3

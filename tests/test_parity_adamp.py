"""Parity of gradstep's AdamP with clovaai's ``adamp.AdamP`` and with holocron's ``AdamP``.

clovaai's AdamP is the reference implementation of the paper: gradstep's default configuration is held to it
everywhere, with gradients chosen so that every branch of the projection runs (channel-wise, layer-wise, none).

holocron's AdamP tests the *signed* cosine, a bug that gradstep does not reproduce: a gradient anti-aligned with the
weight (``cos <= -delta / sqrt(numel)``) is projected by holocron and not by gradstep. So holocron's recipe
(``weight_decay_mode="coupled", channel_wise=False, project_all=True``) is compared with holocron in a regime where
every cosine is non-negative (the test checks it), and with :class:`AdamPReference` (a literal float64 loop of the
documented math, itself held to clovaai) under a gradient whose cosines take both signs.

All runs: 200 float64 steps, a scalar, a bias vector, a 2-D weight and a 4-D conv weight in two groups with different
hyperparameters, each side fed a gradient of its own current parameters (``parity.py``); relative difference
<= 1e-6 on the parameters after every step and on every state tensor the original keeps at the end.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import adamp
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradstep.optim.adamp import AdamP
from originals import holocron_optim
from parity import gradient, relative_difference, run_side_by_side, torch_groups

TOL = 1e-6
SHAPES = ((), (16,), (8, 16), (4, 3, 3, 3))  # dealt round-robin: group 0 gets () and (8, 16), group 1 the others
Config = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # shared hypers, group 0, group 1


# --- gradients ------------------------------------------------------------------------------------------------------
def _without_radial(h: Tensor, p: Tensor, rows: bool) -> Tensor:
    """``h`` minus its component along ``p`` (along each row ``p[i]`` when ``rows``; a zero row has none)."""
    n = p.shape[0] if rows else 1
    hr, pr = h.reshape(n, -1), p.reshape(n, -1)
    square = (pr * pr).sum(1, keepdim=True)
    coef = torch.where(square > 0, (hr * pr).sum(1, keepdim=True) / square.clamp_min(1e-300), 0.0)
    return (hr - coef * pr).reshape(p.shape)


def cycling_gradient(p: Tensor, t: int, index: int) -> Tensor:
    """A gradient that drives clovaai's projection through its three branches in turn (for ``ndim > 1``).

    ``t % 3 == 0``: every row orthogonal to its weight row (channel-wise projection); ``1``: rows strongly aligned,
    half of them positively and half negatively, then made orthogonal to the whole tensor (channel test fails,
    layer-wise projection); ``2``: aligned with the weight (no projection). Vectors and scalars get the plain one.
    """
    h = gradient(p, t, index)
    if p.dim() <= 1:
        return h
    if t % 3 == 0:
        return _without_radial(h, p, rows=True)
    if t % 3 == 1:
        signs = torch.tensor([(-1.0) ** i for i in range(p.shape[0])], dtype=p.dtype).reshape(-1, *[1] * (p.dim() - 1))
        return _without_radial(_without_radial(h, p, rows=True) + 2.0 * signs * p, p, rows=False)
    return h + 2.0 * p


def aligned_gradient(p: Tensor, t: int, index: int) -> Tensor:
    """Orthogonal to the whole tensor plus a varying non-negative multiple of it: every cosine is >= 0."""
    h = gradient(p, t, index)
    c = 0.04 * (1 + math.sin(0.7 * t + index))
    return (_without_radial(h, p, rows=False) if p.dim() > 0 else 0 * h) + c * p


# --- the documented math, literally ---------------------------------------------------------------------------------
class AdamPReference:
    """gradstep's documented AdamP (``gradstep.optim.adamp`` module docstring), one tensor and one row at a time."""

    defaults: dict[str, Any] = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "delta": 0.1,
        "wd_ratio": 0.1,
        "nesterov": False,
        "amsgrad": False,
        "channel_wise": True,
        "project_all": False,
        "weight_decay_mode": "decoupled_wd_ratio",
    }

    def __init__(self, groups: list[dict[str, Any]], **hypers: Any) -> None:
        self.param_groups = [{**self.defaults, **hypers, **g} for g in groups]
        self.state: dict[Tensor, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        mode = group["weight_decay_mode"]
        state = self.state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        state["step"] += 1
        t = state["step"]
        g = p.grad + wd * p if mode == "coupled" else p.grad.clone()
        m = state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * g
        v = state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
        if group["amsgrad"]:
            v = state["max_exp_avg_sq"] = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        numerator = b1 * m + (1 - b1) * g if group["nesterov"] else m
        q = numerator / (v.sqrt() / math.sqrt(1 - b2**t) + eps) / (1 - b1**t)

        def cosine(x: Tensor, y: Tensor) -> float:
            return abs(float((x * y).sum())) / (max(float(x.norm()), eps) * max(float(y.norm()), eps))

        projected = False
        if p.numel() and (p.dim() > 1 or group["project_all"]):
            limit_row = group["delta"] / math.sqrt(p[0].numel()) if p.dim() > 0 else 0.0
            if group["channel_wise"] and p.dim() > 1 and max(cosine(g[i], p[i]) for i in range(len(p))) < limit_row:
                for i in range(len(p)):
                    unit = p[i] / (p[i].norm() + eps)
                    q[i] -= (unit * q[i]).sum() * unit
                projected = True
            elif cosine(g, p) < group["delta"] / math.sqrt(p.numel()):
                unit = p / (p.norm() + eps)
                q -= (unit * q).sum() * unit
                projected = True
        if mode == "decoupled_wd_ratio":
            p.mul_(1 - lr * wd * (group["wd_ratio"] if projected else 1.0))
        elif mode == "decoupled":
            p.mul_(1 - lr * wd)
        p.sub_(lr * q)


# --- runners --------------------------------------------------------------------------------------------------------
def run(
    make_original: Callable[[list[dict[str, Any]]], Any],
    make_gradstep: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    config: Config,
    grad_fn: Callable[[Tensor, int, int], Tensor],
    state_keys: tuple[str, ...],
) -> None:
    """Run both sides 200 steps; assert parameter parity at every step and state parity at the end."""
    shared, g0, g1 = config
    built: dict[str, Any] = {}

    def original(groups: list[list[Tensor]]) -> Any:
        built["original"] = make_original(torch_groups(groups, {**shared, **g0}, {**shared, **g1}))
        return built["original"]

    def ours(groups: list[list[Tensor]]) -> torch.optim.Optimizer:
        built["gradstep"] = make_gradstep(torch_groups(groups, {**shared, **g0}, {**shared, **g1}))
        return built["gradstep"]

    result = run_side_by_side(original, ours, shapes=SHAPES, grad_fn=grad_fn)
    result.assert_within(TOL)
    assert_same_state(built["original"], built["gradstep"], state_keys)


def assert_same_state(original: Any, ours: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    for og, gg in zip(original.param_groups, ours.param_groups):
        for po, pg in zip(og["params"], gg["params"]):
            so, sg = original.state[po], ours.state[pg]
            for key in keys:
                if key not in so:
                    assert key not in sg, f"gradstep keeps {key}, the original does not"
                    continue
                if key == "step":
                    assert float(sg["step"]) == float(so["step"])
                else:
                    d = relative_difference(so[key], sg[key])
                    assert d <= TOL, f"state {key} of a {tuple(po.shape)} parameter: rel diff {d:.2e}"


def counting_clovaai(counts: Counter[str]) -> Callable[[list[dict[str, Any]]], Any]:
    """clovaai's AdamP, counting which branch of its projection each tested tensor takes."""

    def make(groups: list[dict[str, Any]]) -> Any:
        opt = adamp.AdamP(groups)
        projection = opt._projection

        def spy(p: Tensor, grad: Tensor, perturb: Tensor, delta: float, wd_ratio: float, eps: float) -> Any:
            rows = F.cosine_similarity(grad.view(len(p), -1), p.view(len(p), -1), dim=1, eps=eps).abs()
            layer = F.cosine_similarity(grad.view(1, -1), p.view(1, -1), dim=1, eps=eps).abs()
            if rows.max() < delta / math.sqrt(p[0].numel()):
                counts["channel"] += 1
            elif layer.max() < delta / math.sqrt(p.numel()):
                counts["layer"] += 1
            else:
                counts["none"] += 1
            return projection(p, grad, perturb, delta, wd_ratio, eps)

        opt._projection = spy
        return opt

    return make


# --- clovaai --------------------------------------------------------------------------------------------------------
CLOVAAI_STATE = ("step", "exp_avg", "exp_avg_sq")
CLOVAAI_CONFIGS: dict[str, tuple[Config, Callable[[Tensor, int, int], Tensor]]] = {
    # delta and wd_ratio differ per group, nesterov in one group only
    "wd-nesterov-group": (
        (
            {"eps": 1e-6},
            {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.05},
            {"lr": 5e-3, "weight_decay": 0.1, "delta": 0.5, "wd_ratio": 0.5, "nesterov": True},
        ),
        gradient,
    ),
    # every branch of the projection runs (checked), wd_ratio 0 turns the decay off where projected
    "branches": (
        (
            {"weight_decay": 0.02},
            {"lr": 2e-2, "delta": 0.1, "wd_ratio": 0.2},
            {"lr": 1e-2, "nesterov": True, "delta": 0.2, "wd_ratio": 0.0, "eps": 1e-4},
        ),
        cycling_gradient,
    ),
    # large deltas (projection most of the time), large eps, one group without decay
    "large-delta-eps": (
        (
            {"nesterov": True},
            {"lr": 3e-3, "betas": (0.5, 0.9), "eps": 1e-3, "delta": 1.5},
            {"lr": 1e-2, "weight_decay": 0.2, "delta": 3.0, "wd_ratio": 0.05, "nesterov": False},
        ),
        gradient,
    ),
}


# The per-tensor path (foreach=False) is held to clovaai on the configuration that runs every branch.
@pytest.mark.parametrize(
    ("name", "foreach"),
    [(name, True) for name in CLOVAAI_CONFIGS] + [("branches", False)],
    ids=lambda v: ("foreach" if v else "per_tensor") if isinstance(v, bool) else v,
)
def test_adamp_matches_clovaai(name: str, foreach: bool) -> None:
    config, grad_fn = CLOVAAI_CONFIGS[name]
    counts: Counter[str] = Counter()
    run(counting_clovaai(counts), lambda groups: AdamP(groups, foreach=foreach), config, grad_fn, CLOVAAI_STATE)
    assert counts["channel"] + counts["layer"] > 0, f"no projection happened: {counts}"
    if name == "branches":
        assert min(counts["channel"], counts["layer"], counts["none"]) > 0, counts


def test_reference_matches_clovaai_on_every_branch() -> None:
    # The literal reference used below for holocron's recipe is itself held to the original.
    config, grad_fn = CLOVAAI_CONFIGS["branches"]
    run(lambda groups: adamp.AdamP(groups), AdamPReference, config, grad_fn, CLOVAAI_STATE)


def test_zero_weights_and_zero_gradients_follow_clovaai() -> None:
    # cos(0, .) = 0, so a zero weight or a zero gradient is "projected" (with a zero unit vector: the step is
    # unchanged, but the decay is scaled by wd_ratio), exactly as clovaai's eps-clamped cosine decides.
    def zero_then_cycling(p: Tensor, t: int, index: int) -> Tensor:
        return torch.zeros_like(p) if t % 4 == 0 else cycling_gradient(p, t, index)

    def start_at_zero(make: Callable[[list[dict[str, Any]]], Any]) -> Callable[[list[dict[str, Any]]], Any]:
        def build(groups: list[dict[str, Any]]) -> Any:
            with torch.no_grad():
                groups[0]["params"][1].zero_()  # the (8, 16) weight
            return make(groups)

        return build

    counts: Counter[str] = Counter()
    config: Config = ({"weight_decay": 0.1, "wd_ratio": 0.3}, {"lr": 1e-2}, {"lr": 2e-2})
    run(start_at_zero(counting_clovaai(counts)), start_at_zero(AdamP), config, zero_then_cycling, CLOVAAI_STATE)
    assert counts["channel"] > 0


# --- holocron -------------------------------------------------------------------------------------------------------
HOLOCRON_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
HOLOCRON_RECIPE = {"weight_decay_mode": "coupled", "channel_wise": False, "project_all": True}
HOLOCRON_CONFIGS: dict[str, Config] = {
    "wd-amsgrad-group": (
        {"delta": 0.1},
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01},
        {"lr": 5e-3, "amsgrad": True},
    ),
    "amsgrad-wd-eps": (
        {"delta": 0.5},
        {"lr": 2e-2, "betas": (0.9, 0.95), "amsgrad": True, "weight_decay": 0.05},
        {"lr": 1e-3, "eps": 1e-4},
    ),
    "large-delta": (
        {"delta": 1.0},
        {"lr": 5e-3, "weight_decay": 0.1},
        {"lr": 1e-2, "betas": (0.7, 0.9), "amsgrad": True},
    ),
}


def holocron(counts: Counter[str], monkeypatch: pytest.MonkeyPatch) -> Callable[[list[dict[str, Any]]], Any]:
    """holocron's AdamP (``delta`` is one value for the optimizer), counting the outcomes of its signed test."""
    cls = holocron_optim().AdamP
    module = sys.modules[cls.__module__]
    functional = module.adamp

    def spy(params: list[Tensor], grads: list[Tensor], *args: Any) -> None:
        weight_decay, delta = args[-3], args[-1]
        for p, g in zip(params, grads):
            cos = float(F.cosine_similarity(p.view(1, -1), (g + weight_decay * p).view(1, -1)))
            limit = delta / math.sqrt(p.numel())
            counts["anti-aligned" if cos <= -limit else "projected" if cos < limit else "kept"] += 1
        functional(params, grads, *args)

    monkeypatch.setattr(module, "adamp", spy)

    def make(groups: list[dict[str, Any]]) -> Any:
        delta = groups[0].pop("delta")
        for g in groups[1:]:
            assert g.pop("delta") == delta
        return cls(groups, delta=delta)

    return make


@pytest.mark.parametrize("name", list(HOLOCRON_CONFIGS))
def test_holocron_recipe_matches_holocron_where_cosines_are_non_negative(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts: Counter[str] = Counter()
    config = HOLOCRON_CONFIGS[name]
    run(holocron(counts, monkeypatch), lambda g: AdamP(g, **HOLOCRON_RECIPE), config, aligned_gradient, HOLOCRON_STATE)
    assert counts["anti-aligned"] == 0, "the regime must keep holocron's signed test equal to |cos|"
    assert counts["projected"] > 0 and counts["kept"] > 0, counts


@pytest.mark.parametrize("name", list(HOLOCRON_CONFIGS))
def test_holocron_recipe_matches_reference_with_cosines_of_both_signs(name: str) -> None:
    config = HOLOCRON_CONFIGS[name]
    run(
        lambda groups: AdamPReference(groups, **HOLOCRON_RECIPE),
        lambda groups: AdamP(groups, **HOLOCRON_RECIPE),
        config,
        gradient,
        HOLOCRON_STATE,
    )


def test_holocron_signed_cosine_bug_is_not_reproduced() -> None:
    # spec H.6: p = [1, 1, 1, 1], g = -p: holocron projects (cos = -1 < 0.05) and the step vanishes; |cos| = 1 keeps it.
    p_holo, p_ours = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    opt_holo = holocron_optim().AdamP([p_holo], lr=0.1)
    opt_ours = AdamP([p_ours], lr=0.1, **HOLOCRON_RECIPE)
    for p, opt in ((p_holo, opt_holo), (p_ours, opt_ours)):
        p.grad = -torch.ones(4)
        opt.step()
    assert torch.allclose(p_holo.detach(), torch.ones(4), atol=1e-6)
    assert torch.allclose(p_ours.detach(), torch.full((4,), 1.1), atol=1e-6)


def test_holocron_check_value_tangent_gradient() -> None:
    # spec H.6 check value: cos = 0, so the step is projected, but q is already tangent: p - 0.1 * sign(g).
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    AdamP([p], lr=0.1, **HOLOCRON_RECIPE).step()
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0, -0.1], [0.1, 1.0]], dtype=torch.float64))


def test_gradient_anti_aligned_with_weight_differs_between_holocron_and_reference() -> None:
    # The premise of the reference comparison: under the plain gradient holocron's signed test does act.
    config = HOLOCRON_CONFIGS["large-delta"]
    shared, g0, g1 = config
    result = run_side_by_side(
        lambda groups: holocron_optim().AdamP(torch_groups(groups, {**g0}, {**g1}), delta=shared["delta"]),
        lambda groups: AdamPReference(torch_groups(groups, {**shared, **g0}, {**shared, **g1}), **HOLOCRON_RECIPE),
        shapes=SHAPES,
    )
    assert result.max_diff > 1e-3, result.table()


# --- options --------------------------------------------------------------------------------------------------------
def test_wd_ratio_scales_decoupled_decay_only_where_projected() -> None:
    # One step from m = v = 0: q = g / (|g| + eps) elementwise; a tangent gradient is projected (q stays tangent).
    p = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([[-4.0, 3.0]], dtype=torch.float64)
    AdamP([p], lr=0.1, eps=0.0, weight_decay=0.5, wd_ratio=0.2).step()
    q = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    unit = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    q = q - (q * unit).sum() * unit
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64) * (1 - 0.1 * 0.5 * 0.2) - 0.1 * q
    torch.testing.assert_close(p.detach(), expected)


def test_vectors_are_not_projected_unless_project_all() -> None:
    def step(**options: Any) -> Tensor:
        p = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
        p.grad = torch.tensor([-4.0, 3.0], dtype=torch.float64)  # orthogonal: |cos| = 0
        AdamP([p], lr=0.1, eps=0.0, **options).step()
        return p.detach()

    plain = step()
    torch.testing.assert_close(plain, torch.tensor([3.1, 3.9], dtype=torch.float64))  # Adam's sign-like first step
    projected = step(project_all=True)
    radial = (projected - torch.tensor([3.0, 4.0], dtype=torch.float64)) @ torch.tensor([0.6, 0.8], dtype=torch.float64)
    assert abs(float(radial)) < 1e-12 and not torch.allclose(projected, plain)

"""NeroPlus against ALF's algorithm, transcribed literally (ALF itself is not installable).

:class:`AlfNeroPlus` is ALF's ``alf/optimizers/nero_plus.py`` (spec A.3) written as a plain per-tensor float64 loop:
construction checks, eager state, the step, ``_normalize`` and ``initialize``. gradstep's NeroPlus is run beside it
for 200 float64 steps on a scalar, a bias vector, a 2-D weight and a 4-D conv weight in two groups with different
hyperparameters and per-parameter ``opt_args`` (each side fed a gradient of its own current parameters, see
``parity.py``), and must agree within 1e-6 (relative) on the parameters after every step and on every state tensor.

One ALF behaviour is not reproduced (spec A.3, [QUIRK]): ALF gives 0-D parameters the group's constraints and ignores
their ``opt_args``, so a scalar is held at ``|p| = max_norm``. gradstep applies the 1-D rule to them. The parity runs
give the scalar ``opt_args`` equal to the group's constraints (the documented way to get ALF's behaviour back), and
:class:`AlfNeroPlus` can apply the 1-D rule to scalars (``scalar_rule="vector"``) to check gradstep's own rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import Tensor

from gradstep.optim.nero import NeroPlus
from parity import gradient, relative_difference, run_side_by_side, torch_groups

TOL = 1e-6
SHAPES = ((), (16,), (8, 16), (4, 3, 3, 3))  # dealt round-robin: group 0 gets () and (8, 16), group 1 the others
INF = math.inf


# --- ALF, literally -------------------------------------------------------------------------------------------------
def opt_arg(p: Tensor, name: str, default: Any) -> Any:
    """ALF's ``get_opt_arg``: ``p.opt_args[name]`` unless missing or None."""
    value = (getattr(p, "opt_args", None) or {}).get(name)
    return default if value is None else value


def alf_norm(x: Tensor) -> Tensor:
    if x.ndim > 1:
        return x.reshape(x.shape[0], -1).norm(dim=1).reshape(x.shape[0], *([1] * (x.ndim - 1)))
    return x.norm()


def alf_normalize(p: Tensor, max_norm: float, fixed_norm: bool, zero_mean: bool) -> None:
    if zero_mean:
        if p.ndim > 1:
            p -= p.mean(dim=tuple(range(1, p.ndim)), keepdim=True)
        elif p.ndim == 1:
            p -= p.mean()
    if max_norm != INF:
        scale = max_norm / (alf_norm(p) + 1e-30)
        if not fixed_norm:
            scale = scale.clamp(max=1)
        p *= scale


def alf_constraints(p: Tensor, max_norm: float, fixed_norm: bool, zero_mean: bool, scalar_rule: str = "alf") -> tuple:
    if p.ndim > 1:
        return (
            opt_arg(p, "max_norm", max_norm),
            opt_arg(p, "fixed_norm", fixed_norm),
            opt_arg(p, "zero_mean", zero_mean),
        )
    if p.ndim == 1 or scalar_rule == "vector":
        return opt_arg(p, "max_norm", INF), opt_arg(p, "fixed_norm", False), opt_arg(p, "zero_mean", False)
    return max_norm, fixed_norm, zero_mean  # ALF's 0-D rule: the group's values, opt_args ignored


@torch.no_grad()
def alf_initialize(
    params: Iterable[Tensor],
    max_norm: float = 1,
    fixed_norm: bool = True,
    zero_mean: bool = True,
    scalar_rule: str = "alf",
) -> None:
    for p in params:
        alf_normalize(p, *alf_constraints(p, max_norm, fixed_norm, zero_mean, scalar_rule))


class AlfNeroPlus:
    """ALF's NeroPlus step by step (``scalar_rule="vector"``: 0-D parameters get the 1-D rule, as in gradstep)."""

    defaults: dict[str, Any] = {
        "lr": 0.01,
        "betas": (0.9, 0.999),
        "eps": 1e-7,
        "normalizing_grad_by_norm": False,
        "max_norm": 1,
        "weight_decay": 0,
        "l2_regularization": 0,
        "fixed_norm": True,
        "zero_mean": True,
    }

    def __init__(self, groups: list[dict[str, Any]], scalar_rule: str = "alf", **hypers: Any) -> None:
        self.scalar_rule = scalar_rule
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[Tensor, dict[str, Any]] = {}
        for group in groups:
            self.add_param_group({**self.defaults, **hypers, **group})

    @torch.no_grad()
    def add_param_group(self, group: dict[str, Any]) -> None:
        self.param_groups.append(group)
        beta1 = group["betas"][0]
        for p in group["params"]:
            max_norm, fixed_norm, zero_mean = alf_constraints(
                p, group["max_norm"], group["fixed_norm"], group["zero_mean"], self.scalar_rule
            )
            norm = alf_norm(p)
            if p.ndim > 1:
                if zero_mean:
                    assert p.mean(dim=tuple(range(1, p.ndim))).abs().max() < 0.01
                if max_norm != INF:
                    diff = norm / max_norm - 1
                    assert (diff.abs() if fixed_norm else diff).max() < 0.01
            self.state[p] = {"step": 0}
            self.state[p]["exp_avg_sq"] = torch.zeros_like(norm if group["normalizing_grad_by_norm"] else p)
            if beta1 > 0:
                self.state[p]["exp_avg"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            bias_correction1 = 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                constraints = alf_constraints(
                    p, group["max_norm"], group["fixed_norm"], group["zero_mean"], self.scalar_rule
                )
                lr = opt_arg(p, "lr", group["lr"])
                lr_scale = opt_arg(p, "lr_scale", 1)
                state = self.state[p]
                state["step"] += 1
                bias_correction2 = 1 - beta2 ** state["step"]
                grad = p.grad
                weight_decay = opt_arg(p, "weight_decay", group["weight_decay"])
                l2 = opt_arg(p, "l2_regularization", group["l2_regularization"])
                if l2 != 0:
                    grad = grad.add(p, alpha=l2)
                if beta1 > 0:
                    bias_correction1 = 1 - beta1 ** state["step"]
                    exp_avg = state["exp_avg"]
                    exp_avg.lerp_(grad, 1 - beta1)
                else:
                    exp_avg = grad
                sq = alf_norm(grad) ** 2 if group["normalizing_grad_by_norm"] else grad**2
                state["exp_avg_sq"].lerp_(sq, 1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                if weight_decay > 0:
                    p.mul_(1 - lr_scale * lr * weight_decay)
                step_size = lr_scale * lr * math.sqrt(bias_correction2) / bias_correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
                alf_normalize(p, *constraints)


# --- runner ---------------------------------------------------------------------------------------------------------
Config = tuple[dict[str, Any], dict[str, Any], dict[Any, dict[str, Any]]]  # group 0, group 1, opt_args by shape


def with_alf_scalar(config: Config) -> dict[Any, dict[str, Any]]:
    """The config's opt_args, plus, for the scalar (group 0), opt_args that restore ALF's 0-D rule."""
    g0 = {**AlfNeroPlus.defaults, **config[0]}
    scalar = {"max_norm": g0["max_norm"], "fixed_norm": g0["fixed_norm"]}
    return {**config[2], (): {**scalar, **config[2].get((), {})}}


def run(config: Config, opt_args: dict[Any, dict[str, Any]], scalar_rule: str = "alf", **options: Any) -> tuple:
    """200 steps of ALF's NeroPlus and gradstep's side by side; returns (result, reference, gradstep optimizer)."""
    g0, g1, _ = config
    built: dict[str, Any] = {}

    def prepare(groups: list[list[Tensor]], initialize: Callable[..., None]) -> list[dict[str, Any]]:
        for group in groups:
            for p in group:
                if tuple(p.shape) in opt_args:
                    p.opt_args = dict(opt_args[tuple(p.shape)])  # type: ignore[attr-defined]
        out = torch_groups(groups, g0, g1)
        for group in out:
            values = {k: group.get(k, AlfNeroPlus.defaults[k]) for k in ("max_norm", "fixed_norm", "zero_mean")}
            initialize(group["params"], **values)
        return out

    def reference(groups: list[list[Tensor]]) -> AlfNeroPlus:
        init = lambda ps, **kw: alf_initialize(ps, scalar_rule=scalar_rule, **kw)  # noqa: E731
        built["reference"] = AlfNeroPlus(prepare(groups, init), scalar_rule=scalar_rule)
        return built["reference"]

    def ours(groups: list[list[Tensor]]) -> NeroPlus:
        built["gradstep"] = NeroPlus(prepare(groups, NeroPlus.initialize), **options)
        return built["gradstep"]

    result = run_side_by_side(reference, ours, shapes=SHAPES, grad_fn=gradient)
    return result, built["reference"], built["gradstep"]


def assert_same_state(reference: AlfNeroPlus, ours: NeroPlus) -> None:
    for rg, og in zip(reference.param_groups, ours.param_groups):
        for pr, po in zip(rg["params"], og["params"]):
            sr, so = reference.state[pr], ours.state[po]
            assert set(so) == set(sr), f"{tuple(pr.shape)}: state {sorted(so)} instead of ALF's {sorted(sr)}"
            assert float(so["step"]) == sr["step"]
            for key in set(sr) - {"step"}:
                assert so[key].shape == sr[key].shape, f"{key} of {tuple(pr.shape)}: {so[key].shape}"
                d = relative_difference(sr[key], so[key])
                assert d <= TOL, f"state {key} of a {tuple(pr.shape)} parameter: rel diff {d:.2e}"


CONFIGS: dict[str, Config] = {
    # Adam-like; decoupled decay in one group, coupled L2 and a larger norm in the other
    "adam-like": (
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01},
        {"lr": 3e-3, "l2_regularization": 1e-2, "max_norm": 2.0},
        {},
    ),
    # the original Nero: no first moment, per-row second moment; a bounded (not fixed) norm in group 1
    "nero": (
        {"lr": 1e-2, "betas": (0.0, 0.999), "eps": 1e-30, "normalizing_grad_by_norm": True},
        {
            "lr": 5e-3,
            "betas": (0.0, 0.99),
            "normalizing_grad_by_norm": True,
            "fixed_norm": False,
            "max_norm": 3.0,
            "weight_decay": 0.05,
        },
        {},
    ),
    # norm bounded without mean constraint; no norm constraint but zero mean
    "bounded-or-centred": (
        {"lr": 2e-2, "fixed_norm": False, "zero_mean": False, "max_norm": 1.5, "l2_regularization": 1e-3},
        {"lr": 1e-2, "max_norm": INF, "betas": (0.9, 0.9), "weight_decay": 0.1, "normalizing_grad_by_norm": True},
        {},
    ),
    # every opt_args key, including None (= the group's value) and 0 (a real override)
    "opt-args": (
        {"lr": 1e-2, "weight_decay": 0.02, "l2_regularization": 0.05},
        {"lr": 4e-3, "betas": (0.5, 0.95), "l2_regularization": 0.05, "normalizing_grad_by_norm": True},
        {
            (8, 16): {"lr": 5e-3, "weight_decay": 0.2, "fixed_norm": False, "max_norm": 2.0, "zero_mean": None},
            (16,): {"zero_mean": True, "max_norm": 1.0, "fixed_norm": True, "lr_scale": 0.5, "l2_regularization": 0.01},
            (4, 3, 3, 3): {"zero_mean": False, "max_norm": None, "lr": None, "l2_regularization": 0.0},
        },
    ),
}


# The per-tensor path (foreach=False) is held to the reference on the configuration with per-parameter options.
@pytest.mark.parametrize(
    ("name", "foreach"),
    [(name, True) for name in CONFIGS] + [("opt-args", False)],
    ids=lambda v: ("foreach" if v else "per_tensor") if isinstance(v, bool) else v,
)
def test_neroplus_matches_alf_reference(name: str, foreach: bool) -> None:
    config = CONFIGS[name]
    result, reference, ours = run(config, with_alf_scalar(config), foreach=foreach)
    result.assert_within(TOL)
    assert_same_state(reference, ours)


def test_scalar_parameters_follow_the_vector_rule_instead_of_alfs() -> None:
    config = CONFIGS["adam-like"]
    # gradstep's rule: a scalar without opt_args is unconstrained, and matches the reference taught that rule.
    result, _, ours = run(config, {}, scalar_rule="vector")
    result.assert_within(TOL)
    scalar = ours.param_groups[0]["params"][0]
    assert scalar.dim() == 0 and abs(abs(float(scalar.detach())) - 1.0) > 1e-3
    # ALF's rule holds the scalar at |p| = max_norm, so without opt_args the two differ (on the scalar only).
    result, reference, _ = run(config, {})
    assert abs(float(reference.param_groups[0]["params"][0].detach())) == pytest.approx(1.0, abs=1e-12)
    assert result.diffs["group 0, param 0, shape ()"] > 1e-3
    assert all(d <= TOL for n, d in result.diffs.items() if "shape ()" not in n)


def test_constraints_hold_after_every_step_and_vectors_are_free_by_default() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    conv = torch.nn.Parameter(torch.randn(3, 2, 2, 2, dtype=torch.float64))
    conv.opt_args = {"max_norm": 2.0, "zero_mean": False}  # type: ignore[attr-defined]
    bias = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    scaled_bias = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    scaled_bias.opt_args = {"zero_mean": True, "max_norm": 0.5, "fixed_norm": True}  # type: ignore[attr-defined]
    params = [weight, conv, bias, scaled_bias]
    NeroPlus.initialize(params)
    opt = NeroPlus(params, lr=0.05)
    for t in range(5):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()
        w = weight.detach()
        torch.testing.assert_close(w.norm(dim=1), torch.ones(6, dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(w.mean(dim=1), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
        rows = conv.detach().reshape(3, -1)
        torch.testing.assert_close(rows.norm(dim=1), torch.full((3,), 2.0, dtype=torch.float64), rtol=1e-12, atol=0)
        assert rows.mean(dim=1).abs().max() > 1e-3  # zero_mean=False for this one
        # A 1-D parameter is constrained as one vector, and only when its opt_args ask.
        assert abs(float(bias.detach().mean())) > 1e-3 and abs(float(bias.detach().norm()) - 1) > 1e-3
        assert abs(float(scaled_bias.detach().mean())) < 1e-12
        assert float(scaled_bias.detach().norm()) == pytest.approx(0.5, rel=1e-12)


def test_first_nero_step_moves_each_row_by_lr_along_its_unit_gradient() -> None:
    # Spec A.3 with beta1 = 0 and per-row norms: v = (1 - b2) |g_i|^2, so the step is lr * g_i / |g_i| (eps -> 0);
    # with g_i orthogonal to p_i and zero-mean, the new row is (p_i - lr g_i / |g_i|) / sqrt(1 + lr^2).
    p = torch.tensor([[0.6, -0.6, 0.0, 0.0], [0.0, 0.0, 0.8, -0.8]], dtype=torch.float64)
    p = torch.nn.Parameter(p / p.norm(dim=1, keepdim=True))
    g = torch.tensor([[0.0, 0.0, 2.0, -2.0], [3.0, -3.0, 0.0, 0.0]], dtype=torch.float64)
    start = p.detach().clone()
    p.grad = g
    NeroPlus([p], lr=0.1, betas=(0.0, 0.999), eps=0.0, normalizing_grad_by_norm=True).step()
    unit_g = g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(p.detach(), (start - 0.1 * unit_g) / math.sqrt(1 + 0.01))


def test_state_is_per_row_with_normalizing_grad_by_norm() -> None:
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = NeroPlus(params, betas=(0.0, 0.99), normalizing_grad_by_norm=True, check_normalized=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shapes = [tuple(opt.state[p]["exp_avg_sq"].shape) for p in params]
    assert shapes == [(), (), (8, 1), (4, 1, 1, 1)]
    assert all("exp_avg" not in opt.state[p] for p in params)


# --- initialize -----------------------------------------------------------------------------------------------------
def model_with_opt_args() -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Conv2d(2, 3, 3)).double()
    model.register_parameter("temperature", torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64)))
    model[1].weight.opt_args = {"max_norm": INF}  # centred only
    model[1].bias.opt_args = {"max_norm": 3.0, "fixed_norm": True}
    return model


@pytest.mark.parametrize(
    ("max_norm", "fixed_norm", "zero_mean"), [(1, True, True), (2.0, False, True), (0.5, True, False)]
)
def test_initialize_matches_alf(max_norm: float, fixed_norm: bool, zero_mean: bool) -> None:
    ours, alf = model_with_opt_args(), model_with_opt_args()
    NeroPlus.initialize(ours, max_norm, fixed_norm, zero_mean)
    alf_initialize(alf.parameters(), max_norm, fixed_norm, zero_mean, scalar_rule="vector")
    for (name, a), b in zip(ours.named_parameters(), alf.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15, msg=name)
    assert float(ours.temperature.detach()) == 2.5  # a scalar is left alone (ALF would make it +-max_norm)
    NeroPlus(ours.parameters(), max_norm=max_norm, fixed_norm=fixed_norm, zero_mean=zero_mean)  # the check passes


def test_alf_initialize_forces_scalars_which_opt_args_reproduce() -> None:
    ours, alf = model_with_opt_args(), model_with_opt_args()
    alf_initialize(alf.parameters())
    assert float(alf.temperature.detach()) == pytest.approx(1.0)
    ours.temperature.opt_args = {"max_norm": 1, "fixed_norm": True}
    NeroPlus.initialize(ours)
    for a, b in zip(ours.parameters(), alf.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


# --- construction checks --------------------------------------------------------------------------------------------
def test_unnormalized_weight_raises_value_error_naming_it_and_pointing_to_initialize() -> None:
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.sub_(model.weight.mean(dim=1, keepdim=True))  # centred, but norms are not 1
    with pytest.raises(ValueError, match=r"'weight'.*row norm.*NeroPlus\.initialize"):
        NeroPlus(model.named_parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"row mean.*NeroPlus\.initialize"):
        NeroPlus(model.parameters())
    NeroPlus.initialize(model)
    NeroPlus(model.named_parameters())  # now accepted; the unnormalized bias (1-D) was never checked


def test_check_follows_fixed_norm_and_opt_args() -> None:
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.5], [0.25, -0.25]]))  # zero-mean rows, norms below 1
    with pytest.raises(ValueError, match="max_norm"):
        NeroPlus([w])  # fixed_norm: norms must be 1
    NeroPlus([w], fixed_norm=False)  # norms up to 1 are fine
    with pytest.raises(ValueError, match="max_norm"):
        NeroPlus([w], fixed_norm=False, max_norm=0.3)
    w.opt_args = {"max_norm": INF}  # type: ignore[attr-defined]
    NeroPlus([w], max_norm=0.3)


def test_check_runs_for_groups_added_later_and_can_be_turned_off() -> None:
    good = torch.nn.Parameter(torch.tensor([[0.6, -0.6, 0.0, 0.0]]) / 0.6 / math.sqrt(2))
    bad = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = NeroPlus([good])
    with pytest.raises(ValueError, match="NeroPlus.initialize"):
        opt.add_param_group({"params": [bad]})
    unchecked = torch.nn.Parameter(bad.detach().clone())
    untouched = torch.nn.Parameter(bad.detach().clone())
    opt = NeroPlus([unchecked, untouched], lr=0.0, check_normalized=False)
    unchecked.grad = torch.zeros_like(unchecked)
    opt.step()
    # Only parameters with a gradient are projected (as in ALF), even with lr = 0.
    rows = unchecked.detach()
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(rows.mean(dim=1), torch.zeros(2), rtol=0, atol=1e-7)
    assert torch.equal(untouched.detach(), bad.detach())


def test_rejected_group_is_not_added() -> None:
    opt = NeroPlus([torch.nn.Parameter(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]) * math.sqrt(2))])
    with pytest.raises(ValueError, match="NeroPlus.initialize"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))]})
    assert len(opt.param_groups) == 1, "a group that failed validation stayed in param_groups"


@pytest.mark.parametrize(
    ("hypers", "opt_args", "argname"),
    [
        ({"betas": (0.9, 0.0)}, None, "betas"),
        ({"max_norm": 0.0}, None, "max_norm"),
        ({"l2_regularization": -1.0}, None, "l2_regularization"),
        ({}, {"max_norm": -1.0}, "max_norm"),
        ({}, {"fixed_norm": "yes"}, "fixed_norm"),
        ({}, {"l2_regularization": -0.1}, "l2_regularization"),
        ({}, {"lr_scale": -1.0}, "lr_scale"),
    ],
)
def test_invalid_values_raise_value_error(
    hypers: dict[str, Any], opt_args: dict[str, Any] | None, argname: str
) -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    if opt_args is not None:
        p.opt_args = opt_args  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=argname):
        NeroPlus([p], **hypers)
    with pytest.raises(ValueError, match="max_norm"):
        NeroPlus.initialize([p], max_norm=-2.0)

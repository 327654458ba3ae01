"""Parity with float64 references written from the spec, for the originals that cannot run here (ALF, GoMLX).

Each reference below is a small literal per-tensor loop transcribing the spec's formulas (/work/shared/spec, sections
A.1 and G.3 to G.6); none of them calls gradstep. Each case runs the reference and gradstep for 200 float64 steps from
the same parameters (a scalar, a vector, a 4-D tensor and a matrix in two groups with different hyperparameters, see
``parity.py``) and checks the largest relative difference over the run against 1e-9.

GoMLX keeps one global step counter per optimizer; the references keep one per parameter, which is the same number
here because every parameter gets a gradient at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

import gradstep
from parity import gradient, make_params, run_side_by_side_fastai, torch_groups

TOL = 1e-9

Groups = list[list[Tensor]]


class Reference:
    """The frame the references share: groups with their defaults filled in, per-parameter state, ``step()``."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        self.param_groups = [{**defaults, **g} for g in groups]
        self.state: dict[Tensor, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, group, self.state.setdefault(p, {"t": 0}))

    def update(self, p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


def opt_arg(p: Tensor, name: str, default: Any) -> Any:
    """ALF's ``get_opt_arg`` (spec A.0): ``p.opt_args[name]`` unless the attribute or the value is missing/None."""
    args = getattr(p, "opt_args", None)
    if args is None or args.get(name) is None:
        return default
    return args[name]


class RefAdamTF(Reference):
    """ALF AdamTF, spec A.1 steps 1-5."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        base = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.0, "amsgrad": False}
        super().__init__(groups, **{**base, **defaults})

    def update(self, p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        if state["t"] == 0:
            state.update(m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p))
        state["t"] += 1
        t = state["t"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        wd = opt_arg(p, "weight_decay", group["weight_decay"])
        if wd != 0:
            g = g + wd * p
        m, v = state["m"], state["v"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).add_((1 - b2) * g * g)
        if group["amsgrad"]:
            torch.maximum(state["vmax"], v, out=state["vmax"])
            denom = state["vmax"].sqrt() + group["eps"]
        else:
            denom = v.sqrt() + group["eps"]
        step_size = group["lr"] * math.sqrt(bc2) / bc1
        p.sub_(step_size * m / denom)


def clip_step_by_value(delta: Tensor, c: float) -> Tensor:
    """GoMLX ``ClipStepByValue`` (spec G.5), with c <= 0 meaning off."""
    return delta.clamp(-c, c) if c > 0 else delta


class RefGomlxSGD(Reference):
    """GoMLX StochasticGradientDescent, spec G.3 step 4-5 (decay on), with clip_step_by_value and clip_nan."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        super().__init__(groups, **{"lr": 0.1, "clip_step_by_value": 0.0, "clip_nan": False, **defaults})

    def update(self, p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["t"] += 1
        lr = group["lr"] / math.sqrt(state["t"])
        delta = clip_step_by_value(g * lr, group["clip_step_by_value"])
        new = p - delta
        if group["clip_nan"]:  # ClipNaNsInUpdates only: SGD never zeros gradients
            new = torch.where(torch.isfinite(new), new, p)
        p.copy_(new)


class RefGomlxAdam(Reference):
    """GoMLX's Adam family (Adam, AdamW, Adamax, RMSProp are flags of one config), spec G.4 update steps 1-7."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        base = {
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-7,
            "weight_decay": 0.0,
            "backoff": 0,
            "clip_step_by_value": 0.0,
            "clip_nan": False,
            "adamax": False,
            "rmsprop": False,
        }
        super().__init__(groups, **{**base, **defaults})

    def update(self, p: Tensor, g: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        b1, b2, eps = group["beta1"], group["beta2"], group["eps"]
        if state["t"] == 0:
            state.update(m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["t"] += 1
        t = state["t"]
        lr = group["lr"] if group["backoff"] <= 0 or t > group["backoff"] else 0.0
        d1, d2 = 1 / (1 - b1**t), 1 / (1 - b2**t)
        if group["clip_nan"] and not bool(torch.isfinite(g).all()):
            g = torch.zeros_like(g)  # ClipNaNsInGradients: the whole tensor
        if group["rmsprop"]:
            num = g
        else:
            state["m"] = b1 * state["m"] + (1 - b1) * g
            num = state["m"] * d1
        if group["adamax"]:
            state["v"] = torch.maximum(b2 * state["v"], g.abs())
            den = state["v"] + eps
        else:
            state["v"] = b2 * state["v"] + (1 - b2) * g * g
            den = torch.sqrt(state["v"] * d2) + eps
        x = p.clone()
        delta = lr * num / den
        if group["weight_decay"] > 0:
            delta = delta + lr * group["weight_decay"] * x
        delta = clip_step_by_value(delta, group["clip_step_by_value"])
        new = x - delta
        if group["clip_nan"]:
            new = torch.where(torch.isfinite(new), new, x)
        p.copy_(new)


# --- gradients with non-finite values ---------------------------------------------------------------------------

# (step, parameter index, element, value): NaN and infinities in single elements and in the scalar parameter
INJECTIONS: tuple[tuple[int, int, tuple[int, ...], float], ...] = (
    (7, 1, (0,), math.nan),
    (8, 0, (), math.inf),
    (60, 2, (1, 0, 2, 3), -math.inf),
    (61, 1, (3,), math.nan),
    (61, 3, (2, 1), math.nan),
    (150, 0, (), math.nan),
)


def gradient_with_nonfinite(p: Tensor, t: int, index: int) -> Tensor:
    g = gradient(p, t, index)
    for step, i, element, value in INJECTIONS:
        if step == t and i == index:
            g[element] = value
    return g


def run(make_reference: Callable[[Groups], Any], make_gradstep: Callable[[Groups], Any], **kw: Any) -> None:
    # The references take no closure, like fastai's optimizer: gradients go into p.grad before each step().
    run_side_by_side_fastai(make_reference, make_gradstep, steps=200, **kw).assert_within(TOL)


# --- ALF AdamTF (spec A.1) ----------------------------------------------------------------------------------------

# per parameter (group, position in group): 0 disables the group's decay, None means the group's value, a number
# overrides it (also in a group without decay); the 4-D tensor (group 0, position 1) has no opt_args at all
OPT_ARGS = {(0, 0): {"weight_decay": 0}, (1, 0): {"weight_decay": None}, (1, 1): {"weight_decay": 0.05}}


def with_opt_args(groups: Groups) -> Groups:
    for (gi, pi), args in OPT_ARGS.items():
        groups[gi][pi].opt_args = dict(args)  # type: ignore[attr-defined]
    return groups


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adamtf_matches_spec_a1_with_per_parameter_weight_decay(amsgrad: bool, foreach: bool) -> None:
    group0 = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.02}
    group1 = {"lr": 0.004, "betas": (0.9, 0.99), "eps": 1e-2, "weight_decay": 0.0}
    run(
        lambda groups: RefAdamTF(torch_groups(with_opt_args(groups), group0, group1), amsgrad=amsgrad),
        lambda groups: gradstep.AdamTF(
            torch_groups(with_opt_args(groups), group0, group1), amsgrad=amsgrad, foreach=foreach
        ),
    )


def test_adamtf_opt_args_weight_decay_changes_the_trajectory() -> None:
    # The overrides above must matter: without them the same run ends elsewhere.
    group0 = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.02}
    group1 = {"lr": 0.004, "betas": (0.9, 0.99), "eps": 1e-2, "weight_decay": 0.0}
    result = run_side_by_side_fastai(
        lambda groups: RefAdamTF(torch_groups(groups, group0, group1)),
        lambda groups: gradstep.AdamTF(torch_groups(with_opt_args(groups), group0, group1)),
        steps=100,
    )
    changed = [name for name, d in result.diffs.items() if d > 1e3 * TOL]
    # the scalar (decay switched off) and the matrix (decay switched on) move differently; the others do not
    assert changed == ["group 0, param 0, shape ()", "group 1, param 3, shape (3, 4)"], result.table()


# --- GoMLX SGD (spec G.3, G.5) ------------------------------------------------------------------------------------


def test_gomlx_sgd_matches_spec_g3_with_sqrt_decay_clip_and_nan_revert() -> None:
    # group 0 clips the step; group 1 does not (an infinite gradient element there is reverted, not clipped)
    ref0, ref1 = {"lr": 0.05, "clip_step_by_value": 0.01}, {"lr": 0.02}
    gs0, gs1 = {"lr": 0.05, "clip_step": 0.01}, {"lr": 0.02}
    run(
        lambda groups: RefGomlxSGD(torch_groups(groups, ref0, ref1), clip_nan=True),
        lambda groups: gradstep.create("gomlx_sgd", torch_groups(groups, gs0, gs1), nonfinite="revert"),
        grad_fn=gradient_with_nonfinite,
    )


def test_gomlx_sgd_decays_lr_by_sqrt_t_by_default() -> None:
    # lr0 0.1 (GoMLX's default): step 4 moves by 0.1 / 2 * g
    p = torch.tensor([1.0, -1.0], dtype=torch.float64)
    p.grad = torch.tensor([0.5, -2.0], dtype=torch.float64)
    opt = gradstep.create("gomlx_sgd", [p])
    before = []
    for _ in range(4):
        before.append(p.clone())
        opt.step()
    torch.testing.assert_close(before[1] - before[0], -0.1 * p.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(p - before[3], -0.05 * p.grad, rtol=1e-12, atol=0)


# --- GoMLX Adam family (spec G.4, G.5) ----------------------------------------------------------------------------

# (registry name, reference flags, gradstep hypers per group, reference hypers per group)
GOMLX_CASES: dict[str, tuple[str, dict[str, Any], Sequence[dict[str, Any]], Sequence[dict[str, Any]]]] = {
    # decoupled decay added to the step before the clip; backoff in group 0 only
    "adam": (
        "gomlx_adam",
        {},
        (
            {
                "lr": 0.01,
                "betas": (0.8, 0.95),
                "eps": 1e-4,
                "weight_decay": 0.05,
                "clip_step": 0.008,
                "backoff_steps": 5,
            },
            {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1},
        ),
        (
            {
                "lr": 0.01,
                "beta1": 0.8,
                "beta2": 0.95,
                "eps": 1e-4,
                "weight_decay": 0.05,
                "clip_step_by_value": 0.008,
                "backoff": 5,
            },
            {"lr": 0.02, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.1},
        ),
    ),
    "adamax": (
        "gomlx_adamax",
        {"adamax": True},
        (
            {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-2, "weight_decay": 0.02, "clip_step": 0.005},
            {"lr": 0.003, "betas": (0.95, 0.999), "eps": 1e-4, "backoff_steps": 3},
        ),
        (
            {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 1e-2, "weight_decay": 0.02, "clip_step_by_value": 0.005},
            {"lr": 0.003, "beta1": 0.95, "beta2": 0.999, "eps": 1e-4, "backoff": 3},
        ),
    ),
    # RMSProp: no first moment, bias-corrected v, alpha is GoMLX's beta2
    "rmsprop": (
        "gomlx_rmsprop",
        {"rmsprop": True},
        (
            {"lr": 0.005, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.03},
            {"lr": 0.01, "alpha": 0.99, "eps": 1e-2, "clip_step": 0.004, "backoff_steps": 4},
        ),
        (
            {"lr": 0.005, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.03},
            {"lr": 0.01, "beta2": 0.99, "eps": 1e-2, "clip_step_by_value": 0.004, "backoff": 4},
        ),
    ),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("clip_nan", [False, True], ids=["finite", "clip_nan"])
@pytest.mark.parametrize("case", list(GOMLX_CASES))
def test_gomlx_adam_family_matches_spec_g4(case: str, clip_nan: bool, foreach: bool) -> None:
    name, flags, gs_groups, ref_groups = GOMLX_CASES[case]
    policy = {"nonfinite": "zero"} if clip_nan else {}
    run(
        lambda groups: RefGomlxAdam(torch_groups(groups, *ref_groups), clip_nan=clip_nan, **flags),
        lambda groups: gradstep.create(name, torch_groups(groups, *gs_groups), foreach=foreach, **policy),
        grad_fn=gradient_with_nonfinite if clip_nan else gradient,
    )


def test_gomlx_adam_backoff_updates_moments_but_not_params_or_decay() -> None:
    params = make_params(seed=3)
    initial = [p.detach().clone() for p in params]
    opt = gradstep.create("gomlx_adam", params, lr=0.01, weight_decay=0.1, backoff_steps=4)
    for t in range(1, 5):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()
    for p, p0 in zip(params, initial):
        assert torch.equal(p.detach(), p0)  # neither the step nor the decay touched them
        assert float(opt.state[p]["exp_avg"].abs().max()) > 0  # the moments did move
    for i, p in enumerate(params):
        p.grad = gradient(p.detach(), 5, i)
    opt.step()
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(params, initial))


# --- GoMLX step-1 properties (spec G.4) ---------------------------------------------------------------------------

STEP1_GRAD = [0.3, -0.02, 1e-3, -4.0, 2.5e-3]


def first_step(opt_factory: Callable[[list[Tensor]], torch.optim.Optimizer]) -> tuple[Tensor, Tensor]:
    p = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5], dtype=torch.float64)
    p0 = p.clone()
    p.grad = torch.tensor(STEP1_GRAD, dtype=torch.float64)
    opt_factory([p]).step()
    return p0 - p, p.grad


@pytest.mark.parametrize("name", ["gomlx_adam", "gomlx_rmsprop"])
def test_gomlx_first_step_is_about_lr_times_sign_of_g(name: str) -> None:
    # Adam: num = g, den = |g| + eps; RMSProp: den = sqrt((1-b2) g^2 / (1-b2)) + eps = |g| + eps.
    # Either way the step is lr g / (|g| + eps), with GoMLX's eps 1e-7.
    lr = 0.01
    delta, g = first_step(lambda ps: gradstep.create(name, ps, lr=lr))
    torch.testing.assert_close(delta, lr * g / (g.abs() + 1e-7), rtol=1e-12, atol=0)
    torch.testing.assert_close(delta, lr * torch.sign(g), rtol=1e-3, atol=0)


def test_torch_rmsprop_first_step_is_ten_times_larger_than_gomlx() -> None:
    # The contrast the spec draws (X.2): without bias correction, sqrt(0.01 g^2) = 0.1 |g|.
    delta, g = first_step(lambda ps: gradstep.RMSprop(ps, lr=0.01))
    torch.testing.assert_close(delta, 10 * 0.01 * torch.sign(g), rtol=1e-3, atol=0)


# --- gradstep.recipes.gomlx: GoMLX's hyperparameter keys (spec G.4, G.6) ---------------------------------------------


def recipe(hyperparams: dict[str, Any], **kw: Any) -> Callable[[Groups], torch.optim.Optimizer]:
    return lambda groups: gradstep.recipes.gomlx(torch_groups(groups), hyperparams, **kw)


def reference(ref_cls: type[Reference], **hypers: Any) -> Callable[[Groups], Reference]:
    return lambda groups: ref_cls(torch_groups(groups), **hypers)


def test_gomlx_recipe_default_is_adamw_that_runs_without_weight_decay() -> None:
    # FromContext overwrites adamw's 0.004 with adam_weight_decay's default 0 (spec G.6): faithful by default
    opt = gradstep.recipes.gomlx([torch.zeros(2, requires_grad=True)], {})
    assert opt.defaults["weight_decay"] == 0.0
    # GoMLX's Adam defaults (G.4): lr 1e-3, betas (0.9, 0.999), eps 1e-7
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (1e-3, (0.9, 0.999), 1e-7)
    run(reference(RefGomlxAdam, lr=0.01), recipe({"learning_rate": 0.01}))


def test_gomlx_recipe_intended_adamw_decay_gives_0_004() -> None:
    opt = gradstep.recipes.gomlx([torch.zeros(2, requires_grad=True)], {}, intended_adamw_decay=True)
    assert opt.defaults["weight_decay"] == 0.004
    run(
        reference(RefGomlxAdam, lr=0.01, weight_decay=0.004),
        recipe({"learning_rate": 0.01}, intended_adamw_decay=True),
    )


def test_gomlx_recipe_adamw_with_adam_weight_decay_set() -> None:
    run(
        reference(RefGomlxAdam, lr=0.01, weight_decay=0.05),
        recipe({"optimizer": "adamw", "learning_rate": 0.01, "adam_weight_decay": 0.05}),
    )


ALL_ADAM_KEYS = {
    "learning_rate": 0.01,
    "adam_beta1": 0.8,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-4,
    "adam_weight_decay": 0.02,
    "clip_step_by_value": 0.006,
    "clip_nan": True,
    "adam_backoff": 3,
}
ALL_ADAM_REF = {
    "lr": 0.01,
    "beta1": 0.8,
    "beta2": 0.95,
    "eps": 1e-4,
    "weight_decay": 0.02,
    "clip_step_by_value": 0.006,
    "clip_nan": True,
    "backoff": 3,
}


@pytest.mark.parametrize(
    ("optimizer", "flags"),
    [("adam", {}), ("adamw", {}), ("adamax", {"adamax": True}), ("rmsprop", {"rmsprop": True})],
)
def test_gomlx_recipe_reads_every_adam_key(optimizer: str, flags: dict[str, Any]) -> None:
    run(
        reference(RefGomlxAdam, **ALL_ADAM_REF, **flags),
        recipe({"optimizer": optimizer, **ALL_ADAM_KEYS}),
        grad_fn=gradient_with_nonfinite,
    )


def test_gomlx_recipe_sgd_reads_learning_rate_clip_and_clip_nan() -> None:
    run(
        reference(RefGomlxSGD, lr=0.05, clip_step_by_value=0.01, clip_nan=True),
        recipe({"optimizer": "sgd", "learning_rate": 0.05, "clip_step_by_value": 0.01, "clip_nan": True}),
        grad_fn=gradient_with_nonfinite,
    )


def test_gomlx_recipe_rejects_an_unknown_key() -> None:
    with pytest.raises(KeyError, match="adam_beta3"):
        gradstep.recipes.gomlx([torch.zeros(2, requires_grad=True)], {"adam_beta3": 0.9})

"""Parity of LARS, LARC, LAMB and RaLars with holocron, fastai and pytorch_optimizer, parameters and state.

Runs as in ``test_parity_radam.py`` (:func:`run_parity`: 200 float64 steps, four shapes in two groups with different
hyperparameters, every parameter after every step, every state value the original keeps). Where an original has a
documented bug (holocron LARS ignores ``scale_clip``; fastai Larc counts coupled weight decay twice), it is compared
where the bug does not act, and gradstep is compared with a literal float64 per-tensor loop of the documented math
(:class:`LarsReference`, :class:`LambReference`) where it does. The spec's check values (H.1-H.3, F.3.6, F.3.7, X.3)
pin single steps.
"""

from __future__ import annotations

import math
from typing import Any

import fastai.optimizer as fastai_optim
import pytest
import pytorch_optimizer
import torch
from torch import Tensor

from gradstep.core.registry import get
from gradstep.optim.layerwise import LAMB, LARC, LARS, RaLars
from originals import holocron_optim
from parity import fastai_set_hypers, torch_groups
from test_parity_radam import FASTAI_ADAM_STATE, SHAPES, TORCH_ADAM_STATE, StateMap, run_parity

F64 = torch.float64
HOLOCRON_LAMB_STATE: StateMap = {**TORCH_ADAM_STATE, "local_lr": "trust_ratio"}


def _zero_bias(params: list[Tensor]) -> None:
    params[1].zero_()  # the (16,) bias: a zero norm


def _scaled(k: float, zero_bias: bool = False) -> Any:
    def prepare(params: list[Tensor]) -> None:
        for p in params:
            p.mul_(k)
        if zero_bias:
            _zero_bias(params)

    return prepare


# --- literal references of the documented math ----------------------------------------------------------------------


class LarsReference:
    """LARS/LARC as documented (spec H.1, F.3.6, X.4), one tensor at a time, with Python branches.

    ``q = min(eta * clamp(||p'||, *clip) / (||g|| + wd ||p'|| [+ eps]), cap)``, or 1 when ``zero_one`` and a norm is
    zero; ``p' = p (1 - lr wd)`` decayed first in decoupled mode; the momentum buffer (torch's SGD) accumulates
    ``g (+ wd p in coupled mode)``; ``p <- p' - lr q buf``. ``clamped`` counts the steps where the clip acted.
    """

    def __init__(self, groups: list[list[Tensor]], *hypers: dict[str, Any]) -> None:
        self.groups = [{"params": g, **h} for g, h in zip(groups, hypers)]
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.clamped = 0

    def step(self) -> None:
        for h in self.groups:
            lr, wd, mu = h["lr"], h["weight_decay"], h["momentum"]
            for p in h["params"]:
                st = self.state.setdefault(p, {"step": 0})
                st["step"] += 1
                g = p.grad.detach()
                with torch.no_grad():
                    if h["mode"] == "decoupled":
                        p.mul_(1 - lr * wd)
                    d = g + wd * p if h["mode"] == "coupled" else g
                    p_norm, g_norm = float(p.norm()), float(g.norm())
                    phi = min(max(p_norm, h["clip"][0]), h["clip"][1])
                    self.clamped += phi != p_norm
                    if h["zero_one"] and (phi == 0 or g_norm + wd * p_norm == 0):
                        q = 1.0
                    else:
                        q = min(h["eta"] * phi / (g_norm + wd * p_norm + h["eps"]), h["cap"])
                    if mu != 0:
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = d.clone()
                        else:
                            st["momentum_buffer"].mul_(mu).add_(d, alpha=1 - h["dampening"])
                        d = st["momentum_buffer"]
                    st["trust_ratio"] = q
                    p.add_(d, alpha=-lr * q)


class LambReference:
    """LAMB as in the paper (spec H.2's documentation): bias-corrected moments, ``u = m_hat/(sqrt(v_hat) + eps) +
    wd p``, ``q = clamp(||p||, 0, 10) / ||u||`` (1 when a norm is zero), ``p <- p - lr q u``."""

    def __init__(self, groups: list[list[Tensor]], *hypers: dict[str, Any]) -> None:
        self.groups = [{"params": g, **h} for g, h in zip(groups, hypers)]
        self.state: dict[Tensor, dict[str, Any]] = {}

    def step(self) -> None:
        for h in self.groups:
            (b1, b2), eps, wd = h["betas"], h["eps"], h["weight_decay"]
            for p in h["params"]:
                st = self.state.setdefault(
                    p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                )
                st["step"] += 1
                t, g = st["step"], p.grad.detach()
                st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                m_hat, v_hat = st["exp_avg"] / (1 - b1**t), st["exp_avg_sq"] / (1 - b2**t)
                u = m_hat / (v_hat.sqrt() + eps) + wd * p.detach()
                phi, u_norm = min(float(p.detach().norm()), 10.0), float(u.norm())
                q = 1.0 if phi == 0 or u_norm == 0 else phi / u_norm
                st["trust_ratio"] = q
                with torch.no_grad():
                    p.add_(u, alpha=-h["lr"] * q)


# --- LARS vs holocron -----------------------------------------------------------------------------------------------

HOLOCRON_LARS_CASES = {
    # (common kwargs, group a, group b, prepare): default scale_clip (0, 10) where every ||p|| <= 10
    "momentum-wd": ({"weight_decay": 0.01}, {"lr": 0.01, "momentum": 0.9}, {"lr": 0.02, "momentum": 0.5}, _scaled(0.5)),
    "nesterov-zero-bias": (
        {},
        {"lr": 0.01, "momentum": 0.8, "nesterov": True},
        {"lr": 0.005, "momentum": 0.6, "weight_decay": 0.05},
        _scaled(0.5, zero_bias=True),
    ),
    "dampening-no-momentum": (
        {},
        {"lr": 0.02, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.05},
        {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.02},
        _scaled(0.5),
    ),
    # holocron ignores scale_clip: with ||p|| > 10 its numbers are gradstep's with the clamp off.
    "large-norms-clamp-off": (
        {"momentum": 0.9},
        {"lr": 0.01, "weight_decay": 0.01},
        {"lr": 0.02},
        _scaled(20.0),
    ),
}


@pytest.mark.parametrize("case", HOLOCRON_LARS_CASES)
def test_lars_matches_holocron_lars(case: str) -> None:
    common, a, b, prepare = HOLOCRON_LARS_CASES[case]
    large = case == "large-norms-clamp-off"
    gs_common = {**common, "scale_clip": (0.0, math.inf)} if large else common
    result = run_parity(
        lambda gs: holocron_optim().LARS(torch_groups(gs, a, b), **common),
        lambda gs: LARS(torch_groups(gs, a, b), **gs_common),
        {"momentum_buffer": "momentum_buffer"},
        prepare=prepare,
        # A one-element tensor's LARS step is lr * |p| * sign(g + wd p): once the large scalar has shrunk, g + wd p
        # crosses zero and a rounding difference of 1e-16 (which way the CPU's vector code rounds) flips a step,
        # so no bound below chaos holds on every machine. Two elements keep the large norm with a continuous step.
        shapes=((2,), *SHAPES[1:]) if large else SHAPES,
    )
    result.assert_within()


def test_lars_honours_scale_clip_where_holocron_ignores_it() -> None:
    # Small steps: with ||p|| ~ 20 the scalar's ratio |p| / (|g| + wd |p|) is large, and large steps turn chaotic.
    a, b = {"lr": 0.005, "momentum": 0.5, "weight_decay": 0.05}, {"lr": 0.003, "momentum": 0.7, "dampening": 0.1}
    reference: dict[str, LarsReference] = {}

    def make_reference(gs: list[list[Tensor]]) -> LarsReference:
        common = {"mode": "coupled", "eta": 1.0, "eps": 0.0, "cap": math.inf, "clip": (0.0, 10.0), "zero_one": True}
        ref = LarsReference(gs, {**common, "dampening": 0.0, **a}, {**common, "weight_decay": 0.0, **b})
        reference["opt"] = ref
        return ref

    result = run_parity(
        make_reference,
        lambda gs: LARS(torch_groups(gs, a, b)),
        {"momentum_buffer": "momentum_buffer", "trust_ratio": "trust_ratio"},
        prepare=_scaled(20.0),
    )
    result.assert_within()
    assert reference["opt"].clamped > 0, "the norm clamp never acted: this run does not test scale_clip"


# --- LARC vs fastai Larc --------------------------------------------------------------------------------------------

LARC_STATE: StateMap = {"grad_avg": "momentum_buffer", "local_lr": lambda s, g, p: g["lr"] * s["trust_ratio"]}

FASTAI_LARC_CASES = {
    # (fastai kwargs, fastai per-group hypers, gradstep groups, gradstep kwargs, prepare)
    # trust_coeff 100 keeps group a's ratio above 1: clipped at lr every step; group b's 0.02 is never clipped.
    "clip-decoupled": (
        {"lr": 0.05, "wd": 0.01},
        {"trust_coeff": [100.0, 0.02], "mom": [0.9, 0.5], "lr": [0.05, 0.1]},
        ({"lr": 0.05, "trust_coeff": 100.0}, {"lr": 0.1, "momentum": 0.5}),
        {"weight_decay": 0.01},
        None,
    ),
    # Without clipping, without momentum; fastai's formula freezes the zero bias (gradstep's default rule too).
    "no-clip-no-momentum-zero-bias": (
        {"lr": 0.1, "mom": 0.0, "clip": False, "eps": 1e-6},
        {"trust_coeff": [0.05, 0.5], "wd": [0.0, 0.05]},
        ({"trust_coeff": 0.05}, {"trust_coeff": 0.5, "weight_decay": 0.05}),
        {"momentum": 0.0, "clip": False, "eps": 1e-6},
        _zero_bias,
    ),
    # Coupled decay with wd = 0, where fastai's double count of the decay has no effect.
    "coupled-no-wd": (
        {"lr": 0.02, "mom": 0.8, "trust_coeff": 1.0, "decouple_wd": False},
        {"eps": [1e-8, 1e-4]},
        ({}, {"eps": 1e-4}),
        {"lr": 0.02, "momentum": 0.8, "trust_coeff": 1.0, "weight_decay_mode": "coupled"},
        None,
    ),
}


@pytest.mark.parametrize("case", FASTAI_LARC_CASES)
def test_larc_matches_fastai_larc(case: str) -> None:
    fastai_kwargs, fastai_groups, (a, b), gs_kwargs, prepare = FASTAI_LARC_CASES[case]
    made: dict[str, LARC] = {}

    def make_gradstep(gs: list[list[Tensor]]) -> LARC:
        made["opt"] = LARC(torch_groups(gs, a, b), **{"lr": fastai_kwargs["lr"], **gs_kwargs})
        return made["opt"]

    result = run_parity(
        lambda gs: fastai_set_hypers(fastai_optim.Larc(gs, **fastai_kwargs), **fastai_groups),
        make_gradstep,
        LARC_STATE,
        prepare=prepare,
    )
    result.assert_within(frozen=["1:(16,)"] if prepare is _zero_bias else ())
    if prepare is _zero_bias:
        assert result.moved["1:(16,)"] == 0.0
    if case == "clip-decoupled":  # the regimes the case is for: group a clipped at lr, group b not
        opt = made["opt"]
        assert all(float(opt.state[p]["trust_ratio"]) == 1.0 for p in opt.param_groups[0]["params"])
        assert all(float(opt.state[p]["trust_ratio"]) < 1.0 for p in opt.param_groups[1]["params"])


@pytest.mark.parametrize(
    ("mode", "trust_zero"), [("coupled", "formula"), ("decoupled", "one")], ids=["coupled-wd", "zero-norm-one"]
)
def test_larc_matches_the_documented_math(mode: str, trust_zero: str) -> None:
    # Coupled: the denominator is ||g|| + wd ||p|| (fastai counts wd twice there: ||g + wd p|| + wd ||p||).
    # trust_zero="one": the zero bias gets a ratio of 1 and moves (fastai's formula freezes it).
    a, b = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.02}, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.05}
    common = {"mode": mode, "eta": 0.5, "eps": 1e-8, "cap": 1.0, "clip": (0.0, math.inf), "dampening": 0.0}
    common["zero_one"] = trust_zero == "one"
    result = run_parity(
        lambda gs: LarsReference(gs, {**common, **a}, {**common, **b}),
        lambda gs: LARC(torch_groups(gs, a, b), trust_coeff=0.5, weight_decay_mode=mode, trust_zero=trust_zero),
        {"momentum_buffer": "momentum_buffer", "trust_ratio": "trust_ratio"},
        prepare=_zero_bias,
    )
    result.assert_within(frozen=["1:(16,)"] if trust_zero == "formula" else ())


def test_larc_opt_args_lr_matches_a_group_with_that_lr() -> None:
    # The decayed norm ||p (1 - lr wd)|| must use the parameter's own lr (opt_args), as the core's step does.
    def run(split: bool) -> list[Tensor]:
        gen = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.rand(5, 3, generator=gen, dtype=F64) * 2 - 1) for _ in range(2)]
        if split:
            opt = LARC([{"params": [ps[0]], "lr": 0.02}, {"params": [ps[1]]}], lr=0.1, weight_decay=0.3)
        else:
            ps[0].opt_args = {"lr": 0.02}  # type: ignore[attr-defined]
            opt = LARC(ps, lr=0.1, weight_decay=0.3)
        for t in range(20):
            for p in ps:
                p.grad = torch.sin(3 * p.detach() + t)
            opt.step()
        return [p.detach() for p in ps]

    for x, y in zip(run(True), run(False)):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=0)


# --- LAMB vs holocron, fastai, pytorch_optimizer; the paper's LAMB --------------------------------------------------

HOLOCRON_LAMB_CASES = {
    # (optimizer-level kwargs (holocron's scale_clip is not per group), group a, group b, prepare)
    "lr-groups": ({}, {"lr": 1e-2}, {"lr": 3e-3}, None),
    "wd-betas-eps": (
        {},
        {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 5e-3, "weight_decay": 0.05},
        None,
    ),
    "large-norms-zero-bias": ({}, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 2e-2}, _scaled(20.0, zero_bias=True)),
    "scale-clip": ({"scale_clip": (0.5, 5.0)}, {"lr": 1e-2}, {"lr": 5e-3, "weight_decay": 0.02}, None),
}


@pytest.mark.parametrize("case", HOLOCRON_LAMB_CASES)
def test_lamb_matches_holocron_lamb(case: str) -> None:
    common, a, b, prepare = HOLOCRON_LAMB_CASES[case]
    result = run_parity(
        lambda gs: holocron_optim().LAMB(torch_groups(gs, a, b), **common),
        lambda gs: LAMB(torch_groups(gs, a, b), bias_correction=False, **common),
        HOLOCRON_LAMB_STATE,
        prepare=prepare,
    )
    result.assert_within()


FASTAI_LAMB_CASES = {
    "lr-groups": ({"lr": 1e-2}, {"lr": [1e-2, 3e-3]}, ({"lr": 1e-2}, {"lr": 3e-3}), {}, None),
    # A large scalar (50) keeps its ratio ||p||/||u|| above fastai's cap of 10.
    "decoupled-wd-ratio-cap": (
        {"lr": 1e-2, "wd": 0.01},
        {"mom": [0.8, 0.9], "sqr_mom": [0.95, 0.99], "wd": [0.01, 0.1]},
        ({"betas": (0.8, 0.95)}, {"weight_decay": 0.1}),
        {"weight_decay": 0.01},
        lambda ps: ps[0].fill_(50.0),
    ),
    "l2-zero-bias": (
        {"lr": 5e-3, "wd": 0.02, "eps": 1e-3, "decouple_wd": False},
        {},
        ({}, {}),
        {"lr": 5e-3, "weight_decay": 0.02, "eps": 1e-3, "weight_decay_mode": "coupled"},
        _zero_bias,
    ),
}


@pytest.mark.parametrize("case", FASTAI_LAMB_CASES)
def test_lamb_matches_fastai_lamb(case: str) -> None:
    fastai_kwargs, fastai_groups, (a, b), gs_kwargs, prepare = FASTAI_LAMB_CASES[case]
    made: dict[str, Any] = {}

    def make_gradstep(gs: list[list[Tensor]]) -> Any:
        made["opt"] = get("fastai_lamb")(torch_groups(gs, a, b), **{"lr": 1e-2, **gs_kwargs})
        return made["opt"]

    result = run_parity(
        lambda gs: fastai_set_hypers(fastai_optim.Lamb(gs, **fastai_kwargs), **fastai_groups),
        make_gradstep,
        FASTAI_ADAM_STATE,
        prepare=prepare,
    )
    result.assert_within()
    if case == "decoupled-wd-ratio-cap":  # the large scalar's ratio is still at the cap
        scalar = made["opt"].param_groups[0]["params"][0]
        assert float(made["opt"].state[scalar]["trust_ratio"]) == 10.0


def _pto_decay(group: dict[str, Any]) -> float:
    return 1 - group["lr"] * group["weight_decay"] if group["weight_decay_mode"] == "decoupled" else 1.0


def _pto_adam_norm(state: dict[str, Any], group: dict[str, Any], p: Tensor) -> Tensor:
    u = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
    return (u + group["weight_decay"] * p if group["weight_decay_mode"] == "trust_ratio" else u).norm()


# pto also keeps the (clamped) weight norm and the update norm of the last step: derived from gradstep's state and
# the parameter before the step.
PTO_LAMB_STATE: StateMap = {
    **TORCH_ADAM_STATE,
    "trust_ratio": "trust_ratio",
    "weight_norm": lambda s, g, p: (p * _pto_decay(g)).norm().clamp(0, 10),
    "adam_norm": _pto_adam_norm,
}
PTO_LAMB = {"bias_correction": False, "step_bias_correction": True, "trust_eps": True}

PTO_LAMB_CASES = {
    # (pto kwargs, group a, group b, gradstep kwargs, prepare)
    "decoupled-lr-groups": ({}, {"lr": 1e-2}, {"lr": 3e-3}, {"eps": 1e-6, "weight_decay_mode": "decoupled"}, None),
    "decoupled-wd-betas": (
        {"eps": 1e-5},
        {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.8, 0.99)},
        {"lr": 5e-3, "weight_decay": 0.05},
        {"eps": 1e-5, "weight_decay_mode": "decoupled"},
        None,
    ),
    "coupled-large-norms-zero-bias": (
        {"weight_decouple": False},
        {"lr": 1e-2, "weight_decay": 0.02},
        {"lr": 5e-3, "eps": 1e-4},
        {"eps": 1e-6, "weight_decay_mode": "trust_ratio"},
        _scaled(20.0, zero_bias=True),
    ),
}


@pytest.mark.parametrize("case", PTO_LAMB_CASES)
def test_lamb_matches_pytorch_optimizer_lamb(case: str) -> None:
    pto_kwargs, a, b, gs_kwargs, prepare = PTO_LAMB_CASES[case]
    result = run_parity(
        lambda gs: pytorch_optimizer.Lamb(torch_groups(gs, a, b), **pto_kwargs),
        lambda gs: LAMB(torch_groups(gs, a, b), **PTO_LAMB, **gs_kwargs),
        PTO_LAMB_STATE,
        prepare=prepare,
    )
    result.assert_within()


def test_lamb_defaults_match_the_paper() -> None:
    a, b = {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 5e-3, "betas": (0.8, 0.99), "eps": 1e-6}
    ref_defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    result = run_parity(
        lambda gs: LambReference(gs, {**ref_defaults, **a}, {**ref_defaults, **b}),
        lambda gs: LAMB(torch_groups(gs, a, b)),
        {**TORCH_ADAM_STATE, "trust_ratio": "trust_ratio"},
        prepare=_scaled(10.0, zero_bias=True),
    )
    result.assert_within()


# --- RaLars vs holocron ---------------------------------------------------------------------------------------------

HOLOCRON_RALARS_CASES = {
    "lr-groups": ({}, {"lr": 1e-2}, {"lr": 3e-3}, None),
    "adaptive-momentum-wd": (
        {"force_adaptive_momentum": True},
        {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 5e-3, "weight_decay": 0.05, "betas": (0.9, 0.95)},
        None,
    ),
    "large-norms-zero-bias": ({}, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 2e-2}, _scaled(20.0, zero_bias=True)),
    "scale-clip": ({"scale_clip": (0.1, 4.0)}, {"lr": 1e-2, "betas": (0.9, 0.99)}, {"lr": 5e-3}, None),
}


@pytest.mark.parametrize("case", HOLOCRON_RALARS_CASES)
def test_ralars_matches_holocron_ralars(case: str) -> None:
    common, a, b, prepare = HOLOCRON_RALARS_CASES[case]
    result = run_parity(
        lambda gs: holocron_optim().RaLars(torch_groups(gs, a, b), **common),
        lambda gs: RaLars(torch_groups(gs, a, b), **common),
        HOLOCRON_LAMB_STATE,
        prepare=prepare,
    )
    result.assert_within()


# --- the spec's check values ----------------------------------------------------------------------------------------


def _steps(opt_of: Any, p0: list[float], grads: list[list[float]]) -> tuple[Tensor, Any]:
    w = torch.nn.Parameter(torch.tensor(p0, dtype=F64))
    opt = opt_of([w])
    for g in grads:
        w.grad = torch.tensor(g, dtype=F64)
        opt.step()
    return w.detach(), opt.state[w]


G = [0.1, 0.2, 0.3]
P = [1.0, 2.0, 3.0]
SPEC_CASES = {
    # name: (optimizer factory, p0, gradients, expected p, expected trust_ratio or None, tolerance)
    "H.1 LARS": (lambda ps: LARS(ps, lr=0.1, weight_decay=0.1), P, [G], [0.9, 1.8, 2.7], 5.0, 1e-12),
    # The spec's [-.1, -.2, -.3] is an arithmetic slip: holocron itself gives p - lr * g.
    "H.1 LARS zero param": (lambda ps: LARS(ps, lr=0.1), [0.0] * 3, [G], [-0.01, -0.02, -0.03], 1.0, 1e-12),
    "H.2 holocron LAMB": (
        lambda ps: LAMB(ps, lr=0.1, bias_correction=False),
        P,
        [G],
        [0.7840, 1.7840, 2.7840],
        0.6831,
        2e-4,
    ),
    "H.2 holocron LAMB zero param": (
        lambda ps: LAMB(ps, lr=0.1, bias_correction=False),
        [0.0] * 3,
        [G],
        [-0.3162] * 3,
        1.0,
        2e-4,
    ),
    "H.2 holocron LAMB clamp": (
        lambda ps: LAMB(ps, lr=0.1, bias_correction=False),
        [100.0] * 3,
        [G],
        None,
        1.8257,
        2e-4,
    ),
    "H.3 RaLars t=5": (lambda ps: RaLars(ps, lr=0.1), P, [G] * 5, [0.514366, 1.170466, 1.826566], None, 2e-6),
    # fastai's local lr (.02, .1, .2 in the spec) is lr times gradstep's trust_ratio.
    "F.3.6 Larc": (lambda ps: LARC(ps, lr=0.1), P, [G], [0.998, 1.996, 2.994], 0.2, 1e-9),
    "F.3.6 Larc clipped": (lambda ps: LARC(ps, lr=0.1), P, [[0.01, 0.02, 0.03]], [0.999, 1.998, 2.997], 1.0, 1e-9),
    "F.3.6 Larc unclipped": (
        lambda ps: LARC(ps, lr=0.1, clip=False),
        P,
        [[0.01, 0.02, 0.03]],
        [0.998, 1.996, 2.994],
        2.0,
        1e-8,
    ),
    "F.3.7 fastai Lamb": (lambda ps: get("fastai_lamb")(ps, lr=0.1), P, [G], [0.784, 1.784, 2.784], None, 2e-3),
    "F.3.7 fastai Lamb zero param": (lambda ps: get("fastai_lamb")(ps, lr=0.1), [0.0] * 3, [G], [-0.1] * 3, 1.0, 1e-3),
    "F.3.7 fastai Lamb ratio cap": (
        lambda ps: get("fastai_lamb")(ps, lr=0.1),
        [100.0] * 3,
        [G],
        [99.0] * 3,
        10.0,
        1e-3,
    ),
    "X.3 pto Lamb": (
        lambda ps: LAMB(ps, lr=0.1, eps=1e-6, weight_decay_mode="decoupled", **PTO_LAMB),
        P,
        [G],
        [-1.160, -0.160, 0.840],
        0.683,
        2e-3,
    ),
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_spec_check_values(case: str) -> None:
    opt_of, p0, grads, expected, ratio, tol = SPEC_CASES[case]
    p, state = _steps(opt_of, p0, grads)
    if expected is not None:
        torch.testing.assert_close(p, torch.tensor(expected, dtype=F64), rtol=0, atol=tol)
    if ratio is not None:
        assert float(state["trust_ratio"]) == pytest.approx(ratio, rel=1e-6, abs=tol)


def test_larc_zero_norm_rule_is_an_option() -> None:
    # fastai's formula (the default) leaves a zero parameter at zero; trust_zero="one" lets it train.
    frozen, _ = _steps(lambda ps: LARC(ps, lr=0.1), [0.0] * 3, [G, G])
    moving, state = _steps(lambda ps: LARC(ps, lr=0.1, trust_zero="one"), [0.0] * 3, [G])
    assert torch.equal(frozen, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(moving, -0.1 * torch.tensor(G, dtype=F64), rtol=1e-12, atol=0)
    assert float(state["trust_ratio"]) == 1.0


@pytest.mark.parametrize(
    ("cls", "hypers", "name"),
    [
        (LARS, {"scale_clip": (5.0, 1.0)}, "scale_clip"),
        (LARS, {"scale_clip": 10.0}, "scale_clip"),
        (LARC, {"trust_zero": "zero"}, "trust_zero"),
        (LAMB, {"max_trust_ratio": 0.0}, "max_trust_ratio"),
        (LAMB, {"weight_decay_mode": "inside"}, "weight_decay_mode"),
        (RaLars, {"rectify_threshold": 3.0}, "rectify_threshold"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(cls: type, hypers: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **hypers)

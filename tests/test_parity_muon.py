"""Muon against torch.optim.Muon (torch 2.13), parameters and state, and its options torch lacks.

torch always runs the Newton–Schulz iteration in bfloat16, whose rounding (2^-8) would hide any difference in the
update rule. The float64 parity runs therefore replace torch's ``_zeropower_via_newtonschulz`` by the same function
without the cast (a literal copy, :func:`gradstep.lab.bench_muon.torch_newton_schulz_uncast`) and compare it with
``ns_dtype=None``; the bfloat16 path is compared, unpatched, over single steps with a bound derived from bfloat16's
precision.

Every parity run: 200 float64 steps, matrices of several shapes (tall, wide, square, two of one shape, so batching
acts) dealt into two groups with different hyperparameters, the gradient ``sin(3p + t + i) + 0.3p`` from each side's
own parameters, every parameter compared after every step and ``momentum_buffer`` after steps 1-3 and every 10th.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import Tensor

import gradstep
from gradstep.core import matrix
from gradstep.lab.bench_muon import torch_newton_schulz_uncast
from gradstep.optim.muon import NS_COEFFICIENTS
from parity import make_params, relative_difference, torch_groups
from test_parity_adaptive import run_with_state

SHAPES: tuple[tuple[int, ...], ...] = ((8, 16), (16, 8), (6, 6), (8, 16), (5, 3), (3, 5))
TOL = 1e-6


@pytest.fixture
def exact_torch_muon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", torch_newton_schulz_uncast)


CONFIGS: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({}, {"lr": 0.02}, {"lr": 0.01}),
    (
        {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "ns_steps": 3},
        {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.9},
        {"lr": 0.005, "weight_decay": 0.2, "momentum": 0.5},
    ),
    (
        {"ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-3, "adjust_lr_fn": "original", "ns_steps": 7},
        {"lr": 0.03, "momentum": 0.0},
        {"lr": 0.02, "momentum": 0.99, "weight_decay": 0.01},
    ),
    (
        {"momentum": 0.8, "weight_decay": 0.05},
        {"lr": 0.02, "nesterov": False},
        {"lr": 0.01, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"},
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[f"config{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("foreach", [True, False], ids=["batched", "per-tensor"])
def test_parity_with_torch_muon_float64(exact_torch_muon: None, config: Any, foreach: bool) -> None:
    common, group0, group1 = config
    result = run_with_state(
        lambda groups: torch.optim.Muon(torch_groups(groups, group0, group1), **common),
        lambda groups: gradstep.Muon(torch_groups(groups, group0, group1), **common, ns_dtype=None, foreach=foreach),
        {"momentum_buffer": "momentum_buffer"},
        shapes=SHAPES,
    )
    result.assert_within(TOL)


def test_bfloat16_iteration_matches_torch_within_bfloat16_rounding() -> None:
    """Unpatched torch (bfloat16 iteration) against the default ``ns_dtype="bfloat16"``, one step at a time.

    Each step starts both sides from the same parameters and momentum. Both round the same float32 input to bfloat16
    and run 5 iterations there; they differ only in the order of the accumulations (a batched ``baddbmm``, a per-matrix
    norm), i.e. by a few bfloat16 roundings per iteration. Each of the 5 iterations adds a relative error of about
    3 roundings (the two products and the sum), 2^-8 each, so the step differs by at most ~16 * 2^-8 relative.
    """
    bound = 16 * 2.0**-8
    torch_params = make_params(SHAPES, dtype=torch.float32)
    mine = [p.detach().clone().requires_grad_() for p in torch_params]
    ref_opt = torch.optim.Muon(torch_params, lr=0.02)
    opt = gradstep.Muon(mine, lr=0.02)
    for t in range(1, 11):
        before = [p.detach().clone() for p in torch_params]
        for i, (p, q) in enumerate(zip(torch_params, mine)):
            p.grad = torch.sin(3 * p.detach() + t + i)
            q.grad = p.grad.clone()
        ref_opt.step()
        opt.step()
        for p, q, b in zip(torch_params, mine, before):
            step_ref, step_mine = p.detach() - b, q.detach() - b
            assert relative_difference(step_ref, step_mine) <= bound
            assert relative_difference(step_ref, b * -0.002) > bound  # premise: the steps are not just the decay
            q.data.copy_(p.detach())  # the next step starts from torch's parameters and momentum
            opt.state[q]["momentum_buffer"].copy_(ref_opt.state[p]["momentum_buffer"])


def test_torch_state_dict_maps_onto_gradstep(exact_torch_muon: None) -> None:
    """torch's state (``momentum_buffer``) is gradstep's under the same key: loaded into gradstep, the runs continue
    together."""
    ref_params, mine = make_params(SHAPES[:3]), make_params(SHAPES[:3])
    ref_opt, opt = torch.optim.Muon(ref_params, lr=0.02), gradstep.Muon(mine, lr=0.02, ns_dtype=None)

    def steps(start: int, stop: int, *sides: tuple[torch.optim.Optimizer, list[Tensor]]) -> None:
        for t in range(start, stop):
            for o, params in sides:
                for i, p in enumerate(params):
                    p.grad = torch.sin(3 * p.detach() + t + i)
                o.step()

    steps(0, 5, (ref_opt, ref_params))
    with torch.no_grad():
        for p, q in zip(ref_params, mine):
            q.copy_(p)
    state = opt.state_dict()
    state["state"] = {
        i: {"step": torch.tensor(5.0, dtype=torch.float64), "momentum_buffer": s["momentum_buffer"].clone()}
        for i, s in ref_opt.state_dict()["state"].items()
    }
    opt.load_state_dict(state)
    steps(5, 25, (ref_opt, ref_params), (opt, mine))
    for p, q in zip(ref_params, mine):
        assert relative_difference(p, q) <= TOL


# --- options torch lacks --------------------------------------------------------------------------------------------
def _one_step(params: list[Tensor], **hypers: Any) -> list[Tensor]:
    params = [p.detach().clone().requires_grad_() for p in params]
    hypers = {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0, "nesterov": False, "ns_dtype": None, **hypers}
    opt = gradstep.Muon(params, **hypers)
    for i, p in enumerate(params):
        p.grad = torch.sin(3 * p.detach() + i)
    opt.step()
    return [p.detach() for p in params]


def _reference_step(p: Tensor, grad: Tensor, fn: str | None = None) -> Tensor:
    """One step of torch's rule (momentum 0) on one matrix, in float64."""
    a, b = p.shape
    scale = 0.2 * max(a, b) ** 0.5 if fn == "match_rms_adamw" else max(1.0, a / b) ** 0.5
    return p - 0.1 * scale * torch_newton_schulz_uncast(grad, NS_COEFFICIENTS, 5, 1e-7)


def test_batch_mode_orthogonalizes_each_matrix_of_a_3d_weight() -> None:
    (w,) = make_params([(4, 6, 3)])
    (got,) = _one_step([w], tensor_mode="batch")
    grad = torch.sin(3 * w.detach())
    for k in range(4):
        torch.testing.assert_close(got[k], _reference_step(w.detach()[k], grad[k]), rtol=1e-12, atol=1e-12)


def test_flatten_mode_treats_a_conv_weight_as_its_2d_reshape() -> None:
    (w,) = make_params([(6, 3, 3, 3)])
    (got,) = _one_step([w], tensor_mode="flatten")
    want = _reference_step(w.detach().reshape(6, -1), torch.sin(3 * w.detach()).reshape(6, -1))
    torch.testing.assert_close(got, want.reshape(6, 3, 3, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [None, "match_rms_adamw"])
def test_split_fused_qkv_equals_three_separate_matrices(fn: str | None) -> None:
    (qkv,) = make_params([(12, 8)])
    (got,) = _one_step([qkv], split_size=4, adjust_lr_fn=fn)
    grad = torch.sin(3 * qkv.detach())
    for k in range(3):
        rows = slice(4 * k, 4 * k + 4)
        torch.testing.assert_close(
            got[rows], _reference_step(qkv.detach()[rows], grad[rows], fn), rtol=1e-12, atol=1e-12
        )
    # per parameter, through opt_args: the same
    p = qkv.detach().clone().requires_grad_()
    p.opt_args = {"split_size": 4}  # type: ignore[attr-defined]
    opt = gradstep.Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype=None, adjust_lr_fn=fn)
    p.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), got, rtol=0, atol=0)


def test_float32_iteration_of_float64_params_rounds_like_float32() -> None:
    (w,) = make_params([(8, 16)])
    (exact,) = _one_step([w])
    (fp32,) = _one_step([w], ns_dtype="float32")
    assert fp32.dtype == torch.float64
    difference = relative_difference(exact - w.detach(), fp32 - w.detach())
    assert 0 < difference <= 64 * 2.0**-24  # float32 roundings over 5 iterations, not more


def test_same_shape_matrices_run_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[tuple[int, ...]] = []
    original = matrix.newton_schulz

    def counting(x: Tensor, *args: Any) -> Tensor:
        batches.append(tuple(x.shape))
        return original(x, *args)

    monkeypatch.setattr(matrix, "newton_schulz", counting)
    params = make_params([(16, 8)] * 12 + [(8, 16)] * 12 + [(5, 7)])
    _one_step(params)
    # Tall matrices go through their transpose, so 24 matrices of 8x16 make one batch; the 5x7 matrix, alone in its
    # shape, goes through torch's 2-D ops (newton_schulz_matrix).
    assert batches == [(24, 8, 16)]


def test_a_matrix_alone_is_orthogonalized_in_bfloat16_to_torchs_bit() -> None:
    """CPU ``addmm`` rounds ``beta * C + alpha * A @ B`` once (a fused multiply-add), ``baddbmm`` rounds ``beta * C``
    first: a bfloat16 result on a rounding tie then comes out one ulp apart (on an AVX-512 CPU, 5 of these 240 through a
    batch of one), which a resumed run carries on. A matrix alone in its shape goes through torch's own ops, so it
    matches torch bit for bit."""
    for coefficients in (NS_COEFFICIENTS, (3.4, -4.7, 2.0)):
        gen = torch.Generator().manual_seed(0)
        for k in range(120):
            shape = [(3, 4), (5, 2)][k % 2]
            grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 * torch.rand((), generator=gen)
            want = torch_muon._zeropower_via_newtonschulz(grad, coefficients, 5, 1e-7)
            (got,) = matrix.orthogonalize([grad], coefficients, 5, 1e-7, torch.bfloat16)
            assert torch.equal(got, want.to(torch.float64)), (coefficients, k)


def test_bfloat16_runs_match_torch_to_the_bit_one_matrix_per_shape() -> None:
    """torch.optim.Muon (bfloat16 iteration, float64 parameters) and gradstep's default, 30 steps, both paths."""
    shapes = ((5, 2), (3, 4), (6, 6))
    for foreach in (True, False):
        ref = make_params(shapes)
        mine = [p.detach().clone().requires_grad_() for p in ref]
        ref_opt = torch.optim.Muon(ref, lr=0.02, ns_coefficients=(3.4, -4.7, 2.0))
        opt = gradstep.Muon(mine, lr=0.02, ns_coefficients=(3.4, -4.7, 2.0), foreach=foreach)
        for t in range(30):
            for i, (p, q) in enumerate(zip(ref, mine)):
                p.grad = torch.sin(3 * p.detach() + t + i) + 0.3 * p.detach()
                q.grad = torch.sin(3 * q.detach() + t + i) + 0.3 * q.detach()
            ref_opt.step()
            opt.step()
        for p, q in zip(ref, mine):
            assert relative_difference(p, q) <= 1e-13  # lr * (s * O) against (lr * s) * O: float64 rounding only


def test_tensors_of_three_or_more_dims_are_refused_by_default_as_torch() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"parameter 'conv.weight' has shape \(2, 3, 4\).*tensor_mode"):
        gradstep.Muon([{"params": [w], "param_names": ["conv.weight"]}])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon([w])
    for mode in ("flatten", "batch"):
        gradstep.Muon([w], tensor_mode=mode)


def test_vectors_are_refused_naming_the_parameter() -> None:
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="bias"):
        gradstep.Muon([{"params": list(model.parameters()), "param_names": ["weight", "bias"]}])
    with pytest.raises(ValueError, match="2 or more"):
        gradstep.Muon([torch.nn.Parameter(torch.zeros(3))])

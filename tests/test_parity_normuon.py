"""NorMuon against pytorch_optimizer's NorMuon (4.1.0) and against a float64 transcription of the paper's Algorithm 1.

pytorch_optimizer iterates Newton–Schulz in bfloat16 (a fixed dtype), which would hide any difference in the update
rule: the parity runs call its ``zero_power_via_newton_schulz_5`` with the input's dtype instead (the same function,
``dtype=`` given) and gradstep with ``ns_dtype=None``. Every run: 200 float64 steps, 2-D weights and a 4-D
convolution weight (flattened to a matrix by both) in two groups with different hyperparameters, parameters after
every step and both state tensors after steps 1-3 and every 10th, within 1e-6 relative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import pytorch_optimizer.optimizer.muon.base as pto_muon_base
import pytorch_optimizer.optimizer.muon.normuon as pto_normuon
import torch
from pytorch_optimizer.optimizer.utils.matrix import NS_COEFFICIENTS
from torch import Tensor

import gradstep
from gradstep.lab.bench_muon import torch_newton_schulz_uncast
from parity import torch_groups
from test_parity_adaptive import run_with_state

SHAPES: tuple[tuple[int, ...], ...] = ((8, 12), (4, 3, 3, 3), (12, 8), (6, 6))
TOL = 1e-6
STATE = {"momentum_buffer": "momentum_buffer", "second_momentum_buffer": "second_momentum_buffer"}


@pytest.fixture
def exact_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pto_normuon.zero_power_via_newton_schulz_5

    def in_input_dtype(g: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return original(g, *args, **{**kwargs, "dtype": g.dtype})

    monkeypatch.setattr(pto_normuon, "zero_power_via_newton_schulz_5", in_input_dtype)
    monkeypatch.setattr(pto_muon_base, "zero_power_via_newton_schulz_5", in_input_dtype)


CONFIGS: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({}, {"lr": 0.02}, {"lr": 0.01}),
    (
        {"update_scale": "match_rms", "nesterov": False, "beta2": 0.9},
        {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.8},
        {"lr": 0.005, "weight_decay": 0.0, "eps": 1e-6},
    ),
    (
        {"use_adjusted_lr": True, "ns_steps": 4, "weight_decay": 0.05},
        {"lr": 0.01, "beta2": 0.5, "nesterov": False},
        {"lr": 0.02, "momentum": 0.5},
    ),
]


def test_coefficient_schedule_matches_pytorch_optimizers_polar_express(exact_reference: None) -> None:
    schedule = [tuple(c) for c in NS_COEFFICIENTS["polar_express"]]
    hypers = {"ns_steps": 6, "update_scale": "match_rms"}
    result = run_with_state(
        lambda groups: pytorch_optimizer.NorMuon(
            torch_groups(groups, {"use_muon": True}, {"use_muon": True, "lr": 0.01}),
            ns_coeffs="polar_express",
            foreach=False,
            **hypers,
        ),
        lambda groups: gradstep.NorMuon(
            torch_groups(groups, {}, {"lr": 0.01}), ns_coefficients=schedule, ns_dtype=None, **hypers
        ),
        STATE,
        shapes=SHAPES,
        steps=100,
    )
    result.assert_within(TOL)


def _pto(config: Any) -> Callable[[list[list[Tensor]]], torch.optim.Optimizer]:
    common, group0, group1 = config
    return lambda groups: pytorch_optimizer.NorMuon(
        torch_groups(groups, {"use_muon": True, **group0}, {"use_muon": True, **group1}), **common, foreach=False
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[f"config{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("foreach", [True, False], ids=["batched", "per-tensor"])
def test_parity_with_pytorch_optimizer_float64(exact_reference: None, config: Any, foreach: bool) -> None:
    common, group0, group1 = config
    result = run_with_state(
        _pto(config),
        lambda groups: gradstep.NorMuon(torch_groups(groups, group0, group1), **common, ns_dtype=None, foreach=foreach),
        STATE,
        shapes=SHAPES,
    )
    result.assert_within(TOL)


class PaperNorMuon(torch.optim.Optimizer):
    """Algorithm 1 of the paper, literally, per matrix, in float64 (momentum without Nesterov, match-RMS scale)."""

    def __init__(self, params: Any, lr: float, momentum: float, beta2: float, weight_decay: float, eps: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta2": beta2, "wd": weight_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                g = p.grad.reshape(p.shape[0], -1)
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["second_momentum_buffer"] = torch.zeros(g.shape[0], 1, dtype=g.dtype)
                m, v = state["momentum_buffer"].view(g.shape), state["second_momentum_buffer"]
                m.copy_(group["momentum"] * m + (1 - group["momentum"]) * g)  # M_t = b1 M + (1 - b1) G
                o = torch_newton_schulz_uncast(m, (3.4445, -4.7750, 2.0315), 5, 1e-7)  # O_t = NS5(M_t)
                v.copy_(group["beta2"] * v + (1 - group["beta2"]) * (o * o).mean(dim=1, keepdim=True))
                o_hat = o / (v.sqrt() + group["eps"])  # row-wise
                rows, cols = o.shape
                step_size = 0.2 * group["lr"] * math.sqrt(rows * cols) / o_hat.norm()  # eta-hat
                p.mul_(1 - group["lr"] * group["wd"])
                p.sub_(step_size * o_hat.reshape(p.shape))


def test_parity_with_the_papers_algorithm_float64() -> None:
    hypers = {"lr": 0.01, "momentum": 0.9, "beta2": 0.95, "weight_decay": 0.1, "eps": 1e-8}
    result = run_with_state(
        lambda groups: PaperNorMuon(torch_groups(groups, {}, {"lr": 0.005}), **hypers),
        lambda groups: gradstep.NorMuon(
            torch_groups(groups, {}, {"lr": 0.005}),
            **hypers,
            nesterov=False,
            update_scale="match_rms",
            ns_dtype=None,
        ),
        STATE,
        shapes=SHAPES,
    )
    # gradstep (as pytorch_optimizer) adds eps to the norm the scale divides by; the paper does not: a relative
    # difference of about eps / ||O-hat|| ~ 1e-9 per step.
    result.assert_within(TOL)


def test_vectors_are_refused() -> None:
    with pytest.raises(ValueError, match="2 or more"):
        gradstep.NorMuon([torch.nn.Parameter(torch.zeros(3))])

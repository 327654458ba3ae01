"""Gradient release (gradstep.step_in_backward): the same result as the normal loop, gradients freed during backward,
the non-finite policies of this mode, and the optimizers it refuses."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step)
    return nn.functional.mse_loss(model(x), y)


OPTIMIZERS: dict[str, Any] = {
    "adamw": lambda groups: gradstep.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "sgd_nesterov": lambda groups: gradstep.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "rmsprop_centered": lambda groups: gradstep.RMSprop(groups, lr=1e-3, centered=True, momentum=0.5),
    "lamb": lambda groups: gradstep.LAMB(groups, lr=1e-2, weight_decay=0.01),  # per-tensor trust ratios
    "lars": lambda groups: gradstep.LARS(groups, lr=0.1, momentum=0.9),
}


def _run(name: str, release: bool, steps: int = 6) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = OPTIMIZERS[name](gradstep.param_groups(model, weight_decay=0.05))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    handle = gradstep.step_in_backward(opt) if release else None
    for step in range(steps):
        _loss(model, step).backward()
        if release:
            assert all(p.grad is None for p in model.parameters())  # freed as they were used
        opt.step()
        opt.zero_grad()
        sched.step()
    if handle is not None:
        handle.remove()
    return model, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stepping_in_backward_equals_the_normal_loop_bit_for_bit(name: str) -> None:
    normal_model, normal_opt = _run(name, release=False)
    model, opt = _run(name, release=True)
    for (key, a), b in zip(normal_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key}"
    for p_normal, p in zip(normal_model.parameters(), model.parameters()):
        for key, value in normal_opt.state[p_normal].items():
            assert torch.equal(value, opt.state[p][key]), f"{name}: state {key}"
    assert opt.global_step == normal_opt.global_step == 6  # step() after backward still counts the step


def test_remove_returns_to_the_normal_loop() -> None:
    model = _model()
    opt = gradstep.SGD(model.parameters(), lr=0.1)
    with gradstep.step_in_backward(opt) as release:
        _loss(model, 0).backward()
        assert release.stepped_in_backward == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, 1).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing stepped in backward


def test_an_attached_ema_updates_once_per_backward_through_the_bookkeeping_step() -> None:
    model = _model()
    opt = gradstep.AdamW(model.parameters(), lr=1e-2)
    ema = gradstep.EMA(model, decay=0.5)
    ema.attach(opt)
    gradstep.step_in_backward(opt)
    for step in range(3):
        _loss(model, step).backward()
        opt.step()
    assert ema.num_updates == 3


def test_nonfinite_error_names_the_parameter_and_says_what_was_already_stepped() -> None:
    model = _model()
    opt = gradstep.AdamW(model.parameters(), lr=1e-2)
    release = gradstep.step_in_backward(opt)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # A NaN reaching the first layer's weight gradient only: the gradients are computed last layer first.
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(gradstep.NonFiniteError, match=r"params'\]\[0\].*already stepped and keep their update"):
        _loss(model, 0).backward()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "5.weight" in moved and "0.weight" not in moved  # not all-or-nothing in this mode, as documented
    assert release.stepped_in_backward == len(moved)


def test_nonfinite_zero_and_revert_act_per_element_as_in_the_normal_loop() -> None:
    for policy in ("zero", "revert"):
        results = []
        for release in (False, True):
            model = _model()
            opt = gradstep.AdamW(model.parameters(), lr=1e-2, nonfinite=policy)
            model[3].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([2]), float("inf")))
            handle = gradstep.step_in_backward(opt) if release else None
            for step in range(3):
                _loss(model, step).backward()
                opt.step()
                opt.zero_grad()
            if handle is not None:
                handle.remove()
            results.append(model.state_dict())
        assert all(torch.equal(results[0][k], results[1][k]) for k in results[0]), policy
        assert all(torch.isfinite(v).all() for v in results[1].values())


def test_refused_optimizers_and_policies_name_the_reason() -> None:
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        gradstep.step_in_backward(gradstep.AdamW(params, nonfinite="skip"))
    with pytest.raises(ValueError, match="compiled=True"):
        gradstep.step_in_backward(gradstep.AdamW(params, compiled=True))
    with pytest.raises(TypeError, match="ChainedOptimizer"):
        gradstep.step_in_backward(torch.optim.AdamW(params))
    with pytest.raises(TypeError, match="ChainedOptimizer"):
        gradstep.step_in_backward(gradstep.Lookahead(gradstep.AdamW(params)))
    with pytest.raises(TypeError, match="reads the whole model"):  # schedule-free averaging, D-Adaptation's d
        gradstep.step_in_backward(gradstep.SGDScheduleFree(params))
    with pytest.raises(TypeError, match="reads the whole model"):
        gradstep.step_in_backward(gradstep.Prodigy(params))
    with pytest.raises(TypeError, match="whole param group"):
        gradstep.step_in_backward(gradstep.Adan(params, max_grad_norm=1.0))  # clips by the group norm
    # Nothing was hooked by the refused calls: a backward keeps its gradients.
    model = _model()
    opt = gradstep.AdamW(model.parameters(), nonfinite="skip")
    with pytest.raises(ValueError):
        gradstep.step_in_backward(opt)
    _loss(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_example_is_bitwise_equal_to_the_normal_loop() -> None:
    example = load_example("step_in_backward")
    assert example.main() is True

"""CosineSchedule: GoMLX's cosine annealing with warm restarts (spec G.8), plus warm-up.

GoMLX cannot run here. The schedule is checked against the formula of GoMLX's unit test (period 100, lr 1, min 0.001)
written out literally, against torch's ``CosineAnnealingWarmRestarts`` (the same curve for a fixed period), for
GoMLX's negative periods (cycles over the run), and for an exact resume from ``state_dict``.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradstep
from gradstep.tools.schedules import CosineSchedule


def lrs_seen(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list[float]]:
    """The lr of every group used by each of ``steps`` optimizer steps (read before the step, as the step reads it)."""
    seen = []
    for _ in range(steps):
        seen.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def sgd(*lrs: float) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def test_reproduces_gomlx_unit_test_formula():
    opt = sgd(1.0)
    sched = CosineSchedule(opt, period_steps=100, min_lr=0.001)
    seen = lrs_seen(opt, sched, 250)
    for ii, (lr,) in enumerate(seen):
        frac = ii / 100 - math.floor(ii / 100)
        assert lr == pytest.approx(0.001 + 0.999 * (1 + math.cos(math.pi * frac)) / 2, rel=0, abs=1e-12)
    assert seen[0] == seen[100] == seen[200] == [1.0]  # warm restarts
    assert seen[99][0] < 0.0013


def test_fixed_period_equals_torch_cosine_annealing_warm_restarts():
    ours, theirs = sgd(0.3, 0.02), sgd(0.3, 0.02)
    a = CosineSchedule(ours, period_steps=7, min_lr=[0.01, 0.0])
    b = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(theirs, T_0=7, T_mult=1, eta_min=0.01)
    got, ref = lrs_seen(ours, a, 30), lrs_seen(theirs, b, 30)
    for step, (g, r) in enumerate(zip(got, ref)):
        assert g[0] == pytest.approx(r[0], rel=1e-12), step
    # The second group has its own lr_max and min_lr 0.
    for step, g in enumerate(got):
        assert g[1] == pytest.approx(0.02 * (1 + math.cos(math.pi * (step % 7) / 7)) / 2, rel=0, abs=1e-15)


@pytest.mark.parametrize("cycles", [1, 3])
def test_negative_period_is_a_number_of_cycles_over_the_run(cycles):
    total = 60
    opt = sgd(0.5)
    sched = CosineSchedule(opt, period_steps=-cycles, min_lr=0.05, total_steps=total)
    seen = [lr for (lr,) in lrs_seen(opt, sched, total)]
    period = total / cycles
    for s, lr in enumerate(seen):
        c = max(s / period, 0.0)
        assert lr == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi * (c - math.floor(c)))) / 2, abs=1e-12)
    restarts = [s for s in range(1, total) if seen[s] > seen[s - 1]]
    assert restarts == [int(period * k) for k in range(1, cycles)]


def test_linear_warmup_then_cosine_from_lr_max():
    opt = sgd(0.2)
    sched = CosineSchedule(opt, period_steps=10, min_lr=0.0, warmup_steps=4, warmup_start_factor=0.25)
    seen = [lr for (lr,) in lrs_seen(opt, sched, 30)]
    for s in range(4):
        assert seen[s] == pytest.approx(0.2 * (0.25 + 0.75 * s / 4), abs=1e-15)
    for s in range(4, 30):
        frac = ((s - 4) % 10) / 10
        assert seen[s] == pytest.approx(0.2 * (1 + math.cos(math.pi * frac)) / 2, abs=1e-15)
    assert seen[4] == seen[14] == 0.2
    # With a negative period, the cycles cover the steps after the warm-up.
    opt = sgd(1.0)
    sched = CosineSchedule(opt, period_steps=-2, total_steps=24, warmup_steps=4)
    seen = [lr for (lr,) in lrs_seen(opt, sched, 24)]
    assert seen[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and seen[14] == 1.0 and seen[13] < 0.03


def test_max_lr_overrides_the_optimizer_lr_per_group():
    opt = sgd(1.0, 1.0)
    sched = CosineSchedule(opt, period_steps=4, max_lr=[0.4, 0.8], min_lr=[0.0, 0.2])
    seen = lrs_seen(opt, sched, 3)
    assert seen[0] == [0.4, 0.8]
    assert seen[2] == pytest.approx([0.2, 0.5])


def resume_run(opt_factory, scheduler_factory, total: int, split: int, scheduler_first: bool):
    """Run ``total`` steps straight, and as ``split`` steps + save + fresh objects + load + the rest."""
    torch.manual_seed(0)
    target = torch.randn(5, dtype=torch.float64)

    def run(opt, sched, steps, params):
        seen = []
        for _ in range(steps):
            seen.append([float(g["lr"]) for g in opt.param_groups])
            opt.zero_grad()
            ((params[0] - target) ** 2).sum().backward()
            opt.step()
            sched.step()
        return seen

    p = [torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    opt = opt_factory(p)
    straight = run(opt, scheduler_factory(opt), total, p)
    straight_params = p[0].detach().clone()

    p = [torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    opt = opt_factory(p)
    sched = scheduler_factory(opt)
    first = run(opt, sched, split, p)
    saved_params = p[0].detach().clone()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    p = [torch.nn.Parameter(saved_params.clone())]
    opt = opt_factory(p)
    if scheduler_first:  # torch's recommended order
        sched = scheduler_factory(opt)
        opt.load_state_dict(opt_state)
    else:  # the order torch warns about: the scheduler's creation overwrites the loaded lr
        opt.load_state_dict(opt_state)
        sched = scheduler_factory(opt)
    sched.load_state_dict(sched_state)
    second = run(opt, sched, total - split, p)
    return straight, first + second, straight_params, p[0].detach()


@pytest.mark.parametrize("scheduler_first", [True, False])
@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda p: gradstep.Adam([{"params": p, "lr": 0.1}]),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ],
    ids=["gradstep-adam", "torch-sgd"],
)
def test_resumes_exactly_from_state_dict(opt_factory, scheduler_first):
    def factory(opt):
        return CosineSchedule(opt, period_steps=-3, min_lr=1e-3, total_steps=40, warmup_steps=3)

    straight, resumed, p_straight, p_resumed = resume_run(opt_factory, factory, 40, 17, scheduler_first)
    assert resumed == straight
    assert torch.equal(p_resumed, p_straight)


def test_the_state_dict_holds_the_configuration():
    opt = sgd(0.1)
    sched = CosineSchedule(opt, period_steps=5, min_lr=0.01, warmup_steps=2)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 3 and state["period_steps"] == 5 and state["min_lrs"] == [0.01]
    other = CosineSchedule(sgd(0.1), period_steps=99)
    other.load_state_dict(state)
    assert other.period_steps == 5 and other.get_last_lr() == sched.get_last_lr()


def test_tensor_lr_is_written_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.1))
    lr_tensor = opt.param_groups[0]["lr"]
    sched = CosineSchedule(opt, period_steps=2, min_lr=0.0)
    p.grad = torch.ones(2)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(period_steps=0), "period_steps"),
        (dict(period_steps=2.5), "period_steps"),
        (dict(period_steps=-1), "total_steps"),
        (dict(period_steps=-1, total_steps=3, warmup_steps=3), "total_steps"),
        (dict(period_steps=5, min_lr=-0.1), "min_lr"),
        (dict(period_steps=5, min_lr=[0.1, 0.2]), "min_lr has 2 values for 1"),
        (dict(period_steps=5, max_lr=float("nan")), "max_lr"),
        (dict(period_steps=5, warmup_steps=-1), "warmup_steps"),
        (dict(period_steps=5, warmup_start_factor=1.5), "warmup_start_factor"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineSchedule(sgd(0.1), **kwargs)

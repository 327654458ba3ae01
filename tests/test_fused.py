"""The fused path: groups whose chain is Adam, AdamW, SGD or Adagrad with options torch's fused kernels can do are
stepped by those kernels, bitwise as ``torch.optim.X(fused=True)``; ``fused=`` follows torch; every other option keeps
the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import gradstep
from gradstep.core.nonfinite import NonFiniteError

SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (4, 3), (2, 3, 2, 2))
STEPS = 25


def make_params(dtype: torch.dtype, shapes: tuple[tuple[int, ...], ...] = SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.rand(s, generator=gen, dtype=torch.float64) * 3 - 1.5).to(dtype)) for s in shapes]


def grad_of(p: Tensor, t: int, i: int) -> Tensor:
    return torch.sin(3 * p.detach() + t + i) + 0.3 * p.detach()


def two_groups(params: list[torch.nn.Parameter], a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": params[0::2], **a}, {"params": params[1::2], **b}]


def run(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int = STEPS,
    scheduled: bool = False,
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = make_params(dtype)
    opt = make(params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7) if scheduled else None
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = grad_of(p, t, i)
        opt.step()
        if sched is not None:
            sched.step()
    return params, opt


CASES: dict[str, tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer], dict[str, Any], dict[str, Any]]] = {
    "adamw-amsgrad-maximize": (
        torch.optim.AdamW,
        gradstep.AdamW,
        {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 3e-2, "betas": (0.8, 0.95), "maximize": True},
    ),
    "adam-coupled-decay": (
        torch.optim.Adam,
        gradstep.Adam,
        {"lr": 1e-2, "weight_decay": 0.05, "eps": 1e-6},
        {"lr": 2e-2, "betas": (0.5, 0.9), "amsgrad": True},
    ),
    "sgd-momentum-dampening": (
        torch.optim.SGD,
        gradstep.SGD,
        {"lr": 5e-2, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
        {"lr": 1e-2, "momentum": 0.5, "maximize": True},
    ),
    "adagrad-decay": (
        torch.optim.Adagrad,
        gradstep.Adagrad,
        {"lr": 5e-2, "lr_decay": 0.01, "weight_decay": 0.05},
        {"lr": 2e-2, "eps": 1e-6, "maximize": True},
    ),
    "sgd-nesterov-and-plain": (
        torch.optim.SGD,
        gradstep.SGD,
        {"lr": 5e-2, "momentum": 0.9, "nesterov": True},
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_default_path_is_bitwise_torch_fused(case: str, dtype: torch.dtype) -> None:
    torch_cls, gs_cls, a, b = CASES[case]
    theirs, t_opt = run(lambda ps: torch_cls(two_groups(ps, a, b), fused=True), dtype, scheduled=True)
    mine, g_opt = run(lambda ps: gs_cls(two_groups(ps, a, b), nonfinite="ignore"), dtype, scheduled=True)
    for x, y in zip(theirs, mine):
        assert torch.equal(x, y)
        # Every buffer torch keeps, bitwise (gradstep also counts steps for SGD, where torch keeps none).
        assert set(t_opt.state[x]) <= set(g_opt.state[y])
        for key, value in t_opt.state[x].items():
            assert torch.equal(value, g_opt.state[y][key]), key
    moved = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(mine, make_params(dtype))]
    assert min(moved) > 1e-3


def test_adam_decoupled_weight_decay_flag_is_bitwise_torch_fused() -> None:
    hypers = {"lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True}
    theirs, _ = run(lambda ps: torch.optim.Adam(ps, fused=True, **hypers), torch.float32)
    mine, _ = run(lambda ps: gradstep.Adam(ps, **hypers), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(theirs, mine))


def test_tensor_lr_and_screened_default_are_bitwise_torch_fused() -> None:
    # The default non-finite policy ("error") screens first; with finite gradients the step is the kernel's.
    hypers = {"lr": torch.tensor(0.02), "weight_decay": 0.1}
    theirs, _ = run(lambda ps: torch.optim.AdamW(ps, fused=True, **hypers), torch.float32)
    mine, _ = run(lambda ps: gradstep.AdamW(ps, **hypers), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(theirs, mine))


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = [0]
    real = getattr(torch, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, counting)
    return calls


@pytest.mark.parametrize(
    "options",
    [
        {"fused": False},
        {"foreach": False},
        {"clip_step": 0.5},
        {"lr_scale": 0.5},
        {"backoff_steps": 1},
        {"nonfinite": "zero"},
        {"nonfinite": "revert"},
        {"state_dtype": "float64"},
        {"eps_mode": "tf"},
        {"weight_decay_mode": "proximal"},
        {"cautious": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_the_kernel_cannot_do_keep_the_chain(monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]) -> None:
    calls = _count_calls(monkeypatch, "_fused_adamw_")
    calls_adam = _count_calls(monkeypatch, "_fused_adam_")
    params = make_params(torch.float32)
    opt = gradstep.AdamW(params, lr=1e-2, weight_decay=0.1, **options)
    for t in range(1, 4):
        for i, p in enumerate(params):
            p.grad = grad_of(p, t, i)
        opt.step()
    assert calls[0] == 0 and calls_adam[0] == 0


def test_default_uses_the_kernel_once_per_group_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch, "_fused_adamw_")
    params = make_params(torch.float32) + make_params(torch.float64, ((3,),))
    opt = gradstep.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    for i, p in enumerate(params):
        p.grad = grad_of(p, 1, i)
    opt.step()
    assert calls[0] == 3  # group 0 (float32), group 1 (float32 and float64)


def test_per_parameter_opt_args_fall_back_to_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch, "_fused_adamw_")
    params = make_params(torch.float32)
    opt = gradstep.AdamW(params, lr=1e-2)
    params[1].opt_args = {"lr_scale": 0.1}  # type: ignore[attr-defined]
    for i, p in enumerate(params):
        p.grad = grad_of(p, 1, i)
    opt.step()
    assert calls[0] == 0


def test_non_contiguous_tensors_keep_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's CPU fused kernels pair the wrong elements of a transposed parameter (torch.optim.AdamW(fused=True) too):
    # such a parameter, or a gradient laid out otherwise, keeps the group on the chain, which matches a contiguous copy.
    calls = _count_calls(monkeypatch, "_fused_adamw_")
    x = make_params(torch.float32, ((3, 4),))[0]
    strided = torch.nn.Parameter(x.detach().clone().t())
    dense = torch.nn.Parameter(strided.detach().contiguous())
    opts = [gradstep.AdamW([p], lr=0.1) for p in (strided, dense)]
    for t in range(1, 4):
        for p, opt in zip((strided, dense), opts):
            p.grad = grad_of(dense, t, 0)
            opt.step()
    torch.testing.assert_close(strided.detach(), dense.detach(), rtol=1e-6, atol=1e-7)  # chain vs kernel: rounding
    assert calls[0] == 3  # the contiguous copy's steps only
    with pytest.raises(ValueError, match="non-contiguous parameter"):
        gradstep.AdamW([strided], fused=True)
    transposed_grad = torch.nn.Parameter(x.detach().clone())
    opt = gradstep.AdamW([transposed_grad], lr=0.1)
    transposed_grad.grad = grad_of(x, 1, 0).t().contiguous().t()
    opt.step()
    assert calls[0] == 3


def test_the_kernels_read_float32_step_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # The core keeps float64 counts (exact past 2^24); torch's CUDA kernels read a count's memory as float32, so each
    # kernel is handed float32 copies, as torch.optim keeps them.
    seen: list[torch.dtype] = []
    real = torch._fused_adamw_

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.extend(s.dtype for s in args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    params = make_params(torch.float32)
    opt = gradstep.AdamW(params, lr=1e-2)
    for i, p in enumerate(params):
        p.grad = grad_of(p, 1, i)
    opt.step()
    assert seen == [torch.float32] * len(params)
    assert all(opt.state[p]["step"].dtype == torch.float64 and float(opt.state[p]["step"]) == 1 for p in params)


def test_bf16_parameters_keep_fp32_state_on_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch, "_fused_adamw_")
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = gradstep.AdamW([p], lr=1e-2)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert calls[0] == 0 and opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda ps: gradstep.Lion(ps, fused=True), "no fused kernel for Lion"),
        (lambda ps: gradstep.AdamW(ps, fused=True, clip_step=0.1), "clip_step=0.1"),
        (lambda ps: gradstep.AdamW(ps, fused=True, compiled=True), "compiled=True"),
        (lambda ps: gradstep.AdamW(ps, fused=True, foreach=True), "fused and foreach"),
        (lambda ps: gradstep.SGD(ps, fused=True, sqrt_step_decay=True), "no fused kernel for SGD"),
        (lambda ps: gradstep.AdamW(ps, fused=True, nonfinite="zero"), "nonfinite='zero'"),
    ],
)
def test_fused_true_is_refused_naming_what_prevents_it(make: Callable[[Any], Any], named: str) -> None:
    with pytest.raises(ValueError, match="Invalid fused: True") as info:
        make(make_params(torch.float32))
    assert named in str(info.value)


def test_fused_true_refuses_a_group_added_later_and_keeps_the_others() -> None:
    params = make_params(torch.float32)
    opt = gradstep.AdamW(params[:2], lr=1e-2, fused=True)
    with pytest.raises(ValueError, match="clip_step"):
        opt.add_param_group({"params": params[2:], "clip_step": 0.1})
    assert len(opt.param_groups) == 1


def test_nonfinite_error_and_skip_on_the_fused_path_change_nothing() -> None:
    params = make_params(torch.float32)
    opt = gradstep.AdamW(params, lr=1e-2, fused=True)
    for i, p in enumerate(params):
        p.grad = grad_of(p, 1, i)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[2]].items()}
    params[3].grad = params[3].grad.clone()
    params[3].grad.view(-1)[5] = float("nan")
    with pytest.raises(NonFiniteError, match="param"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(v, opt.state[params[2]][k]) for k, v in state_before.items())
    opt.param_groups[0]["nonfinite"] = "skip"
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and opt.skipped_steps == 1


def test_fused_and_chain_state_dicts_are_interchangeable() -> None:
    # A checkpoint of the fused path resumes on the chain (and back): same keys, same meaning.
    fused, f_opt = run(lambda ps: gradstep.AdamW(ps, lr=1e-2, weight_decay=0.1), torch.float64, steps=10)
    chain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    c_opt = gradstep.AdamW(chain_params, lr=1e-2, weight_decay=0.1, fused=False)
    state = f_opt.state_dict()
    state["param_groups"][0]["fused"] = False
    c_opt.load_state_dict(state)
    for t in range(11, 21):
        for opt, params in ((f_opt, fused), (c_opt, chain_params)):
            for i, p in enumerate(params):
                p.grad = grad_of(p, t, i)
            opt.step()
    for a, b in zip(fused, chain_params):
        assert float((a.detach() - b.detach()).abs().max()) <= 1e-12

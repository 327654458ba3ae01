"""Parity of NAdam, Adagrad, Adadelta, ASGD, Rprop and SparseAdam with torch.optim, parameters and every state tensor.

Dense runs (``run_with_state``): 200 float64 steps, a scalar, a bias vector, a 2-D weight and a 4-D conv weight dealt
into two groups with different hyperparameters, three non-default configurations per optimizer, each against torch's
per-tensor (``foreach=False``) and multi-tensor (``foreach=True``) implementations; every state tensor torch keeps is
compared under its own name. Sparse runs: embedding tables with ``nn.Embedding(sparse=True)`` gradients (duplicate
indices included), beside a dense parameter for Adagrad. Last, a torch.optim state_dict taken mid-run loads into the
gradstep optimizer, which then continues as torch does.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import gradstep
from parity import gradient, make_params, relative_difference, split_groups, torch_groups
from test_parity_adaptive import TOL, run_with_state

MAX_SEEN: dict[str, float] = {}

# name: (torch class, gradstep class, state keys, [(constructor hypers, group 0 hypers, group 1 hypers), ...])
CASES: dict[str, tuple[Any, Any, tuple[str, ...], list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]]] = {
    "nadam": (
        torch.optim.NAdam,
        gradstep.NAdam,
        ("exp_avg", "exp_avg_sq", "mu_product"),
        [
            ({"betas": (0.9, 0.99)}, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 5e-3, "momentum_decay": 0.01}),
            ({"decoupled_weight_decay": True, "maximize": True}, {"lr": 2e-2, "weight_decay": 0.05}, {"lr": 1e-2}),
            ({"eps": 1e-4, "momentum_decay": 0.02}, {"lr": 3e-2, "betas": (0.8, 0.95)}, {"lr": 1e-2}),
        ],
    ),
    "adagrad": (
        torch.optim.Adagrad,
        gradstep.Adagrad,
        ("sum",),
        [
            ({"lr_decay": 0.01}, {"lr": 5e-2}, {"lr": 2e-2, "weight_decay": 0.01}),
            ({"initial_accumulator_value": 0.1, "eps": 1e-6, "maximize": True}, {"lr": 0.1}, {"lr": 3e-2}),
            ({"lr_decay": 0.1, "weight_decay": 0.02, "eps": 1e-3}, {"lr": 0.2}, {"lr": 0.05, "lr_decay": 0.0}),
        ],
    ),
    "adadelta": (
        torch.optim.Adadelta,
        gradstep.Adadelta,
        ("square_avg", "acc_delta"),
        [
            ({}, {"lr": 1.0}, {"lr": 0.5, "rho": 0.8}),
            ({"eps": 1e-4, "weight_decay": 0.01, "maximize": True}, {"lr": 0.5}, {"lr": 2.0}),
            ({"rho": 0.95, "eps": 1e-3}, {"lr": 2.0}, {"lr": 0.3, "weight_decay": 0.05}),
        ],
    ),
    "asgd": (
        torch.optim.ASGD,
        gradstep.ASGD,
        ("eta", "mu", "ax"),
        [
            ({"lambd": 1e-3, "alpha": 0.6, "t0": 20.0}, {"lr": 5e-2}, {"lr": 2e-2}),
            ({"weight_decay": 0.01, "t0": 50.0, "maximize": True}, {"lr": 2e-2}, {"lr": 1e-2, "lambd": 0.01}),
            ({"alpha": 0.9, "t0": 0.0}, {"lr": 0.1, "lambd": 0.05}, {"lr": 3e-2, "weight_decay": 0.02}),
        ],
    ),
    "rprop": (
        torch.optim.Rprop,
        gradstep.Rprop,
        ("prev", "step_size"),
        [
            ({}, {"lr": 1e-2}, {"lr": 5e-2}),
            ({"etas": (0.3, 1.5), "step_sizes": (1e-4, 0.2), "maximize": True}, {"lr": 2e-2}, {"lr": 1e-3}),
            ({"etas": (0.6, 1.1)}, {"lr": 0.1, "step_sizes": (1e-6, 1.0)}, {"lr": 1e-2}),
        ],
    ),
}
# torch's multi-tensor ASGD computes the next eta in float32 arithmetic (from its float32 step tensor), where its
# per-tensor path and gradstep compute it in float64 and round once: eta then differs by a few float32 roundings
# (relative 2**-24 each, about four operations), and the parameters and their average ``ax`` carry that difference
# in every step's size. 32 float32 epsilons bound it with a margin of 4 over the 1.0e-6 measured (scalar's ``ax``).
ASGD_FOREACH_TOL = 32 * torch.finfo(torch.float32).eps
DENSE = [(name, i) for name, case in CASES.items() for i in range(len(case[3]))]


@pytest.fixture(scope="module", autouse=True)
def _report_figures() -> Any:
    """Print the largest relative differences seen (run with ``-s`` to read them)."""
    yield
    for name, value in sorted(MAX_SEEN.items()):
        print(f"max relative difference, {name}: {value:.3e}")


def _record(name: str, *values: float) -> None:
    MAX_SEEN[name] = max(MAX_SEEN.get(name, 0.0), *values)


@pytest.mark.parametrize("foreach", [False, True], ids=["torch-per-tensor", "torch-foreach"])
@pytest.mark.parametrize(("name", "config"), DENSE, ids=[f"{n}-{i}" for n, i in DENSE])
def test_dense_parity_with_torch(name: str, config: int, foreach: bool) -> None:
    torch_cls, gradstep_cls, keys, configs = CASES[name]
    common, first, second = configs[config]

    def reference(groups: list[list[Tensor]]) -> torch.optim.Optimizer:
        return torch_cls(torch_groups(groups, first, second), **common, foreach=foreach)

    def mine(groups: list[list[Tensor]]) -> torch.optim.Optimizer:
        return gradstep_cls(torch_groups(groups, first, second), **common)

    result = run_with_state(reference, mine, {k: k for k in keys})
    _record(f"{name} vs foreach={foreach}", *result.worst())
    result.assert_within(ASGD_FOREACH_TOL if (name, foreach) == ("asgd", True) else TOL)


# --- sparse gradients -----------------------------------------------------------------------------------------------
SPARSE_CASES: dict[str, tuple[Any, Any, tuple[str, ...], list[dict[str, Any]]]] = {
    "adagrad": (
        torch.optim.Adagrad,
        gradstep.Adagrad,
        ("sum",),
        [{"lr": 0.1}, {"lr": 0.05, "lr_decay": 0.02, "initial_accumulator_value": 0.2}, {"lr": 0.2, "maximize": True}],
    ),
    "sparseadam": (
        torch.optim.SparseAdam,
        gradstep.SparseAdam,
        ("exp_avg", "exp_avg_sq"),
        [{"lr": 1e-2}, {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6}, {"lr": 5e-3, "maximize": True}],
    ),
}
SPARSE = [(name, i) for name, case in SPARSE_CASES.items() for i in range(len(case[3]))]


def _sparse_model(with_dense: bool) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    modules: list[torch.nn.Module] = [
        torch.nn.Embedding(20, 4, sparse=True, dtype=torch.float64),
        torch.nn.Embedding(7, 3, sparse=True, dtype=torch.float64),
    ]
    if with_dense:
        modules.append(torch.nn.Linear(4, 2, dtype=torch.float64))
    return modules


def _sparse_loss(modules: list[torch.nn.Module], t: int) -> Tensor:
    gen = torch.Generator().manual_seed(t)
    rows = torch.randint(0, 20, (9,), generator=gen)  # repeated rows: uncoalesced gradients
    other = torch.randint(0, 7, (4,), generator=gen)
    a, b = modules[0](rows), modules[1](other)
    loss = (torch.sin(3 * a + t) / 3).sum() + 0.15 * a.square().sum() + (b.square() * torch.cos(b + t)).sum()
    if len(modules) > 2:
        loss = loss + torch.sin(modules[2](a)).sum()
    return loss


@pytest.mark.parametrize("foreach", [False, True], ids=["torch-per-tensor", "torch-foreach"])
@pytest.mark.parametrize(("name", "config"), SPARSE, ids=[f"{n}-{i}" for n, i in SPARSE])
def test_sparse_gradient_parity_with_torch(name: str, config: int, foreach: bool) -> None:
    torch_cls, gradstep_cls, keys, configs = SPARSE_CASES[name]
    hypers = dict(configs[config])
    with_dense = name == "adagrad"  # SparseAdam refuses dense gradients; Adagrad steps both kinds in one group
    ref_modules, my_modules = _sparse_model(with_dense), _sparse_model(with_dense)
    ref_params = [p for m in ref_modules for p in m.parameters()]
    my_params = [p for m in my_modules for p in m.parameters()]
    initial = [p.detach().clone() for p in my_params]
    ref_kwargs = dict(hypers, foreach=foreach) if name == "adagrad" else hypers
    ref_opt = torch_cls([{"params": ref_params[:1]}, {"params": ref_params[1:], "lr": hypers["lr"] / 2}], **ref_kwargs)
    my_opt = gradstep_cls([{"params": my_params[:1]}, {"params": my_params[1:], "lr": hypers["lr"] / 2}], **hypers)
    worst = [0.0, 0.0]
    for t in range(1, 201):
        for modules, opt in ((ref_modules, ref_opt), (my_modules, my_opt)):
            opt.zero_grad()
            _sparse_loss(modules, t).backward()
            opt.step()
        assert my_params[0].grad is not None and my_params[0].grad.is_sparse
        for ref_p, my_p in zip(ref_params, my_params):
            worst[0] = max(worst[0], relative_difference(ref_p, my_p))
            for key in keys:
                worst[1] = max(worst[1], relative_difference(ref_opt.state[ref_p][key], my_opt.state[my_p][key]))
            assert float(my_opt.state[my_p]["step"]) == float(ref_opt.state[ref_p]["step"]) == t
    _record(f"{name} sparse vs foreach={foreach}", *worst)
    assert worst[0] <= TOL and worst[1] <= TOL, worst
    # The tables moved, but only the rows that had gradients: untouched rows are the initial ones.
    assert all(relative_difference(p, p0) > 1e-3 for p, p0 in zip(my_params, initial))


def test_adagrad_compiled_steps_sparse_tables_eagerly_and_dense_parameters_compiled() -> None:
    runs = []
    for compiled in (False, True):
        modules = _sparse_model(with_dense=True)
        params = [p for m in modules for p in m.parameters()]
        opt = gradstep.Adagrad(params, lr=0.1, lr_decay=0.01, compiled=compiled)
        for t in range(1, 6):
            opt.zero_grad()
            _sparse_loss(modules, t).backward()
            opt.step()
        runs.append(params)
    for eager, fast in zip(*runs):
        assert relative_difference(eager, fast) <= 1e-12


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (torch.zeros(3, layout=torch.sparse_coo), "SparseAdam requires dense parameter tensors"),
        (torch.zeros(2, 3, dtype=torch.complex64), "SparseAdam does not support complex parameters"),
    ],
    ids=["sparse-param", "complex-param"],
)
def test_sparse_adam_refuses_what_torch_refuses_at_construction(param: Tensor, message: str) -> None:
    for params in ([param], [{"params": [param]}]):
        with pytest.raises(ValueError, match=message):
            torch.optim.SparseAdam(params)
        with pytest.raises(ValueError, match=message):
            gradstep.SparseAdam(params)


def test_sparse_adam_refuses_dense_gradients_naming_the_parameter() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = gradstep.SparseAdam([w])
    w.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"dense gradients \(parameter param_groups\[0\]\['params'\]\[0\]\)"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state[w]


@pytest.mark.parametrize(
    ("hypers", "option"),
    [({"weight_decay": 0.1}, "weight_decay"), ({"clip_step": 0.1}, "clip_step"), ({"nonfinite": "zero"}, "nonfinite")],
)
def test_adagrad_refuses_options_that_need_dense_gradients(hypers: dict[str, Any], option: str) -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    before = emb.weight.detach().clone()
    opt = gradstep.Adagrad(emb.parameters(), **hypers)
    emb(torch.tensor([1, 3])).sum().backward()
    with pytest.raises(RuntimeError, match=option):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and not opt.state[emb.weight]


def test_sparse_gradients_stay_refused_elsewhere() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = gradstep.Adam(emb.parameters())
    emb(torch.tensor([1, 3])).sum().backward()
    with pytest.raises(RuntimeError, match=r"Adam does not support sparse gradients \(parameter"):
        opt.step()
    assert not gradstep.get("adam").capabilities.supports_sparse
    assert gradstep.get("adagrad").capabilities.supports_sparse and not gradstep.get("adagrad").capabilities.sparse_only
    assert gradstep.get("sparseadam").capabilities.sparse_only


def test_nonfinite_sparse_gradient_is_caught_before_any_write() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = gradstep.SparseAdam(emb.parameters())
    (emb(torch.tensor([1, 3])) * torch.tensor([[1.0, float("nan")], [1.0, 1.0]])).sum().backward()
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert not opt.state[emb.weight]


# --- torch.optim state_dicts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_torch_state_dict_loads_and_the_run_continues_as_torch(name: str) -> None:
    torch_cls, gradstep_cls, _, configs = CASES[name]
    common, first, second = configs[0]
    ref_params, my_params = make_params(), make_params()

    def step(opt: torch.optim.Optimizer, params: list[Tensor], t: int) -> None:
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()

    ref = torch_cls(torch_groups(split_groups(ref_params), first, second), **common)
    for t in range(1, 21):
        step(ref, ref_params, t)
    with torch.no_grad():
        for mine, theirs in zip(my_params, ref_params):
            mine.copy_(theirs)
    mine_opt = gradstep_cls(torch_groups(split_groups(my_params), first, second), **common)
    mine_opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for t in range(21, 61):
        step(ref, ref_params, t)
        step(mine_opt, my_params, t)
    worst = max(relative_difference(a, b) for a, b in zip(ref_params, my_params))
    _record(f"{name} (from torch state_dict)", worst)
    assert worst <= TOL

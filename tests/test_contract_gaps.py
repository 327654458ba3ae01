"""Regressions of the torch.optim contract gaps closed for SGD (sparse gradients), SparseAdam, MARS and Adafactor.

(LBFGS's and Muon's are in their parity files.) Each test fails on the behaviour it replaced.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import gradstep
from parity import relative_difference

ROWS, DIM = 9, 3


def _sparse_grad(p: Tensor, t: int, coalesced: bool) -> Tensor:
    """A gradient as nn.Embedding(sparse=True) gives it: some rows, repeated indices (uncoalesced)."""
    rows = torch.tensor([(3 * t) % ROWS, (5 * t + 1) % ROWS, (3 * t) % ROWS, (7 * t + 2) % ROWS])
    x = p.detach()[rows]
    grad = torch.sparse_coo_tensor(rows[None], torch.sin(3 * x + t) + 0.3 * x, p.shape)
    return grad.coalesce() if coalesced else grad


def _dense_grad(p: Tensor, t: int) -> Tensor:
    return torch.sin(3 * p.detach() + t) + 0.3 * p.detach()


def _sgd_run(cls: Any, hypers: dict[str, Any], steps: int, coalesced: bool = False) -> tuple[list[Tensor], Any]:
    gen = torch.Generator().manual_seed(0)
    emb, other = (torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(DIM, generator=gen, dtype=torch.float64)
    params = [t.requires_grad_() for t in (emb, other, bias)]
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], lr=0.05, **hypers)
    for t in range(steps):
        params[0].grad = _sparse_grad(params[0], t, coalesced)
        for p in params[1:]:
            p.grad = _dense_grad(p, t)
        opt.step()
    return params, opt


SGD_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.5, "maximize": True},
]


@pytest.mark.parametrize("hypers", SGD_CONFIGS, ids=lambda h: ",".join(h) or "plain")
def test_sgd_steps_sparse_gradients_as_torch_does(hypers: dict[str, Any]) -> None:
    """200 float64 steps against torch.optim.SGD: an embedding-like parameter with sparse, uncoalesced gradients
    and dense parameters in another group. Plain SGD adds the sparse gradient to the parameter as torch does (to the
    bit); with momentum the dense buffer sums repeated indices before the step, where torch's sparse buffer adds them
    to the parameter one by one: float64 roundings, which the momentum carries over the run."""
    want, ref = _sgd_run(torch.optim.SGD, hypers, 200)
    got, opt = _sgd_run(gradstep.SGD, hypers, 200)
    worst = max(relative_difference(a, b) for a, b in zip(want, got))
    if not hypers:
        assert worst == 0.0
    else:
        # ~1e-16 after 5 steps, growing with the run (the field sin(3p) amplifies differences): the parity bound.
        assert worst <= 1e-6
        buffer = ref.state[want[0]]["momentum_buffer"]
        assert relative_difference(buffer.to_dense(), opt.state[got[0]]["momentum_buffer"]) <= 1e-6
    assert not torch.equal(got[0].detach()[6], want[0].detach()[6] * 0)  # premise: rows did move


def test_sgd_sparse_gradients_with_coupled_weight_decay_are_refused_and_decoupled_decay_works() -> None:
    p = torch.nn.Parameter(torch.ones(ROWS, DIM, dtype=torch.float64))
    opt = gradstep.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    p.grad = _sparse_grad(p, 1, False)
    with pytest.raises(RuntimeError, match=r"coupled weight_decay is not compatible with sparse gradients \(param"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(ROWS, DIM, dtype=torch.float64)) and not opt.state[p]
    decoupled = gradstep.SGD([p], lr=0.1, weight_decay=0.01, weight_decay_mode="decoupled")
    decoupled.step()
    stepped = p.grad.coalesce().indices()[0]
    untouched = [r for r in range(ROWS) if r not in stepped.tolist()]
    assert torch.equal(p.detach()[untouched], torch.full((len(untouched), DIM), 1 - 0.1 * 0.01, dtype=torch.float64))
    assert not torch.equal(p.detach()[stepped], torch.full((len(stepped), DIM), 1 - 0.1 * 0.01, dtype=torch.float64))


def test_torch_sgd_sparse_momentum_state_dict_loads_densified_and_resumes() -> None:
    want, ref = _sgd_run(torch.optim.SGD, {"momentum": 0.9}, 5)
    assert ref.state[want[0]]["momentum_buffer"].is_sparse  # premise: torch keeps a sparse buffer
    mine = [p.detach().clone().requires_grad_() for p in want]
    opt = gradstep.SGD([{"params": mine[:1]}, {"params": mine[1:], "lr": 0.02}], lr=0.05, momentum=0.9)
    opt.load_state_dict(ref.state_dict())
    assert not opt.state[mine[0]]["momentum_buffer"].is_sparse
    for t in range(5, 25):
        for o, params in ((ref, want), (opt, mine)):
            params[0].grad = _sparse_grad(params[0], t, False)
            for p in params[1:]:
                p.grad = _dense_grad(p, t)
            o.step()
    assert max(relative_difference(a, b) for a, b in zip(want, mine)) <= 1e-12


@pytest.mark.parametrize("name", ["adam", "adamw", "lion", "muon", "adafactor", "rmsprop", "lbfgs"])
def test_sparse_gradients_are_still_refused_elsewhere_naming_the_parameter(name: str) -> None:
    p = torch.nn.Parameter(torch.ones(ROWS, DIM))
    opt = gradstep.create(name, [p], lr=0.1)
    p.grad = _sparse_grad(p, 1, False)
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter"):
        opt.step((lambda: torch.zeros(())) if name == "lbfgs" else None)
    assert torch.equal(p.detach(), torch.ones(ROWS, DIM))


# --- SparseAdam -----------------------------------------------------------------------------------------------------
def _sparse_adam_run(opt: Any, p: Tensor, start: int, stop: int) -> None:
    for t in range(start, stop):
        p.grad = _sparse_grad(p, t, False)
        opt.step()


def test_torch_sparse_adam_state_dict_with_its_int_step_loads_and_resumes_like_torch() -> None:
    p = torch.randn(ROWS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    q = p.detach().clone().requires_grad_()
    ref = torch.optim.SparseAdam([p], lr=0.01, betas=(0.8, 0.95))
    _sparse_adam_run(ref, p, 0, 4)
    sd = ref.state_dict()
    assert isinstance(sd["state"][0]["step"], int)  # premise: torch's step form
    opt = gradstep.SparseAdam([q], lr=0.5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and float(opt.state[q]["step"]) == 4
    q.data.copy_(p.detach())
    _sparse_adam_run(ref, p, 4, 30)
    _sparse_adam_run(opt, q, 4, 30)
    assert relative_difference(p, q) <= 1e-12
    torch.optim.SparseAdam([p.detach().clone().requires_grad_()]).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_sparse_adam_tensor_lr_of_any_one_element_shape_on_the_sparse_path(shape: tuple[int, ...]) -> None:
    start = torch.randn(ROWS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    p, q = start.clone().requires_grad_(), start.clone().requires_grad_()
    _sparse_adam_run(gradstep.SparseAdam([p], lr=0.01), p, 0, 5)
    _sparse_adam_run(gradstep.SparseAdam([q], lr=torch.full(shape, 0.01, dtype=torch.float64)), q, 0, 5)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-14, atol=0)
    assert not torch.equal(p.detach(), start)


def test_sparse_adam_error_inputs_name_the_argument_and_complex_is_refused_at_construction() -> None:
    p = torch.nn.Parameter(torch.ones(ROWS, DIM))
    for kwargs, name in [
        ({"betas": (1.0, 0.0)}, "betas"),
        ({"lr": torch.tensor([0.1, 0.1])}, "lr"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=name):
            gradstep.SparseAdam([p], **kwargs)
    with pytest.raises((TypeError, ValueError), match="complex"):
        gradstep.SparseAdam([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="params"):
        gradstep.SparseAdam(None)


# --- MARS -----------------------------------------------------------------------------------------------------------
def test_mars_checks_lr_before_reading_it_as_a_number() -> None:
    p = torch.nn.Parameter(torch.ones(3, 2))
    for bad in (torch.tensor([1e-3, 1e-3]), float("nan"), "0.1"):
        with pytest.raises(ValueError, match="Invalid lr"):
            gradstep.MARS([p], lr=bad)
    one = gradstep.MARS([p], lr=torch.full((1, 1), 1e-2), lr_1d=1e-3)
    assert one.param_groups[0]["lr_1d_factor"] == pytest.approx(0.1)


# --- Adafactor ------------------------------------------------------------------------------------------------------
def _adafactor_params() -> list[Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in ((4, 3), (5,), (2, 3, 2))]


def _steps(opt: Any, params: list[Tensor], start: int, stop: int) -> None:
    for t in range(start, stop):
        for p in params:
            p.grad = _dense_grad(p, t)
        opt.step()


def test_torch_adafactor_state_dict_maps_onto_gradsteps_and_resumes_identically() -> None:
    """torch keeps no entry for a buffer that does not apply (variance of a matrix, row_var/col_var of a vector);
    gradstep keeps it as None: the dict loads, the state is torch's, the runs continue together."""
    ref_params = _adafactor_params()
    ref = torch.optim.Adafactor(ref_params, lr=0.02, beta2_decay=-0.7, d=1.5, weight_decay=0.01)
    _steps(ref, ref_params, 0, 4)
    sd = ref.state_dict()
    assert "variance" not in sd["state"][0] and "row_var" not in sd["state"][1]  # premise: torch's layout
    mine = [p.detach().clone().requires_grad_() for p in ref_params]
    opt = gradstep.Adafactor(mine)
    opt.load_state_dict(sd)
    assert opt.state[mine[0]]["variance"] is None and opt.state[mine[1]]["row_var"] is None
    for p, q in zip(ref_params, mine):
        for key, value in ref.state[p].items():
            assert torch.equal(opt.state[q][key].to(value.dtype), value), key
    _steps(ref, ref_params, 4, 24)
    _steps(opt, mine, 4, 24)
    assert max(relative_difference(a, b) for a, b in zip(ref_params, mine)) <= 1e-12
    torch.optim.Adafactor([p.detach().clone().requires_grad_() for p in ref_params]).load_state_dict(opt.state_dict())


def test_a_torch_adafactor_dict_that_cannot_map_is_refused_naming_the_entry() -> None:
    ref_params = _adafactor_params()
    ref = torch.optim.Adafactor(ref_params, lr=0.02)
    _steps(ref, ref_params, 0, 2)
    opt = gradstep.Adafactor([p.detach().clone().requires_grad_() for p in ref_params])
    _steps(opt, opt.param_groups[0]["params"], 0, 1)
    before = copy.deepcopy(opt.state_dict())
    lacking = copy.deepcopy(ref.state_dict())
    del lacking["state"][0]["row_var"]
    wrong = copy.deepcopy(ref.state_dict())
    wrong["state"][0]["variance"] = torch.zeros(4, 3, dtype=torch.float64)
    for bad, name in ((lacking, "lacks row_var"), (wrong, "variance .* does not apply")):
        bad["param_groups"][0]["lr"] = 0.5
        with pytest.raises(ValueError, match=name):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for i, s in before["state"].items():
            for key, value in s.items():
                assert (value is None and after["state"][i][key] is None) or torch.equal(after["state"][i][key], value)


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(
    "entry",
    # optim_wrapper steps a torch.optim optimizer, which has no non-finite policy.
    [e for e in gradstep.core.registry.entries() if not e.capabilities.sparse_only and e.name != "optim_wrapper"],
    ids=lambda e: e.name,
)
def test_a_refused_or_skipped_first_step_leaves_no_state_entry(entry: Any, policy: str) -> None:
    """Reading ``opt.state[p]`` (a defaultdict) adds an empty entry: a step refused by the gradient screen must not
    leave it behind (``state_dict()["state"]`` stays ``{}``)."""
    first, second = (torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64)) for _ in range(2))
    opt = entry([first, second], **{**entry.example, "nonfinite": policy})
    bad = [True]

    def closure() -> Tensor:  # LBFGS re-evaluates; the others are given the same gradients once
        first.grad = torch.ones(3, 4, dtype=torch.float64)
        second.grad = torch.full((3, 4), float("nan") if bad[0] else 1.0, dtype=torch.float64)
        return (first.sum() + second.sum()).detach()

    if policy == "error":
        with pytest.raises(gradstep.core.nonfinite.NonFiniteError):
            opt.step(closure)
    else:
        opt.step(closure)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    bad[0] = False
    opt.step(closure)
    assert opt.state_dict()["state"]  # the same optimizer steps (and keeps state) once the gradients are finite

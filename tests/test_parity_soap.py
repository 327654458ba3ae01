"""SOAP against pytorch_optimizer's SOAP (4.1.0) and against a float64 transcription of the paper and the authors' code.

Every run: 200 float64 steps, two groups with different hyperparameters, a scalar, a vector, a 4-D tensor, a matrix
and a matrix with a dim over ``max_precondition_dim``; parameters after every step, and every state tensor the
reference keeps (``exp_avg``, ``exp_avg_sq``, the factors ``GG`` and the bases ``Q``, which pytorch_optimizer keeps
as lists of matrices and gradstep flattened in one tensor) after steps 1-3 and every 10th, within 1e-6 relative.

pytorch_optimizer runs the QR of its eigenbasis refresh in float32 whatever the state's dtype (``.to(torch.float32)``),
which would round a float64 run to float32 every refresh: the parity runs hand its module a ``torch`` whose
``float32`` is ``float64`` (:class:`_Float64QR`), so that the whole reference runs in float64.

The shapes keep every factor of full rank, or short of it by one, when its eigenbasis is computed. A factor with a
larger null space has no unique eigenbasis there: rounding then picks the basis of the null space (two BLAS builds
of the reference itself disagree), and Adam's per-coordinate scaling in that basis with it. So a matrix is never much
longer than the product of its other dims at the first step (``eigh``), nor at the first refresh (``QR`` of
:math:`L Q`, rank at most the number of gradients seen times that product); a vector, whose factor has rank 1 at the
first step, is preconditioned with a refresh frequency of at least its length (its first ``eigh`` sees the same
outer product on both sides, bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import pytorch_optimizer.optimizer.soap as pto_soap
import torch
from torch import Tensor

import gradstep
from example_helpers import one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)
from gradstep.core import kronecker
from parity import gradient, make_params, relative_difference, split_groups, torch_groups

# Tiny matrices: LAPACK's QR on two threads that fight over two shared cores is 100x slower than on one.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-6
SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (2, 3, 4, 5), (3, 4), (5, 40), (6, 6))
# merge_dims: (2, 3, 4, 5) merges to (6, 4, 5), (3, 4, 2, 2) read as NHWC to (6, 8, 2). No vector: pytorch_optimizer
# fails on any vector (or tensor) whose dims merge into one (it reshapes it to [1]).
MERGE_SHAPES: tuple[tuple[int, ...], ...] = ((), (2, 3, 4, 5), (5, 40), (3, 4, 2, 2), (6, 6))
STATE_KEYS = ("exp_avg", "exp_avg_sq", "GG", "Q")


class _Float64QR:
    """``torch`` as pytorch_optimizer's SOAP module sees it in these tests: ``torch.float32`` is float64."""

    def __getattr__(self, name: str) -> Any:
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pto_soap, "torch", _Float64QR())


def _packed(value: Any) -> Tensor:
    """A reference's state entry as gradstep keeps it: a list of matrices (``[]`` for none) flattened into one."""
    if isinstance(value, Tensor):
        return value
    mats = [m.reshape(-1) for m in value if isinstance(m, Tensor) and m.numel()]
    return torch.cat(mats) if mats else torch.zeros(0, dtype=torch.float64)


def run_soap_parity(
    make_reference: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    make_gradstep: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    steps: int = 200,
) -> dict[str, float]:
    """The largest relative difference of the parameters and of each state tensor over the run; asserts movement."""
    ref_params, gs_params = make_params(shapes), make_params(shapes)
    initial = [p.detach().clone() for p in gs_params]
    ref, mine = make_reference(split_groups(ref_params)), make_gradstep(split_groups(gs_params))
    worst: dict[str, float] = {}
    for t in range(1, steps + 1):
        for opt, params in ((ref, ref_params), (mine, gs_params)):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
        for shape, a, b in zip(shapes, ref_params, gs_params):
            worst[f"{shape} param"] = max(worst.get(f"{shape} param", 0.0), relative_difference(a, b))
            if not (t <= 3 or t % 10 == 0):
                continue
            ref_state, gs_state = ref.state[a], mine.state[b]
            kept = {k for k, v in ref_state.items() if isinstance(v, (Tensor, list)) and k != "step"}
            assert kept <= set(STATE_KEYS), f"state {sorted(kept - set(STATE_KEYS))} of the reference is not compared"
            for key in kept:
                want, got = _packed(ref_state[key]), gs_state[key]
                assert want.shape == got.shape, f"{shape} {key}: {tuple(got.shape)}, reference {tuple(want.shape)}"
                if want.numel():
                    name = f"{shape} {key}"
                    worst[name] = max(worst.get(name, 0.0), relative_difference(want, got))
    for shape, p, p0 in zip(shapes, gs_params, initial):
        assert relative_difference(p, p0) > 1e-3, f"{shape} did not move: the comparison proves nothing"
    return worst


def _assert_within(worst: dict[str, float], tol: float = TOL) -> None:
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, "relative differences over the tolerance: " + ", ".join(f"{k}: {v:.2e}" for k, v in bad.items())


# (common, group 0, group 1) in pytorch_optimizer's names, which are gradstep's.
CONFIGS: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({}, {"lr": 0.01}, {"lr": 0.005}),
    (
        {"betas": (0.9, 0.99), "weight_decay": 0.1, "precondition_frequency": 3, "max_precondition_dim": 16},
        {"lr": 0.01, "shampoo_beta": 0.8},
        {"lr": 0.005, "eps": 1e-6},
    ),
    (
        {"precondition_1d": True, "normalize_gradient": True, "shampoo_beta": 0.9, "eps": 1e-7},
        {"lr": 0.003, "correct_bias": False, "weight_decay": 0.0},
        {"lr": 0.01, "betas": (0.8, 0.9), "precondition_frequency": 7},
    ),
]
MERGE_CONFIG = (
    {"merge_dims": True, "max_precondition_dim": 8, "data_format": "channels_last", "precondition_frequency": 5},
    {"lr": 0.01},
    {"lr": 0.005, "merge_dims": False},
)


def _pto(config: Any) -> Callable[[list[list[Tensor]]], torch.optim.Optimizer]:
    common, group0, group1 = config
    return lambda groups: pytorch_optimizer.SOAP(torch_groups(groups, group0, group1), **common)


def _gradstep(config: Any, **options: Any) -> Callable[[list[list[Tensor]]], torch.optim.Optimizer]:
    common, group0, group1 = config
    return lambda groups: gradstep.SOAP(torch_groups(groups, group0, group1), **common, **options)


# Every config batched (same-layout parameters in one bmm/eigh/qr), and one on the per-tensor path.
RUNS = [(c, True) for c in CONFIGS] + [(CONFIGS[1], False)]


@pytest.mark.parametrize(
    "config, foreach", RUNS, ids=[f"config{i}-batched" for i in range(len(CONFIGS))] + ["config1-per-tensor"]
)
def test_parity_with_pytorch_optimizer_float64(float64_reference: None, config: Any, foreach: bool) -> None:
    _assert_within(run_soap_parity(_pto(config), _gradstep(config, foreach=foreach)))


def test_merged_dims_and_channels_last_match_pytorch_optimizer(float64_reference: None) -> None:
    _assert_within(run_soap_parity(_pto(MERGE_CONFIG), _gradstep(MERGE_CONFIG), shapes=MERGE_SHAPES))


def test_pytorch_optimizers_float32_qr_is_what_the_float64_parity_replaces() -> None:
    # Without the substitution the reference rounds its bases to float32 at every refresh: far above 1e-6.
    worst = run_soap_parity(_pto(CONFIGS[0]), _gradstep(CONFIGS[0]), shapes=((3, 4),), steps=30)
    assert worst["(3, 4) Q"] > 1e-7


# --- a float64 transcription of the paper's algorithm, with the authors' code's choices ------------------------------
class ReferenceSOAP(torch.optim.Optimizer):
    """Vyas et al. (2024), Algorithm 1 for tensors (one factor per dim), per parameter, in float64, as the authors'
    code runs it: the first step only gathers statistics and takes the eigenbases by ``eigh``; the moments' bias
    correction counts from the second step; the first moment is kept in the original basis and rotated when used;
    every ``precondition_frequency`` steps one power iteration and a QR, columns sorted by the estimated eigenvalue,
    the second moment permuted alike; decoupled weight decay after the step."""

    def __init__(self, params: Any, **hypers: Any) -> None:
        defaults = dict(
            lr=3e-3,
            betas=(0.95, 0.95),
            shampoo_beta=None,
            eps=1e-8,
            weight_decay=1e-2,
            precondition_frequency=10,
            max_precondition_dim=10000,
            precondition_1d=False,
            normalize_gradient=False,
            correct_bias=True,
        )
        defaults.update(hypers)
        super().__init__(params, defaults)

    @staticmethod
    def _rotate(x: Tensor, bases: list[Any], back: bool) -> Tensor:
        for dim, q in enumerate(bases):
            if isinstance(q, Tensor):  # index a of this dim becomes sum_a x[..a..] Q[a, j] (or Q[j, a] back)
                x = torch.movedim(torch.tensordot(x, q, dims=([dim], [1 if back else 0])), -1, dim)
        return x

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta_s = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    on = [d <= group["max_precondition_dim"] for d in p.shape]
                    if p.dim() == 1:
                        on = [on[0] and group["precondition_1d"]]
                    state["GG"] = [torch.zeros(d, d, dtype=p.dtype) if o else [] for d, o in zip(p.shape, on)]
                    state["Q"] = [[] for _ in p.shape]
                state["step"] += 1
                t = state["step"]
                m, v, factors = state["exp_avg"], state["exp_avg_sq"], state["GG"]
                if t > 1:
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).add_(self._rotate(g, state["Q"], back=False).square(), alpha=1 - beta2)
                    n = self._rotate(self._rotate(m, state["Q"], False) / (v.sqrt() + eps), state["Q"], back=True)
                    if group["normalize_gradient"]:
                        n = n / (n.square().mean().sqrt() + eps)
                    size = lr
                    if group["correct_bias"]:
                        size = lr * math.sqrt(1 - beta2 ** (t - 1)) / (1 - beta1 ** (t - 1))
                    p.sub_(size * n)
                    p.mul_(1 - lr * wd)
                for dim, factor in enumerate(factors):
                    if isinstance(factor, Tensor):
                        others = [k for k in range(g.dim()) if k != dim]
                        factor.mul_(beta_s).add_(torch.tensordot(g, g, dims=(others, others)), alpha=1 - beta_s)
                if t == 1:
                    for dim, factor in enumerate(factors):
                        if isinstance(factor, Tensor):
                            eye = torch.eye(factor.shape[0], dtype=factor.dtype)
                            state["Q"][dim] = torch.linalg.eigh(factor + 1e-30 * eye)[1].flip(-1)
                elif (t - 1) % group["precondition_frequency"] == 0:
                    for dim, factor in enumerate(factors):
                        if isinstance(factor, Tensor):
                            q = state["Q"][dim]
                            power = factor @ q
                            order = torch.argsort(torch.diagonal(q.T @ power), descending=True)
                            state["Q"][dim] = torch.linalg.qr(power[:, order])[0]
                            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
        return None


REFERENCE_CONFIGS = [CONFIGS[0], CONFIGS[1], CONFIGS[2]]


@pytest.mark.parametrize("config", REFERENCE_CONFIGS, ids=[f"config{i}" for i in range(len(REFERENCE_CONFIGS))])
def test_parity_with_the_papers_algorithm_float64(config: Any) -> None:
    common, group0, group1 = config
    worst = run_soap_parity(
        lambda groups: ReferenceSOAP(torch_groups(groups, group0, group1), **common), _gradstep(config)
    )
    _assert_within(worst)


# --- pieces ----------------------------------------------------------------------------------------------------------
def test_first_step_only_gathers_statistics() -> None:
    w = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    before = w.detach().clone()
    opt = gradstep.SOAP([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.randn(3, 5, dtype=torch.float64)
    opt.step()
    assert torch.equal(w.detach(), before)  # no step and no decay, as the reference
    state = opt.state[w]
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    left = state["GG"][:9].view(3, 3)
    torch.testing.assert_close(left, 0.05 * w.grad @ w.grad.T)
    basis = state["Q"][:9].view(3, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    rotated = basis.T @ left @ basis  # diagonal, decreasing
    torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(rotated).diff() <= 0).all())


def test_qr_power_iteration_converges_to_the_eigenbasis_and_batches_like_one_at_a_time() -> None:
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(5, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    spd = [m @ m.T for m in mats]
    start = [torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0] for _ in range(3)]
    batched, orders = kronecker.qr_power_iteration(spd, start)
    single = [kronecker.qr_power_iteration([a], [q], batched=False)[0][0] for a, q in zip(spd, start)]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b, s, rtol=0, atol=1e-13)
    assert all(sorted(o.tolist()) == list(range(5)) for o in orders)
    bases = start
    for _ in range(300):
        bases, _ = kronecker.qr_power_iteration(spd, bases)
    for a, q in zip(spd, bases):
        values = torch.linalg.eigvalsh(a).flip(0)
        torch.testing.assert_close(q.T @ a @ q, torch.diag(values), atol=1e-8, rtol=1e-8)


def test_merge_dims_keeps_a_tensor_that_merges_into_one_dim_whole() -> None:
    # pytorch_optimizer reshapes such a tensor to [1] and fails; here it is one dim with one 12 x 12 factor.
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = gradstep.SOAP([w], merge_dims=True, max_precondition_dim=16)
    for _ in range(3):
        w.grad = torch.randn(3, 4)
        opt.step()
    assert opt.state[w]["GG"].shape == (144,) and torch.isfinite(w).all()


def test_invalid_values_name_the_argument() -> None:
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    for bad in ({"precondition_frequency": 0}, {"max_precondition_dim": 1.5}, {"shampoo_beta": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gradstep.SOAP(w, **bad)

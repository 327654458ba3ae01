"""Shampoo against a float64 transcription of Meta's Distributed Shampoo, against pytorch-optimizer's Shampoo, and the
Kronecker-factor math of :mod:`gradstep.core.kronecker`.

Distributed Shampoo (github.com/facebookresearch/optimizers) does not install from pip here: :class:`ShampooReference`
transcribes its default algorithm (``DistributedShampoo`` without a ``distributed_config``; ``RootInvShampoo`` with
``EigenConfig`` and ``PerturbationConfig(perturb_before_computation=True)``; AdaGrad/RMSprop/Adam/SGD grafting) from
``distributed_shampoo.py``, ``preconditioner/shampoo_preconditioner_list.py``, ``adagrad_preconditioner_list.py``,
``preconditioner/matrix_functions.py`` and ``utils/shampoo_utils.py`` (``merge_small_dims``, ``multi_dim_split``),
block by block with ``tensordot`` as the original does, in float64.

Every parity run: 200 float64 steps, a scalar, a vector, a 4-D tensor, a matrix and a larger matrix (blocked when
``max_preconditioner_dim`` is small) in two groups with different hyperparameters, parameters after every step and
every state tensor after steps 1-3 and every 10th, to 1e-6 relative. The gradient is the usual
``sin(3p + t + i) + 0.3p`` of each side's own parameters plus a seeded N(0, 1) term of step ``t`` and parameter ``i``
(the same on both sides): without it the gradients of a parameter stay close to a three-dimensional subspace, the
factors of the merged vectors (Distributed Shampoo merges every parameter of at most ``max_preconditioner_dim``
elements into one) have eigenvalues barely above rounding, and their inverse roots turn a 1e-15 perturbation of the
start into 1e-3 after 200 steps, in either implementation alone.

With ``epsilon=1e-12`` a factor of rank lower than its size (a vector's, before as many steps as it has elements)
still has eigenvalues ``1e-12`` plus rounding noise of ``1e-16`` times its norm in its null space: their inverse
roots are set by that noise, differently on each side, while the step, which has no component there, is not. The
state ``inv_factor_matrices`` is therefore compared in the runs with ``epsilon >= 1e-6`` only.
"""

from __future__ import annotations

import functools
from itertools import chain
from typing import Any

import pytest
import scipy.linalg
import torch
from pytorch_optimizer import Shampoo as PoShampoo
from torch import Tensor

import gradstep
from example_helpers import one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)
from gradstep.core import kronecker
from parity import gradient, make_params, relative_difference, split_groups, torch_groups
from test_parity_adaptive import StateParity, run_with_state

SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (2, 3, 2, 2), (3, 4), (10, 6))
TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small eigh/bmm kernels: two threads only fight
STATE_MAP = {
    "factor_matrices": "factor_matrices",
    "inv_factor_matrices": "inv_factor_matrices",
    "filtered_grad": "filtered_grad",
    "momentum": "momentum_buffer",
    "adagrad": "grafting_second_moment",
}


# --- the transcription ----------------------------------------------------------------------------------------------
def merge_small_dims(tensor_shape: tuple[int, ...], threshold: int) -> tuple[int, ...]:
    """``distributed_shampoo/utils/shampoo_utils.py`` (target_tensor_dimensionality=1)."""
    if 0 in tensor_shape:
        return (0,)
    squeezed_tensor_shape = list(filter(lambda t: t != 1, reversed(tensor_shape))) or [1]
    new_tensor_shape = [squeezed_tensor_shape[0]]
    for next_tensor_shape in squeezed_tensor_shape[1:]:
        if (new_dimension := new_tensor_shape[-1] * next_tensor_shape) <= threshold:
            new_tensor_shape[-1] = new_dimension
        else:
            new_tensor_shape.append(next_tensor_shape)
    return tuple(reversed(new_tensor_shape))


def multi_dim_split(tensor: Tensor, split_size: int) -> tuple[Tensor, ...]:
    return functools.reduce(
        lambda split_tensors, dim: tuple(s for t in split_tensors for s in torch.split(t, split_size, dim=dim)),
        range(tensor.dim()),
        (tensor,),
    )


def matrix_inverse_root_eigen(A: Tensor, root: float, epsilon: float) -> Tensor:
    """``matrix_eigendecomposition`` (perturbation before ``eigh``) then ``matrix_inverse_root_from_eigendecomposition``
    with ``PerturbationConfig(perturb_before_computation=True)``."""
    A_ridge = A.add(torch.eye(A.shape[0], dtype=A.dtype), alpha=epsilon)
    L, Q = torch.linalg.eigh(A_ridge)
    lambda_min = torch.min(L).item()
    if lambda_min < epsilon:
        L = L + (-lambda_min)
        L = L + epsilon
    inv_power_L = L.pow(-1.0 / root)
    return Q * inv_power_L.unsqueeze(0) @ Q.T


class ShampooReference(torch.optim.Optimizer):
    """Distributed Shampoo's default algorithm (``_per_group_step_impl``), float64, block by block.

    ``grafting``: None, ``("sgd",)``, ``("adagrad", epsilon)``, ``("rmsprop", beta2, epsilon)`` or
    ``("adam", beta2, epsilon)``. State per parameter: the element-wise buffers (``filtered_grad``, ``momentum``,
    ``adagrad``) whole, and after each step a flat copy of the factor matrices and of their inverse roots in block
    order (row-major over the blocks of ``multi_dim_split``), then dimension order.
    """

    def __init__(self, params: Any, **kw: Any) -> None:
        defaults = dict(
            lr=1e-2,
            betas=(0.9, 1.0),
            beta3=-1.0,
            epsilon=1e-12,
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            max_preconditioner_dim=1024,
            precondition_frequency=1,
            start_preconditioning_step=-1,
            use_nesterov=False,
            use_bias_correction=True,
            use_decoupled_weight_decay=True,
            grafting=None,
            use_merge_dims=True,
        )
        defaults.update(kw)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["beta3"] == -1.0:
                group["beta3"] = group["betas"][0]
            if group["start_preconditioning_step"] == -1:
                group["start_preconditioning_step"] = group["precondition_frequency"]
            group["step"] = 0

    def _blocks(self, group: dict[str, Any], t: Tensor) -> tuple[Tensor, ...]:
        shape = (
            merge_small_dims(tuple(t.shape), group["max_preconditioner_dim"]) if group["use_merge_dims"] else t.shape
        )
        return multi_dim_split(t.view(shape if len(shape) else (1,)), group["max_preconditioner_dim"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group["step"] += 1
            step = group["step"]
            beta1, beta2 = group["betas"]
            beta3, eps, wd = group["beta3"], group["epsilon"], group["weight_decay"]
            graft = group["grafting"]
            start, freq = group["start_preconditioning_step"], group["precondition_frequency"]
            compute_root_inverse = step % freq == 0 and step > start or step == start
            use_grafting_method = step < start and graft is not None
            for p in group["params"]:
                state = self.state[p]
                blocks = self._blocks(group, p)
                if not state:
                    state["factors"] = [tuple(torch.zeros(d, d, dtype=p.dtype) for d in b.shape) for b in blocks]
                    state["inv_factors"] = [tuple(torch.eye(d, dtype=p.dtype) for d in b.shape) for b in blocks]
                    if beta1 != 0.0:
                        state["filtered_grad"] = torch.zeros_like(p)
                    if group["momentum"] != 0.0:
                        state["momentum"] = torch.zeros_like(p)
                    if graft is not None and graft[0] != "sgd":
                        state["adagrad"] = torch.zeros_like(p)
                grad = p.grad.clone()
                if wd != 0.0 and not group["use_decoupled_weight_decay"]:
                    grad.add_(p, alpha=wd)
                grads = self._blocks(group, grad)
                # _update_factor_matrices
                for g, factors in zip(grads, state["factors"]):
                    order = g.dim()
                    outer = tuple(
                        torch.tensordot(g, g, dims=[[*chain(range(k), range(k + 1, order))]] * 2) for k in range(order)
                    )
                    if beta2 != 1.0:
                        torch._foreach_mul_(factors, beta2)
                        torch._foreach_add_(factors, outer, alpha=1 - beta2)
                    else:
                        torch._foreach_add_(factors, outer, alpha=1.0)
                bias_correction2 = 1.0 - beta2**step if group["use_bias_correction"] and beta2 < 1.0 else 1.0
                # AdagradPreconditionerList.update_preconditioners
                graft_dirs = None
                if graft is not None:
                    if graft[0] == "sgd":
                        graft_beta2, graft_eps, graft_bc = None, None, 1.0
                    else:
                        graft_beta2 = 1.0 if graft[0] == "adagrad" else graft[1]
                        graft_eps = graft[-1]
                        v = state["adagrad"]
                        if graft_beta2 == 1.0:
                            v.addcmul_(grad, grad, value=1.0)
                        else:
                            v.mul_(graft_beta2).addcmul_(grad, grad, value=1 - graft_beta2)
                        graft_bc = 1.0 - graft_beta2**step if graft[0] == "adam" and graft_beta2 < 1.0 else 1.0
                # amortized_computation
                if compute_root_inverse:
                    for factors, invs in zip(state["factors"], state["inv_factors"]):
                        for f, inv in zip(factors, invs):
                            inv.copy_(matrix_inverse_root_eigen(f / bias_correction2, 2 * len(factors), eps))
                # _compute_filtered_grad_list
                if beta1 != 0.0:
                    fg = state["filtered_grad"]
                    filtered = torch.lerp(fg, grad, 1 - beta3) if beta3 != beta1 else fg
                    fg.lerp_(grad, 1 - beta1)
                    if group["use_bias_correction"]:
                        filtered = filtered / (1.0 - beta3 * beta1 ** (step - 1))
                else:
                    filtered = grad
                filtered_blocks = self._blocks(group, filtered)
                if graft is not None:
                    if graft[0] == "sgd":
                        graft_dirs = [b.clone() for b in filtered_blocks]
                    else:
                        denoms = [(v / graft_bc).sqrt().add_(graft_eps) for v in self._blocks(group, state["adagrad"])]
                        graft_dirs = [b / d for b, d in zip(filtered_blocks, denoms)]
                # _precondition_and_grafting
                if use_grafting_method:
                    directions = graft_dirs
                else:
                    directions = [
                        functools.reduce(lambda x, m: torch.tensordot(x, m, dims=([0], [0])), invs, b)
                        for b, invs in zip(filtered_blocks, state["inv_factors"])
                    ]
                    if graft_dirs is not None:
                        grafting_norm_list = torch._foreach_norm(graft_dirs)
                        shampoo_norm_list = torch._foreach_norm(directions)
                        torch._foreach_add_(shampoo_norm_list, 1e-16)
                        torch._foreach_div_(grafting_norm_list, shampoo_norm_list)
                        torch._foreach_mul_(directions, grafting_norm_list)
                # decoupled weight decay, momentum, update
                param_blocks = self._blocks(group, p)
                directions = [d.clone() for d in directions]
                if wd != 0.0 and group["use_decoupled_weight_decay"]:
                    torch._foreach_add_(directions, param_blocks, alpha=wd)
                if group["momentum"] != 0.0:
                    mu, damp = group["momentum"], group["dampening"]
                    momentum_list = self._blocks(group, state["momentum"])
                    torch._foreach_mul_(momentum_list, mu)
                    torch._foreach_add_(momentum_list, directions, alpha=1 - damp)
                    if group["use_nesterov"]:
                        torch._foreach_mul_(directions, 1 - damp)
                        torch._foreach_add_(directions, momentum_list, alpha=mu)
                    else:
                        torch._foreach_copy_(directions, momentum_list)
                torch._foreach_mul_(directions, -group["lr"])
                torch._foreach_add_(list(param_blocks), directions)
                state["factor_matrices"] = torch.cat([f.reshape(-1) for fs in state["factors"] for f in fs])
                state["inv_factor_matrices"] = torch.cat([f.reshape(-1) for fs in state["inv_factors"] for f in fs])
        return loss


# --- the parity runs ------------------------------------------------------------------------------------------------
def noisy_gradient(p: Tensor, t: int, index: int) -> Tensor:
    gen = torch.Generator().manual_seed(1000 * t + index)
    return gradient(p, t, index) + torch.randn(p.shape, generator=gen, dtype=p.dtype)


def run_parity(
    make_reference: Any,
    make_gradstep: Any,
    state_map: dict[str, str],
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    steps: int = 200,
) -> StateParity:
    """``test_parity_adaptive.run_with_state`` with :func:`noisy_gradient`; every tensor the reference keeps in a
    parameter's state must be in ``state_map``."""
    ref_params, gs_params = make_params(shapes), make_params(shapes)
    initial = [p.detach().clone() for p in gs_params]
    ref_opt, gs_opt = make_reference(split_groups(ref_params)), make_gradstep(split_groups(gs_params))
    names = [f"{i}:{tuple(s)}" for i, s in enumerate(shapes)]
    result = StateParity(params=dict.fromkeys(names, 0.0))
    for t in range(1, steps + 1):
        for opt, params in ((ref_opt, ref_params), (gs_opt, gs_params)):
            for i, p in enumerate(params):
                p.grad = noisy_gradient(p.detach(), t, i)
            opt.step()
        for name, ref_p, gs_p in zip(names, ref_params, gs_params):
            result.params[name] = max(result.params[name], relative_difference(ref_p, gs_p))
            if not (t <= 3 or t % 10 == 0):
                continue
            ref_state, gs_state = ref_opt.state[ref_p], gs_opt.state[gs_p]
            kept = {k for k, v in ref_state.items() if isinstance(v, Tensor)}
            assert kept <= set(state_map), f"state {sorted(kept - set(state_map))} of the reference is not compared"
            for key in kept:
                diff = relative_difference(ref_state[key], gs_state[state_map[key]])
                result.states[f"{name} {key}"] = max(result.states.get(f"{name} {key}", 0.0), diff)
    result.moved = {n: relative_difference(p, p0) for n, p, p0 in zip(names, gs_params, initial)}
    return result


def _gradstep_hypers(hypers: dict[str, Any]) -> dict[str, Any]:
    out = dict(hypers)
    graft = out.pop("grafting", None)
    if graft is not None:
        out["grafting"] = graft[0]
        if graft[0] in ("rmsprop", "adam"):
            out["grafting_beta2"] = graft[1]
        if graft[0] != "sgd":
            out["grafting_epsilon"] = graft[-1]
    if out.get("beta3") == -1.0:
        out.pop("beta3")
    return out


CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # (shared, group 0, group 1) in Distributed Shampoo's names
    "defaults": ({}, {"lr": 0.01}, {"lr": 0.005}),
    "blocked-adam-nesterov": (
        {
            "betas": (0.8, 0.99),
            "beta3": 0.5,
            "epsilon": 1e-6,
            "max_preconditioner_dim": 4,
            "precondition_frequency": 3,
            "start_preconditioning_step": 6,
            "grafting": ("adam", 0.99, 1e-8),
            "use_nesterov": True,
            "dampening": 0.1,
        },
        {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.01},
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
    ),
    "unmerged-adagrad-coupled": (
        {
            "betas": (0.0, 0.95),
            "epsilon": 1e-4,
            "use_bias_correction": False,
            "grafting": ("adagrad", 1e-6),
            "use_decoupled_weight_decay": False,
            "use_merge_dims": False,
            "max_preconditioner_dim": 5,
            "precondition_frequency": 2,
        },
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.02},
        {"lr": 0.03, "momentum": 0.0, "weight_decay": 0.05},
    ),
    "rmsprop-late-start": (
        {
            "betas": (0.5, 0.999),
            "epsilon": 1e-6,
            "grafting": ("rmsprop", 0.9, 1e-10),
            "precondition_frequency": 5,
            "start_preconditioning_step": 10,
            "max_preconditioner_dim": 16,
        },
        {"lr": 0.02},
        {"lr": 0.01, "weight_decay": 0.1},
    ),
    "sgd-grafting": (
        {"betas": (0.9, 1.0), "epsilon": 1e-6, "grafting": ("sgd",), "momentum": 0.5},
        {"lr": 0.03},
        {"lr": 0.02, "momentum": 0.8},
    ),
}


@pytest.mark.parametrize(
    ("name", "foreach"),
    # foreach=False: the per-tensor reference path (tensordot block by block), on two of the runs
    [(name, None) for name in CONFIGS] + [("defaults", False), ("blocked-adam-nesterov", False)],
)
def test_parity_with_distributed_shampoo_transcription(name: str, foreach: bool | None) -> None:
    common, group0, group1 = CONFIGS[name]
    result = run_parity(
        lambda groups: ShampooReference(torch_groups(groups, group0, group1), **common),
        lambda groups: gradstep.Shampoo(
            torch_groups(groups, _gradstep_hypers(group0), _gradstep_hypers(group1)),
            foreach=foreach,
            **_gradstep_hypers(common),
        ),
        STATE_MAP,
    )
    if common.get("epsilon", 1e-12) < 1e-6:
        result.states = {k: v for k, v in result.states.items() if not k.endswith("inv_factor_matrices")}
    result.assert_within(TOL)


def test_parity_with_pytorch_optimizer_shampoo() -> None:
    """pytorch-optimizer 4.1.0's Shampoo: every dim preconditioned by (eps I + sum G G^T)^(-1/2o), no filtering, no
    merging or blocking, roots every step. Scalars (which it leaves unpreconditioned) are not in the run; its state
    (per-dim factors, the last update as ``momentum_buffer``) is another layout, compared through the steps."""
    shapes = tuple(s for s in SHAPES if s)
    result = run_with_state(
        lambda groups: PoShampoo(torch_groups(groups, {"lr": 0.02}, {"lr": 0.01}), matrix_eps=1e-6),
        lambda groups: gradstep.Shampoo(
            torch_groups(groups, {"lr": 0.02}, {"lr": 0.01}),
            betas=(0.0, 1.0),
            epsilon=1e-6,
            use_merge_dims=False,
            max_preconditioner_dim=1 << 20,
        ),
        {},
        ignored=(*(f"{kind}_{d}" for kind in ("pre_cond", "inv_pre_cond") for d in range(4)), "momentum_buffer"),
        shapes=shapes,
    )
    result.assert_within(TOL)


# --- the Kronecker module -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "threshold", "merged"),
    [
        ((1, 2, 5, 1), 10, (10,)),  # Distributed Shampoo's docstring examples
        ((1, 2, 5, 1), 1, (2, 5)),
        ((32, 3, 64, 64), 8192, (96, 4096)),
        ((), 4, (1,)),
        ((3, 0, 2), 4, (0,)),
        ((10, 6), 4, (10, 6)),
    ],
)
def test_merge_small_dims(shape: tuple[int, ...], threshold: int, merged: tuple[int, ...]) -> None:
    assert kronecker.merge_small_dims(shape, threshold) == merged == merge_small_dims(shape, threshold)


def test_block_layout_cuts_like_multi_dim_split_and_assembles() -> None:
    x = torch.randn(10, 6, dtype=torch.float64)
    layout = kronecker.block_layout((10, 6), 4)
    assert layout.block_shapes == ((4, 4), (4, 2), (4, 4), (4, 2), (2, 4), (2, 2))
    reference = multi_dim_split(x, 4)
    assert all(torch.equal(a, b) for a, b in zip(layout.blocks(x), reference))
    assert torch.equal(layout.assemble([b.clone() for b in layout.blocks(x)]), x)
    assert layout.factor_numel == sum(d * d for shape in layout.block_shapes for d in shape)
    soap_like = kronecker.block_layout((10, 3), 10, merge=False, split=False, limit=5)
    assert soap_like.block_shapes == ((10, 3),) and soap_like.preconditioned == ((False, True),)
    flat = soap_like.identity_factors(torch.float64)
    assert torch.equal(soap_like.factor_views(flat)[0][0], torch.eye(3, dtype=torch.float64))


def test_statistics_and_products_match_tensordot_batched_or_not() -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(3, 4, 2), (3, 4, 2), (5,), (3, 4, 2)]]
    flags = [(True, False, True), (True, False, True), (True,), (True, True, True)]
    for batched in (True, False):
        stats = kronecker.kronecker_statistics(blocks, flags, batched)
        for b, f, s in zip(blocks, flags, stats):
            order = b.dim()
            ks = [k for k in range(order) if f[k]]
            expected = [torch.tensordot(b, b, dims=[[i for i in range(order) if i != k]] * 2) for k in ks]
            assert len(s) == len(expected) and all(
                torch.allclose(a, e, rtol=1e-13, atol=0) for a, e in zip(s, expected)
            )
        mats = [
            [torch.randn(b.shape[k], b.shape[k], generator=gen, dtype=torch.float64) for k in range(b.dim()) if f[k]]
            for b, f in zip(blocks, flags)
        ]
        for transpose in (False, True):
            out = kronecker.apply_along_dims(blocks, mats, flags, transpose=transpose, batched=batched)
            for b, f, m, o in zip(blocks, flags, mats, out):
                it = iter(m)
                expected = functools.reduce(
                    lambda x, on: (
                        torch.tensordot(x, next(it), dims=([0], [1 if transpose else 0]))
                        if on
                        else x.permute(*range(1, x.dim()), 0)
                    ),
                    f,
                    b,
                )
                assert torch.allclose(o, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_inverse_roots_match_a_float64_fractional_matrix_power(batched: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    mats, roots = [], []
    for n, r in [(4, 2), (4, 4), (4, 4), (6, 8), (1, 2)]:
        x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
        mats.append(x @ x.T)
        roots.append(r)
    eps = 1e-3
    got = kronecker.inverse_roots(mats, roots, eps, batched)
    for a, r, g in zip(mats, roots, got):
        expected = torch.from_numpy(scipy.linalg.fractional_matrix_power((a + eps * torch.eye(len(a))).numpy(), -1 / r))
        assert relative_difference(g, expected.real) < 1e-10
    # A rank-deficient factor rounding left slightly indefinite is shifted to a smallest eigenvalue of epsilon.
    v = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    (root,) = kronecker.inverse_roots([v @ v.T], [2], 1e-8)
    lam = torch.linalg.eigvalsh(root)
    assert float(lam.max()) <= (1e-8) ** -0.5 * (1 + 1e-6)
    values, vectors = kronecker.eigenbases(mats[:3], epsilon=eps, batched=batched)
    for a, lam, q in zip(mats, values, vectors):
        assert torch.allclose(q @ torch.diag(lam) @ q.T, a + eps * torch.eye(len(a), dtype=a.dtype), atol=1e-10)


def test_same_shape_blocks_are_batched_and_state_is_per_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)) for _ in range(3)]
    opt = gradstep.Shampoo(params, max_preconditioner_dim=4, use_merge_dims=False)
    for p in params:
        p.grad = torch.randn_like(p)
    calls: list[int] = []
    eigh = torch.linalg.eigh

    def counting(x: Tensor) -> Any:
        calls.append(x.shape[0])
        return eigh(x)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    opt.step()
    # 3 parameters x 4 blocks, each of 2 factors; factor sizes 4, 1 and 2: one eigh per distinct size.
    assert sorted(calls) == [6, 6, 12]
    layout = kronecker.block_layout((6, 5), 4, merge=False)
    assert all(opt.state[p]["factor_matrices"].shape == (layout.factor_numel,) for p in params)

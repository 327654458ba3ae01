"""The registry-driven test matrix: every registered optimizer against the ``torch.optim.Optimizer`` contract.

Each test is parametrised over ``gradstep.core.registry.entries()`` (ids are the registry names), so an optimizer is
covered as soon as it is registered. Optimizers are built from ``entry.example`` (non-default hyperparameters, lr
included: some presets have no default lr). What an optimizer supports is read from its ``defaults`` and from
``entry.capabilities``, never from its class, so wrappers that are not ``ChainedOptimizer`` subclasses run the same
matrix.

Gradients come from a fixed function of the parameters, ``g = sin(3p + t) + 0.3p`` (the gradient of
``f_t(p) = sum(0.15 p^2 - cos(3p + t) / 3)``), so two runs that should agree see the same gradients. Tensors are tiny
and runs are a few steps long: the file runs once per entry per test.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

import gradstep
from gradstep.core import registry
from gradstep.core.hypers import REQUIRED
from gradstep.core.registry import Entry, states_of

ENTRIES: list[Entry] = registry.entries()
# Every entry's defaults (preset applied), read once from a probe instance: which hyperparameters it accepts.
DEFAULTS: dict[str, dict[str, Any]] = {e.name: e.hyperparameters() for e in ENTRIES}
STEPS = 6
SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (5,))
SHARDING_KINDS = {
    "elementwise",
    "per-tensor reduction",
    "whole-tensor",
    "whole-matrix",
    "whole-model reduction",
    "unsharded",
}

GradFn = Callable[[Tensor, int], "Tensor | None"]


def _name(entry: Entry) -> str:
    return entry.name


def lr_is_required(entry: Entry) -> bool:
    # As Entry._probe decides it: such presets are probed (and DEFAULTS read) with an arbitrary lr.
    return entry.preset.get("lr") is REQUIRED


def _entries_with(*hypers: str) -> list[Entry]:
    """The entries whose optimizer accepts at least one of ``hypers``."""
    return [e for e in ENTRIES if any(h in DEFAULTS[e.name] for h in hypers)]


def _entries_without_closure() -> list[Entry]:
    return [e for e in ENTRIES if not e.capabilities.closure_required]


each_entry = pytest.mark.parametrize("entry", ENTRIES, ids=_name)


# --- helpers --------------------------------------------------------------------------------------------------------
def build(entry: Entry, params: Any, **overrides: Any) -> torch.optim.Optimizer:
    """The entry's optimizer with its example hyperparameters, updated by ``overrides``."""
    return entry(params, **{**entry.example, **overrides})


# The current test's entry's Entry.min_ndim: matrix optimizers get (5, 1) for (5,) and (1, 1) for ().
_MIN_NDIM = [0]


@pytest.fixture(autouse=True)
def _tensors_the_entry_accepts(request: pytest.FixtureRequest) -> Any:
    callspec = getattr(request.node, "callspec", None)
    entry = callspec.params.get("entry") if callspec is not None else None
    _MIN_NDIM[0] = entry.min_ndim if isinstance(entry, Entry) else 0
    yield
    _MIN_NDIM[0] = 0


def make_params(
    shapes: Sequence[tuple[int, ...]] = SHAPES, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.nn.Parameter]:
    shapes = [tuple(s) + (1,) * (_MIN_NDIM[0] - len(s)) for s in shapes]
    # Drawn in float64 and then cast, so runs in different dtypes start from the same values (up to rounding).
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def clone_params(params: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def values(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def grad_of(p: Tensor, t: int) -> Tensor:
    """The gradient of ``f_t`` at ``p``, in ``p``'s dtype (computed in float32 for half-precision parameters)."""
    x = p.detach()
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return (torch.sin(3 * x + t) + 0.3 * x).to(p.dtype)


def as_entry_grad(entry: Entry, grad: Tensor | None) -> Tensor | None:
    """The gradient as the entry takes it: sparse-only optimizers (SparseAdam) get a sparse tensor of every element."""
    return grad.to_sparse() if grad is not None and entry.capabilities.sparse_only else grad


def sparsify_grads(entry: Entry, params: Sequence[Tensor]) -> None:
    """After ``backward()``: the gradients as the entry takes them (see :func:`as_entry_grad`)."""
    for p in params:
        p.grad = as_entry_grad(entry, p.grad)


def objective(params: Sequence[Tensor], t: int) -> Tensor:
    """``f_t``: differentiable, for autograd-driven runs (closures, GradScaler)."""
    return sum((0.15 * p.square() - torch.cos(3 * p + t) / 3).sum() for p in params)  # type: ignore[return-value]


def run(
    entry: Entry,
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    steps: int = STEPS,
    start: int = 0,
    grads: GradFn = grad_of,
) -> None:
    """Take ``steps`` steps numbered from ``start``; ``grads(p, t)`` is each parameter's gradient (None: none)."""
    for t in range(start, start + steps):
        # An optimizer that draws random numbers draws the same ones in two runs being compared.
        torch.manual_seed(t)

        def closure(t: int = t) -> Tensor:
            for p in params:
                p.grad = as_entry_grad(entry, grads(p, t))
            with torch.no_grad():
                return objective(params, t)

        if entry.capabilities.closure_required:
            opt.step(closure)
        else:
            closure()
            opt.step()


def assert_tree_equal(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0, path: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors: same dtype, close within rtol/atol)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{path}: {type(b).__name__} instead of a tensor"
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, b))} != {sorted(map(str, a))}"
        for k in a:
            assert_tree_equal(a[k], b[k], rtol, atol, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {b!r} != {a!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):  # LBFGS's prev_loss: a Python number, as torch keeps it
        assert a == b or abs(b - a) <= atol + rtol * abs(a), f"{path}: {b!r} != {a!r}"
    else:
        assert a == b, f"{path}: {b!r} != {a!r}"


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the state_dict (torch's state_dict holds references to the live state tensors)."""
    return copy.deepcopy(opt.state_dict())


def state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for s in opt.state_dict()["state"].values() for v in s.values() if isinstance(v, Tensor)]


def kept_state_dtype(opt: torch.optim.Optimizer) -> torch.dtype:
    """The dtype of the floating-point state of bfloat16 parameters: float32, but a torch.optim optimizer inside
    OptimWrapper keeps the parameter's dtype (torch's choice, which the wrapper leaves alone)."""
    inner = getattr(opt, "inner", None)
    return torch.bfloat16 if type(inner).__module__.startswith("torch.optim") else torch.float32


def param_states(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Any]]:
    return [dict(opt.state.get(p, {})) for p in params]


def project(entry: Entry, x: Tensor, group: dict[str, Any]) -> Tensor:
    """The entry's declared projection of ``x`` (``Capabilities.projects_params`` entries only)."""
    assert entry.projection is not None, f"{entry.name} projects parameters but declares no Entry.projection"
    return entry.projection(x, group)


def assert_finite(params: Sequence[Tensor]) -> None:
    for i, p in enumerate(params):
        assert torch.isfinite(p.detach()).all(), f"parameter {i} is not finite: {p}"


def assert_all_moved(before: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    for i, (old, p) in enumerate(zip(before, params)):
        assert not torch.equal(old, p.detach()), f"parameter {i} did not move"


# --- 1. construction ------------------------------------------------------------------------------------------------
@each_entry
def test_example_config_lands_in_defaults_and_param_groups(entry: Entry) -> None:
    opt = build(entry, make_params())
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1
    for name, value in entry.example.items():
        assert opt.defaults[name] == value, name
        assert opt.param_groups[0][name] == value, name


@each_entry
def test_invalid_values_raise_value_error_naming_the_argument(entry: Entry) -> None:
    assert entry.invalid, "every entry lists at least one invalid configuration"
    for hypers, argname in entry.invalid:
        with pytest.raises(ValueError, match=re.escape(argname)):
            build(entry, make_params(), **hypers)


@each_entry
def test_unknown_keyword_raises_type_error(entry: Entry) -> None:
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        build(entry, make_params(), not_a_hyperparameter=1.0)


@each_entry
def test_parameter_in_two_groups_raises_value_error(entry: Entry) -> None:
    p, q = make_params()
    with pytest.raises(ValueError):
        entry([{"params": [p]}, {"params": [q, p]}], **entry.example)


@each_entry
def test_required_lr_is_enforced_and_default_lr_is_optional(entry: Entry) -> None:
    hypers = {k: v for k, v in entry.example.items() if k != "lr"}
    if lr_is_required(entry):
        with pytest.raises(ValueError, match="lr"):
            entry(make_params(), **hypers)
    else:
        opt = entry(make_params(), **hypers)
        assert opt.param_groups[0]["lr"] == DEFAULTS[entry.name]["lr"]


# --- 2. dtypes ------------------------------------------------------------------------------------------------------
@each_entry
def test_steps_move_params_finitely_and_float32_agrees_with_float64(entry: Entry) -> None:
    results = {}
    for dtype in (torch.float32, torch.float64):
        params = make_params(dtype=dtype)
        before = values(params)
        run(entry, build(entry, params), params)
        assert_all_moved(before, params)
        assert_finite(params)
        assert all(p.dtype == dtype for p in params)
        results[dtype] = values(params)
    for p32, p64 in zip(results[torch.float32], results[torch.float64]):
        torch.testing.assert_close(p32.double(), p64, rtol=1e-3, atol=1e-4)


@each_entry
def test_bfloat16_params_move_and_keep_float32_state(entry: Entry) -> None:
    params = make_params(dtype=torch.bfloat16)
    before = values(params)
    opt = build(entry, params)
    run(entry, opt, params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert_all_moved(before, params)
    assert_finite(params)
    # (``step`` counters are float64 whatever the parameter's dtype: exact past 2**24 steps.)
    steps = {id(s["step"]) for p in params for s in states_of(opt, p) if "step" in s}
    floating = [v for v in state_tensors(opt) if v.is_floating_point() and id(v) not in steps]
    assert all(v.dtype == kept_state_dtype(opt) for v in floating), [v.dtype for v in floating]


# --- 3. memory layout -----------------------------------------------------------------------------------------------
@each_entry
def test_non_contiguous_params_match_contiguous_copies(entry: Entry) -> None:
    (x,) = make_params([(3, 4)])
    (y,) = make_params([(6, 4)], seed=1)
    strided = [torch.nn.Parameter(x.detach().clone().t()), torch.nn.Parameter(y.detach()[::2])]
    assert not any(p.is_contiguous() for p in strided)  # the premise of the test
    dense = [torch.nn.Parameter(p.detach().contiguous()) for p in strided]
    opt_strided, opt_dense = build(entry, strided), build(entry, dense)
    run(entry, opt_strided, strided)
    run(entry, opt_dense, dense)
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a.detach(), b.detach())
    assert_tree_equal(snapshot(opt_dense)["state"], snapshot(opt_strided)["state"], rtol=1.3e-6, atol=1e-5)


# --- 4. missing and zero gradients ----------------------------------------------------------------------------------
@each_entry
def test_param_without_grad_is_untouched_stateless_and_ignored(entry: Entry) -> None:
    a, b, c = make_params([(3, 4), (5,), (2, 2)])
    b_before = b.detach().clone()

    def grads(p: Tensor, t: int) -> Tensor | None:
        return None if p is b else grad_of(p, t)

    opt = build(entry, [a, b, c])
    run(entry, opt, [a, b, c], grads=grads)
    if entry.capabilities.projects_params:
        # Every step ends by projecting every parameter: b is moved to its projection, and no further.
        projected = project(entry, b_before, opt.param_groups[0])
        assert not torch.equal(projected, b_before), "premise: the projection moves b"
        torch.testing.assert_close(b.detach(), projected)
    else:
        assert torch.equal(b.detach(), b_before)
    assert not opt.state.get(b), f"a parameter without gradient got state {sorted(opt.state.get(b, {}))}"
    # The other parameters evolve exactly as if b were not in the optimizer at all.
    a2, c2 = clone_params(make_params([(3, 4), (5,), (2, 2)])[::2])
    run(entry, build(entry, [a2, c2]), [a2, c2])
    if entry.capabilities.closure_required:
        # A line search (LBFGS) compares loss values, which hold b's constant term, and sums over a flat vector with
        # b's zeros in it: rounding differences that a float32 line search can turn into other steps. In float64
        # they stay at rounding level.
        shapes = [(3, 4), (5,), (2, 2)]
        a, b, c = make_params(shapes, dtype=torch.float64)
        run(entry, build(entry, [a, b, c]), [a, b, c], grads=lambda p, t: None if p is b else grad_of(p, t))
        a2, _, c2 = make_params(shapes, dtype=torch.float64)
        run(entry, build(entry, [a2, c2]), [a2, c2])
        torch.testing.assert_close(a.detach(), a2.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c.detach(), c2.detach(), rtol=1e-9, atol=1e-9)
        return
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(c.detach(), c2.detach())


@each_entry
def test_zero_grads_keep_params_and_state_finite(entry: Entry) -> None:
    params = make_params()
    opt = build(entry, params)
    run(entry, opt, params, grads=lambda p, t: torch.zeros_like(p))
    assert_finite(params)
    for v in state_tensors(opt):
        if v.is_floating_point():
            assert torch.isfinite(v).all()


# --- 5. parameter groups --------------------------------------------------------------------------------------------
@each_entry
def test_each_group_uses_its_own_hyperparameters(entry: Entry) -> None:
    if entry.capabilities.single_group:  # LBFGS, as torch's: one group, and a clear refusal of more
        with pytest.raises(ValueError, match="parameter groups"):
            build(entry, [{"params": make_params()[:1]}, {"params": make_params()[1:]}])
        return
    if entry.capabilities.sharding == "whole-model reduction":
        _check_groups_sharing_one_step_size(entry)
        return
    lr = entry.example["lr"]
    second: dict[str, Any] = {"lr": lr * 0.3}
    if "weight_decay" in DEFAULTS[entry.name]:
        second["weight_decay"] = 0.05
    a, b, c = make_params([(3, 4), (5,), (2, 3)])
    groups = [{"params": []}, {"params": [a, b]}, {"params": [c], **second}]
    opt = build(entry, groups)
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["lr"] == second["lr"]
    run(entry, opt, [a, b, c])

    # Reference: one single-group optimizer per group, the second built with that group's values as defaults.
    a1, b1, c1 = clone_params(make_params([(3, 4), (5,), (2, 3)]))
    opt1, opt2 = build(entry, [a1, b1]), build(entry, [c1], **second)
    run(entry, opt1, [a1, b1])
    run(entry, opt2, [c1])
    for got, want in zip([a, b, c], [a1, b1, c1]):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)


def _check_groups_sharing_one_step_size(entry: Entry) -> None:
    """D-Adaptation and Prodigy estimate one step size from the whole model: groups cannot be stepped apart (and must
    share lr), but each group's weight decay is its own, and an empty group changes nothing."""
    second = {"weight_decay": 0.05}
    a, b, c = make_params([(3, 4), (5,), (2, 3)])
    opt = build(entry, [{"params": []}, {"params": [a, b]}, {"params": [c], **second}])
    assert opt.param_groups[2]["weight_decay"] == 0.05
    run(entry, opt, [a, b, c])
    a1, b1, c1 = clone_params(make_params([(3, 4), (5,), (2, 3)]))
    run(entry, build(entry, [{"params": [a1, b1]}, {"params": [c1], **second}]), [a1, b1, c1])
    for got, want in zip([a, b, c], [a1, b1, c1]):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
    # float64: the first steps of an estimate that starts from d0 = 1e-6 move the parameters by little
    decayed, plain = make_params([(2, 3)], torch.float64), make_params([(2, 3)], torch.float64)
    run(entry, build(entry, [{"params": decayed, **second}]), decayed)
    run(entry, build(entry, [{"params": plain}]), plain)
    assert not torch.equal(decayed[0].detach(), plain[0].detach()), "the group's weight decay had no effect"


# --- 6. closure -----------------------------------------------------------------------------------------------------
@each_entry
def test_step_with_closure_returns_its_loss_and_matches_manual_grads(entry: Entry) -> None:
    params = make_params()
    opt = build(entry, params)
    for t in range(STEPS):
        losses: list[Tensor] = []

        def closure(t: int = t, losses: list[Tensor] = losses) -> Tensor:
            # step() runs under no_grad; the torch contract is that it re-enables grad for the closure.
            opt.zero_grad()
            loss = objective(params, t)
            loss.backward()
            sparsify_grads(entry, params)
            losses.append(loss)
            return loss

        torch.manual_seed(t)
        returned = opt.step(closure)
        # An optimizer that evaluates the closure several times (LBFGS) returns the first loss, as torch's does.
        assert losses and returned is losses[0 if entry.capabilities.closure_required else -1]
    if entry.capabilities.closure_required:
        return  # the same steps cannot be taken without a closure

    manual = clone_params(make_params())
    opt_manual = build(entry, manual)
    for t in range(STEPS):
        opt_manual.zero_grad()
        objective(manual, t).backward()
        sparsify_grads(entry, manual)
        torch.manual_seed(t)
        assert opt_manual.step() is None
    for got, want in zip(params, manual):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)


# --- 7. maximize ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _entries_with("maximize"), ids=_name)
def test_maximize_with_grad_equals_minimize_with_negated_grad(entry: Entry) -> None:
    up, down = make_params(), make_params()
    opt_up, opt_down = build(entry, up, maximize=True), build(entry, down, maximize=False)
    assert opt_up.defaults["maximize"] is True
    for t in range(STEPS):
        run(entry, opt_up, up, steps=1, start=t)
        run(entry, opt_down, down, steps=1, start=t, grads=lambda p, t: -grad_of(p, t))
        for u, d in zip(up, down):
            assert torch.equal(u.detach(), d.detach()), f"trajectories differ at step {t}"


# --- 8. LR schedulers -----------------------------------------------------------------------------------------------
@each_entry
def test_step_lr_equals_setting_lr_by_hand(entry: Entry) -> None:
    lr = entry.example["lr"]
    scheduled, manual, constant = make_params(), make_params(), make_params()
    opt_s, opt_m, opt_c = build(entry, scheduled), build(entry, manual), build(entry, constant)
    sched = torch.optim.lr_scheduler.StepLR(opt_s, step_size=2, gamma=0.5)
    for t in range(STEPS):
        run(entry, opt_s, scheduled, steps=1, start=t)
        sched.step()
        # gamma is a power of two, so the hand-computed lr is bitwise the scheduler's.
        opt_m.param_groups[0]["lr"] = lr * 0.5 ** (t // 2)
        run(entry, opt_m, manual, steps=1, start=t)
    run(entry, opt_c, constant)
    assert opt_s.param_groups[0]["lr"] == lr * 0.5 ** (STEPS // 2)
    for s, m in zip(scheduled, manual):
        torch.testing.assert_close(s.detach(), m.detach(), rtol=0, atol=0)
    changed = [not torch.equal(s.detach(), c.detach()) for s, c in zip(scheduled, constant)]
    if entry.lr_sets_initial_step:  # Rprop, as torch's: lr only initialises the step sizes
        assert not any(changed), "a schedule changed the steps of an optimizer whose lr is only an initial step"
    else:
        assert any(changed), "lr had no effect"


@each_entry
def test_one_cycle_lr_cycles_lr_and_momentum(entry: Entry) -> None:
    defaults = DEFAULTS[entry.name]
    uses_betas, uses_momentum = "betas" in defaults, "momentum" in defaults
    overrides = {}
    if uses_momentum and not uses_betas and not entry.example.get("momentum"):
        overrides["momentum"] = 0.9  # momentum cycling needs a momentum to act on
    params = make_params()
    before = values(params)
    opt = build(entry, params, **overrides)
    cycle_momentum = uses_betas or uses_momentum
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=entry.example["lr"], total_steps=STEPS, cycle_momentum=cycle_momentum
    )
    lrs, moms = [], []
    for t in range(STEPS):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        if cycle_momentum:
            moms.append(group["betas"][0] if uses_betas else group["momentum"])
        run(entry, opt, params, steps=1, start=t)
        sched.step()
    assert len(set(lrs)) > 1, lrs
    if cycle_momentum:
        assert len(set(moms)) > 1, moms
    assert_all_moved(before, params)
    assert_finite(params)


# --- 9. GradScaler --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _entries_without_closure(), ids=_name)
def test_grad_scaler_matches_unscaled_run(entry: Entry) -> None:
    plain, scaled = make_params(), make_params()
    opt_plain, opt_scaled = build(entry, plain), build(entry, scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for t in range(STEPS):
        torch.manual_seed(t)
        opt_plain.zero_grad()
        objective(plain, t).backward()
        sparsify_grads(entry, plain)
        opt_plain.step()
        torch.manual_seed(t)
        opt_scaled.zero_grad()
        scaler.scale(objective(scaled, t)).backward()
        sparsify_grads(entry, scaled)
        scaler.step(opt_scaled)
        scaler.update()
    assert scaler.get_scale() == 2.0**8  # no step was skipped
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b.detach(), a.detach())


@pytest.mark.parametrize("entry", _entries_without_closure(), ids=_name)
def test_grad_scaler_skips_step_with_inf_gradient(entry: Entry) -> None:
    params = make_params()
    opt = build(entry, params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    run(entry, opt, params, steps=2)  # some state to protect
    before, state_before = values(params), snapshot(opt)
    opt.zero_grad()
    loss = objective(params, 2) + (params[0] * float("inf")).sum()
    scaler.scale(loss).backward()
    assert not torch.isfinite(params[0].grad).all()
    sparsify_grads(entry, params)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**8
    for old, p in zip(before, params):
        assert torch.equal(old, p.detach())
    assert_tree_equal(state_before, snapshot(opt))


# --- 10-11. learning-rate values ------------------------------------------------------------------------------------
@each_entry
def test_zero_lr_leaves_params_bitwise_unchanged(entry: Entry) -> None:
    configs: list[dict[str, Any]] = [{"lr": 0.0}]
    if "weight_decay" in DEFAULTS[entry.name]:
        configs.append({"lr": 0.0, "weight_decay": 0.1})
    for config in configs:
        params = make_params()
        before = values(params)
        opt = build(entry, params, **config)
        run(entry, opt, params)
        if entry.capabilities.projects_params:
            # A projection still projects with a zero lr: each parameter is its projection, which stays put.
            projected = [project(entry, old, opt.param_groups[0]) for old in before]
            assert any(not torch.equal(old, q) for old, q in zip(before, projected)), "premise: the projection acts"
            for q, p in zip(projected, params):
                torch.testing.assert_close(p.detach(), q, msg=lambda m, config=config: f"{config}: {m}")
            continue
        for old, p in zip(before, params):
            assert torch.equal(old, p.detach()), f"{config} changed the parameters"


@each_entry
def test_tensor_lr_matches_float_lr(entry: Entry) -> None:
    lr = entry.example["lr"]
    lr_tensor = torch.tensor(lr)
    floats, tensors = make_params(), make_params()
    run(entry, build(entry, floats), floats)
    run(entry, build(entry, tensors, lr=lr_tensor), tensors)
    for a, b in zip(floats, tensors):
        torch.testing.assert_close(b.detach(), a.detach())
    assert lr_tensor.item() == torch.tensor(lr).item(), "the optimizer wrote into the user's lr tensor"


# --- 12-13. checkpoints and copies ----------------------------------------------------------------------------------
@each_entry
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_state_dict_round_trip_resumes_bitwise(entry: Entry, dtype: torch.dtype) -> None:
    k = STEPS // 2
    straight = make_params(dtype=dtype)
    run(entry, build(entry, straight), straight)

    source_params = make_params(dtype=dtype)
    source = build(entry, source_params)
    run(entry, source, source_params, steps=k)
    saved = snapshot(source)

    resumed_params = clone_params(source_params)
    resumed = build(entry, resumed_params)
    resumed.load_state_dict(source.state_dict())
    # Same state, same dtypes (fp32 state of bf16 parameters stays fp32), same hyperparameters.
    assert_tree_equal(saved["state"], snapshot(resumed)["state"])
    assert_tree_equal(saved["param_groups"], snapshot(resumed)["param_groups"])
    if dtype == torch.bfloat16:
        # (``step`` counters are float64 whatever the parameter's dtype: exact past 2**24 steps.)
        steps = {id(s["step"]) for p in resumed_params for s in states_of(resumed, p) if "step" in s}
        floats = [v for v in state_tensors(resumed) if v.is_floating_point() and id(v) not in steps]
        assert all(v.dtype == kept_state_dtype(resumed) for v in floats)

    # Through bytes, loadable with weights_only=True.
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    reloaded_params = clone_params(source_params)
    reloaded = build(entry, reloaded_params)
    reloaded.load_state_dict(loaded)

    run(entry, resumed, resumed_params, steps=STEPS - k, start=k)
    run(entry, reloaded, reloaded_params, steps=STEPS - k, start=k)
    for want, got, got2 in zip(straight, resumed_params, reloaded_params):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got2.detach(), want.detach(), rtol=0, atol=0)

    # No shared state tensors: stepping the loaded optimizer left the source alone, and the reverse.
    assert_tree_equal(saved["state"], snapshot(source)["state"])
    resumed_state = snapshot(resumed)
    for v in state_tensors(source):
        if v.dtype == torch.bool:
            v.logical_not_()
        else:
            v.add_(1)
    assert_tree_equal(resumed_state["state"], snapshot(resumed)["state"])


@each_entry
def test_deepcopy_with_state_steps_identically(entry: Entry) -> None:
    torch.manual_seed(0)
    bias = entry.min_ndim < 2
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=bias), torch.nn.Linear(3, 1, bias=bias))
    opt = build(entry, model.parameters())
    params = list(model.parameters())
    run(entry, opt, params, steps=2)
    model2, opt2 = copy.deepcopy((model, opt))
    params2 = list(model2.parameters())
    assert all(p2 is q for p2, q in zip(opt2.param_groups[0]["params"], params2))
    assert_tree_equal(snapshot(opt)["state"], snapshot(opt2)["state"])
    run(entry, opt, params, steps=STEPS - 2, start=2)
    run(entry, opt2, params2, steps=STEPS - 2, start=2)
    for a, b in zip(params, params2):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert_tree_equal(snapshot(opt)["state"], snapshot(opt2)["state"])


# --- 14. foreach ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _entries_with("foreach"), ids=_name)
def test_foreach_matches_per_tensor_reference(entry: Entry) -> None:
    shapes = [(), (5,), (2, 1, 3, 2), (0, 3), (3, 4)]
    fast, reference = make_params(shapes, torch.float64), make_params(shapes, torch.float64)
    before = values(fast)
    opt_fast, opt_ref = build(entry, fast, foreach=True), build(entry, reference, foreach=False)
    run(entry, opt_fast, fast)
    run(entry, opt_ref, reference)
    assert_all_moved([b for b in before if b.numel()], [p for p in fast if p.numel()])
    for a, b in zip(fast, reference):
        assert a.shape == b.shape
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-12)
    assert_tree_equal(snapshot(opt_ref)["state"], snapshot(opt_fast)["state"], rtol=1e-6, atol=1e-12)


# --- 15. gradients are read-only ------------------------------------------------------------------------------------
@each_entry
def test_step_never_modifies_grads(entry: Entry) -> None:
    defaults = DEFAULTS[entry.name]
    configs: list[dict[str, Any]] = [{}]
    extra = {k: v for k, v in {"maximize": True, "weight_decay": 0.1}.items() if k in defaults}
    if extra:
        configs.append(extra)
    if "foreach" in defaults:
        configs += [{**c, "foreach": False} for c in configs]
    for config in configs:
        params = make_params()
        opt = build(entry, params, **config)
        for t in range(3):
            for p in params:
                p.grad = as_entry_grad(entry, grad_of(p, t))
            grads_before = [p.grad.clone() for p in params]
            grad_objects = [p.grad for p in params]
            if entry.capabilities.closure_required:
                opt.step(lambda t=t, params=params: objective(params, t).detach())
            else:
                opt.step()
            for p, g, obj in zip(params, grads_before, grad_objects):
                same = torch.equal(p.grad.to_dense(), g.to_dense()) and p.grad.layout == g.layout
                assert p.grad is obj and same, f"{config}: step {t} modified a gradient"


# --- 16. registry coverage ------------------------------------------------------------------------------------------
# Base classes for subclassing or composition (they need transforms or an inner optimizer), not optimizers of their own.
BASES = {
    "ChainedOptimizer",
    "ParamTransformingOptimizer",
    "ChainedParamTransformingOptimizer",
    "WrapperBase",
    "StatefulWrapper",
}
PUBLIC_MODULES = (gradstep, gradstep.optim, gradstep.paramtransform, gradstep.wrappers)
PUBLIC_OPTIMIZERS = sorted(
    {
        f"{module.__name__}.{name}"
        for module in PUBLIC_MODULES
        for name in module.__all__
        if isinstance(getattr(module, name), type)
        and issubclass(getattr(module, name), torch.optim.Optimizer)
        and name not in BASES
    }
)


def test_public_optimizers_were_found() -> None:
    assert PUBLIC_OPTIMIZERS, "gradstep.__all__ exports no optimizer class"


@pytest.mark.parametrize("qualname", PUBLIC_OPTIMIZERS)
def test_public_optimizer_has_a_registry_entry(qualname: str) -> None:
    module_name, _, name = qualname.rpartition(".")
    module = next(m for m in PUBLIC_MODULES if m.__name__ == module_name)
    registered = {e.cls for e in ENTRIES}
    assert getattr(module, name) in registered, f"{qualname} is public but has no registry entry"


# --- 17. capabilities and init_state --------------------------------------------------------------------------------
@each_entry
def test_capabilities_are_well_formed_and_match_a_real_step(entry: Entry) -> None:
    caps = entry.capabilities
    assert caps.state_bytes_per_param >= 0 and caps.state_tensors >= 0
    assert caps.sharding in SHARDING_KINDS
    assert isinstance(caps.closure_required, bool) and isinstance(caps.supports_complex, bool)
    # The capabilities describe the default configuration: measure one real step of it on a float32 parameter.
    # Arguments without a default (some presets' lr, rai's q or epsilon) are given as Entry._probe gives them.
    required = {k: entry.example.get(k, 1e-3) for k in entry.required_args}
    (p,) = make_params([(4, 4)])
    opt = entry([p], **required)
    run(entry, opt, [p], steps=1)
    full = [v for s in states_of(opt, p) for v in s.values() if isinstance(v, Tensor) and v.numel() == p.numel()]
    assert caps.state_tensors == len(full)
    assert caps.state_bytes_per_param == sum(v.element_size() for v in full)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if hasattr(e.cls, "init_state")], ids=_name)
def test_init_state_creates_what_one_step_creates_and_nothing_else(entry: Entry) -> None:
    def groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        if entry.capabilities.single_group:
            return [{"params": params}]
        return [{"params": params[:2]}, {"params": params[2:]}]

    def fresh() -> list[torch.nn.Parameter]:
        return make_params(SHAPES) + make_params([(2, 3)], dtype=torch.bfloat16)

    initialised, stepped, both = fresh(), fresh(), fresh()
    opt_init, opt_step = build(entry, groups(initialised)), build(entry, groups(stepped))
    opt_init.init_state()
    for a, b in zip(initialised, fresh()):
        assert torch.equal(a.detach(), b.detach()), "init_state() changed a parameter"
    run(entry, opt_step, stepped, steps=1)
    for s_init, s_step in zip(param_states(opt_init, initialised), param_states(opt_step, stepped)):
        assert set(s_init) == set(s_step)
        for key, v in s_step.items():
            if isinstance(v, Tensor):
                assert (s_init[key].shape, s_init[key].dtype) == (v.shape, v.dtype), key
            else:
                assert type(s_init[key]) is type(v), key
    # Initialising first has no effect on the trajectory.
    opt_both = build(entry, groups(both))
    opt_both.init_state()
    run(entry, opt_both, both)
    plain = fresh()
    run(entry, build(entry, groups(plain)), plain)
    for a, b in zip(both, plain):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)

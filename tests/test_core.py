"""Cross-cutting features of the core (ChainedOptimizer), exercised through Adam, SGD, AdamW and ``chain``.

Per-optimizer parity with the originals lives elsewhere; here every expectation is either written from the formula in
the test (float64, small tensors) or compared against an independent reference (torch.optim, separate param groups,
an eager run).
"""

from __future__ import annotations

import io
import math
import warnings
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

import gradstep
from gradstep import NonFiniteError, NonFiniteEvent, NonFiniteTracer
from gradstep.core.hypers import Hyper, unit_interval
from gradstep.core.transform import GroupStep, Transform, zeros
from gradstep.transforms import Momentum, ScaleBySign

POLICIES = ("error", "skip", "zero", "revert", "ignore")
NAN = float("nan")
INF = float("inf")


# --- helpers ----------------------------------------------------------------------------------------------------------
def _two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()


def _set_grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _snapshot(opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Copies of every parameter and every state entry, to prove later that nothing changed."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    states = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    ]
    return params, states


def _assert_unchanged(opt: torch.optim.Optimizer, snap: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> None:
    params, states = snap
    now = [p for g in opt.param_groups for p in g["params"]]
    for p, old in zip(now, params):
        assert torch.equal(p.detach(), old)
    for p, old in zip(now, states):
        assert set(opt.state[p]) == set(old)
        for k, v in old.items():
            assert torch.equal(opt.state[p][k], v), k


def _params(*values: list[float], dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    return [nn.Parameter(torch.tensor(v, dtype=dtype)) for v in values]


# --- 1. non-finite policy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_error_is_default_names_parameter_and_changes_nothing(bad: float) -> None:
    model = _two_layer_model()
    opt = gradstep.Adam(model.named_parameters(), lr=0.1)
    assert opt.defaults["nonfinite"] == "error"
    params = list(model.parameters())
    _set_grads(params, seed=1)
    opt.step()
    snap = _snapshot(opt)

    _set_grads(params, seed=2)
    model[1].weight.grad[0, 1] = bad
    with pytest.raises(NonFiniteError, match=r"1\.weight"):
        opt.step()
    _assert_unchanged(opt, snap)
    assert opt.global_step == 1
    assert opt.skipped_steps == 0
    assert all(opt.state[p]["step"].item() == 1 for p in params)


def test_nonfinite_skip_skips_whole_step_across_all_groups() -> None:
    finite, bad = _params([1.0, 2.0], [3.0, 4.0])
    opt = gradstep.SGD([{"params": [finite]}, {"params": [bad]}], lr=0.1, momentum=0.9, nonfinite="skip")
    finite.grad, bad.grad = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    opt.step()
    snap = _snapshot(opt)

    # Group 0's gradient is finite, but the step is skipped there too (GradScaler semantics).
    finite.grad = torch.full((2,), 5.0, dtype=torch.float64)
    bad.grad = torch.tensor([1.0, NAN], dtype=torch.float64)
    opt.step()
    _assert_unchanged(opt, snap)
    assert opt.skipped_steps == 1
    assert opt.global_step == 1

    bad.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert opt.global_step == 2
    assert opt.skipped_steps == 1
    assert not torch.equal(finite.detach(), snap[0][0])


def test_nonfinite_zero_replaces_bad_gradient_tensor_by_zeros() -> None:
    lr, wd = 0.1, 0.2
    a, b, c = _params([1.0, 2.0], [3.0, -1.0], [5.0, 6.0])
    opt = gradstep.SGD([{"params": [a, b], "weight_decay": wd}, {"params": [c]}], lr=lr, nonfinite="zero")
    g_b = torch.tensor([0.5, -0.25], dtype=torch.float64)
    # a's finite element (5.0) must not move it either: the whole tensor is zeroed.
    a.grad = torch.tensor([NAN, 5.0], dtype=torch.float64)
    b.grad = g_b.clone()
    c.grad = torch.tensor([INF, 1.0], dtype=torch.float64)
    opt.step()
    # Coupled decay: a only decays, b takes a normal step, c (no decay) stays where it was.
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) * (1 - lr * wd))
    torch.testing.assert_close(
        b.detach(), torch.tensor([3.0, -1.0], dtype=torch.float64) - lr * (g_b + wd * b.new_tensor([3.0, -1.0]))
    )
    torch.testing.assert_close(c.detach(), torch.tensor([5.0, 6.0], dtype=torch.float64))
    assert opt.global_step == 1


def test_nonfinite_revert_keeps_old_values_where_new_would_be_nonfinite() -> None:
    lr = 0.1
    (p,) = _params([1.0, 2.0, 3.0])
    opt = gradstep.SGD([p], lr=lr, nonfinite="revert")
    p.grad = torch.tensor([NAN, INF, 1.0], dtype=torch.float64)
    opt.step()
    # Element by element: the finite third element still moves.
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0, 3.0 - lr], dtype=torch.float64))

    # A finite gradient whose step overflows float32 is reverted too.
    q = nn.Parameter(torch.tensor([3.0e38, 1.0]))
    opt = gradstep.SGD([q], lr=10.0, nonfinite="revert")
    q.grad = torch.tensor([-1.0e38, 0.5])
    opt.step()
    assert q[0].item() == pytest.approx(3.0e38, rel=1e-6)
    assert q[1].item() == pytest.approx(1.0 - 10.0 * 0.5)

    # The documented cost: state fed by a non-finite gradient stays non-finite.
    (r,) = _params([1.0, 1.0])
    opt = gradstep.Adam([r], lr=0.1, nonfinite="revert")
    r.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
    opt.step()
    assert r[0].item() == 1.0 and r[1].item() < 1.0
    assert math.isnan(opt.state[r]["exp_avg"][0].item())


def test_nonfinite_ignore_behaves_like_torch_optim() -> None:
    (p,) = _params([1.0, 2.0, 3.0])
    ref = nn.Parameter(p.detach().clone())
    opt = gradstep.SGD([p], lr=0.1, momentum=0.5, nonfinite="ignore")
    torch_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.5)
    for grad in ([NAN, 1.0, 2.0], [1.0, INF, 1.0]):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        ref.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    assert math.isnan(p[0].item())
    torch.testing.assert_close(p.detach(), ref.detach(), equal_nan=True)
    assert opt.global_step == 2 and opt.skipped_steps == 0


# --- 2. NonFiniteTracer -----------------------------------------------------------------------------------------------
def test_tracer_on_torch_sgd_records_first_gradient_event() -> None:
    model = _two_layer_model()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    seen: list[NonFiniteEvent] = []
    tracer = NonFiniteTracer(opt, on_event=seen.append)
    params = list(model.parameters())
    for seed in (1, 2):
        _set_grads(params, seed)
        opt.step()
    assert tracer.first is None and tracer.events == []

    _set_grads(params, 3)
    model[1].bias.grad[1] = NAN
    opt.step()
    assert tracer.first == NonFiniteEvent(step=3, kind="gradient", group=0, name="1.bias")
    # torch.optim writes the NaN into the parameter, which the post-step check reports as well.
    assert NonFiniteEvent(step=3, kind="parameter", group=0, name="1.bias") in tracer.events
    assert seen == tracer.events
    tracer.remove()


def test_tracer_on_gradstep_optimizer_with_skip_sees_gradient_only() -> None:
    model = _two_layer_model()
    opt = gradstep.Adam(model.named_parameters(), lr=0.1, nonfinite="skip")
    tracer = NonFiniteTracer(opt)
    params = list(model.parameters())
    _set_grads(params, 1)
    opt.step()
    _set_grads(params, 2)
    model[0].weight.grad[2, 0] = INF
    opt.step()
    assert tracer.first == NonFiniteEvent(step=2, kind="gradient", group=0, name="0.weight")
    # The step was skipped, so no parameter went non-finite.
    assert [e.kind for e in tracer.events] == ["gradient"]
    assert opt.skipped_steps == 1
    tracer.remove()


def test_tracer_raise_on_first_raises_before_the_step() -> None:
    model = _two_layer_model()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    tracer = NonFiniteTracer(opt, raise_on_first=True)
    params = list(model.parameters())
    _set_grads(params, 1)
    model[0].bias.grad[0] = NAN
    before = [p.detach().clone() for p in params]
    with pytest.raises(NonFiniteError, match=r"0\.bias"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    tracer.remove()


def test_tracer_remove_detaches() -> None:
    (p,) = _params([1.0, 2.0])
    opt = torch.optim.SGD([p], lr=0.1)
    tracer = NonFiniteTracer(opt, raise_on_first=True)
    tracer.remove()
    p.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
    opt.step()  # would raise if the hooks were still attached
    assert tracer.first is None and tracer.events == [] and tracer.steps == 0


# --- 3. sparse gradients ----------------------------------------------------------------------------------------------
def _sparse_grad(n: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        torch.tensor([[0]]), torch.tensor([1.0], dtype=torch.float64), (n,), check_invariants=True
    )


def test_sparse_gradient_raises_runtime_error() -> None:
    (p,) = _params([1.0, 2.0, 3.0])
    opt = gradstep.Adam([p], lr=0.1)
    p.grad = _sparse_grad(3)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_sparse_gradient_in_second_group_leaves_first_group_untouched() -> None:
    dense, sparse = _params([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    opt = gradstep.Adam([{"params": [dense]}, {"params": [sparse]}], lr=0.1)
    _set_grads([dense, sparse], 1)
    opt.step()
    snap = _snapshot(opt)
    _set_grads([dense], 2)
    sparse.grad = _sparse_grad(3)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, snap)
    assert opt.global_step == 1


# --- 4. checkpoints ---------------------------------------------------------------------------------------------------
def _adam_after(steps: int, dtype: torch.dtype = torch.float64) -> tuple[gradstep.Adam, nn.Parameter]:
    p = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=dtype))
    opt = gradstep.Adam([p], lr=0.1, amsgrad=True)
    for seed in range(steps):
        _set_grads([p], seed)
        opt.step()
    return opt, p


def test_load_state_dict_copies_state_tensors() -> None:
    src, p = _adam_after(2)
    sd = src.state_dict()
    saved = {k: v.clone() for k, v in sd["state"][0].items()}
    q = nn.Parameter(p.detach().clone())
    dst = gradstep.Adam([q], lr=0.1, amsgrad=True)
    dst.load_state_dict(sd)
    for k, v in dst.state[q].items():
        assert v.data_ptr() != src.state[p][k].data_ptr(), k
        assert v.data_ptr() != sd["state"][0][k].data_ptr(), k
        assert torch.equal(v, saved[k]), k

    # Stepping the source and scribbling on the dict leave the loaded copy alone.
    _set_grads([p], 7)
    src.step()
    sd["state"][0]["exp_avg"].fill_(123.0)
    for k, v in dst.state[q].items():
        assert torch.equal(v, saved[k]), k

    # And the loaded optimizer resumes exactly where the source was.
    fresh, p2 = _adam_after(2)
    _set_grads([p2], 7)
    _set_grads([q], 7)
    fresh.step()
    dst.step()
    assert torch.equal(q.detach(), p2.detach())


def test_torch_sgd_state_dict_into_gradstep_adam_raises_clear_value_error() -> None:
    p = nn.Parameter(torch.ones(3))
    torch_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    torch_opt.step()
    opt = gradstep.Adam([nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(torch_opt.state_dict())
    assert len(opt.state) == 0


def test_gradstep_sgd_state_dict_into_adam_raises_value_error() -> None:
    p = nn.Parameter(torch.ones(3))
    sgd = gradstep.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    sgd.step()
    opt = gradstep.Adam([nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="SGD"):
        opt.load_state_dict(sgd.state_dict())


def test_state_with_unknown_key_raises_value_error() -> None:
    src, _ = _adam_after(1)
    sd = src.state_dict()
    sd["state"][0]["bogus_buffer"] = torch.zeros(5)
    opt = gradstep.Adam([nn.Parameter(torch.zeros(5, dtype=torch.float64))], lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="bogus_buffer"):
        opt.load_state_dict(sd)


def test_global_step_survives_save_and_load() -> None:
    src, _ = _adam_after(3)
    assert src.global_step == 3
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = gradstep.Adam([nn.Parameter(torch.zeros(5, dtype=torch.float64))], lr=0.1, amsgrad=True)
    dst.load_state_dict(torch.load(buf))
    assert dst.global_step == 3
    dst.param_groups[0]["params"][0].grad = torch.ones(5, dtype=torch.float64)
    dst.step()
    assert dst.global_step == 4


def test_bf16_params_keep_fp32_state_across_save_and_load() -> None:
    src, p = _adam_after(2, dtype=torch.bfloat16)
    assert src.state[p]["exp_avg"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    q = nn.Parameter(p.detach().clone())
    dst = gradstep.Adam([q], lr=0.1, amsgrad=True)
    dst.load_state_dict(torch.load(buf))
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert dst.state[q][k].dtype == torch.float32, k  # torch.optim would cast to bf16 here
        assert torch.equal(dst.state[q][k], src.state[p][k]), k


# --- 5. low precision -------------------------------------------------------------------------------------------------
def test_bf16_params_get_fp32_state_by_default_and_bf16_on_request() -> None:
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    q = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    default = gradstep.Adam([p], lr=0.1)
    low = gradstep.Adam([q], lr=0.1, state_dtype="bfloat16")
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    q.grad = torch.ones(4, dtype=torch.bfloat16)
    default.step()
    low.step()
    assert default.state[p]["exp_avg"].dtype == torch.float32
    assert default.state[p]["exp_avg_sq"].dtype == torch.float32
    assert low.state[q]["exp_avg"].dtype == torch.bfloat16
    assert low.state[q]["exp_avg_sq"].dtype == torch.bfloat16
    assert p.dtype == q.dtype == torch.bfloat16
    assert p[0].item() < 1.0 and q[0].item() < 1.0


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_stochastic_rounding_keeps_updates_below_bf16_resolution(state_dtype: str | None) -> None:
    # 1.0 - 1e-4 rounds back to 1.0 in bf16 (spacing below 1.0 is 2**-8 ~ 3.9e-3), so 100 plain steps do nothing.
    n, steps, lr = 1024, 100, 1e-4
    plain = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    rounded = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt_plain = gradstep.SGD([plain], lr=lr, state_dtype=state_dtype)
    opt_sr = gradstep.SGD([rounded], lr=lr, state_dtype=state_dtype, stochastic_rounding=True)
    torch.manual_seed(0)
    for _ in range(steps):
        plain.grad = torch.ones(n, dtype=torch.bfloat16)
        rounded.grad = torch.ones(n, dtype=torch.bfloat16)
        opt_plain.step()
        opt_sr.step()
    assert torch.all(plain.detach() == 1.0)
    # Unbiased rounding: the mean moves by lr * steps = 0.01; the std of the mean is ~2e-4 here, the tolerance 1.5e-3.
    moved = 1.0 - rounded.detach().double().mean().item()
    assert moved == pytest.approx(lr * steps, rel=0.15)
    assert rounded.dtype == torch.bfloat16


# --- 6. gradients are never modified ----------------------------------------------------------------------------------
GRAD_CASES = {
    "sgd_coupled_wd_momentum": (lambda ps: gradstep.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1), False),
    "sgd_nesterov_maximize": (
        lambda ps: gradstep.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True, weight_decay=0.1),
        False,
    ),
    "adam_coupled_wd_maximize": (lambda ps: gradstep.Adam(ps, lr=0.1, weight_decay=0.1, maximize=True), False),
    "adamw_maximize": (lambda ps: gradstep.AdamW(ps, lr=0.1, maximize=True), False),
    "sgd_zero_policy": (lambda ps: gradstep.SGD(ps, lr=0.1, weight_decay=0.1, nonfinite="zero"), True),
    "adam_zero_policy_maximize": (lambda ps: gradstep.Adam(ps, lr=0.1, maximize=True, nonfinite="zero"), True),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_are_never_modified(case: str) -> None:
    make, with_nan = GRAD_CASES[case]
    params = _params([1.0, -2.0, 3.0], [0.5, 0.25])
    opt = make(params)
    for seed in range(2):
        _set_grads(params, seed)
        if with_nan:
            params[0].grad[1] = NAN
        grads = [p.grad for p in params]
        copies = [g.clone() for g in grads]
        opt.step()
        for p, g, c in zip(params, grads, copies):
            assert p.grad is g
            torch.testing.assert_close(g, c, equal_nan=True, rtol=0, atol=0)


# --- 7. zero-size parameters, duplicate parameters --------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_zero_size_parameters_work_with_every_policy(policy: str, name: str) -> None:
    make = {
        "adam": lambda ps: gradstep.Adam(ps, lr=0.1, nonfinite=policy),
        "sgd": lambda ps: gradstep.SGD(ps, lr=0.1, momentum=0.9, nonfinite=policy),
    }[name]
    empty = nn.Parameter(torch.zeros(0, dtype=torch.float64))
    full = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    ref = nn.Parameter(full.detach().clone())
    opt, ref_opt = make([empty, full]), make([ref])
    for seed in range(2):
        _set_grads([empty, full], seed)
        _set_grads([ref], seed)
        opt.step()
        ref_opt.step()
    assert empty.shape == (0,)
    torch.testing.assert_close(full.detach(), ref.detach())
    assert opt.global_step == 2


def test_parameter_in_two_groups_raises_value_error() -> None:
    p, q = _params([1.0], [2.0])
    with pytest.raises(ValueError):
        gradstep.Adam([{"params": [p, q]}, {"params": [p]}], lr=0.1)


# --- 8. opt_args: per-parameter overrides -----------------------------------------------------------------------------
OPT_ARGS_MAKERS = {
    "sgd_momentum_coupled": lambda ps, **kw: gradstep.SGD(ps, momentum=0.9, **kw),
    "adam_coupled": lambda ps, **kw: gradstep.Adam(ps, **kw),
    "adamw_decoupled": lambda ps, **kw: gradstep.AdamW(ps, **kw),
}


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: int = 3) -> None:
    for seed in range(steps):
        _set_grads(params, seed)
        opt.step()


@pytest.mark.parametrize("maker", list(OPT_ARGS_MAKERS))
def test_opt_args_match_separate_groups(maker: str) -> None:
    make = OPT_ARGS_MAKERS[maker]
    override = {"lr": 0.05, "lr_scale": 0.5, "weight_decay": 0.2}
    init = ([1.0, -2.0, 0.5], [0.3, 0.7])

    pa, pb = _params(*init)
    pa.opt_args = dict(override)
    _run(make([pa, pb], lr=0.1, weight_decay=0.01), [pa, pb])

    qa, qb = _params(*init)
    _run(make([{"params": [qa], **override}, {"params": [qb]}], lr=0.1, weight_decay=0.01), [qa, qb])

    # Without the override the result differs, so the comparison above is not vacuous.
    ra, rb = _params(*init)
    _run(make([ra, rb], lr=0.1, weight_decay=0.01), [ra, rb])

    torch.testing.assert_close(pa.detach(), qa.detach())
    torch.testing.assert_close(pb.detach(), qb.detach())
    torch.testing.assert_close(pb.detach(), rb.detach())
    assert not torch.allclose(pa.detach(), ra.detach())


def test_opt_args_none_values_mean_group_value() -> None:
    init = ([1.0, -2.0, 0.5], [0.3, 0.7])
    pa, pb = _params(*init)
    pa.opt_args = {"lr": None, "lr_scale": None, "weight_decay": None}
    _run(gradstep.AdamW([pa, pb], lr=0.1, weight_decay=0.1), [pa, pb])
    qa, qb = _params(*init)
    _run(gradstep.AdamW([qa, qb], lr=0.1, weight_decay=0.1), [qa, qb])
    assert torch.equal(pa.detach(), qa.detach())
    assert torch.equal(pb.detach(), qb.detach())


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_opt_args_zero_weight_decay_disables_decay_for_that_param(mode: str) -> None:
    lr, wd = 0.1, 0.5
    a, b = _params([1.0, -2.0], [1.0, -2.0])
    a.opt_args = {"weight_decay": 0}
    opt = gradstep.SGD([a, b], lr=lr, weight_decay=wd, weight_decay_mode=mode)
    a.grad, b.grad = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    opt.step()
    p0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(a.detach(), p0)
    expected = p0 / (1 + lr * wd) if mode == "proximal" else p0 * (1 - lr * wd)
    torch.testing.assert_close(b.detach(), expected)


@pytest.mark.parametrize("key", ["lr", "lr_scale", "weight_decay"])
def test_invalid_opt_args_raise_at_construction(key: str) -> None:
    (p,) = _params([1.0])
    p.opt_args = {key: -1.0}
    with pytest.raises(ValueError, match=key):
        gradstep.Adam([p], lr=0.1)


# --- 9. group tools ---------------------------------------------------------------------------------------------------
def _groups(n: int) -> list[dict[str, Any]]:
    return [{"params": [nn.Parameter(torch.ones(2))]} for _ in range(n)]


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def test_lr_slice_spreads_like_fastai() -> None:
    # fastai's documented check values (spec F.1.1).
    assert _lrs(gradstep.Adam(_groups(3), lr=slice(1e-4, 1e-2))) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert _lrs(gradstep.Adam(_groups(3), lr=slice(1e-2))) == pytest.approx([1e-3, 1e-3, 1e-2])
    assert _lrs(gradstep.Adam(_groups(4), lr=slice(1e-3, 1e-1))) == pytest.approx(
        [1e-3, 4.64e-3, 2.154e-2, 1e-1], rel=1e-3
    )


def test_lr_list_gives_one_per_group_and_wrong_length_raises() -> None:
    assert _lrs(gradstep.SGD(_groups(3), lr=[0.1, 0.2, 0.3])) == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        gradstep.SGD(_groups(3), lr=[0.1, 0.2])


def test_set_hyper_spreads_slices_and_validates() -> None:
    opt = gradstep.SGD(_groups(3), lr=0.1, momentum=0.9)
    opt.set_hyper("lr", slice(1e-4, 1e-2))
    assert _lrs(opt) == pytest.approx([1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError, match="lr"):
        opt.set_hyper("lr", -1.0)
    with pytest.raises(ValueError, match="momentum"):
        opt.set_hyper("momentum", [0.9, -0.5, 0.9])
    # A failed call writes nothing (all values are validated first).
    assert _lrs(opt) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9, 0.9]
    with pytest.raises(KeyError, match="not_a_hyper"):
        opt.set_hyper("not_a_hyper", 1.0)


@pytest.mark.parametrize("n_groups", [2, 3])
def test_set_hyper_betas_tuple_goes_to_every_group(n_groups: int) -> None:
    opt = gradstep.Adam(_groups(n_groups), lr=0.1)
    opt.set_hyper("betas", (0.8, 0.9))
    assert [tuple(g["betas"]) for g in opt.param_groups] == [(0.8, 0.9)] * n_groups


def _frozen_model() -> tuple[nn.Sequential, gradstep.SGD]:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2))
    gradstep.mark_norm_params(model)
    return model, gradstep.SGD([{"params": list(m.parameters())} for m in model], lr=0.1)


def test_freeze_unfreeze_by_group_keeps_norm_params_trainable() -> None:
    model, opt = _frozen_model()
    trainable = lambda m: [p.requires_grad for p in m.parameters()]  # noqa: E731

    opt.freeze()
    assert trainable(model[0]) == [False, False]
    assert trainable(model[1]) == [True, True]  # force_train (norm layer), train_bn=True
    assert trainable(model[2]) == [False, False]
    assert trainable(model[3]) == [True, True]

    opt.freeze(train_bn=False)
    assert trainable(model[1]) == [False, False]
    assert trainable(model[3]) == [True, True]

    opt.freeze_to(2)
    assert trainable(model[0]) == [False, False]
    assert trainable(model[1]) == [True, True]
    assert trainable(model[2]) == [True, True]

    opt.freeze_to(-1, train_bn=False)
    assert [trainable(m) for m in model] == [[False, False]] * 3 + [[True, True]]

    opt.unfreeze()
    assert all(p.requires_grad for p in model.parameters())

    with pytest.warns(UserWarning, match="frozen"):
        opt.freeze_to(4)
    with pytest.raises(ValueError):
        gradstep.SGD([nn.Parameter(torch.ones(2))], lr=0.1).freeze()


def test_clear_state_empties_state() -> None:
    opt, p = _adam_after(2)
    opt.clear_state()
    assert len(opt.state) == 0
    assert opt.global_step == 0
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["step"].item() == 1


# --- 10. param_groups(model) ------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.fc = nn.Linear(4, 4)


def _layered_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(stem=nn.Linear(3, 4), norm=nn.LayerNorm(4), block=_Block(), head=nn.Linear(4, 2))
    ).double()


def test_param_groups_decay_and_layer_scales() -> None:
    model = _layered_model()
    groups = gradstep.param_groups(model, weight_decay=0.1, no_decay=["*.pos_embed"], layer_decay=0.5)
    by_name = {name: (g["weight_decay"], g["lr_scale"]) for g in groups for name, _ in g["params"]}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    layer_scale = {"stem": 0.5**3, "norm": 0.5**2, "block": 0.5**1, "head": 0.5**0}  # 0.5 ** (L-1-i), L = 4
    decayed = {"stem.weight", "block.fc.weight", "head.weight"}
    for name, (wd, scale) in by_name.items():
        assert wd == (0.1 if name in decayed else 0.0), name
        assert scale == pytest.approx(layer_scale[name.split(".")[0]]), name
    for name, p in model.named_parameters():
        force = (getattr(p, "opt_args", None) or {}).get("force_train", False)
        assert force == name.startswith("norm."), name


def test_param_groups_work_in_an_optimizer() -> None:
    model = _layered_model()
    groups = gradstep.param_groups(model, weight_decay=0.1, layer_decay=0.5)
    opt = gradstep.SGD(groups, lr=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [[n for n, _ in g["params"]] for g in groups]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    params = dict(model.named_parameters())
    # Coupled decay: p - lr * scale * (g + wd * p), with the group's scale and decay.
    torch.testing.assert_close(params["stem.bias"].detach(), before["stem.bias"] - 0.1 * 0.125)
    torch.testing.assert_close(
        params["head.weight"].detach(), before["head.weight"] - 0.1 * (1.0 + 0.1 * before["head.weight"])
    )
    torch.testing.assert_close(params["norm.weight"].detach(), before["norm.weight"] - 0.1 * 0.25)

    # The names reach the non-finite error.
    params["block.fc.weight"].grad[0, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"block\.fc\.weight"):
        opt.step()


# --- 11. registry -----------------------------------------------------------------------------------------------------
def _one_param() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


def test_registry_create_available_get() -> None:
    names = gradstep.available()
    assert {"adam", "adamw", "sgd"} <= set(names)
    assert names == sorted(names)
    assert gradstep.get("AdamW").cls is gradstep.AdamW
    opt = gradstep.create("adam", _one_param(), lr=0.02)
    assert type(opt) is gradstep.Adam and opt.defaults["lr"] == 0.02


@pytest.mark.parametrize("spec", ["adamw(lr=3e-4, weight_decay=0.1)", "adamw:lr=3e-4,weight_decay=0.1"])
def test_from_config_string_forms(spec: str) -> None:
    opt = gradstep.from_config(spec, _one_param())
    assert type(opt) is gradstep.AdamW
    assert opt.defaults["lr"] == 3e-4
    assert opt.defaults["weight_decay"] == 0.1
    assert opt.defaults["weight_decay_mode"] == "decoupled"


def test_from_config_dict() -> None:
    opt = gradstep.from_config({"name": "sgd", "lr": 0.1}, _one_param())
    assert type(opt) is gradstep.SGD and opt.defaults["lr"] == 0.1


def test_registry_errors_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="adamw") as info:
        gradstep.create("no_such_optimizer", _one_param())
    assert "sgd" in str(info.value)
    with pytest.raises(TypeError, match="betas") as info:
        gradstep.create("adam", _one_param(), beta1=0.9)
    assert "beta1" in str(info.value)
    for bad in ("adamw(lr=", "adamw(lr=some_name)", "adamw(1e-3)", "adamw(**kw)"):
        with pytest.raises(ValueError):
            gradstep.from_config(bad, _one_param())


@pytest.mark.parametrize("name", ["fastai_sgd", "fastai_adam", "fastai_rmsprop"])
def test_fastai_presets_require_lr(name: str) -> None:
    with pytest.raises(ValueError, match="lr"):
        gradstep.create(name, _one_param())
    assert gradstep.create(name, _one_param(), lr=0.01).defaults["lr"] == 0.01


# --- 12. core step options against hand-computed float64 values -------------------------------------------------------
def test_clip_step_clamps_each_element_of_the_step_including_decoupled_decay() -> None:
    lr, wd, clip = 0.1, 0.1, 0.05
    (p,) = _params([1.0, 1.0, 1.0])
    opt = gradstep.SGD([p], lr=lr, clip_step=clip, weight_decay=wd, weight_decay_mode="decoupled")
    p.grad = torch.tensor([0.1, 1.0, -3.0], dtype=torch.float64)
    opt.step()
    # delta = lr*g + lr*wd*p = [0.02, 0.11, -0.29] -> clamped to [0.02, 0.05, -0.05].
    torch.testing.assert_close(p.detach(), torch.tensor([0.98, 0.95, 1.05], dtype=torch.float64))


def test_backoff_steps_update_state_but_not_parameters() -> None:
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    g = torch.tensor([0.5, -2.0], dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = gradstep.Adam([p], lr=lr, betas=(b1, b2), eps=eps, backoff_steps=2)
    for t in (1, 2):
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.detach(), p0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - b1**t) * g)
    p.grad = g.clone()
    opt.step()
    m, v = (1 - b1**3) * g, (1 - b2**3) * g**2
    expected = p0 - lr * (m / (1 - b1**3)) / (torch.sqrt(v / (1 - b2**3)) + eps)
    torch.testing.assert_close(p.detach(), expected)
    assert opt.global_step == 3


# "error" writes the step in place; "revert" goes through the general write (explicit delta, then a copy).
@pytest.mark.parametrize("nonfinite", ["error", "revert"])
@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_weight_decay_modes_one_sgd_step(mode: str, nonfinite: str) -> None:
    lr, wd = 0.1, 0.3
    p0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([0.5, 0.25], dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = gradstep.SGD([p], lr=lr, weight_decay=wd, weight_decay_mode=mode, nonfinite=nonfinite)
    p.grad = g.clone()
    opt.step()
    expected = {
        "coupled": p0 - lr * (g + wd * p0),
        "decoupled": p0 * (1 - lr * wd) - lr * g,
        "proximal": (p0 - lr * g) / (1 + lr * wd),
    }[mode]
    torch.testing.assert_close(p.detach(), expected)


def test_global_step_counts_steps() -> None:
    (p,) = _params([1.0])
    opt = gradstep.SGD([p], lr=0.1)
    assert opt.global_step == 0
    opt.step()  # no gradient: nothing to update, still a step
    for _ in range(4):
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    assert opt.global_step == 5
    assert opt.state[p]["step"].item() == 4


# --- 13. init_state ---------------------------------------------------------------------------------------------------
INIT_MAKERS = {
    "adam_amsgrad": lambda ps: gradstep.Adam(ps, lr=0.1, amsgrad=True),
    "sgd_momentum": lambda ps: gradstep.SGD(ps, lr=0.1, momentum=0.9),
    "rmsprop_centered_momentum": lambda ps: gradstep.RMSprop(ps, lr=0.1, centered=True, momentum=0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maker", list(INIT_MAKERS))
def test_init_state_creates_what_one_step_creates(maker: str, dtype: torch.dtype) -> None:
    make = INIT_MAKERS[maker]
    init = [torch.randn(3, 2).to(dtype), torch.randn(4).to(dtype)]
    lazy = [nn.Parameter(x.clone()) for x in init]
    eager = [nn.Parameter(x.clone()) for x in init]
    lazy_opt, eager_opt = make(lazy), make(eager)
    eager_opt.init_state()
    for p, x in zip(eager, init):
        assert torch.equal(p.detach(), x)
    _set_grads(lazy, 0)
    lazy_opt.step()
    for p, q in zip(lazy, eager):
        stepped, created = lazy_opt.state[p], eager_opt.state[q]
        assert set(stepped) == set(created)
        for k in stepped:
            assert created[k].shape == stepped[k].shape, k
            assert created[k].dtype == stepped[k].dtype, k
    # A step after init_state gives the same result as a plain first step.
    _set_grads(eager, 0)
    eager_opt.step()
    for p, q in zip(lazy, eager):
        assert torch.equal(p.detach(), q.detach())


# --- 14. torch.compile ------------------------------------------------------------------------------------------------
COMPILE_MAKERS = {
    "adam": lambda ps: gradstep.Adam(ps, lr=0.1, nonfinite="ignore"),
    "sgd_momentum": lambda ps: gradstep.SGD(ps, lr=0.1, momentum=0.9, nonfinite="ignore"),
}


def _compiled_and_eager(maker: str, steps: int = 3) -> tuple[Any, Any, list[nn.Parameter], list[nn.Parameter]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    init = [torch.randn(3, 2), torch.randn(4)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(steps)]
    eager = [nn.Parameter(x.clone()) for x in init]
    compiled = [nn.Parameter(x.clone()) for x in init]
    eager_opt, compiled_opt = COMPILE_MAKERS[maker](eager), COMPILE_MAKERS[maker](compiled)
    step = torch.compile(compiled_opt.step, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo warns that the profiler's record_function is ignored
        for gs in grads:
            for p, q, g in zip(eager, compiled, gs):
                p.grad, q.grad = g.clone(), g.clone()
            eager_opt.step()
            step()
    return eager_opt, compiled_opt, eager, compiled


@pytest.mark.parametrize("maker", list(COMPILE_MAKERS))
def test_compiled_step_fullgraph_matches_eager(maker: str) -> None:
    eager_opt, compiled_opt, eager, compiled = _compiled_and_eager(maker)
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q.detach(), p.detach())
        for k, v in eager_opt.state[p].items():
            torch.testing.assert_close(compiled_opt.state[q][k], v)


def test_compiled_step_counts_global_step() -> None:
    eager_opt, compiled_opt, _, _ = _compiled_and_eager("sgd_momentum")
    assert eager_opt.global_step == 3
    assert compiled_opt.global_step == 3


# --- 15. complex parameters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_on_complex_parameter_matches_torch(amsgrad: bool) -> None:
    torch.manual_seed(0)
    init = torch.randn(5, dtype=torch.complex128)
    p = nn.Parameter(init.clone())
    ref = nn.Parameter(init.clone())
    opt = gradstep.Adam([p], lr=0.05, weight_decay=0.01, amsgrad=amsgrad)
    torch_opt = torch.optim.Adam([ref], lr=0.05, weight_decay=0.01, amsgrad=amsgrad)
    for _ in range(10):
        g = torch.randn(5, dtype=torch.complex128)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    assert p.dtype == torch.complex128
    torch.testing.assert_close(p.detach(), ref.detach())


# --- 16. the composable API -------------------------------------------------------------------------------------------
def test_chain_sign_momentum_matches_hand_written_signsgd_with_momentum() -> None:
    lr, mu = 0.1, 0.9
    torch.manual_seed(0)
    p0 = torch.randn(6, dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = gradstep.chain([p], ScaleBySign(), Momentum(), lr=lr, momentum=mu)
    ref, buf = p0.clone(), torch.zeros(6, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(6, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        buf = mu * buf + torch.sign(g)
        ref = ref - lr * buf
    torch.testing.assert_close(p.detach(), ref)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)


class _ScaleByEma(Transform):
    """A user transform: the direction is an exponential moving average of the incoming one."""

    elementwise = True
    hypers = (Hyper("ema_decay", 0.5, unit_interval, "weight of the old average"),)

    def buffers(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"ema": zeros}

    def update(self, ctx: GroupStep, updates: list[torch.Tensor]) -> list[torch.Tensor]:
        ema = ctx.buffer("ema")
        ctx.ops.lerp_(ema, updates, 1 - ctx.hyper("ema_decay"))
        return ema


def test_user_defined_transform_with_hyper_and_buffer() -> None:
    lr, decay = 0.1, 0.75
    p0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = gradstep.chain([p], _ScaleByEma(), lr=lr, ema_decay=decay)
    assert opt.defaults["ema_decay"] == decay
    assert gradstep.chain([nn.Parameter(p0.clone())], _ScaleByEma()).defaults["ema_decay"] == 0.5
    ema, ref = torch.zeros(2, dtype=torch.float64), p0.clone()
    for g in ([1.0, 2.0], [-1.0, 0.5]):
        grad = torch.tensor(g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        ema = decay * ema + (1 - decay) * grad
        ref = ref - lr * ema
    assert set(opt.state[p]) == {"step", "ema"}
    torch.testing.assert_close(opt.state[p]["ema"], ema)
    torch.testing.assert_close(p.detach(), ref)

    # The buffer is part of the checkpoint format of this chain.
    q = nn.Parameter(p.detach().clone())
    other = gradstep.chain([q], _ScaleByEma(), lr=lr, ema_decay=decay)
    other.load_state_dict(opt.state_dict())
    torch.testing.assert_close(other.state[q]["ema"], ema)

    with pytest.raises(ValueError, match="ema_decay"):
        gradstep.chain([nn.Parameter(p0.clone())], _ScaleByEma(), ema_decay=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        opt.set_hyper("ema_decay", -0.1)
    with pytest.raises(TypeError, match="ema_decay"):
        gradstep.chain([nn.Parameter(p0.clone())], _ScaleByEma(), ema_dacay=0.5)

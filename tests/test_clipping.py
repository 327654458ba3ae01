"""Gradient clipping: ALF's rule (spec A.4.3) as a pre-step utility/hook and as chain transforms.

ALF is not installable, so its rule is transcribed below as a literal float64 loop (:func:`alf_clip_`): ``s = clip/G``,
multiply by ``s`` only if ``s < 1``, per tensor or over all gradients. gradstep's :func:`clip_gradients`,
:class:`GradientClipping` and the transforms ``ClipByGlobalNorm`` / ``ClipByNorm`` / ``ClipByValue`` are held to it,
including the edge cases the spec names (G = 0: no-op; NaN norm: no clipping; infinite norm: everything zeroed), and
to ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` (bitwise, with torch's ``eps=1e-6``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import gradstep
from gradstep.tools.clipping import GradientClipping, clip_gradients, clip_scale
from gradstep.transforms import ClipByGlobalNorm, ClipByNorm, ClipByValue, Momentum

NAN = float("nan")
INF = float("inf")
SHAPES = ((), (5,), (3, 4), (2, 3, 2))


# --- ALF, literally (spec A.4.3, step 4) ------------------------------------------------------------------------------
def alf_norm(t: Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in t.reshape(-1).tolist()))


def alf_clip_(grads: list[Tensor], clip: float, by_global: bool) -> float:
    """In place on float64 tensors; returns the global norm before clipping."""
    assert clip > 0
    total = math.sqrt(sum(alf_norm(g) ** 2 for g in grads))
    if by_global:
        s = clip / total if total != 0 else INF
        if s < 1:  # NaN < 1 is False: no clipping
            for g in grads:
                g.mul_(s)
    else:
        for g in grads:
            n = alf_norm(g)
            s = clip / n if n != 0 else INF
            if s < 1:
                g.mul_(s)
    return total


def make_params(seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        p.grad = scale * torch.randn(shape, generator=gen, dtype=dtype)
        params.append(p)
    return params


def grads_of(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.clone() for p in params]


# --- clip_gradients against ALF's rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["global", "tensor"])
@pytest.mark.parametrize("limit", [0.3, 2.0, 50.0])  # clips all / some tensors / nothing
def test_clip_gradients_matches_alf_reference(by: str, limit: float) -> None:
    params = make_params(scale=1.5)
    expected = grads_of(params)
    expected_norm = alf_clip_(expected, limit, by_global=by == "global")
    norm = clip_gradients(params, limit, by=by)
    assert norm.item() == pytest.approx(expected_norm, rel=1e-12)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-13, atol=0)
    if by == "global" and limit < expected_norm:
        assert math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params)) == pytest.approx(limit, rel=1e-12)


def test_per_tensor_clipping_only_touches_tensors_over_the_limit() -> None:
    params = make_params(scale=1.5)
    before = grads_of(params)
    limit = float(torch.stack([g.norm() for g in before]).median())
    clip_gradients(params, limit, by="tensor")
    for p, g in zip(params, before):
        if g.norm() <= limit:
            assert torch.equal(p.grad, g)
        else:
            assert p.grad.norm().item() == pytest.approx(limit, rel=1e-12)
            torch.testing.assert_close(p.grad / p.grad.norm(), g / g.norm(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("by", ["global", "tensor"])
def test_zero_gradient_is_left_alone_without_nan(by: str) -> None:
    params = make_params()
    for p in params:
        p.grad.zero_()
    norm = clip_gradients(params, 1.0, by=by)
    assert norm.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_nan_gradient_disables_global_clipping() -> None:
    # ALF: G is NaN, s = clip/NaN is NaN, "s < 1" is False: nothing is scaled, so the NaN does not spread.
    params = make_params(scale=10.0)
    params[1].grad[2] = NAN
    expected = grads_of(params)
    alf_clip_(expected, 0.1, by_global=True)
    norm = clip_gradients(params, 0.1)
    assert math.isnan(norm.item())
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(params[0].grad).all() and params[0].grad.norm() > 0.1  # unclipped


def test_nan_gradient_only_disables_its_own_tensor_clipping() -> None:
    params = make_params(scale=10.0)
    params[1].grad[2] = NAN
    expected = grads_of(params)
    alf_clip_(expected, 0.1, by_global=False)
    clip_gradients(params, 0.1, by="tensor")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, equal_nan=True, rtol=1e-13, atol=0)
    assert params[2].grad.norm().item() == pytest.approx(0.1, rel=1e-12)


def test_infinite_gradient_zeroes_everything_as_alf_and_torch_do() -> None:
    params = make_params()
    params[2].grad[0, 0] = INF
    expected = grads_of(params)
    alf_clip_(expected, 1.0, by_global=True)
    clip_gradients(params, 1.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, equal_nan=True, rtol=0, atol=0)
    assert math.isnan(params[2].grad[0, 0].item()) and params[0].grad.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("limit", [0.5, 100.0])
def test_global_clipping_with_torch_eps_is_bitwise_clip_grad_norm(dtype: torch.dtype, limit: float) -> None:
    ours, theirs = make_params(3, 2.0, dtype), make_params(3, 2.0, dtype)
    norm = clip_gradients(ours, limit, eps=1e-6)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, limit)
    assert torch.equal(norm, torch_norm)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


def test_alf_rule_and_torch_differ_only_by_torch_eps() -> None:
    ours, theirs = make_params(4, 2.0), make_params(4, 2.0)
    clip_gradients(ours, 0.5)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=0)
        assert not torch.equal(a.grad, b.grad)  # torch divides by G + 1e-6


@pytest.mark.parametrize("limit", [0.2, 1.0])
def test_value_clipping_is_bitwise_clip_grad_value(limit: float) -> None:
    ours, theirs = make_params(5, 2.0), make_params(5, 2.0)
    ours[1].grad[0] = NAN
    theirs[1].grad[0] = NAN
    norm = clip_gradients(ours, limit, by="value")
    torch.nn.utils.clip_grad_value_(theirs, limit)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    assert max(float(p.grad[~p.grad.isnan()].abs().max()) for p in ours if p.grad.numel() > 1) == limit
    assert math.isnan(norm.item())  # the pre-clip norm of gradients holding a NaN


def test_clip_gradients_takes_an_optimizer_groups_and_skips_missing_and_repeated_tensors() -> None:
    params = make_params(6, 3.0)
    params[0].grad = None
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1)
    reference = make_params(6, 3.0)[1:]
    expected = [p.grad.clone() for p in reference]
    expected_norm = alf_clip_(expected, 1.0, by_global=True)
    assert clip_gradients(opt, 1.0).item() == pytest.approx(expected_norm, rel=1e-12)
    assert params[0].grad is None
    for p, e in zip(params[1:], expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-13, atol=0)
    # The same tensor twice (or in two dict groups) is clipped once.
    twice = make_params(6, 3.0)
    clip_gradients([twice[1], twice[1], {"params": [twice[1]]}], 0.1, by="tensor")
    assert twice[1].grad.norm().item() == pytest.approx(0.1, rel=1e-12)


def test_clip_gradients_without_gradients_returns_zero() -> None:
    p = nn.Parameter(torch.ones(3))
    assert clip_gradients([p], 1.0).item() == 0.0 and p.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": NAN}, "max_norm"),
        ({"max_norm": 1.0, "by": "row"}, "by"),
        ({"max_norm": 1.0, "eps": -1e-6}, "eps"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict, match: str) -> None:
    params = make_params()
    before = grads_of(params)
    with pytest.raises(ValueError, match=match):
        clip_gradients(params, **kwargs)
    with pytest.raises(ValueError, match=match):
        GradientClipping(torch.optim.SGD(params, lr=0.1), **kwargs)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_clip_scale_rule() -> None:
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0, NAN, INF], dtype=torch.float64)
    assert clip_scale(norms, 1.0).tolist() == [1.0, 1.0, 1.0, 0.25, 1.0, 0.0]
    assert clip_scale(norms, 1.0, eps=1.0)[3].item() == pytest.approx(0.2)


# --- GradientClipping: ALF's wrapper option on any optimizer ----------------------------------------------------------
def _sgd_reference(params: list[nn.Parameter], grads: list[Tensor], lr: float) -> list[Tensor]:
    return [p.detach() - lr * g for p, g in zip(params, grads)]


@pytest.mark.parametrize("make_opt", [torch.optim.SGD, gradstep.SGD], ids=["torch", "gradstep"])
@pytest.mark.parametrize("by", ["global", "tensor", "value"])
def test_gradient_clipping_hook_clips_before_every_step(make_opt, by: str) -> None:
    params = make_params(7)
    opt = make_opt(params, lr=0.1)
    clipping = GradientClipping(opt, 0.4, by=by)
    for t in range(3):
        gen = torch.Generator().manual_seed(100 + t)
        raw = [2.0 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for p, g in zip(params, raw):
            p.grad = g.clone()
        expected_grads = [g.clone() for g in raw]
        if by == "value":
            expected_grads = [g.clamp(-0.4, 0.4) for g in expected_grads]
            expected_norm = math.sqrt(sum(alf_norm(g) ** 2 for g in raw))
        else:
            expected_norm = alf_clip_(expected_grads, 0.4, by_global=by == "global")
        expected = _sgd_reference(params, expected_grads, 0.1)
        opt.step()
        for p, e, g in zip(params, expected, expected_grads):
            torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=0)  # ALF: clipped in place
        assert clipping.last_norm.item() == pytest.approx(expected_norm, rel=1e-12)
    clipping.remove()
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):  # no clipping any more
        torch.testing.assert_close(p.detach(), b - 0.3, rtol=0, atol=1e-15)


@pytest.mark.parametrize("positional", [True, False])
def test_gradient_clipping_clips_the_gradients_the_closure_computes(positional: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e3)  # stale gradients: must not be what is clipped and used
    reference = nn.Linear(4, 2).double()
    reference.load_state_dict(model.state_dict())
    ref_loss = (reference(x) ** 2).sum()
    ref_grads = list(torch.autograd.grad(ref_loss, list(reference.parameters())))
    alf_clip_(ref_grads, 0.5, by_global=True)
    expected = _sgd_reference(list(reference.parameters()), ref_grads, 0.1)

    opt = torch.optim.SGD(params, lr=0.1)
    GradientClipping(opt, 0.5)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (model(x) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure) if positional else opt.step(closure=closure)
    assert loss.item() == pytest.approx(ref_loss.item())
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15)


def test_gradient_clipping_from_alf_defaults_to_per_tensor() -> None:
    params = make_params(8, 3.0)
    clipping = GradientClipping.from_alf(torch.optim.SGD(params, lr=0.0), gradient_clipping=0.5)
    assert clipping.by == "tensor"
    clipping.clip()
    assert all(p.grad.norm().item() <= 0.5 * (1 + 1e-12) for p in params)
    assert GradientClipping.from_alf(torch.optim.SGD(params, lr=0.0), 0.5, clip_by_global_norm=True).by == "global"


def test_gradient_clipping_keeps_state_dict_and_scheduler_of_the_optimizer() -> None:
    params = make_params(9)
    opt = gradstep.Adam(params, lr=0.1)
    GradientClipping(opt, 0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    clone = gradstep.Adam(make_params(9), lr=0.1)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(clone.state[clone.param_groups[0]["params"][1]]["exp_avg"], opt.state[params[1]]["exp_avg"])


# --- the transforms, inside a chain ----------------------------------------------------------------------------------
def _chain_step(transform, foreach: bool, **hypers) -> tuple[list[nn.Parameter], list[Tensor]]:
    params = make_params(10, 2.0)
    raw = grads_of(params)
    opt = gradstep.chain(params, transform, lr=0.1, foreach=foreach, **hypers)
    opt.step()
    return params, raw


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("limit", [0.5, 100.0])
def test_clip_by_global_norm_transform_matches_alf_and_reports_pre_clip_norm(foreach: bool, limit: float) -> None:
    init = [p.detach().clone() for p in make_params(10, 2.0)]
    transform = ClipByGlobalNorm()
    params, raw = _chain_step(transform, foreach, max_global_norm=limit)
    expected = [g.clone() for g in raw]
    expected_norm = alf_clip_(expected, limit, by_global=True)
    for p, p0, e, g in zip(params, init, expected, raw):
        assert torch.equal(p.grad, g)  # the transform never writes p.grad
        torch.testing.assert_close(p.detach(), p0 - 0.1 * e, rtol=1e-13, atol=1e-15)
    assert transform.last_norm.item() == pytest.approx(expected_norm, rel=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_clip_by_norm_transform_matches_alf_per_tensor_rule(foreach: bool) -> None:
    init = [p.detach().clone() for p in make_params(10, 2.0)]
    params, raw = _chain_step(ClipByNorm(), foreach, max_tensor_norm=6.0)
    expected = [g.clone() for g in raw]
    alf_clip_(expected, 6.0, by_global=False)
    for p, p0, e in zip(params, init, expected):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * e, rtol=1e-13, atol=1e-15)
    assert any(g.norm() > 6.0 for g in raw) and any(g.norm() <= 6.0 for g in raw)


@pytest.mark.parametrize("foreach", [True, False])
def test_clip_by_value_transform_matches_clip_grad_value(foreach: bool) -> None:
    init = [p.detach().clone() for p in make_params(10, 2.0)]
    params, raw = _chain_step(ClipByValue(), foreach, clip_value=0.7)
    reference = make_params(10, 2.0)
    torch.nn.utils.clip_grad_value_(reference, 0.7)
    for p, p0, r in zip(params, init, reference):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * r.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("transform", [ClipByGlobalNorm, ClipByNorm, ClipByValue])
def test_clipping_transforms_are_off_at_zero(transform) -> None:
    init = [p.detach().clone() for p in make_params(10, 2.0)]
    params, raw = _chain_step(transform(), True)
    for p, p0, g in zip(params, init, raw):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=0, atol=1e-15)


def test_global_norm_transform_leaves_zero_and_nan_directions_unscaled() -> None:
    params = make_params(11, 5.0)
    params[3].grad[0, 0, 0] = NAN
    raw = grads_of(params)
    init = [p.detach().clone() for p in params]
    gradstep.chain(params, ClipByGlobalNorm(), lr=0.1, max_global_norm=0.1, nonfinite="ignore").step()
    for p, p0, g in zip(params[:3], init, raw):  # finite tensors took the full, unclipped step
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=0, atol=1e-15)
    zeros = make_params(12)
    for p in zeros:
        p.grad.zero_()
    init = [p.detach().clone() for p in zeros]
    transform = ClipByGlobalNorm()
    gradstep.chain(zeros, transform, lr=0.1, max_global_norm=0.1).step()
    assert transform.last_norm.item() == 0.0
    assert all(torch.equal(p.detach(), p0) for p, p0 in zip(zeros, init))


def test_transform_clips_each_group_by_its_own_norm_while_the_hook_clips_across_groups() -> None:
    def run(use_hook: bool) -> list[Tensor]:
        params = make_params(13, 2.0)
        groups = [{"params": params[:2]}, {"params": params[2:]}]
        if use_hook:
            opt = gradstep.chain(groups, Momentum(), lr=0.1)
            GradientClipping(opt, 0.5)
        else:
            opt = gradstep.chain(groups, ClipByGlobalNorm(), lr=0.1, max_global_norm=0.5)
        opt.step()
        return [p.detach() for p in params]

    params = make_params(13, 2.0)
    per_group = [grads_of(params)[:2], grads_of(params)[2:]]
    for grads in per_group:
        alf_clip_(grads, 0.5, by_global=True)
    across = grads_of(params)
    alf_clip_(across, 0.5, by_global=True)
    for got, p, e in zip(run(False), params, per_group[0] + per_group[1]):
        torch.testing.assert_close(got, p.detach() - 0.1 * e, rtol=1e-13, atol=1e-15)
    for got, p, e in zip(run(True), params, across):
        torch.testing.assert_close(got, p.detach() - 0.1 * e, rtol=1e-13, atol=1e-15)


def test_transform_first_in_chain_equals_the_hook_without_weight_decay_and_differs_with_it() -> None:
    def run(use_hook: bool, wd: float) -> list[Tensor]:
        params = make_params(14, 2.0)
        if use_hook:
            opt = gradstep.chain(params, Momentum(), lr=0.1, momentum=0.9, weight_decay=wd)
            GradientClipping(opt, 0.5)
        else:
            opt = gradstep.chain(
                params, ClipByGlobalNorm(), Momentum(), lr=0.1, momentum=0.9, weight_decay=wd, max_global_norm=0.5
            )
        opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(True, 0.0), run(False, 0.0)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    # Coupled decay enters before the chain: the transform clips g + wd*p, ALF's wrapper clips g only.
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(run(True, 0.5), run(False, 0.5)))


def test_clipping_hypers_have_distinct_names() -> None:
    names = [h.name for t in (ClipByValue, ClipByNorm, ClipByGlobalNorm) for h in t.hypers]
    assert names == ["clip_value", "max_tensor_norm", "max_global_norm"]
    with pytest.raises(ValueError, match="max_global_norm"):
        gradstep.chain(make_params(), ClipByGlobalNorm(), max_global_norm=-1.0)


def test_gradient_clipping_under_grad_scaler_clips_the_unscaled_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reference = nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)
    grads = list(torch.autograd.grad((reference(x) ** 2).sum(), list(reference.parameters())))
    expected_norm = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipping = GradientClipping(opt, 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((model(x) ** 2).sum()).backward()
    scaler.step(opt)
    assert clipping.last_norm.item() == pytest.approx(expected_norm, rel=1e-5)  # not 1024 times it
    for p, q, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * g * (0.5 / expected_norm), rtol=1e-5, atol=1e-6)

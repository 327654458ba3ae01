"""Lookahead, Scout and ranger (``gradstep.wrappers``) against holocron, fastai and pytorch_optimizer, and the
wrapper contract: checkpoints, schedulers, closures and GradScaler through the wrapper.

Parity runs (``parity.py``): 200 float64 steps, a scalar, a vector, a 4-D and a 2-D tensor dealt into two groups with
different learning rates, non-default wrapper settings, a fresh gradient ``sin(3p + t + i) + 0.3p`` from each side's
own parameters, and the largest relative difference of every parameter over the run.

* holocron's ``Lookahead`` and ``Scout`` (slow copy at construction; closures passed through) run where they work:
  their ``state_dict`` raises on torch 2 (spec H.9), and Scout's rate turns NaN, freezing the model, as soon as an
  element's updates are all equal (spec H.10). gradstep does not reproduce that freeze: Scout is compared with
  holocron where no update repeats, and with a float64 reference of the documented math (with such elements left
  out) everywhere else.
* fastai's ``Lookahead`` (slow copy at the first step; no closure) and ``ranger``.
* pytorch_optimizer's ``Lookahead`` for the ``pullback_momentum`` options.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import fastai.optimizer as fastai_optim
import pytest
import torch
from pytorch_optimizer import Lookahead as PtoLookahead
from torch import Tensor

import gradstep
from gradstep.core.registry import get
from gradstep.wrappers import Lookahead, Scout, ranger
from originals import holocron_optim
from parity import fastai_set_hypers, gradient, run_side_by_side, run_side_by_side_fastai, torch_groups

TOL = 1e-12
LRS = ({"lr": 0.05}, {"lr": 0.02})


def holocron() -> Any:
    return holocron_optim()


def torch_sgd(groups: list[list[Tensor]], **hypers: Any) -> torch.optim.SGD:
    return torch.optim.SGD(torch_groups(groups, *LRS), **hypers)


# --- parity with the originals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["torch", "gradstep"])
def test_lookahead_matches_holocron(inner: str) -> None:
    def ours(groups: list[list[Tensor]]) -> Lookahead:
        opt = (
            torch_sgd(groups, momentum=0.9, weight_decay=0.01)
            if inner == "torch"
            else gradstep.SGD(torch_groups(groups, *LRS), momentum=0.9, weight_decay=0.01)
        )
        return Lookahead(opt, k=5, alpha=0.6, slow_copy="construction")

    result = run_side_by_side(
        lambda groups: holocron().Lookahead(torch_sgd(groups, momentum=0.9, weight_decay=0.01), 0.6, 5), ours
    )
    # gradstep's SGD rounds weight decay differently from torch's (~1e-12 after 200 steps without Lookahead too).
    result.assert_within(TOL if inner == "torch" else 1e-10)


def test_scout_matches_holocron_where_no_update_repeats() -> None:
    coherences: list[float | None] = []

    def ours(groups: list[list[Tensor]]) -> Scout:
        opt = Scout(torch_sgd(groups, momentum=0.9), k=4, alpha=0.2, slow_copy="construction")
        opt.register_step_post_hook(lambda o, *_: coherences.append(o.last_coherence) if o.fast_steps % 4 == 0 else 0)
        return opt

    result = run_side_by_side(lambda groups: holocron().Scout(torch_sgd(groups, momentum=0.9), 0.2, 4), ours)
    result.assert_within(TOL)
    # Both branches of max(1 - c, alpha) were taken, so the coherence itself was compared, not just alpha.
    assert len(coherences) == 50 and all(c is not None for c in coherences)
    assert any(1 - c > 0.2 for c in coherences) and any(1 - c < 0.2 for c in coherences)  # type: ignore[operator]


def test_lookahead_matches_fastai() -> None:
    def reference(groups: list[list[Tensor]]) -> Any:
        inner = fastai_optim.SGD(groups, lr=0.1, mom=0.9, wd=0.01)
        return fastai_optim.Lookahead(fastai_set_hypers(inner, lr=[0.05, 0.02]), k=5, alpha=0.4)

    def ours(groups: list[list[Tensor]]) -> Lookahead:
        inner = get("fastai_sgd")(torch_groups(groups, *LRS), lr=0.1, momentum=0.9, weight_decay=0.01)
        return Lookahead(inner, k=5, alpha=0.4)

    run_side_by_side_fastai(reference, ours).assert_within(TOL)


def test_ranger_matches_fastai() -> None:
    lrs = ({"lr": 1e-2}, {"lr": 3e-3})

    def reference(groups: list[list[Tensor]]) -> Any:
        opt = fastai_optim.ranger(groups, lr=1e-2, mom=0.9, sqr_mom=0.95, wd=0.02, eps=1e-5, k=5, alpha=0.6)
        return fastai_set_hypers(opt, lr=[1e-2, 3e-3])

    def ours(groups: list[list[Tensor]]) -> Lookahead:
        return ranger(
            torch_groups(groups, *lrs), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.02, k=5, alpha=0.6
        )

    # RAdam's momentum steps are written lr * (m / bc1) here and (lr / bc1) * m in fastai: rounding only.
    run_side_by_side_fastai(reference, ours).assert_within(TOL)


def test_ranger_defaults_are_fastais() -> None:
    (p,) = [torch.nn.Parameter(torch.zeros(3))]
    ours = ranger([p], lr=1e-3)
    theirs = fastai_optim.ranger([torch.zeros(3)], lr=1e-3)
    group = ours.param_groups[0]
    fastai_hypers = theirs.hypers[0]
    assert (ours.k, ours.alpha) == (theirs.k, theirs.alpha) == (6, 0.5)
    assert group["betas"] == (fastai_hypers["mom"], fastai_hypers["sqr_mom"])
    assert (group["eps"], group["weight_decay"], group["beta"]) == (
        fastai_hypers["eps"],
        fastai_hypers["wd"],
        fastai_hypers["beta"],
    )
    assert group["eps_mode"] == "torch" and group["weight_decay_mode"] == "decoupled"
    assert ours.slow_copy == "first_step"
    assert type(gradstep.create("ranger", [p], lr=1e-3).inner) is type(ours.inner)


@pytest.mark.parametrize("mode", ["pullback", "reset"])
def test_pullback_momentum_matches_pytorch_optimizer(mode: str) -> None:
    def ours(groups: list[list[Tensor]]) -> Lookahead:
        return Lookahead(
            torch_sgd(groups, momentum=0.9),
            k=5,
            alpha=0.4,
            slow_copy="construction",
            pullback_momentum=mode,
            momentum_keys=("momentum_buffer",),
        )

    result = run_side_by_side(
        lambda groups: PtoLookahead(torch_sgd(groups, momentum=0.9), k=5, alpha=0.4, pullback_momentum=mode), ours
    )
    # pytorch_optimizer writes the sync as lerp(fast, slow, 1 - alpha): the same number up to rounding.
    result.assert_within(TOL)


def test_slow_copy_timing_follows_holocron_at_construction_and_fastai_at_the_first_step() -> None:
    """Weights written into the model after the optimizer was built (a checkpoint being loaded): the first sync pulls
    back towards the old values with the construction-time copy, towards the new ones with the first-step copy."""

    def run(build: Callable[[list[Tensor]], Any]) -> list[Tensor]:
        params = [torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)]
        opt = build(params)
        with torch.no_grad():
            params[0].copy_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
        for t in range(1, 5):
            params[0].grad = gradient(params[0].detach(), t, 0)
            opt.step()
        return [p.detach().clone() for p in params]

    holo = run(lambda ps: holocron().Lookahead(torch.optim.SGD(ps, lr=0.1), 0.5, 4))
    construction = run(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1), 4, 0.5, slow_copy="construction"))
    fast = run(lambda ps: fastai_optim.Lookahead(fastai_optim.SGD([ps], lr=0.1), k=4, alpha=0.5))
    first_step = run(lambda ps: Lookahead(get("fastai_sgd")(ps, lr=0.1), 4, 0.5, slow_copy="first_step"))
    torch.testing.assert_close(construction[0], holo[0], rtol=0, atol=0)
    torch.testing.assert_close(first_step[0], fast[0], rtol=0, atol=0)
    assert (construction[0] - first_step[0]).abs().min() > 0.1


# --- the spec's check values ----------------------------------------------------------------------------------------


def test_holocron_check_values_constant_gradient_six_steps() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=6, alpha=0.5)  # holocron's sync_period=6, sync_rate=0.5
    for _ in range(6):
        w.grad = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.97, 1.94, 2.91], dtype=torch.float64))


def test_fastai_check_values_five_then_six_steps() -> None:
    p0, g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    w = torch.nn.Parameter(p0.clone())
    opt = Lookahead(get("fastai_sgd")([w], lr=0.1))
    for step in range(1, 7):
        w.grad = g.clone()
        opt.step()
        if step == 5:
            torch.testing.assert_close(w.detach(), p0 - 0.5 * g)
    torch.testing.assert_close(w.detach(), 0.5 * p0 + 0.5 * (p0 - 0.6 * g))


def test_scout_check_values_from_the_spec() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    opt = Scout(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    for g in ([0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.5, 0.5, 0.1]):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert opt.last_coherence == pytest.approx(0.964, abs=5e-4)
    torch.testing.assert_close(w.detach(), torch.tensor([0.955, 1.96, 2.97], dtype=torch.float64))


# --- Scout against a float64 reference of the documented math -------------------------------------------------------


class ScoutReference:
    """Spec H.10 with plain SGD inside, written the obvious way: every snapshot kept, ``torch.std`` and the largest
    deviation over the stacked updates, elements whose updates are all equal left out, ``alpha`` when none is left."""

    def __init__(self, params: Sequence[Tensor], lr: float, k: int, alpha: float) -> None:
        self.params, self.lr, self.k, self.alpha, self.t = list(params), lr, k, alpha, 0
        self.slow = [p.detach().clone() for p in self.params]
        self.history = [[p.detach().clone()] for p in self.params]
        self.coherences: list[float | None] = []

    @torch.no_grad()
    def step(self) -> None:
        for p, hist in zip(self.params, self.history):
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)
            hist.append(p.detach().clone())
        self.t += 1
        if self.t % self.k:
            return
        sims = []
        for hist in self.history:
            snapshots = torch.stack(hist)
            updates = snapshots[1:] - snapshots[:-1]
            if self.k < 2:
                continue
            dev = (updates - updates.mean(dim=0)).abs().amax(dim=0)
            kept = dev > 0
            if kept.any():
                sims.append(float((updates.std(dim=0)[kept] / dev[kept]).mean()))
        coherence = sum(sims) / len(sims) if sims else None
        self.coherences.append(coherence)
        rate = self.alpha if coherence is None else max(1 - coherence, self.alpha)
        for p, slow, hist in zip(self.params, self.slow, self.history):
            slow.add_(p - slow, alpha=rate)
            p.copy_(slow)
            hist[:] = [p.detach().clone()]


def scout_pair(
    grad_fn: Callable[[Tensor, int, int], Tensor | None],
    k: int,
    alpha: float,
    steps: int,
    shapes: Sequence[tuple[int, ...]] = ((), (7,), (2, 3, 4), (3, 4)),
    lr: float = 0.05,
) -> tuple[list[Tensor], list[Tensor], Scout, ScoutReference]:
    """Run gradstep's Scout (torch SGD inside) and the reference from the same float64 values."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.rand(s, generator=gen, dtype=torch.float64) * 3 - 1.5 for s in shapes]
    ours = [x.clone().requires_grad_(True) for x in init]
    ref = [x.clone().requires_grad_(True) for x in init]
    opt = Scout(torch.optim.SGD(ours, lr=lr), k=k, alpha=alpha)
    reference = ScoutReference(ref, lr, k, alpha)
    coherences = []
    for t in range(1, steps + 1):
        for side in (ours, ref):
            for i, p in enumerate(side):
                p.grad = grad_fn(p.detach(), t, i)
        opt.step()
        reference.step()
        if t % k == 0:
            coherences.append(opt.last_coherence)
    assert [c is None for c in coherences] == [c is None for c in reference.coherences]
    for c, r in zip(coherences, reference.coherences):
        assert c is None or c == pytest.approx(r, rel=1e-9, abs=1e-12)
    return ours, ref, opt, reference


def assert_params_close(a: Sequence[Tensor], b: Sequence[Tensor], tol: float = TOL) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=tol, atol=tol)


def test_scout_matches_the_reference_where_updates_vary() -> None:
    ours, ref, _, reference = scout_pair(gradient, k=4, alpha=0.3, steps=200)
    assert_params_close(ours, ref)
    assert all(c is not None for c in reference.coherences)


def test_scout_leaves_out_elements_that_do_not_move_where_holocron_freezes() -> None:
    """Half of the matrix gets no gradient signal and the vector none at all: holocron's coherence is NaN, which
    sends every parameter back to its slow copy at every sync; gradstep's Scout uses the elements that move."""

    def masked(p: Tensor, t: int, i: int) -> Tensor | None:
        if i == 1:
            return None
        g = gradient(p, t, i)
        return torch.cat([g[:1], torch.zeros_like(g[1:])]) if i == 3 else g

    ours, ref, opt, reference = scout_pair(masked, k=3, alpha=0.2, steps=60)
    assert_params_close(ours, ref)
    assert all(c is not None for c in reference.coherences)
    assert not opt.state.get(ours[1]), "a parameter without gradient got state"

    gen = torch.Generator().manual_seed(0)
    init = [torch.rand(s, generator=gen, dtype=torch.float64) * 3 - 1.5 for s in ((), (7,), (2, 3, 4), (3, 4))]
    theirs = [x.clone().requires_grad_(True) for x in init]
    holo = holocron().Scout(torch.optim.SGD(theirs, lr=0.05), 0.2, 3)
    for t in range(1, 61):
        for i, p in enumerate(theirs):
            p.grad = masked(p.detach(), t, i)
        holo.step()
    for x, p in zip(init, theirs):
        assert torch.equal(p.detach(), x), "holocron's NaN freeze is what the spec describes"
    assert not torch.equal(ours[0].detach(), init[0]) and not torch.equal(ours[2].detach(), init[2])


def test_scout_with_exactly_equal_updates_is_lookahead_where_holocron_freezes() -> None:
    """Dyadic values make every update of the constant gradient exactly equal (no element's updates vary)."""
    start = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    grad = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)

    def run(make: Callable[[list[Tensor]], Any]) -> tuple[Tensor, Any]:
        w = [start.clone().requires_grad_(True)]
        opt = make(w)
        for _ in range(8):
            w[0].grad = grad.clone()
            opt.step()
        return w[0].detach(), opt

    scout, opt = run(lambda w: Scout(torch.optim.SGD(w, lr=0.125), k=2, alpha=0.25))
    look, _ = run(lambda w: Lookahead(torch.optim.SGD(w, lr=0.125), k=2, alpha=0.25))
    holo, _ = run(lambda w: holocron().Scout(torch.optim.SGD(w, lr=0.125), 0.25, 2))
    assert opt.last_coherence is None
    assert torch.equal(scout, look) and not torch.equal(scout, start)
    assert torch.equal(holo, start)  # spec H.10: constant gradients with k=2 bring holocron back to the start


def test_scout_with_k_1_is_lookahead_where_holocron_never_moves() -> None:
    ours, ref, opt, reference = scout_pair(gradient, k=1, alpha=0.7, steps=20)
    assert_params_close(ours, ref)
    assert reference.coherences == [None] * 20 and opt.last_coherence is None
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(7, generator=gen, dtype=torch.float64)
    w = [x.clone().requires_grad_(True)]
    holo = holocron().Scout(torch.optim.SGD(w, lr=0.05), 0.7, 1)
    for t in range(1, 6):
        w[0].grad = gradient(w[0].detach(), t, 0)
        holo.step()
    assert torch.equal(w[0].detach(), x)


# --- checkpoints ----------------------------------------------------------------------------------------------------


def params_of(shapes: Sequence[tuple[int, ...]] = ((), (5,), (2, 3)), dtype: torch.dtype = torch.float32) -> list:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def drive(opt: torch.optim.Optimizer, params: Sequence[Tensor], steps: range) -> None:
    for t in steps:
        for i, p in enumerate(params):
            p.grad = gradient(p.detach().double(), t, i).to(p.dtype)
        opt.step()


BUILDERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "lookahead-torch-adamw": lambda ps: Lookahead(torch.optim.AdamW(ps, lr=0.05), k=4, alpha=0.3),
    "lookahead-gradstep-construction": lambda ps: Lookahead(
        gradstep.SGD(ps, lr=0.05, momentum=0.9), k=4, alpha=0.3, slow_copy="construction"
    ),
    "lookahead-pullback": lambda ps: Lookahead(
        gradstep.Adam(ps, lr=0.05), k=3, alpha=0.3, pullback_momentum="pullback"
    ),
    "scout": lambda ps: Scout(gradstep.SGD(ps, lr=0.05, momentum=0.5), k=4, alpha=0.3),
    "ranger": lambda ps: ranger(ps, lr=0.05, k=4),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_round_trip_through_bytes_resumes_bitwise(name: str) -> None:
    build = BUILDERS[name]
    straight = params_of()
    drive(build(straight), straight, range(1, 12))

    source_params = params_of()
    source = build(source_params)
    drive(source, source_params, range(1, 7))  # mid-period: the slow weights and counter must travel
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["gradstep"]["fast_steps"] == 6 and loaded["gradstep"]["optimizer"] == type(source).__name__

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    resumed = build(resumed_params)
    resumed.load_state_dict(loaded)
    drive(resumed, resumed_params, range(7, 12))
    for want, got in zip(straight, resumed_params):
        assert torch.equal(want.detach(), got.detach())


def test_loading_copies_tensors_and_keeps_fp32_slow_weights_of_bf16_params() -> None:
    params = params_of(dtype=torch.bfloat16)
    source = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), k=3)
    drive(source, params, range(1, 3))
    assert all(source.state[p]["slow_param"].dtype == torch.float32 for p in params)
    other = [torch.nn.Parameter(p.detach().clone()) for p in params]
    target = Lookahead(torch.optim.SGD(other, lr=0.1, momentum=0.9), k=3)
    target.load_state_dict(source.state_dict())
    for p, q in zip(params, other):
        assert target.state[q]["slow_param"].dtype == torch.float32
        assert target.state[q]["slow_param"].data_ptr() != source.state[p]["slow_param"].data_ptr()
        buf_p, buf_q = source.inner.state[p]["momentum_buffer"], target.inner.state[q]["momentum_buffer"]
        assert buf_q.data_ptr() != buf_p.data_ptr(), "the inner state was aliased"


def test_state_dicts_of_other_optimizers_are_refused_and_change_nothing() -> None:
    params = params_of()
    opt = Lookahead(gradstep.SGD(params, lr=0.1, momentum=0.9), k=3)
    drive(opt, params, range(1, 3))
    before = copy.deepcopy(opt.state_dict())

    other = params_of()
    with pytest.raises(ValueError, match="not by Lookahead.*inner.load_state_dict"):
        opt.load_state_dict(gradstep.SGD(other, lr=0.1, momentum=0.9).state_dict())
    scout = Scout(gradstep.SGD(other, lr=0.1, momentum=0.9), k=3)
    drive(scout, other, range(1, 3))
    with pytest.raises(ValueError, match="saved by Scout, not by Lookahead"):
        opt.load_state_dict(scout.state_dict())
    adam = Lookahead(gradstep.Adam(other, lr=0.1), k=3)
    with pytest.raises(ValueError, match="wraps a Adam, but this Lookahead wraps a SGD"):
        opt.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="does not keep"):
        Lookahead(gradstep.SGD(other, lr=0.1, momentum=0.9), k=3).load_state_dict(
            {**opt.state_dict(), "state": {0: {"slow_param": torch.zeros(()), "history": torch.zeros(())}}}
        )
    with pytest.raises(ValueError, match="Invalid k"):
        opt.load_state_dict({**opt.state_dict(), "gradstep": {**opt.state_dict()["gradstep"], "k": 0}})
    assert_unchanged(before, opt)


def assert_unchanged(before: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    """The optimizer's state_dict is still ``before`` (its slow weights, counter, settings and inner state)."""
    after = opt.state_dict()
    assert before["gradstep"] == after["gradstep"] and before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for pid, state in before["state"].items():
        assert state.keys() == after["state"][pid].keys()
        assert torch.equal(state["slow_param"], after["state"][pid]["slow_param"])
        assert torch.equal(state["fast_steps"], after["state"][pid]["fast_steps"])
        assert torch.equal(state["inner.momentum_buffer"], after["state"][pid]["inner.momentum_buffer"])


def without_gradstep_entry(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state_dict as torch.distributed.checkpoint hands it back: its "state" and "param_groups" only."""
    return {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}


def test_state_dict_holds_the_inner_state_and_the_counter_per_parameter() -> None:
    params = params_of()
    opt = Lookahead(gradstep.Adam(params, lr=0.05), k=4)
    drive(opt, params, range(1, 6))
    sd, inner_sd = opt.state_dict(), opt.inner.state_dict()
    assert set(sd) == {"state", "param_groups", "gradstep"}
    assert sd["param_groups"] == inner_sd["param_groups"]  # the wrapper's groups are the inner optimizer's
    assert set(sd["state"]) == set(inner_sd["state"]) == {0, 1, 2}
    for pid, entry in sd["state"].items():
        assert set(entry) == {"slow_param", "fast_steps", "inner.step", "inner.exp_avg", "inner.exp_avg_sq"}
        assert entry["fast_steps"].dtype == torch.int64 and int(entry["fast_steps"]) == 5
        assert inner_sd["state"][pid].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in inner_sd["state"][pid].items():
            assert torch.equal(entry[f"inner.{key}"], value)
    assert sd["gradstep"]["inner_extra"] == {"gradstep": {"optimizer": "Adam", "global_step": 5}}


def test_the_live_state_lists_the_counter_and_the_inner_state_as_tensors() -> None:
    params = params_of()
    opt = Lookahead(gradstep.SGD(params, lr=0.1, momentum=0.9), k=3)
    drive(opt, params, range(1, 3))
    for p in params:
        assert set(opt.state[p]) == {"slow_param", "fast_steps", "inner.step", "inner.momentum_buffer"}
        assert all(isinstance(v, Tensor) for v in opt.state[p].values())
        assert int(opt.state[p]["fast_steps"]) == opt.fast_steps == 2
        assert opt.state[p]["inner.momentum_buffer"] is opt.inner.state[p]["momentum_buffer"]
    # Every entry clones and deep-copies like any optimizer's state.
    cloned = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    copied = copy.deepcopy(opt)
    for q, c in zip(copied.param_groups[0]["params"], cloned):
        assert copied.state[q]["inner.momentum_buffer"] is copied.inner.state[q]["momentum_buffer"]
        assert all(torch.equal(c[k], v) for k, v in copied.state[q].items())
    # The wrapper's load refreshes the entries from the inner optimizer's new state.
    other = params_of()
    source = Lookahead(gradstep.SGD(other, lr=0.1, momentum=0.9), k=3)
    drive(source, other, range(1, 5))
    opt.load_state_dict(source.state_dict())
    for p, q in zip(params, other):
        assert opt.state[p]["inner.momentum_buffer"] is opt.inner.state[p]["momentum_buffer"]
        assert torch.equal(opt.state[p]["inner.momentum_buffer"], source.state[q]["inner.momentum_buffer"])
    drive(opt, params, range(5, 6))
    assert int(opt.state[params[0]]["fast_steps"]) == 5


DCP_BUILDERS = ("lookahead-torch-adamw", "lookahead-pullback", "scout", "ranger")


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", DCP_BUILDERS)
def test_distributed_checkpoint_state_dicts_resume_bitwise(name: str, flatten: bool) -> None:
    # get/set_optimizer_state_dict in one process: the ids become parameter names and the "gradstep" entry is
    # dropped; flattened, the state is rebuilt from the live optimizer's keys. The resumed optimizer is fresh, so DCP
    # first takes its zero-gradient, zero-lr step (the counter must then come from the checkpoint).
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    build = BUILDERS[name]
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    straight = params_of()
    drive(build(straight), straight, range(1, 12))

    source_params = params_of()
    source = build(source_params)
    drive(source, source_params, range(1, 7))
    saved = get_optimizer_state_dict(torch.nn.ParameterList(source_params), source, options=options)
    assert "gradstep" not in saved and "inner" not in saved
    if not flatten:
        assert {"slow_param", "fast_steps", "inner.step"} <= set(saved["state"]["0"])
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    resumed = build(resumed_params)
    set_optimizer_state_dict(torch.nn.ParameterList(resumed_params), resumed, saved, options=options)
    assert resumed.fast_steps == 6
    drive(resumed, resumed_params, range(7, 12))
    for want, got in zip(straight, resumed_params):
        assert torch.equal(want.detach(), got.detach())


def earlier_layout(opt: Lookahead, params: Sequence[Tensor]) -> dict[str, Any]:
    """The state_dict layout written before the inner state moved into the per-parameter entries: the wrapper's own
    tensors per parameter, the inner optimizer's whole state_dict under "inner", the counter in "gradstep" only."""
    own = ("slow_param",) + (
        ("prev_param", "delta_mean", "delta_m2", "delta_max", "delta_min") if isinstance(opt, Scout) else ()
    )
    return {
        "state": {i: {k: opt.state[p][k] for k in own} for i, p in enumerate(params)},
        "param_groups": opt.inner.state_dict()["param_groups"],
        "inner": opt.inner.state_dict(),
        "gradstep": {
            "optimizer": type(opt).__name__,
            "inner": type(opt.inner).__name__,
            "fast_steps": opt.fast_steps,
            "k": opt.k,
            "alpha": opt.alpha,
            "slow_copy": opt.slow_copy,
            "pullback_momentum": opt.pullback_momentum,
            "momentum_keys": list(opt.momentum_keys),
        },
    }


@pytest.mark.parametrize("name", ["lookahead-gradstep-construction", "scout"])
def test_state_dicts_of_the_earlier_layout_load_and_resume_bitwise(name: str) -> None:
    build = BUILDERS[name]
    straight = params_of()
    drive(build(straight), straight, range(1, 12))
    source_params = params_of()
    source = build(source_params)
    drive(source, source_params, range(1, 7))
    buffer = io.BytesIO()
    torch.save(earlier_layout(source, source_params), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    resumed = build(resumed_params)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.fast_steps == 6 and resumed.inner.global_step == 6
    drive(resumed, resumed_params, range(7, 12))
    for want, got in zip(straight, resumed_params):
        assert torch.equal(want.detach(), got.detach())


def test_state_dicts_without_the_gradstep_entry_are_checked_and_refused_when_foreign() -> None:
    params = params_of()
    opt = Lookahead(gradstep.SGD(params, lr=0.1, momentum=0.9), k=3)
    drive(opt, params, range(1, 3))
    before = copy.deepcopy(opt.state_dict())

    other = params_of()
    sgd = gradstep.SGD(other, lr=0.1, momentum=0.9)
    drive(sgd, other, range(1, 3))
    with pytest.raises(ValueError, match="not by Lookahead.*inner.load_state_dict"):
        opt.load_state_dict(without_gradstep_entry(sgd.state_dict()))
    scout = Scout(gradstep.SGD(other, lr=0.1, momentum=0.9), k=3)
    drive(scout, other, range(1, 3))
    with pytest.raises(ValueError, match="has delta_m2.*which Lookahead does not keep"):
        opt.load_state_dict(without_gradstep_entry(scout.state_dict()))
    with pytest.raises(ValueError, match="lacks delta_m2, .*prev_param"):
        Scout(gradstep.SGD(params_of(), lr=0.1, momentum=0.9), k=3).load_state_dict(
            without_gradstep_entry(opt.state_dict())
        )
    adam = Lookahead(gradstep.Adam(other, lr=0.1), k=3)
    drive(adam, other, range(1, 3))
    with pytest.raises(ValueError, match="another optimizer"):  # the inner SGD refuses Adam's state
        opt.load_state_dict(without_gradstep_entry(adam.state_dict()))
    disagreeing = without_gradstep_entry(copy.deepcopy(opt.state_dict()))
    disagreeing["state"][1]["fast_steps"] = torch.tensor(7)
    with pytest.raises(ValueError, match=r"different fast_steps \[2, 7\]"):
        opt.load_state_dict(disagreeing)
    assert_unchanged(before, opt)


class BoxedSGD(torch.optim.SGD):
    """An optimizer whose state_dict is not laid out as torch's (it sits in a box)."""

    def state_dict(self) -> dict[str, Any]:
        return {"box": super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict["box"])


def test_an_inner_state_dict_not_laid_out_as_torchs_is_kept_whole_and_round_trips() -> None:
    def build(ps: list[Tensor]) -> Lookahead:
        return Lookahead(BoxedSGD(ps, lr=0.05, momentum=0.9), k=4)

    straight = params_of()
    drive(build(straight), straight, range(1, 12))
    source_params = params_of()
    source = build(source_params)
    drive(source, source_params, range(1, 7))
    sd = source.state_dict()
    assert set(sd["inner"]) == {"box"} and set(sd["state"][0]) == {"slow_param"}
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    resumed = build(resumed_params)
    resumed.load_state_dict(sd)
    drive(resumed, resumed_params, range(7, 12))
    for want, got in zip(straight, resumed_params):
        assert torch.equal(want.detach(), got.detach())


def test_holocrons_state_dict_crashes_on_torch_2_where_gradsteps_round_trips() -> None:
    params = params_of()
    holo = holocron().Lookahead(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(AttributeError):
        holo.state_dict()  # spec H.9: Optimizer.__init__ never ran, the hook registries are missing
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), slow_copy="construction")
    assert set(opt.state_dict()["state"]) == {0, 1, 2}


def test_deepcopy_and_pickle_keep_the_state_and_step_identically() -> None:
    params = params_of()
    opt = Scout(gradstep.SGD(params, lr=0.05, momentum=0.9), k=3, alpha=0.3)
    drive(opt, params, range(1, 3))
    params2, opt2 = copy.deepcopy((params, opt))
    params3, opt3 = pickle.loads(pickle.dumps((params, opt)))
    for ps, o in ((params, opt), (params2, opt2), (params3, opt3)):
        assert o.param_groups is o.inner.param_groups and o.param_groups[0]["params"][0] is ps[0]
        drive(o, ps, range(3, 9))
    for a, b, c in zip(params, params2, params3):
        assert torch.equal(a.detach(), b.detach()) and torch.equal(a.detach(), c.detach())


# --- the torch.optim.Optimizer contract through the wrapper ---------------------------------------------------------


def test_lr_scheduler_on_the_wrapper_reaches_the_inner_optimizer() -> None:
    scheduled, manual = params_of(), params_of()
    opt_s = Lookahead(gradstep.SGD(scheduled, lr=0.1, momentum=0.9), k=3)
    opt_m = Lookahead(gradstep.SGD(manual, lr=0.1, momentum=0.9), k=3)
    sched = torch.optim.lr_scheduler.StepLR(opt_s, step_size=2, gamma=0.5)
    for t in range(1, 8):
        drive(opt_s, scheduled, range(t, t + 1))
        sched.step()
        opt_m.inner.param_groups[0]["lr"] = 0.1 * 0.5 ** ((t - 1) // 2)
        drive(opt_m, manual, range(t, t + 1))
    assert opt_s.inner.param_groups[0]["lr"] == 0.1 * 0.5**3
    for a, b in zip(scheduled, manual):
        assert torch.equal(a.detach(), b.detach())
    # holocron's copy of lr is what a scheduler on its wrapper changes (spec H.9); gradstep has no copy.
    holo = holocron().Lookahead(torch.optim.SGD(params_of(), lr=0.1))
    torch.optim.lr_scheduler.StepLR(holo, step_size=1, gamma=0.5).step()
    assert holo.base_optimizer.param_groups[0]["lr"] == 0.1


def test_one_cycle_cycles_the_inner_betas() -> None:
    params = params_of()
    opt = Lookahead(torch.optim.AdamW(params, lr=1e-2), k=2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6)
    betas = []
    for t in range(1, 7):
        betas.append(opt.inner.param_groups[0]["betas"][0])
        drive(opt, params, range(t, t + 1))
        sched.step()
    assert len(set(betas)) > 2


def test_closure_is_passed_on_and_first_step_copies_precede_the_update() -> None:
    with_closure, manual = params_of(), params_of()
    initial = [p.detach().clone() for p in with_closure]
    opt_c = Lookahead(gradstep.SGD(with_closure, lr=0.1, momentum=0.9), k=3)
    opt_m = Lookahead(gradstep.SGD(manual, lr=0.1, momentum=0.9), k=3)
    for t in range(1, 8):

        def closure(t: int = t) -> Tensor:
            for i, p in enumerate(with_closure):
                # the parameters have no gradient before the first closure
                p.grad = gradient(p.detach().double(), t, i).to(p.dtype)
            return torch.tensor(float(t))

        assert opt_c.step(closure).item() == t
        if t == 1:
            for p, x in zip(with_closure, initial):
                assert torch.equal(opt_c.state[p]["slow_param"], x)
        drive(opt_m, manual, range(t, t + 1))
    for a, b in zip(with_closure, manual):
        assert torch.equal(a.detach(), b.detach())


def test_closure_required_inner_optimizer_lbfgs() -> None:
    target = torch.tensor([1.0, -2.0, 0.5])
    w = torch.nn.Parameter(torch.zeros(3))
    opt = Lookahead(torch.optim.LBFGS([w], lr=0.5, max_iter=4), k=2, alpha=0.5)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert torch.equal(opt.state[w]["slow_param"], torch.zeros(3)), "LBFGS calls the closure several times"
    for _ in range(5):
        last = opt.step(closure)
    assert last < first * 1e-2


def test_grad_scaler_steps_the_wrapper_and_skips_inf_steps() -> None:
    plain, scaled = params_of(), params_of()
    opt_p = Lookahead(torch.optim.SGD(plain, lr=0.05, momentum=0.9), k=3)
    opt_s = Lookahead(torch.optim.SGD(scaled, lr=0.05, momentum=0.9), k=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def loss_of(params: Sequence[Tensor], t: int) -> Tensor:
        return sum((0.15 * p.square() - torch.cos(3 * p + t) / 3).sum() for p in params)  # type: ignore[return-value]

    for t in range(7):
        opt_p.zero_grad()
        loss_of(plain, t).backward()
        opt_p.step()
        opt_s.zero_grad()
        scaler.scale(loss_of(scaled, t)).backward()
        scaler.step(opt_s)
        scaler.update()
    assert scaler.get_scale() == 2.0**10
    for a, b in zip(plain, scaled):
        assert torch.equal(a.detach(), b.detach())  # a power-of-two scale unscales exactly

    before = [p.detach().clone() for p in scaled]
    slow_before = [opt_s.state[p]["slow_param"].clone() for p in scaled]
    opt_s.zero_grad()
    scaler.scale(loss_of(scaled, 7) + (scaled[0] * float("inf")).sum()).backward()
    scaler.step(opt_s)
    scaler.update()
    assert scaler.get_scale() < 2.0**10 and opt_s.fast_steps == 7
    for p, x, s in zip(scaled, before, slow_before):
        assert torch.equal(p.detach(), x) and torch.equal(opt_s.state[p]["slow_param"], s)


def test_a_step_the_inner_optimizer_skips_is_not_counted() -> None:
    params = params_of()
    opt = Lookahead(gradstep.SGD(params, lr=0.1, nonfinite="skip"), k=2)
    drive(opt, params, range(1, 2))
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.inner.skipped_steps == 1 and opt.fast_steps == 1


def test_set_hyper_and_freeze_through_the_wrapper() -> None:
    a, b, c = params_of()
    opt = Lookahead(torch.optim.AdamW([{"params": [a]}, {"params": [b]}, {"params": [c]}], lr=1e-3))
    opt.set_hyper("lr", slice(1e-4, 1e-2))
    assert [g["lr"] for g in opt.inner.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    opt.set_hyper("betas", (0.8, 0.9))  # one pair for every group, although torch's AdamW declares nothing
    assert [g["betas"] for g in opt.inner.param_groups] == [(0.8, 0.9)] * 3
    opt.freeze()
    assert [p.requires_grad for p in (a, b, c)] == [False, False, True]
    opt.unfreeze()
    assert all(p.requires_grad for p in (a, b, c))
    ours = Lookahead(gradstep.SGD([a], lr=0.1))
    with pytest.raises(ValueError, match="momentum"):
        ours.set_hyper("momentum", -1.0)  # a gradstep inner optimizer validates


def test_parameters_without_gradient_get_no_state_and_do_not_move() -> None:
    a, b = params_of(((3,), (2,)))
    b_before = b.detach().clone()
    for mode, stateless in (("first_step", True), ("construction", False)):
        opt = Lookahead(torch.optim.SGD([a, b], lr=0.1, momentum=0.9), k=2, slow_copy=mode)
        for t in range(1, 6):
            a.grad = gradient(a.detach(), t, 0)
            opt.step()
        assert (not opt.state.get(b)) is stateless, mode
        assert torch.equal(b.detach(), b_before)


def test_add_param_group_reaches_the_inner_optimizer_and_copies_at_construction() -> None:
    a, b = params_of(((3,), (2,)))
    opt = Lookahead(torch.optim.SGD([a], lr=0.1), k=2, slow_copy="construction")
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.inner.param_groups[1]["lr"] == 0.01 and torch.equal(opt.state[b]["slow_param"], b.detach())
    scout = Scout(torch.optim.SGD([a], lr=0.1))
    z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        scout.add_param_group({"params": [z]})
    assert len(scout.param_groups) == 1


def test_complex_parameters_are_synchronised_as_their_real_views() -> None:
    z = torch.nn.Parameter(torch.tensor([1 + 2j, -0.5 + 0.25j]))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z = Lookahead(torch.optim.SGD([z], lr=0.1, momentum=0.9), k=2, alpha=0.3)
    opt_r = Lookahead(torch.optim.SGD([r], lr=0.1, momentum=0.9), k=2, alpha=0.3)
    for t in range(5):
        g = torch.tensor([[0.3, -0.1], [0.2 * t, 0.5]])
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())
    with pytest.raises(TypeError, match="complex"):
        Scout(torch.optim.SGD([z], lr=0.1))
    assert get("lookahead").capabilities.supports_complex and not get("scout").capabilities.supports_complex


def test_init_state_and_clear_state() -> None:
    params = params_of()
    opt = Scout(gradstep.SGD(params, lr=0.1, momentum=0.9), k=3)
    opt.init_state()
    stats = {"prev_param", "delta_mean", "delta_m2", "delta_max", "delta_min"}
    inner = {"inner.step", "inner.momentum_buffer"}
    assert all(set(opt.state[p]) == {"slow_param", "fast_steps", *inner, *stats} for p in params)
    assert all(opt.state[p]["inner.momentum_buffer"] is opt.inner.state[p]["momentum_buffer"] for p in params)
    drive(opt, params, range(1, 3))
    opt.clear_state()
    assert opt.fast_steps == 0 and not opt.state and not opt.inner.state and opt.inner.global_step == 0


def test_pullback_reset_zeroes_the_inner_first_moment_at_each_sync() -> None:
    params = params_of()
    opt = Lookahead(gradstep.Adam(params, lr=0.05), k=2, pullback_momentum="reset")
    drive(opt, params, range(1, 2))
    assert all(opt.inner.state[p]["exp_avg"].abs().sum() > 0 for p in params)
    drive(opt, params, range(2, 3))
    assert all(opt.inner.state[p]["exp_avg"].abs().sum() == 0 for p in params)
    assert all(opt.inner.state[p]["exp_avg_sq"].abs().sum() > 0 for p in params)


# --- construction ---------------------------------------------------------------------------------------------------


def test_both_constructor_forms_build_the_same_optimizer() -> None:
    built, named, by_class = params_of(), params_of(), params_of()
    opts = [
        Lookahead(gradstep.Adam(built, lr=0.05, betas=(0.8, 0.9)), 4, 0.3),
        Lookahead(named, 4, 0.3, inner="adam", lr=0.05, betas=(0.8, 0.9)),
        Lookahead(by_class, 4, 0.3, inner=gradstep.Adam, lr=0.05, betas=(0.8, 0.9)),
    ]
    for opt, ps in zip(opts, (built, named, by_class)):
        drive(opt, ps, range(1, 10))
    for a, b, c in zip(built, named, by_class):
        assert torch.equal(a.detach(), b.detach()) and torch.equal(a.detach(), c.detach())
    via_registry = gradstep.create("lookahead", params_of(), inner="adam", lr=0.05, k=4)
    assert isinstance(via_registry.inner, gradstep.Adam) and via_registry.k == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0}, "k"),
        ({"k": 2.0}, "k"),
        ({"k": True}, "k"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"slow_copy": "lazy"}, "slow_copy"),
        ({"pullback_momentum": "full"}, "pullback_momentum"),
        ({"momentum_keys": "exp_avg"}, "momentum_keys"),
    ],
)
def test_invalid_settings_raise_value_error_naming_them(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        Lookahead(torch.optim.SGD(params_of(), lr=0.1), **kwargs)


def test_misused_constructor_raises_type_error() -> None:
    with pytest.raises(TypeError, match="takes no inner"):
        Lookahead(torch.optim.SGD(params_of(), lr=0.1), lr=0.1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="inner="):
        Lookahead(params_of())
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        Lookahead(params_of(), inner="sgd", not_a_hyperparameter=1.0)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer|inner="):
        Lookahead(fastai_optim.SGD(params_of(), lr=0.1))  # fastai's optimizer is not a torch.optim.Optimizer

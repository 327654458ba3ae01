"""``gradstep.wrappers.OptimWrapper`` against fastai 2.8.12's ``OptimWrapper``, and the optimizer contract through it.

Parity: both wrappers around the same ``torch.optim`` class, built from the same list of lists of float64 tensors
(two groups), given the same ``set_hyper`` calls under fastai's names (slices, per-group lists, ``mom``/``sqr_mom``
mapped to ``betas`` elements or to ``momentum``/``alpha``), then 200 steps side by side (``parity.py``). The wrapped
optimizer is the same, so what is compared is what ``set_hyper`` wrote: the steps agree to rounding, and the groups'
values to the last bits of fastai's geometric spacing.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import fastai.optimizer as fastai_optim
import pytest
import torch
from torch import Tensor

import gradstep
from gradstep.wrappers import PYTORCH_HP_MAP, Lookahead, OptimWrapper
from parity import gradient, make_params, run_side_by_side_fastai, split_groups

TOL = 1e-12

# (torch optimizer, its constructor values, set_hyper calls under fastai's names)
CASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], list[tuple[str, Any]]]] = {
    "adamw": (
        torch.optim.AdamW,
        {"lr": 1e-2, "weight_decay": 0.05},
        [("lr", slice(1e-3, 1e-2)), ("mom", [0.85, 0.9]), ("sqr_mom", 0.95), ("wd", [0.01, 0.1]), ("eps", 1e-6)],
    ),
    "sgd": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.5},
        [("lr", slice(0.05)), ("mom", [0.9, 0.8]), ("wd", 1e-3)],
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        {"lr": 1e-3, "momentum": 0.5},
        [("lr", [2e-3, 5e-4]), ("mom", 0.7), ("sqr_mom", [0.9, 0.95]), ("wd", [0.0, 0.01])],
    ),
}


def configured(wrapper: Any, calls: Sequence[tuple[str, Any]]) -> Any:
    for name, value in calls:
        wrapper.set_hyper(name, value)
    return wrapper


@pytest.mark.parametrize("case", list(CASES))
def test_set_hyper_and_steps_match_fastai(case: str) -> None:
    cls, hypers, calls = CASES[case]
    seen: dict[str, Any] = {}

    def reference(groups: list[list[Tensor]]) -> Any:
        seen["fastai"] = configured(fastai_optim.OptimWrapper(groups, opt=cls, **hypers), calls)
        return seen["fastai"]

    def ours(groups: list[list[Tensor]]) -> OptimWrapper:
        seen["ours"] = configured(OptimWrapper(groups, opt=cls, **hypers), calls)
        return seen["ours"]

    run_side_by_side_fastai(reference, ours).assert_within(TOL)
    theirs, mine = seen["fastai"], seen["ours"]
    assert len(mine.param_groups) == 2
    for h_theirs, h_mine in zip(theirs.hypers, mine.hypers):
        assert set(h_theirs) == set(h_mine)
        for key, value in h_theirs.items():
            if isinstance(value, float):  # fastai spaces slices with numpy: the same values to the last bits
                assert h_mine[key] == pytest.approx(value, rel=1e-15), key
            else:
                assert h_mine[key] == value, key
    for g_theirs, g_mine in zip(theirs.opt.param_groups, mine.param_groups):
        assert set(g_mine) == set(g_theirs)


def test_hyperparameters_changed_mid_training_match_fastai() -> None:
    ref_params, our_params = make_params(seed=3), make_params(seed=3)
    theirs = fastai_optim.OptimWrapper(split_groups(ref_params), opt=torch.optim.Adam, lr=1e-2)
    ours = OptimWrapper(split_groups(our_params), opt=torch.optim.Adam, lr=1e-2)
    for t in range(1, 61):
        if t == 30:
            for opt in (theirs, ours):
                opt.set_hyper("lr", slice(1e-3))
                opt.set_hyper("sqr_mom", [0.9, 0.99])
                opt.set_hyper("mom", 0.5)
        for opt, params in ((theirs, ref_params), (ours, our_params)):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
    for a, b in zip(ref_params, our_params):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert [g["betas"] for g in ours.param_groups] == [(0.5, 0.9), (0.5, 0.99)]
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([1e-4, 1e-3])


def test_names_map_as_fastais_pytorch_hp_map() -> None:
    assert PYTORCH_HP_MAP == fastai_optim.pytorch_hp_map
    params = make_params()
    ours = OptimWrapper(split_groups(params), opt=torch.optim.AdamW, lr=1e-3)
    theirs = fastai_optim.OptimWrapper(split_groups(make_params()), opt=torch.optim.AdamW, lr=1e-3)
    assert ours.fwd_map == theirs.fwd_map and ours.bwd_map == theirs.bwd_map
    custom = OptimWrapper(split_groups(params), opt=torch.optim.SGD, lr=0.1, hp_map={"momentum": "beta"})
    custom.set_hyper("beta", 0.3)
    assert all(g["momentum"] == 0.3 for g in custom.param_groups) and "beta" in custom.hypers[0]


def test_set_hyper_by_torch_names_tuple_elements_and_unknown_names() -> None:
    opt = OptimWrapper(split_groups(make_params()), opt=torch.optim.AdamW, lr=1e-3)
    opt.set_hyper("weight_decay", [0.1, 0.2])
    opt.set_hyper("betas", (0.8, 0.95))  # a pair is one value for every group
    opt.set_hyper("betas__1", [0.9, 0.99])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.2]
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.9), (0.8, 0.99)]
    assert [h["sqr_mom"] for h in opt.hypers] == [0.9, 0.99]
    with pytest.raises(KeyError, match="not_a_hyperparameter"):
        opt.set_hyper("not_a_hyperparameter", 1.0)
    with pytest.raises(ValueError):
        opt.set_hyper("lr", [1e-3, 1e-3, 1e-3])  # three values for two groups
    with pytest.raises(ValueError, match="slice"):
        opt.set_hyper("lr", slice(0, 1e-2))  # fastai reads slice(0, x) as slice(x); here it is refused
    inner = gradstep.SGD(make_params(), lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        OptimWrapper(opt=inner).set_hyper("mom", -1.0)  # a gradstep optimizer validates through the wrapper


def test_freeze_keeps_force_train_parameters_trainable_like_fastai() -> None:
    def model() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))

    mine, theirs = model(), model()
    gradstep.mark_norm_params(mine)
    ours = OptimWrapper([list(m.parameters()) for m in mine], opt=torch.optim.SGD, lr=0.1)
    ref = fastai_optim.OptimWrapper([list(m.parameters()) for m in theirs], opt=torch.optim.SGD, lr=0.1)
    for p in theirs[1].parameters():
        ref.state[p]["force_train"] = True  # where fastai's Learner marks normalisation layers
    for action in ("freeze", "unfreeze", "freeze_to"):
        for opt in (ours, ref):
            getattr(opt, action)(*([2] if action == "freeze_to" else []))
        assert [p.requires_grad for p in mine.parameters()] == [p.requires_grad for p in theirs.parameters()], action
    ours.freeze()
    assert [p.requires_grad for p in mine.parameters()] == [False, False, True, True, True, True]


def test_constructor_forms_and_errors() -> None:
    a, b = make_params(((3,), (2,)))
    built = torch.optim.SGD([a, b], lr=0.1)
    assert OptimWrapper(opt=built).inner is built
    groups = OptimWrapper([[a], {"params": [b], "lr": 0.5}], opt=torch.optim.SGD, lr=0.1)
    assert [g["lr"] for g in groups.param_groups] == [0.1, 0.5]
    single = OptimWrapper([a, b], opt=torch.optim.SGD, lr=0.1)
    assert len(single.param_groups) == 1
    with pytest.raises(ValueError, match="cannot be None"):
        OptimWrapper()
    with pytest.raises(ValueError, match="Just pass in `opt`"):
        OptimWrapper([a], opt=built)
    with pytest.raises(ValueError, match="opt="):
        OptimWrapper(built)  # the first argument is params (fastai's code, not its older docs)
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        OptimWrapper([a], opt=torch.optim.SGD, lr=0.1, not_a_hyperparameter=1)


def run(opt: torch.optim.Optimizer, params: Sequence[Tensor], steps: range) -> None:
    for t in steps:
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()


def test_state_dict_round_trip_resumes_bitwise_without_aliasing() -> None:
    def build(params: list[Tensor]) -> OptimWrapper:
        return OptimWrapper(split_groups(params), opt=torch.optim.AdamW, lr=1e-2)

    straight = make_params(dtype=torch.float32)
    run(build(straight), straight, range(1, 9))
    source_params = make_params(dtype=torch.float32)
    source = build(source_params)
    run(source, source_params, range(1, 5))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.detach().clone().requires_grad_(True) for p in source_params]
    resumed = build(resumed_params)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again = build([p.detach().clone().requires_grad_(True) for p in source_params])
    again.load_state_dict(source.state_dict())
    state_ptrs = {v.data_ptr() for s in source.state.values() for v in s.values() if isinstance(v, Tensor)}
    assert not state_ptrs & {v.data_ptr() for s in again.state.values() for v in s.values() if isinstance(v, Tensor)}
    run(resumed, resumed_params, range(5, 9))
    for a, b in zip(straight, resumed_params):
        assert torch.equal(a.detach(), b.detach())
    resumed.clear_state()
    assert not resumed.state and not resumed.inner.state


def test_scheduler_closure_and_grad_scaler_reach_the_torch_optimizer() -> None:
    params = make_params(dtype=torch.float32)
    opt = OptimWrapper(split_groups(params), opt=torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    reference = make_params(dtype=torch.float32)
    ref = torch.optim.SGD(reference, lr=0.1, momentum=0.9)
    for t in range(3):

        def closure(params: Sequence[Tensor] = params, t: int = t) -> Tensor:
            opt.zero_grad()
            loss = sum((torch.sin(p + t) ** 2).sum() for p in params)
            loss.backward()  # type: ignore[union-attr]
            return loss  # type: ignore[return-value]

        if t == 1:
            opt.zero_grad()
            scaler.scale(sum((torch.sin(p + t) ** 2).sum() for p in params)).backward()  # type: ignore[union-attr]
            scaler.step(opt)
            scaler.update()
        else:
            assert opt.step(closure) is not None
        sched.step()
        ref.zero_grad()
        sum((torch.sin(p + t) ** 2).sum() for p in reference).backward()  # type: ignore[union-attr]
        ref.step()
        for g in ref.param_groups:
            g["lr"] *= 0.5
    assert opt.inner.param_groups[0]["lr"] == 0.1 * 0.5**3
    for a, b in zip(params, reference):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_deepcopy_and_lookahead_around_an_optim_wrapper() -> None:
    params = make_params()
    opt = OptimWrapper(split_groups(params), opt=torch.optim.SGD, lr=0.05, momentum=0.9)
    run(opt, params, range(1, 3))
    params2, opt2 = copy.deepcopy((params, opt))
    assert opt2.param_groups[0]["params"][0] is params2[0] and opt2.fwd_map == opt.fwd_map
    run(opt, params, range(3, 6))
    run(opt2, params2, range(3, 6))
    for a, b in zip(params, params2):
        assert torch.equal(a.detach(), b.detach())

    nested_params, plain_params = make_params(), make_params()

    def build(ps: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9)

    nested = Lookahead(OptimWrapper(opt=build(nested_params)), k=3)
    plain = Lookahead(build(plain_params), k=3)
    nested.set_hyper("lr", 0.02)
    plain.set_hyper("lr", 0.02)
    run(nested, nested_params, range(1, 8))
    run(plain, plain_params, range(1, 8))
    for a, b in zip(nested_params, plain_params):
        assert torch.equal(a.detach(), b.detach())

"""OptimWrapper keeps the optimizer contract around a torch.optim optimizer (see gradstep.wrappers.inner_checks).

Checked loading (every torch optimizer's own dicts load and resume; broken or foreign dicts are refused and change
nothing), validated hyperparameters (construction, add_param_group, set_hyper), complex parameters refused where the
inner optimizer cannot take them, the wrapper's own state_dict and load hooks, and torch's global step hooks fired
once per step.
"""

from __future__ import annotations

import copy
import math
import sys
import types
import unittest
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import gradstep
from gradstep.wrappers import Lookahead, OptimWrapper
from gradstep.wrappers.inner_checks import TORCH_COMPLEX, supports_complex


def torch_configs() -> list[tuple[type[torch.optim.Optimizer], dict[str, Any]]]:
    """torch's own CPU configurations of each of its optimizers (``optim_db``), without fused/capturable ones."""
    if "expecttest" not in sys.modules:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in
    from torch.testing._internal.common_optimizers import optim_db

    configs = []
    for info in optim_db:
        if info.optim_cls.__name__ in ("SparseAdam", "LBFGS"):
            continue  # sparse gradients only; LBFGS needs a closure (checked on its own below)
        for i in info.optim_inputs_func("cpu"):
            kwargs = dict(i.kwargs)
            if any(kwargs.get(f) for f in ("fused", "capturable", "differentiable")) or isinstance(
                kwargs.get("lr"), Tensor
            ):
                continue
            configs.append((info.optim_cls, kwargs))
    return configs


CONFIGS = torch_configs()


def make_params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((3, 4), (5,), (2, 3))]


def drive(opt: Any, params: list[Tensor], steps: range) -> None:
    for t in steps:
        for p in params:
            p.grad = torch.sin(3 * p.detach() + t)
        opt.step()


def snapshot(opt: OptimWrapper) -> Any:
    return copy.deepcopy(
        (
            opt.inner.state_dict()["state"],
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        )
    )


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("cls,config", CONFIGS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONFIGS)])
def test_every_torch_optimizers_state_dict_passes_the_checks_and_resumes_as_torchs(
    cls: type[torch.optim.Optimizer], config: dict[str, Any]
) -> None:
    params = make_params()
    if cls.__name__ == "Muon":
        params = [p for p in params if p.dim() == 2]
    source = OptimWrapper(params, opt=cls, **config)
    drive(source, params, range(3))
    # The wrapper loads what torch loads, as torch loads it (torch casts NAdam's float32 mu_product to a float64
    # parameter's dtype, so even torch's own resume is not bitwise its uninterrupted run).
    mirror, plain = ([torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2))
    target, reference = OptimWrapper(mirror, opt=cls, **config), cls(plain, **config)
    target.load_state_dict(source.state_dict())
    target.load_state_dict(copy.deepcopy(source.inner.state_dict()))  # the torch optimizer's own dict
    reference.load_state_dict(copy.deepcopy(source.inner.state_dict()))
    drive(target, mirror, range(3, 5))
    drive(reference, plain, range(3, 5))
    for p, q in zip(plain, mirror):
        assert torch.equal(p.detach(), q.detach())


def test_lbfgs_state_dict_loads_through_the_checks() -> None:
    params = make_params()
    source = OptimWrapper(params, opt=torch.optim.LBFGS, lr=0.5, history_size=3)

    def closure() -> Tensor:
        source.zero_grad()
        loss = sum((torch.cos(p) ** 2).sum() for p in params)
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    for _ in range(2):
        source.step(closure)
    OptimWrapper(make_params(), opt=torch.optim.LBFGS, lr=0.5, history_size=3).load_state_dict(source.state_dict())


def broken_dicts(sd: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    cases = []

    def bad(what: str, match: str, change: Any) -> None:
        d = copy.deepcopy(sd)
        change(d)
        cases.append((what, d, match))

    bad("NaN buffer", "NaN", lambda d: d["state"][0]["exp_avg"].fill_(math.nan))
    bad("wrong shape", "shape", lambda d: d["state"][0].__setitem__("exp_avg", torch.zeros(7)))
    bad("integer buffer", "dtype", lambda d: d["state"][0].__setitem__("exp_avg", torch.zeros(3, 4, dtype=torch.long)))
    bad("missing buffer", "lacks exp_avg_sq", lambda d: d["state"][1].pop("exp_avg_sq"))
    bad("extra buffer", "does not keep", lambda d: d["state"][1].__setitem__("history", torch.zeros(5)))
    bad("negative step", "step", lambda d: d["state"][0].__setitem__("step", torch.tensor(-1.0)))
    bad("negative lr", "lr", lambda d: d["param_groups"][0].__setitem__("lr", -1.0))
    bad("infinite eps", "eps", lambda d: d["param_groups"][0].__setitem__("eps", math.inf))
    bad("bad betas", "betas", lambda d: d["param_groups"][0].__setitem__("betas", (1.5, 0.9)))
    bad("extra group", "groups", lambda d: d["param_groups"].append(copy.deepcopy(d["param_groups"][0])))
    bad(
        "another inner class",
        "wraps a AdamW, but this OptimWrapper wraps a Adam",
        lambda d: d["gradstep"].update(inner="AdamW"),
    )
    return cases


def test_refused_dicts_name_the_problem_and_change_nothing() -> None:
    params = make_params()
    opt = OptimWrapper(params, opt=torch.optim.Adam, lr=0.01)
    drive(opt, params, range(2))
    other = make_params(1)
    source = OptimWrapper(other, opt=torch.optim.Adam, lr=0.02)
    drive(source, other, range(5))
    before = snapshot(opt)
    for what, sd, match in broken_dicts(source.state_dict()):
        sd["param_groups"][0]["lr"] = sd["param_groups"][0]["lr"] if what == "negative lr" else 0.123
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert_same(snapshot(opt), before)
    # Dicts of other savers: a gradstep optimizer, another wrapper.
    foreign = [gradstep.Adam(make_params(), lr=0.1), Lookahead(torch.optim.Adam(make_params(), lr=0.1))]
    for saver in foreign:
        drive(saver, saver.param_groups[0]["params"], range(1))
        with pytest.raises(ValueError, match=f"saved by gradstep.{type(saver).__name__}, not by OptimWrapper"):
            opt.load_state_dict(saver.state_dict())
        assert_same(snapshot(opt), before)


def test_a_gradstep_inner_checks_the_dict_itself_and_torch_loads_the_wrappers_dict() -> None:
    params = make_params()
    opt = OptimWrapper(opt=gradstep.Adam(params, lr=0.01))
    drive(opt, params, range(2))
    sd = opt.state_dict()
    assert sd["gradstep"] == {
        "wrapper": "OptimWrapper",
        "inner": "Adam",
        "inner_meta": opt.inner.state_dict()["gradstep"],
    }
    target = OptimWrapper(opt=gradstep.Adam(make_params(), lr=0.01))
    target.load_state_dict(sd)
    target.load_state_dict(opt.inner.state_dict())  # the inner optimizer's own dict
    assert target.inner.global_step == 2
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"].fill_(math.nan)
    with pytest.raises(ValueError, match="NaN"):
        target.load_state_dict(bad)
    with pytest.raises(ValueError, match="saved by gradstep.OptimWrapper"):
        gradstep.Adam(make_params(), lr=0.01).load_state_dict(sd)
    torch_params = make_params()
    torch_opt = OptimWrapper(torch_params, opt=torch.optim.Adam, lr=0.01)
    drive(torch_opt, torch_params, range(2))
    torch.optim.Adam(make_params(), lr=0.01).load_state_dict(torch_opt.state_dict())  # torch ignores "gradstep"


def test_hyperparameters_are_checked_naming_the_argument() -> None:
    p = make_params()
    for bad, name in [({"lr": math.inf}, "lr"), ({"lr": math.nan}, "lr"), ({"momentum": 1.5}, "momentum")]:
        with pytest.raises(ValueError, match=name):
            OptimWrapper(p, opt=torch.optim.SGD, **{"lr": 0.1, **bad})
    with pytest.raises(ValueError, match="eps"):
        OptimWrapper(opt=torch.optim.Adam(p, lr=0.1, eps=math.inf))  # a built optimizer too
    with pytest.raises(TypeError, match="params"):
        OptimWrapper(None, opt=torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        OptimWrapper([p[0], p[0]], opt=torch.optim.SGD, lr=0.1)
    opt = OptimWrapper([[p[0]], [p[1]]], opt=torch.optim.Adam, lr=0.1)
    for name, value in [("lr", math.nan), ("mom", 1.0), ("sqr_mom", [0.9, -0.1]), ("eps", -1.0), ("wd", math.inf)]:
        before = snapshot(opt)
        with pytest.raises(ValueError, match="lr|betas|eps|weight_decay"):
            opt.set_hyper(name, value)
        assert_same(snapshot(opt), before)
    opt.set_hyper("sqr_mom", [0.9, 0.99])
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.9), (0.9, 0.99)]
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [p[2]], "lr": -1.0})
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": [p[2]], "lr": 0.5})
    assert len(opt.param_groups) == 3


def test_complex_parameters_are_refused_where_the_inner_optimizer_cannot_take_them() -> None:
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    for cls in sorted(TORCH_COMPLEX - {torch.optim.LBFGS}, key=lambda c: c.__name__):
        a = torch.nn.Parameter(z.detach().clone())
        b = torch.nn.Parameter(r.detach().clone())
        oa, ob = OptimWrapper([a], opt=cls, lr=0.01), OptimWrapper([b], opt=cls, lr=0.01)
        for t in range(3):
            a.grad = torch.sin(a.detach() + t)
            b.grad = torch.view_as_real(a.grad).clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(torch.view_as_real(a.detach()), b.detach(), rtol=1e-12, atol=1e-12)

    class Custom(torch.optim.SGD):  # a class torch's tests do not vouch for
        pass

    for build in (lambda ps: torch.optim.Adafactor(ps), Custom, lambda ps: gradstep.create("lion", ps, lr=1e-3)):
        inner = build([torch.nn.Parameter(torch.zeros(3))])
        expected = supports_complex(inner)
        if not expected:
            with pytest.raises(TypeError, match="complex"):
                OptimWrapper([z], opt=build, lr=1e-3) if not isinstance(build, type) else OptimWrapper(
                    [z], opt=build, lr=0.1
                )
    assert not supports_complex(Custom([torch.nn.Parameter(torch.zeros(3))], lr=0.1))
    assert supports_complex(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1))


def test_the_wrappers_own_hooks_run_and_global_step_hooks_fire_once() -> None:
    params = make_params()
    opt = OptimWrapper(params, opt=torch.optim.SGD, lr=0.1, momentum=0.9)
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.inner.register_step_post_hook(lambda o, a, k: calls.append("inner_post"))
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(f"global_pre:{type(o).__name__}")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(f"global_post:{type(o).__name__}")),
    ]
    try:
        drive(opt, params, range(1))
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global_pre:OptimWrapper", "inner_post", "global_post:OptimWrapper"]
    calls.clear()
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls == ["sd_pre"]
    calls.clear()
    opt.load_state_dict(sd)
    assert calls == ["load_pre", "load_post"]

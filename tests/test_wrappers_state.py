"""The state of the wrappers that keep state beside their inner optimizer's (Lookahead, ranger, Scout, schedule-free).

Every entry of ``state[p]`` is a tensor or a plain value, as in any optimizer's state (the inner optimizer's state of
``p`` under ``"inner.<key>"``): it clones, deep-copies and saves with ``weights_only=True``. Checkpoints of the
earlier nested form (``state[pid]["inner"]`` a dict) load, converted, and resume exactly as the current form. A step
refused or skipped for non-finite gradients (``nonfinite="error"``/``"skip"``) leaves everything as it was, on the
first step (no state created) as on a later one.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from gradstep.core import registry
from gradstep.core.nonfinite import NonFiniteError

NAMES = ("lookahead", "ranger", "scout", "schedule_free_wrapper")


def make_params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((3, 4), (5,), ())]


def build(name: str, params: list[Tensor], **overrides: Any) -> Any:
    entry = registry.get(name)
    return entry(params, **{**entry.example, **overrides})


def drive(opt: Any, params: list[Tensor], steps: range) -> None:
    for t in steps:
        for p in params:
            p.grad = torch.sin(3 * p.detach() + t) + 0.1
        opt.step()


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), (sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


def nested_form(sd: dict[str, Any]) -> dict[str, Any]:
    """A state_dict as earlier releases wrote it: each parameter's inner state a nested dict under "inner"."""
    old = copy.deepcopy(sd)
    for entry in old["state"].values():
        inner = {k[len("inner.") :]: entry.pop(k) for k in [k for k in entry if k.startswith("inner.")]}
        if inner:
            entry["inner"] = inner
    return old


@pytest.mark.parametrize("name", NAMES)
def test_every_state_entry_is_a_tensor_or_a_plain_value(name: str) -> None:
    params = make_params()
    opt = build(name, params)
    drive(opt, params, range(4))
    inner_keys = 0
    for p in params:
        for key, value in opt.state[p].items():
            assert isinstance(value, (Tensor, int, float, bool, str, type(None))), (key, type(value))
            if isinstance(value, Tensor):
                value.clone()
        for key, value in opt.inner.state[p].items():
            assert opt.state[p][f"inner.{key}"] is value  # the inner optimizer's own tensor
            inner_keys += 1
    assert inner_keys > 0
    copied = copy.deepcopy(opt.state)
    assert_same(
        {id(p): dict(s) for p, s in opt.state.items()}, {id(p): dict(copied[q]) for p, q in zip(opt.state, copied)}
    )


@pytest.mark.parametrize("name", NAMES)
def test_weights_only_checkpoint_and_the_earlier_nested_form_resume_bitwise(name: str) -> None:
    straight = make_params()
    drive(build(name, straight), straight, range(8))
    source_params = make_params()
    source = build(name, source_params)
    drive(source, source_params, range(5))
    sd = source.state_dict()
    assert all(not isinstance(v, Mapping) for entry in sd["state"].values() for v in entry.values())
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    for form in ("current", "nested"):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        if form == "nested":
            saved = nested_form(saved)
            assert any("inner" in entry for entry in saved["state"].values())
        params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
        resumed = build(name, params)
        resumed.load_state_dict(saved)
        assert_same(resumed.state_dict()["state"], sd["state"])  # converted to the current form
        drive(resumed, params, range(5, 8))
        for want, got in zip(straight, params):
            assert torch.equal(want.detach(), got.detach()), form


def test_a_nested_entry_that_is_not_a_dict_is_refused_naming_it() -> None:
    params = make_params()
    opt = build("lookahead", params)
    drive(opt, params, range(2))
    sd = nested_form(opt.state_dict())
    sd["state"][0]["inner"] = torch.zeros(3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="inner state of parameter 0 is not a dict"):
        build("lookahead", make_params()).load_state_dict(sd)
    assert_same(opt.state_dict(), before)


def snapshot(opt: Any, params: list[Tensor]) -> Any:
    return copy.deepcopy(
        (
            opt.state_dict(),
            {i: dict(opt.state[p]) for i, p in enumerate(params) if p in opt.state},
            [p.detach() for p in params],
            opt.fast_steps,
        )
    )


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps_before", [0, 3], ids=["first_step", "later_step"])
def test_a_refused_or_skipped_step_leaves_the_wrapper_exactly_as_it_was(
    name: str, policy: str, steps_before: int
) -> None:
    params = make_params()
    opt = build(name, params, nonfinite=policy)
    drive(opt, params, range(steps_before))
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = math.nan  # type: ignore[index]
    if policy == "error":
        with pytest.raises(NonFiniteError):
            opt.step()
    else:
        opt.step()
    assert_same(snapshot(opt, params), before)
    if steps_before == 0:
        assert not any(opt.state.get(p) for p in params) and not any(opt.inner.state.get(p) for p in params)
    drive(opt, params, range(steps_before, steps_before + 2))  # and it steps on from there
    assert opt.fast_steps == steps_before + 2

"""Property-based tests (hypothesis) over every registered optimizer: bad input ends in a clear error or a valid
optimizer, and a refused call changes nothing.

Each generated case ends in one of: an error (``ValueError``/``TypeError``) that names the argument; a
:class:`~gradstep.NonFiniteError` that names the parameter; or a valid optimizer whose steps keep the parameters
finite. Cases cover the constructor, ``add_param_group``, ``set_hyper`` and ``from_config`` with generated values,
non-finite gradient elements at generated positions under every ``nonfinite`` policy, and corrupt, truncated and
foreign checkpoints. Runs are derandomized (the same cases in CI every time) and small (``max_examples``).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import gradstep
from gradstep.core import registry
from gradstep.core.nonfinite import NonFiniteError
from gradstep.core.registry import Entry, states_of

ENTRIES: list[Entry] = [e for e in registry.entries() if not e.capabilities.closure_required]
SPARSE_ONLY = {e.name for e in ENTRIES if getattr(e.capabilities, "sparse_only", False)}
FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
TRIED: Counter[tuple[str, str]] = Counter()  # (check, family) -> cases tried


def family(entry: Entry) -> str:
    return entry.cls.__module__.rsplit(".", 1)[-1]


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    lines = [f"{check:>14} {fam:<14} {n}" for (check, fam), n in sorted(TRIED.items())]
    print("\nfuzz cases tried (check, family, count):\n" + "\n".join(lines))


# --- helpers --------------------------------------------------------------------------------------------------------
def make_params(entry: Entry, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,)] if getattr(entry, "min_ndim", 0) < 2 else [(3, 4), (5, 2)]
    return [torch.nn.Parameter(0.3 * torch.randn(s, generator=g)) for s in shapes]


def required(entry: Entry) -> dict[str, Any]:
    return {k: entry.example[k] for k in entry.required_args if k in entry.example}


def build(entry: Entry, params: Any, **hypers: Any) -> Any:
    return entry(params, **{**required(entry), **entry.example, **hypers})


def gradient(p: Tensor, t: int) -> Tensor:
    return torch.sin(3 * p.detach() + t) + 0.3 * p.detach()


def set_grads(entry: Entry, params: list[Tensor], t: int) -> None:
    for p in params:
        g = gradient(p, t)
        p.grad = g.to_sparse() if entry.name in SPARSE_ONLY else g


def steps_stay_finite_or_name_a_parameter(entry: Entry, opt: Any, params: list[Tensor], steps: int = 3) -> None:
    """A valid optimizer: its steps keep the parameters finite, or (an accepted but absurd value such as lr=1e308
    overflowing them) the next step's non-finite gradient raises a NonFiniteError that names the parameter."""
    for t in range(steps + 1):
        set_grads(entry, params, t)
        try:
            opt.step()
        except NonFiniteError as exc:
            assert "param" in str(exc)
            return
        if t == steps - 1 and all(torch.isfinite(p).all() for p in params):
            return
    screened = "nonfinite" in (opt.param_groups[0] if opt.param_groups else {})
    assert not screened, f"{entry.name}: non-finite parameters and no NonFiniteError at the next step"


def groups_snapshot(opt: Any) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in g.items() if k != "params"} | {"n": len(g["params"])} for g in opt.param_groups]


def _plain(v: Any) -> Any:
    return ("tensor", v.tolist()) if isinstance(v, Tensor) else copy.deepcopy(v)


def state_snapshot(opt: Any, params: list[Tensor]) -> list[Any]:
    out = []
    for p in params:
        for s in states_of(opt, p):
            if not s:
                continue  # an empty entry (a defaultdict read) is no state
            out.append(_copied(s))
    return out


def _copied(v: Any) -> Any:
    # Wrappers show their inner optimizer's state of a parameter as a read-only mapping: copied as a dict.
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, Mapping):
        return {k: _copied(x) for k, x in v.items()}
    return copy.deepcopy(v)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.shape == b.shape
            and torch.equal(a.isnan(), b.isnan())
            and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# --- generated values -----------------------------------------------------------------------------------------------
SPECIAL = [-1.0, -1e-12, 0.0, 1e-300, 0.5, 1.0, 1.5, 2.0, 1e6, 1e30, math.inf, -math.inf, math.nan]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-3, max_value=3),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "x", "error", "coupled"]),
    st.lists(st.sampled_from(SPECIAL), min_size=0, max_size=3),
    st.tuples(st.sampled_from(SPECIAL), st.sampled_from(SPECIAL)),
    st.builds(
        lambda v, shape: torch.full(shape, v),
        st.sampled_from(SPECIAL),
        st.sampled_from([(), (1,), (1, 1), (2,), (0,)]),
    ),
)
entries = st.sampled_from(ENTRIES)


@st.composite
def entry_and_hyper(draw: Any) -> tuple[Entry, str, Any]:
    entry = draw(entries)
    names = sorted(k for k in entry.hyperparameters() if k not in ("params", "compiled"))
    return entry, draw(st.sampled_from(names)), draw(values)


# Entries whose hyperparameter checks are not gradstep's (their messages need not name the argument).
FOREIGN_CHECKS = {
    "optim_wrapper": "any torch optimizer inside, with torch's own checks and messages",
    "lbfgs": "LBFGS keeps torch's constructor checks and messages",
}


def clear_error(exc: BaseException, name: str, entry: Entry) -> bool:
    return name in str(exc) or name.split("_")[0] in str(exc) or entry.name in FOREIGN_CHECKS


# --- constructor, add_param_group, set_hyper, from_config -----------------------------------------------------------
@FUZZ
@given(entry_and_hyper())
def test_constructor_refuses_naming_the_argument_or_builds_a_working_optimizer(case: tuple[Entry, str, Any]) -> None:
    entry, name, value = case
    TRIED[("constructor", family(entry))] += 1
    params = make_params(entry)
    try:
        opt = build(entry, params, **{name: value})
    except (ValueError, TypeError) as exc:
        assert clear_error(exc, name, entry), f"{entry.name}({name}={value!r}): {exc}"
        return
    steps_stay_finite_or_name_a_parameter(entry, opt, params)


@FUZZ
@given(entry_and_hyper())
def test_refused_add_param_group_changes_nothing(case: tuple[Entry, str, Any]) -> None:
    entry, name, value = case
    TRIED[("add_param_group", family(entry))] += 1
    params = make_params(entry)
    opt = build(entry, params[:1])
    before = groups_snapshot(opt)
    try:
        opt.add_param_group({"params": params[1:], name: value})
    except (ValueError, TypeError) as exc:
        assert clear_error(exc, name, entry), f"{entry.name} add_param_group({name}={value!r}): {exc}"
        assert same(groups_snapshot(opt), before)
        return
    steps_stay_finite_or_name_a_parameter(entry, opt, params)


@FUZZ
@given(entry_and_hyper())
def test_refused_set_hyper_changes_nothing(case: tuple[Entry, str, Any]) -> None:
    entry, name, value = case
    TRIED[("set_hyper", family(entry))] += 1
    params = make_params(entry)
    opt = build(entry, [{"params": params[:1]}, {"params": params[1:]}]) if entry.name != "lbfgs" else None
    if opt is None:
        return
    before = groups_snapshot(opt)
    try:
        opt.set_hyper(name, value)
    except (ValueError, TypeError, KeyError) as exc:
        assert clear_error(exc, name, entry), f"{entry.name}.set_hyper({name}, {value!r}): {exc}"
        assert same(groups_snapshot(opt), before)
        return
    steps_stay_finite_or_name_a_parameter(entry, opt, params)


@FUZZ
@given(entries, st.sampled_from(["lr", "weight_decay", "eps", "momentum", "betas"]), values)
def test_from_config_refuses_or_builds(entry: Entry, name: str, value: Any) -> None:
    TRIED[("from_config", family(entry))] += 1
    if isinstance(value, Tensor):
        return  # not a literal
    text = "1e999" if value == math.inf else "-1e999" if value == -math.inf else repr(value)
    text = "float('nan')" if text == "nan" else text
    literal = {k: v for k, v in {**required(entry), **entry.example}.items() if k != name}
    spec = f"{entry.name}({', '.join(f'{k}={v!r}' for k, v in literal.items())}, {name}={text})"
    params = make_params(entry)
    try:
        opt = gradstep.from_config(spec, params)
    except (ValueError, TypeError) as exc:
        assert clear_error(exc, name, entry) or "literal" in str(exc), f"{spec}: {exc}"
        return
    steps_stay_finite_or_name_a_parameter(entry, opt, params)


def test_from_config_refuses_an_overflowing_literal() -> None:
    with pytest.raises(ValueError, match="lr"):
        gradstep.from_config("adamw(lr=1e999)", [torch.nn.Parameter(torch.zeros(2))])


# --- gradient faults under every policy -----------------------------------------------------------------------------
POLICIES = ("error", "skip", "zero", "revert", "ignore")
FAULT_ENTRIES = [e for e in ENTRIES if "nonfinite" in e.hyperparameters() and e.name not in SPARSE_ONLY]


@FUZZ
@given(
    st.sampled_from(FAULT_ENTRIES),
    st.sampled_from(POLICIES),
    st.integers(min_value=0, max_value=1),
    st.integers(min_value=0, max_value=11),
    st.sampled_from([math.nan, math.inf, -math.inf, 3e38]),
    st.booleans(),
)
def test_gradient_fault_follows_the_policy(
    entry: Entry, policy: str, which: int, position: int, fault: float, first_step: bool
) -> None:
    TRIED[("gradient_fault", family(entry))] += 1
    params = make_params(entry)
    try:
        opt = build(entry, params, nonfinite=policy)
    except ValueError as exc:
        assert "nonfinite" in str(exc)  # a policy this optimizer refuses (Frank-Wolfe: revert)
        return
    if not first_step:
        set_grads(entry, params, 0)
        opt.step()
    set_grads(entry, params, 1)
    grad = params[which].grad
    assert grad is not None
    grad.view(-1)[position % grad.numel()] = fault
    user_grads = [p.grad.clone() for p in params if p.grad is not None]
    before_params = [p.detach().clone() for p in params]
    before_state = state_snapshot(opt, params)
    skipped = getattr(opt, "skipped_steps", None)
    nonfinite = not math.isfinite(fault)
    if policy == "error" and nonfinite:
        with pytest.raises(NonFiniteError, match="param"):
            opt.step()
    else:
        opt.step()
    for p, g in zip(params, user_grads):
        assert torch.equal(p.grad.isnan(), g.isnan()) and torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    if nonfinite and policy in ("error", "skip"):
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_params))
        assert same(state_snapshot(opt, params), before_state), "a refused step changed the state"
        if policy == "skip" and skipped is not None:
            assert opt.skipped_steps == skipped + 1
    elif policy in ("zero", "revert") or (policy != "ignore" and not nonfinite):
        for p in params:
            assert torch.isfinite(p).all()


# --- checkpoints ----------------------------------------------------------------------------------------------------
def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for k in path[:-1]:
        tree = tree[k]
    return tree


MUTATIONS = ("delete", "replace", "truncate_state", "truncate_groups", "foreign")


@FUZZ
@given(entries, st.sampled_from(MUTATIONS), st.integers(min_value=0, max_value=10_000), values, entries)
def test_corrupt_truncated_or_foreign_checkpoint_is_refused_unchanged_or_works(
    entry: Entry, mutation: str, pick: int, value: Any, other: Entry
) -> None:
    TRIED[("checkpoint", family(entry))] += 1
    source_params = make_params(entry, seed=1)
    source = build(entry, source_params)
    for t in range(2):
        set_grads(entry, source_params, t)
        source.step()
    sd = copy.deepcopy(source.state_dict())
    if mutation == "foreign":
        foreign_params = make_params(other, seed=1)
        foreign = build(other, foreign_params)
        set_grads(other, foreign_params, 0)
        foreign.step()
        sd = copy.deepcopy(foreign.state_dict())
    elif mutation == "truncate_state":
        sd["state"] = dict(list(sd["state"].items())[: pick % (len(sd["state"]) + 1)])
    elif mutation == "truncate_groups":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    else:
        paths = [p for p in _paths(sd) if p[-1] != "params"]
        path = paths[pick % len(paths)]
        parent = _parent(sd, path)
        if mutation == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    params = make_params(entry)
    opt = build(entry, params)
    set_grads(entry, params, 0)
    opt.step()
    before_groups, before_state = groups_snapshot(opt), state_snapshot(opt, params)
    before_params = [p.detach().clone() for p in params]
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError, AttributeError) as exc:
        assert str(exc), f"{entry.name}: an empty error message"
        if type(exc) in (ValueError, TypeError):  # gradstep's checks: nothing written
            assert same(groups_snapshot(opt), before_groups) and same(state_snapshot(opt, params), before_state)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_params))
        return
    steps_stay_finite_or_name_a_parameter(entry, opt, params)

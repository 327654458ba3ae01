"""The registry: every optimizer by name, with what the tests, the docs and the command line need to know of it.

``create(name, params, **hypers)`` builds one; ``from_config`` builds one from a dict or a string such as
``"adamw(lr=3e-4, weight_decay=0.1)"``; ``available()`` lists the names. A *preset* is an entry that is an existing
class with other defaults (fastai's and GoMLX's configurations).
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .hypers import REQUIRED

__all__ = [
    "Capabilities",
    "Entry",
    "available",
    "create",
    "from_config",
    "get",
    "parse_spec",
    "register",
    "states_of",
]


@dataclass(frozen=True)
class Capabilities:
    """What an optimizer supports, measured on a real instance (see :meth:`Entry.capabilities`).

    Attributes:
        supports_complex: complex parameters are optimized (as pairs of reals).
        supports_sparse: sparse gradients are accepted (declared by the chain's transforms).
        sparse_only: dense gradients are refused (SparseAdam).
        closure_required: ``step()`` needs a closure (declared by the class: ``closure_required = True``).
        single_group: only one param group is accepted (declared by the class: ``single_group = True``).
        state_tensors: parameter-sized state tensors kept per parameter with the default hyperparameters.
        state_bytes_per_param: bytes of state per float32 parameter element.
        sharding: how the update reads a parameter: ``"elementwise"``, ``"per-tensor reduction"``, ``"whole-tensor"``
            or ``"whole-matrix"`` (a nonlinear function of the whole matrix, e.g. an orthogonalization: a sharded
            parameter's update is computed from the gathered matrix); ``"whole-model reduction"`` (sums over every
            parameter of every group, such as D-Adaptation's estimate: local partial sums all-reduced once per step);
            ``"unsharded"``: sharded (DTensor) parameters are refused.
        projects_params: every step ends by projecting *every* parameter onto a feasible set (a ball, a box), those
            without a gradient and with a zero lr included, so a step can move a parameter that has no gradient
            (declared by :attr:`Entry.projection`; the test matrix checks it against real steps).
    """

    supports_complex: bool
    supports_sparse: bool
    closure_required: bool
    state_tensors: int
    state_bytes_per_param: int
    sharding: str
    projects_params: bool = False
    sparse_only: bool = False
    single_group: bool = False


@dataclass(frozen=True)
class Entry:
    """One registered optimizer.

    Attributes:
        name: registry name (lower case).
        cls: the optimizer class.
        summary: one line.
        paper: the reference (authors, year, title, arXiv id).
        originals: the implementations it reproduces (and is tested against).
        preset: hyperparameter defaults that differ from the class's (presets only).
        example: non-default hyperparameters used by the tests and the examples.
        invalid: ``(hypers, argument name)`` pairs that must raise ``ValueError`` naming the argument.
        sharding: see :class:`Capabilities`.
        required: arguments without a default (besides a preset's ``REQUIRED`` ones); probes take them from
            ``example``.
        projection: for optimizers that project every parameter after each step (``Capabilities.projects_params``):
            a plain-torch reference of that projection, ``projection(param, group) -> projected copy`` for a
            parameter of ``group`` (a param group dict). ``None`` for the others.
        lr_sets_initial_step: ``lr`` only initialises per-element step sizes at a parameter's first step (Rprop, as
            torch's): changing it afterwards, by a scheduler, leaves the steps alone.
        min_ndim: parameters of fewer dimensions are refused (matrix optimizers: 2); the generic tests give such an
            optimizer tensors of at least this many dimensions.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    summary: str
    paper: str
    originals: tuple[str, ...] = ()
    preset: dict[str, Any] = field(default_factory=dict)
    example: dict[str, Any] = field(default_factory=dict)
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    sharding: str = "elementwise"
    required: tuple[str, ...] = ()
    projection: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None
    min_ndim: int = 0
    lr_sets_initial_step: bool = False

    @property
    def required_args(self) -> tuple[str, ...]:
        """Every argument a user must give: ``required`` plus the preset's ``REQUIRED`` values."""
        return tuple(dict.fromkeys(self.required + tuple(k for k, v in self.preset.items() if v is REQUIRED)))

    def __call__(self, params: Any, **hypers: Any) -> torch.optim.Optimizer:
        # Named here, by the preset's name: the class would name itself (Adam, not fastai_adam).
        missing = [k for k in self.required_args if k not in hypers]
        if missing:
            raise ValueError(f"{self.name} needs a value of {', '.join(missing)} (no default)")
        return self.cls(params, **{**self.preset, **hypers})

    def hyperparameters(self) -> dict[str, Any]:
        """The defaults of every hyperparameter (with the preset applied; ``REQUIRED`` where there is none)."""
        defaults = dict(self._probe().defaults)
        defaults.update({k: REQUIRED for k in self.required_args})
        return defaults

    def _probe(self) -> torch.optim.Optimizer:
        # Arguments without a default (fastai's lr, rai's q or epsilon) are probed with the example's values.
        given = {k: self.example.get(k, 1e-3) for k in self.required_args}
        return self([torch.nn.Parameter(torch.zeros(4, 4))], **given)

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        opt = self._probe()
        p = opt.param_groups[0]["params"][0]
        init = getattr(opt, "init_state", None)
        if init is not None:
            init()
        tensors = [v for s in states_of(opt, p) for v in s.values() if isinstance(v, Tensor) and v.numel() == p.numel()]
        supports_complex = bool(getattr(opt, "_supports_complex", lambda: False)())
        return Capabilities(
            supports_complex=supports_complex,
            supports_sparse=bool(getattr(opt, "_supports_sparse", lambda: False)()),
            closure_required=bool(getattr(self.cls, "closure_required", False)),
            state_tensors=len(tensors),
            state_bytes_per_param=sum(t.element_size() for t in tensors),
            sharding=self.sharding,
            projects_params=self.projection is not None,
            sparse_only=getattr(opt, "_sparse_gradients", lambda: "refused")() == "required",
            single_group=bool(getattr(self.cls, "single_group", False)),
        )


def states_of(opt: torch.optim.Optimizer, p: Tensor) -> list[dict[str, Any]]:
    """The state dicts kept for ``p`` by an optimizer and, for a wrapper, by the optimizers it wraps (``inner``)."""
    states = [opt.state[p]] if p in opt.state else []
    inner = getattr(opt, "inner", None)
    if isinstance(inner, torch.optim.Optimizer) and inner.state is not opt.state:
        states += states_of(inner, p)
    return states


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add an entry; a name can be registered once."""
    key = entry.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    _REGISTRY[key] = entry
    return entry


_PARTITION_PRESETS: dict[str, Entry] = {}
"""Optimizers made of several (``muon_adamw``): built from a model's parameters, so :func:`get`,
:func:`create` and :func:`from_config` know them, while :func:`available` and :func:`entries` (the generic test
matrix, which steps bare tensors) list the plain optimizers only."""


def register_partition_preset(entry: Entry) -> Entry:
    """Add a partition preset (:mod:`gradstep.routing` registers its own); a name can be registered once."""
    key = entry.name.lower()
    if key in _REGISTRY or key in _PARTITION_PRESETS:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    _PARTITION_PRESETS[key] = entry
    return entry


def available() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Entry:
    """The entry of ``name`` (case-insensitive); an unknown name raises ``ValueError`` listing the valid ones."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _PARTITION_PRESETS:
        return _PARTITION_PRESETS[key]
    known = available() + sorted(_PARTITION_PRESETS)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown optimizer {name!r}{hint}; available: {', '.join(known)}")


def create(name: str, params: Iterable[Any], **hypers: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Example::

        >>> import torch, gradstep
        >>> opt = gradstep.create("adamw", [torch.nn.Parameter(torch.zeros(2))], lr=3e-4)
        >>> type(opt).__name__, opt.defaults["weight_decay"]
        ('AdamW', 0.01)
    """
    return get(name)(params, **hypers)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"name"``, ``"name(k=v, ...)"`` or the command line's ``"name:k=v,..."`` into a name and literals."""
    text = spec.strip()
    colon_form = re.match(r"^\s*([A-Za-z_]\w*)\s*:(.*)$", text, re.DOTALL)
    # Errors are answered in the syntax the spec was written in: the command line's, or the config's.
    form = "name:key=value,..." if colon_form else "name(key=value, ...)"
    if colon_form:
        text = f"{colon_form.group(1)}({colon_form.group(2)})"
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"cannot parse optimizer spec {spec!r} ({exc.msg}): it must look like {form}") from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError(f"optimizer spec {spec!r} must look like {form}")
    hypers: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"optimizer spec {spec!r}: ** is not allowed")
        if kw.arg in hypers:
            raise ValueError(f"optimizer spec {spec!r}: {kw.arg} given twice")
        try:
            hypers[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"optimizer spec {spec!r}: the value of {kw.arg} is not a literal") from None
    return node.func.id, hypers


def from_config(config: str | dict[str, Any], params: Iterable[Any]) -> torch.optim.Optimizer:
    """Build an optimizer from ``"adamw(lr=3e-4, weight_decay=0.1)"`` or ``{"name": "adamw", "lr": 3e-4}``."""
    if isinstance(config, str):
        name, hypers = parse_spec(config)
    elif isinstance(config, dict):
        hypers = dict(config)
        name = hypers.pop("name", None) or hypers.pop("optimizer", None)
        if not isinstance(name, str):
            raise ValueError("an optimizer config dict needs a 'name' key")
    else:
        raise TypeError(f"an optimizer config is a str or a dict, got {type(config).__name__}")
    return create(name, params, **hypers)


def entries() -> list[Entry]:
    return [_REGISTRY[k] for k in available()]

"""The checks gradstep applies to an optimizer it wraps that is not a gradstep optimizer (a ``torch.optim`` one).

A gradstep optimizer checks its own hyperparameters and loads its state_dict through
:func:`gradstep.core.loading.validated_load`. A ``torch.optim`` optimizer does neither: it takes ``lr=inf``, loads a
NaN buffer or a negative ``lr``, and writes part of a bad state_dict before failing. A wrapper around one uses these
instead:

* :func:`hypers_of`: the hyperparameter checks of the optimizer's gradstep counterpart (the registry entry of the
  same class name: ``torch.optim.Adam`` is checked as ``gradstep.Adam``), restricted to the keys its groups hold;
  for a class without a counterpart, the checks of the hyperparameters whose meaning is the same everywhere
  (``lr``, ``weight_decay``, ``eps``, ``momentum``, ``betas``).
* :func:`supports_complex`: a gradstep optimizer answers for itself; a ``torch.optim`` class as torch's own tests
  declare it (``supports_complex`` of its ``OptimizerInfo`` in torch 2.13); any other class is taken not to, so
  complex parameters are refused at construction rather than stepped in a way nobody checked.
* :func:`check_state_dict`: everything a state_dict holds is checked before anything is written: group count and
  sizes, every checked hyperparameter, and each parameter's state against the layout a first step of the same class
  with the same options creates (found by stepping a copy of the class once on a tiny stand-in parameter): no key
  missing or extra, tensors of the parameter's shape and dtype class, finite, and a ``step`` that is a whole
  number >= 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, momentum_factor, non_negative
from ..core.loading import step_value

__all__ = ["TORCH_COMPLEX", "check_state_dict", "has_own_checks", "hypers_of", "supports_complex"]

TORCH_COMPLEX: frozenset[type[torch.optim.Optimizer]] = frozenset(
    getattr(torch.optim, name)
    for name in (
        "Adadelta",
        "Adagrad",
        "Adam",
        "Adamax",
        "AdamW",
        "ASGD",
        "LBFGS",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SGD",
    )
)
"""The ``torch.optim`` classes whose complex parameters torch steps as pairs of reals (torch's ``optim_db``)."""

_UNIVERSAL = (
    Hyper("lr", 1e-3, non_negative, "learning rate"),
    Hyper("weight_decay", 0.0, non_negative, "weight decay factor"),
    Hyper("eps", 1e-8, non_negative, "term added for numerical stability"),
    Hyper("momentum", 0.0, momentum_factor, "momentum factor"),
    Hyper("betas", (0.9, 0.999), beta_pair, "moment coefficients", scalar=False),
)

# torch's group flags for features gradstep does not implement: the wrapped torch optimizer does, so they pass.
_PROBE_OFF = ("fused", "capturable", "differentiable")
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)


def has_own_checks(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` checks its hyperparameters and state_dicts itself (gradstep's optimizers and wrappers)."""
    return type(opt).__module__.split(".")[0] == "gradstep"


_COUNTERPART_HYPERS: dict[str, dict[str, Hyper]] = {}


def _counterpart_hypers(cls: type[torch.optim.Optimizer]) -> dict[str, Hyper]:
    """The declared hyperparameters of ``cls``'s gradstep counterpart (none without one); cached by class name."""
    if cls.__name__ not in _COUNTERPART_HYPERS:
        from ..core.registry import get

        try:
            entry = get(cls.__name__)
        except ValueError:
            entry = None
        declared = None
        if entry is not None and entry.cls.__name__ == cls.__name__ and not entry.preset:
            declared = getattr(entry._probe(), "declared_hypers", None)
        _COUNTERPART_HYPERS[cls.__name__] = dict(declared()) if callable(declared) else {}
    return _COUNTERPART_HYPERS[cls.__name__]


def hypers_of(opt: torch.optim.Optimizer) -> dict[str, Hyper]:
    """The checks of ``opt``'s hyperparameters (see the module docstring)."""
    declared = getattr(opt, "declared_hypers", None)
    if callable(declared):
        return dict(declared())
    checks = {h.name: h for h in _UNIVERSAL}
    if type(opt).__module__.startswith("torch.optim"):
        checks.update(_counterpart_hypers(type(opt)))
    keys = set(opt.defaults).union(*(set(g) for g in opt.param_groups))
    return {name: hyper for name, hyper in checks.items() if name in keys}


def supports_complex(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` steps complex parameters (see the module docstring)."""
    supports = getattr(opt, "_supports_complex", None)
    if callable(supports):
        return bool(supports())
    return type(opt) in TORCH_COMPLEX


def check_groups(owner: str, opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Every checked hyperparameter of every group is valid; no parameter appears twice; complex ones supported."""
    hypers = hypers_of(opt)
    complex_ok = supports_complex(opt)
    for gi, group in enumerate(groups):
        for name, hyper in hypers.items():
            if name in group:
                try:
                    hyper.validate(group[name])
                except ValueError as exc:
                    raise ValueError(f"{owner}: param group {gi}: {exc}") from None
        seen: set[int] = set()
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(
                    f"{owner}: parameter {i} of param group {gi} appears twice in the group (it would be stepped twice)"
                )
            seen.add(id(p))
            if p.is_complex() and not complex_ok:
                raise TypeError(
                    f"{owner}: {type(opt).__name__} does not support complex parameters (parameter {i} of param "
                    f"group {gi}); optimize torch.view_as_real(param) instead"
                )


# --- state_dicts ------------------------------------------------------------------------------------------------
def check_state_dict(owner: str, opt: torch.optim.Optimizer, state_dict: Any) -> None:
    """Raise ``ValueError`` (or ``TypeError``) if ``opt.load_state_dict(state_dict)`` would load something wrong.

    Nothing is written: the caller loads the dict only when this returns.
    """
    where = f"{owner} cannot load this state_dict"
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{owner}.load_state_dict expects a dict, got {type(state_dict).__name__}")
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_state, Mapping) or not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"{where}: it has no 'state' dict and 'param_groups' list")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{where}: it has {len(saved_groups)} parameter groups, the optimizer {len(opt.param_groups)}")
    hypers = hypers_of(opt)
    owners: dict[Any, tuple[Tensor, Mapping[str, Any], str]] = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{where}: param group {gi} is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where}: param group {gi} has {len(saved['params'])} parameters, the optimizer's "
                f"{len(group['params'])}"
            )
        for name, hyper in hypers.items():
            if name in saved:
                try:
                    hyper.validate(saved[name])
                except ValueError as exc:
                    raise ValueError(f"{where}: param group {gi}: {exc}") from None
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            try:
                known = pid in owners
            except TypeError:
                raise ValueError(f"{where}: param group {gi} has an id that is not a key ({pid!r})") from None
            if known:
                raise ValueError(f"{where}: parameter id {pid!r} appears twice in its param groups")
            owners[pid] = (p, saved, f"param_groups[{gi}]['params'][{i}]")
    for pid, pstate in saved_state.items():
        if not isinstance(pstate, Mapping):
            raise ValueError(f"{where}: the state of parameter {pid!r} is not a dict")
        if pid in owners:
            # An empty entry is not "never stepped": torch creates a parameter's state only when it steps it, with
            # every key at once. An empty one is a dict with the keys removed (unless the layout has none).
            p, saved, name = owners[pid]
            _check_param_state(f"{where}: the state of {name}", type(opt), p, saved, pstate)


def _check_param_state(
    where: str, cls: type[torch.optim.Optimizer], p: Tensor, group: Mapping[str, Any], pstate: Mapping[str, Any]
) -> None:
    layout = _layout(cls, _options(cls, group), p.dim(), p.dtype)
    if layout is not None:
        # torch's SGD without momentum once saved momentum_buffer=None: a None it would not keep is harmless.
        extra = sorted(str(k) for k in set(pstate) - set(layout) if pstate[k] is not None)
        if extra:
            raise ValueError(f"{where} has {', '.join(extra)}, which {cls.__name__} does not keep")
        missing = sorted(set(layout) - set(pstate))
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)} (a state buffer {cls.__name__} needs)")
    for key, value in pstate.items():
        if key == "step":
            if step_value(value) is None:
                raise ValueError(f"{where}: step is {_describe(value)} (a whole number >= 0)")
            continue
        template = layout.get(key) if layout is not None else None
        if template is None:
            if isinstance(value, Tensor):
                _check_values(where, key, value)
            continue  # a layout not known (see _layout): only finiteness
        probe_shape, kind = template
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: {key} is {_describe(value)}, expected a tensor")
        shape = _mapped(probe_shape, p)
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {shape}")
        if _kind(value) != kind:
            raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected a {kind} tensor")
        _check_values(where, key, value)


def _check_values(where: str, key: str, value: Tensor) -> None:
    local = value.to_local() if hasattr(value, "to_local") else value
    if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
        raise ValueError(f"{where}: {key} holds NaN or infinite values")


def _kind(value: Tensor) -> str:
    if value.is_complex():
        return "complex"
    if value.is_floating_point():
        return "floating-point"
    return "bool" if value.dtype == torch.bool else "integer"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _options(cls: type[torch.optim.Optimizer], group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's values of ``cls``'s constructor arguments, with torch's fused/capturable/foreach paths off."""
    accepted = set(inspect.signature(cls).parameters) - {"params"}
    options = {key: group[key] for key in accepted & set(group)}
    for flag in (*_PROBE_OFF, "foreach"):
        if flag in options:
            options[flag] = False
    return options


def _layout_key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What of the options can change a state layout: flags, modes, and whether each number is zero (SGD keeps a
    momentum buffer only with momentum); not the numbers themselves, which schedulers change all the time."""

    def coarse(value: Any) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return value != 0
        if isinstance(value, Tensor):
            return bool(value.detach().ne(0).any()) if value.numel() else None
        if isinstance(value, (tuple, list)):
            return tuple(coarse(v) for v in value)
        return type(value).__name__

    return tuple(sorted((key, coarse(value)) for key, value in options.items()))


def _mapped(probe_shape: tuple[int, ...], p: Tensor) -> tuple[int, ...] | None:
    """The shape a state tensor of the stand-in (dims 2, 3, 5, ...) has for ``p``; None where it cannot be told."""
    dims = _PRIMES[: p.dim()]
    shape = []
    for d in probe_shape:
        if d == 1:
            shape.append(1)
        elif d in dims:
            shape.append(p.shape[dims.index(d)])
        elif d == math.prod(dims) and len(probe_shape) == 1:
            shape.append(p.numel())
        else:
            return None
    return tuple(shape)


_LAYOUTS: dict[tuple[Any, ...], dict[str, tuple[tuple[int, ...], str]] | None] = {}


def _layout(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], ndim: int, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """The state a first step of ``cls`` creates for a parameter: each key's (shape, kind) on the stand-in.

    Found by stepping ``cls`` once, with these options, on a stand-in of ``ndim`` dimensions 2, 3, 5, ... (distinct,
    so that each dimension of a state tensor tells which of the parameter's it is). None when the class cannot be
    stepped so (it needs other arguments, sparse gradients, a GPU): only the generic checks apply then.
    """
    key = (cls.__module__, cls.__qualname__, _layout_key(options), ndim, dtype)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _probe_layout(cls, options, ndim, dtype)
    return _LAYOUTS[key]


def _probe_layout(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], ndim: int, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], str]] | None:
    if ndim > len(_PRIMES):
        return None

    def closure() -> float:
        return 0.0

    try:
        probe = torch.nn.Parameter(torch.ones(_PRIMES[:ndim], dtype=dtype))
        opt = cls([probe], **options)
        probe.grad = torch.full_like(probe, 0.5)
        with torch.no_grad():
            opt.step(closure)
    except Exception:  # noqa: BLE001 - any failure only means the layout is not known
        return None
    state = opt.state.get(probe, {})
    if not all(isinstance(v, Tensor) for v in state.values()):
        return None  # numbers and lists (LBFGS's history): keys and shapes change from step to step
    return {key: (tuple(v.shape), _kind(v)) for key, v in state.items()}

"""Optimizer checkpoints: what a saved state_dict holds (``gradstep inspect``), and torch.optim to gradstep.

:func:`summarize` describes an optimizer state_dict: which optimizer saved it (gradstep writes a ``"gradstep"`` key;
for others the layout is recognised where it can be), its groups and hyperparameters, its state tensors with their
dtypes and memory. :func:`convert` turns a ``torch.optim.Adam``, ``AdamW`` or ``SGD`` state_dict into the one
``gradstep.Adam``, ``AdamW`` or ``SGD`` saves, so a run started with torch.optim can go on with gradstep::

    >>> import torch, gradstep
    >>> from gradstep.tools.checkpoint import convert
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.AdamW([w], lr=0.1)
    >>> w.grad = torch.ones(3); opt.step()
    >>> new = gradstep.AdamW([w])
    >>> new.load_state_dict(convert(opt.state_dict(), "adamw"))
    >>> new.param_groups[0]["lr"], new.param_groups[0]["weight_decay_mode"], new.global_step
    (0.1, 'decoupled', 1)

gradstep's ``load_state_dict`` refuses another optimizer's dict, because a group must hold every gradstep
hyperparameter and the state only gradstep's names. The conversion fills the hyperparameters torch does not have
with the gradstep optimizer's defaults, maps torch's (``decoupled_weight_decay`` becomes ``weight_decay_mode``),
drops torch's implementation switches (``capturable``, ``differentiable``, ``fused``) and keeps the state, whose
names are torch's own (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``). Keys it
does not know (an LR scheduler's ``initial_lr``) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["TARGETS", "ConversionError", "convert", "find_state_dicts", "is_state_dict", "summarize"]


class ConversionError(ValueError):
    """The state_dict cannot be converted to the optimizer asked for."""


TARGETS = ("adam", "adamw", "sgd")
"""What :func:`convert` can produce (registry names of gradstep.Adam, AdamW and SGD)."""

_TORCH_SWITCHES = {"capturable", "differentiable", "fused"}
"""torch.optim options that choose an implementation, not the math: gradstep has no use for them."""

_TORCH_HYPERS = {
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach"),
}
_STATE_KEYS = {
    "adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "sgd": {"step", "momentum_buffer"},
}


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` looks like an optimizer state_dict (``state`` and ``param_groups``)."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state"), dict)
        and isinstance(obj.get("param_groups"), list)
        and all(isinstance(g, dict) and "params" in g for g in obj["param_groups"])
    )


def find_state_dicts(obj: Any, path: str = "", depth: int = 3) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every optimizer state_dict in a checkpoint, with its key path (``""``: the checkpoint is one;
    ``"optimizer"``; ``"optimizer_states.0"`` as Lightning saves them)."""
    if is_state_dict(obj):
        yield path, obj
        return
    if depth == 0:
        return
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return
    for key, value in items:
        yield from find_state_dicts(value, f"{path}.{key}" if path else key, depth - 1)


def _family(sd: dict[str, Any]) -> str | None:
    """``"adam"`` or ``"sgd"`` for a torch.optim Adam/AdamW or SGD layout, else None."""
    groups = sd["param_groups"]
    keys = set().union(*(set(s) for s in sd["state"].values() if isinstance(s, dict))) if sd["state"] else set()
    if groups and all({"betas", "amsgrad"} <= set(g) for g in groups) and keys <= _STATE_KEYS["adam"]:
        return "adam"
    if groups and all({"momentum", "dampening", "nesterov"} <= set(g) for g in groups) and keys <= _STATE_KEYS["sgd"]:
        return "sgd"
    return None


def identify(sd: dict[str, Any]) -> str:
    """Who saved this state_dict: ``gradstep.AdamW``, ``torch.optim.Adam (or a look-alike)``, ..., or
    ``unknown``."""
    meta = sd.get("gradstep")
    if isinstance(meta, dict) and meta.get("optimizer"):
        return f"gradstep.{meta['optimizer']}"
    parts = sd.get("partition")
    if isinstance(parts, dict) and parts:
        return "gradstep.partition (" + ", ".join(f"{name}: {identify(_as_sd(m))}" for name, m in parts.items()) + ")"
    family = _family(sd)
    if family == "adam":
        decoupled = {g.get("decoupled_weight_decay") for g in sd["param_groups"]}
        if decoupled == {True}:
            return "torch.optim.AdamW"
        if decoupled == {False}:
            return "torch.optim.Adam"
        return "torch.optim.Adam or AdamW"
    if family == "sgd":
        return "torch.optim.SGD"
    return "unknown"


def _as_sd(part_meta: Any) -> dict[str, Any]:
    """A partition part's saved metadata in the shape :func:`identify` reads (it holds no groups or state)."""
    meta = dict(part_meta) if isinstance(part_meta, dict) else {}
    return {**meta, "param_groups": [], "state": {}}


def _routes(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """A partition's routes (parameter name, shape, part, group, why), as :meth:`Partition.state_dict` saves them."""
    rows = sd.get("partition_routes")
    if not isinstance(rows, list):
        return []
    keys = ("name", "shape", "part", "group", "reason")
    return [dict(zip(keys, row)) for row in rows if isinstance(row, (list, tuple)) and len(row) == len(keys)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summarize(sd: dict[str, Any]) -> dict[str, Any]:
    """What an optimizer state_dict holds, as a JSON-ready dict.

    Keys: ``optimizer`` (:func:`identify`), ``global_step`` (gradstep's, else None), ``groups`` (per group: the number
    of parameters and every hyperparameter), ``parameters`` and ``parameters_with_state``, ``state`` (per state
    name: the number of tensors, their dtypes and shapes, elements and bytes; for scalars also the range of values),
    ``state_bytes`` in all and ``bytes_per_param_element`` (state bytes over the elements of the parameters that have
    state; a parameter's size is taken as the largest of its state tensors), and ``routes``: for a partition
    (:func:`gradstep.partition`), each parameter's name, shape, part, group and why (else empty).
    """
    meta = sd.get("gradstep") if isinstance(sd.get("gradstep"), dict) else None
    groups = []
    for g in sd["param_groups"]:
        hypers = {k: _plain(v) for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({"params": len(g["params"]), "hyperparameters": hypers})
    state: dict[str, dict[str, Any]] = {}
    param_elements = 0
    total = 0
    with_state = 0
    for pstate in sd["state"].values():
        if not isinstance(pstate, dict):
            continue
        tensors = {k: v for k, v in pstate.items() if isinstance(v, Tensor)}
        if tensors:
            with_state += 1
            param_elements += max(v.numel() for v in tensors.values())
        for name, value in pstate.items():
            entry = state.setdefault(
                str(name), {"tensors": 0, "dtypes": [], "shapes": [], "elements": 0, "bytes": 0, "other": 0}
            )
            if not isinstance(value, Tensor):
                entry["other"] += 1
                continue
            entry["tensors"] += 1
            dtype = _dtype_name(value.dtype)
            if dtype not in entry["dtypes"]:
                entry["dtypes"].append(dtype)
            shape = list(value.shape)
            if shape not in entry["shapes"] and len(entry["shapes"]) < 8:
                entry["shapes"].append(shape)
            entry["elements"] += value.numel()
            nbytes = value.numel() * value.element_size()
            entry["bytes"] += nbytes
            total += nbytes
            if value.numel() == 1:
                v = float(value.reshape(()).item()) if not value.is_complex() else None
                if v is not None:
                    entry["min"] = min(entry.get("min", v), v)
                    entry["max"] = max(entry.get("max", v), v)
    return {
        "optimizer": identify(sd),
        "global_step": meta.get("global_step") if meta else None,
        "groups": groups,
        "parameters": sum(len(g["params"]) for g in sd["param_groups"]),
        "parameters_with_state": with_state,
        "state": state,
        "state_bytes": total,
        "bytes_per_param_element": total / param_elements if param_elements else None,
        "routes": _routes(sd),
    }


def _plain(value: Any) -> Any:
    """A hyperparameter value as JSON can hold it (tensors as numbers or lists, tuples as lists)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _target_defaults(target: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    from ..core.registry import get

    entry = get(target)
    probe = entry([torch.nn.Parameter(torch.zeros(1))])
    return type(probe), dict(probe.defaults)


def _hyper_value(value: Any) -> Any:
    # torch allows betas as tensors; gradstep validates plain floats there.
    if isinstance(value, (tuple, list)):
        return tuple(float(v) if isinstance(v, Tensor) else v for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def convert(sd: dict[str, Any], target: str) -> dict[str, Any]:
    """A copy of the torch.optim state_dict ``sd`` that ``gradstep.<target>`` loads; ``target`` is ``"adam"``,
    ``"adamw"`` or ``"sgd"``.

    * Adam and AdamW: the weight decay mode is the source's (torch saves ``decoupled_weight_decay`` since 2.6;
      without it, ``adamw`` means decoupled and ``adam`` coupled), so a torch.optim.Adam run converted to
      ``adamw`` keeps its coupled weight decay. The step counts and moments are kept as they are.
    * SGD: torch saves ``momentum_buffer=None`` when momentum is 0; those entries are dropped. torch.optim.SGD counts
      no steps, while gradstep's SGD must know that a first step happened (dampening does not apply to it): a
      parameter with a momentum buffer gets ``step = 1``.

    The tensors are shared with ``sd`` (``load_state_dict`` copies them). Raises :class:`ConversionError` when
    ``sd`` is not a state_dict of that torch optimizer.
    """
    target = target.lower()
    if target not in TARGETS:
        raise ConversionError(f"cannot convert to {target!r}: one of {', '.join(TARGETS)}")
    if not is_state_dict(sd):
        raise ConversionError("not an optimizer state_dict (it needs 'state' and 'param_groups')")
    meta = sd.get("gradstep")
    if isinstance(meta, dict):
        raise ConversionError(f"this is already a gradstep state_dict (of gradstep.{meta.get('optimizer')})")
    family = "sgd" if target == "sgd" else "adam"
    found = _family(sd)
    if found != family:
        what = {"adam": "torch.optim.Adam/AdamW", "sgd": "torch.optim.SGD"}
        saw = f"it looks like a {what[found]} state_dict" if found else f"it looks like {identify(sd)}"
        raise ConversionError(f"cannot convert to {target}: {saw}, not a {what[family]} one")
    cls, defaults = _target_defaults(target)

    groups = []
    for g in sd["param_groups"]:
        new = dict(defaults)
        for key, value in g.items():
            if key in _TORCH_SWITCHES or key == "decoupled_weight_decay":
                continue
            new[key] = _hyper_value(value) if key in _TORCH_HYPERS[family] else value
        if family == "adam":
            decoupled = g.get("decoupled_weight_decay")
            if decoupled is None:
                decoupled = target == "adamw"
            new["weight_decay_mode"] = "decoupled" if decoupled else "coupled"
        groups.append(new)

    state: dict[Any, dict[str, Any]] = {}
    steps: list[float] = []
    for pid, pstate in sd["state"].items():
        new_state = {k: v for k, v in pstate.items() if v is not None}
        if family == "sgd" and "momentum_buffer" in new_state and "step" not in new_state:
            new_state["step"] = torch.tensor(1.0)
        if "step" in new_state and not isinstance(new_state["step"], Tensor):
            new_state["step"] = torch.tensor(float(new_state["step"]))  # torch < 1.12 saved a number
        if "step" in new_state:
            steps.append(float(new_state["step"]))
        if new_state:
            state[pid] = new_state
    for i, g in enumerate(groups):
        if family == "adam" and g["amsgrad"]:
            for pid in g["params"]:
                if pid in state and "max_exp_avg_sq" not in state[pid]:
                    raise ConversionError(f"group {i} has amsgrad=True, but parameter {pid} has no max_exp_avg_sq")
    out = {key: value for key, value in sd.items() if key not in ("state", "param_groups")}
    out["state"] = state
    out["param_groups"] = groups
    out["gradstep"] = {"optimizer": cls.__name__, "global_step": int(max(steps, default=0))}
    return out

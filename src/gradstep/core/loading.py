"""Checked, all-or-nothing loading of a state_dict into a :class:`~gradstep.core.optimizer.ChainedOptimizer`.

:func:`validated_load` reads a state_dict and returns the state and param groups the optimizer would have after
loading it, without touching the optimizer; the optimizer assigns them only when every check passed, so a refused
dict leaves it exactly as it was. The checks:

* the saver: a dict saved by gradstep names its optimizer class, which must be this one; a dict without that entry
  (``torch.optim``'s, or one passed through ``torch.distributed.checkpoint``) is read as torch's layout;
* the groups: as many as this optimizer's, each as long; group keys the dict lacks (keys added after a dict was
  saved, or gradstep's own options in a ``torch.optim`` dict) take this optimizer's defaults, as torch fills them
  in; every value passes its hyperparameter's check; torch features gradstep does not implement (``fused``,
  ``capturable``, ``differentiable``) must be off;
* the state of each parameter: no entry this optimizer does not keep, none of those it keeps missing (a missing
  buffer would be re-zeroed at the next step), each a tensor of the parameter's layout (shape and dtype class of
  the buffer a first step would create), finite, and a ``step`` that is a whole number >= 0 (a Python number, as
  very old torch saved it, is converted). A coded part of a plain parameter may come in the layout of a full
  (gathered) FSDP2 state, one row per parameter row (int4's codes, the scales): the same elements, taken reshaped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import codecs
from .codecs import is_dtensor as _is_dtensor

if TYPE_CHECKING:
    from .optimizer import ChainedOptimizer

__all__ = ["STEP_DTYPE", "TORCH_ONLY_FLAGS", "validated_load", "step_value"]

STEP_DTYPE = torch.float64
"""dtype of the per-parameter ``step`` counters: exact to 2**53 steps (float32 stops counting at 2**24)."""

TORCH_ONLY_FLAGS = ("fused", "capturable", "differentiable")
"""torch.optim group flags for features gradstep does not implement: a dict may carry them only switched off."""


def step_value(value: Any) -> float | None:
    """The count held by a saved ``step`` (a number or a one-element real tensor), or ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        value = value.detach().to("cpu", torch.float64).item() if not _is_dtensor(value) else None
        if value is None:
            return None
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    x = float(value)
    if not math.isfinite(x) or x < 0 or x != math.floor(x):
        return None
    return x


def validated_load(
    opt: ChainedOptimizer, state_dict: Any
) -> tuple[defaultdict[Any, dict[str, Any]], list[dict[str, Any]], int]:
    """The ``(state, param_groups, global_step)`` that loading ``state_dict`` gives ``opt``; raises, writing nothing."""
    me = type(opt).__name__
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{me}.load_state_dict expects a dict, got {type(state_dict).__name__}")
    for key, kind in (("state", Mapping), ("param_groups", (list, tuple))):
        if not isinstance(state_dict.get(key), kind):
            raise ValueError(f"{me} cannot load this state_dict: its {key!r} entry is missing or not a {_kind(kind)}")
    meta = state_dict.get("gradstep")
    foreign = meta is None
    if meta is not None:
        if not isinstance(meta, Mapping):
            raise ValueError(f"{me} cannot load this state_dict: its 'gradstep' entry is not a dict")
        if meta.get("optimizer") != me or "wrapper" in meta:
            saver = meta.get("wrapper") or meta.get("optimizer")
            raise ValueError(f"this state_dict was saved by gradstep.{saver}, not by {me}")
    groups = _validated_groups(opt, state_dict["param_groups"])
    saved_ids = [list(saved["params"]) for saved in state_dict["param_groups"]]
    state = _validated_state(opt, state_dict["state"], groups, saved_ids, foreign)
    if meta is not None and "global_step" in meta:
        count = meta["global_step"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{me} cannot load this state_dict: gradstep.global_step is {count!r} (an int >= 0)")
        global_step = count
    else:
        # torch.distributed.checkpoint keeps only "state" and "param_groups": the count is the largest per-parameter
        # step count, the same number whenever some parameter had a gradient at every step.
        steps = [float(s["step"]) for s in state.values() if isinstance(s, dict) and "step" in s]
        global_step = int(max(steps, default=0.0))
    return state, groups, global_step


def _kind(kind: Any) -> str:
    return "dict" if kind is Mapping else "list"


def _validated_groups(opt: ChainedOptimizer, saved_groups: Any) -> list[dict[str, Any]]:
    me = type(opt).__name__
    current = opt.param_groups
    if len(saved_groups) != len(current):
        raise ValueError(
            f"{me} cannot load this state_dict: it has {len(saved_groups)} parameter groups, the optimizer "
            f"{len(current)}"
        )
    declared = opt.declared_hypers()
    groups: list[dict[str, Any]] = []
    for gi, (group, saved) in enumerate(zip(current, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{me} cannot load this state_dict: param group {gi} is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{me} cannot load this state_dict: param group {gi} has {len(saved['params'])} parameters, the "
                f"optimizer's {len(group['params'])}"
            )
        new = deepcopy({k: v for k, v in saved.items() if k != "params"})
        for flag in TORCH_ONLY_FLAGS:
            if new.get(flag):
                raise ValueError(
                    f"{me} cannot load this state_dict: param group {gi} has {flag}={new[flag]!r}; gradstep does not "
                    f"implement torch's {flag} option (see the documentation's list of torch features)"
                )
            if flag not in declared:
                new.pop(flag, None)
        if "decoupled_weight_decay" in new and "decoupled_weight_decay" not in declared:
            # torch's Adam/RAdam flag; gradstep says the same with weight_decay_mode.
            decoupled = new.pop("decoupled_weight_decay")
            if "weight_decay_mode" in declared and "weight_decay_mode" not in new:
                new["weight_decay_mode"] = "decoupled" if decoupled else "coupled"
        for name, hyper in declared.items():
            if name not in new:
                new[name] = deepcopy(opt.defaults.get(name, hyper.default))
            try:
                hyper.validate(new[name])
            except ValueError as exc:
                raise ValueError(f"{me} cannot load this state_dict: param group {gi}: {exc}") from None
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in new:
            new["param_names"] = group["param_names"]
        for t in opt.transforms:
            try:
                t.check_group(new)
            except ValueError as exc:
                raise ValueError(f"{me} cannot load this state_dict: param group {gi}: {exc}") from None
        groups.append(new)
    return groups


def _validated_state(
    opt: ChainedOptimizer,
    saved_state: Mapping[Any, Any],
    groups: list[dict[str, Any]],
    saved_ids: list[list[Any]],
    foreign: bool,
) -> defaultdict[Any, dict[str, Any]]:
    me = type(opt).__name__
    owner: dict[Any, tuple[Tensor, dict[str, Any], str]] = {}
    flat: list[Any] = []
    for gi, (group, ids) in enumerate(zip(opt.param_groups, saved_ids)):
        names = group.get("param_names")
        for i, (pid, p) in enumerate(zip(ids, group["params"])):
            flat.append(_hashable(pid))
            owner[flat[-1]] = (p, groups[gi], names[i] if names else f"param_groups[{gi}]['params'][{i}]")
    if len(set(flat)) != len(flat):
        raise ValueError(f"{me} cannot load this state_dict: a parameter id appears twice in its param groups")
    state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
    for pid, pstate in saved_state.items():
        if not isinstance(pstate, Mapping):
            raise ValueError(f"{me} cannot load this state_dict: the state of parameter {pid!r} is not a dict")
        if _hashable(pid) not in owner:
            state[pid] = deepcopy(dict(pstate))  # torch keeps state of ids it does not know
            continue
        p, group, name = owner[_hashable(pid)]
        state[p] = _validated_param_state(opt, p, group, name, pstate, foreign)
    return state


def _hashable(x: Any) -> Any:
    try:
        hash(x)
    except TypeError:
        return repr(x)
    return x


def _validated_param_state(
    opt: ChainedOptimizer, p: Tensor, group: dict[str, Any], name: str, pstate: Mapping[str, Any], foreign: bool
) -> dict[str, Any]:
    me = type(opt).__name__
    where = f"{me} cannot load this state_dict: the state of {name}"
    templates = opt.state_templates(group, p)
    expected = opt.expected_state_keys(group) | set(templates)
    extra = sorted(map(str, set(pstate) - expected))
    coded = group.get("state_codec", "fp32") != "fp32" or any(str(k).endswith(("_scale", "_ecc")) for k in pstate)
    hint = (
        " (a checkpoint saved with another state_codec, or one moved between FSDP2 and one process, converts with "
        "gradstep.convert_state_codec)"
        if coded
        else ""
    )
    if extra:
        raise ValueError(
            f"{where} has {', '.join(extra)}, which {me} does not keep (was it saved by another optimizer?){hint}"
        )
    new: dict[str, Any] = {}
    if not pstate:
        return new  # created by the next step, as for a parameter that never had a gradient
    missing = sorted(expected - set(pstate))
    if foreign and missing == ["step"]:
        # torch.optim.SGD does not count steps: a saved buffer means at least one step was taken.
        missing = []
        new["step"] = torch.tensor(1.0, dtype=STEP_DTYPE, device=p.device)
    if foreign:
        # torch.optim keeps no entry for a buffer that does not apply to the parameter (Adafactor's variance of a
        # matrix, row_var and col_var of a vector), where gradstep keeps the key with None.
        for key in [k for k in missing if k in templates and templates[k] is None]:
            new[key] = None
        missing = [k for k in missing if k not in new]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (a state buffer {me} needs){hint}")
    rows_layout = _coded_parts(opt, group, p) if not _is_dtensor(p) else {}
    for key, value in pstate.items():
        if key == "step":
            count = step_value(value)
            if count is None:
                raise ValueError(f"{where}: step is {_describe(value)} (a whole number >= 0)")
            new["step"] = torch.tensor(count, dtype=STEP_DTYPE, device=p.device)
            continue
        template = templates.get(key)
        if key in rows_layout and _in_shapes(value, template, rows_layout[key]):
            # A full (gathered) FSDP2 state lays int4's codes and the scales out one row per parameter row, where
            # one process keeps them flat: the same elements in the same order, so taken reshaped (the copy below
            # is the loaded tensor).
            value = value.reshape(template.shape)  # type: ignore[union-attr]
        try:
            new[key] = _checked_buffer(where, key, value, template, p)
        except ValueError as exc:
            raise ValueError(f"{exc}{hint}") from None
    if group.get("state_codec", "fp32") != "fp32":
        # Coded parts are read bit by bit: a part of another dtype would decode to garbage, not to a cast value.
        for key, template in templates.items():
            if isinstance(template, Tensor) and template.dtype != new[key].dtype:
                if template.dtype in _CODED_DTYPES or new[key].dtype in _CODED_DTYPES:
                    raise ValueError(
                        f"{where}: {key} has dtype {new[key].dtype}, expected {template.dtype} "
                        f"(state_codec={group['state_codec']!r}; gradstep.convert_state_codec converts a checkpoint "
                        "saved with another codec)"
                    )
    return new


def _coded_parts(opt: ChainedOptimizer, group: dict[str, Any], p: Tensor) -> dict[str, list[tuple[int, ...]]]:
    """The coded parts of a plain parameter ``p`` that a full FSDP2 state lays out otherwise: their FSDP2 shapes."""
    codec = group.get("state_codec", "fp32")
    if codec not in codecs.BLOCK_SIZES:
        return {}
    view = torch.view_as_real(p) if p.is_complex() else p
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for key, _ in opt._coded_buffers(group, view, opt._state_dtype(group, p)):
        shapes.update((k, v[1:]) for k, v in codecs._part_shapes(codec, key, tuple(view.shape)).items() if v[1:])
    return shapes


def _in_shapes(value: Any, template: Any, shapes: list[tuple[int, ...]]) -> bool:
    """A plain tensor of ``template``'s dtype in one of ``shapes``."""
    return (
        isinstance(value, Tensor)
        and isinstance(template, Tensor)
        and not _is_dtensor(value)
        and value.dtype == template.dtype
        and tuple(value.shape) in shapes
    )


_CODED_DTYPES = tuple(
    d for d in (torch.bfloat16, torch.uint8, torch.int8, getattr(torch, "float8_e4m3fn", None)) if d is not None
)


def _checked_buffer(where: str, key: str, value: Any, template: Any, p: Tensor) -> Any:
    if not isinstance(template, Tensor):
        if template is None and value is not None:
            raise ValueError(
                f"{where}: {key} is {_describe(value)}, but {key} does not apply to a parameter of shape "
                f"{tuple(p.shape)} (expected None)"
            )
        if isinstance(value, Tensor) or type(value) is not type(template):
            raise ValueError(f"{where}: {key} is {_describe(value)}, expected a {type(template).__name__}")
        return deepcopy(value)
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: {key} is {_describe(value)}, expected a tensor of shape {tuple(template.shape)}")
    if value.is_sparse and not template.is_sparse:
        value = value.to_dense()  # torch.optim.SGD's momentum buffer of sparse gradients: the same values, dense
    if tuple(value.shape) != tuple(template.shape):
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(template.shape)}")
    if (
        value.is_floating_point() != template.is_floating_point()
        or value.is_complex()
        or (not value.is_floating_point() and value.dtype != template.dtype)
    ):
        raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected {template.dtype}")
    local = value.to_local() if _is_dtensor(value) else value  # type: ignore[attr-defined]
    if local.is_floating_point() and local.element_size() == 1:
        local = local.float()  # float8 codes: isfinite has no kernel for them
    if local.is_floating_point() and not bool(torch.isfinite(local).all()):
        raise ValueError(f"{where}: {key} holds NaN or infinite values")
    if _is_dtensor(value):
        return value.detach().clone()
    return value.detach().to(device=p.device, copy=True)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"

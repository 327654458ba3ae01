"""The state machinery of wrappers that keep per-parameter state beside their inner optimizer's.

:class:`StatefulWrapper` is what Lookahead, Scout and the schedule-free wrapper share and any such wrapper can build
on: the wrapper's own tensors per parameter (``state[p]``), the inner optimizer's state of the parameter under
``"inner.<key>"`` (the inner optimizer's own tensors, refreshed by every step and load of the wrapper), a step counter
(``state[p]["fast_steps"]``), validated settings, and one torch-style state_dict that merges the wrapper's state with
the inner optimizer's, with every check on loading done before anything is modified. The algorithm (what the own
tensors are and how a step changes them) is the subclass's.

Every entry of ``state[p]`` is a tensor or a plain value, as in every optimizer's state: it clones, deep-copies and
saves like them. The state_dict holds the same keys per parameter id (``"inner.exp_avg"``, ...), the inner
optimizer's ``"param_groups"`` and a ``"gradstep"`` entry with the settings. That is what
``torch.distributed.checkpoint`` carries, flattened or not: DCP keeps per-parameter state only, and its flattened form
loads only the keys the live state lists, which is why the live state lists the inner optimizer's keys too. State
dicts of earlier releases (the inner optimizer's state of a parameter as a nested dict under ``"inner"``, or its whole
state_dict under a top-level ``"inner"``) load too, converted.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from copy import deepcopy
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import WrapperBase, copy_tensors

__all__ = ["FAST_STEPS", "INNER", "INNER_PREFIX", "StatefulWrapper"]

INNER = "inner"
"""State key of the inner optimizer's state of a parameter as a nested dict (state dicts of earlier releases)."""
INNER_PREFIX = "inner."
"""Prefix of the state keys that hold the inner optimizer's state of a parameter (``"inner.exp_avg"``)."""
FAST_STEPS = "fast_steps"
"""State key of the step counter :attr:`StatefulWrapper.fast_steps` (a 0-d int64 tensor, the same for every
parameter)."""


def _flat_inner(state: Mapping[str, Any], prefix: str = INNER_PREFIX) -> dict[str, Any]:
    """The inner optimizer's state of a parameter under prefixed keys (a nested dict's keys joined with ".")."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(_flat_inner(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nested_inner(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The inner optimizer's state of a parameter from its ``"inner.*"`` keys (the inverse of :func:`_flat_inner`)."""
    nested: dict[str, Any] = {}
    for key, value in entry.items():
        if not (isinstance(key, str) and key.startswith(INNER_PREFIX)):
            continue
        *path, last = key[len(INNER_PREFIX) :].split(".")
        at = nested
        for part in path:
            at = at.setdefault(part, {})
            if not isinstance(at, dict):
                raise ValueError(f"the inner state key {key!r} nests under a value that is not a dict")
        at[last] = value
    return nested


def _is_inner_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(INNER_PREFIX)


def _is_linked(key: Any) -> bool:
    """A key a wrapper's live state shows besides its own tensors (the counter, the inner optimizer's state)."""
    return key in (INNER, FAST_STEPS) or _is_inner_key(key)


def _mergeable(inner_sd: Any, groups: list[dict[str, Any]]) -> dict[Any, dict[str, Any]] | None:
    """The inner optimizer's per-parameter state, when its state_dict is laid out as torch's with the wrapper's
    parameter ids (it is for every torch.optim and gradstep optimizer); None otherwise."""
    if not isinstance(inner_sd, dict) or not isinstance(inner_sd.get("state"), dict):
        return None
    inner_groups = inner_sd.get("param_groups")
    if not isinstance(inner_groups, list) or [g.get("params") for g in inner_groups] != [g["params"] for g in groups]:
        return None
    known = {pid for g in groups for pid in g["params"]}
    state = inner_sd["state"]
    if not set(state) <= known or not all(isinstance(v, dict) for v in state.values()):
        return None
    return state


def _saved_count(value: Any) -> int | None:
    """A saved ``fast_steps`` (a 0-d tensor, or an int) as an int; None when it is not a count."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        number = float(value.reshape(()).item())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    else:
        return None
    return int(number) if number >= 0 and number == int(number) else None


class StatefulWrapper(WrapperBase):
    """A wrapper with per-parameter state of its own beside the inner optimizer's, saved as one torch-style state_dict.

    Subclasses call :meth:`_setup` in their constructor, declare their settings' checks in ``_SETTING_CHECKS`` (each
    returns a problem or None) and name their own state keys in :meth:`_state_keys` and :meth:`_required_keys`. A
    parameter's state is created by the subclass, which then calls :meth:`_link` to add the inner optimizer's entries
    (``"inner.<key>"``) and the shared ``"fast_steps"`` counter to it, and calls :meth:`_relink` after each step;
    a refused or skipped step is undone with :meth:`_forget_state_since`.
    """

    _PICKLED: tuple[str, ...] = ("_inner", "state", "_settings", "_counters", "_steps_tensor")
    _SETTING_CHECKS: ClassVar[Mapping[str, Callable[[Any], str | None]]] = {}

    def _setup(self, inner: torch.optim.Optimizer, settings: dict[str, Any]) -> None:
        """Validate ``settings``, attach ``inner`` with an empty state, and check every parameter."""
        self._settings = {name: self._validated(name, value) for name, value in settings.items()}
        self._attach(inner, state=defaultdict(dict))
        self._counters = {"fast_steps": 0}
        self._steps_tensor = torch.zeros((), dtype=torch.int64)  # state[p]["fast_steps"] of every parameter
        for p in self._all_params():
            self._check_param(p)

    @classmethod
    def _validated(cls, name: str, value: Any) -> Any:
        problem = cls._SETTING_CHECKS[name](value)
        if problem is not None:
            raise ValueError(f"Invalid {name}: {value!r} ({problem})")
        return tuple(value) if isinstance(value, list) else value  # a state_dict saves tuples as lists

    @property
    def fast_steps(self) -> int:
        """Steps taken (by the inner optimizer) since construction or ``clear_state``; saved in the state_dict."""
        return self._counters["fast_steps"]

    def _set_fast_steps(self, count: int) -> None:
        self._counters["fast_steps"] = count
        self._steps_tensor.fill_(count)

    # --- what a subclass declares ----------------------------------------------------------------------------------
    def _check_param(self, p: Tensor) -> None:
        """Refuse a parameter this wrapper cannot handle (raise ``TypeError``)."""

    def _state_keys(self, settings: Mapping[str, Any]) -> set[str]:
        """Every key of the wrapper's own tensors a parameter's state may hold under these settings."""
        return set()

    def _required_keys(self) -> set[str]:
        """The keys of the wrapper's own tensors every tracked parameter's state holds."""
        return set()

    def _link(self, p: Tensor, state: dict[str, Any]) -> None:
        """Add the entries a tracked parameter's state shows besides the wrapper's own tensors: the step counter and
        the inner optimizer's state of ``p`` (its own tensors, under ``"inner.<key>"``)."""
        state[FAST_STEPS] = self._steps_tensor
        inner = self._inner.state.get(p)
        fresh = _flat_inner(inner) if isinstance(inner, Mapping) else {}
        for key in [k for k in state if isinstance(k, str) and k.startswith(INNER_PREFIX) and k not in fresh]:
            del state[key]
        state.update(fresh)

    def _with_state(self) -> set[int]:
        """The ids of the parameters that have state now (for :meth:`_forget_state_since`)."""
        return {id(k) for k, v in self.state.items() if isinstance(k, Tensor) and v}

    def _forget_state_since(self, had_state: set[int]) -> None:
        """Undo what a refused or skipped step created: the state of the parameters that had none before (their
        first-step copies), and the empty entries the inner optimizer's state got by being read (a defaultdict)."""
        for key in [k for k in self.state if isinstance(k, Tensor) and id(k) not in had_state]:
            del self.state[key]
        inner_state = self._inner.state
        for key in [k for k, v in inner_state.items() if isinstance(v, Mapping) and not v]:
            del inner_state[key]

    def _relink(self) -> None:
        """Refresh every tracked parameter's ``"inner.*"`` entries (after the inner optimizer stepped or loaded).

        A parameter whose inner state holds the same objects under the same keys as at its last refresh (the usual
        case: optimizers update their tensors in place) is skipped: one tuple comparison instead of the dict work.
        """
        seen: dict[int, tuple[Any, ...]] = self.__dict__.setdefault("_linked", {})  # not pickled: rebuilt on use
        inner_state = self._inner.state
        for p, state in self.state.items():
            if not isinstance(p, Tensor) or not state:
                continue
            inner = inner_state.get(p)
            signature = (id(state), tuple(inner), tuple(map(id, inner.values()))) if inner else (id(state),)
            if seen.get(id(p)) != signature:
                self._link(p, state)
                seen[id(p)] = signature

    # --- checkpoints --------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "optimizer": type(self).__name__,
            "inner": type(self._inner).__name__,
            "fast_steps": self._counters["fast_steps"],
            **{name: list(v) if isinstance(v, tuple) else v for name, v in self._settings.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """The state of the wrapper and of the inner optimizer, as one torch-style state_dict (see the class docstring).

        Keys: ``"state"`` (per parameter id: the wrapper's tensors, ``"fast_steps"`` and the inner optimizer's state
        of that parameter under ``"inner.<key>"``), ``"param_groups"`` (the inner optimizer's, as torch packs them) and
        ``"gradstep"`` (which wrapper saved it, the inner optimizer's class, ``fast_steps``, the settings, and what
        else the inner optimizer's state_dict held: gradstep's ``global_step``). An inner optimizer whose state_dict is
        not laid out as torch's is kept whole under a top-level ``"inner"`` instead (the earlier layout), which
        ``torch.distributed.checkpoint`` cannot carry.
        """
        # The hooks run around the whole merged dict (torch's own state_dict would run them on the partial one).
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        hooks = (self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks)
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            packed = torch.optim.Optimizer.state_dict(self)  # the wrapper's state by parameter id, the shared groups
        finally:
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = hooks
        sd = self._merged_state_dict(packed)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _merged_state_dict(self, packed: dict[str, Any]) -> dict[str, Any]:
        # Entries a hook put in .state under other keys than parameters (torch allows it) are kept as they are.
        own = {
            pid: {k: v for k, v in s.items() if not _is_linked(k)} if isinstance(s, dict) else s
            for pid, s in packed["state"].items()
        }
        inner_sd = self._inner.state_dict()
        meta = self._meta()
        inner_state = _mergeable(inner_sd, packed["param_groups"])
        if inner_state is None:
            return {"state": own, "param_groups": packed["param_groups"], "inner": inner_sd, "gradstep": meta}
        state: dict[Any, dict[str, Any]] = {}
        for pid in [*own, *(pid for pid in inner_state if pid not in own)]:
            if not isinstance(own.get(pid, {}), dict):
                state[pid] = own[pid]
                continue
            entry = dict(own.get(pid, {}))
            if inner_state.get(pid):
                entry.update(_flat_inner(inner_state[pid]))
            if entry:  # every parameter with state carries the counter: DCP keeps nothing but per-parameter state
                entry[FAST_STEPS] = torch.tensor(self._counters["fast_steps"], dtype=torch.int64)
            state[pid] = entry
        meta["inner_extra"] = {k: v for k, v in inner_sd.items() if k not in ("state", "param_groups")}
        return {"state": state, "param_groups": packed["param_groups"], "gradstep": meta}

    def _refusal(self, saved_by: str | None, wrapper_like: bool) -> ValueError:
        me = type(self).__name__
        hint = "" if wrapper_like else " (an optimizer's own state_dict loads with wrapper.inner.load_state_dict)"
        return ValueError(f"this state_dict was saved by {saved_by or 'another optimizer'}, not by {me}{hint}")

    def _check_loadable(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], int, dict[Any, dict[str, Any]], dict[str, Any]]:
        """Validate a state_dict before anything is modified.

        Returns the settings to restore, ``fast_steps``, the wrapper's own state per parameter id and the inner
        optimizer's state_dict. Three layouts load: this wrapper's ``state_dict()``; the same through
        ``torch.distributed.checkpoint`` (no ``"gradstep"`` entry; parameter ids are names; when flattened, a key the
        checkpoint lacks comes back as an empty dict); and the earlier layout (a top-level ``"inner"``).
        """
        me = type(self).__name__
        if not isinstance(state_dict.get("state"), dict) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(f"{me} cannot load this state_dict: it has no 'state' dict and 'param_groups' list")
        entries: dict[Any, Any] = state_dict["state"]
        earlier = "inner" in state_dict
        counted = any(isinstance(e, dict) and FAST_STEPS in e for e in entries.values())
        found = state_dict.get("gradstep")
        meta: dict[str, Any] | None = found if isinstance(found, dict) else None
        if meta is not None:
            if meta.get("optimizer") != me:
                raise self._refusal(meta.get("optimizer"), earlier or counted)
            if meta.get("inner") != type(self._inner).__name__:
                raise ValueError(
                    f"this {me} state_dict wraps a {meta.get('inner')}, but this {me} wraps a "
                    f"{type(self._inner).__name__}"
                )
            settings = {name: self._validated(name, meta[name]) for name in self._settings if name in meta}
            meta_steps = meta.get("fast_steps")
            if _saved_count(meta_steps) is None or isinstance(meta_steps, Tensor):
                raise ValueError(f"{me} cannot load this state_dict: its fast_steps is {meta_steps!r}")
        elif earlier or not counted:
            # Without "gradstep" (dropped by torch.distributed.checkpoint) the per-parameter counters mark a wrapper's
            # state: the earlier layout always had "gradstep", and a dict without counters is another optimizer's.
            raise self._refusal(None, False)
        else:
            settings, meta_steps = {}, None
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        own_keys = self._state_keys({**self._settings, **settings})
        allowed = own_keys if earlier else own_keys | {INNER, FAST_STEPS}  # and "inner.*" keys (not earlier)
        required = self._required_keys()
        own: dict[Any, dict[str, Any]] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        counts: set[int] = set()
        for pid, entry in entries.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{me} cannot load this state_dict: the state of parameter {pid} is not a dict")
            # An empty dict stands for a key the checkpoint lacks (DCP's flattened form rebuilds every live key).
            entry = {k: v for k, v in entry.items() if not (isinstance(v, dict) and not v)}
            extra = sorted(k for k in set(entry) - allowed if earlier or not _is_inner_key(k))
            if extra:
                raise ValueError(
                    f"{me} cannot load this state_dict: state of parameter {pid} has {', '.join(map(str, extra))}, "
                    f"which {me} does not keep"
                )
            mine = {k: v for k, v in entry.items() if k in own_keys}
            missing = sorted(required - set(mine))
            inner_entry = self._inner_entry(pid, entry)
            if missing and (mine or inner_entry):  # a parameter the inner optimizer stepped has them all
                raise ValueError(
                    f"{me} cannot load this state_dict: state of parameter {pid} lacks {', '.join(missing)} "
                    f"(was it saved by another wrapper?)"
                )
            if inner_entry:
                inner_state[pid] = inner_entry
            if FAST_STEPS in entry:
                count = _saved_count(entry[FAST_STEPS])
                if count is None:
                    raise ValueError(
                        f"{me} cannot load this state_dict: the fast_steps of parameter {pid} is {entry[FAST_STEPS]!r}"
                    )
                counts.add(count)
            own[pid] = mine
        self._check_own_tensors(own, saved_groups)
        if meta_steps is not None:
            counts.add(int(meta_steps))
        if len(counts) > 1:
            raise ValueError(f"{me} cannot load this state_dict: it holds different fast_steps {sorted(counts)}")
        if earlier:
            inner_sd = state_dict["inner"]
        else:
            extra_entries = meta.get("inner_extra") if meta is not None else None
            inner_sd = {
                **(extra_entries if isinstance(extra_entries, dict) else {}),
                "state": inner_state,
                "param_groups": saved_groups,
            }
        return settings, counts.pop() if counts else 0, own, inner_sd

    def _inner_entry(self, pid: Any, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The inner optimizer's state of a parameter in a saved entry: its ``"inner.*"`` keys, or the nested dict of
        earlier releases under ``"inner"`` (converted: both forms load)."""
        nested = entry.get(INNER, {})
        if not isinstance(nested, dict):
            raise ValueError(
                f"{type(self).__name__} cannot load this state_dict: the inner state of parameter {pid} is not a dict"
            )
        try:
            return {**nested, **_nested_inner(entry)}
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__} cannot load this state_dict: parameter {pid}: {exc}") from None

    def _check_own_tensors(self, own: dict[Any, dict[str, Any]], saved_groups: list[dict[str, Any]]) -> None:
        """Each of the wrapper's own entries is a finite floating-point tensor shaped like its parameter."""
        me = type(self).__name__
        params = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for pid, entries in own.items():
            param = params.get(pid)
            for key, value in entries.items():
                where = f"{me} cannot load this state_dict: {key} of parameter {pid}"
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise ValueError(f"{where} is not a floating-point tensor")
                if param is not None and tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
                local = value.to_local() if hasattr(value, "to_local") else value
                if not bool(torch.isfinite(local).all()):
                    raise ValueError(f"{where} holds NaN or infinite values")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by the same wrapper class around the same inner optimizer class.

        Also takes it back from ``torch.distributed.checkpoint`` (flattened or not) and in the earlier layout. A
        state_dict of another optimizer (the inner optimizer's alone included) raises ``ValueError`` before anything is
        modified. State tensors are copied (the source keeps its own) and keep their saved dtype; the counter and the
        settings (``k``, ``alpha``, ...) are restored, as torch restores hyperparameters (the settings only when the
        ``"gradstep"`` entry is there).
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        settings, fast_steps, own, inner_sd = self._check_loadable(state_dict)
        self._inner.load_state_dict(copy_tensors(inner_sd))
        id_map = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for pid, pstate in own.items():
            param = id_map.get(pid)
            if param is None:
                state[pid] = deepcopy(pstate)
                continue
            state[param] = {
                k: v.detach().to(device=param.device, copy=True) if isinstance(v, Tensor) else deepcopy(v)
                for k, v in pstate.items()
            }
            if state[param]:
                self._link(param, state[param])
        self.state = state
        self._settings.update(settings)
        self._set_fast_steps(fast_steps)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        inner = repr(self._inner).replace("\n", "\n    ")
        return f"{type(self).__name__}({settings},\n    inner={inner})"

r"""Lookahead and Scout: slow weights that the fast ones are pulled back to every k steps; fastai's ``ranger``.

**Lookahead** (Zhang, Lucas, Hinton & Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back",
arXiv:1907.08610). The parameters are the *fast* weights :math:`\theta`; every step is a step of the inner optimizer
on them. The wrapper keeps *slow* weights :math:`\phi` (a copy of the parameters) and ends every k-th step with

.. math::
    \phi \leftarrow \phi + \alpha\,(\theta - \phi),\qquad \theta \leftarrow \phi .

**Scout** (holocron's variant; no paper). The rate of each synchronisation is :math:`r = \max(1 - c, \alpha)`, where
the *update coherence* c is read from the k updates of the period, :math:`U_i = \theta_i - \theta_{i-1}`
(:math:`\theta_0` is the value after the previous synchronisation). Element by element,

.. math::
    s = \sqrt{\tfrac{1}{k-1} \textstyle\sum_i (U_i - \bar U)^2},\qquad d = \max_i |U_i - \bar U|,

each parameter contributes the mean of :math:`s/d` over its elements, and c is the average over parameters.
holocron's Scout turns c into NaN as soon as one element has :math:`d = 0` (equal updates, e.g. an element that does not
move, or ``k = 1``), and a NaN rate freezes the model at its slow weights (spec H.10). Here such elements are left out
of their parameter's mean, a parameter with no element left is left out of the average, and with nothing left
(``k = 1``, or no element whose updates vary) the rate is :math:`\alpha`, as for Lookahead.

**Pullback momentum** (pytorch_optimizer's ``pullback_momentum``). At a synchronisation with rate r, the inner
optimizer's momentum buffers b (the state keys listed in ``momentum_keys``) are zeroed (``"reset"``) or pulled back
like the weights (``"pullback"``): :math:`b \leftarrow \beta + r\,(b - \beta)`, :math:`\beta \leftarrow b`, with slow
buffers β that start at zero.

**ranger** (fastai's recipe; Wright, 2019): fastai's RAdam (Liu et al., 2020, "On the Variance of the Adaptive
Learning Rate and Beyond", arXiv:1908.03265) inside Lookahead(k=6, alpha=0.5).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import REQUIRED, one_of, unit_interval_closed
from ..core.ops import FOREACH
from ..core.reductions import tensor_sums
from ..core.registry import Entry, create, register
from .optim_wrapper import WrapperBase, copy_tensors

__all__ = ["SLOW_COPY_MODES", "PULLBACK_MODES", "Lookahead", "Scout", "ranger"]

SLOW_COPY_MODES = ("first_step", "construction")
PULLBACK_MODES = ("none", "reset", "pullback")
SLOW = "slow_param"
"""State key of a parameter's slow copy."""
INNER = "inner"
"""State key of the inner optimizer's state of the parameter (a live view; a nested dict in the state_dict)."""
FAST_STEPS = "fast_steps"
"""State key of the step counter :attr:`Lookahead.fast_steps` (a 0-d int64 tensor, the same for every parameter)."""

_HALF = (torch.float16, torch.bfloat16)


def _positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be an int >= 1"
    return None


def _str_sequence(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        return "must be a tuple of state keys (str)"
    return None


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "k": _positive_int,
    "alpha": unit_interval_closed,
    "slow_copy": one_of(*SLOW_COPY_MODES),
    "pullback_momentum": one_of(*PULLBACK_MODES),
    "momentum_keys": _str_sequence,
}


def _validated(name: str, value: Any) -> Any:
    problem = _CHECKS[name](value)
    if problem is not None:
        raise ValueError(f"Invalid {name}: {value!r} ({problem})")
    return tuple(value) if name == "momentum_keys" else value


def _build_inner(owner: str, optimizer: Any, inner: Any, hypers: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer to wrap: ``optimizer`` itself, or one built on the parameters ``optimizer`` by ``inner``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if inner is not None or hypers:
            given = (["inner"] if inner is not None else []) + sorted(hypers)
            raise TypeError(
                f"{owner}(optimizer, ...) wraps a built optimizer and takes no inner= or inner hyperparameters "
                f"(got {', '.join(given)}); give them to the optimizer itself"
            )
        return optimizer
    if inner is None:
        raise TypeError(
            f"{owner} needs a torch.optim.Optimizer to wrap, or parameters and inner= (a registry name such as "
            f"'radam', or an optimizer class); got {type(optimizer).__name__} and no inner"
        )
    if isinstance(inner, str):
        return create(inner, optimizer, **hypers)
    if callable(inner):
        built = inner(optimizer, **hypers)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"inner= built a {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    raise TypeError(f"inner= must be a registry name or an optimizer class, got {inner!r}")


def _slow_dtype(p: Tensor) -> torch.dtype:
    # Half-precision parameters keep fp32 slow weights: the slow average accumulates differences smaller than a
    # bf16 ulp, as gradstep's optimizers keep fp32 state for them.
    return torch.float32 if p.dtype in _HALF else p.dtype


def _as_dtype(xs: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    return [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(xs, like)]


class _InnerState(Mapping[str, Any]):
    """The inner optimizer's state of one parameter, read live (``wrapper.state[p]["inner"]``).

    It shows ``wrapper.inner.state[p]`` as it is now, also after the inner optimizer's state was replaced. The wrapper's
    state lists it (and ``fast_steps``) so that it names every key the state_dict holds for the parameter:
    ``torch.distributed.checkpoint``'s flattened optimizer state dicts load only the keys the live optimizer's state
    has (``StateDictOptions(flatten_optimizer_state_dict=True)``).
    """

    __slots__ = ("_optimizer", "_param")

    def __init__(self, optimizer: torch.optim.Optimizer, param: Tensor) -> None:
        self._optimizer = optimizer
        self._param = param

    def _now(self) -> Mapping[str, Any]:
        state = self._optimizer.state.get(self._param)
        return state if isinstance(state, Mapping) else {}

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __repr__(self) -> str:
        return f"inner state {dict(self._now())!r}"


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


class Lookahead(WrapperBase):
    r"""Lookahead around any ``torch.optim`` or gradstep optimizer (see the module docstring for the math).

    Two ways to build one::

        Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=6, alpha=0.5)  # wrap a built optimizer
        Lookahead(model.parameters(), inner="radam", lr=1e-3, k=6)               # build the inner one here

    The second form builds ``inner`` (a registry name, or an optimizer class or factory) on the parameters with the
    remaining keyword arguments; it is what the registry entries ``lookahead``, ``scout`` and ``ranger`` use.

    The wrapper is itself a ``torch.optim.Optimizer`` that shares the inner optimizer's ``param_groups``: LR
    schedulers, ``torch.amp.GradScaler`` (``scaler.step(wrapper)``), ``set_hyper``/``freeze_to`` and
    ``add_param_group`` on the wrapper reach the inner optimizer. ``step(closure)`` passes the closure on.

    Args:
        optimizer: the optimizer to wrap, or the parameters (with ``inner``).
        k: synchronise every k steps (holocron's ``sync_period``, fastai's and pytorch_optimizer's ``k``).
        alpha: the slow weights' step towards the fast ones (holocron's ``sync_rate``); in [0, 1].
        slow_copy: when the slow weights are copied from the parameters: ``"first_step"`` (fastai; the default) just
            before the first step in which a parameter has a gradient, so that weights loaded into the model after
            the optimizer was built are the starting point; ``"construction"`` (holocron, pytorch_optimizer) when the
            wrapper is built (and when a group is added).
        pullback_momentum: ``"none"``, ``"reset"`` or ``"pullback"`` (pytorch_optimizer's option; see the module
            docstring).
        momentum_keys: the inner optimizer's state keys treated as momentum by ``pullback_momentum``
            (pytorch_optimizer: ``("momentum_buffer",)`` only).
        inner: with parameters as the first argument, the optimizer to build (registry name, class or factory).
        **inner_hypers: its hyperparameters.

    State: each parameter's slow copy (``state[p]["slow_param"]``, fp32 for half-precision parameters; with
    ``"pullback"`` also ``"slow_<key>"`` for each momentum buffer) lives in the wrapper's ``state``, with the step
    counter (``state[p]["fast_steps"]``, a 0-d int64 tensor shared by all parameters; :attr:`fast_steps` as an int)
    and a live view of the inner optimizer's state of ``p`` (``state[p]["inner"]``, which is
    ``wrapper.inner.state[p]``). A parameter that never had a gradient gets no state and is never synchronised (with
    ``"first_step"``).

    ``state_dict()`` is laid out as torch's: ``"state"`` holds, per parameter, the wrapper's tensors,
    ``"fast_steps"`` and the inner optimizer's state under ``"inner"`` (a nested dict; ``"inner.exp_avg"`` once
    flattened); ``"param_groups"`` are the inner optimizer's groups. ``torch.distributed.checkpoint``
    (``get/set_optimizer_state_dict``, flattened or not) keeps all of it; the extra ``"gradstep"`` entry it drops
    holds which wrapper saved the dict and the settings (``k``, ``alpha``, ...), which a load without it leaves as
    they are. The state_dict loads with ``torch.load(weights_only=True)``; state dicts of the earlier layout (the
    inner optimizer's whole state_dict under a top-level ``"inner"``) load too.

    When the inner optimizer is a gradstep optimizer that skipped a step (``nonfinite="skip"``), the step is not
    counted either.

    ==================  ==================  ================  ======================
    gradstep            holocron            fastai            pytorch_optimizer
    ==================  ==================  ================  ======================
    ``k``               ``sync_period``     ``k``             ``k``
    ``alpha``           ``sync_rate``       ``alpha``         ``alpha``
    ``slow_copy``       ``"construction"``  ``"first_step"``  ``"construction"``
    ``inner``           ``base_optimizer``  ``opt``           ``optimizer``
    :attr:`fast_steps`  ``fast_steps``      ``count``         ``group["counter"]``
    ==================  ==================  ================  ======================

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.wrappers.Lookahead(torch.optim.SGD([w], lr=0.1), k=6, alpha=0.5)
        >>> for _ in range(6):
        ...     w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()
        >>> w.detach()  # halfway from the start to the fast weights p0 - 0.6 g (spec H.9's check values)
        tensor([0.9700, 1.9400, 2.9100])
    """

    _PICKLED: tuple[str, ...] = ("_inner", "state", "_settings", "_counters", "_steps_tensor")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Iterable[Any],
        k: int = 6,
        alpha: float = 0.5,
        *,
        slow_copy: str = "first_step",
        pullback_momentum: str = "none",
        momentum_keys: Sequence[str] = ("momentum_buffer", "exp_avg"),
        inner: str | Callable[..., torch.optim.Optimizer] | None = None,
        **inner_hypers: Any,
    ) -> None:
        settings = {
            "k": k,
            "alpha": alpha,
            "slow_copy": slow_copy,
            "pullback_momentum": pullback_momentum,
            "momentum_keys": momentum_keys,
        }
        self._settings = {name: _validated(name, value) for name, value in settings.items()}
        self._attach(_build_inner(type(self).__name__, optimizer, inner, inner_hypers), state=defaultdict(dict))
        self._counters = {"fast_steps": 0}
        self._steps_tensor = torch.zeros((), dtype=torch.int64)  # state[p]["fast_steps"] of every parameter
        for p in self._all_params():
            self._check_param(p)
        if self.slow_copy == "construction":
            self._track(self._all_params())

    # --- settings -----------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._settings["k"]

    @k.setter
    def k(self, value: int) -> None:
        self._settings["k"] = _validated("k", value)

    @property
    def alpha(self) -> float:
        return self._settings["alpha"]

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._settings["alpha"] = _validated("alpha", value)

    @property
    def slow_copy(self) -> str:
        return self._settings["slow_copy"]

    @property
    def pullback_momentum(self) -> str:
        return self._settings["pullback_momentum"]

    @property
    def momentum_keys(self) -> tuple[str, ...]:
        return self._settings["momentum_keys"]

    @property
    def fast_steps(self) -> int:
        """Steps taken (by the inner optimizer) since construction or :meth:`clear_state`; saved in the state_dict."""
        return self._counters["fast_steps"]

    # --- state --------------------------------------------------------------------------------------------------
    def _check_param(self, p: Tensor) -> None:
        """Refuse a parameter this wrapper cannot handle (raise ``TypeError``)."""

    def _state_keys(self, momentum_keys: Sequence[str]) -> set[str]:
        """Every key of the wrapper's own tensors a parameter's state may hold."""
        return {SLOW} | {f"slow_{key}" for key in momentum_keys}

    def _required_keys(self) -> set[str]:
        """The keys of the wrapper's own tensors every tracked parameter's state holds."""
        return {SLOW}

    def _init_param_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state[SLOW] = p.detach().to(dtype=_slow_dtype(p), copy=True)

    def _link(self, p: Tensor, state: dict[str, Any]) -> None:
        """Add the entries a tracked parameter's state shows besides the wrapper's own tensors."""
        state[INNER] = _InnerState(self._inner, p)
        state[FAST_STEPS] = self._steps_tensor

    def _set_fast_steps(self, count: int) -> None:
        self._counters["fast_steps"] = count
        self._steps_tensor.fill_(count)

    @torch.no_grad()
    def _track(self, params: Iterable[Tensor]) -> None:
        """Give each parameter without a slow copy its state, from its current value."""
        for p in params:
            if SLOW not in self.state.get(p, ()):
                state = self.state[p]
                self._init_param_state(p, state)
                self._link(p, state)

    def _tracked(self) -> list[tuple[Tensor, dict[str, Any]]]:
        tracked = []
        for p in self._all_params():
            state = self.state.get(p)
            if state and SLOW in state:
                tracked.append((p, state))
        return tracked

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state (the inner optimizer's too, where it can) as a first step would."""
        init = getattr(self._inner, "init_state", None)
        if callable(init):
            init()
        self._track(self._all_params())
        if self.pullback_momentum == "pullback":
            self._add_slow_buffers(self._tracked())

    def clear_state(self) -> None:
        """Forget all state: the inner optimizer's, the slow weights and the step counter."""
        self._clear_inner_state()
        self.state = defaultdict(dict)
        self._set_fast_steps(0)
        if self.slow_copy == "construction":
            self._track(self._all_params())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(self.param_groups)
        self._inner.add_param_group(param_group)
        added = [p for group in self.param_groups[n:] for p in group["params"]]
        try:
            for p in added:
                self._check_param(p)
        except TypeError:
            del self.param_groups[n:]
            raise
        if self.slow_copy == "construction":
            self._track(added)

    # --- step ---------------------------------------------------------------------------------------------------
    def _params_with_grad(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.grad is not None]

    def _tracking_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        # With a closure the gradients exist only once the inner optimizer has called it, and every torch optimizer
        # calls it before it writes a parameter: that is when the first-step copies are taken.
        done = False

        def tracking() -> Any:
            nonlocal done
            loss = closure()
            if not done:
                done = True
                self._track(self._params_with_grad())
            return loss

        return tracking

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step of the inner optimizer (with ``closure``, if given); every k-th step ends with a sync."""
        if self.slow_copy == "first_step":
            self._track(self._params_with_grad())
            if closure is not None and any(SLOW not in self.state.get(p, ()) for p in self._all_params()):
                closure = self._tracking_closure(closure)
        skipped = getattr(self._inner, "skipped_steps", None)
        loss = self._inner.step(closure) if closure is not None else self._inner.step()
        if skipped is not None and getattr(self._inner, "skipped_steps", None) != skipped:
            return loss  # the inner optimizer skipped this step (non-finite gradients): nothing happened
        self._after_inner_step()
        return loss

    @torch.no_grad()
    def _after_inner_step(self) -> None:
        self._set_fast_steps(self._counters["fast_steps"] + 1)
        syncing = self._counters["fast_steps"] % self.k == 0
        pullback = self.pullback_momentum == "pullback"
        if syncing or self._observes or pullback:
            tracked = self._tracked()
            if pullback:
                self._add_slow_buffers(tracked)
            self._observe(tracked)
            if syncing:
                self._sync(tracked)

    _observes = False
    """Whether :meth:`_observe` needs every step (Scout)."""

    def _observe(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        """Record this step's update (Scout)."""

    def _sync_rate(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> float:
        return float(self.alpha)

    def _sync(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        rate = self._sync_rate(tracked)
        if not tracked:
            return
        fast = [p.detach() for p, _ in tracked]
        slow = [state[SLOW] for _, state in tracked]
        if rate > 0:  # as holocron: a zero rate only resets the fast weights
            torch._foreach_add_(slow, torch._foreach_sub(_as_dtype(fast, slow), slow), alpha=rate)
        FOREACH.copy_(fast, slow)
        self._pull_back(tracked, rate)

    def _add_slow_buffers(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        """Give each inner momentum buffer that exists its slow buffer ("pullback"), zero until the next sync.

        Created when the buffer appears, not at the first sync, so that a parameter's state lists every key it will
        hold from then on: DCP's flattened state dicts load only the keys the live state has.
        """
        for p, state in tracked:
            inner_state = self._inner.state.get(p)
            if not inner_state:
                continue
            for key in self.momentum_keys:
                buf = inner_state.get(key)
                if isinstance(buf, Tensor) and f"slow_{key}" not in state:
                    state[f"slow_{key}"] = torch.zeros_like(buf)

    def _pull_back(self, tracked: list[tuple[Tensor, dict[str, Any]]], rate: float) -> None:
        mode = self.pullback_momentum
        if mode == "none":
            return
        for p, state in tracked:
            inner_state = self._inner.state.get(p)
            if not inner_state:
                continue
            for key in self.momentum_keys:
                buf = inner_state.get(key)
                if not isinstance(buf, Tensor):
                    continue
                if mode == "reset":
                    buf.zero_()
                    continue
                slow_key = f"slow_{key}"
                if slow_key not in state:
                    state[slow_key] = torch.zeros_like(buf)
                buf.lerp_(state[slow_key], 1.0 - rate)  # pytorch_optimizer's form of slow + rate * (buf - slow)
                state[slow_key].copy_(buf)

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

        Keys: ``"state"`` (per parameter id: the wrapper's tensors, ``"fast_steps"`` and ``"inner"``, the inner
        optimizer's state of that parameter), ``"param_groups"`` (the inner optimizer's, as torch packs them) and
        ``"gradstep"`` (which wrapper saved it, the inner optimizer's class, ``fast_steps``, the settings, and what
        else the inner optimizer's state_dict held: gradstep's ``global_step``). An inner optimizer whose state_dict is
        not laid out as torch's is kept whole under a top-level ``"inner"`` instead (the earlier layout), which
        ``torch.distributed.checkpoint`` cannot carry.
        """
        packed = torch.optim.Optimizer.state_dict(self)  # the wrapper's state by parameter id, and the shared groups
        own = {pid: {k: v for k, v in s.items() if k not in (INNER, FAST_STEPS)} for pid, s in packed["state"].items()}
        inner_sd = self._inner.state_dict()
        meta = self._meta()
        inner_state = _mergeable(inner_sd, packed["param_groups"])
        if inner_state is None:
            return {"state": own, "param_groups": packed["param_groups"], "inner": inner_sd, "gradstep": meta}
        state: dict[Any, dict[str, Any]] = {}
        for pid in [*own, *(pid for pid in inner_state if pid not in own)]:
            entry = dict(own.get(pid, {}))
            if inner_state.get(pid):
                entry[INNER] = inner_state[pid]
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
            settings = {name: _validated(name, meta[name]) for name in self._settings if name in meta}
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
        own_keys = self._state_keys(settings.get("momentum_keys", self.momentum_keys))
        allowed = own_keys if earlier else own_keys | {INNER, FAST_STEPS}
        required = self._required_keys()
        own: dict[Any, dict[str, Any]] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        counts: set[int] = set()
        for pid, entry in entries.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{me} cannot load this state_dict: the state of parameter {pid} is not a dict")
            # An empty dict stands for a key the checkpoint lacks (DCP's flattened form rebuilds every live key).
            entry = {k: v for k, v in entry.items() if not (isinstance(v, dict) and not v)}
            extra = sorted(set(entry) - allowed)
            if extra:
                raise ValueError(
                    f"{me} cannot load this state_dict: state of parameter {pid} has {', '.join(map(str, extra))}, "
                    f"which {me} does not keep"
                )
            mine = {k: v for k, v in entry.items() if k in own_keys}
            missing = sorted(required - set(mine))
            if mine and missing:
                raise ValueError(
                    f"{me} cannot load this state_dict: state of parameter {pid} lacks {', '.join(missing)} "
                    f"(was it saved by another wrapper?)"
                )
            if INNER in entry:
                if not isinstance(entry[INNER], dict):
                    raise ValueError(
                        f"{me} cannot load this state_dict: the inner state of parameter {pid} is not a dict"
                    )
                inner_state[pid] = entry[INNER]
            if FAST_STEPS in entry:
                count = _saved_count(entry[FAST_STEPS])
                if count is None:
                    raise ValueError(
                        f"{me} cannot load this state_dict: the fast_steps of parameter {pid} is {entry[FAST_STEPS]!r}"
                    )
                counts.add(count)
            own[pid] = mine
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


_STATS = ("prev_param", "delta_mean", "delta_m2", "delta_max", "delta_min")


class Scout(Lookahead):
    r"""holocron's Scout: Lookahead whose rate is :math:`\max(1 - c, \alpha)`, c the update coherence of the period.

    Same arguments as :class:`Lookahead`; see the module docstring for the math. Unlike holocron's, it never turns
    the rate into NaN (which freezes the model at its slow weights): elements whose k updates are all equal are left
    out of the coherence, and with no element left the rate is ``alpha``. The coherence of the last synchronisation
    is :attr:`last_coherence` (``None`` when nothing was left).

    Instead of holocron's k+1 snapshots per parameter, the statistics are kept as running values (Welford's mean and
    sum of squared deviations, and the largest and smallest update) in the state: ``prev_param``, ``delta_mean``,
    ``delta_m2``, ``delta_max``, ``delta_min``, besides ``slow_param``. Complex parameters are refused.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.wrappers.Scout(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
        >>> for g in ([0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.5, 0.5, 0.1]):
        ...     w.grad = torch.tensor(g); _ = opt.step()
        >>> round(opt.last_coherence, 3), w.detach()  # spec H.10's check values
        (0.964, tensor([0.9550, 1.9600, 2.9700]))
    """

    _PICKLED = Lookahead._PICKLED + ("last_coherence",)
    _observes = True
    last_coherence: float | None = None

    def _check_param(self, p: Tensor) -> None:
        if p.is_complex():
            raise TypeError("Scout does not support complex parameters")

    def _supports_complex(self) -> bool:
        return False

    def _state_keys(self, momentum_keys: Sequence[str]) -> set[str]:
        return super()._state_keys(momentum_keys) | set(_STATS)

    def _required_keys(self) -> set[str]:
        return super()._required_keys() | set(_STATS)

    def _init_param_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_param_state(p, state)
        state["prev_param"] = state[SLOW].clone()
        # Zeros are the exact statistics of the steps of this period taken before the parameter was tracked: the
        # inner optimizer did not move it then (it had no gradient).
        for name in _STATS[1:]:
            state[name] = torch.zeros_like(state[SLOW])

    def _observe(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        if not tracked:
            return
        prev, mean, m2, high, low = ([state[name] for _, state in tracked] for name in _STATS)
        current = _as_dtype([p.detach() for p, _ in tracked], prev)
        update = torch._foreach_sub(current, prev)
        i = (self._counters["fast_steps"] - 1) % self.k + 1  # this update's number in the period
        if i == 1:
            FOREACH.copy_(mean, update)
            torch._foreach_zero_(m2)
            FOREACH.copy_(high, update)
            FOREACH.copy_(low, update)
        else:  # Welford's update of the mean and of the sum of squared deviations
            delta = torch._foreach_sub(update, mean)
            torch._foreach_add_(mean, delta, alpha=1.0 / i)
            torch._foreach_addcmul_(m2, delta, torch._foreach_sub(update, mean))
            torch._foreach_maximum_(high, update)
            torch._foreach_minimum_(low, update)
        FOREACH.copy_(prev, current)

    def _sync_rate(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> float:
        k = self.k
        coherence = None
        ratios, varying = [], []
        for p, state in tracked if k > 1 else ():
            if p.numel() == 0:
                continue
            mean = state["delta_mean"]
            dev = torch.maximum(state["delta_max"] - mean, mean - state["delta_min"])  # max_i |U_i - mean|
            std = (state["delta_m2"] / (k - 1)).clamp_min(0).sqrt()
            varies = dev > 0
            # float64 before summing: the sums of many ratios, and exact counts whatever the parameter's dtype.
            ratios.append(torch.where(varies, std / dev, 0.0).to(torch.float64))
            varying.append(varies.to(torch.float64))
        if ratios:
            # Per-parameter sums through the shared reductions: for sharded (DTensor) state, local sums all-reduced
            # over the mesh, so every rank gets the whole parameter's sums as plain tensors.
            total, count = tensor_sums(ratios), tensor_sums(varying)
            kept = count > 0
            if bool(kept.any()):
                # The mean over the parameters with an element that varies (the others are masked out, not indexed).
                means = torch.where(kept, total / count.clamp_min(1.0), 0.0)
                coherence = float(means.sum() / kept.sum())
        self.last_coherence = coherence
        return float(self.alpha) if coherence is None else max(1.0 - coherence, float(self.alpha))

    def _sync(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        super()._sync(tracked)
        if tracked:  # the next period's updates are measured from the synchronised parameters
            prev = [state["prev_param"] for _, state in tracked]
            FOREACH.copy_(prev, _as_dtype([p.detach() for p, _ in tracked], prev))


def ranger(
    params: Any,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.95, 0.99),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    k: int = 6,
    alpha: float = 0.5,
    **options: Any,
) -> Lookahead:
    """fastai's ``ranger``: fastai's RAdam (decoupled weight decay, torch-style eps) inside ``Lookahead(k, alpha)``.

    fastai's names map to these: ``mom`` is ``betas[0]``, ``sqr_mom`` is ``betas[1]``, ``wd`` is ``weight_decay``;
    ``beta`` (SAdam) and ``weight_decay_mode="coupled"`` (fastai's ``decouple_wd=False``) pass to RAdam, and
    ``slow_copy``/``pullback_momentum`` to Lookahead. The slow weights are copied at the first step, as fastai does.
    Registered as ``ranger``.
    """
    return Lookahead(
        params,
        k,
        alpha,
        inner="fastai_radam",
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        **options,
    )


_LOOKAHEAD = "Zhang, Lucas, Hinton & Ba, 2019. Lookahead Optimizer: k steps forward, 1 step back. arXiv:1907.08610"
_ORIGINALS = (
    "holocron.optim.Lookahead (pylocron 0.3.0)",
    "fastai.optimizer (2.8.12) Lookahead",
    "pytorch_optimizer (4.1.0) Lookahead",
)
_WRAPPER_INVALID: tuple[tuple[dict[str, Any], str], ...] = (
    ({"k": 0}, "k"),
    ({"alpha": 1.5}, "alpha"),
    ({"slow_copy": "never"}, "slow_copy"),
    ({"pullback_momentum": "yes"}, "pullback_momentum"),
)
for _entry in (
    Entry(
        "lookahead",
        Lookahead,
        "Lookahead (k=6, alpha=0.5) around any registered optimizer: inner='sgd' unless given",
        _LOOKAHEAD,
        _ORIGINALS,
        preset={"inner": "sgd"},
        example={"lr": 5e-2, "momentum": 0.9, "weight_decay": 0.01},
        invalid=_WRAPPER_INVALID + (({"lr": -1.0}, "lr"),),
    ),
    Entry(
        "scout",
        Scout,
        "holocron's Scout: Lookahead whose rate grows as the period's updates lose coherence; inner='sgd' unless given",
        _LOOKAHEAD + " (Scout: holocron, no paper)",
        ("holocron.optim.Scout (pylocron 0.3.0)",),
        preset={"inner": "sgd"},
        example={"lr": 5e-2, "momentum": 0.9},
        invalid=_WRAPPER_INVALID + (({"momentum": -0.5}, "momentum"),),
        sharding="whole-tensor",
    ),
    Entry(
        "ranger",
        Lookahead,
        "fastai's ranger: fastai's RAdam (betas (0.95, 0.99), eps 1e-6, wd 0.01) inside Lookahead(6, 0.5)",
        _LOOKAHEAD + "; Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond. arXiv:1908.03265",
        ("fastai.optimizer (2.8.12) ranger",),
        preset={"inner": "fastai_radam", "lr": REQUIRED, "betas": (0.95, 0.99), "eps": 1e-6, "weight_decay": 0.01},
        example={"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.02},
        invalid=(({"lr": -1.0}, "lr"), ({"k": 0}, "k"), ({"betas": (1.5, 0.99)}, "betas")),
    ),
):
    register(_entry)

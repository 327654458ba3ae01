r"""Lookahead: slow weights that the fast ones are pulled back to every k steps; fastai's ``ranger``.

**Lookahead** (Zhang, Lucas, Hinton & Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back",
arXiv:1907.08610). The parameters are the *fast* weights :math:`\theta`; every step is a step of the inner optimizer
on them. The wrapper keeps *slow* weights :math:`\phi` (a copy of the parameters) and ends every k-th step with

.. math::
    \phi \leftarrow \phi + \alpha\,(\theta - \phi),\qquad \theta \leftarrow \phi .

**Pullback momentum** (pytorch_optimizer's ``pullback_momentum``): at a synchronisation the inner optimizer's
momentum buffers are zeroed or pulled back like the weights (:mod:`gradstep.wrappers.pullback`). fastai's ``ranger``
(:mod:`gradstep.wrappers.ranger`) is fastai's RAdam inside Lookahead(k=6, alpha=0.5).

Scout (:mod:`gradstep.wrappers.scout`) is Lookahead with a rate read from the period's updates. The state
machinery both share (the inner optimizer's state, the merged state_dict, the checks on loading) is
:class:`gradstep.wrappers.inner_state.StatefulWrapper`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.hooks import step_without_global_hooks
from ..core.hypers import one_of, unit_interval_closed
from ..core.ops import FOREACH
from ..core.registry import Entry, register
from .base import build_inner
from .inner_state import StatefulWrapper
from .pullback import PULLBACK_MODES, add_slow_buffers, pull_back

__all__ = ["SLOW_COPY_MODES", "PULLBACK_MODES", "Lookahead"]

SLOW_COPY_MODES = ("first_step", "construction")
SLOW = "slow_param"
"""State key of a parameter's slow copy."""

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


def _slow_dtype(p: Tensor) -> torch.dtype:
    # Half-precision parameters keep fp32 slow weights: the slow average accumulates differences smaller than a
    # bf16 ulp, as gradstep's optimizers keep fp32 state for them.
    return torch.float32 if p.dtype in _HALF else p.dtype


def _as_dtype(xs: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    return [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(xs, like)]


class Lookahead(StatefulWrapper):
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
    and the inner optimizer's state of ``p`` under ``"inner.<key>"`` (``state[p]["inner.exp_avg"]`` is
    ``wrapper.inner.state[p]["exp_avg"]``, the same tensor, refreshed by every step and load of the wrapper). Every
    entry is a tensor or a plain value, as in any optimizer's state. A parameter that never had a gradient gets no
    state and is never synchronised (with ``"first_step"``).

    ``state_dict()`` is laid out as torch's, with the same keys per parameter as the live state; ``"param_groups"``
    are the inner optimizer's groups. ``torch.distributed.checkpoint`` (``get/set_optimizer_state_dict``, flattened
    or not) keeps all of it; the extra ``"gradstep"`` entry it drops holds which wrapper saved the dict and the
    settings (``k``, ``alpha``, ...), which a load without it leaves as they are. The state_dict loads with
    ``torch.load(weights_only=True)``; state dicts of earlier releases (the inner state of each parameter as a
    nested dict under ``"inner"``, or the inner optimizer's whole state_dict under a top-level ``"inner"``) load
    too, converted.

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

    _SETTING_CHECKS = _CHECKS

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
        self._setup(build_inner(type(self).__name__, optimizer, inner, inner_hypers), settings)
        if self.slow_copy == "construction":
            self._track(self._all_params())

    # --- settings -----------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._settings["k"]

    @k.setter
    def k(self, value: int) -> None:
        self._settings["k"] = self._validated("k", value)

    @property
    def alpha(self) -> float:
        return self._settings["alpha"]

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._settings["alpha"] = self._validated("alpha", value)

    @property
    def slow_copy(self) -> str:
        return self._settings["slow_copy"]

    @property
    def pullback_momentum(self) -> str:
        return self._settings["pullback_momentum"]

    @property
    def momentum_keys(self) -> tuple[str, ...]:
        return self._settings["momentum_keys"]

    # --- state --------------------------------------------------------------------------------------------------
    def _state_keys(self, settings: Mapping[str, Any]) -> set[str]:
        return {SLOW} | {f"slow_{key}" for key in settings["momentum_keys"]}

    def _required_keys(self) -> set[str]:
        return {SLOW}

    def _init_param_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state[SLOW] = p.detach().to(dtype=_slow_dtype(p), copy=True)

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
        had_state = self._with_state()
        if self.slow_copy == "first_step":
            self._track(self._params_with_grad())
            if closure is not None and any(SLOW not in self.state.get(p, ()) for p in self._all_params()):
                closure = self._tracking_closure(closure)
        skipped = getattr(self._inner, "skipped_steps", None)
        try:
            # The wrapper's step fires torch's global step hooks; the inner step must not fire them again.
            loss = step_without_global_hooks(self._inner, closure)
        except BaseException:
            self._forget_state_since(had_state)  # a refused step (nonfinite="error") leaves no state behind
            raise
        if skipped is not None and getattr(self._inner, "skipped_steps", None) != skipped:
            self._forget_state_since(had_state)
            return loss  # the inner optimizer skipped this step (non-finite gradients): nothing happened
        self._after_inner_step()
        self._relink()
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
        add_slow_buffers(self._inner, tracked, self.momentum_keys)

    def _pull_back(self, tracked: list[tuple[Tensor, dict[str, Any]]], rate: float) -> None:
        pull_back(self._inner, tracked, self.momentum_keys, self.pullback_momentum, rate)


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
register(
    Entry(
        "lookahead",
        Lookahead,
        "Lookahead (k=6, alpha=0.5) around any registered optimizer: inner='sgd' unless given",
        _LOOKAHEAD,
        _ORIGINALS,
        preset={"inner": "sgd"},
        example={"lr": 5e-2, "momentum": 0.9, "weight_decay": 0.01},
        invalid=_WRAPPER_INVALID + (({"lr": -1.0}, "lr"),),
    )
)


def __getattr__(name: str) -> Any:
    # ranger and Scout lived in this module before they got their own: the old import paths keep working (Scout's
    # for one release, with a warning).
    if name == "ranger":
        from .ranger import ranger

        return ranger
    if name == "Scout":
        import warnings

        from .scout import Scout

        warnings.warn(
            "gradstep.wrappers.lookahead.Scout moved to gradstep.wrappers.scout.Scout (or gradstep.wrappers.Scout)",
            DeprecationWarning,
            stacklevel=2,
        )
        return Scout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

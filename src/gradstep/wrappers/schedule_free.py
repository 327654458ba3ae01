r"""Schedule-free around any optimizer (Defazio et al., 2024): the inner optimizer steps :math:`z`, the wrapper
averages.

The parameter holds :math:`y` in train mode. At each step, with :math:`\beta` = ``momentum`` and :math:`\gamma` the
group's lr (times the inner optimizer's ``d`` where it keeps one, as D-Adaptation and Prodigy do):

.. math::
    z \leftarrow z - \gamma\lambda_y y,\quad y \leftarrow y - \gamma\lambda_y (1-\beta) y
    \quad(\text{weight\_decay\_at\_y}\ \lambda_y),\qquad x = \text{lerp}(y, z, 1 - 1/\beta)

the inner optimizer steps :math:`z` with the gradient taken at :math:`y`, then, with the weight :math:`c` of the
schedule-free average (:func:`~gradstep.optim.schedule_free.schedule_free_weight`),

.. math::
    x \leftarrow \text{lerp}(x, z, c),\qquad y \leftarrow \text{lerp}(x, z, 1-\beta).

``eval()`` sets the parameters to :math:`x` (evaluate and save there), ``train()`` back to :math:`y`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.hooks import step_without_global_hooks
from ..core.hypers import non_negative
from ..core.registry import Entry, register
from ..optim.schedule_free import interpolate, schedule_free_weight
from .base import build_inner
from .inner_state import StatefulWrapper

__all__ = ["ScheduleFreeWrapper"]

Z = "z"


def _open_unit(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "must be in (0, 1)"


def _swap(a: Tensor, b: Tensor) -> None:
    """Exchange the values of two tensors of one shape and dtype (the reference swaps bytes: the same values)."""
    held = a.clone()
    a.copy_(b)
    b.copy_(held)


class ScheduleFreeWrapper(StatefulWrapper):
    r"""Make any optimizer schedule-free (see the module docstring for the math).

    Two ways to build one::

        ScheduleFreeWrapper(torch.optim.RMSprop(model.parameters(), lr=2.5e-3), momentum=0.9)
        ScheduleFreeWrapper(model.parameters(), inner="adam", lr=1e-3)  # by registry name and its hypers

    Call :meth:`train` before training steps and :meth:`eval` before evaluating or saving. The inner optimizer's
    own momentum can be turned off: the wrapper's interpolation is a momentum.

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682.

    .. warning::
        Differences from schedulefree ``ScheduleFreeWrapper`` (1.4.1): it starts in train mode (the reference in eval
        mode, refusing a step before ``train()``); ``z`` is the wrapper's state (the reference writes it into the
        inner optimizer's state, which gradstep's optimizers would refuse when loading); the step count is the
        wrapper's ``fast_steps`` (the reference's ``k`` in the param groups is also advanced by an inner Prodigy or
        D-Adaptation optimizer, which then counts twice); a zero total weight gives ``c = 0`` (the reference divides
        by zero); it is a ``torch.optim.Optimizer`` (the reference is a plain object); the swap copies values (the
        reference swaps bytes in place). A step the inner optimizer skips (``nonfinite="skip"``) leaves the
        parameters at ``y``, with ``weight_decay_at_y`` applied.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.wrappers.ScheduleFreeWrapper(torch.optim.SGD([w], lr=0.1), momentum=0.9)
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> opt.eval()  # w is now x, the average: evaluate or save it
        >>> sorted(opt.state[w])  # z (the wrapper's) and the step count; plain SGD keeps no "inner.<key>" state
        ['fast_steps', 'z']
        >>> opt.train()  # back to y before the next steps
    """

    _SETTING_CHECKS = {
        "momentum": _open_unit,
        "weight_decay_at_y": non_negative,
        "r": non_negative,
        "weight_lr_power": non_negative,
    }
    _PICKLED = (*StatefulWrapper._PICKLED, "train_mode")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Iterable[Any],
        weight_decay_at_y: float = 0.0,
        momentum: float = 0.9,
        weight_lr_power: float = 2.0,
        r: float = 0.0,
        *,
        inner: str | Callable[..., torch.optim.Optimizer] | None = None,
        **inner_hypers: Any,
    ) -> None:
        settings = {"momentum": momentum, "weight_decay_at_y": weight_decay_at_y, "r": r}
        settings["weight_lr_power"] = weight_lr_power
        self._setup(build_inner(type(self).__name__, optimizer, inner, inner_hypers), settings)
        self.train_mode = True  # x = y = z while nothing is stored: a first step needs no train()

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("_settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- state --------------------------------------------------------------------------------------------------
    def _state_keys(self, settings: Mapping[str, Any]) -> set[str]:
        return {Z}

    def _required_keys(self) -> set[str]:
        return {Z}

    def _z_of(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if Z not in state:
            # fp32 for half-precision parameters (as every gradstep state); the swap copies values across dtypes.
            dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
            state[Z] = p.detach().to(dtype=dtype, memory_format=torch.preserve_format, copy=True)
            self._link(p, state)
        return state[Z]  # type: ignore[no-any-return]

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state (the inner optimizer's too, where it can) as a first step would."""
        init = getattr(self._inner, "init_state", None)
        if callable(init):
            init()
        for p in self._all_params():
            self._z_of(p)

    def clear_state(self) -> None:
        """Forget all state: the inner optimizer's, ``z`` and the step counter (the parameters stay as they are)."""
        self._clear_inner_state()
        self.state = defaultdict(dict)
        self._set_fast_steps(0)

    # --- modes --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval(self) -> None:
        """Set the parameters to ``x``, the average (to evaluate or save the model)."""
        if self.train_mode:
            self._interpolate_all(1 - 1 / self._settings["momentum"])
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Set the parameters to ``y``, where the gradients are taken (before training steps)."""
        if not self.train_mode:
            self._interpolate_all(1 - self._settings["momentum"])
        self.train_mode = True

    def _interpolate_all(self, weight: float) -> None:
        for p in self._all_params():
            z = self.state[p].get(Z) if p in self.state else None
            if z is not None:
                interpolate(p.data, z, weight)

    # --- step ---------------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if not self.train_mode:
            raise RuntimeError(
                "ScheduleFreeWrapper is in eval mode: call opt.train() before training steps (and opt.eval() before "
                "evaluating or saving the model)"
            )
        had_state = self._with_state()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        momentum = self._settings["momentum"]
        wd = self._settings["weight_decay_at_y"]
        active = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        with torch.no_grad():
            for group, params in active:
                lr = float(group["lr"])
                for p in params:
                    z = self._z_of(p)
                    if wd != 0.0:
                        z.sub_(p, alpha=lr * wd)
                        p.sub_(p, alpha=lr * wd * (1 - momentum))
                    interpolate(p, z, 1 - 1 / momentum)  # y -> x
                    _swap(z, p)  # the inner optimizer steps z; x waits in the state
        skipped = getattr(self._inner, "skipped_steps", None)
        try:
            step_without_global_hooks(self._inner, None)
        except BaseException:
            self._back_to_y(active)  # a refused step (nonfinite="error"): the parameters are y again
            self._forget_state_since(had_state)
            raise
        if skipped is not None and getattr(self._inner, "skipped_steps", None) != skipped:
            self._back_to_y(active)
            self._forget_state_since(had_state)
            return loss
        with torch.no_grad():
            k = self._counters["fast_steps"]
            for group, params in active:
                group.setdefault("lr_max", 0.0)
                group.setdefault("weight_sum", 0.0)
                lr = float(group["lr"]) * float(group.get("d", 1.0))
                ckp1 = schedule_free_weight(group, k, lr, self._settings["r"], self._settings["weight_lr_power"])
                for p in params:
                    z = self.state[p][Z]
                    _swap(z, p)  # p is x again, z the new z
                    interpolate(p, z, ckp1)
                    interpolate(p, z, 1 - momentum)  # x -> y
        self._set_fast_steps(self._counters["fast_steps"] + 1)
        self._relink()
        return loss

    @torch.no_grad()
    def _back_to_y(self, active: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        for _, params in active:
            for p in params:
                z = self.state[p][Z]
                _swap(z, p)
                interpolate(p, z, 1 - self._settings["momentum"])


register(
    Entry(
        "schedule_free_wrapper",
        ScheduleFreeWrapper,
        "Schedule-free averaging around any registered optimizer (inner='sgd' unless given); call train()/eval()",
        "Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024. The Road Less Scheduled. NeurIPS. arXiv:2405.15682",
        ("schedulefree ScheduleFreeWrapper",),
        preset={"inner": "sgd"},
        example={"lr": 5e-2, "weight_decay": 0.01},
        invalid=(
            ({"momentum": 1.0}, "momentum"),
            ({"weight_decay_at_y": -1.0}, "weight_decay_at_y"),
            ({"lr": -1.0}, "lr"),
        ),
    )
)

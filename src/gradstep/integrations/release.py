"""Gradient release: step each parameter during the backward pass, as soon as its gradient is complete.

A normal loop holds every gradient until ``optimizer.step()``; here a parameter is stepped from its
``register_post_accumulate_grad_hook`` and its gradient freed at once, so at most the gradients still being
computed are alive (for a large model, about the memory of one copy of the weights saved).

What this mode can and cannot guarantee, because parameters are stepped one at a time:

* The result equals the normal loop's, bit for bit, for optimizers whose update of a parameter reads only that
  parameter's gradient and state (elementwise or per-tensor: SGD, Adam(W), RMSprop, LAMB, LARS, ...). Optimizers
  that read the whole group or the whole model (a global-norm clip inside the chain, such as Adan's
  ``max_grad_norm``; steps prepared from whole-model statistics) and wrappers are refused.
* The all-or-nothing rule of ``step()`` (every gradient is screened before any parameter is written) cannot hold:
  when a parameter's gradient is non-finite, the parameters stepped earlier in the same backward keep their update.
  ``nonfinite="error"`` therefore raises at the first non-finite gradient, naming it and how many parameters were
  already stepped; that parameter and those after it are not stepped (the backward stops). ``nonfinite="skip"``,
  which promises to skip the whole step, is refused. ``"zero"``, ``"revert"`` and ``"ignore"`` act per element and
  behave exactly as in the normal loop.
* Gradient clipping by the global norm and gradient accumulation need all gradients at once: not in this mode.

``optimizer.step()`` after the backward finds no gradients left and only does the bookkeeping: it counts the step
(``global_step``), runs the step hooks (an :class:`~gradstep.integrations.ema.EMA` attached to the optimizer) and
lets LR schedulers see a step. Keep calling it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ..core.nonfinite import NonFiniteError, first_nonfinite
from ..core.optimizer import ChainedOptimizer

__all__ = ["StepInBackward", "step_in_backward"]


class StepInBackward:
    """The hooks that step ``optimizer``'s parameters during backward; :meth:`remove` (or the ``with`` block's end)
    takes them off. Build it with :func:`step_in_backward`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        _check_supported(optimizer)
        self.optimizer: ChainedOptimizer = optimizer  # type: ignore[assignment]
        self.stepped_in_backward = 0  # parameters stepped during the current (or last) backward
        self._backward_open = False
        self._handles = []
        for index, group in enumerate(optimizer.param_groups):
            for position, p in enumerate(group["params"]):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index, position)))

    def _hook(self, index: int, position: int) -> Any:
        def step_this_parameter(p: Tensor) -> None:
            self._step_one(index, position, p)

        return step_this_parameter

    def _step_one(self, index: int, position: int, p: Tensor) -> None:
        if p.grad is None:
            return
        if not self._backward_open:
            # A new backward pass: count afresh once it has finished.
            self._backward_open = True
            self.stepped_in_backward = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._close_backward)
        opt = self.optimizer
        group = opt.param_groups[index]
        names = group.get("param_names")
        # The optimizer's own gathering (sparse and shape checks, names) over a one-parameter view of the group.
        view = {**group, "params": [p], "param_names": [names[position]] if names else None}
        plan = opt._gather(index, view)
        if not names:
            plan.names = [f"param_groups[{index}]['params'][{position}]"]
        plan.group = group  # the real group: transforms may keep values in it
        if group["nonfinite"] == "error" and first_nonfinite(plan.grads) is not None:
            self._backward_open = False  # the backward stops here; its end-of-pass callback will not run
            raise NonFiniteError(
                f"{type(opt).__name__}: non-finite gradient in {plan.names[0]} during backward (nonfinite='error', "
                f"stepped in backward): {self.stepped_in_backward} parameter(s) of this backward were already "
                f"stepped and keep their update; this one and those after it were not stepped."
            )
        with torch.no_grad():
            opt._update_group(plan)
        p.grad = None  # the point of the mode: the gradient's memory is free again
        self.stepped_in_backward += 1

    def _close_backward(self) -> None:
        self._backward_open = False

    def remove(self) -> None:
        """Take the hooks off: ``loss.backward()`` keeps gradients for ``optimizer.step()`` again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def step_in_backward(optimizer: torch.optim.Optimizer) -> StepInBackward:
    """Step each of ``optimizer``'s parameters as soon as its gradient is accumulated, and free the gradient.

    Args:
        optimizer: a gradstep optimizer whose update of one parameter needs only that parameter (see the module
            docstring for what is refused and why).

    Returns:
        The hooks' handle; ``remove()`` it (or use it as a context manager) to return to the normal loop.

    Raises:
        TypeError: the optimizer is not a gradstep chained optimizer, or it steps parameters together.
        ValueError: a group uses ``nonfinite="skip"`` or ``compiled=True``.

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = gradstep.AdamW(model.parameters(), lr=1e-2)
        >>> release = gradstep.step_in_backward(opt)
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> loss.backward()                     # each parameter is stepped here ...
        >>> [p.grad for p in model.parameters()]  # ... and its gradient freed
        [None, None]
        >>> _ = opt.step()                      # bookkeeping only: counts the step, runs the step hooks
        >>> opt.global_step, release.stepped_in_backward
        (1, 2)
        >>> release.remove()
    """
    return StepInBackward(optimizer)


def _check_supported(optimizer: Any) -> None:
    name = type(optimizer).__name__
    if not isinstance(optimizer, ChainedOptimizer):
        raise TypeError(
            f"step_in_backward needs a gradstep optimizer built on ChainedOptimizer, got {name} "
            f"(wrappers such as Lookahead step all parameters together)"
        )
    cls = type(optimizer)
    for method in ("step", "_prepare_step", "_update_group"):
        # inspect.unwrap: torch.optim wraps each class's step() in its hook machinery on first construction.
        base = getattr(ChainedOptimizer, method, None)
        if base is not None and inspect.unwrap(getattr(cls, method)) is not inspect.unwrap(base):
            raise TypeError(
                f"{name} cannot step one parameter at a time: its step reads the whole model (it overrides {method}())"
            )
    seen: set[int] = set()
    for index, group in enumerate(optimizer.param_groups):
        for t in optimizer.transforms:
            if t.needs_whole_group(group):
                raise TypeError(
                    f"{name}: {type(t).__name__} reads the whole param group at once (param_groups[{index}]), "
                    f"so its parameters cannot be stepped one at a time"
                )
        if group["nonfinite"] == "skip":
            raise ValueError(
                f"{name}: nonfinite='skip' (param_groups[{index}]) skips a whole step, which step_in_backward cannot "
                f"do: parameters are stepped one at a time as their gradients arrive. Use 'error', 'zero' or 'revert'."
            )
        if group["compiled"]:
            raise ValueError(
                f"{name}: compiled=True (param_groups[{index}]) compiles a whole group's step; step_in_backward "
                f"steps one parameter at a time: use compiled=False"
            )
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"{name}: a parameter appears twice in the groups")
            seen.add(id(p))

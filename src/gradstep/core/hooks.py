"""Stepping an optimizer that another one wraps, so that torch's global step hooks fire once per user step.

``torch.optim`` runs the global hooks (``register_optimizer_step_pre_hook``/``..._post_hook``) around every call of an
optimizer's ``step``: a wrapper that calls its inner optimizer's ``step`` would fire them twice. A wrapper steps its
inner optimizer through :func:`step_without_global_hooks` instead: the inner optimizer's own step hooks still run, the
global ones only around the wrapper's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["step_without_global_hooks"]


def step_without_global_hooks(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``opt.step(closure)`` with ``opt``'s own step hooks, without torch's global ones."""
    patched = type(opt).step
    func = getattr(patched, "__wrapped__", None)
    if func is None or not getattr(patched, "hooked", False):
        return opt.step() if closure is None else opt.step(closure)
    args: tuple[Any, ...] = (opt,) if closure is None else (opt, closure)
    kwargs: dict[str, Any] = {}
    for pre_hook in opt._optimizer_step_pre_hooks.values():
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            args, kwargs = result
    out = func(*args, **kwargs)
    for post_hook in opt._optimizer_step_post_hooks.values():
        post_hook(opt, args, kwargs)
    return out

"""The plumbing every wrapper shares: one ``torch.optim.Optimizer`` around another that *shares* its ``param_groups``.

A wrapper here is a ``torch.optim.Optimizer`` whose ``param_groups`` are its inner optimizer's (the same list, read
through a property, so it stays right after the inner optimizer's ``load_state_dict`` rebinds it). Everything that
works on groups therefore reaches the inner optimizer: LR schedulers attached to the wrapper, ``torch.amp.GradScaler``
(which unscales the gradients of ``param_groups`` and then calls ``step()``), gradstep's group tools (``set_hyper``,
``freeze_to``, ...) and ``add_param_group``.

Wrappers that keep per-parameter state of their own beside the inner optimizer's (Lookahead, Scout) build on
:class:`gradstep.wrappers.inner_state.StatefulWrapper`, which merges both into one torch-style state_dict.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ..core.groups import GroupToolsMixin
from ..core.hypers import Hyper
from ..core.registry import create
from .inner_checks import hypers_of, supports_complex

__all__ = ["WrapperBase", "build_inner", "copy_tensors"]


def copy_tensors(tree: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned (torch's ``load_state_dict`` would alias them)."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: copy_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_tensors(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(copy_tensors(v) for v in tree)
    return tree


class WrapperBase(GroupToolsMixin, torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that shares the ``param_groups`` (and ``defaults``) of an inner optimizer.

    Subclasses call :meth:`_attach` first in their constructor and list the attributes that make up their picklable
    state in ``_PICKLED``. ``torch.optim.Optimizer.__init__`` is not called: it would register the inner optimizer's
    groups a second time. Its other work (hook registries, the hooked ``step``) is done by
    ``torch.optim.Optimizer.__setstate__``, which exists to fill in exactly those attributes.
    """

    _PICKLED: tuple[str, ...] = ("_inner",)
    _inner: torch.optim.Optimizer

    def _attach(self, inner: torch.optim.Optimizer, state: Any = None) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(inner).__name__}")
        self._inner = inner
        self._torch_setstate({} if state is None else {"state": state})

    def _torch_setstate(self, state: dict[str, Any]) -> None:
        # torch's __setstate__ adds "differentiable" to ``self.defaults``, which is the inner optimizer's dict: a key
        # gradstep's optimizers do not declare, and would then look for in every checkpoint they load.
        had = "differentiable" in self._inner.defaults
        torch.optim.Optimizer.__setstate__(self, state)
        if not had:
            self._inner.defaults.pop("differentiable", None)

    def __getstate__(self) -> dict[str, Any]:
        # What torch's own __getstate__ leaves out (hooks, a scheduler's patched step) stays out here too.
        return {name: self.__dict__[name] for name in self._PICKLED if name in self.__dict__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._torch_setstate({})

    # --- what is shared with the inner optimizer ----------------------------------------------------------------
    @property
    def inner(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._inner.param_groups = groups

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self._inner.defaults = defaults

    def declared_hypers(self) -> dict[str, Hyper]:
        """The inner optimizer's hyperparameter checks (a ``torch.optim`` optimizer's: see
        :func:`gradstep.wrappers.inner_checks.hypers_of`)."""
        return hypers_of(self._inner)

    @property
    def transforms(self) -> tuple[Any, ...]:
        return tuple(getattr(self._inner, "transforms", ()))

    def _supports_complex(self) -> bool:
        return supports_complex(self._inner)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._inner.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none)

    def set_hyper(self, name: str, value: Any) -> None:
        """As :meth:`GroupToolsMixin.set_hyper`; a pair given for a pair-valued hyperparameter (``betas``) of an
        optimizer that declares none (``torch.optim``'s) is one value for every group, not one value per group."""
        current = self.param_groups[0].get(name) if self.param_groups else None
        if (
            name not in self.declared_hypers()
            and isinstance(current, (tuple, list))
            and isinstance(value, (tuple, list))
            and not any(isinstance(v, (tuple, list)) for v in value)
        ):
            value = [type(current)(value)] * len(self.param_groups)
        super().set_hyper(name, value)

    def _clear_inner_state(self) -> None:
        clear = getattr(self._inner, "clear_state", None)
        if callable(clear):
            clear()
        else:
            self._inner.state = defaultdict(dict)

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


def build_inner(owner: str, optimizer: Any, inner: Any, hypers: dict[str, Any]) -> torch.optim.Optimizer:
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

"""Optimizers that transform each gradient before, and each parameter after, an inner optimizer's step.

rai_toolbox's design (``rai_toolbox.optim.ParamTransformingOptimizer``, 0.2.1). For every parameter::

    _pre_step_transform_(view, group)      # the gradient, in place; then grad <- grad * grad_scale + grad_bias
    InnerOpt.step()
    _post_step_transform_(view, group)     # the parameter, in place (every parameter, with a gradient or not)

One difference from rai_toolbox: the pre-step transform writes into a *copy* of each gradient, which the inner
optimizer reads as ``param.grad`` during its step; afterwards ``param.grad`` is the user's gradient again, unchanged
(gradstep's rule: ``step()`` never modifies gradients). rai_toolbox leaves the transformed gradient in ``param.grad``.

``view`` is the parameter reshaped by the group's ``param_ndim`` into ``N`` blocks, ``(N, d1, ..., dm)`` (see
:func:`~gradstep.paramtransform.blocks.to_batch`), its gradient attached as ``view.grad``. The wrapper keeps no
state of its own: ``param_groups``, ``state`` and ``defaults`` *are* the inner optimizer's.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.groups import GroupToolsMixin
from ..core.hooks import step_without_global_hooks
from ..core.hypers import REQUIRED, Hyper
from ..core.nonfinite import finite_flags
from ..optim.sgd import SGD
from .blocks import block_ndim, to_batch

__all__ = ["ParamTransformingOptimizer"]

_HOOKS = tuple(
    f"_optimizer_{kind}_hooks"
    for kind in (
        "step_pre",
        "step_post",
        "state_dict_pre",
        "state_dict_post",
        "load_state_dict_pre",
        "load_state_dict_post",
    )
)


def _real(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "must be a finite real number"


def _param_ndim(value: Any) -> str | None:
    return (
        None if value is None or (isinstance(value, int) and not isinstance(value, bool)) else "must be an int or None"
    )


_MISSING = object()
WRAPPER_HYPERS = (
    Hyper("param_ndim", -1, _param_ndim, "ndim of each block (negative: offset from the tensor's; None: all)"),
    Hyper("grad_scale", 1.0, _real, "multiplies each transformed gradient"),
    Hyper("grad_bias", 0.0, _real, "added to each transformed gradient"),
)
"""The group hyperparameters every parameter-transforming optimizer reads."""


def _tensors(params: Any) -> list[Tensor]:
    """The tensors of ``params`` (tensors, ``(name, tensor)`` pairs, or group dicts of either)."""
    if isinstance(params, Tensor):
        return [params]
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_tensors(item["params"]))
        else:
            out.append(item[1] if isinstance(item, tuple) else item)
    return out


def _shared(name: str) -> property:
    """An attribute of the wrapper that is the inner optimizer's."""
    return property(lambda self: getattr(self.inner_opt, name), lambda self, v: setattr(self.inner_opt, name, v))


def _inner_optimizer(owner: str, params: Any, InnerOpt: Any, defaults: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """``InnerOpt`` built on ``params`` (a class or partial), or checked (an instance); groups get ``defaults``."""
    cls = InnerOpt.func if isinstance(InnerOpt, functools.partial) else InnerOpt
    if isinstance(InnerOpt, Optimizer):
        if kwargs:
            raise TypeError(f"{owner}: InnerOpt is an instance, its arguments cannot be given ({', '.join(kwargs)})")
        if params is not None and {id(p) for p in _tensors(params)} != {id(p) for p in _tensors(InnerOpt.param_groups)}:
            raise ValueError(f"{owner}: params differ from those of the InnerOpt instance")
        for group in InnerOpt.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
        return InnerOpt
    if not (inspect.isclass(cls) and issubclass(cls, Optimizer)):
        raise TypeError(
            f"{owner}: InnerOpt must be a torch.optim.Optimizer subclass, a functools.partial of one, or an "
            f"optimizer instance; got {InnerOpt!r}"
        )
    if params is None:
        raise TypeError(f"{owner}: params cannot be None when InnerOpt is an optimizer class")
    if isinstance(params, Tensor):
        raise TypeError(f"{owner}: params must be an iterable of tensors or dicts, got a Tensor")
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return InnerOpt([{**defaults, **g} for g in groups], **kwargs)


class ParamTransformingOptimizer(Optimizer):
    """Wraps ``InnerOpt``, transforming gradients before its step and parameters after it.

    As it stands this class only applies ``grad_scale`` and ``grad_bias``; subclasses override
    :meth:`_pre_step_transform_` and/or :meth:`_post_step_transform_` (in place, batch-style over the leading axis of
    the view) and declare the group hyperparameters they read in :attr:`hypers`.

    Args:
        params: parameters or param group dicts (may be ``None`` only when ``InnerOpt`` is an optimizer instance).
        InnerOpt: the optimizer that takes the step: a class or ``functools.partial`` of one (built on ``params``
            with ``inner_opt_kwargs``), or an instance (its groups are used). Default :class:`gradstep.SGD`.
        param_ndim: how a tensor is viewed while transformed: a positive number is the ndim of each block (its
            trailing dims), a negative one an offset from the tensor's ndim (``-1``: one block per slice along the
            first dim), ``None`` the whole tensor. 0-d tensors are one block. Per group.
        grad_scale: multiplies each gradient after the pre-step transform. Per group.
        grad_bias: added to every element of each gradient after the pre-step transform. Per group.
        defaults: further group defaults (copied, never modified).
        **inner_opt_kwargs: arguments of ``InnerOpt`` (lr, momentum, ...).

    Example::

        >>> import torch
        >>> from gradstep.paramtransform import ParamTransformingOptimizer
        >>> x = torch.nn.Parameter(torch.ones(2))
        >>> opt = ParamTransformingOptimizer([x], lr=1.0, grad_scale=2.0)
        >>> x.grad = torch.tensor([1.0, -1.0]); opt.step()
        >>> x.detach()
        tensor([-1.,  3.])
    """

    hypers: ClassVar[tuple[Hyper, ...]] = ()
    """Group hyperparameters read by this class's transforms (besides param_ndim, grad_scale, grad_bias)."""

    inner_opt: Optimizer

    def __init__(
        self,
        params: Any = None,
        InnerOpt: Any = SGD,
        *,
        param_ndim: int | None = -1,
        grad_scale: float = 1.0,
        grad_bias: float = 0.0,
        defaults: dict[str, Any] | None = None,
        **inner_opt_kwargs: Any,
    ) -> None:
        defaults = dict(defaults) if defaults is not None else {}
        defaults.setdefault("param_ndim", param_ndim)
        defaults.setdefault("grad_scale", grad_scale)
        defaults.setdefault("grad_bias", grad_bias)
        self._init_hooks()
        inner = _inner_optimizer(type(self).__name__, params, InnerOpt, defaults, inner_opt_kwargs)
        # The transform's defaults win over the inner's, as in rai_toolbox: both live in the same dicts.
        inner.defaults.update(defaults)
        self.inner_opt = inner
        for group in self.param_groups:
            self._check_group(group)

    # One state, the inner optimizer's: reads and writes (torch's load_state_dict, schedulers) go through to it.
    param_groups = _shared("param_groups")  # type: ignore[assignment]
    state = _shared("state")  # type: ignore[assignment]
    defaults = _shared("defaults")  # type: ignore[assignment]

    def _init_hooks(self) -> None:
        # What Optimizer.__init__ sets up, without its assignment of defaults/state/param_groups (the inner's).
        for name in _HOOKS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._patch_step_function()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict, marked with this class's name (so another transform refuses it)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner_opt.state_dict()
        meta = sd.get("gradstep")
        sd["gradstep"] = {**(meta if isinstance(meta, dict) else {}), "wrapper": type(self).__name__}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by this class; every group is checked before the inner optimizer loads it."""
        state_dict = dict(state_dict) if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        me = type(self).__name__
        meta = state_dict.get("gradstep") if isinstance(state_dict, dict) else None
        if isinstance(meta, dict) and "wrapper" in meta:
            if meta["wrapper"] != me:
                raise ValueError(f"this state_dict was saved by gradstep.{meta['wrapper']}, not by {me}")
            state_dict["gradstep"] = {k: v for k, v in meta.items() if k != "wrapper"}
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved_groups, (list, tuple)) and len(saved_groups) == len(self.param_groups):
            for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
                if not isinstance(saved, dict):
                    continue  # the inner optimizer names the problem
                candidate = {**self.defaults, **saved, "params": group["params"]}
                try:
                    self._check_group(candidate)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{me} cannot load this state_dict: param group {gi}: {exc}") from None
        self.inner_opt.load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def declared_hypers(self) -> dict[str, Hyper]:
        """Every group hyperparameter with its check: the inner optimizer's (gradstep ones) and this class's."""
        inner = getattr(self.inner_opt, "declared_hypers", None)
        declared: dict[str, Hyper] = dict(inner()) if inner is not None else {}
        for h in (*WRAPPER_HYPERS, *self.hypers):
            declared.setdefault(h.name, h)
        return declared

    def set_hyper(self, name: str, value: Any) -> None:
        """Set ``name`` in every group (a slice or a list: one value per group); a refused value changes nothing."""
        before = [group.get(name, _MISSING) for group in self.param_groups]
        GroupToolsMixin.set_hyper(self, name, value)  # type: ignore[arg-type]
        try:
            for group in self.param_groups:
                self._check_group(group)
        except (TypeError, ValueError):
            for group, old in zip(self.param_groups, before):
                if old is _MISSING:
                    group.pop(name, None)
                else:
                    group[name] = old
            raise

    def set_hypers(self, **values: Any) -> None:
        for name, value in values.items():
            self.set_hyper(name, value)

    def init_state(self) -> None:
        """The inner optimizer's ``init_state()`` (gradstep optimizers); the transforms keep no state."""
        init = getattr(self.inner_opt, "init_state", None)
        if init is not None:
            init()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _HOOKS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"[{type(self.inner_opt).__name__}](", 1)

    # --- groups -----------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (and so to this one), with this transform's defaults, validated."""
        self.inner_opt.add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        try:
            self._check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"{name} does not support complex parameters (its transforms act on real blocks)")
        pnd = group["param_ndim"]
        if pnd is not None and (isinstance(pnd, bool) or not isinstance(pnd, int)):
            raise ValueError(f"Invalid param_ndim: {pnd!r} (must be an int or None)")
        for key in ("grad_scale", "grad_bias"):
            if _real(group[key]) is not None:
                raise ValueError(f"Invalid {key}: {group[key]!r} (must be a real number)")
        for p in group["params"]:
            block_ndim(pnd, p.ndim)
        for h in self.hypers:
            if group.get(h.name, REQUIRED) is REQUIRED:
                raise ValueError(
                    f"{name} needs a value of {h.name} (no default): give it to the constructor or to every group"
                )
            h.validate(group[h.name])
        self.check_group(group)

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a combination of group values that cannot work together."""

    # --- the transforms ---------------------------------------------------------------------------------------
    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        """Transform ``param.grad`` in place; ``param`` is a batched view ``(N, d1, ...)``. Default: nothing."""

    def _post_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        """Transform ``param`` in place after the inner step; ``param`` is a batched view. Default: nothing."""

    @staticmethod
    def _view(p: Tensor, param_ndim: int | None) -> Tensor:
        view = to_batch(p, param_ndim)
        if p.grad is not None:
            view.grad = to_batch(p.grad, param_ndim)
        return view

    def _transforms_grads(self) -> bool:
        """Whether :meth:`_pre_step_transform_` is overridden (if not, gradients are copied only for scale/bias)."""
        return type(self)._pre_step_transform_ is not ParamTransformingOptimizer._pre_step_transform_

    @torch.no_grad()
    def _apply_pre_step_transform_(self, swapped: list[tuple[Tensor, Tensor]]) -> None:
        """Give each parameter a transformed copy of its gradient; ``(param, user's gradient)`` go to ``swapped``.

        gradstep never writes into a user's gradients (rai_toolbox transforms ``param.grad`` itself): the transforms
        work on a copy, which is ``param.grad`` only while the inner optimizer steps (see :meth:`_restore_grads`).
        """
        transforms = self._transforms_grads()
        zeroed = self._screen_user_grads(transforms)
        if zeroed is None:
            return  # a non-finite gradient under 'error' or 'skip': the inner step sees it as given, and refuses it
        for group in self.param_groups:
            scale, bias = group["grad_scale"], group["grad_bias"]
            if not (transforms or scale != 1.0 or bias != 0.0 or zeroed):
                continue  # nothing to do to these gradients: the inner step reads the user's, unchanged
            for p in group["params"]:
                if p.grad is None:
                    continue
                swapped.append((p, p.grad))
                # A copy with the same layout, so that the batched view is the same as the user's grad's.
                p.grad = torch.zeros_like(p.grad) if id(p) in zeroed else p.grad.clone()
                view = self._view(p, group["param_ndim"])
                self._pre_step_transform_(view, optim_group=group)
                g = view.grad
                if g is None or _storage(g) != _storage(p.grad):
                    raise ValueError(
                        f"{type(self).__name__}._pre_step_transform_ did not modify the gradient in place "
                        "(assigning param.grad replaces the tensor instead of writing to it)"
                    )
                if scale != 1.0:
                    g.mul_(scale)
                if bias != 0.0:
                    g.add_(bias)

    def _screen_user_grads(self, transforms: bool) -> set[int] | None:
        """The inner optimizer's non-finite policy, applied to the gradients the user gave, before any transform.

        A transform can hide a NaN or an infinity from the inner optimizer's own screen (a sign, a clamp, a norm),
        so the policy of each group (``nonfinite``, gradstep inner optimizers) is applied here first. Returns the
        ids of the parameters whose gradient the ``'zero'`` policy replaces by zeros, or ``None`` when a group
        under ``'error'`` or ``'skip'`` holds a non-finite gradient (the step then hands the user's gradients to
        the inner optimizer untransformed, which raises or skips before changing anything). Sparse gradients are
        refused here, naming the parameter, when the gradients are transformed (the transforms are dense).
        """
        zeroed: set[int] = set()
        for gi, group in enumerate(self.param_groups):
            with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            changes = transforms or group["grad_scale"] != 1.0 or group["grad_bias"] != 0.0
            for i, p in with_grad:
                if changes and p.grad.is_sparse:
                    names = group.get("param_names")
                    name = names[i] if names else f"param_groups[{gi}]['params'][{i}]"
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name})")
            policy = group.get("nonfinite")
            if policy not in ("error", "skip", "zero") or not with_grad:
                continue
            flags = finite_flags([p.grad for _, p in with_grad])
            if policy == "zero":
                zeroed.update(id(p) for (_, p), ok in zip(with_grad, flags.tolist()) if not ok)
            elif not bool(flags.all()):
                return None
        return zeroed

    def _prepare_step(self) -> None:
        """Called first by :meth:`step` (subclasses set derived group values here, not by overriding ``step``,
        which would run torch's step hooks twice)."""

    def _skipped_steps(self) -> int:
        return int(getattr(self.inner_opt, "skipped_steps", 0))

    @staticmethod
    def _restore_grads(swapped: list[tuple[Tensor, Tensor]]) -> None:
        """Put the user's gradient objects back (the transformed copies are dropped)."""
        for p, user_grad in swapped:
            p.grad = user_grad
        swapped.clear()

    @torch.no_grad()
    def _apply_post_step_transform_(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self._post_step_transform_(self._view(p, group["param_ndim"]), optim_group=group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Pre-step transform, ``InnerOpt.step``, post-step transform. A closure runs first, with grad enabled.

        The inner optimizer sees the transformed gradients; ``param.grad`` is the user's, unchanged, after the step.
        """
        self._prepare_step()
        swapped: list[tuple[Tensor, Tensor]] = []
        skipped = self._skipped_steps()
        try:
            if closure is None:
                self._apply_pre_step_transform_(swapped)
                step_without_global_hooks(self.inner_opt)
                loss = None
            else:

                def transformed_closure() -> Any:
                    # The closure (zero_grad, backward) works on the user's gradients, however often it is called.
                    self._restore_grads(swapped)
                    with torch.enable_grad():
                        result = closure()
                    self._apply_pre_step_transform_(swapped)
                    return result

                loss = step_without_global_hooks(self.inner_opt, transformed_closure)
        finally:  # also when a transform or the inner step raises
            self._restore_grads(swapped)
        if self._skipped_steps() == skipped:  # a step the non-finite policy skipped moves nothing
            self._apply_post_step_transform_()
        return loss


def _storage(t: torch.Tensor) -> int:
    """The address of a tensor's storage (of its local shard for a DTensor, which has no storage of its own)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.untyped_storage().data_ptr())

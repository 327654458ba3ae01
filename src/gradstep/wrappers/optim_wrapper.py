"""fastai's ``OptimWrapper``: any ``torch.optim`` optimizer behind fastai's hyperparameter names.

Built on :class:`gradstep.wrappers.base.WrapperBase` (the shared ``param_groups``; see :mod:`gradstep.wrappers.base`).
:class:`OptimWrapper` is fastai's ``OptimWrapper`` (fastai 2.8.12, ``fastai.optimizer``): any ``torch.optim``
optimizer, with fastai's hyperparameter names and gradstep's group tools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.hooks import step_without_global_hooks
from ..core.hypers import spread
from ..core.registry import Entry, register
from .base import WrapperBase, copy_tensors
from .inner_checks import check_groups, check_state_dict, has_own_checks

__all__ = ["PYTORCH_HP_MAP", "OptimWrapper", "WrapperBase"]

PYTORCH_HP_MAP: dict[str, str] = {
    "momentum": "mom",
    "weight_decay": "wd",
    "alpha": "sqr_mom",
    "betas__0": "mom",
    "betas__1": "sqr_mom",
}
"""fastai's ``pytorch_hp_map``: torch's hyperparameter keys (``betas__i`` is element i of ``betas``) to fastai's."""


def _detuplify(group: dict[str, Any]) -> dict[str, Any]:
    """fastai's ``detuplify_pg``: a tuple or list value ``k`` becomes ``k__0``, ``k__1``, ... (parameters left out)."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        if isinstance(value, (tuple, list)):
            out.update({f"{key}__{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def _convert_groups(params: Any) -> Any:
    """fastai's ``_convert_params``: when the first element is a list, each element is a group (dicts pass)."""
    if isinstance(params, Tensor) or params is None:
        return params
    params = list(params)
    if not params or not isinstance(params[0], list):
        return params
    return [group if isinstance(group, dict) else {"params": group} for group in params]


class OptimWrapper(WrapperBase):
    """Any ``torch.optim`` optimizer with fastai's hyperparameter names and gradstep's group tools.

    fastai's ``OptimWrapper(params=None, opt=None, hp_map=None, convert_groups=True, **kwargs)``:

    * ``opt`` a class or factory: the optimizer is ``opt(params, **kwargs)``; with ``convert_groups`` a list of lists
      of parameters (fastai's splitter output) becomes one group per inner list.
    * ``opt`` a built optimizer: it is wrapped; ``params`` must then be ``None``. The first positional argument is
      ``params`` (fastai's code, not its older docs): ``OptimWrapper(torch_opt)`` raises ``ValueError``.

    Hyperparameters are read and set by fastai's names, through ``hp_map`` (default :data:`PYTORCH_HP_MAP`:
    ``mom`` is ``momentum`` or ``betas[0]``, ``sqr_mom`` is ``alpha`` or ``betas[1]``, ``wd`` is
    ``weight_decay``); torch's names work too. ``set_hyper`` takes slices and lists (one value per group), as on
    every gradstep optimizer, and ``freeze``/``freeze_to``/``unfreeze`` keep parameters marked ``force_train`` (see
    :func:`gradstep.mark_norm_params`) trainable. ``state``, ``step``, ``zero_grad`` and the checkpoints are the
    inner optimizer's.

    Example::

        >>> import torch, gradstep
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> opt = gradstep.wrappers.OptimWrapper([[a], [b]], opt=torch.optim.AdamW, lr=1e-3)
        >>> opt.set_hyper("mom", 0.8); opt.set_hyper("lr", slice(1e-4, 1e-2))
        >>> [g["betas"] for g in opt.param_groups], [h["lr"] for h in opt.hypers]
        ([(0.8, 0.999), (0.8, 0.999)], [0.0001, 0.01])

    .. warning::
        Differences from fastai: ``force_train`` is read from the parameter's ``opt_args`` (gradstep's mark), not from
        the wrapper's own ``state``; ``state`` is the inner optimizer's. ``set_hyper("lr", slice(0, x))`` raises
        ``ValueError`` (fastai treats it as ``slice(x)``). Loading a checkpoint copies its tensors (torch aliases them).
        Differences from fastai and torch (gradstep's checks, see :mod:`gradstep.wrappers.inner_checks`): the inner
        optimizer's hyperparameters are checked at construction, by ``add_param_group``, ``set_hyper`` and on loading
        (``lr=inf`` or a NaN lr raise ``ValueError`` naming the argument); a parameter twice in one group is refused;
        complex parameters are refused when the inner optimizer does not support them; ``load_state_dict`` checks
        the whole dict (its saver included) before writing anything; ``state_dict()`` adds a ``"gradstep"`` entry
        naming the wrapper and the inner class. ``params=None`` with ``opt`` a class raises ``TypeError``.
    """

    _PICKLED = ("_inner", "fwd_map", "bwd_map")

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        opt: Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
        hp_map: dict[str, str] | None = None,
        convert_groups: bool = True,
        **kwargs: Any,
    ) -> None:
        if params is None and opt is None:
            raise ValueError("Both `params` and `opt` cannot be None.")
        if isinstance(opt, torch.optim.Optimizer):
            if params is not None:
                raise ValueError("Tried using both `params` and a built optimizer. Just pass in `opt`.")
            if kwargs:
                raise TypeError(f"a built optimizer takes no hyperparameters here, got {', '.join(sorted(kwargs))}")
            inner = opt
        elif isinstance(params, torch.optim.Optimizer):
            raise ValueError("OptimWrapper's first argument is `params`; pass a built optimizer as `opt=`.")
        elif callable(opt):
            if params is None:
                raise TypeError(
                    f"OptimWrapper needs params (an iterable of tensors or of param group dicts) to build "
                    f"opt={getattr(opt, '__name__', opt)!r}, got None"
                )
            inner = opt(_convert_groups(params) if convert_groups else params, **kwargs)
        else:
            raise ValueError(f"`opt` must be an optimizer class, a factory or a built optimizer, got {opt!r}")
        if not has_own_checks(inner):
            check_groups("OptimWrapper", inner, inner.param_groups)
        self._attach(inner)
        hp_map = PYTORCH_HP_MAP if hp_map is None else hp_map
        self.fwd_map: dict[str, str] = {k: hp_map.get(k, k) for k in _detuplify(self.param_groups[0])}
        self.bwd_map: dict[str, str] = {v: k for k, v in self.fwd_map.items()}

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, state: Any) -> None:
        self._inner.state = state

    @property
    def hypers(self) -> list[dict[str, Any]]:
        """Each group's hyperparameters under fastai's names (tuples split: ``betas`` is ``mom`` and ``sqr_mom``)."""
        return [{self.fwd_map.get(k, k): v for k, v in _detuplify(group).items()} for group in self.param_groups]

    @property
    def param_lists(self) -> list[list[Tensor]]:
        return [group["params"] for group in self.param_groups]

    def set_hyper(self, name: str, value: Any) -> None:
        """Set a hyperparameter by fastai's name (``mom``, ``sqr_mom``, ``wd``, ``betas__0``, ...) or torch's.

        A slice or a list gives one value per group; ``name__i`` sets element i of a tuple-valued hyperparameter.
        """
        key = self.bwd_map.get(name, name)
        base, sep, index = key.partition("__")
        if not sep or base not in self.param_groups[0]:
            super().set_hyper(key, value)
            return
        i = int(index)
        values = spread(value, len(self.param_groups))
        pairs = [
            tuple(v if j == i else old for j, old in enumerate(group[base]))
            for group, v in zip(self.param_groups, values)
        ]
        super().set_hyper(base, pairs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(self.param_groups)
        self._inner.add_param_group(param_group)
        if has_own_checks(self._inner):
            return
        try:
            check_groups("OptimWrapper", self._inner, self.param_groups[n:])
        except (TypeError, ValueError):
            del self.param_groups[n:]
            raise

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        # torch's global step hooks fire around this step (the wrapper's); the inner step must not fire them again.
        return step_without_global_hooks(self._inner, closure)

    def clear_state(self) -> None:
        """Forget the inner optimizer's state (``clear_state()`` of a gradstep optimizer, else a new empty dict)."""
        self._clear_inner_state()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict, with a ``"gradstep"`` entry naming this wrapper and the inner class.

        The inner optimizer's own ``"gradstep"`` entry (a gradstep optimizer's) is kept under ``"inner_meta"``;
        ``torch.optim`` loads the dict as its own (it reads ``"state"`` and ``"param_groups"`` only).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._inner.state_dict()
        meta: dict[str, Any] = {"wrapper": type(self).__name__, "inner": type(self._inner).__name__}
        if isinstance(sd.get("gradstep"), dict):
            meta["inner_meta"] = sd["gradstep"]
        sd["gradstep"] = meta
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this wrapper, of the inner optimizer, or (no ``"gradstep"`` entry) a torch layout.

        Everything is checked before anything is written, so a refused dict leaves the wrapper and the inner
        optimizer exactly as they were: a gradstep inner optimizer checks the dict itself; a ``torch.optim`` one is
        checked by :func:`gradstep.wrappers.inner_checks.check_state_dict` first. The dict's tensors are copied
        (torch's load would alias them).
        """
        state_dict = dict(state_dict) if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        inner_sd = self._inner_state_dict(state_dict)
        if has_own_checks(self._inner):
            self._inner.load_state_dict(inner_sd)
        else:
            check_state_dict(type(self).__name__, self._inner, inner_sd)
            self._inner.load_state_dict(copy_tensors(inner_sd))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _inner_state_dict(self, state_dict: Any) -> dict[str, Any]:
        """The inner optimizer's part of ``state_dict``, after checking who saved it."""
        me, inner = type(self).__name__, type(self._inner).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{me}.load_state_dict expects a dict, got {type(state_dict).__name__}")
        meta = state_dict.get("gradstep")
        out = {k: v for k, v in state_dict.items() if k != "gradstep"}
        if meta is None:
            return out  # a torch.optim layout (torch's own dict, or one through torch.distributed.checkpoint)
        if not isinstance(meta, Mapping):
            raise ValueError(f"{me} cannot load this state_dict: its 'gradstep' entry is not a dict")
        saver = meta.get("wrapper") or meta.get("optimizer")
        if saver == me:
            if meta.get("inner") != inner:
                raise ValueError(f"this {me} state_dict wraps a {meta.get('inner')}, but this {me} wraps a {inner}")
            inner_meta = meta.get("inner_meta")
        elif saver == inner and has_own_checks(self._inner):
            inner_meta = meta  # the inner optimizer's own state_dict (torch.optim's have no "gradstep" entry)
        else:
            raise ValueError(f"this state_dict was saved by gradstep.{saver}, not by {me} (around {inner})")
        if inner_meta is not None:
            out["gradstep"] = inner_meta
        return out

    def __repr__(self) -> str:
        return f"OptimWrapper({self._inner!r})"


register(
    Entry(
        "optim_wrapper",
        OptimWrapper,
        "fastai's OptimWrapper: a torch.optim optimizer with fastai's hyperparameter names and the group tools",
        "fastai: Howard & Gugger, 2020. Fastai: A Layered API for Deep Learning. arXiv:2002.04688",
        ("fastai.optimizer (2.8.12) OptimWrapper",),
        preset={"opt": torch.optim.SGD},
        example={"lr": 5e-2, "momentum": 0.9, "weight_decay": 0.01},
        invalid=(
            ({"lr": -1.0}, "learning rate"),
            ({"momentum": -0.5}, "momentum"),
            ({"weight_decay": -1.0}, "weight_decay"),
        ),
    )
)

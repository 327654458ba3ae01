"""Several parameter-transforming optimizers composed around one inner optimizer (rai_toolbox's
``ChainedParamTransformingOptimizer``)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor

from ..optim.sgd import SGD
from .base import ParamTransformingOptimizer

__all__ = ["ChainedParamTransformingOptimizer"]


class ChainedParamTransformingOptimizer(ParamTransformingOptimizer):
    """Composes parameter-transforming optimizers left to right around one inner optimizer.

    Members are classes or ``functools.partial`` s of them (for their own arguments, such as ``q``). Their pre-step
    transforms run ``Opt1`` first, then ``Opt2``, ... (post-step transforms likewise); ``grad_scale``/``grad_bias``
    are applied once, after the chain. All share one set of groups, so ``param_ndim`` and every other group value
    apply to the whole chain. The repr shows ``OptN ○ ... ○ Opt1 [Inner]``. Example (rai_toolbox's)::

        >>> import torch
        >>> from functools import partial
        >>> from gradstep.paramtransform import (
        ...     ChainedParamTransformingOptimizer, ClampedGradientOptimizer, TopQGradientOptimizer)
        >>> x = torch.ones(3, requires_grad=True)
        >>> opt = ChainedParamTransformingOptimizer(
        ...     partial(TopQGradientOptimizer, q=0.33), partial(ClampedGradientOptimizer, clamp_max=2.8),
        ...     params=[x], lr=1.0, param_ndim=None)
        >>> (torch.tensor([1.0, 2.0, 3.0]) * x).sum().backward(); opt.step()
        >>> x.detach()  # SGD stepped with the gradient [0, 2, 2.8]; x.grad is still [1, 2, 3]
        tensor([ 1.0000, -1.0000, -1.8000])
    """

    def __init__(
        self,
        *transforming_optimizers: Any,
        params: Any = None,
        InnerOpt: Any = SGD,
        param_ndim: int | None = -1,
        grad_scale: float = 1.0,
        grad_bias: float = 0.0,
        defaults: dict[str, Any] | None = None,
        **inner_opt_kwargs: Any,
    ) -> None:
        for member in transforming_optimizers:
            cls = member.func if isinstance(member, functools.partial) else member
            if not (inspect.isclass(cls) and issubclass(cls, ParamTransformingOptimizer)):
                raise TypeError(
                    f"members of the chain must be ParamTransformingOptimizer classes or partials, not {member!r}"
                )
        self._chain: tuple[ParamTransformingOptimizer, ...] = ()
        super().__init__(
            params,
            InnerOpt,
            param_ndim=param_ndim,
            grad_scale=grad_scale,
            grad_bias=grad_bias,
            defaults=defaults,
            **inner_opt_kwargs,
        )
        # Each member wraps the same inner instance, so all share one set of groups, defaults and state.
        self._chain = tuple(m(None, InnerOpt=self.inner_opt, defaults=self.defaults) for m in transforming_optimizers)

    @property
    def chain(self) -> tuple[ParamTransformingOptimizer, ...]:
        """The members, in the order their transforms are applied."""
        return self._chain

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for member in self._chain:
            member._check_group(group)

    def _transforms_grads(self) -> bool:
        return any(member._transforms_grads() for member in self._chain)

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        for member in self._chain:
            member._pre_step_transform_(param, optim_group=optim_group)

    def _post_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        for member in self._chain:
            member._post_step_transform_(param, optim_group=optim_group)

    def __repr__(self) -> str:
        names = " ○ ".join(type(m).__name__ for m in reversed(self._chain))
        return super().__repr__().replace(type(self).__name__, names, 1)

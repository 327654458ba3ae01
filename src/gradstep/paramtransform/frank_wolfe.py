r"""Frank-Wolfe (conditional gradient) in norm balls, as rai_toolbox's ``frank_wolfe`` module.

:class:`FrankWolfe` takes, for each parameter with a gradient ``g`` (the *negative* linear minimisation oracle, LMO)
and its own step count ``k = 0, 1, ...``:

.. math::
    \alpha_k = \frac{lr}{\max(\delta,\ lr + k)}\ \text{(default schedule; else } \alpha_k = lr \le 1),
    \qquad p \leftarrow (1 - \alpha_k)\, p - \alpha_k\, s\, g

with ``lmo_scaling_factor`` :math:`s`. With the default ``lr = 2``, :math:`\alpha_k = 2 / (k + 2)`: the first step
replaces ``p`` by the vertex :math:`-s g`. The ball variants compute the LMO of each block of ``param_ndim`` in a
pre-step transform and use :math:`s = \epsilon`, so every iterate stays in the ball of radius :math:`\epsilon`:

* ``L1FrankWolfe``: :math:`\mathrm{sign}(g_{i^*})` at :math:`i^* = \arg\max_i |g_i|`, zeros elsewhere;
* ``L2FrankWolfe``: :math:`g / \lVert g \rVert_2`;  ``LinfFrankWolfe``: :math:`\mathrm{sign}(g)`;
* ``L1qFrankWolfe``: top-q, sign, L1-normalise (:class:`~gradstep.paramtransform.L1qNormedGradientOptim`).

Frank & Wolfe (1956), "An algorithm for quadratic programming"; Jaggi (2013), "Revisiting Frank-Wolfe".

.. warning::
    Differences from rai_toolbox 0.2.1: ``L1FrankWolfe`` works on blocks of any ndim (rai_toolbox raises
    ``IndexError`` for blocks of ndim >= 2; on 1-d blocks both agree); ``epsilon`` given in a param group is
    honoured (rai_toolbox ignores it and uses the constructor's); ``use_default_lr_schedule`` and
    ``div_by_zero_eps`` are group hyperparameters. The core's options that act on a gradient step (``clip_step``,
    ``backoff_steps``, ``lr_scale``, decoupled or proximal weight decay, ``nonfinite="revert"``, stochastic
    rounding) do not fit a convex step and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, boolean, non_negative
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import row_signed_argmax
from ..core.transform import GroupStep, Transform
from .base import ParamTransformingOptimizer
from .lp import EPSILON, TINY, L1qNormedGradientOptim, L2NormedGradientOptim, SignedGradientOptim

__all__ = ["FrankWolfe", "FrankWolfeStep", "L1FrankWolfe", "L1qFrankWolfe", "L2FrankWolfe", "LinfFrankWolfe"]


def _real(value: Any) -> str | None:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a real number"


class FrankWolfeStep(Transform):
    """The Frank-Wolfe step ``p <- (1 - alpha) p - alpha s g``, written after the core's (zero) gradient step.

    A Frank-Wolfe step is a convex combination, not ``p - lr * d``: it is written in :meth:`after_step`, rounded
    exactly as rai_toolbox rounds it (later LMOs break ties between equal entries, so iterates must agree to the bit),
    and the direction handed to the core is zero. State: the core's ``step``.
    """

    elementwise = True
    hypers = (
        Hyper("lmo_scaling_factor", 1.0, _real, "the vertex is -lmo_scaling_factor * grad (the ball's radius)"),
        Hyper("use_default_lr_schedule", True, boolean, "step size lr / (lr + k) at the k-th step (k from 0)"),
        Hyper("div_by_zero_eps", TINY, non_negative, "lower bound of lr + k in the schedule"),
    )

    def __init__(self) -> None:
        self._lmo: TensorList = []

    def check_group(self, group: dict[str, Any]) -> None:
        if not group["use_default_lr_schedule"] and not group["lr"] <= 1:
            raise ValueError(f"Invalid lr: {group['lr']!r} (must be in [0, 1] when use_default_lr_schedule=False)")
        # The core writes a zero step; options acting on that step would silently do nothing.
        for name, off in [("clip_step", 0.0), ("backoff_steps", 0), ("lr_scale", 1.0), ("stochastic_rounding", False)]:
            if group[name] != off:
                raise ValueError(f"Invalid {name}: {group[name]!r} (FrankWolfe takes convex steps; only {off!r})")
        if group["weight_decay_mode"] != "coupled" and group["weight_decay"] != 0:
            raise ValueError(f"Invalid weight_decay_mode: {group['weight_decay_mode']!r} (FrankWolfe: 'coupled' only)")
        if group["nonfinite"] == "revert":
            raise ValueError("Invalid nonfinite: 'revert' (FrankWolfe: 'error', 'skip' or 'zero')")

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        self._lmo = updates  # read by after_step of the same group step
        return ctx.ops.mul(updates, 0.0)

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        lmo, self._lmo = self._lmo, []
        lr = torch.as_tensor(ctx.hyper("lr"), dtype=torch.float64, device=ctx.steps.device)
        if ctx.hyper("use_default_lr_schedule"):  # k = ctx.steps - 1 steps taken before this one
            alpha = lr / torch.clamp(lr + (ctx.steps - 1), min=ctx.hyper("div_by_zero_eps"))
        else:
            alpha = lr.expand(ctx.steps.shape)
        ctx.ops.mul_(params, ctx.per_param(1 - alpha))
        step = ctx.ops.mul(lmo, ctx.per_param(-(alpha * ctx.hyper("lmo_scaling_factor"))))
        ctx.ops.add_(params, ctx.ops.to(step, [p.dtype for p in params]))  # fp32 state of bf16 parameters


class FrankWolfe(ChainedOptimizer):
    """Frank-Wolfe steps towards ``-lmo_scaling_factor * grad``; see the module docstring for the math.

    The gradient must already be the negative LMO (the ball variants compute it); ``lr`` must be in [0, 1] when
    ``use_default_lr_schedule=False``. Core options (``maximize``, ``foreach``, ``nonfinite``, ...) are keyword
    arguments; see :class:`~gradstep.ChainedOptimizer`. State: ``step``.

    Example::

        >>> import torch
        >>> from gradstep.paramtransform import FrankWolfe
        >>> x = torch.nn.Parameter(torch.ones(1))
        >>> opt = FrankWolfe([x])
        >>> for _ in range(3):
        ...     x.grad = torch.ones(1); _ = opt.step()
        >>> x.detach()
        tensor([-1.])
    """

    def __init__(
        self,
        params: Any,
        *,
        lr: float = 2.0,
        lmo_scaling_factor: float = 1.0,
        use_default_lr_schedule: bool = True,
        div_by_zero_eps: float = TINY,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [FrankWolfeStep()],
            lr=lr,
            lmo_scaling_factor=lmo_scaling_factor,
            use_default_lr_schedule=use_default_lr_schedule,
            div_by_zero_eps=div_by_zero_eps,
            **options,
        )


class _BallFrankWolfe(ParamTransformingOptimizer):
    """Frank-Wolfe in a ball of radius ``epsilon`` (a group hyperparameter), the inner's ``lmo_scaling_factor``.

    Further keyword ``options`` reach the next class of the MRO (the LMO's gradient transform, e.g. ``q`` of L1q).
    """

    def __init__(
        self,
        params: Any,
        *,
        epsilon: float,
        lr: float = 2.0,
        use_default_lr_schedule: bool = True,
        param_ndim: int | None = -1,
        div_by_zero_eps: float = TINY,
        **options: Any,
    ) -> None:
        kwargs = _fw_kwargs(epsilon, lr, use_default_lr_schedule, options)
        super().__init__(params, FrankWolfe, param_ndim=param_ndim, div_by_zero_eps=div_by_zero_eps, **kwargs)

    def _prepare_step(self) -> None:
        # rai_toolbox fixes the radius at construction; here a group's (or a scheduler's) epsilon is used.
        for group in self.param_groups:
            group["lmo_scaling_factor"] = group["epsilon"]


def _fw_kwargs(epsilon: float, lr: float, schedule: bool, options: dict[str, Any]) -> dict[str, Any]:
    defaults = {"epsilon": epsilon}
    return dict(defaults=defaults, lr=lr, lmo_scaling_factor=epsilon, use_default_lr_schedule=schedule, **options)


class L1FrankWolfe(_BallFrankWolfe):
    """Frank-Wolfe in the L1 ball of radius ``epsilon``: the LMO of each block is ``-sign(g_i*) e_i*``.

    Example::

        >>> import torch
        >>> from gradstep.paramtransform import L1FrankWolfe
        >>> x = torch.ones(2, requires_grad=True)
        >>> opt = L1FrankWolfe([x], epsilon=1.8, param_ndim=None)
        >>> (torch.tensor([1.0, 2.0]) * x).sum().backward(); opt.step()
        >>> x.detach()
        tensor([ 0.0000, -1.8000])
    """

    hypers = (EPSILON,)

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        if param.grad is not None:
            param.grad.copy_(row_signed_argmax([param.grad])[0])


class L2FrankWolfe(_BallFrankWolfe, L2NormedGradientOptim):
    """Frank-Wolfe in the L2 ball of radius ``epsilon``: the LMO of each block is ``-g / ||g||``."""

    hypers = (EPSILON,)


class LinfFrankWolfe(_BallFrankWolfe, SignedGradientOptim):
    """Frank-Wolfe in the Linf ball of radius ``epsilon``: the LMO is ``-sign(g)``."""

    hypers = (EPSILON,)


class L1qFrankWolfe(_BallFrankWolfe, L1qNormedGradientOptim):
    """Frank-Wolfe with the L1q LMO: top-q sparsified, signed, L1-normalised gradients, scaled by ``epsilon``."""

    hypers = (*L1qNormedGradientOptim.hypers, EPSILON)

    def __init__(
        self,
        params: Any,
        *,
        q: float,
        epsilon: float,
        dq: float = 0.0,
        lr: float = 2.0,
        use_default_lr_schedule: bool = True,
        param_ndim: int | None = -1,
        div_by_zero_eps: float = TINY,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            epsilon=epsilon,
            lr=lr,
            use_default_lr_schedule=use_default_lr_schedule,
            param_ndim=param_ndim,
            div_by_zero_eps=div_by_zero_eps,
            q=q,
            dq=dq,
            generator=generator,
            **options,
        )

r"""Gradient transforms and projections in Lp spaces (rai_toolbox's ``misc`` and ``lp_space``).

Each class wraps an inner optimizer (default :class:`gradstep.SGD`) and acts on every block of a parameter's
batched view (``param_ndim``, see :class:`~gradstep.paramtransform.ParamTransformingOptimizer`):

* ``TopQGradientOptimizer`` (-1): keep the ``round((1 - q) n)`` largest-:math:`|g|` entries of each block of ``n``;
* ``ClampedGradientOptimizer`` (None): :math:`g \leftarrow \mathrm{clamp}(g, min, max)`;
* ``SignedGradientOptim`` (None): :math:`g \leftarrow \mathrm{sign}(g)`;
* ``L1NormedGradientOptim``, ``L2NormedGradientOptim`` (-1): :math:`g \leftarrow g / \max(\lVert g \rVert_p, \delta)`;
* ``L1qNormedGradientOptim`` (-1): top-q, then sign, then L1-normalise;
* ``ClampedParameterOptimizer`` (None): after the step, :math:`p \leftarrow \mathrm{clamp}(p, min, max)`;
* ``L2ProjectedOptim`` (-1): L2-normalised :math:`g`; after the step, :math:`p` projected on the L2 ball;
* ``LinfProjectedOptim`` (None): :math:`\mathrm{sign}(g)`; after the step, :math:`p` clamped to
  :math:`[-\epsilon, \epsilon]`.

(default ``param_ndim`` in parentheses.) With SGD, ``L2ProjectedOptim`` and ``LinfProjectedOptim`` are projected
gradient descent (PGD; Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks",
arXiv:1706.06083) in L2 and Linf balls.

.. warning::
    Differences from rai_toolbox 0.2.1: ``q`` and ``epsilon`` have no default (rai_toolbox silently uses 0.001);
    0-d parameters work with ``param_ndim=-1``; hyperparameters given through ``add_param_group`` are validated;
    invalid values raise ``ValueError`` (some ``TypeError`` in rai_toolbox); ``defaults`` is never modified;
    ``param.grad`` is left as the user set it (the inner optimizer steps with a transformed copy; rai_toolbox writes
    the transformed gradient into ``param.grad``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import REQUIRED, Hyper, non_negative, unit_interval_closed
from ..core.reductions import keep_top_k, row_lp_norms, row_norms
from ..optim.sgd import SGD
from .base import ParamTransformingOptimizer
from .chained import ChainedParamTransformingOptimizer

__all__ = [
    "ClampedGradientOptimizer",
    "ClampedParameterOptimizer",
    "L1NormedGradientOptim",
    "L1qNormedGradientOptim",
    "L2NormedGradientOptim",
    "L2ProjectedOptim",
    "LinfProjectedOptim",
    "SignedGradientOptim",
    "TopQGradientOptimizer",
    "project_l2_ball_",
    "sample_q",
    "top_q",
]

TINY = torch.finfo(torch.float32).tiny


def _optional_real(value: Any) -> str | None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value))
    return None if ok else "must be None or a real number"


Q = Hyper("q", REQUIRED, unit_interval_closed, "fraction of each block's entries zeroed (smallest |g| first)")
DQ = Hyper("dq", 0.0, unit_interval_closed, "q is drawn uniformly from [q - dq, q + dq] (clipped to [0, 1])")
EPSILON = Hyper("epsilon", REQUIRED, non_negative, "radius of the ball")
CLAMP = (Hyper("clamp_min", None, _optional_real, "lower bound"), Hyper("clamp_max", None, _optional_real, "upper"))


def check_clamp(group: dict[str, Any]) -> None:
    lo, hi = group["clamp_min"], group["clamp_max"]
    if lo is None and hi is None:
        raise ValueError("Invalid clamp_min/clamp_max: at least one of them must be given")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Invalid clamp_min: {lo!r} (must be <= clamp_max = {hi!r})")


def check_generator(generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    return generator


def sample_q(q: float, dq: float, generator: torch.Generator | None) -> float:
    """``q``, or with ``dq > 0`` a draw from ``U[max(0, q - dq), min(1, q + dq)]``, as rai_toolbox draws it."""
    if dq <= 0:
        return q
    lo, hi = max(0.0, q - dq), min(1.0, q + dq)
    device = generator.device if generator is not None else None
    # One float32 draw, scaled in float32 as rai_toolbox does, so the same generator gives the same q.
    return float((hi - lo) * torch.rand(1, generator=generator, device=device) + lo)


def project_l2_ball_(blocks: Tensor, epsilon: float) -> None:
    """``blocks.renorm_(p=2, dim=0, maxnorm=epsilon)``, in a form that also runs on sharded (DTensor) blocks.

    ``torch.renorm`` scales each row whose L2 norm exceeds ``maxnorm`` by ``maxnorm / (norm + 1e-7)``, with the norm,
    the limit and the factor in the norm's dtype (float32 for half precision), and leaves the other rows alone.
    DTensor has no sharding rule for it (FSDP2); here the row norms are the shared, sharding-aware ones and the rest is
    elementwise, with the same operations in the same dtypes, so the result on plain tensors is bitwise renorm's.
    """
    norms = row_norms([blocks])[0]
    limit = torch.full_like(norms, epsilon)  # maxnorm rounded to the norm's dtype, as renorm does
    # limit / (norms + 1e-7) is a true division (a Python number over a tensor would be a reciprocal times it).
    factor = torch.where(norms > limit, limit / (norms + 1e-7), torch.ones_like(norms))
    blocks.mul_(factor.to(blocks.dtype))


def top_q(view: Tensor, q: float) -> Tensor:
    """Keep the ``round((1 - q) n)`` largest-magnitude entries of each block of ``n`` (Python's rounding)."""
    return keep_top_k([view], [round((1.0 - q) * math.prod(view.shape[1:]))])[0]


class TopQGradientOptimizer(ParamTransformingOptimizer):
    """Zeros all but the largest-magnitude ``1 - q`` fraction of each gradient block before the inner step.

    ``k = round((1 - q) * n)`` entries are kept in each block of ``n`` (Python's round-half-to-even: q = 0.5 keeps
    2 of 5 and 4 of 7); ties are broken by ``torch.topk``. With ``dq > 0``, ``q`` is redrawn for every parameter at
    every step from ``generator``. ``q`` is required.

    Example::

        >>> import torch
        >>> from gradstep.paramtransform import TopQGradientOptimizer
        >>> x = torch.ones(2, 2, requires_grad=True)
        >>> opt = TopQGradientOptimizer([x], lr=1.0, q=0.5, param_ndim=None)
        >>> x.backward(gradient=torch.tensor([[0.5, 1.0], [-2.5, 0.3]])); opt.step()
        >>> x.detach()  # SGD stepped with the gradient [[0, 1], [-2.5, 0]] (x.grad is left as it was)
        tensor([[1.0000, 0.0000],
                [3.5000, 1.0000]])
    """

    hypers = (Q, DQ)

    def __init__(
        self,
        params: Any = None,
        InnerOpt: Any = SGD,
        *,
        q: float = REQUIRED,
        dq: float = 0.0,
        param_ndim: int | None = -1,
        grad_scale: float = 1.0,
        grad_bias: float = 0.0,
        defaults: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        **inner_opt_kwargs: Any,
    ) -> None:
        self._generator = check_generator(generator)
        defaults = {**(defaults or {})}
        defaults.setdefault("q", q)
        defaults.setdefault("dq", dq)
        super().__init__(
            params,
            InnerOpt,
            param_ndim=param_ndim,
            grad_scale=grad_scale,
            grad_bias=grad_bias,
            defaults=defaults,
            **inner_opt_kwargs,
        )

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        g = param.grad
        if g is not None:
            g.copy_(top_q(g, sample_q(optim_group["q"], optim_group["dq"], self._generator)))


class _ClampedOptim(ParamTransformingOptimizer):
    hypers = CLAMP

    def __init__(
        self,
        params: Any = None,
        InnerOpt: Any = SGD,
        *,
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        param_ndim: int | None = None,
        grad_scale: float = 1.0,
        grad_bias: float = 0.0,
        defaults: dict[str, Any] | None = None,
        **inner_opt_kwargs: Any,
    ) -> None:
        defaults = {**(defaults or {})}
        defaults.setdefault("clamp_min", clamp_min)
        defaults.setdefault("clamp_max", clamp_max)
        super().__init__(
            params,
            InnerOpt,
            param_ndim=param_ndim,
            grad_scale=grad_scale,
            grad_bias=grad_bias,
            defaults=defaults,
            **inner_opt_kwargs,
        )

    def check_group(self, group: dict[str, Any]) -> None:
        check_clamp(group)


class ClampedGradientOptimizer(_ClampedOptim):
    """Clamps each gradient element to ``[clamp_min, clamp_max]`` (at least one given) before the inner step."""

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        if param.grad is not None:
            param.grad.clamp_(min=optim_group["clamp_min"], max=optim_group["clamp_max"])


class ClampedParameterOptimizer(_ClampedOptim):
    """Clamps each parameter element to ``[clamp_min, clamp_max]`` (at least one given) after the inner step."""

    def _post_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        param.clamp_(min=optim_group["clamp_min"], max=optim_group["clamp_max"])


class SignedGradientOptim(ParamTransformingOptimizer):
    """Replaces each gradient by its sign (0 stays 0) before the inner step (signSGD with SGD)."""

    def __init__(
        self, params: Any = None, InnerOpt: Any = SGD, *, param_ndim: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(params, InnerOpt, param_ndim=param_ndim, **kwargs)

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        if param.grad is not None:
            torch.sign(param.grad, out=param.grad)


class _LpNormedOptim(ParamTransformingOptimizer):
    p: float

    def __init__(
        self, params: Any = None, InnerOpt: Any = SGD, *, div_by_zero_eps: float = TINY, **kwargs: Any
    ) -> None:
        if non_negative(div_by_zero_eps) is not None:
            raise ValueError(f"Invalid div_by_zero_eps: {div_by_zero_eps!r} (must be a real number >= 0)")
        self.div_by_zero_eps = div_by_zero_eps
        super().__init__(params, InnerOpt, **kwargs)

    def _pre_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        if param.grad is not None:
            param.grad.div_(torch.clamp(row_lp_norms([param.grad], self.p)[0], min=self.div_by_zero_eps))


class L1NormedGradientOptim(_LpNormedOptim):
    """Divides each gradient block by ``max(||g||_1, div_by_zero_eps)`` before the inner step."""

    p = 1


class L2NormedGradientOptim(_LpNormedOptim):
    """Divides each gradient block by ``max(||g||_2, div_by_zero_eps)`` before the inner step (a zero block stays 0)."""

    p = 2


class L2ProjectedOptim(L2NormedGradientOptim):
    """Normalised-gradient steps projected on the L2 ball of radius ``epsilon`` (required), block by block.

    After the inner step each block with ``||p|| > epsilon`` is scaled by ``epsilon / (||p|| + 1e-7)``
    (``torch.renorm``'s formula, see :func:`project_l2_ball_`); the others are left alone. A block [3, 4] with epsilon 1
    becomes [0.6, 0.8].
    """

    hypers = (EPSILON,)

    def __init__(self, params: Any = None, InnerOpt: Any = SGD, *, epsilon: float = REQUIRED, **kwargs: Any) -> None:
        kwargs["defaults"] = {"epsilon": epsilon, **(kwargs.get("defaults") or {})}
        super().__init__(params, InnerOpt, **kwargs)

    def _post_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        project_l2_ball_(param, optim_group["epsilon"])


class LinfProjectedOptim(SignedGradientOptim):
    """Signed-gradient steps with each parameter clamped to ``[-epsilon, epsilon]`` (epsilon required): Linf PGD."""

    hypers = (EPSILON,)

    def __init__(self, params: Any = None, InnerOpt: Any = SGD, *, epsilon: float = REQUIRED, **kwargs: Any) -> None:
        kwargs["defaults"] = {"epsilon": epsilon, **(kwargs.get("defaults") or {})}
        super().__init__(params, InnerOpt, **kwargs)

    def _post_step_transform_(self, param: Tensor, optim_group: dict[str, Any]) -> None:
        eps = optim_group["epsilon"]
        param.clamp_(min=-eps, max=eps)


class L1qNormedGradientOptim(ChainedParamTransformingOptimizer):
    """Top-q sparsified, signed, L1-normalised gradients: each block becomes ``±1/k`` on its ``k`` kept entries.

    The chain ``TopQGradientOptimizer(q, dq) → SignedGradientOptim → L1NormedGradientOptim``; ``q`` is required.
    """

    hypers: ClassVar[tuple[Hyper, ...]] = (Q, DQ)

    def __init__(
        self,
        params: Any = None,
        InnerOpt: Any = SGD,
        *,
        q: float = REQUIRED,
        dq: float = 0.0,
        param_ndim: int | None = -1,
        grad_scale: float = 1.0,
        grad_bias: float = 0.0,
        defaults: dict[str, Any] | None = None,
        div_by_zero_eps: float = TINY,
        generator: torch.Generator | None = None,
        **inner_opt_kwargs: Any,
    ) -> None:
        super().__init__(
            partial(TopQGradientOptimizer, q=q, dq=dq, generator=generator),
            SignedGradientOptim,
            partial(L1NormedGradientOptim, div_by_zero_eps=div_by_zero_eps),
            params=params,
            InnerOpt=InnerOpt,
            param_ndim=param_ndim,
            grad_scale=grad_scale,
            grad_bias=grad_bias,
            defaults={"q": q, "dq": dq, **(defaults or {})},
            **inner_opt_kwargs,
        )

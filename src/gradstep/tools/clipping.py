r"""Gradient clipping outside the optimizer step: ALF's wrapper semantics for any ``torch.optim.Optimizer``.

Two ways to clip exist in gradstep, for two different needs:

* **Inside a gradstep chain** (:class:`~gradstep.transforms.ClipByGlobalNorm`, :class:`~gradstep.transforms.ClipByNorm`,
  :class:`~gradstep.transforms.ClipByValue`): the transform clips the *direction* it receives, out of place. The
  user's ``p.grad`` is never written, as everywhere in a gradstep step.
* **Before any optimizer's step** (this module): :func:`clip_gradients` is a one-off call, like
  ``torch.nn.utils.clip_grad_norm_``, and :class:`GradientClipping` attaches the same call to an optimizer so that it
  runs at the start of every ``step``, which is what ALF's wrapped optimizers do with their ``gradient_clipping``
  option (spec A.4.3). Both write the clipped gradient into ``p.grad`` *in place*: that is what was asked for, the
  clipped gradient stays visible afterwards (as in ALF and torch), and it costs no copy.

The rule (ALF, spec A.4.3), with limit :math:`c` and the gradients' L2 norm :math:`G` (global or per tensor):

.. math::
    s = \frac{c}{G + \epsilon}, \qquad g \leftarrow s\, g \ \text{ if } s < 1 \text{ (else unchanged)}

ALF uses :math:`\epsilon = 0`, the default here: a zero gradient (:math:`s = \infty`) is left alone and a NaN norm
(:math:`s` NaN, so ``s < 1`` is false) disables the clipping, so a NaN in one gradient does not spread to the others.
An infinite norm gives :math:`s = 0` and zeroes every gradient (the infinite elements become NaN), as in ALF and torch.
``eps=1e-6`` gives ``torch.nn.utils.clip_grad_norm_`` exactly (it multiplies by :math:`\min(s, 1)` always, which is the
same number for every finite norm). The test ``s < 1`` is evaluated on the device (``torch.where``), without the host
sync of ALF's Python ``if``.

References: ALF ``alf/optimizers/optimizers.py`` (``gradient_clipping``, ``clip_by_global_norm``) and
``alf/utils/tensor_utils.py`` (``clip_by_global_norm``, ``clip_by_norms``); Pascanu et al., "On the difficulty of
training recurrent neural networks", ICML 2013.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..core.ops import FOREACH
from ..core.reductions import global_norm, tensor_norms

__all__ = ["CLIP_MODES", "GradientClipping", "clip_gradients", "clip_scale"]

CLIP_MODES = ("global", "tensor", "value")


def clip_scale(norms: Tensor, limit: float | Tensor, eps: float = 0.0) -> Tensor:
    r"""ALF's clipping factor for each norm: :math:`s = c / (G + \epsilon)` where :math:`s < 1`, else 1.

    A zero norm gives 1 (no clipping), a NaN norm gives 1 (no clipping), an infinite norm gives 0. The result has
    the dtype of ``norms`` and is computed without a host sync.
    """
    s = limit / (norms + eps) if eps else limit / norms
    return torch.where(s < 1, s, torch.ones_like(s))


def _check_limit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number > 0)")
    return float(value)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"Invalid eps: {eps!r} (must be a finite real number >= 0)")
    return float(eps)


def _check_mode(by: str) -> str:
    if by not in CLIP_MODES:
        raise ValueError(f"Invalid by: {by!r} (must be one of {', '.join(map(repr, CLIP_MODES))})")
    return by


def _parameters(source: Any) -> list[Tensor]:
    """The distinct tensors of an optimizer (all its groups), of param-group dicts, of tensors, or of one tensor."""
    if isinstance(source, torch.optim.Optimizer):
        items: Iterable[Any] = [p for g in source.param_groups for p in g["params"]]
    elif isinstance(source, Tensor):
        items = [source]
    else:
        items = []
        for item in source:
            items.extend(item["params"] if isinstance(item, dict) else [item])  # type: ignore[attr-defined]
    seen: set[int] = set()
    params: list[Tensor] = []
    for p in items:
        if not isinstance(p, Tensor):
            raise TypeError(f"expected tensors, got {type(p).__name__}")
        # A tensor listed twice must not be clipped twice.
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _grads(params: list[Tensor]) -> list[Tensor]:
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("gradient clipping does not support sparse gradients")
    return grads


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    # foreach kernels need one device and one dtype per call, as in torch.nn.utils.clip_grad_norm_.
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets


@torch.no_grad()
def clip_gradients(params_or_optimizer: Any, max_norm: float, by: str = "global", *, eps: float = 0.0) -> Tensor:
    r"""Clip the gradients ``p.grad`` in place, as ALF's wrapped optimizers do before their step (spec A.4.3).

    Args:
        params_or_optimizer: an optimizer (every parameter of every group), param-group dicts, tensors, or a tensor.
            Tensors without a gradient are skipped; a tensor listed twice is clipped once.
        max_norm: the limit :math:`c > 0`: of the global L2 norm (``by="global"``), of each tensor's L2 norm
            (``by="tensor"``), or of each element's absolute value (``by="value"``, the ``clip_grad_value_`` rule
            :math:`g \leftarrow \mathrm{clamp}(g, -c, c)`).
        by: ``"global"``, ``"tensor"`` or ``"value"``.
        eps: added to the norm in :math:`s = c/(G + \epsilon)`; 0 is ALF's rule, 1e-6 is torch's ``clip_grad_norm_``.

    Returns:
        The global L2 norm of the gradients before clipping (a 0-d tensor, 0 when there is no gradient), in every
        mode, for logging.
    """
    limit = _check_limit("max_norm", max_norm)
    _check_mode(by)
    eps = _check_eps(eps)
    grads = _grads(_parameters(params_or_optimizer))
    if not grads:
        return torch.zeros(())
    if by == "global":
        total = global_norm(grads)
        scale = clip_scale(total, limit, eps)
        for (device, _), bucket in _by_device_and_dtype(grads).items():
            torch._foreach_mul_(bucket, scale.to(device))
        return total
    norms = tensor_norms(grads)
    total = torch.linalg.vector_norm(norms)  # the global norm, from the per-tensor norms already at hand
    if by == "value":
        for bucket in _by_device_and_dtype(grads).values():
            torch._foreach_clamp_min_(bucket, -limit)
            torch._foreach_clamp_max_(bucket, limit)
    else:
        scales = clip_scale(norms, limit, eps)
        FOREACH.mul_(grads, [s.to(g.device) for s, g in zip(scales.unbind(0), grads)])
    return total


class GradientClipping:
    r"""Clip the gradients of an optimizer's parameters in place at the start of every ``step()`` (ALF's option).

    ALF's wrapped optimizers take ``gradient_clipping=c, clip_by_global_norm=...`` and clip ``p.grad`` before the
    base step (spec A.4.3). This attaches the same behaviour to *any* ``torch.optim.Optimizer`` (gradstep's included)
    through a step pre-hook, so the optimizer keeps its class, its ``state_dict``, its schedulers and its
    ``GradScaler`` support (the scaler unscales before calling ``step``, so the unscaled gradient is clipped). With a
    closure, the clipping runs right after each evaluation of the closure, on the gradients it computed (ALF clips
    before the closure runs, that is, the previous gradients).

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        clipping = GradientClipping(opt, max_norm=1.0)          # by="global"
        ...
        loss.backward(); opt.step()                              # grads clipped, then AdamW
        log(clipping.last_norm)                                  # pre-clip global norm of that step
        clipping.remove()                                        # detach

    Args:
        optimizer: the optimizer whose parameters (all groups, read at every step) are clipped.
        max_norm, by, eps: as in :func:`clip_gradients`.

    Attributes:
        last_norm: the pre-clip global gradient norm of the last step (a 0-d tensor), ``None`` before the first.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, by: str = "global", eps: float = 0.0) -> None:
        self.max_norm = _check_limit("max_norm", max_norm)
        self.by = _check_mode(by)
        self.eps = _check_eps(eps)
        self.optimizer = optimizer
        self.last_norm: Tensor | None = None
        self._handle: Any = optimizer.register_step_pre_hook(self._before_step)

    @classmethod
    def from_alf(
        cls, optimizer: torch.optim.Optimizer, gradient_clipping: float, clip_by_global_norm: bool = False
    ) -> GradientClipping:
        """ALF's option names: ``clip_by_global_norm=False`` (ALF's default) clips each tensor by its own norm."""
        return cls(optimizer, gradient_clipping, by="global" if clip_by_global_norm else "tensor")

    def clip(self) -> Tensor:
        """Clip the optimizer's gradients now; returns (and records) the pre-clip global norm."""
        self.last_norm = clip_gradients(self.optimizer, self.max_norm, self.by, eps=self.eps)
        return self.last_norm

    def _before_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # args[0] is the optimizer itself; a closure comes as args[1] or as the keyword ``closure``.
        if len(args) > 1 and args[1] is not None:
            return (args[0], self._wrap(args[1]), *args[2:]), kwargs
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self._wrap(kwargs["closure"])}
        self.clip()
        return None

    def _wrap(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def clipped_closure() -> Any:
            loss = closure()
            self.clip()
            return loss

        return clipped_closure

    def remove(self) -> None:
        """Stop clipping (detach the hook)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __repr__(self) -> str:
        return f"GradientClipping(max_norm={self.max_norm}, by={self.by!r}, eps={self.eps})"

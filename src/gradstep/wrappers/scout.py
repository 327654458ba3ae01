r"""Scout (holocron's variant of Lookahead; no paper): the rate of each synchronisation follows the updates' coherence.

The rate of each synchronisation is :math:`r = \max(1 - c, \alpha)`, where the *update coherence* c is read from
the k updates of the period, :math:`U_i = \theta_i - \theta_{i-1}` (:math:`\theta_0` is the value after the previous
synchronisation). Element by element,

.. math::
    s = \sqrt{\tfrac{1}{k-1} \textstyle\sum_i (U_i - \bar U)^2},\qquad d = \max_i |U_i - \bar U|,

each parameter contributes the mean of :math:`s/d` over its elements, and c is the average over parameters.
holocron's Scout turns c into NaN as soon as one element has :math:`d = 0` (equal updates, e.g. an element that does not
move, or ``k = 1``), and a NaN rate freezes the model at its slow weights (spec H.10). Here such elements are left out
of their parameter's mean, a parameter with no element left is left out of the average, and with nothing left
(``k = 1``, or no element whose updates vary) the rate is :math:`\alpha`, as for Lookahead.

Everything else (slow weights, ``slow_copy``, pullback momentum, checkpoints) is
:class:`~gradstep.wrappers.lookahead.Lookahead`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.ops import FOREACH
from ..core.reductions import tensor_sums
from ..core.registry import Entry, register
from .lookahead import _LOOKAHEAD, _WRAPPER_INVALID, SLOW, Lookahead, _as_dtype

__all__ = ["Scout"]

_STATS = ("prev_param", "delta_mean", "delta_m2", "delta_max", "delta_min")


class Scout(Lookahead):
    r"""holocron's Scout: Lookahead whose rate is :math:`\max(1 - c, \alpha)`, c the update coherence of the period.

    Same arguments as :class:`Lookahead`; see the module docstring for the math. Unlike holocron's, it never turns
    the rate into NaN (which freezes the model at its slow weights): elements whose k updates are all equal are left
    out of the coherence, and with no element left the rate is ``alpha``. The coherence of the last synchronisation
    is :attr:`last_coherence` (``None`` when nothing was left).

    Instead of holocron's k+1 snapshots per parameter, the statistics are kept as running values (Welford's mean and
    sum of squared deviations, and the largest and smallest update) in the state: ``prev_param``, ``delta_mean``,
    ``delta_m2``, ``delta_max``, ``delta_min``, besides ``slow_param``. Complex parameters are refused.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.wrappers.Scout(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
        >>> for g in ([0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.5, 0.5, 0.1]):
        ...     w.grad = torch.tensor(g); _ = opt.step()
        >>> round(opt.last_coherence, 3), w.detach()  # spec H.10's check values
        (0.964, tensor([0.9550, 1.9600, 2.9700]))
    """

    _PICKLED = Lookahead._PICKLED + ("last_coherence",)
    _observes = True
    last_coherence: float | None = None

    def _check_param(self, p: Tensor) -> None:
        if p.is_complex():
            raise TypeError("Scout does not support complex parameters")

    def _supports_complex(self) -> bool:
        return False

    def _state_keys(self, settings: Mapping[str, Any]) -> set[str]:
        return super()._state_keys(settings) | set(_STATS)

    def _required_keys(self) -> set[str]:
        return super()._required_keys() | set(_STATS)

    def _init_param_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_param_state(p, state)
        state["prev_param"] = state[SLOW].clone()
        # Zeros are the exact statistics of the steps of this period taken before the parameter was tracked: the
        # inner optimizer did not move it then (it had no gradient).
        for name in _STATS[1:]:
            state[name] = torch.zeros_like(state[SLOW])

    def _observe(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        if not tracked:
            return
        prev, mean, m2, high, low = ([state[name] for _, state in tracked] for name in _STATS)
        current = _as_dtype([p.detach() for p, _ in tracked], prev)
        update = torch._foreach_sub(current, prev)
        i = (self._counters["fast_steps"] - 1) % self.k + 1  # this update's number in the period
        if i == 1:
            FOREACH.copy_(mean, update)
            torch._foreach_zero_(m2)
            FOREACH.copy_(high, update)
            FOREACH.copy_(low, update)
        else:  # Welford's update of the mean and of the sum of squared deviations
            delta = torch._foreach_sub(update, mean)
            torch._foreach_add_(mean, delta, alpha=1.0 / i)
            torch._foreach_addcmul_(m2, delta, torch._foreach_sub(update, mean))
            torch._foreach_maximum_(high, update)
            torch._foreach_minimum_(low, update)
        FOREACH.copy_(prev, current)

    def _sync_rate(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> float:
        k = self.k
        coherence = None
        ratios, varying = [], []
        for p, state in tracked if k > 1 else ():
            if p.numel() == 0:
                continue
            mean = state["delta_mean"]
            dev = torch.maximum(state["delta_max"] - mean, mean - state["delta_min"])  # max_i |U_i - mean|
            std = (state["delta_m2"] / (k - 1)).clamp_min(0).sqrt()
            varies = dev > 0
            # float64 before summing: the sums of many ratios, and exact counts whatever the parameter's dtype.
            ratios.append(torch.where(varies, std / dev, 0.0).to(torch.float64))
            varying.append(varies.to(torch.float64))
        if ratios:
            # Per-parameter sums through the shared reductions: for sharded (DTensor) state, local sums all-reduced
            # over the mesh, so every rank gets the whole parameter's sums as plain tensors.
            total, count = tensor_sums(ratios), tensor_sums(varying)
            kept = count > 0
            if bool(kept.any()):
                # The mean over the parameters with an element that varies (the others are masked out, not indexed).
                means = torch.where(kept, total / count.clamp_min(1.0), 0.0)
                coherence = float(means.sum() / kept.sum())
        self.last_coherence = coherence
        return float(self.alpha) if coherence is None else max(1.0 - coherence, float(self.alpha))

    def _sync(self, tracked: list[tuple[Tensor, dict[str, Any]]]) -> None:
        super()._sync(tracked)
        if tracked:  # the next period's updates are measured from the synchronised parameters
            prev = [state["prev_param"] for _, state in tracked]
            FOREACH.copy_(prev, _as_dtype([p.detach() for p, _ in tracked], prev))


register(
    Entry(
        "scout",
        Scout,
        "holocron's Scout: Lookahead whose rate grows as the period's updates lose coherence; inner='sgd' unless given",
        _LOOKAHEAD + " (Scout: holocron, no paper)",
        ("holocron.optim.Scout (pylocron 0.3.0)",),
        preset={"inner": "sgd"},
        example={"lr": 5e-2, "momentum": 0.9},
        invalid=_WRAPPER_INVALID + (({"momentum": -0.5}, "momentum"),),
        sharding="whole-tensor",
    )
)

r"""Learning-rate schedules: GoMLX's cosine annealing with warm restarts, with an optional linear warm-up.

GoMLX (``ml/train/optimizers/cosineschedule``, v0.23.2) rewrites the shared learning rate before every training step
from its own step counter :math:`s = 0, 1, 2, \dots`:

.. math::
    c = \frac{s}{T}, \qquad \phi = c - \lfloor c \rfloor, \qquad
    \eta_s = \eta_\min + (\eta_\max - \eta_\min)\, \frac{1 + \cos(\pi \phi)}{2},

with a period of :math:`T` steps, or, for a negative period :math:`-k`, :math:`T = \text{total} / k` (``k``
cycles over the whole run). The rate falls from :math:`\eta_\max` toward :math:`\eta_\min` over a period and jumps
back to :math:`\eta_\max` at each restart (Loshchilov and Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm
Restarts", ICLR, arXiv:1608.03983, with every period the same length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["CosineSchedule"]


def _per_group(name: str, value: float | Sequence[float], n: int) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} param groups")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        out.append(float(v))
    return out


class CosineSchedule(LRScheduler):
    r"""GoMLX's cosine annealing with warm restarts, as a ``torch.optim.lr_scheduler.LRScheduler``.

    At scheduler step :math:`s` (the optimizer's :math:`s`-th step, counted from 0, so its first step uses
    :math:`\eta_\max`), for each param group, with :math:`W` warm-up steps and :math:`f_0` the warm-up start
    factor:

    .. math::
        \eta_s = \begin{cases}
            \eta_\max \left(f_0 + (1 - f_0)\, s / W\right) & s < W \\
            \eta_\min + (\eta_\max - \eta_\min)\, \dfrac{1 + \cos(\pi\, \mathrm{frac}((s - W) / T))}{2} & s \ge W
        \end{cases}

    where :math:`T` is ``period_steps`` when positive, and :math:`(\text{total\_steps} - W) / k` for
    ``period_steps = -k`` (``k`` cycles over the steps after the warm-up; GoMLX has no warm-up, so there
    :math:`T = \text{total} / k`). :math:`\eta_\max` is the group's initial lr (``initial_lr``, set when the scheduler
    is created) unless ``max_lr`` is given.

    The rate is a closed-form function of the step, so a scheduler restored with :meth:`load_state_dict` continues
    exactly; loading also writes the current rate into the optimizer's groups, so the order in which the optimizer
    and the scheduler are restored does not matter.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (gradstep's included).
        period_steps: the period in steps (> 0), or ``-k`` for ``k`` periods over ``total_steps``; 0 is refused
            (GoMLX silently disables the schedule).
        min_lr: :math:`\eta_\min`, one value or one per group (default 0, as GoMLX).
        total_steps: the run's length in steps; required when ``period_steps < 0``.
        max_lr: :math:`\eta_\max`, one value or one per group (default: each group's initial lr). GoMLX's
            ``LearningRate(x)``.
        warmup_steps: :math:`W`, the number of linear warm-up steps before the first period (default 0).
        warmup_start_factor: :math:`f_0 \in [0, 1]`, the fraction of :math:`\eta_\max` at step 0 (default 0).
        last_epoch: as in every torch scheduler (-1 to start).

    Example::

        >>> import torch
        >>> from gradstep.tools.schedules import CosineSchedule
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = CosineSchedule(opt, period_steps=4, min_lr=0.0)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4)); opt.step(); sched.step()
        >>> lrs
        [1.0, 0.8536, 0.5, 0.1464, 1.0, 0.8536]

    Reference: GoMLX ``cosineschedule.New(...).PeriodInSteps(n).MinLearningRate(x).Done()``; its unit test checks
    :math:`0.001 + 0.999\,(1 + \cos(\pi\,\mathrm{frac}(s/100)))/2` for period 100, lr 1, min 0.001.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        period_steps: int,
        min_lr: float | Sequence[float] = 0.0,
        *,
        total_steps: int | None = None,
        max_lr: float | Sequence[float] | None = None,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        n = len(optimizer.param_groups)
        if isinstance(period_steps, bool) or not isinstance(period_steps, int) or period_steps == 0:
            raise ValueError(f"period_steps must be a non-zero integer, got {period_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if period_steps < 0:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= warmup_steps:
                raise ValueError(
                    f"total_steps must be an integer > warmup_steps ({warmup_steps}) when period_steps < 0 "
                    f"(a fraction of the run), got {total_steps!r}"
                )
        elif total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)):
            raise ValueError(f"total_steps must be an integer or None, got {total_steps!r}")
        if not isinstance(warmup_start_factor, (int, float)) or not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_start_factor must lie in [0, 1], got {warmup_start_factor!r}")
        self.period_steps = period_steps
        self.total_steps = total_steps
        self.min_lrs = _per_group("min_lr", min_lr, n)
        self.max_lrs = None if max_lr is None else _per_group("max_lr", max_lr, n)
        self.warmup_steps = warmup_steps
        self.warmup_start_factor = float(warmup_start_factor)
        super().__init__(optimizer, last_epoch)

    def _lr(self, step: int, lr_max: float, lr_min: float) -> float:
        warmup = self.warmup_steps
        if step < warmup:
            f0 = self.warmup_start_factor
            return lr_max * (f0 + (1.0 - f0) * step / warmup)
        s = step - warmup
        if self.period_steps > 0:
            cycle = s / self.period_steps
        else:
            assert self.total_steps is not None  # checked in __init__
            period = (self.total_steps - warmup) / -self.period_steps
            cycle = max(s / period, 0.0)
        frac = cycle - math.floor(cycle)
        return lr_min + (lr_max - lr_min) * (1.0 + math.cos(math.pi * frac)) / 2.0

    def _max_lrs(self) -> list[float]:
        if self.max_lrs is not None:
            return self.max_lrs
        return [float(b.item()) if isinstance(b, Tensor) else float(b) for b in self.base_lrs]

    def get_lr(self) -> list[float | Tensor]:
        """The rate of every group at step ``last_epoch``."""
        step = max(self.last_epoch, 0)
        return [self._lr(step, hi, lo) for hi, lo in zip(self._max_lrs(), self.min_lrs)]

    _get_closed_form_lr = get_lr

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and write the restored step's rate into the optimizer's groups."""
        super().load_state_dict(state_dict)
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in self.optimizer.param_groups
        ]

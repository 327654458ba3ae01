r"""Stochastic gradient descent with momentum (torch semantics), and GoMLX's ``lr / sqrt(t)`` decay.

.. math::
    b_1 = g_1,\quad b_t = \mu b_{t-1} + (1-\tau) g_t,\quad
    d_t = g_t + \mu b_t \ \text{(nesterov)}\ \text{or}\ b_t,\quad
    p \leftarrow p - \frac{lr}{\sqrt{t}^{[\text{sqrt\_step\_decay}]}}\, d_t

Robbins & Monro (1951); momentum: Polyak (1964); Nesterov: Sutskever et al. (2013), "On the importance of
initialization and momentum in deep learning". fastai's SGD is ``weight_decay_mode="decoupled"``; GoMLX's is
``lr=0.1, sqrt_step_decay=True`` (see :mod:`gradstep.recipes`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..transforms import Momentum, SqrtStepDecay

__all__ = ["SGD"]


class SGD(ChainedOptimizer):
    """SGD, a drop-in for ``torch.optim.SGD``; ``sqrt_step_decay=True`` divides the step by ``sqrt(t)`` (GoMLX).

    Sparse gradients (``nn.Embedding(sparse=True)``) are stepped as torch steps them, plain, with momentum, dampening
    or Nesterov; coupled ``weight_decay`` with a sparse gradient is refused, naming the parameter (torch fails there
    with an internal ``add(sparse, dense)`` error), while ``weight_decay_mode="decoupled"`` works.

    .. warning::
        Differences from ``torch.optim.SGD`` with sparse gradients: the momentum buffer is dense (torch keeps a
        sparse one; the values are the same, and a torch dict's sparse buffer loads densified), so with repeated
        indices the buffer sums them before the step where torch adds them to the parameter one by one: the same
        math, rounded differently.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = gradstep.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([1.0, 1.0]); _ = opt.step(); _ = opt.step()
        >>> w.detach()
        tensor([0.7100, 1.7100])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        sqrt_step_decay: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [Momentum(), SqrtStepDecay()],
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            sqrt_step_decay=sqrt_step_decay,
            **options,
        )


register(
    Entry(
        "sgd",
        SGD,
        "stochastic gradient descent with momentum, dampening, Nesterov and optional lr/sqrt(t) decay",
        "Robbins & Monro, 1951. A Stochastic Approximation Method; Sutskever et al., 2013 (Nesterov momentum)",
        ("torch.optim.SGD", "fastai SGD", "GoMLX StochasticGradientDescent"),
        example={"lr": 5e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        invalid=(({"lr": -0.1}, "lr"), ({"momentum": -0.5}, "momentum"), ({"nesterov": True}, "nesterov")),
    )
)

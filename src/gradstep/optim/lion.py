r"""Lion: evolved sign momentum (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675).

Per parameter, at step t:

.. math::
    c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    p_t = p_{t-1}\,(1 - \text{lr}\cdot\lambda) - \text{lr}\,\operatorname{sign}(c_t), \qquad
    m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

The step is :class:`~gradstep.transforms.ScaleBySign` (signSGD's transform) applied to Lion's interpolation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, beta_pair
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from ..transforms import ScaleBySign

__all__ = ["Lion", "LionInterpolation"]


class LionInterpolation(Transform):
    r"""Lion's direction before the sign: :math:`c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`; then
    :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t`. State: ``exp_avg`` (m, lion-pytorch's name)."""

    elementwise = True
    hypers = (
        Hyper("betas", (0.9, 0.99), beta_pair, "interpolation weight of the step, decay of the momentum", scalar=False),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        exp_avg = ctx.buffer("exp_avg")
        interpolation = ops.mul(exp_avg, beta1)
        ops.add_scaled_(interpolation, updates, 1 - beta1)
        ops.lerp_(exp_avg, updates, 1 - beta2)
        return interpolation


class Lion(ChainedOptimizer):
    r"""Lion: the sign of an interpolation of momentum and gradient, with decoupled weight decay.

    .. math::
        p_t = p_{t-1}(1 - \text{lr}\cdot\lambda)
        - \text{lr}\,\operatorname{sign}\big(\beta_1 m_{t-1} + (1-\beta_1) g_t\big), \qquad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Weight decay is decoupled (``p *= 1 - lr * wd``, lion-pytorch's and the paper's) by default; the core's other
    modes are options. Every element moves by exactly ``lr`` (or 0), so Lion wants an lr 3-10x smaller than AdamW's
    and a weight decay 3-10x larger (the paper's advice). ``cautious=True`` masks the signs that disagree with the
    gradient (pytorch_optimizer's ``cautious``).

    Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, 2023. Symbolic Discovery of Optimization
    Algorithms. arXiv:2302.06675.

    .. warning::
        Differences from lion-pytorch 0.2.5 (its non-Triton path):

        * ``decoupled_weight_decay=True`` there divides ``weight_decay`` by the constructor's lr (decay
          ``1 - lr/lr_0 * wd`` per step); gradstep has no such flag: give ``weight_decay=wd / lr_0`` for the same
          steps. ``use_triton`` is not provided.
        * The interpolation is ``m * beta1 + (1 - beta1) * g`` as there, but the momentum update is a ``lerp``
          (lion-pytorch: ``m * beta2 + (1 - beta2) * g``): the same up to one rounding.
        * lion-pytorch asserts ``lr > 0`` and betas in [0, 1]; gradstep accepts ``lr = 0``, refuses ``betas``
          outside [0, 1) and raises ``ValueError`` naming the argument. A ``step`` count is kept per parameter.

        pytorch_optimizer's ``Lion``: ``fixed_decay`` (decay without lr) is not provided; ``weight_decouple=False``
        is ``weight_decay_mode="coupled"``; its ``use_gc``/``adanorm`` extras are not provided.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
        >>> opt = gradstep.Lion([w], lr=0.1)
        >>> w.grad = torch.tensor([0.3, -0.2, 0.0]); _ = opt.step()
        >>> w.detach()
        tensor([ 0.9000, -0.9000,  0.5000])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [LionInterpolation(), ScaleBySign()],
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "lion",
        Lion,
        "Sign of an interpolated momentum (evolved sign momentum), decoupled weight decay",
        "Chen et al., 2023. Symbolic Discovery of Optimization Algorithms. arXiv:2302.06675",
        ("lion-pytorch Lion", "pytorch_optimizer Lion"),
        example={"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
        invalid=(({"betas": (0.9, 1.0)}, "betas"), ({"lr": -1e-4}, "lr"), ({"weight_decay": -0.1}, "weight_decay")),
    )
)
register(
    Entry(
        "cautious_lion",
        Lion,
        "Lion with cautious updates: signs that disagree with the gradient are dropped, the rest rescaled",
        "Liang, Chen, Liu & Liu, 2024. Cautious Optimizers: Improving Training with One Line of Code. arXiv:2411.16085",
        ("pytorch_optimizer Lion(cautious=True)",),
        preset={"cautious": True},
        example={"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
        invalid=(({"cautious": "yes"}, "cautious"),),
        sharding="per-tensor reduction",
    )
)

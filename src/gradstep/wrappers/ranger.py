"""fastai's ``ranger``: fastai's RAdam inside :class:`~gradstep.wrappers.lookahead.Lookahead` (k=6, alpha=0.5).

Wright, 2019, on RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
arXiv:1908.03265) and Lookahead (Zhang et al., 2019, arXiv:1907.08610). Registered as ``ranger``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.hypers import REQUIRED
from ..core.registry import Entry, register
from .lookahead import _LOOKAHEAD, Lookahead

__all__ = ["ranger"]


def ranger(
    params: Any,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.95, 0.99),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    k: int = 6,
    alpha: float = 0.5,
    **options: Any,
) -> Lookahead:
    """fastai's ``ranger``: fastai's RAdam (decoupled weight decay, torch-style eps) inside ``Lookahead(k, alpha)``.

    fastai's names map to these: ``mom`` is ``betas[0]``, ``sqr_mom`` is ``betas[1]``, ``wd`` is ``weight_decay``;
    ``beta`` (SAdam) and ``weight_decay_mode="coupled"`` (fastai's ``decouple_wd=False``) pass to RAdam, and
    ``slow_copy``/``pullback_momentum`` to Lookahead. The slow weights are copied at the first step, as fastai does.
    Registered as ``ranger``.
    """
    return Lookahead(
        params,
        k,
        alpha,
        inner="fastai_radam",
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        **options,
    )


register(
    Entry(
        "ranger",
        Lookahead,
        "fastai's ranger: fastai's RAdam (betas (0.95, 0.99), eps 1e-6, wd 0.01) inside Lookahead(6, 0.5)",
        _LOOKAHEAD + "; Liu et al., 2020. On the Variance of the Adaptive Learning Rate and Beyond. arXiv:1908.03265",
        ("fastai.optimizer (2.8.12) ranger",),
        preset={"inner": "fastai_radam", "lr": REQUIRED, "betas": (0.95, 0.99), "eps": 1e-6, "weight_decay": 0.01},
        example={"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.02},
        invalid=(({"lr": -1.0}, "lr"), ({"k": 0}, "k"), ({"betas": (1.5, 0.99)}, "betas")),
    )
)

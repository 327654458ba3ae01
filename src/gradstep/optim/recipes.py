"""Other libraries' configurations as presets of gradstep's optimizers (no separate code).

========================  =====================================================================================
registry name              what it reproduces
========================  =====================================================================================
``fastai_sgd``             fastai ``SGD(lr, mom, wd)``: decoupled weight decay (``mom`` is ``momentum``)
``fastai_rmsprop``         fastai ``RMSProp``: momentum of raw gradients, decoupled decay, eps 1e-8
``fastai_adam``            fastai ``Adam``: betas (0.9, 0.99), eps 1e-5, decoupled weight decay 0.01
``gomlx_sgd``              GoMLX ``sgd``: lr 0.1 divided by sqrt(t)
``gomlx_adam``             GoMLX ``adam``: eps 1e-7, decoupled decay folded into the clipped step
``gomlx_adamw``            GoMLX ``adamw``: as GoMLX runs it, weight decay 0 unless configured
``gomlx_adamax``           GoMLX ``adamax``: ``max(b2*u, |g|) + eps``, lr 1e-3
``gomlx_rmsprop``          GoMLX ``rmsprop``: bias-corrected squared average, alpha 0.999, eps 1e-7
========================  =====================================================================================

fastai's names map to torch's: ``mom`` -> ``momentum`` (``betas[0]`` for Adam), ``sqr_mom`` -> ``alpha``
(``betas[1]``), ``wd`` -> ``weight_decay``, ``decouple_wd=False`` -> ``weight_decay_mode="coupled"``. fastai's
``lr`` has no default; neither has the presets'.

:func:`gomlx` builds an optimizer from GoMLX's hyperparameter keys (``optimizer``, ``learning_rate``,
``adam_epsilon``, ...).

.. warning::
    Differences from the originals: fastai's ``RMSProp`` ignores its ``eps`` argument (always 1e-8); here ``eps``
    is honoured. fastai writes coupled weight decay into ``p.grad``; gradstep never modifies gradients. GoMLX's
    ``adamw`` loses its 0.004 weight decay to ``FromContext``; ``gomlx(..., intended_adamw_decay=True)`` restores
    it. GoMLX's ``adam_backoff`` key is never read by GoMLX; here it sets ``backoff_steps``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import REQUIRED
from ..core.registry import Entry, create, register
from .adam import Adam, Adamax
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["GOMLX_DEFAULT_OPTIMIZER", "gomlx"]

_FASTAI = "fastai.optimizer (2.8.12)"
_GOMLX = "GoMLX optimizers (v0.23.2)"

for _entry in (
    Entry(
        "fastai_sgd",
        SGD,
        "fastai's SGD: decoupled weight decay, lr required",
        "fastai: Howard & Gugger, 2020. Fastai: A Layered API for Deep Learning. arXiv:2002.04688",
        (_FASTAI + " SGD",),
        preset={"lr": REQUIRED, "weight_decay_mode": "decoupled"},
        example={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        invalid=(({"lr": -1.0}, "lr"),),
    ),
    Entry(
        "fastai_rmsprop",
        RMSprop,
        "fastai's RMSProp: momentum of raw gradients, decoupled weight decay, lr required",
        "fastai: Howard & Gugger, 2020. arXiv:2002.04688",
        (_FASTAI + " RMSProp",),
        preset={"lr": REQUIRED, "momentum_on": "grad", "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "momentum": 0.9, "alpha": 0.95, "weight_decay": 0.01},
        invalid=(({"lr": -1.0}, "lr"), ({"alpha": -0.1}, "alpha")),
    ),
    Entry(
        "fastai_adam",
        Adam,
        "fastai's Adam: betas (0.9, 0.99), eps 1e-5, decoupled weight decay 0.01, lr required",
        "fastai: Howard & Gugger, 2020. arXiv:2002.04688",
        (_FASTAI + " Adam",),
        preset={
            "lr": REQUIRED,
            "betas": (0.9, 0.99),
            "eps": 1e-5,
            "weight_decay": 0.01,
            "weight_decay_mode": "decoupled",
        },
        example={"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.05},
        invalid=(({"lr": -1.0}, "lr"),),
    ),
    Entry(
        "gomlx_sgd",
        SGD,
        "GoMLX's SGD: lr 0.1 divided by sqrt(t)",
        "Robbins & Monro, 1951",
        (_GOMLX + " sgd",),
        preset={"lr": 0.1, "sqrt_step_decay": True},
        example={"lr": 0.05, "clip_step": 0.01},
        invalid=(({"clip_step": -1.0}, "clip_step"),),
    ),
    Entry(
        "gomlx_adam",
        Adam,
        "GoMLX's Adam: eps 1e-7, decoupled weight decay inside the clipped step",
        "Kingma & Ba, 2015. arXiv:1412.6980",
        (_GOMLX + " adam",),
        preset={"eps": 1e-7, "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "weight_decay": 0.01, "clip_step": 5e-3, "backoff_steps": 2},
        invalid=(({"backoff_steps": -1}, "backoff_steps"),),
    ),
    Entry(
        "gomlx_adamw",
        Adam,
        "GoMLX's adamw as it runs: Adam with weight decay 0 unless configured",
        "Loshchilov & Hutter, 2019. arXiv:1711.05101",
        (_GOMLX + " adamw",),
        preset={"eps": 1e-7, "weight_decay": 0.0, "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "weight_decay": 0.004},
        invalid=(({"weight_decay": -1.0}, "weight_decay"),),
    ),
    Entry(
        "gomlx_adamax",
        Adamax,
        "GoMLX's Adamax: max(b2*u, |g|) + eps, lr 1e-3",
        "Kingma & Ba, 2015. arXiv:1412.6980 (section 7)",
        (_GOMLX + " adamax",),
        preset={"lr": 1e-3, "eps": 1e-7, "eps_inside_max": False, "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "betas": (0.8, 0.99)},
        invalid=(({"eps": -1.0}, "eps"),),
    ),
    Entry(
        "gomlx_rmsprop",
        RMSprop,
        "GoMLX's RMSProp: Adam without a first moment (bias-corrected squared average)",
        "Tieleman & Hinton, 2012",
        (_GOMLX + " rmsprop",),
        preset={"lr": 1e-3, "alpha": 0.999, "eps": 1e-7, "bias_correction": True, "weight_decay_mode": "decoupled"},
        example={"lr": 1e-2, "alpha": 0.99},
        invalid=(({"alpha": 2.0}, "alpha"),),
    ),
):
    register(_entry)

GOMLX_DEFAULT_OPTIMIZER = "adamw"
_GOMLX_NAMES = {"sgd", "adam", "adamw", "adamax", "rmsprop"}


def gomlx(params: Any, hyperparams: dict[str, Any], *, intended_adamw_decay: bool = False) -> torch.optim.Optimizer:
    """An optimizer from GoMLX's hyperparameter keys, as GoMLX's ``optimizers.FromContext`` builds it.

    Keys: ``optimizer`` (default ``"adamw"``), ``learning_rate``, ``adam_epsilon``, ``adam_dtype``,
    ``adam_weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_backoff``, ``clip_step_by_value``, ``clip_nan``.
    Unknown keys raise ``KeyError``.

    Args:
        params: the parameters.
        hyperparams: GoMLX's context parameters.
        intended_adamw_decay: give ``"adamw"`` the weight decay 0.004 GoMLX meant (GoMLX itself loses it).

    Example::

        >>> import torch, gradstep
        >>> params = [torch.nn.Parameter(torch.zeros(3))]
        >>> opt = gradstep.recipes.gomlx(params, {"optimizer": "adam", "adam_beta2": 0.99})
        >>> opt.defaults["betas"], opt.defaults["eps"]
        ((0.9, 0.99), 1e-07)
    """
    known = {
        "optimizer",
        "learning_rate",
        "adam_epsilon",
        "adam_dtype",
        "adam_weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_backoff",
        "clip_step_by_value",
        "clip_nan",
    }
    unknown = sorted(set(hyperparams) - known)
    if unknown:
        raise KeyError(f"unknown GoMLX hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    name = str(hyperparams.get("optimizer", GOMLX_DEFAULT_OPTIMIZER)).lower()
    if name not in _GOMLX_NAMES:
        raise ValueError(f"unknown GoMLX optimizer {name!r}; available: {', '.join(sorted(_GOMLX_NAMES))}")
    hypers: dict[str, Any] = {}
    if "learning_rate" in hyperparams:
        hypers["lr"] = hyperparams["learning_rate"]
    if hyperparams.get("clip_step_by_value", 0) > 0:
        hypers["clip_step"] = hyperparams["clip_step_by_value"]
    if hyperparams.get("clip_nan"):
        hypers["nonfinite"] = "revert" if name == "sgd" else "zero"
    if name != "sgd":
        hypers["eps"] = hyperparams.get("adam_epsilon", 1e-7)
        hypers["betas"] = (hyperparams.get("adam_beta1", 0.9), hyperparams.get("adam_beta2", 0.999))
        decay = 0.004 if name == "adamw" and intended_adamw_decay else 0.0
        hypers["weight_decay"] = hyperparams.get("adam_weight_decay", decay)
        if hyperparams.get("adam_dtype"):
            hypers["state_dtype"] = str(hyperparams["adam_dtype"])
        if hyperparams.get("adam_backoff", 0) > 0:
            hypers["backoff_steps"] = int(hyperparams["adam_backoff"])
        if name == "rmsprop":
            hypers["alpha"] = hypers.pop("betas")[1]
    return create(f"gomlx_{name}", params, **hypers)

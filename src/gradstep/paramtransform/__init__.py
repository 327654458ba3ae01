"""Parameter-transforming optimizers (rai_toolbox's ``rai_toolbox.optim``): gradient transforms, projections and
Frank-Wolfe around any inner optimizer, and the same transforms as plain gradstep transforms.

* :class:`ParamTransformingOptimizer`, :class:`ChainedParamTransformingOptimizer`: the wrappers (:mod:`.base`,
  :mod:`.chained`); :func:`to_batch`: the block views they transform (:mod:`.blocks`).
* Gradient transforms and Lp projections (:mod:`.lp`), Frank-Wolfe (:mod:`.frank_wolfe`).
* :mod:`.transforms`: the gradient transforms and ball projections as :class:`~gradstep.Transform` s, for
  :func:`gradstep.chain` with any update rule.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.registry import Entry, register
from .base import ParamTransformingOptimizer
from .blocks import to_batch
from .chained import ChainedParamTransformingOptimizer
from .frank_wolfe import FrankWolfe, FrankWolfeStep, L1FrankWolfe, L1qFrankWolfe, L2FrankWolfe, LinfFrankWolfe
from .lp import (
    ClampedGradientOptimizer,
    ClampedParameterOptimizer,
    L1NormedGradientOptim,
    L1qNormedGradientOptim,
    L2NormedGradientOptim,
    L2ProjectedOptim,
    LinfProjectedOptim,
    SignedGradientOptim,
    TopQGradientOptimizer,
)

__all__ = [
    "ChainedParamTransformingOptimizer",
    "ClampedGradientOptimizer",
    "ClampedParameterOptimizer",
    "FrankWolfe",
    "FrankWolfeStep",
    "L1FrankWolfe",
    "L1NormedGradientOptim",
    "L1qFrankWolfe",
    "L1qNormedGradientOptim",
    "L2FrankWolfe",
    "L2NormedGradientOptim",
    "L2ProjectedOptim",
    "LinfFrankWolfe",
    "LinfProjectedOptim",
    "ParamTransformingOptimizer",
    "SignedGradientOptim",
    "TopQGradientOptimizer",
    "to_batch",
]


_RAI_PAPER = "Soklaski et al., 2022. Tools and Practices for Responsible AI Engineering, arXiv:2201.05647 (rAI-toolbox)"
_PGD = "Madry et al., 2018. Towards Deep Learning Models Resistant to Adversarial Attacks, arXiv:1706.06083"
_SLIDE = "Tramèr & Boneh, 2019. Adversarial Training and Robustness for Multiple Perturbations, arXiv:1904.13000"
_SIGN = "Bernstein et al., 2018. signSGD: Compressed Optimisation for Non-Convex Problems, arXiv:1802.04434"
_FW = "Frank & Wolfe, 1956. An algorithm for quadratic programming; Jaggi, 2013. Revisiting Frank-Wolfe (ICML)"
_CLAMP_BAD = (({"clamp_min": 1.0, "clamp_max": 0.0}, "clamp_min"),)


# Plain-torch references of the post-step projections (Entry.projection), for the test matrix: what a step does to a
# parameter without a gradient, or to any parameter with lr = 0.
def _clamp_box(p: Tensor, group: Mapping[str, Any]) -> Tensor:
    return torch.clamp(p, min=group["clamp_min"], max=group["clamp_max"])


def _linf_ball(p: Tensor, group: Mapping[str, Any]) -> Tensor:
    return torch.clamp(p, min=-group["epsilon"], max=group["epsilon"])


def _l2_ball(p: Tensor, group: Mapping[str, Any]) -> Tensor:
    # Blocks with norm > epsilon are scaled by epsilon / (norm + 1e-7), as torch.renorm (and rai_toolbox) does.
    blocks = to_batch(p.detach().contiguous(), group["param_ndim"])
    norms = torch.linalg.vector_norm(blocks.flatten(1), dim=1)
    eps = group["epsilon"]
    scale = torch.where(norms > eps, eps / (norms + 1e-7), torch.ones_like(norms))
    return (blocks * scale.view(-1, *(1,) * (blocks.ndim - 1))).view(p.shape)


# Examples: lr everywhere (the inner SGD's, or Frank-Wolfe's step-size schedule parameter), and param_ndim values that
# hold for tensors of any ndim (the matrix steps 0-d and empty tensors too).
_ENTRIES: list[tuple[str, type, str, str, dict[str, Any], tuple[tuple[dict[str, Any], str], ...], str, Any]] = [
    ("topq_gradient", TopQGradientOptimizer, "keeps the largest-|g| 1 - q fraction of each gradient block", _RAI_PAPER,
     {"q": 0.3, "param_ndim": None, "lr": 0.05}, (({"q": 1.5}, "q"), ({"dq": -0.1}, "dq")), "whole-tensor", None),
    ("clamped_gradient", ClampedGradientOptimizer, "clamps gradient elements before the inner step", _RAI_PAPER,
     {"clamp_min": -0.5, "clamp_max": 0.5, "lr": 0.05}, _CLAMP_BAD, "elementwise", None),
    ("clamped_parameter", ClampedParameterOptimizer, "clamps parameter elements after the inner step", _RAI_PAPER,
     {"clamp_min": -1.0, "clamp_max": 1.0, "lr": 0.05}, _CLAMP_BAD, "elementwise", _clamp_box),
    ("signed_gradient", SignedGradientOptim, "the sign of the gradient, under any inner optimizer", _SIGN,
     {"lr": 1e-2, "grad_scale": 0.5}, (({"param_ndim": 1.5}, "param_ndim"),), "elementwise", None),
    ("l1_normed_gradient", L1NormedGradientOptim, "gradient blocks divided by their L1 norm", _RAI_PAPER,
     {"param_ndim": None, "lr": 1e-2}, (({"param_ndim": 3}, "param_ndim"),), "per-tensor reduction", None),
    ("l2_normed_gradient", L2NormedGradientOptim, "gradient blocks divided by their L2 norm", _RAI_PAPER,
     {"param_ndim": None, "lr": 1e-2}, (({"param_ndim": -3}, "param_ndim"),), "per-tensor reduction", None),
    ("l1q_normed_gradient", L1qNormedGradientOptim, "top-q, signed, L1-normalised gradient blocks", _SLIDE,
     {"q": 0.3, "lr": 1e-2}, (({"q": -0.5}, "q"),), "whole-tensor", None),
    ("l2_projected", L2ProjectedOptim, "L2-normalised gradient steps projected on an L2 ball (PGD)", _PGD,
     {"epsilon": 1.0, "lr": 0.1}, (({"epsilon": -1.0}, "epsilon"),), "per-tensor reduction", _l2_ball),
    ("linf_projected", LinfProjectedOptim, "signed gradient steps clamped to an Linf ball (PGD)", _PGD,
     {"epsilon": 0.1, "lr": 0.01}, (({"epsilon": -1.0}, "epsilon"),), "elementwise", _linf_ball),
    ("frank_wolfe", FrankWolfe, "Frank-Wolfe steps towards the vertex -s * grad, step size lr / (lr + k)", _FW,
     {"lr": 0.5, "lmo_scaling_factor": 2.0}, (({"lr": 2.0, "use_default_lr_schedule": False}, "lr"),),
     "elementwise", None),
    ("l1_frank_wolfe", L1FrankWolfe, "Frank-Wolfe in L1 balls of radius epsilon", _FW, {"epsilon": 2.0, "lr": 1.5},
     (({"epsilon": -1.0}, "epsilon"),), "whole-tensor", None),
    ("l2_frank_wolfe", L2FrankWolfe, "Frank-Wolfe in L2 balls of radius epsilon", _FW, {"epsilon": 2.0, "lr": 1.5},
     (({"epsilon": -1.0}, "epsilon"),), "per-tensor reduction", None),
    ("linf_frank_wolfe", LinfFrankWolfe, "Frank-Wolfe in Linf balls of radius epsilon", _FW,
     {"epsilon": 0.5, "lr": 1.5}, (({"epsilon": -1.0}, "epsilon"),), "elementwise", None),
    ("l1q_frank_wolfe", L1qFrankWolfe, "Frank-Wolfe with the top-q L1 oracle (SLIDE-like)", _SLIDE,
     {"q": 0.3, "epsilon": 2.0, "lr": 1.5}, (({"epsilon": -1.0}, "epsilon"), ({"q": 2.0}, "q")), "whole-tensor", None),
]  # fmt: skip
for _name, _cls, _summary, _paper, _example, _invalid, _sharding, _projection in _ENTRIES:
    _required = tuple(k for k in ("q", "epsilon", "clamp_min", "clamp_max") if k in _example)
    register(Entry(_name, _cls, _summary, _paper, (f"rai_toolbox.optim.{_cls.__name__}",), example=_example,
                   invalid=_invalid, sharding=_sharding, required=_required, projection=_projection))  # fmt: skip

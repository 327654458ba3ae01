"""gradstep: PyTorch optimizers built from one small composable core.

Every optimizer is a ``torch.optim.Optimizer`` whose update rule is a chain of transforms over whole parameter
groups. See README.md and ``gradstep list``.
"""

from . import derivative_free, diagnostics, paramtransform, projections, recipes, schedules, transforms, wrappers
from .clipping import GradientClipping, clip_gradients
from .core.groups import mark_norm_params, param_groups
from .core.hypers import REQUIRED, Hyper
from .core.nonfinite import NonFiniteError, NonFiniteEvent, NonFiniteTracer
from .core.optimizer import ChainedOptimizer, chain
from .core.registry import Capabilities, Entry, available, create, from_config, get, register
from .core.transform import GroupStep, Transform
from .derivative_free import CEMOptimizer, RandomOptimizer
from .diagnostics import GradientNoiseScaleEstimator
from .optim import (
    LAMB,
    LARC,
    LARS,
    SGD,
    AdaBelief,
    Adam,
    Adamax,
    AdamP,
    AdamTF,
    AdamW,
    Adan,
    AdEMAMix,
    NeroPlus,
    QHAdam,
    RAdam,
    RaLars,
    RMSProp,
    RMSprop,
    TAdam,
)
from .paramtransform import (
    ClampedGradientOptimizer,
    ClampedParameterOptimizer,
    FrankWolfe,
    L1FrankWolfe,
    L1NormedGradientOptim,
    L1qFrankWolfe,
    L1qNormedGradientOptim,
    L2FrankWolfe,
    L2NormedGradientOptim,
    L2ProjectedOptim,
    LinfFrankWolfe,
    LinfProjectedOptim,
    SignedGradientOptim,
    TopQGradientOptimizer,
)
from .projections import MonotonicProjection, monotonic_projection, monotonic_projection_exact
from .schedules import CosineSchedule
from .trusted import TrustedUpdater
from .wrappers import Lookahead, OptimWrapper, Scout, ranger

__version__ = "0.1.0"

__all__ = [
    "AdEMAMix",
    "AdaBelief",
    "Adam",
    "AdamP",
    "AdamTF",
    "AdamW",
    "Adamax",
    "Adan",
    "CEMOptimizer",
    "Capabilities",
    "ChainedOptimizer",
    "ClampedGradientOptimizer",
    "ClampedParameterOptimizer",
    "CosineSchedule",
    "Entry",
    "FrankWolfe",
    "GradientClipping",
    "GradientNoiseScaleEstimator",
    "GroupStep",
    "Hyper",
    "L1FrankWolfe",
    "L1NormedGradientOptim",
    "L1qFrankWolfe",
    "L1qNormedGradientOptim",
    "L2FrankWolfe",
    "L2NormedGradientOptim",
    "L2ProjectedOptim",
    "LAMB",
    "LARC",
    "LARS",
    "LinfFrankWolfe",
    "LinfProjectedOptim",
    "Lookahead",
    "MonotonicProjection",
    "NeroPlus",
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteTracer",
    "OptimWrapper",
    "QHAdam",
    "RAdam",
    "REQUIRED",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "RandomOptimizer",
    "SGD",
    "Scout",
    "SignedGradientOptim",
    "TAdam",
    "TopQGradientOptimizer",
    "Transform",
    "TrustedUpdater",
    "available",
    "chain",
    "clip_gradients",
    "create",
    "derivative_free",
    "diagnostics",
    "from_config",
    "get",
    "mark_norm_params",
    "monotonic_projection",
    "monotonic_projection_exact",
    "param_groups",
    "paramtransform",
    "projections",
    "ranger",
    "recipes",
    "register",
    "schedules",
    "transforms",
    "wrappers",
]

"""gradstep: PyTorch optimizers built from one small composable core.

Every optimizer is a ``torch.optim.Optimizer`` whose update rule is a chain of transforms over whole parameter
groups. See README.md and ``gradstep list``.

The package is in wings (docs/architecture.md): ``core`` (the optimizer base, transforms, groups, registry),
``optim`` (the named optimizers, one file per family, and ``recipes``), ``wrappers``, ``paramtransform``, ``tools``
(clipping, TrustedUpdater, derivative-free optimizers, diagnostics, projections, schedules, checkpoints),
``integrations`` (other training libraries) and ``lab`` (the command line, tasks, plots, benchmarks), which the
library never imports. ``transforms`` is the public namespace of the shared transforms.
"""

from . import _moved, paramtransform, transforms, wrappers
from .core.codecs import convert_state_codec
from .core.groups import mark_norm_params, param_groups
from .core.hypers import REQUIRED, Hyper
from .core.nonfinite import NonFiniteError, NonFiniteEvent, NonFiniteTracer
from .core.optimizer import ChainedOptimizer, chain
from .core.registry import Capabilities, Entry, available, create, from_config, get, register
from .core.transform import GroupStep, Transform
from .integrations import EMA, StepInBackward, create_optimizer, step_in_backward
from .optim import (
    ADOPT,
    ASGD,
    CAME,
    LAMB,
    LARC,
    LARS,
    LBFGS,
    MARS,
    SGD,
    SOAP,
    AdaBelief,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamP,
    AdamTF,
    AdamW,
    AdamWScheduleFree,
    Adan,
    AdEMAMix,
    DAdaptAdaGrad,
    DAdaptAdam,
    DAdaptSGD,
    LaProp,
    Lion,
    Muon,
    NAdam,
    NeroPlus,
    NorMuon,
    Prodigy,
    PSGDKron,
    QHAdam,
    RAdam,
    RAdamScheduleFree,
    RaLars,
    RMSProp,
    RMSprop,
    Rprop,
    SGDScheduleFree,
    Shampoo,
    SparseAdam,
    StableAdamW,
    TAdam,
    recipes,
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
from .routing import partition
from .tools import derivative_free, diagnostics, projections, schedules
from .tools.clipping import GradientClipping, clip_gradients
from .tools.derivative_free import CEMOptimizer, RandomOptimizer
from .tools.diagnostics import GradientNoiseScaleEstimator
from .tools.projections import MonotonicProjection, monotonic_projection, monotonic_projection_exact
from .tools.schedules import CosineSchedule
from .tools.trusted import TrustedUpdater
from .wrappers import Lookahead, OptimWrapper, Scout, ranger

_moved.install()


def __getattr__(name: str) -> object:
    # gradstep.clipping, gradstep.cli, ...: modules that moved into the wings, for one release (see _moved.py).
    return _moved.moved_attribute(name)


__version__ = "0.1.0"

__all__ = [
    "ADOPT",
    "ASGD",
    "Adafactor",
    "AdEMAMix",
    "AdaBelief",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamP",
    "AdamTF",
    "AdamW",
    "AdamWScheduleFree",
    "Adamax",
    "Adan",
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
    "CAME",
    "CEMOptimizer",
    "Capabilities",
    "ChainedOptimizer",
    "ClampedGradientOptimizer",
    "ClampedParameterOptimizer",
    "CosineSchedule",
    "EMA",
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
    "LBFGS",
    "LaProp",
    "LinfFrankWolfe",
    "LinfProjectedOptim",
    "Lion",
    "Lookahead",
    "MARS",
    "MonotonicProjection",
    "Muon",
    "NAdam",
    "NeroPlus",
    "NorMuon",
    "PSGDKron",
    "Prodigy",
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteTracer",
    "OptimWrapper",
    "QHAdam",
    "RAdam",
    "RAdamScheduleFree",
    "REQUIRED",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "RandomOptimizer",
    "Rprop",
    "SGD",
    "SGDScheduleFree",
    "Scout",
    "Shampoo",
    "StepInBackward",
    "SignedGradientOptim",
    "SOAP",
    "SparseAdam",
    "StableAdamW",
    "TAdam",
    "TopQGradientOptimizer",
    "Transform",
    "TrustedUpdater",
    "available",
    "chain",
    "clip_gradients",
    "convert_state_codec",
    "create",
    "create_optimizer",
    "derivative_free",
    "diagnostics",
    "from_config",
    "get",
    "mark_norm_params",
    "monotonic_projection",
    "monotonic_projection_exact",
    "param_groups",
    "paramtransform",
    "partition",
    "projections",
    "ranger",
    "recipes",
    "register",
    "schedules",
    "step_in_backward",
    "transforms",
    "wrappers",
]

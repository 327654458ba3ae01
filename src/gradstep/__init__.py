"""gradstep: PyTorch optimizers built from one small composable core.

Every optimizer is a ``torch.optim.Optimizer`` whose update rule is a chain of transforms over whole parameter
groups. See README.md and ``gradstep list``.
"""

from . import recipes, transforms
from .core.groups import mark_norm_params, param_groups
from .core.hypers import REQUIRED, Hyper
from .core.nonfinite import NonFiniteError, NonFiniteEvent, NonFiniteTracer
from .core.optimizer import ChainedOptimizer, chain
from .core.registry import Capabilities, Entry, available, create, from_config, get, register
from .core.transform import GroupStep, Transform
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
    "Capabilities",
    "ChainedOptimizer",
    "Entry",
    "GroupStep",
    "Hyper",
    "LAMB",
    "LARC",
    "LARS",
    "NeroPlus",
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteTracer",
    "QHAdam",
    "RAdam",
    "REQUIRED",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "SGD",
    "TAdam",
    "Transform",
    "available",
    "chain",
    "create",
    "from_config",
    "get",
    "mark_norm_params",
    "param_groups",
    "recipes",
    "register",
    "transforms",
]

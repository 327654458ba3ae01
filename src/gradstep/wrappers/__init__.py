"""Optimizers that wrap another optimizer: Lookahead, Scout, fastai's ranger and OptimWrapper.

Each is a ``torch.optim.Optimizer`` sharing the inner optimizer's ``param_groups``, so LR schedulers,
``torch.amp.GradScaler`` and gradstep's group tools used on the wrapper reach the inner optimizer. Importing this
package registers ``lookahead``, ``scout``, ``ranger`` and ``optim_wrapper``.
"""

from .lookahead import PULLBACK_MODES, SLOW_COPY_MODES, Lookahead, Scout, ranger
from .optim_wrapper import PYTORCH_HP_MAP, OptimWrapper, WrapperBase

__all__ = [
    "Lookahead",
    "OptimWrapper",
    "PULLBACK_MODES",
    "PYTORCH_HP_MAP",
    "SLOW_COPY_MODES",
    "Scout",
    "WrapperBase",
    "ranger",
]

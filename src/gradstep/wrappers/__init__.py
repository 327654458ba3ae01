"""Optimizers that wrap another optimizer: Lookahead, Scout, fastai's ranger and OptimWrapper.

Each is a ``torch.optim.Optimizer`` sharing the inner optimizer's ``param_groups``, so LR schedulers,
``torch.amp.GradScaler`` and gradstep's group tools used on the wrapper reach the inner optimizer. Importing this
package registers ``lookahead``, ``scout``, ``ranger`` and ``optim_wrapper``.

Modules: :mod:`~gradstep.wrappers.base` (the shared ``param_groups`` plumbing), :mod:`~gradstep.wrappers.inner_state`
(per-parameter state beside the inner optimizer's, merged state_dict, checks on loading),
:mod:`~gradstep.wrappers.lookahead` (with :mod:`~gradstep.wrappers.pullback`), :mod:`~gradstep.wrappers.ranger`,
:mod:`~gradstep.wrappers.scout`, :mod:`~gradstep.wrappers.schedule_free`, :mod:`~gradstep.wrappers.optim_wrapper`
(with :mod:`~gradstep.wrappers.inner_checks`, the checks applied to a torch.optim optimizer it wraps).
"""

from .base import WrapperBase
from .inner_state import StatefulWrapper
from .lookahead import SLOW_COPY_MODES, Lookahead
from .optim_wrapper import PYTORCH_HP_MAP, OptimWrapper
from .pullback import PULLBACK_MODES
from .ranger import ranger
from .schedule_free import ScheduleFreeWrapper
from .scout import Scout

__all__ = [
    "Lookahead",
    "OptimWrapper",
    "PULLBACK_MODES",
    "PYTORCH_HP_MAP",
    "SLOW_COPY_MODES",
    "ScheduleFreeWrapper",
    "Scout",
    "StatefulWrapper",
    "WrapperBase",
    "ranger",
]

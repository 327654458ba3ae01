"""Adam's variants that reorder its two moments: ADOPT and LaProp.

Each lives in a file of its own (:mod:`~gradstep.optim.adopt`, :mod:`~gradstep.optim.laprop`); this module gathers
them under one name.
"""

from .adopt import ADOPT, ScaleByADOPT
from .laprop import LaProp, ScaleByLaProp

__all__ = ["ADOPT", "LaProp", "ScaleByADOPT", "ScaleByLaProp"]

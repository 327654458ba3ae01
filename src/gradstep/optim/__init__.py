"""The named optimizers, one file per family."""

from .adam import Adam, Adamax, AdamTF, AdamW
from .adamp import AdamP
from .adan import Adan
from .adaptive import AdaBelief, AdEMAMix
from .layerwise import LAMB, LARC, LARS, RaLars
from .muon import Muon
from .nero import NeroPlus
from .radam import QHAdam, RAdam
from .rmsprop import RMSProp, RMSprop
from .sgd import SGD
from .tadam import TAdam

__all__ = [
    "AdEMAMix",
    "AdaBelief",
    "Adam",
    "AdamP",
    "AdamTF",
    "AdamW",
    "Adamax",
    "Adan",
    "LAMB",
    "LARC",
    "LARS",
    "Muon",
    "NeroPlus",
    "QHAdam",
    "RAdam",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "SGD",
    "TAdam",
]

"""The named optimizers, one file per family."""

from .adam import Adam, Adamax, AdamTF, AdamW
from .adam_variants import ADOPT, LaProp
from .adamp import AdamP
from .adan import Adan
from .adaptive import AdaBelief, AdEMAMix
from .layerwise import LAMB, LARC, LARS, RaLars
from .lion import Lion
from .mars import MARS
from .muon import Muon
from .nero import NeroPlus
from .radam import QHAdam, RAdam
from .rmsprop import RMSProp, RMSprop
from .sgd import SGD
from .stable import StableAdamW
from .tadam import TAdam

__all__ = [
    "ADOPT",
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
    "LaProp",
    "Lion",
    "MARS",
    "Muon",
    "NeroPlus",
    "QHAdam",
    "RAdam",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "SGD",
    "StableAdamW",
    "TAdam",
]

"""The named optimizers, one file per family."""

from .adagrad import Adadelta, Adagrad, SparseAdam
from .adam import Adam, Adamax, AdamTF, AdamW
from .adamp import AdamP
from .adan import Adan
from .adaptive import AdaBelief, AdEMAMix
from .asgd import ASGD
from .layerwise import LAMB, LARC, LARS, RaLars
from .muon import Muon
from .nadam import NAdam
from .nero import NeroPlus
from .radam import QHAdam, RAdam
from .rmsprop import RMSProp, RMSprop
from .rprop import Rprop
from .sgd import SGD
from .tadam import TAdam

__all__ = [
    "ASGD",
    "AdEMAMix",
    "AdaBelief",
    "Adadelta",
    "Adagrad",
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
    "NAdam",
    "NeroPlus",
    "QHAdam",
    "RAdam",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "Rprop",
    "SGD",
    "SparseAdam",
    "TAdam",
]

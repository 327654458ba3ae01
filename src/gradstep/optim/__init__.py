"""The named optimizers, one file per family."""

from .adagrad import Adadelta, Adagrad, SparseAdam
from .adam import Adam, Adamax, AdamTF, AdamW
from .adam_variants import ADOPT, LaProp
from .adamp import AdamP
from .adan import Adan
from .adaptive import AdaBelief, AdEMAMix
from .asgd import ASGD
from .factored import CAME, Adafactor
from .layerwise import LAMB, LARC, LARS, RaLars
from .lbfgs import LBFGS
from .lion import Lion
from .mars import MARS
from .muon import Muon
from .nadam import NAdam
from .nero import NeroPlus
from .normuon import NorMuon
from .radam import QHAdam, RAdam
from .rmsprop import RMSProp, RMSprop
from .rprop import Rprop
from .sgd import SGD
from .stable import StableAdamW
from .tadam import TAdam

__all__ = [
    "ADOPT",
    "ASGD",
    "Adafactor",
    "CAME",
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
    "LBFGS",
    "LaProp",
    "Lion",
    "MARS",
    "Muon",
    "NAdam",
    "NeroPlus",
    "NorMuon",
    "QHAdam",
    "RAdam",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "Rprop",
    "SGD",
    "SparseAdam",
    "StableAdamW",
    "TAdam",
]

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
from .lr_free import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD, Prodigy
from .mars import MARS
from .muon import Muon
from .nadam import NAdam
from .nero import NeroPlus
from .normuon import NorMuon
from .psgd import PSGDKron
from .radam import QHAdam, RAdam
from .rmsprop import RMSProp, RMSprop
from .rprop import Rprop
from .schedule_free import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from .sgd import SGD
from .shampoo import Shampoo
from .soap import SOAP
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
    "AdamWScheduleFree",
    "AdamP",
    "AdamTF",
    "AdamW",
    "Adamax",
    "Adan",
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
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
    "PSGDKron",
    "Prodigy",
    "QHAdam",
    "RAdamScheduleFree",
    "RAdam",
    "RMSProp",
    "RMSprop",
    "RaLars",
    "Rprop",
    "SGD",
    "SGDScheduleFree",
    "Shampoo",
    "SOAP",
    "SparseAdam",
    "StableAdamW",
    "TAdam",
]

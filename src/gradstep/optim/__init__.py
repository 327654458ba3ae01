"""The named optimizers, one file per family."""

from .adam import Adam, Adamax, AdamTF, AdamW
from .adan import Adan
from .adaptive import AdaBelief, AdEMAMix
from .rmsprop import RMSProp, RMSprop
from .sgd import SGD
from .tadam import TAdam

__all__ = ["SGD", "AdEMAMix", "AdaBelief", "Adam", "AdamTF", "AdamW", "Adamax", "Adan", "RMSProp", "RMSprop", "TAdam"]

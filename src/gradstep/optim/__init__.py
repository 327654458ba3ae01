"""The named optimizers, one file per family."""

from .adam import Adam, Adamax, AdamTF, AdamW
from .rmsprop import RMSProp, RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamTF", "AdamW", "Adamax", "RMSProp", "RMSprop"]

"""Learning-rate-free methods, which estimate the step size: Prodigy and D-Adaptation (Adam, SGD, AdaGrad).

Each lives in a file of its own (:mod:`~gradstep.optim.prodigy`, :mod:`~gradstep.optim.dadapt_adam`,
:mod:`~gradstep.optim.dadapt_sgd`, :mod:`~gradstep.optim.dadapt_adagrad`) on the model-wide estimate of
:mod:`~gradstep.optim.d_estimate`; this module gathers them under the family's name.
"""

from .d_estimate import DEstimate
from .dadapt_adagrad import DAdaptAdaGrad
from .dadapt_adam import DAdaptAdam
from .dadapt_sgd import DAdaptSGD
from .prodigy import Prodigy

__all__ = ["DAdaptAdaGrad", "DAdaptAdam", "DAdaptSGD", "DEstimate", "Prodigy"]

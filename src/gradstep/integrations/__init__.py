"""gradstep in other training stacks.

* :class:`~gradstep.integrations.ema.EMA`: an exponential moving average of a model's weights, with an eval-time swap.
* :func:`~gradstep.integrations.release.step_in_backward`: step each parameter as soon as its gradient is ready.
* :func:`~gradstep.integrations.factory.create_optimizer`: timm's ``create_optimizer_v2`` conventions.
* :mod:`gradstep.integrations.lightning`: PyTorch Lightning callbacks (imports Lightning; load it explicitly).

The Hugging Face Trainer and Accelerate take gradstep optimizers as they are (see the Integrations page of the
docs). Nothing here imports Lightning, transformers or accelerate unless you import that module yourself.
"""

from .ema import EMA
from .factory import create_optimizer
from .release import StepInBackward, step_in_backward

__all__ = ["EMA", "StepInBackward", "create_optimizer", "step_in_backward"]

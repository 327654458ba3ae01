"""The 2-D test functions (Rosenbrock, Rastrigin): a point as the model, its trajectory drawn over the contours."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .base import Batch, Metric, Target, Task

__all__ = ["Function2D", "Rastrigin", "Rosenbrock"]


class _Point(nn.Module):
    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(start, dtype=torch.float64))


class Function2D(Task):
    """Minimising a function of two variables from a fixed start (full-batch: every step sees the same function).

    The "model" is one float64 parameter, the point ``(x, y)``; :meth:`position` is recorded after every step, so
    the trajectory can be drawn over the contour plot (:func:`gradstep.lab.plots.plot_trajectories`). An epoch is
    ``steps_per_epoch`` steps; the seed and the batch size change nothing.
    """

    start: tuple[float, float] = (0.0, 0.0)
    minimum: tuple[float, float] = (0.0, 0.0)
    extent: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0)
    """``(x_min, x_max, y_min, y_max)`` of the contour plot."""
    log_contours: bool = True
    metrics = (Metric("loss", "f(x, y)"), Metric("distance", "distance to min"))
    default_epochs = 5
    eval_every = 1
    _steps_per_epoch = 100

    @staticmethod
    @abstractmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        """The function, elementwise on tensors (also on the contour plot's grid)."""

    def build_model(self) -> nn.Module:
        return _Point(self.start)

    def batches(self, epoch: int) -> Iterator[Batch]:
        for _ in range(self._steps_per_epoch):
            yield None

    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        xy = model.get_parameter("xy")
        return self.function(xy[0], xy[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        xy = model.get_parameter("xy")
        distance = math.hypot(xy[0].item() - self.minimum[0], xy[1].item() - self.minimum[1])
        return {"loss": self.function(xy[0], xy[1]).item(), "distance": distance}

    def position(self, model: nn.Module) -> list[float] | None:
        return [float(v) for v in model.get_parameter("xy").detach()]


class Rosenbrock(Function2D):
    """Rosenbrock's banana: ``(1 - x)^2 + 100 (y - x^2)^2`` from (-2, 2); the minimum 0 is at (1, 1), at the end of
    a long curved valley (Rosenbrock, 1960). 500 steps by default."""

    name = "rosenbrock"
    description = "2-D Rosenbrock function (1-x)^2 + 100(y-x^2)^2 from (-2, 2); minimum 0 at (1, 1)"
    start = (-2.0, 2.0)
    minimum = (1.0, 1.0)
    extent = (-2.5, 2.5, -1.0, 4.0)
    target = Target("loss", 1e-3)

    @staticmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2


class Rastrigin(Function2D):
    """Rastrigin's function: ``20 + x^2 + y^2 - 10 (cos 2 pi x + cos 2 pi y)`` from (-2, 3.5); a local minimum
    near every integer point, the global one (0) at the origin (Rastrigin, 1974). 500 steps by default."""

    name = "rastrigin"
    description = "2-D Rastrigin function 20 + sum(x^2 - 10 cos 2 pi x) from (-2, 3.5); minimum 0 at (0, 0)"
    start = (-2.0, 3.5)
    minimum = (0.0, 0.0)
    extent = (-4.5, 4.5, -4.5, 4.5)
    log_contours = False
    target = Target("loss", 1e-2)

    @staticmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        return 20 + x**2 + y**2 - 10 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))

r"""Derivative-free trajectory optimizers (ALF): random shooting and the cross-entropy method.

These are not gradient optimizers. They solve, for a batch of observations :math:`o_b`,

.. math::
    x_b^\star \approx \arg\min_{x \in [\ell, u]} \mathrm{cost}(o_b, x), \qquad x \in \mathbb{R}^D,

typically a model-predictive controller's search over action sequences flattened to ``solution_dim`` numbers. The
cost function sees a whole population at once: ``cost_func(observation, samples)`` takes samples shaped
``[B, P, D]`` (batch, population, solution) and returns costs shaped ``[B, P]``.

Ported from ALF (HorizonRobotics/alf, ``alf/optimizers/traj_optimizers.py``, snapshot ``23aca49``); the spec
(``algorithms.md`` A.5) records the original. Differences: draws come from an optional ``torch.Generator`` (ALF uses
the global one), the search runs under ``torch.no_grad()``, arguments are validated, and :class:`CEMOptimizer`
clamps the returned mean to the bounds unless ``clamp_solution=False`` (ALF's behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CEMOptimizer", "CostFunc", "RandomOptimizer", "TrajOptimizer"]

CostFunc = Callable[[Any, Tensor], Tensor]
"""``cost_func(observation, samples[B, P, D]) -> costs[B, P]``."""

Bound = float | Tensor


def _first_tensor(nest: Any) -> Tensor | None:
    """The first tensor of a tensor or a nest of dicts, lists and tuples (what carries the batch dimension)."""
    if isinstance(nest, Tensor):
        return nest
    if isinstance(nest, (str, bytes)):
        return None
    values = nest.values() if isinstance(nest, Mapping) else nest if isinstance(nest, Sequence) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value: Any, low: float, high: float = float("inf"), low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")
    return float(value)


class TrajOptimizer:
    """Base of the trajectory optimizers: the problem (dimension, population, cost, bounds) and the random source.

    Args:
        solution_dim: :math:`D`, the number of values in a solution.
        population_size: :math:`P`, the number of candidates drawn per observation (per iteration, for CEM).
        cost_func: ``cost_func(observation, samples)`` with ``samples`` shaped ``[B, P, D]``, returning ``[B, P]``.
        upper_bound, lower_bound: numbers or tensors broadcastable to ``[B, 1, D]`` (for instance ``[D]``), with
            ``lower_bound <= upper_bound`` everywhere.
        generator: the ``torch.Generator`` every draw uses (default: torch's global one), for reproducible searches;
            it must live on the samples' device.
        dtype: the samples' dtype (default: the bounds' floating dtype, else ``torch.get_default_dtype()``).

    Samples live on the device of the observation (its first tensor when it is a nest), else on the bounds' device.
    ALF's base ignores its arguments; here it holds what both subclasses share.
    """

    def __init__(
        self,
        solution_dim: int,
        population_size: int,
        cost_func: CostFunc,
        upper_bound: Bound,
        lower_bound: Bound,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.solution_dim = _check_int("solution_dim", solution_dim, 1)
        self.population_size = _check_int("population_size", population_size, 1)
        if not callable(cost_func):
            raise TypeError(f"cost_func must be callable, got {type(cost_func).__name__}")
        self.cost_func = cost_func
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        floating = [b.dtype for b in (upper_bound, lower_bound) if isinstance(b, Tensor) and b.is_floating_point()]
        if dtype is None:
            dtype = floating[0] if floating else torch.get_default_dtype()
            if len(floating) == 2:
                dtype = torch.promote_types(*floating)
        self.dtype: torch.dtype = dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.upper_bound = upper_bound
        self.lower_bound = lower_bound
        lb, ub = self._bounds(None)
        try:
            torch.broadcast_shapes(lb.shape, ub.shape, (1, 1, self.solution_dim))
        except RuntimeError:
            raise ValueError(
                f"bounds of shapes {tuple(lb.shape)} and {tuple(ub.shape)} cannot broadcast to [B, 1, {solution_dim}]"
            ) from None
        if bool((lb > ub).any()) or bool(lb.isnan().any() | ub.isnan().any()):
            raise ValueError("lower_bound must be <= upper_bound everywhere (and neither may be NaN)")

    def reset(self) -> None:
        """Forget any state between searches (the built-in optimizers keep none)."""

    def obtain_solution(self, observation: Any) -> Tensor:
        """Return the best solution found for each observation, shaped ``[B, D]``."""
        raise NotImplementedError

    # Helpers shared by the subclasses.

    def _device(self, observation: Any) -> torch.device:
        leaf = _first_tensor(observation)
        if leaf is not None:
            return leaf.device
        for b in (self.upper_bound, self.lower_bound):
            if isinstance(b, Tensor):
                return b.device
        return torch.device("cpu")

    def _bounds(self, device: torch.device | None) -> tuple[Tensor, Tensor]:
        """``(lower, upper)`` as tensors in the samples' dtype, on ``device``."""
        lb = torch.as_tensor(self.lower_bound, dtype=self.dtype, device=device)
        ub = torch.as_tensor(self.upper_bound, dtype=self.dtype, device=device)
        return lb, ub

    def _batch_size(self, observation: Any) -> int:
        leaf = _first_tensor(observation)
        if leaf is None or leaf.dim() == 0:
            raise ValueError("observation must be a tensor (or a nest of tensors) with a leading batch dimension")
        return int(leaf.shape[0])

    def _costs(self, observation: Any, samples: Tensor) -> Tensor:
        costs = self.cost_func(observation, samples)
        if not isinstance(costs, Tensor) or costs.shape != samples.shape[:2]:
            shape = tuple(costs.shape) if isinstance(costs, Tensor) else type(costs).__name__
            raise ValueError(f"cost_func must return costs shaped {tuple(samples.shape[:2])} ([B, P]), got {shape}")
        return costs


class RandomOptimizer(TrajOptimizer):
    r"""Random shooting: draw :math:`P` uniform candidates per observation and keep the cheapest.

    .. math::
        X_{b,p} \sim \mathcal{U}[\ell, u)^D, \qquad x_b = X_{b,\, \arg\min_p \mathrm{cost}(o, X)_{b,p}}

    (``rand * (u - l) + l``; ties go to the first minimum). Arguments: see :class:`TrajOptimizer`.

    Example::

        >>> import torch
        >>> from gradstep.tools.derivative_free import RandomOptimizer
        >>> cost = lambda obs, x: ((x - obs[:, None, :]) ** 2).sum(-1)  # optimum at x = obs
        >>> opt = RandomOptimizer(2, 4096, cost, upper_bound=1.0, lower_bound=-1.0,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> x = opt.obtain_solution(torch.tensor([[0.5, -0.25]]))
        >>> bool(((x - torch.tensor([[0.5, -0.25]])).abs() < 0.05).all())
        True

    Reference: ALF ``RandomOptimizer``; A. Nagabandi et al., 2018, "Neural Network Dynamics for Model-Based Deep
    Reinforcement Learning with Model-Free Fine-Tuning" (ICRA), arXiv:1708.02596 (random-shooting MPC).
    """

    @torch.no_grad()
    def obtain_solution(self, observation: Any) -> Tensor:
        """The cheapest of ``population_size`` uniform draws for each observation, shaped ``[B, D]``."""
        batch = self._batch_size(observation)
        device = self._device(observation)
        lb, ub = self._bounds(device)
        shape = (batch, self.population_size, self.solution_dim)
        samples = torch.rand(shape, generator=self.generator, dtype=self.dtype, device=device) * (ub - lb) + lb
        best = self._costs(observation, samples).argmin(dim=1)
        return samples[torch.arange(batch, device=device), best]


class CEMOptimizer(TrajOptimizer):
    r"""The cross-entropy method with a diagonal Gaussian, updated softly toward the elites.

    Start from :math:`\mu = (u + \ell)/2` and :math:`\sigma^2 = (u - \ell)/2` (a *variance* of half the range, as in
    ALF), or from ``init_mean`` / ``init_var`` shaped ``[B, 1, D]``. Then, with :math:`i = 0`, while
    :math:`i < \text{max\_iter\_num}` and :math:`\max \sigma^2 > \epsilon` (the max over the whole batch):

    .. math::
        \sigma^2 &\leftarrow \max(\sigma^2, \text{min\_var}) \\
        S &= \mu + \sqrt{\sigma^2}\, \xi, \quad \xi \sim \mathcal{N}(0, I)^{B \times P \times D} \\
        c &= \mathrm{cost}(o, \mathrm{clamp}(S, \ell, u)) \\
        E &= \text{the } \text{elite\_size} \text{ samples of } S \text{ (unclamped) with the lowest } c \\
        \mu &\leftarrow (1 - \tau)\, \mu + \tau\, \mathrm{mean}(E), \qquad
        \sigma^2 \leftarrow (1 - \tau)\, \sigma^2 + \tau\, \mathrm{var}(E)

    (``var`` unbiased, over the elites), :math:`i \leftarrow i + 1`. Return :math:`\mu`, shaped ``[B, D]``,
    clamped to the bounds unless ``clamp_solution=False``.

    Args:
        solution_dim, population_size, cost_func, upper_bound, lower_bound, generator, dtype: see
            :class:`TrajOptimizer`.
        elite_size: the number of elites, in ``[2, population_size]`` (two at least for an unbiased variance).
        max_iter_num: the iteration cap, an int or a one-element tensor (read at every search, so a schedule can
            change it in place; the loop runs while ``i < max_iter_num``).
        epsilon: stop once every variance is at most ``epsilon``.
        tau: the soft-update weight of the elites' statistics, in ``(0, 1]``.
        min_var: the floor applied to the variance before each draw.
        clamp_solution: clamp the returned mean to the bounds (default). ``False`` returns ALF's raw mean, which
            can lie outside the bounds because the elites are unclamped samples.

    .. warning::
        The result is the final mean, not the best sample seen, as in ALF.

    Example::

        >>> import torch
        >>> from gradstep.tools.derivative_free import CEMOptimizer
        >>> cost = lambda obs, x: ((x - obs[:, None, :]) ** 2).sum(-1)
        >>> opt = CEMOptimizer(2, 64, cost, upper_bound=1.0, lower_bound=-1.0, elite_size=8, max_iter_num=20,
        ...                    epsilon=1e-6, generator=torch.Generator().manual_seed(0))
        >>> x = opt.obtain_solution(torch.tensor([[0.5, -0.25], [2.0, 0.0]]))  # the second optimum is out of bounds
        >>> torch.allclose(x, torch.tensor([[0.5, -0.25], [1.0, 0.0]]), atol=1e-2)
        True

    Reference: ALF ``CEMOptimizer``; R. Y. Rubinstein, 1999, "The Cross-Entropy Method for Combinatorial and
    Continuous Optimization"; K. Chua et al., 2018, "Deep Reinforcement Learning in a Handful of Trials using
    Probabilistic Dynamics Models" (PETS, NeurIPS), arXiv:1805.12114.
    """

    def __init__(
        self,
        solution_dim: int,
        population_size: int,
        cost_func: CostFunc,
        upper_bound: Bound,
        lower_bound: Bound,
        elite_size: int = 50,
        max_iter_num: int | Tensor = 5,
        epsilon: float = 0.01,
        tau: float = 0.9,
        min_var: float = 1e-5,
        *,
        clamp_solution: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            solution_dim, population_size, cost_func, upper_bound, lower_bound, generator=generator, dtype=dtype
        )
        self.elite_size = _check_int("elite_size", elite_size, 2)
        if elite_size > population_size:
            raise ValueError(f"elite_size ({elite_size}) must be <= population_size ({population_size})")
        if isinstance(max_iter_num, Tensor):
            if max_iter_num.numel() != 1 or max_iter_num.is_complex():
                raise ValueError(
                    f"max_iter_num must be a one-element real tensor, got shape {tuple(max_iter_num.shape)}"
                )
        else:
            _check_int("max_iter_num", max_iter_num, 0)
        self.max_iter_num = max_iter_num
        self.epsilon = _check_real("epsilon", epsilon, 0.0)
        self.tau = _check_real("tau", tau, 0.0, 1.0, low_open=True)
        self.min_var = _check_real("min_var", min_var, 0.0)
        if not isinstance(clamp_solution, bool):
            raise ValueError(f"clamp_solution must be a bool, got {clamp_solution!r}")
        self.clamp_solution = clamp_solution

    def _initial(self, name: str, given: Tensor | None, default: Tensor, shape: tuple[int, int, int]) -> Tensor:
        if given is None:
            return torch.ones(shape, dtype=self.dtype, device=default.device) * default
        if not isinstance(given, Tensor) or given.shape != shape:
            got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(f"{name} must be a tensor shaped {shape} ([B, 1, D]), got {got}")
        return given.to(dtype=self.dtype, device=default.device)

    @torch.no_grad()
    def obtain_solution(
        self, observation: Any, init_mean: Tensor | None = None, init_var: Tensor | None = None
    ) -> Tensor:
        """The final CEM mean for each observation, shaped ``[B, D]`` (see the class docstring)."""
        batch = self._batch_size(observation)
        device = self._device(observation)
        lb, ub = self._bounds(device)
        stats_shape = (batch, 1, self.solution_dim)
        mean = self._initial("init_mean", init_mean, (ub + lb) / 2.0, stats_shape)
        var = self._initial("init_var", init_var, (ub - lb) / 2.0, stats_shape)
        if bool((var < 0).any()):
            raise ValueError("init_var must be non-negative")

        limit = self.max_iter_num.item() if isinstance(self.max_iter_num, Tensor) else self.max_iter_num
        sample_shape = (batch, self.population_size, self.solution_dim)
        tau = self.tau
        i = 0
        while i < limit and float(var.max()) > self.epsilon:
            # The floored variance is also what the soft update below starts from (as in ALF).
            var = var.clamp(min=self.min_var)
            noise = torch.randn(sample_shape, generator=self.generator, dtype=self.dtype, device=device)
            samples = noise * var.sqrt() + mean
            # Costs are read at the clamped samples; the elites keep the unclamped ones, so the distribution can
            # lean past a bound where the cost is flat beyond it.
            costs = self._costs(observation, torch.clamp(samples, lb, ub))
            elite_idx = torch.topk(-costs, self.elite_size, dim=1).indices
            elites = torch.gather(samples, 1, elite_idx.unsqueeze(-1).expand(-1, -1, self.solution_dim))
            mean = (1 - tau) * mean + tau * elites.mean(dim=1, keepdim=True)
            var = (1 - tau) * var + tau * elites.var(dim=1, keepdim=True)
            i += 1

        if self.clamp_solution:
            mean = torch.clamp(mean, lb, ub)
        return mean.squeeze(1)

"""Transforms: the small steps an optimizer's update rule is built from.

A :class:`Transform` maps the current update direction of a whole parameter group (a list of tensors, one per
parameter that has a gradient) to a new direction, reading its hyperparameters from the group and keeping its own
per-parameter state tensors. The core (:class:`~gradstep.core.optimizer.ChainedOptimizer`) owns everything around
it: state creation, the step counter, weight decay, the learning rate, clipping of the final step, the non-finite
policy and the parameter write.

Conventions, as in optax and fastai's steppers:

* a transform never modifies the incoming ``updates`` (they may be the user's gradients); it returns new tensors
  and updates its own state in place;
* the chain's output ``d`` is a *descent direction*: the core applies ``p <- p - lr * d``;
* state keys are readable and stable (torch's names where torch has the same buffer): they are a checkpoint format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .hypers import Hyper
from .ops import FOREACH, Coef, Direction, PerTensorOps, TensorList, is_number

__all__ = ["BufferInit", "GroupStep", "Transform", "param_copy", "scalar_state", "zeros"]

BufferInit = Callable[[Tensor, torch.dtype], Tensor]


def zeros(param: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero buffer shaped like the parameter, in the state dtype."""
    return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


def param_copy(param: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of the parameter's current value, in the state dtype."""
    return param.detach().to(dtype=dtype, copy=True)


def scalar_state(value: float) -> BufferInit:
    """A 0-d state tensor initialised to ``value``, in the dtype torch.optim gives such values (``mu_product``,
    ``eta``): float32, or float64 when that is the default dtype. Kept in that dtype so that its rounding is torch's."""
    value = float(value)

    def init(param: Tensor, dtype: torch.dtype) -> Tensor:
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return torch.full((), value, dtype=scalar_dtype, device=param.device)

    return init


class GroupStep:
    """What a transform sees during one step of one parameter group.

    Attributes:
        group: the param group dict (hyperparameters are read from it afresh every step).
        params: the group's parameters that have a gradient (real views of complex ones).
        grads: their gradients, negated under ``maximize``, cast to the state dtype; never the user's tensors when
            a copy was needed, and never to be modified.
        states: each parameter's state dict.
        ops: :data:`~gradstep.core.ops.FOREACH` or the per-tensor reference.
        steps: the per-parameter step counts after this step's increment, as a float64 vector.
        opt_args: each parameter's ``opt_args`` dict (ALF's per-parameter overrides), or ``None``.
        names: each parameter's name (from named parameters) or a positional description.
    """

    def __init__(
        self,
        group: dict[str, Any],
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Any]],
        steps: Tensor,
        opt_args: list[dict[str, Any] | None],
        names: list[str],
        ops: PerTensorOps = FOREACH,
        zero: dict[str, Any] | None = None,
    ) -> None:
        self.group = group
        self.params = params
        self.grads = grads
        self.states = states
        self.steps = steps
        self.opt_args = opt_args
        self.names = names
        self.ops = ops
        self.zero = zero if zero is not None else {}

    def __len__(self) -> int:
        return len(self.params)

    def hyper(self, name: str) -> Any:
        """The group's value of a hyperparameter."""
        return self.group[name]

    def is_zero(self, name: str, index: int | None = None) -> bool:
        """Whether a hyperparameter (or element ``index`` of a tuple one) is zero, without reading a tensor.

        On the fast path the scheduled hyperparameters (lr, betas, momentum, weight_decay) are 0-d tensors; branch
        on this, never on their values, so that compiled code has no data-dependent control flow.
        """
        flag = self.zero.get(name)
        if flag is None:
            value = self.group[name]
            value = value[index] if index is not None else value
            return not isinstance(value, Tensor) and value == 0
        return bool(flag[index] if index is not None else flag)

    def param_hyper(self, name: str, default: Any = None) -> Coef:
        """A hyperparameter that a parameter's ``opt_args`` may override (``None`` there means "the group's").

        Returns the group's scalar when no parameter overrides it, else one value per parameter.
        """
        value = self.group[name] if name in self.group else default
        overrides = [None if a is None else a.get(name) for a in self.opt_args]
        if all(o is None for o in overrides):
            return value
        return [value if o is None else o for o in overrides]

    def buffer(self, name: str) -> TensorList:
        """The state tensor ``name`` of every parameter (created by the core from :meth:`Transform.buffers`)."""
        return [state[name] for state in self.states]

    def per_param(self, values: Tensor) -> list[Any]:
        """Split a vector with one value per parameter into a coefficient (one value per tensor).

        The values are 0-d tensors, except for floating-point values on the CPU outside ``torch.compile``: reading
        those costs no device sync, and plain numbers take torch's scalar fast paths (``addcdiv`` into the parameter,
        no 0-d tensor per operation). Either way the arithmetic is the same (the kernels cast a scalar to the same
        compute type).
        """
        if not len(self):
            return []
        if torch.compiler.is_compiling():
            # Inductor would otherwise inline the scalar math behind these values (pow, sqrt, divisions) into every
            # iteration of the vectorised loops that read them; computed once here, the loops only load a number.
            values = _materialize(values)
        elif values.device.type == "cpu" and values.is_floating_point():
            return values.tolist()
        return list(values.unbind(0))

    def power(self, base: Any) -> Tensor:
        """``base ** t`` for every parameter's step count ``t`` (a float64 vector), computed without a sync."""
        if isinstance(base, Tensor):
            base = base.to(device=self.steps.device, dtype=torch.float64)
            return torch.pow(base, self.steps)
        return torch.pow(torch.tensor(float(base), dtype=torch.float64, device=self.steps.device), self.steps)

    def bias_correction(self, beta: Any) -> Tensor:
        """``1 - beta ** t`` per parameter (float64 vector)."""
        return 1.0 - self.power(beta)


@torch.library.custom_op("gradstep::materialize", mutates_args=())
def _materialize(values: Tensor) -> Tensor:
    """An identity that compiled code cannot see through: its input is computed once, before the loops that use it."""
    return values.clone()


@_materialize.register_fake
def _(values: Tensor) -> Tensor:
    return torch.empty_like(values)


class Transform:
    """One step of an update rule, over a whole parameter group.

    Subclasses set :attr:`hypers` (what they read from the group), override :meth:`buffers` (what state they keep)
    and :meth:`update` (the math). See the module docstring for the conventions.
    """

    hypers: ClassVar[tuple[Hyper, ...]] = ()
    elementwise: ClassVar[bool] = False
    """True when the math acts element by element (complex parameters are then handled as real pairs)."""
    sparse_gradients: ClassVar[str] = "refused"
    """``"refused"``, ``"accepted"`` or ``"required"``: whether :meth:`update` takes sparse COO gradients. The core
    steps the parameters with sparse gradients apart, per tensor (``foreach=False``), and hands such a transform a
    list of sparse tensors; every transform of the chain must accept them."""

    nonnegative_buffers: ClassVar[frozenset[str]] = frozenset()
    """State keys (besides the usual second-moment names of :data:`~gradstep.core.codecs.NONNEGATIVE_BUFFERS`) whose
    values are never negative: a ``state_codec`` codes them with its unsigned map (finer, sign bit saved)."""

    recompute_when_compiled: bool = False
    """True when the compiled fast path should recompute the direction this transform receives, in each pass that
    reads it, rather than store it: a whole-tensor reduction of that direction (a trust ratio's norm) stands between
    its computation and the write of the parameter. Stored, it is a whole-size temporary written and read back; its
    inputs (the updated moments) are written anyway, so recomputing from them moves fewer bytes."""

    group_values: ClassVar[tuple[str, ...]] = ()
    """Keys of the param group that the optimizer updates every step (not hyperparameters: no constructor argument,
    e.g. D-Adaptation's ``d``), read by :meth:`update` like hyperparameters. Floats among them reach the compiled
    fast path as 0-d tensors, so that their changes do not recompile."""

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a combination of hyperparameters that cannot work together."""

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        """True when :meth:`update` reduces over the whole group (a global norm): the core must not chunk it."""
        return False

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        """State tensors this transform keeps for a parameter of ``group``, by name, with their initialiser."""
        return {}

    def is_identity(self, group: dict[str, Any]) -> bool:
        """True when, with ``group``'s options, :meth:`update` returns its input unchanged and keeps no state."""
        return False

    def fused_kernel(self, group: dict[str, Any]) -> Any:
        """torch's fused kernel that computes this transform, the core's weight decay and the parameter write for
        ``group``'s options (a :data:`~gradstep.core.fused.FusedKernel`), or ``None`` where there is none."""
        return None

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        """The new direction: a list of tensors, or ``ctx.ops.quotient(numerator, denominator)`` for a final division
        the core may fuse into the parameter write."""
        raise NotImplementedError

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        """Act on the parameters in place after the core has written the step (projections, constraints).

        ``params`` are the group's parameters that had a gradient (real views), in their own dtype.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def coef_mul(a: Coef, b: Coef) -> Coef:
    """The product of two coefficients (each a scalar, a 0-d tensor, or one value per parameter)."""
    a_list = isinstance(a, (list, tuple))
    b_list = isinstance(b, (list, tuple))
    if not a_list and not b_list:
        if is_number(b) and b == 1:
            return a
        if is_number(a) and a == 1:
            return b
        return a * b  # type: ignore[operator]
    n = len(a) if a_list else len(b)  # type: ignore[arg-type]
    av: Sequence[Any] = a if a_list else [a] * n  # type: ignore[assignment]
    bv: Sequence[Any] = b if b_list else [b] * n  # type: ignore[assignment]
    return [x * y for x, y in zip(av, bv)]


def coef_is_zero(c: Coef) -> bool:
    """True when a coefficient is known to be zero without reading a tensor (a tensor counts as non-zero)."""
    if isinstance(c, (list, tuple)):
        return all(coef_is_zero(x) for x in c)
    return bool(is_number(c) and c == 0)

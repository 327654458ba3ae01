"""What schedule-free and learning-rate-free optimizers share: values kept in the param groups, a pass over the whole
model before the groups are stepped, and a step that writes the parameters itself.

Their references keep scalars in every param group (D-Adaptation's ``d``, schedule-free's ``k``, ``weight_sum`` and
``lr_max``) and compute them from *all* groups before any parameter moves. gradstep keeps them where the references
do, so that they are saved with the groups (also by ``torch.distributed.checkpoint``, which keeps nothing else beside
the per-parameter state) and read where users read them (``opt.param_groups[0]["d"]``). The core calls
:meth:`GroupStateOptimizer._prepare_step` once per step, after the gradient screen and before the first group is
stepped: that is where the model-wide sums are taken (through :class:`~gradstep.core.reductions.WholeModelSum`) and
the groups' values set; the chain's transforms read them as :attr:`~gradstep.core.transform.Transform.group_values`.

Their parameter updates are interpolations (``y <- (1 - c) y + c z``, ``p <- x0 - s``), not ``p - lr * d``: a
:class:`ParamWritingTransform` hands the core a zero direction and writes the parameters in ``after_step``, in the
reference's order of operations, as Frank-Wolfe does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..core.nonfinite import finite_flags
from ..core.ops import FOREACH, PER_TENSOR, Coef, PerTensorOps, TensorList, is_number
from ..core.optimizer import ChainedOptimizer
from ..core.transform import GroupStep, Transform

__all__ = ["GroupStateOptimizer", "ParamWritingTransform", "addcdiv_"]


def _to_local(x: Any) -> Any:
    return x.to_local() if type(x).__name__ == "DTensor" and hasattr(x, "to_local") else x


def addcdiv_(ops: PerTensorOps, xs: TensorList, ys: TensorList, zs: TensorList, value: Coef) -> None:
    """``x += value * y / z`` per tensor (torch's ``addcdiv_``; a tensor ``value`` on the compiled path)."""
    if not xs:
        return
    if is_number(value):
        if ops is FOREACH:
            torch._foreach_addcdiv_(xs, ys, zs, value)  # type: ignore[arg-type]
        else:
            for x, y, z in zip(xs, ys, zs):
                x.addcdiv_(y, z, value=value)  # type: ignore[arg-type]
        return
    ops.add_(xs, ops.mul(ops.div(ys, zs), value))


class ParamWritingTransform(Transform):
    """A transform that writes the parameters itself: the core's step is zero, :meth:`write` does the update.

    :meth:`update` keeps the incoming direction (the gradient, with coupled weight decay) for :meth:`write`. Core
    options that act on the core's step (``clip_step``, ``backoff_steps``, ``lr_scale``, stochastic rounding,
    ``nonfinite="revert"``) would silently do nothing and are refused.
    """

    _OFF: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("clip_step", 0.0),
        ("backoff_steps", 0),
        ("lr_scale", 1.0),
        ("stochastic_rounding", False),
    )

    def __init__(self) -> None:
        self._updates: TensorList = []

    def check_group(self, group: dict[str, Any]) -> None:
        for name, off in self._OFF:
            if group.get(name, off) != off:
                raise ValueError(
                    f"Invalid {name}: {group[name]!r} ({type(self).__name__} writes the parameters itself; "
                    f"only {off!r})"
                )
        if group.get("nonfinite") == "revert":
            raise ValueError(f"Invalid nonfinite: 'revert' ({type(self).__name__}: 'error', 'skip', 'zero', 'ignore')")

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        self._updates = updates  # read by after_step of the same group step
        return ctx.ops.mul(updates, 0.0)

    # Eager also on the compiled fast path: inductor's fused kernels gave steps off by up to 2e-3 (relative) for one
    # mix of four parameter shapes, where the same ops compiled alone agree; the write is a few elementwise passes.
    @torch.compiler.disable
    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        updates, self._updates = self._updates, []
        # The parameters themselves where they are in the state dtype (written in place), else (bf16 parameters with
        # fp32 state) the core's copies in the state dtype, written back after.
        values = [p if p.dtype == v.dtype else v for p, v in zip(params, ctx.params)]
        self.write(ctx, values, updates)
        for p, v in zip(params, values):
            if v is not p:
                p.copy_(v)

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        """Update ``params`` (in the state dtype) in place."""
        raise NotImplementedError


class GroupStateOptimizer(ChainedOptimizer):
    """A chained optimizer that keeps values in its param groups and prepares them before every step.

    Subclasses list the group keys with their initial values in :meth:`group_state` and set them in
    :meth:`_prepare_step`; :meth:`local_contexts` gives the per-group view of the gradients that a model-wide pass
    needs.
    """

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        """The values kept in ``group`` (not hyperparameters), with their initial values."""
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in self.group_state(group).items():
            group.setdefault(key, value)

    def _fill_group_state(self) -> None:
        # A state_dict saved elsewhere (torch.optim's layout, an older save) may lack them: start them afresh.
        for group in self.param_groups:
            for key, value in self.group_state(group).items():
                group.setdefault(key, value)

    def group_contexts(self, plans: list[Any]) -> list[tuple[GroupStep, TensorList, list[Any]]]:
        """For each group that has gradients: a :class:`GroupStep`, the gradients with coupled weight decay, and the
        parameters as stored (for :func:`~gradstep.core.reductions.sharded_as`).

        The gradients are prepared as the core prepares them for the chain: in the state dtype, negated under
        ``maximize``, non-finite entries zeroed under ``nonfinite="zero"``. Tensors are plain: the local shards of
        DTensor (FSDP2) parameters and state, whose sharding a model-wide sum learns from ``sharded_as(views)``.
        The parameters' state is created first.
        """
        out: list[tuple[GroupStep, TensorList, list[Any]]] = []
        for plan in plans:
            if not plan.params:
                continue
            group = plan.group
            expected = self.expected_state_keys(group)
            for p, state in zip(plan.params, plan.states):
                if not expected.issubset(state):
                    self._init_param_state(group, p, state)
            ops = PER_TENSOR if group["foreach"] is False else FOREACH
            dtypes = [self._state_dtype(group, p) for p in plan.params]
            grads = ops.to([_to_local(g) for g in plan.grads], dtypes)
            if group["maximize"]:
                grads = ops.neg(grads)
            if group["nonfinite"] == "zero":
                ok = finite_flags(grads)
                grads = [torch.where(ok[i], g, torch.zeros_like(g)) for i, g in enumerate(grads)]
            params = ops.to([_to_local(v).detach() for v in plan.views], dtypes)
            states = [{k: _to_local(v) for k, v in s.items()} for s in plan.states]
            steps = torch.stack([s["step"] for s in states]).to(torch.float64) + 1
            hypers = {name: group[name] for name in self.declared_hypers()}
            ctx = GroupStep(hypers, params, grads, states, steps, plan.opt_args, plan.names, ops)
            updates = grads
            wd = group["weight_decay"]
            if group["weight_decay_mode"] == "coupled" and not (is_number(wd) and wd == 0):
                updates = ops.add(grads, ops.mul(params, wd))
            out.append((ctx, updates, list(plan.views)))
        return out

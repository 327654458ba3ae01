r"""What the learning-rate-free methods share: the model-wide estimate :math:`d` of the step size.

D-Adaptation (Adam: :mod:`~gradstep.optim.dadapt_adam`; SGD and AdaGrad:
:mod:`~gradstep.optim.dadapt_dual_averaging`) and Prodigy (:mod:`~gradstep.optim.prodigy`) estimate the step size.

All four keep one estimate :math:`d` of the distance to the solution, the same for the whole model, and step with
:math:`d\cdot\text{lr}` (``lr`` stays 1 unless the run is unstable). Each step has two passes, as in the references:

1. over every parameter of every group (lr > 0): the moments, the accumulator :math:`s` and the model-wide sums
   (inner products and norms of all parameters together: :class:`~gradstep.core.reductions.WholeModelSum`, exact
   under FSDP2, where the local partial sums are all-reduced); then the new :math:`d`, capped by ``growth_rate``:
   :math:`d_{k+1} = \max(d_k, \min(\hat d_{k+1}, d_k\cdot\text{growth\_rate}))`;
2. the parameters of each group, with the step size of the first pass.

The estimate is kept in every param group, as the references keep it (``d`` and the sums it is made of, ``k``), so
it is saved with the groups and read as ``opt.param_groups[0]["d"]``. Hyperparameters the references read from the
first group only (``betas``, ``beta3``, ``d_coef``, ``growth_rate``, ``use_bias_correction``, momentum of
DAdaptAdaGrad) are read from the first group here too; every group must have the same ``lr``, or 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper, momentum_factor, one_of, positive
from ..core.ops import TensorList
from ..core.reductions import WholeModelSum, sharded_as
from ..core.transform import GroupStep
from .whole_model import GroupStateOptimizer, ParamWritingTransform

__all__ = ["DEstimate", "DEstimateOptimizer"]

DADAPT_PAPER = "Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733"
WHOLE_MODEL = "whole-model reduction"
"""The registry's ``sharding`` of these optimizers: their sums run over the whole model."""


def per_tensor_sum(xs: TensorList) -> Tensor:
    """The sum of each tensor's elements, in float64 (this rank's part: the shards are summed by WholeModelSum)."""
    return torch.stack([x.sum(dtype=torch.float64) for x in xs])


ESTIMATE_HYPERS = (
    Hyper("d0", 1e-6, positive, "initial estimate of d"),
    Hyper("growth_rate", math.inf, positive, "d grows by at most this factor per step (inf: no limit)"),
)
DECAY_MODES = one_of("coupled", "adapted")
DECAY_DOC = "coupled: g + wd*p; adapted: p*(1 - wd*dlr), AdamW's decay at the adapted step size dlr = d*lr"

# The dual-averaging forms (SGD, AdaGrad): the parameters are averaged towards z, and only coupled decay is theirs.
PRIMAL_AVERAGING = Hyper("momentum", 0.0, momentum_factor, "primal averaging: p <- momentum * p + (1 - momentum) * z")
COUPLED_DECAY_ONLY = Hyper("weight_decay_mode", "coupled", one_of("coupled"), "coupled: g + wd*p (the reference's)")


def decay_mode_alias(decouple: bool | None, options: dict[str, Any]) -> None:
    """The references' ``decouple`` flag, for drop-in use: ``weight_decay_mode`` "adapted" or "coupled"."""
    if decouple is not None:
        options.setdefault("weight_decay_mode", "adapted" if decouple else "coupled")


class DEstimate(ParamWritingTransform):
    """The shared d estimate: the model-wide first pass, the capped update of ``d``, the step size ``dlr``.

    A subclass gives the algorithm: the group keys it keeps (:meth:`group_state`), what the first pass does to a
    group (:meth:`estimate`, adding per-tensor partial sums), how the sums make the new estimate (:meth:`finish`)
    and the parameter write (:meth:`write`). ``dlr`` (the step size of the step), ``d`` and ``skip`` (a step with
    nothing to estimate from, which the references leave without a parameter update) reach :meth:`write` as group
    values.
    """

    group_values = ("d", "dlr", "skip")
    stages: ClassVar[tuple[tuple[str, int], ...]] = (("main", 2),)
    """The passes over the model: (name, number of sums each adds per tensor)."""

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"d": group["d0"], "k": 0, "dlr": 0.0, "skip": False}

    def model_lr(self, groups: list[dict[str, Any]]) -> float:
        """The lr of the step: every group's lr is it or 0 (as the references require)."""
        lrs = [float(g["lr"]) for g in groups]
        lr = max(lrs)
        for i, value in enumerate(lrs):
            if value not in (lr, 0.0):
                name = type(self).__name__.removeprefix("ScaleBy")  # ScaleByProdigy: Prodigy
                raise ValueError(
                    f"Invalid lr: param group {i} has lr={value!r}, another {lr!r} ({name} estimates one step size "
                    "for the whole model: every group's lr must be the same, or 0)"
                )
        return lr

    @staticmethod
    def bias_correction(group: dict[str, Any]) -> float:
        if not group.get("use_bias_correction", False):
            return 1
        beta1, beta2 = group["betas"]
        k = group["k"]
        return float(((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)))

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        first = groups[0]
        d = first["d"]
        return {"lr": lr, "d": d, "dlr": d * lr * self.bias_correction(first)}

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def absorb(self, stage: str, totals: list[float], shared: dict[str, Any]) -> None:
        shared[stage] = totals

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        """The values every group gets (None: the step is skipped, nothing is stored)."""
        raise NotImplementedError

    @staticmethod
    def capped(d: float, d_hat: float, growth_rate: float) -> float:
        return max(d, min(d_hat, d * growth_rate))


class DEstimateOptimizer(GroupStateOptimizer):
    """Runs the first pass of a :class:`DEstimate` over the whole model before the groups are stepped."""

    @property
    def estimator(self) -> DEstimate:
        return self._transforms[0]  # type: ignore[return-value]

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return self.estimator.group_state(group)

    def _prepare_step(self, plans: list[Any]) -> None:
        self._fill_group_state()
        est, groups = self.estimator, self.param_groups
        shared = est.begin(groups, est.model_lr(groups))
        contexts = self.group_contexts(plans)
        device = contexts[0][0].params[0].device if contexts else None
        for stage, count in est.stages:
            if stage in shared:  # a stage the estimate needs no more (DAdaptSGD's first gradient norm)
                continue
            sums = WholeModelSum()
            for ctx, grads, views in contexts:
                with sharded_as(views):
                    est.estimate(stage, ctx, grads, sums, shared)
            est.absorb(stage, sums.total(count, device=device).tolist(), shared)
        values = est.finish(groups, shared)
        for group in groups:
            if values is None:
                group["skip"] = True
                continue
            group.update(values, skip=False, dlr=shared["dlr"], k=group["k"] + 1)


def adapted_decay(ctx: GroupStep, params: TensorList) -> None:
    """``p <- p - wd * dlr * p`` (the references' ``p.add_(p, alpha=-decay * dlr)``)."""
    wd = ctx.hyper("weight_decay")
    if ctx.hyper("weight_decay_mode") == "adapted" and not ctx.is_zero("weight_decay"):
        ctx.ops.add_scaled_(params, params, -wd * ctx.hyper("dlr"))


def average_towards(ctx: GroupStep, params: TensorList, z: TensorList, momentum: Any) -> None:
    """``p <- p * (1 - ck) + z * ck`` with ``ck = 1 - momentum`` (the references' primal averaging)."""
    ck = 1 - momentum
    ctx.ops.mul_(params, 1 - ck)
    ctx.ops.add_scaled_(params, z, ck)


def frozen(ctx: GroupStep) -> bool:
    """A group that does not move this step: a skipped step (nothing to estimate from yet), or ``lr = 0``."""
    return bool(ctx.hyper("skip")) or ctx.is_zero("lr")

r"""Learning-rate-free methods: D-Adaptation (Adam, SGD, AdaGrad) and Prodigy, which estimate the step size.

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

from ..core.hypers import Hyper, beta_pair, boolean, momentum_factor, one_of, positive, unit_interval
from ..core.ops import TensorList
from ..core.reductions import WholeModelSum, is_split, sharded_as
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, param_copy, zeros
from .whole_model import GroupStateOptimizer, ParamWritingTransform, addcdiv_

__all__ = ["DAdaptAdaGrad", "DAdaptAdam", "DAdaptSGD", "DEstimate", "Prodigy"]


def _per_tensor(xs: TensorList) -> Tensor:
    """The sum of each tensor's elements, in float64 (this rank's part: the shards are summed by WholeModelSum)."""
    return torch.stack([x.sum(dtype=torch.float64) for x in xs])


def _positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an int >= 1"


def _optional_beta(value: Any) -> str | None:
    return None if value is None else unit_interval(value)


_ESTIMATE_HYPERS = (
    Hyper("d0", 1e-6, positive, "initial estimate of d"),
    Hyper("growth_rate", math.inf, positive, "d grows by at most this factor per step (inf: no limit)"),
)
_DECAY_MODES = one_of("coupled", "adapted")
_DECAY_DOC = "coupled: g + wd*p; adapted: p*(1 - wd*dlr), AdamW's decay at the adapted step size dlr = d*lr"


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
                raise ValueError(
                    f"Invalid lr: param group {i} has lr={value!r}, another {lr!r} ({type(self).__name__[:-8] or 'it'}"
                    " estimates one step size for the whole model: every group's lr must be the same, or 0)"
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


class _DAdaptOptimizer(GroupStateOptimizer):
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


def _decoupled_decay(ctx: GroupStep, params: TensorList) -> None:
    """``p <- p - wd * dlr * p`` (the references' ``p.add_(p, alpha=-decay * dlr)``)."""
    wd = ctx.hyper("weight_decay")
    if ctx.hyper("weight_decay_mode") == "adapted" and not ctx.is_zero("weight_decay"):
        ctx.ops.add_scaled_(params, params, -wd * ctx.hyper("dlr"))


def _frozen(ctx: GroupStep) -> bool:
    return bool(ctx.hyper("skip")) or ctx.is_zero("lr")


class ScaleByProdigy(DEstimate):
    r"""Prodigy's estimate and Adam step (see :class:`Prodigy`). State: ``s``, ``p0``, ``exp_avg`` (without it
    when ``betas[0] = 0``), ``exp_avg_sq``; group keys ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``,
    ``k``."""

    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the moments", scalar=False),
        Hyper("beta3", None, _optional_beta, "decay rate of s and of the numerator (None: sqrt(betas[1]))"),
        Hyper("eps", 1e-8, positive, "added to sqrt(v), times d"),
        Hyper("weight_decay_mode", "adapted", _DECAY_MODES, _DECAY_DOC),
        Hyper("use_bias_correction", False, boolean, "Adam's bias correction in the step size"),
        Hyper("safeguard_warmup", False, boolean, "leave lr out of s (avoids a too large d in warm-up)"),
        *_ESTIMATE_HYPERS,
        Hyper("d_coef", 1.0, positive, "multiplies the estimate of d (the preferred knob)"),
        Hyper("slice_p", 1, _positive_int, "estimate from every slice_p-th element only (memory; 1: all)"),
    )

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "d_max": group["d0"], "d_numerator": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        slice_p = group["slice_p"]

        def sliced_zeros(p: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros_like(p.reshape(-1)[::slice_p], dtype=dtype)

        def sliced_copy(p: Tensor, dtype: torch.dtype) -> Tensor:
            return p.detach().reshape(-1)[::slice_p].to(dtype=dtype, copy=True)

        # Shaped like the parameter when nothing is sliced (so that FSDP2 shards them like it).
        names: dict[str, BufferInit] = {"s": sliced_zeros, "p0": sliced_copy}
        if slice_p == 1:
            names = {"s": zeros, "p0": param_copy}
        if group["betas"][0] > 0:
            names["exp_avg"] = zeros
        names["exp_avg_sq"] = zeros
        return names

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops, slice_p = ctx.ops, ctx.hyper("slice_p")
        beta1, beta2 = shared["betas"]
        d, dlr = shared["d"], shared["dlr"]
        ratio = d / ctx.hyper("d0")  # d / d0 keeps the numerator's terms away from tiny values
        if slice_p == 1:
            sliced_grads, sliced_params = grads, ctx.params
        else:
            if any(is_split(ctx.params)):
                raise NotImplementedError("Prodigy's slice_p > 1 on sharded parameters (the slices would differ)")
            sliced_grads = [g.reshape(-1)[::slice_p] for g in grads]
            sliced_params = [p.reshape(-1)[::slice_p] for p in ctx.params]
        s, p0 = ctx.buffer("s"), ctx.buffer("p0")
        numerator = _per_tensor(ops.mul(sliced_grads, ops.sub(p0, sliced_params))) * (ratio * dlr)
        if beta1 > 0:
            exp_avg = ctx.buffer("exp_avg")
            ops.mul_(exp_avg, beta1)
            ops.add_scaled_(exp_avg, grads, d * (1 - beta1))
        exp_avg_sq = ctx.buffer("exp_avg_sq")
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, grads, grads, d * d * (1 - beta2))
        ops.mul_(s, shared["beta3"])
        ops.add_scaled_(s, sliced_grads, ratio * d if ctx.hyper("safeguard_warmup") else ratio * dlr)
        sums.add(ctx.params, torch.stack([numerator, _per_tensor(ops.abs(s))], dim=1))

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        first = groups[0]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(first["betas"][1])
        return {**super().begin(groups, lr), "betas": first["betas"], "beta3": beta3}

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first = groups[0]
        delta_numerator, d_denom = shared["main"]
        if d_denom == 0:
            return None
        d, d_max = shared["d"], first["d_max"]
        d_numerator = first["d_numerator"] * shared["beta3"] + delta_numerator
        d_hat = first["d_coef"] * d_numerator / d_denom
        if d == groups[-1]["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        return {"d_numerator": d_numerator, "d_denom": d_denom, "d": d, "d_max": d_max, "d_hat": d_hat}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if _frozen(ctx):
            return
        ops, d, dlr = ctx.ops, ctx.hyper("d"), ctx.hyper("dlr")
        denom = ops.add(ops.sqrt(ctx.buffer("exp_avg_sq")), d * ctx.hyper("eps"))
        _decoupled_decay(ctx, params)
        if not ctx.is_zero("betas", 0):
            addcdiv_(ops, params, ctx.buffer("exp_avg"), denom, -dlr)
        else:
            addcdiv_(ops, params, grads, denom, -dlr * d)


class ScaleByDAdaptAdam(DEstimate):
    """D-Adaptation's Adam (see :class:`DAdaptAdam`). State: ``s``, ``exp_avg``, ``exp_avg_sq``; group keys ``d``,
    ``numerator_weighted``, ``k``."""

    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the moments", scalar=False),
        Hyper("eps", 1e-8, positive, "added to sqrt(v)"),
        Hyper("weight_decay_mode", "coupled", _DECAY_MODES, _DECAY_DOC),
        Hyper("use_bias_correction", False, boolean, "Adam's bias correction in the step size"),
        *_ESTIMATE_HYPERS,
        Hyper("layer_scale", 1.0, positive, "this group's step is layer_scale times the others' (its weight in d)"),
    )

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "numerator_weighted": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"s": zeros, "exp_avg": zeros, "exp_avg_sq": zeros}

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        first = groups[0]
        return {**super().begin(groups, lr), "betas": first["betas"], "sqrt_beta2": first["betas"][1] ** 0.5}

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops, dlr, layer_scale = ctx.ops, shared["dlr"], ctx.hyper("layer_scale")
        beta1, beta2 = shared["betas"]
        sqrt_beta2 = shared["sqrt_beta2"]
        s, exp_avg, exp_avg_sq = ctx.buffer("s"), ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        denom = ops.add(ops.sqrt(exp_avg_sq), ctx.hyper("eps"))
        numerator = _per_tensor(ops.mul(grads, ops.div(s, denom))) * (layer_scale * dlr)
        ops.mul_(exp_avg, beta1)
        ops.add_scaled_(exp_avg, grads, layer_scale * dlr * (1 - beta1))
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        ops.mul_(s, sqrt_beta2)
        ops.add_scaled_(s, grads, dlr * (1 - sqrt_beta2))
        sums.add(ctx.params, torch.stack([numerator, _per_tensor(ops.abs(s)) * layer_scale], dim=1))

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first, sqrt_beta2 = groups[0], shared["sqrt_beta2"]
        numerator_acum, sk_l1 = shared["main"]
        numerator_weighted = sqrt_beta2 * first["numerator_weighted"] + (1 - sqrt_beta2) * numerator_acum
        if sk_l1 == 0:
            return None
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = numerator_weighted / ((1 - sqrt_beta2) * sk_l1)
            d = self.capped(d, d_hat, first["growth_rate"])
        return {"numerator_weighted": numerator_weighted, "d": d}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if _frozen(ctx):
            return
        ops = ctx.ops
        denom = ops.add(ops.sqrt(ctx.buffer("exp_avg_sq")), ctx.hyper("eps"))
        _decoupled_decay(ctx, params)
        addcdiv_(ops, params, ctx.buffer("exp_avg"), denom, -1.0)


def _average_towards(ctx: GroupStep, params: TensorList, z: TensorList, momentum: Any) -> None:
    """``p <- p * (1 - ck) + z * ck`` with ``ck = 1 - momentum`` (the references' primal averaging)."""
    ck = 1 - momentum
    ctx.ops.mul_(params, 1 - ck)
    ctx.ops.add_scaled_(params, z, ck)


class ScaleByDAdaptSGD(DEstimate):
    """D-Adaptation's SGD (see :class:`DAdaptSGD`). State: ``z``, ``s``, ``x0``; group keys ``d``,
    ``numerator_weighted``, ``g0_norm``, ``k``."""

    hypers = (
        Hyper("momentum", 0.0, momentum_factor, "primal averaging: p <- momentum * p + (1 - momentum) * z"),
        Hyper("weight_decay_mode", "coupled", one_of("coupled"), "coupled: g + wd*p (the reference's)"),
        *_ESTIMATE_HYPERS,
    )
    stages = (("g0", 1), ("main", 2))

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "numerator_weighted": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"z": param_copy, "s": zeros, "x0": param_copy}

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        shared = {"lr": lr, "d": groups[0]["d"]}
        if groups[0]["k"] > 0:  # the first step's gradient norm scales every later step
            shared["g0"] = [groups[-1]["g0_norm"] ** 2]
            shared["dlr"] = shared["d"] * lr / groups[-1]["g0_norm"]
        return shared

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        if float(ctx.hyper("lr")) == 0:
            return
        ops = ctx.ops
        if stage == "g0":
            # The reference adds weight decay out of place here (its result is dropped): the raw gradient's norm.
            sums.add(ctx.params, _per_tensor(ops.mul(ctx.grads, ctx.grads)).unsqueeze(1))
            return
        s, dlr = ctx.buffer("s"), shared["dlr"]
        numerator = _per_tensor(ops.mul(grads, s)) * dlr
        ops.add_scaled_(s, grads, dlr)
        sums.add(ctx.params, torch.stack([numerator, _per_tensor(ops.mul(s, s))], dim=1))

    def absorb(self, stage: str, totals: list[float], shared: dict[str, Any]) -> None:
        super().absorb(stage, totals, shared)
        if stage == "g0":
            g0_norm = math.sqrt(totals[0])
            shared["g0_norm"] = g0_norm
            # A zero first gradient leaves nothing to scale by (the reference divides by zero): no step yet.
            shared["dlr"] = shared["d"] * shared["lr"] / g0_norm if g0_norm > 0 else 0.0

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first = groups[0]
        numerator_acum, sk_sq = shared["main"]
        if sk_sq == 0:
            if "g0_norm" in shared:
                groups[-1]["g0_norm"] = shared["g0_norm"]
            return None
        numerator_weighted = first["numerator_weighted"] + numerator_acum
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = 2 * numerator_weighted / math.sqrt(sk_sq)
            d = self.capped(d, d_hat, first["growth_rate"])
        g0_norm = shared.get("g0_norm", groups[-1].get("g0_norm"))
        return {"numerator_weighted": numerator_weighted, "d": d, "g0_norm": g0_norm}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if _frozen(ctx):
            return
        z = ctx.buffer("z")
        ctx.ops.copy_(z, ctx.ops.sub(ctx.buffer("x0"), ctx.buffer("s")))
        _average_towards(ctx, params, z, ctx.hyper("momentum"))


class ScaleByDAdaptAdaGrad(DEstimate):
    """D-Adaptation's AdaGrad (see :class:`DAdaptAdaGrad`). State: ``alphak``, ``sk``, ``x0``; group keys ``d``,
    ``gsq_weighted``, ``sksq_weighted``, ``skl1``, ``k``."""

    hypers = (
        Hyper("momentum", 0.0, momentum_factor, "primal averaging: p <- momentum * p + (1 - momentum) * z"),
        Hyper("eps", 1e-6, positive, "added to sqrt(alphak)"),
        Hyper("weight_decay_mode", "coupled", one_of("coupled"), "coupled: g + wd*p (the reference's)"),
        *_ESTIMATE_HYPERS,
    )
    stages = (("main", 3),)

    def group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super().group_state(group), "gsq_weighted": 0.0, "sksq_weighted": 0.0, "skl1": 0.0}

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        def alphak(p: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.full_like(p, 1e-6, dtype=dtype)

        return {"alphak": alphak, "sk": zeros, "x0": param_copy}

    def model_lr(self, groups: list[dict[str, Any]]) -> float:
        return float(groups[0]["lr"])  # the reference's: the first group's lr is the lr of every group

    def begin(self, groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        d = groups[0]["d"]
        return {"lr": lr, "d": d, "dlr": d * lr}

    def estimate(
        self, stage: str, ctx: GroupStep, grads: TensorList, sums: WholeModelSum, shared: dict[str, Any]
    ) -> None:
        ops, eps, dlr = ctx.ops, ctx.hyper("eps"), shared["dlr"]
        alphak, sk = ctx.buffer("alphak"), ctx.buffer("sk")

        def weighted_sk_sq() -> Tensor:
            return _per_tensor(ops.div(ops.mul(sk, sk), ops.add(ops.sqrt(alphak), eps)))

        old_weighted, old_l1 = weighted_sk_sq(), _per_tensor(ops.abs(sk))
        ops.addcmul_(alphak, grads, grads, 1.0)
        grad_sq = _per_tensor(ops.div(ops.mul(grads, grads), ops.add(ops.sqrt(alphak), eps)))
        ops.add_scaled_(sk, grads, dlr)
        changes = [weighted_sk_sq() - old_weighted, _per_tensor(ops.abs(sk)) - old_l1, grad_sq]
        sums.add(ctx.params, torch.stack(changes, dim=1))

    def finish(self, groups: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any] | None:
        first, dlr = groups[0], shared["dlr"]
        weighted_change, l1_change, g_sq = shared["main"]
        sksq_weighted = first["sksq_weighted"] + weighted_change
        skl1 = first["skl1"] + l1_change
        if skl1 == 0:
            return None
        gsq_weighted = first["gsq_weighted"] + dlr * dlr * g_sq
        d = shared["d"]
        if shared["lr"] > 0:
            d_hat = (sksq_weighted - gsq_weighted) / skl1
            d = self.capped(d, d_hat, first["growth_rate"])
        return {"gsq_weighted": gsq_weighted, "skl1": skl1, "sksq_weighted": sksq_weighted, "d": d}

    def write(self, ctx: GroupStep, params: TensorList, grads: TensorList) -> None:
        if _frozen(ctx):
            return
        ops = ctx.ops
        z = ops.sub(
            ctx.buffer("x0"), ops.div(ctx.buffer("sk"), ops.add(ops.sqrt(ctx.buffer("alphak")), ctx.hyper("eps")))
        )
        if ctx.is_zero("momentum"):
            ops.copy_(params, z)
        else:
            _average_towards(ctx, params, z, ctx.hyper("momentum"))


def _decay_mode(decouple: bool | None, options: dict[str, Any]) -> None:
    if decouple is not None:  # the references' flag, for drop-in use
        options.setdefault("weight_decay_mode", "adapted" if decouple else "coupled")


class Prodigy(_DAdaptOptimizer):
    r"""Prodigy: Adam with a step size estimated from the distance travelled (Mishchenko & Defazio, 2024).

    With :math:`\text{dlr}_k = d_k\,\text{lr}\,\rho_k` (:math:`\rho_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction``, else 1), over all parameters of the model:

    .. math::
        m &\leftarrow \beta_1 m + d_k(1-\beta_1) g,\qquad v \leftarrow \beta_2 v + d_k^2(1-\beta_2) g^2 \\
        s &\leftarrow \beta_3 s + \tfrac{d_k}{d_0}\,\text{dlr}_k\, g,\qquad
        r_{k+1} = \beta_3 r_k + \tfrac{d_k}{d_0}\,\text{dlr}_k \textstyle\sum \langle g, p_0 - p\rangle \\
        \hat d &= d_{coef}\, r_{k+1} / \textstyle\sum \lVert s \rVert_1,\qquad
        d_{k+1} = \min(\max_{j \le k+1} \hat d_j,\ d_k\cdot\text{growth\_rate}) \\
        p &\leftarrow p\,(1 - \text{wd}\cdot\text{dlr}_k) - \text{dlr}_k\, m / (\sqrt v + d_{k+1}\epsilon)

    (:math:`d_1 = \max(d_0, \hat d_1)`; ``safeguard_warmup`` uses :math:`d_k` instead of :math:`\text{dlr}_k` in
    :math:`s`; ``betas[0] = 0`` steps with :math:`d_{k+1} g` instead of :math:`m`; ``slice_p`` > 1 keeps :math:`s`
    and :math:`p_0` for every ``slice_p``-th element only.) ``lr`` scales the estimate; leave it at 1.

    Mishchenko & Defazio, 2024. Prodigy: An Expeditiously Adaptive Parameter-Free Learner. arXiv:2306.06101.

    .. warning::
        Differences from prodigyopt ``Prodigy`` (1.1.2):

        * ``decouple=True/False`` is ``weight_decay_mode="adapted"/"coupled"`` (``decouple`` is accepted as an alias).
          ``fsdp_in_use`` is not needed: sums over sharded parameters are all-reduced whenever they are sharded.
        * A group with ``lr = 0`` is not moved (the reference still applies its weight decay with the model's step
          size, and with ``betas[0] = 0`` a step from its gradient).
        * ``s`` and ``p0`` are shaped like the parameter (the reference flattens them), and ``p0`` is a copy also for
          an all-zero parameter (the reference keeps a 0-d zero). ``step`` is a float tensor, also counted on the
          steps the reference skips (every gradient so far zero, where the parameters do not move either).
        * Gradients are never modified (the reference adds coupled weight decay into ``p.grad``). ``lr = 0`` is
          accepted. The group also holds ``dlr`` (the step size of the last step) and ``skip``.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = gradstep.Prodigy([w], weight_decay=0.01)
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> opt.param_groups[0]["d"] > 1e-6  # the estimate grew from d0
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
        *,
        decouple: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        _decay_mode(decouple, options)
        super().__init__(
            params,
            [ScaleByProdigy()],
            lr=lr,
            betas=betas,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
            d0=d0,
            d_coef=d_coef,
            growth_rate=growth_rate,
            slice_p=slice_p,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class DAdaptAdam(_DAdaptOptimizer):
    r"""Adam with D-Adaptation (Defazio & Mishchenko, 2023): the step size :math:`d` estimated for the whole model.

    With :math:`\text{dlr}_k = d_k\,\text{lr}\,\rho_k` (bias correction :math:`\rho_k` as in :class:`Prodigy`),
    :math:`\lambda` the group's ``layer_scale`` and :math:`\sqrt{\beta_2}` the decay of :math:`s`:

    .. math::
        r_{k+1} &= \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\textstyle\sum \lambda\,\text{dlr}_k
            \langle g, s / (\sqrt v + \epsilon)\rangle \\
        m &\leftarrow \beta_1 m + \lambda\,\text{dlr}_k (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \quad s \leftarrow \sqrt{\beta_2}\, s + \text{dlr}_k (1-\sqrt{\beta_2})\, g \\
        d_{k+1} &= \max\big(d_k, \min\big(\tfrac{r_{k+1}}{(1-\sqrt{\beta_2})\sum \lambda\lVert s\rVert_1},\
            d_k\cdot\text{growth\_rate}\big)\big),\qquad
        p \leftarrow p\,(1 - \text{wd}\cdot\text{dlr}_k) - m / (\sqrt v + \epsilon)

    (the decay factor with ``weight_decay_mode="adapted"``; the default, ``"coupled"``, adds ``wd * p`` to ``g``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptAdam`` (3.2): ``decouple`` is ``weight_decay_mode="adapted"``
        (accepted as an alias); ``log_every`` and ``fsdp_in_use`` are not taken (sums are all-reduced whenever
        parameters are sharded, over the step's sums, where the reference all-reduces its running numerator); a
        group with ``lr = 0`` is not moved (the reference steps it with its last ``exp_avg``); ``step`` is a float
        tensor also counted on skipped steps; gradients are never modified; ``lr = 0`` is accepted.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptAdam([w])
        >>> for _ in range(3):
        ...     w.grad = 2 * w.detach()
        ...     _ = opt.step()
        >>> sorted(opt.state[w])
        ['exp_avg', 'exp_avg_sq', 's', 'step']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_bias_correction: bool = False,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        decouple: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        _decay_mode(decouple, options)
        super().__init__(
            params,
            [ScaleByDAdaptAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            use_bias_correction=use_bias_correction,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class DAdaptSGD(_DAdaptOptimizer):
    r"""SGD with D-Adaptation (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

    With :math:`\text{dlr}_k = d_k\,\text{lr} / \lVert g_0\rVert` (the first step's gradient norm, over the model):

    .. math::
        r_{k+1} = r_k + \text{dlr}_k \textstyle\sum\langle g, s\rangle,\quad s \leftarrow s + \text{dlr}_k\, g,\quad
        d_{k+1} = \max\big(d_k, \min\big(\tfrac{2 r_{k+1}}{\sqrt{\sum \lVert s\rVert^2}},\
            d_k\cdot\text{growth\_rate}\big)\big)

    .. math::
        z = x_0 - s,\qquad p \leftarrow \mu\, p + (1-\mu)\, z

    (:math:`\mu` = ``momentum``; coupled weight decay adds ``wd * p`` to ``g``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptSGD`` (3.2): each group's ``weight_decay`` and ``momentum`` are its own
        (the reference applies the first group's to every group); a zero first gradient skips the step (the reference
        divides by zero); a group with ``lr = 0`` is not moved (the reference moves it to ``x0 - s``); ``step`` is
        kept (the reference keeps none); ``log_every`` and ``fsdp_in_use`` are not taken; gradients are never
        modified; ``lr = 0`` is accepted. As the reference, the first gradient norm leaves weight decay out.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptSGD([w], momentum=0.9)
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> sorted(opt.state[w])
        ['s', 'step', 'x0', 'z']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByDAdaptSGD()],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


class DAdaptAdaGrad(_DAdaptOptimizer):
    r"""AdaGrad with D-Adaptation (Defazio & Mishchenko, 2023), in the reference's dual-averaging form.

    With :math:`\text{dlr}_k = d_k\,\text{lr}` and :math:`w(x) = \sum x^2/(\sqrt{\alpha}+\epsilon)`:

    .. math::
        \alpha \leftarrow \alpha + g^2,\quad s \leftarrow s + \text{dlr}_k\, g,\quad
        G_{k+1} = G_k + \text{dlr}_k^2\, w(g),\quad
        d_{k+1} = \max\big(d_k, \min\big(\tfrac{w(s) - G_{k+1}}{\sum\lVert s\rVert_1},\
            d_k\cdot\text{growth\_rate}\big)\big)

    .. math::
        z = x_0 - s / (\sqrt{\alpha} + \epsilon),\qquad p \leftarrow \mu\, p + (1-\mu)\, z

    (:math:`\alpha_0 = 10^{-6}`; the sums run over the model, :math:`w(s)` and :math:`\lVert s\rVert_1` kept up to
    date by their changes as in the reference; :math:`\mu` = ``momentum``).

    Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733.

    .. warning::
        Differences from dadaptation ``DAdaptAdaGrad`` (3.2): sparse gradients are refused (the reference has a
        sparse path); each group's ``momentum`` is its own (the reference uses the first group's); a group with
        ``lr = 0`` is not moved; ``step`` is kept; ``log_every`` is not taken; gradients are never modified;
        ``lr = 0`` is accepted. Sharded parameters are supported (the reference refuses FSDP).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = gradstep.DAdaptAdaGrad([w])
        >>> w.grad = 2 * w.detach(); _ = opt.step()
        >>> sorted(opt.state[w])
        ['alphak', 'sk', 'step', 'x0']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByDAdaptAdaGrad()],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            d0=d0,
            growth_rate=growth_rate,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


_PAPER = "Defazio & Mishchenko, 2023. Learning-Rate-Free Learning by D-Adaptation. ICML. arXiv:2301.07733"
_WHOLE_MODEL = "whole-model reduction"
for _entry in (
    Entry(
        "prodigy",
        Prodigy,
        "Adam with the step size estimated from the distance travelled (D-Adaptation's successor)",
        "Mishchenko & Defazio, 2024. Prodigy: An Expeditiously Adaptive Parameter-Free Learner. arXiv:2306.06101",
        ("prodigyopt Prodigy",),
        example={
            "lr": 0.2,
            "betas": (0.8, 0.99),
            "weight_decay": 0.01,
            "use_bias_correction": True,
            "safeguard_warmup": True,
            "d_coef": 2.0,
            "growth_rate": 1.5,
            "d0": 1e-2,
        },
        invalid=(({"d0": 0.0}, "d0"), ({"slice_p": 0}, "slice_p"), ({"beta3": 1.0}, "beta3")),
        sharding=_WHOLE_MODEL,
    ),
    Entry(
        "dadapt_adam",
        DAdaptAdam,
        "Adam with the step size estimated by D-Adaptation",
        _PAPER,
        ("dadaptation DAdaptAdam",),
        example={
            "lr": 1.0,
            "betas": (0.8, 0.99),
            "weight_decay": 0.01,
            "use_bias_correction": True,
            "growth_rate": 2.0,
            "d0": 1e-3,
        },
        invalid=(({"d0": -1.0}, "d0"), ({"growth_rate": 0.0}, "growth_rate"), ({"eps": 0.0}, "eps")),
        sharding=_WHOLE_MODEL,
    ),
    Entry(
        "dadapt_sgd",
        DAdaptSGD,
        "SGD with the step size estimated by D-Adaptation (dual averaging)",
        _PAPER,
        ("dadaptation DAdaptSGD",),
        example={"lr": 1.0, "momentum": 0.9, "weight_decay": 0.01, "growth_rate": 2.0, "d0": 1e-2},
        invalid=(({"momentum": 1.5}, "momentum"), ({"d0": 0.0}, "d0")),
        sharding=_WHOLE_MODEL,
    ),
    Entry(
        "dadapt_adagrad",
        DAdaptAdaGrad,
        "AdaGrad with the step size estimated by D-Adaptation (dual averaging)",
        _PAPER,
        ("dadaptation DAdaptAdaGrad",),
        example={"lr": 1.0, "momentum": 0.5, "weight_decay": 0.01, "eps": 1e-5, "growth_rate": 2.0, "d0": 1e-2},
        invalid=(({"eps": 0.0}, "eps"), ({"momentum": -0.1}, "momentum")),
        sharding=_WHOLE_MODEL,
    ),
):
    register(_entry)

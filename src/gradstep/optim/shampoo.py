r"""Shampoo (Gupta et al., 2018) in the default configuration of Meta's Distributed Shampoo (Shi et al., 2023).

Each parameter is viewed with its small dimensions merged and cut into blocks of at most ``max_preconditioner_dim``
per dimension (:func:`gradstep.core.kronecker.block_layout`). Per block :math:`G` of order :math:`o`, per dimension
:math:`k`, at step :math:`t`:

.. math::
    L_k \leftarrow \beta_2 L_k + (1-\beta_2)\, G_{(k)} G_{(k)}^\top \ \ (\beta_2 = 1:\ L_k + G_{(k)} G_{(k)}^\top),
    \qquad P_k = \big(L_k / (1-\beta_2^t) + \epsilon I\big)^{-1/(2o)}

(:math:`P_k` recomputed every ``precondition_frequency`` steps from ``start_preconditioning_step`` on, by an
eigendecomposition; the identity before), and the filtered gradient and the step

.. math::
    \tilde G \leftarrow \beta_1 \tilde G + (1-\beta_1) G,\qquad
    D = \frac{\tilde G}{1-\beta_1^t} \times_1 P_1 \cdots \times_o P_o,\qquad
    D \leftarrow \frac{\lVert D_{\text{graft}} \rVert}{\lVert D \rVert + 10^{-16}}\, D \ \text{(grafting)}

.. math::
    D \leftarrow D + \lambda p,\qquad M \leftarrow \mu M + (1-\tau) D,\qquad
    p \leftarrow p - \text{lr}\cdot M\ \text{ (or } (1-\tau) D + \mu M \text{ with Nesterov)}

The Kronecker math (statistics, inverse roots, products along dims) is :mod:`gradstep.core.kronecker`, shared with
SOAP: same-shape blocks of a group are computed as one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import kronecker
from ..core.hypers import Hyper, boolean, one_of, positive, unit_interval
from ..core.ops import PER_TENSOR, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import whole_tensors
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["ScaleByShampoo", "Shampoo", "ShampooMomentum"]

GRAFTING_BETA2 = {"adam": 0.999, "rmsprop": 0.99, "adagrad": 1.0}  # Distributed Shampoo's grafting configs


def _betas(value: Any) -> str | None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(b, (int, float)) for b in value)
    if not ok or isinstance(value[0], bool) or not 0.0 <= value[0] < 1.0 or not 0.0 < value[1] <= 1.0:
        return "must be a pair (beta1 in [0, 1), beta2 in (0, 1])"
    return None


def _beta3(value: Any) -> str | None:
    ok = value is None or value == -1.0 or unit_interval(value) is None
    return None if ok else "must be None or -1.0 (beta1), or in [0, 1)"


def _int_at_least(low: int) -> Any:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return None if ok else f"must be an int >= {low}"

    return check


def _optional_beta2(value: Any) -> str | None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0)
    return None if ok else "must be None (the grafting method's default) or in (0, 1]"


def _layout(shape: torch.Size, group: dict[str, Any]) -> kronecker.BlockLayout:
    return kronecker.block_layout(tuple(shape), group["max_preconditioner_dim"], merge=group["use_merge_dims"])


def _start(group: dict[str, Any]) -> int:
    start: int = group["start_preconditioning_step"]
    return group["precondition_frequency"] if start == -1 else start


class ScaleByShampoo(Transform):
    r"""Shampoo's preconditioned, grafted direction (see the module docstring).

    State: ``factor_matrices`` and ``inv_factor_matrices`` (every block's :math:`L_k` and :math:`P_k`, flat: see
    :meth:`~gradstep.core.kronecker.BlockLayout.factor_views`), ``filtered_grad`` (with :math:`\beta_1 > 0`) and
    ``grafting_second_moment`` (AdaGrad, RMSprop and Adam grafting).
    """

    hypers = (
        Hyper("betas", (0.9, 1.0), _betas, "(beta1: gradient filtering, beta2: factors; 1.0 sums)", scalar=False),
        Hyper("beta3", None, _beta3, "weight of the past in this step's filtered gradient (None: beta1)"),
        Hyper("epsilon", 1e-12, positive, "added to the factors' diagonal before their inverse root"),
        Hyper("max_preconditioner_dim", 1024, _int_at_least(1), "dims are cut into blocks of at most this size"),
        Hyper("precondition_frequency", 1, _int_at_least(1), "steps between recomputations of the inverse roots"),
        Hyper("start_preconditioning_step", -1, _int_at_least(-1), "first step with inverse roots (-1: frequency)"),
        Hyper("use_bias_correction", True, boolean, "divide the filtered gradient and the factors by 1 - beta^t"),
        Hyper("use_merge_dims", True, boolean, "merge neighbouring dims while their product fits a block"),
        Hyper("grafting", None, one_of(None, "sgd", "adagrad", "rmsprop", "adam"), "per-block step norm to graft"),
        Hyper("grafting_beta2", None, _optional_beta2, "grafting's second-moment decay (None: 0.999 / 0.99)"),
        Hyper("grafting_epsilon", 1e-10, positive, "grafting's denominator epsilon"),
    )

    def check_group(self, group: dict[str, Any]) -> None:
        if _start(group) < group["precondition_frequency"]:
            raise ValueError(
                f"Invalid start_preconditioning_step: {group['start_preconditioning_step']} (must be -1 or >= "
                f"precondition_frequency {group['precondition_frequency']})"
            )

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        return True  # same-shape blocks of the whole group are batched

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        def factors(param: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros(_layout(param.shape, group).factor_numel, dtype=dtype, device=param.device)

        def identities(param: Tensor, dtype: torch.dtype) -> Tensor:
            return _layout(param.shape, group).identity_factors(dtype, param.device)

        out: dict[str, BufferInit] = {"factor_matrices": factors, "inv_factor_matrices": identities}
        if group["betas"][0] != 0:
            out["filtered_grad"] = zeros
        if group["grafting"] not in (None, "sgd"):
            out["grafting_second_moment"] = zeros
        return out

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops, group = ctx.ops, ctx.group
        beta1 = float(group["betas"][0])
        beta3 = beta1 if group["beta3"] in (None, -1.0) else float(group["beta3"])
        steps = ctx.steps.tolist()
        # Element-wise parts on the local shards (FSDP2); the Kronecker parts on whole tensors below.
        filtered = updates
        if beta1 != 0:
            state = ctx.buffer("filtered_grad")
            filtered = ops.clone(state) if beta3 != beta1 else state
            if beta3 != beta1:
                ops.lerp_(filtered, updates, 1 - beta3)
            ops.lerp_(state, updates, 1 - beta1)
            if group["use_bias_correction"]:
                filtered = ops.div(filtered, [1 - beta3 * beta1 ** (t - 1) for t in steps])
        grafted = self._grafting_direction(ctx, updates, filtered, steps)
        raw_whole, local_parts = whole_tensors(updates)
        filtered_whole = whole_tensors(filtered)[0] if filtered is not updates else raw_whole
        grafted_whole = whole_tensors(grafted)[0] if grafted is not None else None
        return local_parts(self._precondition(ctx, raw_whole, filtered_whole, grafted_whole, steps))

    def _grafting_direction(
        self, ctx: GroupStep, grads: TensorList, filtered: TensorList, steps: list[float]
    ) -> TensorList | None:
        ops, method = ctx.ops, ctx.hyper("grafting")
        if method is None or method == "sgd":
            return None if method is None else filtered
        beta2 = ctx.hyper("grafting_beta2") if method != "adagrad" else None
        beta2 = GRAFTING_BETA2[method] if beta2 is None else float(beta2)
        second = ctx.buffer("grafting_second_moment")
        if beta2 != 1.0:
            ops.mul_(second, beta2)
        ops.addcmul_(second, grads, grads, 1 - beta2 if beta2 != 1.0 else 1.0)
        corrections = [1 - beta2**t for t in steps] if method == "adam" and beta2 < 1 else 1.0
        denominator = ops.sqrt(ops.div(second, corrections))
        ops.add_(denominator, ctx.hyper("grafting_epsilon"))
        return ops.div(filtered, denominator)

    @torch.compiler.disable  # eigendecompositions and data-dependent block lists: eager, as Distributed Shampoo
    def _precondition(
        self,
        ctx: GroupStep,
        grads: list[Tensor],
        filtered: list[Tensor],
        grafted: list[Tensor] | None,
        steps: list[float],
    ) -> list[Tensor]:
        group, batched = ctx.group, ctx.ops is not PER_TENSOR
        beta2 = float(group["betas"][1])
        layouts = [_layout(g.shape, group) for g in grads]
        for state, layout, g in zip(ctx.states, layouts, grads):
            if state["factor_matrices"].numel() != layout.factor_numel:
                # Created from a local shard (FSDP2): the factors are those of the whole tensor, on every rank.
                state["factor_matrices"] = torch.zeros(layout.factor_numel, dtype=g.dtype, device=g.device)
                state["inv_factor_matrices"] = layout.identity_factors(g.dtype, g.device)
        owner = [i for i, layout in enumerate(layouts) for _ in layout.slices]
        flags = [f for layout in layouts for f in layout.preconditioned]
        factors = [v for s, lay in zip(ctx.states, layouts) for v in lay.factor_views(s["factor_matrices"])]
        inverses = [v for s, lay in zip(ctx.states, layouts) for v in lay.factor_views(s["inv_factor_matrices"])]

        statistics = kronecker.kronecker_statistics(_blocks(grads, layouts), flags, batched)
        kronecker.accumulate_([f for fs in factors for f in fs], [s for ss in statistics for s in ss], beta2)

        start, frequency = _start(group), group["precondition_frequency"]
        refresh = [(t % frequency == 0 and t > start) or t == start for t in steps]
        sources, roots, targets = [], [], []
        for b, i in enumerate(owner):
            if refresh[i]:
                correction = 1 - beta2 ** steps[i] if group["use_bias_correction"] and beta2 < 1 else 1.0
                sources += [f / correction for f in factors[b]]
                roots += [2 * len(flags[b])] * len(factors[b])
                targets += inverses[b]
        if targets:
            torch._foreach_copy_(targets, kronecker.inverse_roots(sources, roots, group["epsilon"], batched))

        # Before start_preconditioning_step a grafted run steps with the grafting method alone (as the reference).
        shampoo = [i for i in range(len(grads)) if grafted is None or steps[i] >= start]
        chosen = [layouts[i] for i in shampoo]
        mine = [b for b, i in enumerate(owner) if steps[i] >= start or grafted is None]
        directions = kronecker.apply_along_dims(
            _blocks([filtered[i] for i in shampoo], chosen),
            [inverses[b] for b in mine],
            [flags[b] for b in mine],
            batched=batched,
        )
        if grafted is not None and directions:
            ratios = kronecker.block_norms(_blocks([grafted[i] for i in shampoo], chosen))
            norms = kronecker.block_norms(directions)
            torch._foreach_add_(norms, 1e-16)
            torch._foreach_div_(ratios, norms)
            torch._foreach_mul_(directions, ratios)
        out: list[Tensor] = list(grafted) if grafted is not None else [None] * len(grads)  # type: ignore[list-item]
        b = 0
        for i, layout in zip(shampoo, chosen):
            out[i] = layout.assemble(directions[b : b + len(layout.slices)])
            b += len(layout.slices)
        return out


def _blocks(tensors: list[Tensor], layouts: list[kronecker.BlockLayout]) -> list[Tensor]:
    return [b for t, layout in zip(tensors, layouts) for b in layout.blocks(t)]


class ShampooMomentum(Transform):
    r"""Distributed Shampoo's decoupled weight decay and momentum, applied to the preconditioned direction :math:`D`:

    .. math::
        D \leftarrow D + \lambda p\ \text{(weight_decay_mode="direction")},\qquad M \leftarrow \mu M + (1-\tau) D,
        \qquad D \leftarrow M \ \text{ or (Nesterov) } (1-\tau) D + \mu M

    State: ``momentum_buffer`` (with :math:`\mu > 0`).
    """

    elementwise = True
    hypers = (
        Hyper("momentum", 0.0, unit_interval, "momentum factor"),
        Hyper("dampening", 0.0, unit_interval, "dampening of the momentum's new direction"),
        Hyper("use_nesterov", False, boolean, "Nesterov momentum"),
        Hyper(
            "weight_decay_mode",
            "direction",
            one_of("direction", "coupled", "decoupled", "proximal"),
            "direction: D + wd*p before momentum (Distributed Shampoo's decoupled decay); coupled: g + wd*p; "
            "decoupled: p*(1 - lr*wd); proximal: p/(1 + lr*wd)",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"momentum_buffer": zeros} if group["momentum"] != 0 else {}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        wd = ctx.param_hyper("weight_decay")
        if ctx.hyper("weight_decay_mode") == "direction" and not ctx.is_zero("weight_decay"):
            updates = ops.clone(updates)
            ops.add_scaled_(updates, ctx.params, wd)
        if ctx.is_zero("momentum") or "momentum_buffer" not in ctx.states[0]:
            return updates
        mu, keep = ctx.hyper("momentum"), 1 - ctx.hyper("dampening")
        buf = ctx.buffer("momentum_buffer")
        ops.mul_(buf, mu)
        ops.add_scaled_(buf, updates, keep)
        if not ctx.hyper("use_nesterov"):
            return buf
        out = ops.mul(updates, keep)
        ops.add_scaled_(out, buf, mu)
        return out


class Shampoo(ChainedOptimizer):
    r"""Shampoo as Meta's Distributed Shampoo computes it by default (``DistributedShampoo`` without a
    ``distributed_config``, root inverses by eigendecomposition): see the module docstring for the math.

    Gupta, Koren & Singer, 2018. Shampoo: Preconditioned Stochastic Tensor Optimization. arXiv:1802.09568 — Shi,
    Lee, Iwasaki, Gallego-Posada, Li, Rangadurai, Mudigere & Rabbat, 2023. A Distributed Data-Parallel PyTorch
    Implementation of the Distributed Shampoo Optimizer for Training Neural Networks At-Scale. arXiv:2309.06497.

    ``grafting`` names Distributed Shampoo's grafting config (``AdaGradGraftingConfig`` is ``"adagrad"``, ...; its
    ``beta2`` and ``epsilon`` are ``grafting_beta2`` and ``grafting_epsilon``); ``use_decoupled_weight_decay`` sets
    ``weight_decay_mode`` (``"direction"``, or ``"coupled"`` for ``False``). The optimizer's state is one flat tensor
    of factors per parameter (see :class:`ScaleByShampoo`).

    .. warning::
        Differences from Distributed Shampoo (the float64 transcription of its default algorithm in the tests is
        matched to 1e-6 relative):

        * Only its default root-inverse method (``EigenConfig``, ``perturb_before_computation``) is provided: no
          coupled Newton iterations, eigenvalue-corrected or eigendecomposed variants, ``inv_root_override``,
          ``exponent_multiplier``, quantized or lower-precision factor dtypes (the factors are in the state dtype),
          and no protected ``eigh`` fallback to the previous root: a failed decomposition is retried in float64,
          then raises.
        * Step counts are per parameter (Distributed Shampoo counts per group): they differ only for parameters
          that skipped steps without a gradient.
        * Under FSDP2 every rank gathers each parameter and computes all its factors (the "every rank computes"
          mode); Distributed Shampoo's ``FSDPShampooConfig`` instead assigns blocks to ranks.
        * Checkpoints are ordinary ``state_dict()`` (Distributed Shampoo refuses it and needs
          ``distributed_state_dict``); the state keys are this class's.

        Against pytorch-optimizer's ``Shampoo`` (4.1.0), which matches ``betas=(0.0, 1.0)``,
        ``use_merge_dims=False``, no blocking and no grafting with its ``matrix_eps`` as ``epsilon``: it starts its
        factors at :math:`\epsilon I` (the same matrix), takes roots by SVD, leaves scalars unpreconditioned and
        mixes the previous update into the gradient for ``momentum > 0``.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.zeros(2, 2))
        >>> opt = gradstep.Shampoo([w], lr=0.1, betas=(0.0, 1.0), use_merge_dims=False)
        >>> w.grad = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); _ = opt.step()
        >>> w.detach()  # (G G^T)^(-1/4) G (G^T G)^(-1/4) = I for this G
        tensor([[-0.1000,  0.0000],
                [ 0.0000, -0.1000]])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        beta3: float | None = None,
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        use_nesterov: bool = False,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting: str | None = None,
        use_merge_dims: bool = True,
        *,
        grafting_beta2: float | None = None,
        grafting_epsilon: float = 1e-10,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "direction" if use_decoupled_weight_decay else "coupled")
        super().__init__(
            params,
            [ScaleByShampoo(), ShampooMomentum()],
            lr=lr,
            betas=betas,
            beta3=beta3,
            epsilon=epsilon,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            use_nesterov=use_nesterov,
            use_bias_correction=use_bias_correction,
            grafting=grafting,
            use_merge_dims=use_merge_dims,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "shampoo",
        Shampoo,
        "Kronecker-factored preconditioning with blocking and grafting (Meta's Distributed Shampoo defaults)",
        "Gupta et al., 2018. Shampoo: Preconditioned Stochastic Tensor Optimization. arXiv:1802.09568; Shi et al., "
        "2023. A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer. "
        "arXiv:2309.06497",
        ("facebookresearch/optimizers DistributedShampoo (float64 transcription)", "pytorch_optimizer.Shampoo"),
        example={
            "lr": 0.02,
            "betas": (0.8, 0.99),
            "epsilon": 1e-3,  # float32 rounding of a rank-deficient factor is ~1e-7 of its norm: keep eps above it
            "momentum": 0.5,
            "weight_decay": 0.01,
            "max_preconditioner_dim": 8,
            "precondition_frequency": 2,
            "grafting": "adam",
        },
        invalid=(
            ({"epsilon": 0.0}, "epsilon"),
            ({"betas": (0.9, 0.0)}, "betas"),
            ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
            ({"precondition_frequency": 0}, "precondition_frequency"),
            ({"grafting": "lion"}, "grafting"),
            ({"start_preconditioning_step": 1, "precondition_frequency": 3}, "start_preconditioning_step"),
        ),
        sharding="whole-matrix",
    )
)

r"""PSGD-Kron: SGD preconditioned by a learned Kronecker-factored preconditioner (Li, 2015; Li, 2018).

Per parameter, with its unit dimensions dropped, of dimensions :math:`d_1 \times \dots \times d_k`, PSGD keeps one
factor :math:`Q_i` per dimension: upper triangular (:math:`d_i \times d_i`) or, for large dimensions and under
``memory_save_mode``, diagonal. The preconditioner is :math:`P = Q^\top Q` with :math:`Q = Q_1 \otimes\dots\otimes
Q_k`. At a preconditioner update, with a random probe :math:`v \sim \mathcal N(0, I)` and the perturbed gradient
:math:`h = m + (\delta + \epsilon_{32} |m|)\, v`:

.. math::
    A = Q h,\qquad B = Q^{-\top} v,\qquad
    Q_i \leftarrow Q_i - \frac{\eta_Q}{\ell_i}\,\mathrm{triu}\big(A_{(i)} A_{(i)}^\top - B_{(i)} B_{(i)}^\top\big)\, Q_i

(for a diagonal factor the products are the row sums of squares), where :math:`X_{(i)}` unfolds :math:`X` along
dimension :math:`i` and :math:`\ell_i` is a running lower bound of :math:`\lVert A_{(i)}A_{(i)}^\top +
B_{(i)}B_{(i)}^\top\rVert_2` (estimated by power iteration). The step direction is the trust-region clip of
:math:`P m` with :math:`m` the bias-corrected momentum of the gradient.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.hypers import Hyper, boolean, non_negative, non_negative_int, one_of, positive, unit_interval
from ..core.kronecker import apply_along_dims, kronecker_statistics
from ..core.ops import TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import whole_tensors
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["DebiasedMomentum", "KronPreconditioner", "PSGDKron", "TrustRegionClip"]

DEFAULT_SCHEDULE = (1.0, 0.03, 0.999, 1000)
"""heavyball's preconditioner update schedule: (max_prob, min_prob, decay, flat_start)."""
MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")
_EPS32 = torch.finfo(torch.float32).eps


def _schedule(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if 0 < value <= 1 else "must be a probability in (0, 1]"
    ok = isinstance(value, (tuple, list)) and len(value) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if ok and 0 < value[1] <= value[0] <= 1 and 0 < value[2] <= 1 and value[3] >= 0:
        return None
    return "must be None, a probability in (0, 1], or (max_prob, min_prob, decay, flat_start)"


def _optional_real(value: Any) -> str | None:
    return None if value is None else positive(value)


def update_probability(schedule: Any, n: int) -> float:
    """The probability of a preconditioner update at step ``n`` (heavyball's flat start, then exponential decay)."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    max_prob, min_prob, decay, flat_start = schedule if schedule is not None else DEFAULT_SCHEDULE
    return max(min_prob, max_prob * decay ** max(n - flat_start, 0))


def squeezed(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape the preconditioner sees: unit dimensions dropped."""
    return tuple(d for d in shape if d != 1)


def triangular_dims(shape: tuple[int, ...], max_size: int, min_ndim: int, mode: str | None) -> list[bool]:
    """For each dimension of a squeezed shape: a triangular factor (True) or a diagonal one (False)."""
    diag = [mode == "all_diag"] * len(shape)
    if shape and mode in ("one_diag", "smart_one_diag"):
        top = sorted(shape)
        if mode == "one_diag" or (len(shape) >= 2 and top[-1] > top[-2]):
            diag[len(shape) - 1 - shape[::-1].index(max(shape))] = True  # the last largest dimension
    elif mode == "one_triu" and shape:
        smallest = sorted(range(len(shape)), key=lambda i: shape[i])[0]
        diag = [i != smallest for i in range(len(shape))]
    return [not (d == 1 or d > max_size or len(shape) < min_ndim or dd) for d, dd in zip(shape, diag)]


def _scale_along(x: Tensor, dim: int, q: Tensor) -> Tensor:
    """``x`` (shape ``(n, ...)``) times a diagonal factor along ``dim`` (>= 1), or a scalar one per batch member."""
    shape = [q.shape[0]] + [1] * (x.dim() - 1)
    if q.dim() == 2:
        shape[dim] = -1
    return x * q.view(shape)


def _triangular(qs: list[Tensor]) -> list[bool]:
    return [q.dim() == 3 for q in qs]


def _apply_triangular(x: Tensor, qs: list[Tensor], transpose: bool) -> Tensor:
    """Each triangular factor along its dimension: :math:`Q_k` (``transpose``) or :math:`Q_k^\top`, through the
    shared :func:`~gradstep.core.kronecker.apply_along_dims` (one ``bmm`` per dimension for the batch)."""
    flags, n = _triangular(qs), x.shape[0]
    if not any(flags):
        return x
    mats = [[q[j] for q in qs if q.dim() == 3] for j in range(n)]
    return torch.stack(apply_along_dims(list(x.unbind(0)), mats, [flags] * n, transpose=transpose))


def _statistics(x: Tensor, qs: list[Tensor]) -> list[Tensor]:
    """Per factor: the Gram matrix of ``x`` unfolded along its dimension (triangular, the shared
    :func:`~gradstep.core.kronecker.kronecker_statistics`), its row sums of squares (diagonal), ``x**2`` (scalar)."""
    flags, n = _triangular(qs), x.shape[0]
    grams = iter(zip(*kronecker_statistics(list(x.unbind(0)), [flags] * n))) if any(flags) else iter(())
    out = []
    for dim, q in enumerate(qs, start=1):
        others = [d for d in range(1, x.dim()) if d != dim]
        if q.dim() == 3:
            out.append(torch.stack(next(grams)))
        else:  # (sum(dim=[]) would sum everything)
            out.append((x * x).sum(dim=others) if q.dim() == 2 and others else x * x)
    return out


def max_eigenvalue(m: Tensor, iterations: int) -> Tensor:
    """Largest eigenvalue of each symmetric PSD matrix of a batch: heavyball's power iteration from the largest row."""
    x_norm, index = m.norm(dim=-1).max(dim=-1)
    x_norm = x_norm.clamp(min=torch.finfo(torch.float32).tiny)
    x = m.gather(-2, index[:, None, None].expand(-1, 1, m.shape[-1])).squeeze(-2) / x_norm[:, None]
    a = m / x_norm[:, None, None]

    def twice(v: Tensor) -> Tensor:
        return ((v[:, None, :] @ a.mT) @ a.mT).squeeze(-2)

    for _ in range(iterations):
        x = F.normalize(twice(x), dim=-1)
    return (x * twice(x)).sum(dim=-1).sqrt() * x_norm


def update_factors(
    qs: list[Tensor], bounds: list[Tensor], h: Tensor, v: Tensor, lr: float, bound_beta: float, iterations: int
) -> None:
    """One step of Li's Kronecker-factor fit on the pair (probe ``v``, perturbed gradient ``h``), in place.

    ``qs``: one factor per dimension of ``h`` (batched over the leading dim: ``(n, d, d)`` triangular, ``(n, d)``
    diagonal, ``(n,)`` for scalars); ``bounds``: their running lower bounds ``(n,)``.
    """
    a, conj_b = h, v
    for i, q in enumerate(qs):
        if q.dim() < 3:
            a, conj_b = _scale_along(a, i + 1, q), _scale_along(conj_b, i + 1, 1 / q)
    a = _apply_triangular(a, qs, transpose=True)  # A = Q h
    for i, q in enumerate(qs):
        if q.dim() == 3:  # B = Q^{-T} v: v Q^{-1} along the dimension, by a triangular solve
            moved = conj_b.movedim(i + 1, -1)
            flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
            solved = torch.linalg.solve_triangular(q, flat, upper=True, left=False)
            conj_b = solved.reshape(moved.shape).movedim(-1, i + 1)
    news = []
    for q, bound, term1, term2 in zip(qs, bounds, _statistics(a, qs), _statistics(conj_b, qs)):
        total = term1 + term2
        if q.dim() == 3:
            ell, step = max_eigenvalue(total, iterations), (term1 - term2).triu() @ q
        else:
            ell, step = (total.amax(dim=-1) if q.dim() == 2 else total), q * (term1 - term2)
        ell = ell.to(bound.dtype)
        ell = ell.maximum(bound + (ell - bound) * (1 - bound_beta))  # the bound decays at most this fast
        bound.copy_(ell)
        news.append(q - step / ell.to(q.dtype).view(-1, *[1] * (q.dim() - 1)) * lr)
    for q, new in zip(qs, news):  # every factor's step is computed from the same A, B: write them together
        q.copy_(new)


def balance(qs: list[Tensor]) -> None:
    """Rescale the factors to equal largest magnitudes (their product, the preconditioner, is unchanged)."""
    norms = [q.abs().amax(dim=tuple(range(1, q.dim()))).log() for q in qs]
    mean = sum(norms) / len(qs)
    for q, norm in zip(qs, norms):
        q.mul_((mean - norm).exp().view(-1, *[1] * (q.dim() - 1)))


def precondition(qs: list[Tensor], g: Tensor) -> Tensor:
    """:math:`Q^\top Q g`, factor by factor."""
    for i, q in enumerate(qs):
        if q.dim() < 3:
            g = _scale_along(g, i + 1, q * q)
    return _apply_triangular(_apply_triangular(g, qs, transpose=True), qs, transpose=False)


class DebiasedMomentum(Transform):
    r"""The bias-corrected EMA, kept debiased (heavyball's ``exp_avg``): :math:`m_t = m_{t-1} + w_t (d_t - m_{t-1})`,
    :math:`w_t = (1-\beta)/(1-\beta^t)`. State: ``exp_avg``."""

    elementwise = True
    hypers = (Hyper("beta", 0.9, unit_interval, "momentum: decay of the moving average of the gradient"),)

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        beta = ctx.hyper("beta")
        weights = ctx.per_param((1 - torch.as_tensor(beta, dtype=torch.float64)) / ctx.bias_correction(beta))
        buf = ctx.buffer("exp_avg")
        ctx.ops.lerp_(buf, updates, weights)
        return buf


class TrustRegionClip(Transform):
    r"""heavyball's soft clip of the update: :math:`\mathrm{clip}_{[-2,2]}\big(s\,(0.9\tanh(u/s) +
    0.1\,\mathrm{sign}(u)\log(1 + |u|/s))\big)`, :math:`s = 1.5`."""

    elementwise = True
    hypers = (Hyper("update_clipping", "trust_region", one_of("trust_region", None), "soft clip of the step"),)

    def is_identity(self, group: dict[str, Any]) -> bool:
        return group["update_clipping"] is None

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        if ctx.hyper("update_clipping") is None:
            return updates
        x = torch._foreach_div(list(updates), 1.5)
        tanh = torch._foreach_tanh(x)
        logs = torch._foreach_log1p(torch._foreach_abs(x))
        out = torch._foreach_mul(torch._foreach_mul(logs, torch._foreach_sign(tanh)), 0.1)
        torch._foreach_add_(out, torch._foreach_mul(tanh, 0.9))
        torch._foreach_mul_(out, 1.5)
        return ctx.ops.clamp(out, -2.0, 2.0)


class KronPreconditioner(Transform):
    """Fit the Kronecker factors on the probe pair (when the schedule says so), then precondition the update.

    Same-shape parameters are stacked and stepped as one batch; their first-step scale is estimated on the batch, as
    heavyball does. The probe of a stacked draw is drawn from a ``torch.Generator`` seeded with
    :func:`draw_seed` (``seed``, the draw's shape, and how many preconditioner updates the schedule has made through
    the step), so a probe is a function of the step count alone: nothing about the streams needs saving, and a run
    resumed from any checkpoint (a distributed one included, which keeps only per-parameter state and groups) draws
    what the uninterrupted one would. With ``generator=`` the probes come from the user's generator instead.
    State per parameter: ``Q_i`` and ``running_lower_bound_i`` for each dimension ``i`` of its squeezed shape (one
    of each for a scalar), made by :meth:`factor_state` from the whole (unsharded) shape.
    """

    hypers = (
        Hyper("preconditioner_update_probability", None, _schedule, "probability or schedule of updates", False),
        Hyper("max_size_triangular", 2048, non_negative_int, "larger dimensions get a diagonal factor"),
        Hyper("min_ndim_triangular", 2, non_negative_int, "tensors of fewer dimensions get diagonal factors"),
        Hyper("memory_save_mode", None, one_of(*MEMORY_SAVE_MODES), "which dimensions get diagonal factors"),
        Hyper("momentum_into_precond_update", True, boolean, "fit the preconditioner on the momentum (else gradient)"),
        Hyper("precond_lr", 0.1, positive, "step size of the factor fit"),
        Hyper("precond_init_scale", None, _optional_real, "initial scale of Q (None: from the first gradient)"),
        Hyper("precond_init_scale_scale", 1.0, positive, "factor on the estimated initial scale"),
        Hyper("precond_init_scale_power", None, _optional_real, "power of the estimated initial scale (None: 0.5)"),
        Hyper("lower_bound_beta", 0.9, unit_interval, "decay of the running lower bound of the factor norms"),
        Hyper("dampening", 1e-9, non_negative, "probe perturbation added to the gradient"),
        Hyper("precond_update_power_iterations", 2, non_negative_int, "power iterations for the norm bound"),
    )

    def __init__(self, seed: int = 0, generator: torch.Generator | None = None) -> None:
        self.seed = seed
        self.user_generator = generator
        self.generators: dict[str, torch.Generator] = {}  # one per device, re-seeded for every draw
        self._sums: dict[Any, dict[int, tuple[float, float]]] = {}  # schedule -> {step: (C(step - 1), C(step))}

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        return True  # same-shape parameters form one batch, whatever their number

    def factor_count(self, shape: torch.Size | tuple[int, ...]) -> int:
        return max(len(squeezed(shape)), 1)

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        count = max((self.factor_count(p.shape) for p in group["params"]), default=1)
        # Placeholders: factor_state makes the tensors, from the whole shape (a sharded parameter's local one is not).
        return {f"{key}_{i}": _none for i in range(count) for key in ("Q", "running_lower_bound")}

    def factor_state(self, shape: torch.Size, group: dict[str, Any], dtype: torch.dtype, device: Any) -> dict[str, Any]:
        """Identity factors (scaled at the first step) and zero bounds for a parameter of ``shape``."""
        dims = squeezed(shape)
        kinds = triangular_dims(
            dims, group["max_size_triangular"], group["min_ndim_triangular"], group["memory_save_mode"]
        )
        out: dict[str, Any] = dict.fromkeys(self.buffers(group))
        if not dims:
            out["Q_0"] = torch.ones((), dtype=dtype, device=device)
        for i, (d, tri) in enumerate(zip(dims, kinds)):
            eye = torch.eye(d, dtype=dtype, device=device) if tri else None
            out[f"Q_{i}"] = eye if eye is not None else torch.ones(d, dtype=dtype, device=device)
        for i in range(self.factor_count(shape)):
            out[f"running_lower_bound_{i}"] = torch.zeros((), dtype=dtype, device=device)
        return out

    def generator(self, key: str, draw: int) -> torch.Generator:
        """The generator of draw number ``draw`` (1, 2, ...) of probes keyed ``key`` (``"device|shape"``, the shape of
        one stacked draw): seeded by :func:`draw_seed`, or the user's generator as it stands.

        A probe depends on the seed, the draw's shape and its number, not on what other groups or shapes drew.
        """
        if self.user_generator is not None:
            return self.user_generator
        device, shape = key.split("|")
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device].manual_seed(draw_seed(self.seed, shape, draw))

    def due(self, schedule: Any, step: int) -> bool:
        """heavyball's deterministic 'probability': an update when the running sum of probabilities passes an
        integer. Derived from the step count (no state to save), advanced from the nearest step already summed."""
        return self.updates_through(schedule, step) > self.updates_through(schedule, step - 1)

    def updates_through(self, schedule: Any, step: int) -> int:
        """How many preconditioner updates the schedule makes in steps 1 to ``step``: the integer part of the sum
        of its probabilities."""
        if step <= 0:
            return 0
        key = tuple(schedule) if isinstance(schedule, list) else schedule
        known = self._sums.setdefault(key, {})
        if step not in known:
            last = max((s for s in known if s < step), default=0)
            before, now = known.get(last, (0.0, 0.0))
            while last < step:
                last, before, now = last + 1, now, now + update_probability(schedule, last + 1)
            known[step] = (before, now)
            if len(known) > 16:  # the least recently summed step goes (groups at other counts re-add theirs)
                del known[next(iter(known))]
        return int(known[step][1])

    def _init_scale(self, group: dict[str, Any], grads: Tensor) -> float:
        if group["precond_init_scale"] is not None:
            return float(group["precond_init_scale"])
        logs = grads.double().abs().clamp(min=1e-12).log().flatten() * 4
        log_mean = (torch.logsumexp(logs, dim=0) - math.log(max(grads.numel(), 1))) / 8  # log mean(g^4)^(1/8)
        power = group["precond_init_scale_power"]
        return (float(torch.exp(-log_mean)) * group["precond_init_scale_scale"]) ** (0.5 if power is None else power)

    @torch.compiler.disable  # random draws, triangular solves and branches on the step count: eager, as heavyball's
    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        group, count = ctx.group, len(updates)
        # Under FSDP2 every rank gathers the whole tensors, steps them alike (same probes) and keeps its rows.
        wholes, local_parts = whole_tensors([*updates, *ctx.grads])
        moms, grads = wholes[:count], wholes[count:]
        steps = [int(s) for s in ctx.steps.tolist()]
        buckets: dict[Any, list[int]] = {}
        for i, m in enumerate(moms):
            buckets.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
        out: list[Tensor] = [torch.zeros_like(m) for m in moms]
        for (shape, _, _), members in buckets.items():
            fresh = [i for i in members if steps[i] == 1]
            for sub in (fresh, [i for i in members if steps[i] != 1]):
                due = [i for i in sub if self.due(group["preconditioner_update_probability"], steps[i])]
                for part, fit in ((due, True), ([i for i in sub if i not in due], False)):
                    if part and math.prod(shape) > 0:
                        self._step_batch(ctx, part, moms, grads, out, fit, part[0] in fresh)
        return local_parts(out)

    def _step_batch(
        self,
        ctx: GroupStep,
        idx: list[int],
        moms: list[Tensor],
        grads: list[Tensor],
        out: list[Tensor],
        fit: bool,
        fresh: bool,
    ) -> None:
        group, n = ctx.group, len(idx)
        dims = squeezed(moms[idx[0]].shape)
        m = torch.stack([moms[i] for i in idx]).view(n, *dims)
        raw = torch.stack([grads[i] for i in idx]).view(n, *dims).to(m.dtype)
        count = self.factor_count(dims)
        states = [ctx.states[i] for i in idx]
        qs = [torch.stack([s[f"Q_{j}"] for s in states]) for j in range(count)]
        if fresh:
            scale = self._init_scale(group, raw)
            for q in qs:
                q.mul_(scale ** (1 / len(dims)) if dims else scale)
        if fit:
            bounds = [torch.stack([s[f"running_lower_bound_{j}"] for s in states]) for j in range(count)]
            balance(qs)
            target = m if group["momentum_into_precond_update"] else raw
            draw = self.updates_through(group["preconditioner_update_probability"], int(ctx.steps[idx[0]]))
            stream = self.generator(stream_key(target.device, target.shape), draw)
            probe = torch.randn(target.shape, generator=stream, dtype=m.dtype, device=m.device)
            perturbed = target + (group["dampening"] + _EPS32 * target.abs()) * probe
            update_factors(
                qs,
                bounds,
                perturbed,
                probe,
                group["precond_lr"],
                group["lower_bound_beta"],
                group["precond_update_power_iterations"],
            )
            for j, b in enumerate(bounds):
                torch._foreach_copy_([s[f"running_lower_bound_{j}"] for s in states], list(b.unbind(0)))
        for j, q in enumerate(qs):
            torch._foreach_copy_([s[f"Q_{j}"] for s in states], list(q.unbind(0)))
        result = precondition(qs, m)
        for k, i in enumerate(idx):
            out[i] = result[k].view(moms[i].shape)


def stream_key(device: torch.device, shape: torch.Size | tuple[int, ...]) -> str:
    return f"{device}|{'x'.join(map(str, shape))}"


def draw_seed(seed: int, shape: str, draw: int) -> int:
    """The seed of draw number ``draw`` of probes shaped ``shape``: ``seed`` mixed with a checksum of the shape and
    with the draw's number (times a large odd constant, so that neighbouring draws get distant seeds)."""
    return (seed * 1_000_003 + zlib.crc32(shape.encode()) + draw * 0x9E3779B97F4A7C15) % 2**63


def _none(param: Tensor, dtype: torch.dtype) -> Any:
    return None


class PSGDKron(ChainedOptimizer):
    r"""PSGD with a Kronecker-factored preconditioner (Xi-Lin Li), as heavyball's ``PSGDKron``.

    .. math::
        m_t = m_{t-1} + \tfrac{1-\beta}{1-\beta^t}(g_t - m_{t-1}),\qquad
        Q_i \leftarrow Q_i - \tfrac{\eta_Q}{\ell_i}\,\mathrm{triu}\big(A_{(i)}A_{(i)}^\top - B_{(i)}B_{(i)}^\top\big)Q_i
        \ \text{(at scheduled steps)},

    .. math::
        p_t = (1 - \text{lr}\,\lambda)\,p_{t-1} - \text{lr}\cdot\mathrm{clip}\big(Q^\top Q\, m_t\big)

    with :math:`A = Q(m_t + \delta v)`, :math:`B = Q^{-\top}v` for a Gaussian probe :math:`v`, :math:`\ell_i` a
    running lower bound of the spectral norm of :math:`A_{(i)}A_{(i)}^\top + B_{(i)}B_{(i)}^\top`, and ``clip``
    heavyball's trust-region clip (``update_clipping=None`` turns it off). A dimension gets a diagonal factor when it
    is larger than ``max_size_triangular``, the tensor has fewer than ``min_ndim_triangular`` dimensions, or
    ``memory_save_mode`` says so (``"one_diag"``: the largest dimension; ``"smart_one_diag"``: the largest when it is
    strictly the largest; ``"one_triu"``: all but the smallest; ``"all_diag"``). Scalars and vectors are stepped too.
    Preconditioner updates happen when the running sum of ``preconditioner_update_probability`` (a number, or
    heavyball's schedule ``(max_prob, min_prob, decay, flat_start)``, default ``(1, 0.03, 0.999, 1000)``) passes an
    integer. The first step scales the factors by :math:`(c\,(\mathrm{mean}\,g^4)^{-1/8})^{r}` (``c =
    precond_init_scale_scale``, ``r = precond_init_scale_power``, default 0.5; ``precond_init_scale`` fixes it).

    Each probe comes from a ``torch.Generator`` seeded from ``seed`` (default 0, so every run and every rank draws
    the same), the shape of the stacked draw and the number of preconditioner updates through the step
    (:func:`draw_seed`): a resumed run draws what the uninterrupted one would, from ``state_dict()`` or from a
    distributed checkpoint alike. ``generator=`` draws from yours instead (its state is saved in ``state_dict()``).

    Li, 2015. Preconditioned stochastic gradient descent. arXiv:1512.04202 (IEEE TNNLS 2018). — Li, 2018.
    Preconditioner on matrix Lie group for SGD. arXiv:1809.10232. Code: github.com/lixilinx/psgd_torch.

    .. warning::
        Differences from heavyball 3.2.1's ``PSGDKron`` (defaults as there, except as listed):

        * Probes are drawn from the optimizer's own generator, seeded per draw, not torch's global generator.
        * The momentum weight :math:`(1-\beta)/(1-\beta^t)` is computed in float64 (heavyball: float32).
        * The factors are kept in the state dtype (the parameter's, float32 for half precision; heavyball:
          ``q_dtype="float32"``), as full triangular matrices (heavyball stores their upper triangle as a line); so are
          the running lower bounds (heavyball: float64).
        * A first gradient that is all zeros scales the factors by the estimate's clamped value (heavyball raises).
        * The update schedule is read per parameter from its own step count (heavyball: the optimizer's step calls;
          the same when every parameter has a gradient at every step); a callable schedule is not taken (it would not
          be saved in a checkpoint).
        * Not provided: ``warmup_steps`` (use an LR scheduler), ``caution``, ``mars``, ``delayed``, ``cached``,
          ``merge_dims``, ``split``, ``precond_grad_accum``, Hessian-vector products, ``ecc``; weight decay is the
          core's decoupled one (the same math, rounded differently). Cross-check: pytorch-optimizer's ``Kron`` is
          the older kron-torch rule (no lower bound, balancing with probability 0.01, RMS clip), not matched.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = gradstep.PSGDKron([w], lr=0.1, seed=1)
        >>> w.grad = torch.ones(3, 2); _ = opt.step()
        >>> bool((w < 1).all()), sorted(k for k in opt.state[w] if k.startswith("Q"))
        (True, ['Q_0', 'Q_1'])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: Any = None,
        max_size_triangular: int = 2048,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float | None = None,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Invalid seed: {seed!r} (must be an int)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [DebiasedMomentum(), KronPreconditioner(seed, generator), TrustRegionClip()],
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            maximize=maximize,
            foreach=foreach,
            **options,
        )

    @property
    def _kron(self) -> KronPreconditioner:
        # Found in the chain (which deepcopy and pickling keep), not held twice.
        return next(t for t in self.transforms if isinstance(t, KronPreconditioner))

    def _init_param_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "Q_0" not in state or state["Q_0"] is None:
            made = self._kron.factor_state(p.shape, group, self._state_dtype(group, p), p.device)
            state.update((k, v) for k, v in made.items() if state.get(k) is None)
        super()._init_param_state(group, p, state)

    def state_templates(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        templates = super().state_templates(group, p)
        templates.update(self._kron.factor_state(p.shape, group, self._state_dtype(group, p), "meta"))
        return templates

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        kron = self._kron
        sd["gradstep"]["probe_seed"] = kron.seed
        if kron.user_generator is not None:
            sd["gradstep"]["probe_generators"] = {"user|": kron.user_generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`ChainedOptimizer.load_state_dict`; the probes continue from the saved seed (and, where the saver
        drew from a user's ``generator=``, that generator's saved state goes into this optimizer's own one)."""
        extra = (state_dict.get("gradstep") or {}) if isinstance(state_dict, dict) else {}
        saved: Any = extra.get("probe_generators", {}) if isinstance(extra, dict) else None
        seed = extra.get("probe_seed", self._kron.seed) if isinstance(extra, dict) else None
        ok = isinstance(saved, dict) and all(
            k == "user|" and isinstance(v, Tensor) and v.dtype == torch.uint8 for k, v in saved.items()
        )
        if not ok:
            raise ValueError(
                "PSGDKron cannot load this state_dict: gradstep.probe_generators is not a dict of "
                "'user|' -> generator state (uint8 tensor)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"PSGDKron cannot load this state_dict: gradstep.probe_seed is {seed!r}, not an int")
        super().load_state_dict(state_dict)
        kron = self._kron
        kron.seed = seed
        if "user|" in saved and kron.user_generator is not None:
            kron.user_generator.set_state(saved["user|"].cpu())


register(
    Entry(
        "psgd_kron",
        PSGDKron,
        "SGD with a learned Kronecker-factored preconditioner (PSGD-Kron), fitted on random probes",
        "Li, 2015. Preconditioned stochastic gradient descent. arXiv:1512.04202; Li, 2018. Preconditioner on matrix "
        "Lie group for SGD. arXiv:1809.10232",
        ("heavyball.PSGDKron",),
        example={
            "lr": 3e-3,
            "beta": 0.8,
            "weight_decay": 0.01,
            "preconditioner_update_probability": 0.5,
            "precond_lr": 0.2,
            "memory_save_mode": "smart_one_diag",
        },
        invalid=(
            ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
            ({"memory_save_mode": "some_diag"}, "memory_save_mode"),
            ({"precond_lr": 0.0}, "precond_lr"),
            ({"beta": 1.0}, "beta"),
        ),
        sharding="whole-matrix",
    )
)

r"""L-BFGS with an optional strong-Wolfe line search, as ``torch.optim.LBFGS`` (Liu & Nocedal, 1989).

L-BFGS is not a chain of per-parameter transforms: its direction is a function of the whole model's gradient and
of the last ``history_size`` steps, and each ``step(closure)`` re-evaluates the model several times. So it is its own
``torch.optim.Optimizer`` here, with torch's flat-vector state (one vector over all parameters, kept on the first
parameter), gradstep's validation and non-finite policy, and its reductions through the shared ones.

The arithmetic is torch's, on the same flat vectors in the same order (one dot product over the whole vector, the
same updates of the history), so the two agree to the last bit in float64 on the CPU; only the parameter writes and
the gradient gathering go parameter by parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.hypers import Hyper, non_negative, one_of
from ..core.nonfinite import NonFiniteError
from ..core.registry import Entry, register

__all__ = ["LBFGS"]


def _positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "must be an int > 0"


HYPERS = (
    Hyper("lr", 1.0, non_negative, "step size (the line search's first trial step)"),
    Hyper("max_iter", 20, _positive_int, "iterations per step()"),
    Hyper("max_eval", None, lambda v: None if v is None else _positive_int(v), "closure calls per step()"),
    Hyper("tolerance_grad", 1e-7, non_negative, "stop when max |g| <= this"),
    Hyper("tolerance_change", 1e-9, non_negative, "stop when the step or the loss changes by less"),
    Hyper("history_size", 100, _positive_int, "number of (y, s) pairs kept"),
    Hyper("line_search_fn", None, one_of(None, "strong_wolfe"), "None (fixed step lr) or 'strong_wolfe'"),
    Hyper("nonfinite", "error", one_of("error", "skip", "ignore"), "policy for a NaN/Inf first gradient of a step"),
)


class _Flat:
    """The layout of the parameters in one flat vector, and the layout-independent arithmetic on such vectors."""

    def __init__(self, views: list[Tensor], dtype: torch.dtype) -> None:
        self.views, self.dtype = views, dtype
        self.shapes = [v.shape for v in views]
        self.sizes = [v.numel() for v in views]

    def split(self, flat: Tensor) -> list[Tensor]:
        return [part.view(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]

    def gather(self, grads: list[Tensor | None]) -> Tensor:
        flat = torch.zeros(sum(self.sizes), dtype=self.dtype, device=self.views[0].device)
        for part, g in zip(self.split(flat), grads):
            if g is not None:
                part.copy_(g)
        return flat

    def add_to_params(self, step: Tensor, alpha: float) -> None:
        for view, part in zip(self.views, self.split(step)):
            view.add_(part, alpha=alpha)


class LBFGS(torch.optim.Optimizer):
    r"""L-BFGS (``torch.optim.LBFGS``): quasi-Newton steps from the last ``history_size`` curvature pairs.

    Each ``step(closure)`` runs up to ``max_iter`` iterations. With :math:`g_k` the flat gradient,
    :math:`s_i = t_i d_i` and :math:`y_i = g_{i+1} - g_i` the pairs kept (those with :math:`y_i^\top s_i > 10^{-10}`),
    :math:`\rho_i = 1/y_i^\top s_i` and :math:`H_0 = y^\top s / y^\top y` of the newest pair, the two-loop recursion

    .. math::
        q \leftarrow -g_k;\quad \alpha_i = \rho_i s_i^\top q,\ q \leftarrow q - \alpha_i y_i\ (i = m..1);\quad
        d \leftarrow H_0 q;\quad d \leftarrow d + s_i(\alpha_i - \rho_i y_i^\top d)\ (i = 1..m)

    gives the direction :math:`d_k \approx -H_k^{-1} g_k`, and :math:`x_{k+1} = x_k + t_k d_k` with
    :math:`t_k = \text{lr}` (the first iteration: :math:`\min(1, 1/\lVert g\rVert_1)\,\text{lr}`) or the step found by
    a strong-Wolfe line search (cubic interpolation, :math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`). Iterations stop at
    ``max_iter``, ``max_eval`` closure calls, :math:`\max|g| \le` ``tolerance_grad``, or a step or loss change below
    ``tolerance_change``.

    Liu & Nocedal, 1989. On the limited memory BFGS method for large scale optimization. Mathematical Programming
    45, 503-528. Nocedal & Wright, 2006. Numerical Optimization, algorithms 7.4 and 3.5-3.6.

    .. warning::
        Differences from ``torch.optim.LBFGS`` (torch 2.13): the state's ``t`` is always a float and ``H_diag`` a
        0-d tensor (torch stores whichever its last iteration computed: the int 1, floats or 0-d tensors; the values
        are the same). bfloat16/float16 parameters keep float32 state (torch: their dtype).
        Additions: ``nonfinite`` ("error": a NaN/Inf gradient at the start of a step raises and changes nothing;
        "skip": such a step is skipped; "ignore": torch's behaviour); sparse gradients are refused. As in torch, one
        param group only, and the closure is required. DTensor (FSDP2-sharded) parameters are refused: the line
        search compares loss values, which each rank's closure computes on its own data.

    Example::

        >>> import torch, gradstep
        >>> x = torch.nn.Parameter(torch.tensor([1.5, -0.5]))
        >>> opt = gradstep.LBFGS([x], line_search_fn="strong_wolfe")
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (x[0] - 1) ** 2 + 10 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     _ = opt.step(closure)
        >>> torch.allclose(x.detach(), torch.ones(2), atol=1e-4)
        True
    """

    closure_required: ClassVar[bool] = True
    single_group: ClassVar[bool] = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        nonfinite: str = "error",
    ) -> None:
        if isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
            nonfinite=nonfinite,
        )
        for hyper in HYPERS:
            hyper.validate(defaults[hyper.name])
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        for hyper in HYPERS:
            if hyper.name in param_group:
                hyper.validate(param_group[hyper.name])
        for p in param_group["params"] if not isinstance(param_group["params"], Tensor) else [param_group["params"]]:
            if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # a DTensor
                raise TypeError(
                    "LBFGS does not support DTensor (FSDP2-sharded) parameters: its line search and stopping tests "
                    "compare loss values, which each rank computes on its own data"
                )
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"LBFGS can only optimize floating-point tensors, got {p.dtype}")
        super().add_param_group(param_group)

    def _layout(self) -> tuple[list[Tensor], _Flat]:
        params: list[Tensor] = self.param_groups[0]["params"]
        views = [torch.view_as_real(p) if p.is_complex() else p for p in params]
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in views])
        dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # fp32 state for low precision
        return params, _Flat(views, dtype)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state a first step creates (zeros; the first iteration overwrites it), with no other effect."""
        params, flat = self._layout()
        n, device = sum(flat.sizes), params[0].device
        state = self.state[params[0]]
        state.update(func_evals=0, n_iter=0, t=0.0, prev_loss=0.0, old_dirs=[], old_stps=[], ro=[])
        state.update(d=torch.zeros(n, dtype=flat.dtype, device=device), H_diag=torch.tensor(1.0, dtype=flat.dtype))
        state.update(prev_flat_grad=torch.zeros(n, dtype=flat.dtype, device=device))
        state["al"] = [None] * self.param_groups[0]["history_size"]

    def _gather(self, flat: _Flat, params: list[Tensor]) -> Tensor:
        grads: list[Tensor | None] = []
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"LBFGS does not support sparse gradients (parameter {i} of the group)")
            grads.append(None if p.grad is None else (torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad))
        return flat.gather(grads)

    def _evaluate(self, closure: Callable[[], Any], flat: _Flat, params: list[Tensor]) -> tuple[float, Tensor]:
        loss = float(closure())
        return loss, self._gather(flat, params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` L-BFGS iterations; ``closure`` re-evaluates the model and returns the loss."""
        if closure is None:
            raise RuntimeError("LBFGS needs a closure that re-evaluates the model and returns the loss: step(closure)")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        params, flat = self._layout()
        views, dtype = flat.views, flat.dtype
        lr = float(group["lr"])
        max_iter, max_eval, history_size = group["max_iter"], group["max_eval"], group["history_size"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]

        orig_loss = closure()
        loss = float(orig_loss)
        flat_grad = self._gather(flat, params)
        if group["nonfinite"] != "ignore" and not bool(torch.isfinite(flat_grad).all()):
            if group["nonfinite"] == "error":
                raise NonFiniteError(
                    "LBFGS: non-finite gradient (nonfinite='error'; parameters and state were not modified). "
                    "Use nonfinite='skip' to skip such steps."
                )
            return orig_loss
        state = self.state[params[0]]  # the state is global; torch keeps it on the first parameter
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        current_evals = 1
        state["func_evals"] += 1
        if float(flat_grad.abs().max()) <= tolerance_grad:
            return orig_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro, H_diag = [], [], [], 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al = state["al"]
                q = flat_grad.neg()
                for i in range(len(old_dirs) - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, H_diag)
                for i in range(len(old_dirs)):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)
            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr  # type: ignore[operator]
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if group["line_search_fn"] is not None:
                x_init = [v.clone(memory_format=torch.contiguous_format) for v in views]

                def obj_func(t: Any, d: Tensor = d, x_init: list[Tensor] = x_init) -> tuple[float, Tensor]:
                    flat.add_to_params(d, t)
                    result = self._evaluate(closure, flat, params)
                    for v, x in zip(views, x_init):
                        v.copy_(x)
                    return result

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    obj_func, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                flat.add_to_params(d, t)
                opt_cond = float(flat_grad.abs().max()) <= tolerance_grad
            else:
                flat.add_to_params(d, t)
                opt_cond = False
                if n_iter != max_iter:
                    loss, flat_grad = self._evaluate(closure, flat, params)
                    opt_cond = float(flat_grad.abs().max()) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        # torch's t and H_diag are floats or 0-d tensors depending on the path; stored as one type each (the values
        # are the same), so that a state_dict always has the same structure.
        H_diag = H_diag if isinstance(H_diag, Tensor) else torch.tensor(float(H_diag), dtype=dtype)
        state.update(d=d, t=float(t), old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag)
        state.update(prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        return orig_loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict; unlike torch, tensors are copied and keep their saved dtype (float32 state stays so)."""

        def copy(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone()
            if isinstance(value, list):
                return [copy(v) for v in value]
            return value

        state_dict = dict(state_dict)
        state_dict["state"] = {k: {n: copy(v) for n, v in s.items()} for k, s in state_dict["state"].items()}
        saved = {k: v for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved:
                # torch casts floating-point state to the parameter's dtype: put the saved (copied) tensors back.
                self.state[p] = {n: copy(v) for n, v in saved[pid].items()}


def _cubic_interpolate(x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any, bounds: Any = None) -> Any:
    """The minimiser of the cubic through two points with their slopes, clamped to ``bounds``.

    torch's expressions on torch's mix of floats and 0-d tensors (``number / tensor`` is ``number * (1 / tensor)``
    there), so that the result is the same to the bit.
    """
    xmin_bound, xmax_bound = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    width = x1 - x2
    # Two equal float points (a zero lr): torch divides by zero; the midpoint of the bounds is taken instead.
    d1 = g1 + g2 - (3 * (f1 - f2) / width if isinstance(width, Tensor) or width != 0 else math.nan)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt() if isinstance(d2_square, Tensor) else math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(
    obj_func: Callable[[Any], tuple[float, Tensor]],
    t: Any,
    d: Tensor,
    f: float,
    g: Tensor,
    gtd: Tensor,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, Tensor, Any, int]:
    """torch's strong-Wolfe line search (bracketing, then zoom by cubic interpolation), with its arithmetic."""
    d_norm = d.abs().max()
    f_new, g_new = obj_func(t)
    ls_func_evals, ls_iter, done = 1, 0, False
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    bracket: list[Any] = []
    bracket_f: list[float] = []
    bracket_g: list[Tensor] = []
    bracket_gtd: list[Any] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g, done = [t], [f_new], [g_new], True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step, max_step = t + 0.01 * (t - t_prev), t * 10
        t_prev, t = t, _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        f_prev, g_prev, gtd_prev = f_new, g_new, gtd_new
        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # Safeguard: a point too close to an end of the bracket is moved a tenth of its width inside.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos], bracket_g[high_pos] = t, f_new, g_new
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos], bracket_g[low_pos] = t, f_new, g_new
            bracket_gtd[low_pos] = gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


register(
    Entry(
        "lbfgs",
        LBFGS,
        "Limited-memory BFGS with an optional strong-Wolfe line search (closure required, one param group)",
        "Liu & Nocedal, 1989. On the limited memory BFGS method for large scale optimization. Math. Programming 45",
        ("torch.optim.LBFGS",),
        example={"lr": 0.5, "max_iter": 4, "history_size": 3, "line_search_fn": "strong_wolfe"},
        invalid=(
            ({"history_size": 0}, "history_size"),
            ({"line_search_fn": "armijo"}, "line_search_fn"),
            ({"lr": -1.0}, "lr"),
            ({"max_iter": 0}, "max_iter"),
        ),
        sharding="unsharded",
    )
)

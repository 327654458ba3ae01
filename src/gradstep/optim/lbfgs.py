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

from ..core.groups import GroupToolsMixin
from ..core.hypers import Hyper, non_negative, one_of
from ..core.nonfinite import NonFiniteError
from ..core.registry import Entry, register
from .line_search import strong_wolfe

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
    """The parameters' layout in one flat vector (torch's), and the moves between the two."""

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


class LBFGS(GroupToolsMixin, torch.optim.Optimizer):
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
        "skip": such a step is skipped; "ignore": torch's behaviour); sparse gradients are refused (torch densifies
        them, while its own tests list LBFGS as not supporting them). Complex parameters are optimized as pairs of
        reals, as torch does. ``set_hyper`` validates the value (a refused one changes nothing). As in torch, one
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
        if params is None or isinstance(params, Tensor):
            raise TypeError(f"params must be an iterable of Tensors or dicts, got {type(params).__name__}")
        super().__init__(params, defaults)

    def declared_hypers(self) -> dict[str, Hyper]:
        """The hyperparameters with their checks (read by ``set_hyper``)."""
        return {hyper.name: hyper for hyper in HYPERS}

    def _supports_complex(self) -> bool:
        return True  # a complex parameter is a pair of reals in the flat vector (torch.view_as_real), as in torch

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        for hyper in HYPERS:
            if hyper.name in param_group:
                hyper.validate(param_group[hyper.name])
        params = param_group["params"]
        # A generator would be used up by the checks below: a list, as torch makes it (torch refuses a set).
        params = [params] if isinstance(params, Tensor) else params if isinstance(params, set) else list(params)
        param_group = {**param_group, "params": params}
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named parameters: (name, tensor)
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError("LBFGS: a parameter appears twice in the param group (it would be stepped twice)")
        for p in tensors:
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

                loss, flat_grad, t, ls_func_evals = strong_wolfe(
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
        """Load a state_dict (gradstep's or torch.optim.LBFGS's), all or nothing.

        Everything is checked before anything is written: one group with as many parameters, valid hyperparameters
        (those an older dict lacks take the defaults), flat vectors of the right length, finite and floating. Unlike
        torch, tensors are copied and keep their saved dtype (float32 state of bfloat16 parameters stays so).
        """

        def copy(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone()
            return [copy(v) for v in value] if isinstance(value, list) else value

        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.param_groups[0]["params"]):
            raise ValueError("LBFGS: the state_dict must have one param group with as many parameters as this one")
        group = {**self.defaults, **{k: v for k, v in groups[0].items() if k != "params"}}
        for hyper in HYPERS:
            hyper.validate(group[hyper.name])
        params, flat = self._layout()
        saved = state_dict["state"].get(groups[0]["params"][0], {})
        _check_state(saved, sum(flat.sizes), group["history_size"])
        super().load_state_dict({"state": {}, "param_groups": [{**group, "params": groups[0]["params"]}]})
        self.state.clear()
        if saved:
            self.state[params[0]] = {k: copy(v) for k, v in saved.items()}


_VECTORS = ("d", "prev_flat_grad")
_HISTORY = ("old_dirs", "old_stps")
_KEYS = {"func_evals", "n_iter", "t", "ro", "H_diag", "prev_loss", "al", *_VECTORS, *_HISTORY}


def _check_state(state: dict[str, Any], n: int, history_size: int) -> None:
    """Refuse (``ValueError``) a saved LBFGS state that a step could not use.

    torch's state mixes tensors, Python numbers and lists (``t`` and ``H_diag`` are numbers or 0-d tensors, ``ro``
    and ``al`` lists of 0-d tensors): each entry is checked for what the next step reads from it.
    """

    def flat_vector(key: str, v: Any) -> None:
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != (n,) or not bool(v.isfinite().all()):
            raise ValueError(f"LBFGS: state {key!r} must be a finite floating-point vector of {n} elements")

    def number(key: str, v: Any) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = ok or (isinstance(v, Tensor) and v.dim() == 0 and v.is_floating_point())
        if not ok or not math.isfinite(float(v)):
            raise ValueError(f"LBFGS: state {key!r} must be a finite real number (or 0-d tensor), got {v!r}")

    unknown = set(state) - _KEYS
    if unknown:
        raise ValueError(f"LBFGS: unknown state {sorted(unknown)} (was this state_dict saved by another optimizer?)")
    for key in ("func_evals", "n_iter"):
        v = state.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"LBFGS: state {key!r} must be an int >= 0, got {v!r}")
    if "d" not in state and "prev_flat_grad" not in state:
        return  # no iteration yet (counters only)
    missing = {"t", "ro", "H_diag", "prev_loss", *_VECTORS, *_HISTORY} - set(state)
    if missing:
        raise ValueError(f"LBFGS: the state lacks {sorted(missing)}")
    for key in _VECTORS:
        flat_vector(key, state[key])
    for key in ("t", "H_diag", "prev_loss"):
        number(key, state[key])
    if not isinstance(state["ro"], list) or len(state["ro"]) > history_size:
        raise ValueError(f"LBFGS: state 'ro' must be a list of at most history_size={history_size} entries")
    for i, v in enumerate(state["ro"]):
        number(f"ro[{i}]", v)
    for key in _HISTORY:
        if not isinstance(state[key], list) or len(state[key]) != len(state["ro"]):
            raise ValueError(f"LBFGS: state {key!r} must be a list as long as 'ro'")
        for i, v in enumerate(state[key]):
            flat_vector(f"{key}[{i}]", v)
    al = state.get("al")
    if al is not None:
        if not isinstance(al, list) or len(al) < len(state["ro"]):
            raise ValueError("LBFGS: state 'al' must be a list at least as long as 'ro'")
        for i, v in enumerate(al):
            if v is not None:
                number(f"al[{i}]", v)


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

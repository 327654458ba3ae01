"""The optimizer core: a ``torch.optim.Optimizer`` whose update rule is a chain of transforms.

One step of one parameter group, for the parameters that have a gradient::

    g     = -grad if maximize else grad              (cast to the state dtype; the user's grad is never written)
    g     = g + wd * p                               (weight_decay_mode == "coupled")
    d     = transform_n(... transform_1(g))          (the chain: statistics and scaling, on lists of tensors)
    lr_i  = lr * lr_scale  (opt_args may override both per parameter; 0 while t <= backoff_steps)
    Δ     = lr_i * d  [+ lr_i * wd * p]              (decoupled weight decay; clipped to ±clip_step if set)
    p     = p - Δ  [/ (1 + lr_i * wd)]               (proximal weight decay)

Everything around the chain is written once here: lazy per-parameter state (``step`` and the transforms'
buffers), the non-finite policy (:mod:`gradstep.core.nonfinite`), low-precision parameters (fp32 state by default,
optional stochastic rounding of the write), complex parameters (as real views), fastai's group tools
(:mod:`gradstep.core.groups`) and checkpoints that copy their tensors and refuse another optimizer's state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from . import codecs
from .cautious import with_cautious
from .codecs import is_dtensor as _is_dtensor
from .fused import all_fusable, chain_kernel, group_blockers, param_blockers, run_fused
from .groups import GroupToolsMixin
from .hypers import REQUIRED, Hyper, boolean, expand_hypers, non_negative, non_negative_int, one_of, optional_bool
from .loading import STEP_DTYPE, validated_load
from .nonfinite import POLICIES, NonFiniteError, finite_flags, first_nonfinite, rank_note
from .ops import FOREACH, PER_TENSOR, Coef, Direction, Quotient, TensorList, evaluate, is_number
from .reductions import sharded_as
from .transform import GroupStep, Transform, coef_is_zero, coef_mul, zeros

__all__ = ["CORE_HYPERS", "ChainedOptimizer", "OPT_ARGS_KEYS", "chain"]

_STATE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _state_dtype_check(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value in _STATE_DTYPES):
        return None
    return f"must be None or one of {', '.join(map(repr, _STATE_DTYPES))}"


CORE_HYPERS: tuple[Hyper, ...] = (
    Hyper("lr", 1e-3, non_negative, "learning rate"),
    Hyper("lr_scale", 1.0, non_negative, "multiplies lr (layer-wise lr decay); schedulers leave it alone"),
    Hyper("weight_decay", 0.0, non_negative, "weight decay factor"),
    Hyper(
        "weight_decay_mode",
        "coupled",
        one_of("coupled", "decoupled", "proximal"),
        "coupled: g + wd*p; decoupled: p*(1 - lr*wd) (AdamW); proximal: p/(1 + lr*wd) after the step",
    ),
    Hyper("maximize", False, boolean, "maximize the objective instead of minimizing"),
    Hyper("foreach", None, optional_bool, "multi-tensor kernels (None or True) or the per-tensor reference (False)"),
    Hyper("nonfinite", "error", one_of(*POLICIES), "policy for NaN/Inf gradients and updates"),
    Hyper("state_dtype", None, _state_dtype_check, "dtype of state tensors (None: fp32 for bf16/fp16 params)"),
    Hyper("clip_step", 0.0, non_negative, "clamp each element of the final step to [-clip_step, clip_step] (0: off)"),
    Hyper("backoff_steps", 0, non_negative_int, "the first N steps update the state but not the parameters"),
    Hyper("stochastic_rounding", False, boolean, "round bfloat16 parameter writes stochastically"),
    Hyper(
        "kahan_summation",
        False,
        boolean,
        "bfloat16/float16 parameters keep a compensation buffer of their dtype that carries what rounding the "
        "write lost into the next step (torch-optimi's kahan_sum)",
    ),
    Hyper(
        "state_codec",
        "fp32",
        one_of(*codecs.CODECS),
        "storage of element-wise state buffers: fp32 (the state dtype), bf16, bf16+ecc, int8, int4 or fp8 "
        "(see gradstep.core.codecs); decoded for the math, encoded after it",
    ),
    Hyper("compiled", False, boolean, "the fast path: run the group's step as one torch.compile'd function"),
    Hyper(
        "fused",
        None,
        optional_bool,
        "torch's fused kernel where the chain is an algorithm torch fuses (None: whenever the options allow it; "
        "True: required; False: never)",
    ),
    Hyper(
        "chunk_numel",
        1 << 22,
        non_negative_int,
        "eager path: step the group in chunks of about this many elements, bounding temporary memory (0: whole group)",
    ),
)

OPT_ARGS_KEYS: dict[str, Callable[[Any], str | None]] = {
    "lr": non_negative,
    "lr_scale": non_negative,
    "weight_decay": non_negative,
}
"""Per-parameter overrides the core applies (ALF's ``opt_args``); transforms may read further keys."""


def _opt_args(p: Tensor) -> dict[str, Any] | None:
    return getattr(p, "opt_args", None)


def _stochastic_round_to_bf16(x: Tensor) -> Tensor:
    """Round fp32 to bf16 up or down with probability given by the distance (unbiased in expectation)."""
    bits = x.to(torch.float32).view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class _Plan:
    """One group's parameters with gradients, gathered and validated before anything is modified."""

    def __init__(self, index: int, group: dict[str, Any]) -> None:
        self.index = index
        self.group = group
        self.params: TensorList = []  # as stored (complex ones included)
        self.views: TensorList = []  # real views for the math
        self.grads: TensorList = []
        self.states: list[dict[str, Any]] = []
        self.names: list[str] = []
        self.opt_args: list[dict[str, Any] | None] = []
        self.sizes: list[int] | None = None  # chunking sizes; DTensors: the whole tensors', so every rank chunks alike
        # Coded state keys per parameter, where decided from other views than plan.views (DTensors: the whole shapes).
        self.coded: list[list[tuple[str, bool]]] | None = None

    def step_args(self, indices: list[int], dtypes: list[torch.dtype]) -> tuple[list[Any], ...]:
        """:func:`group_step`'s per-parameter arguments for the parameters at ``indices`` (``dtypes``: theirs)."""
        return (
            _take(self.views, indices),
            _take(self.grads, indices),
            _take(self.states, indices),
            dtypes,
            _take(self.opt_args, indices),
            _take(self.names, indices),
        )


class ChainedOptimizer(GroupToolsMixin, torch.optim.Optimizer):
    """An optimizer built from a chain of :class:`~gradstep.core.transform.Transform` objects.

    Use it directly to compose your own update rule (see :func:`chain`), or through the named optimizers, which are
    short recipes over it.

    Args:
        params: parameters, named parameters, or param group dicts (as for any ``torch.optim.Optimizer``). A scalar
            hyperparameter given as ``slice(lo, hi)`` or as a list is spread over the groups (one value each).
        transforms: the update rule, applied in order to the gradient.
        **hypers: values of the hyperparameters declared by the transforms and by the core (:data:`CORE_HYPERS`).
            An unknown name raises ``TypeError``; an invalid value raises ``ValueError``. ``cautious=True``
            appends :class:`~gradstep.core.cautious.Cautious` to the chain (any optimizer, Liang et al., 2024).
    """

    def __init__(self, params: Any, transforms: Sequence[Transform], **hypers: Any) -> None:
        hypers = dict(hypers)
        self._transforms: tuple[Transform, ...] = with_cautious(transforms, hypers)
        declared = self.declared_hypers()
        unknown = sorted(set(hypers) - set(declared))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"valid ones: {', '.join(declared)}"
            )
        groups = _as_groups(params)
        defaults = {name: h.default for name, h in declared.items()}
        given = dict(hypers)
        expand_hypers(given, declared, groups)
        for name, value in given.items():
            defaults[name] = declared[name].validate(value)
        # A dict, not int attributes: torch.compile drops int attribute updates on an optimizer.
        self._counters = {"global_step": 0, "skipped_steps": 0}
        super().__init__(groups, defaults)

    # --- declarations -----------------------------------------------------------------------------------------
    @classmethod
    def core_hypers(cls) -> tuple[Hyper, ...]:
        return CORE_HYPERS

    def declared_hypers(self) -> dict[str, Hyper]:
        """Every hyperparameter this optimizer reads, by name (the transforms' first, then the core's)."""
        declared: dict[str, Hyper] = {}
        for t in self._transforms:
            for h in t.hypers:
                declared.setdefault(h.name, h)
        for h in self.core_hypers():
            declared.setdefault(h.name, h)
        return declared

    @property
    def transforms(self) -> tuple[Transform, ...]:
        return self._transforms

    @property
    def global_step(self) -> int:
        """Number of steps taken (skipped steps excluded); saved in the state_dict."""
        return self._counters["global_step"]

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped by the ``"skip"`` non-finite policy."""
        return self._counters["skipped_steps"]

    def _supports_complex(self) -> bool:
        return all(getattr(t, "elementwise", False) for t in self._transforms)

    def _sparse_gradients(self) -> str:
        """``"refused"``, ``"accepted"`` or ``"required"`` (see :attr:`Transform.sparse_gradients`)."""
        kinds = {getattr(t, "sparse_gradients", "refused") for t in self._transforms}
        if not kinds or "refused" in kinds:
            return "refused"
        return "required" if "required" in kinds else "accepted"

    def _supports_sparse(self) -> bool:
        return self._sparse_gradients() != "refused"

    # --- groups -----------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        declared = self.declared_hypers()
        for name, value in param_group.items():
            if name in declared:
                declared[name].validate(value)
        self._refuse_shared_params(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for name in declared:
                if group.get(name) is REQUIRED:
                    raise ValueError(f"{type(self).__name__} needs a value of {name} (no default)")
            for t in self._transforms:
                t.check_group(group)
            self._check_codec(group)
            seen: set[int] = set()
            for i, p in enumerate(group["params"]):
                if id(p) in seen:
                    names = group.get("param_names")
                    raise ValueError(
                        f"{type(self).__name__}: parameter {names[i] if names else i} appears twice in one param "
                        "group (it would be stepped twice)"
                    )
                seen.add(id(p))
                self._check_param(p)
            if group["fused"]:
                self._check_fused(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # torch appends before our checks; a refused group must not stay
            raise

    def _check_codec(self, group: dict[str, Any]) -> None:
        """Refuse a ``state_codec`` that some parameter or buffer of the group cannot be stored with."""
        codec = group["state_codec"]
        if codec == "fp32":
            return
        me = type(self).__name__
        if type(self)._prepare_step is not ChainedOptimizer._prepare_step:
            # Model-wide estimates (D-Adaptation, Prodigy) and schedule-free's train/eval switch read the state
            # outside the chain, where nothing decodes it.
            raise ValueError(f"{me} reads its state outside the update chain: state_codec must be 'fp32'")
        if self._sparse_gradients() == "required":
            raise ValueError(
                f"{me} steps sparse gradients only, which no state_codec serves: state_codec must be 'fp32'"
            )
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            name = names[i] if names else f"{i} (shape {tuple(p.shape)})"
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(
                    f"{me}: state_codec={codec!r} needs real floating-point parameters; parameter {name} is {p.dtype}"
                )
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            for t in self._transforms:
                for key, init in t.buffers(group).items():
                    buf = init(meta, self._state_dtype(group, p))
                    if isinstance(buf, Tensor) and buf.numel() > 1 and tuple(buf.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{me}: state_codec={codec!r} cannot store {key!r} of parameter {name} (shape "
                            f"{tuple(buf.shape)}, not element-wise like the parameter {tuple(p.shape)}); use 'fp32'"
                        )

    def _refuse_shared_params(self, param_group: dict[str, Any]) -> None:
        """A parameter already in another group is refused by name (torch's message names none of them)."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, (list, tuple, set)):
            params = param_group["params"] = list(params)  # a generator is read once: keep what it gave
        where = {id(p): g for g, group in enumerate(getattr(self, "param_groups", [])) for p in group["params"]}
        names = param_group.get("param_names")
        for i, p in enumerate(params):
            if id(p) in where:
                name = repr(names[i]) if names else f"{i} (shape {tuple(p.shape)})"
                raise ValueError(
                    f"{type(self).__name__}: parameter {name} of param group {len(self.param_groups)} is already in "
                    f"param group {where[id(p)]}; a parameter may be in one group only"
                )

    def _check_fused(self, group: dict[str, Any]) -> None:
        if group["foreach"]:
            raise ValueError("Invalid fused: True (fused and foreach cannot both be True, as in torch.optim)")
        blockers = group_blockers(group)
        if chain_kernel(self._transforms, group) is None:
            blockers.insert(0, f"torch has no fused kernel for {type(self).__name__} with these options")
        for p in group["params"]:
            found = param_blockers(p, self._state_dtype(group, p), None)
            blockers += [f"parameter {tuple(p.shape)}: {b}" for b in found]
        if blockers:
            raise ValueError(
                f"Invalid fused: True ({'; '.join(blockers)}). compiled=True is the fast path for every optimizer "
                f"and option; fused=None uses torch's kernel wherever it can."
            )

    def _check_param(self, p: Tensor) -> None:
        if p.is_complex() and not self._supports_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{type(self).__name__} can only optimize floating-point tensors, got {p.dtype}")
        args = _opt_args(p)
        if args is None:
            return
        if not isinstance(args, dict):
            raise TypeError(f"opt_args must be a dict, got {type(args).__name__}")
        for key, check in OPT_ARGS_KEYS.items():
            value = args.get(key)
            if value is not None and check(value) is not None:
                raise ValueError(f"Invalid opt_args[{key!r}]: {value!r} ({check(value)})")

    # --- state ------------------------------------------------------------------------------------------------
    @staticmethod
    def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        name = group["state_dtype"]
        if name is not None:
            return _STATE_DTYPES[name]
        if p.is_complex():
            return torch.float64 if p.dtype == torch.complex128 else torch.float32
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _init_param_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            # float64 counts exactly far past float32's 2**24; torch's own loaders take any float step tensor.
            state["step"] = torch.zeros((), dtype=STEP_DTYPE, device=p.device)
        view = torch.view_as_real(p) if p.is_complex() else p
        dtype = self._state_dtype(group, p)
        coded = dict(self._coded_buffers(group, view, dtype))
        for t in self._transforms:
            for name, init in t.buffers(group).items():
                if name not in state:
                    state[name] = _init_sharded(init, view, dtype) if _is_dtensor(view) else init(view.detach(), dtype)
                    if name in coded and _is_dtensor(view):
                        parts = codecs.encode_sharded(group["state_codec"], state[name], coded[name], view)
                        state.update((name + suffix, part) for suffix, part in parts.items())
                    elif name in coded:
                        parts = codecs.encode(group["state_codec"], state[name], coded[name])
                        state.update((name + suffix, part) for suffix, part in parts.items())
        if group["kahan_summation"] and _compensated(p) and "kahan_comp" not in state:
            # In the parameter's own dtype, as torch-optimi keeps it: it holds less than one ULP of the parameter.
            state["kahan_comp"] = _init_sharded(zeros, view, p.dtype) if _is_dtensor(view) else zeros(view, p.dtype)

    def _coded_buffers(self, group: dict[str, Any], view: Tensor, dtype: torch.dtype) -> list[tuple[str, bool]]:
        """The state keys of a parameter that ``state_codec`` stores coded, each with whether it may be negative.

        Decided from the shape alone (the buffers a meta parameter would get), so the same for every step and load.
        A DTensor parameter (FSDP2) is decided from its whole shape, so alike on every rank: each rank codes its own
        shard, and a block-wise codec applies only where blocks cannot straddle shards (whole blocks per row, split
        along rows only); elsewhere the buffer stays in the state dtype.
        """
        codec = group["state_codec"]
        if codec == "fp32":
            return []
        split = _split(view)
        if split == "other" and codec in codecs.BLOCK_SIZES:
            return []
        cache = self.__dict__.setdefault("_codec_layouts", {})
        keys = tuple(sorted(self.expected_state_keys(group)))
        signature = (codec, tuple(view.shape), view.dtype, dtype, keys, split)
        if signature not in cache:
            meta = torch.empty(view.shape, dtype=view.dtype, device="meta")
            coded: list[tuple[str, bool]] = []
            rows = split == "rows"
            for t in self._transforms:
                unsigned = codecs.NONNEGATIVE_BUFFERS | t.nonnegative_buffers
                for name, init in t.buffers(group).items():
                    if codecs.codec_applies(codec, init(meta, dtype), meta, rows) and name not in dict(coded):
                        coded.append((name, name not in unsigned))
            cache[signature] = coded
        return cache[signature]

    def state_templates(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """What a first step stores under each state key of ``p`` (besides ``step``): meta tensors (shape and dtype)
        or values. Coded buffers appear as their parts (codes, scales, corrections), whose dtypes are exact."""
        view = torch.view_as_real(p) if p.is_complex() else p
        dtype = self._state_dtype(group, p)
        meta = torch.empty(view.shape, dtype=view.dtype, device="meta")
        templates: dict[str, Any] = {}
        for t in self._transforms:
            for key, init in t.buffers(group).items():
                templates.setdefault(key, init(meta, dtype))
        rows = _is_dtensor(view)
        for key, _ in self._coded_buffers(group, view, dtype):
            templates.update(codecs.part_templates(group["state_codec"], key, tuple(view.shape), "meta", rows))
        if group.get("kahan_summation") and _compensated(p):
            templates["kahan_comp"] = torch.empty(view.shape, dtype=p.dtype, device="meta")
        return templates

    def expected_state_keys(self, group: dict[str, Any]) -> set[str]:
        keys = {"step"}
        for t in self._transforms:
            keys.update(t.buffers(group))
        return keys

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state exactly as a first step would, with no other effect."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(group, p, self.state[p])

    def clear_state(self) -> None:
        """Forget all state (moments, step counts); the next step starts afresh."""
        self.state = defaultdict(dict)
        self._counters["global_step"] = 0

    # --- step -------------------------------------------------------------------------------------------------
    def _gather(self, index: int, group: dict[str, Any]) -> _Plan:
        plan = _Plan(index, group)
        names = group.get("param_names")
        # Read once per group, not per parameter: this loop is the per-step cost of every tensor.
        sparse_only = self._sparse_gradients() == "required"
        coded = group["state_codec"] != "fp32"
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = names[i] if names else f"param_groups[{index}]['params'][{i}]"
            if p.grad.is_sparse:
                self._check_sparse(group, p, name)
            elif sparse_only:
                raise RuntimeError(
                    f"{type(self).__name__} does not support dense gradients (parameter {name}); it steps sparse "
                    f"gradients only (e.g. of nn.Embedding(sparse=True)): use Adam for dense ones"
                )
            if p.grad.shape != p.shape:
                raise RuntimeError(f"gradient of {name} has shape {tuple(p.grad.shape)}, parameter {tuple(p.shape)}")
            if coded and p.grad.is_sparse:
                raise NotImplementedError(
                    f"{type(self).__name__}: state_codec={group['state_codec']!r} does not serve sparse gradients "
                    f"yet (parameter {name}); use state_codec='fp32'"
                )
            plan.params.append(p)
            plan.views.append(torch.view_as_real(p) if p.is_complex() else p)
            plan.grads.append(torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad)
            plan.states.append(self.state[p])
            plan.names.append(name)
            plan.opt_args.append(_opt_args(p))
        return plan

    def _drop_state_added_since(self, known: int) -> None:
        """Drop the state entries added after the first ``known`` ones: a refused or skipped step leaves
        ``self.state`` as it found it (entries are only ever added empty before the screen)."""
        for p in list(self.state)[known:]:
            if not self.state[p]:
                del self.state[p]

    def _check_sparse(self, group: dict[str, Any], p: Tensor, name: str) -> None:
        """Refuse a sparse gradient where the chain or a core option needs a dense one (before anything changes)."""
        me = type(self).__name__
        if not self._supports_sparse():
            raise RuntimeError(f"{me} does not support sparse gradients (parameter {name})")
        # As torch.optim.Adagrad: coupled decay would make the gradient dense (decoupled decay acts on the parameter
        # and is allowed). The others need dense elementwise math.
        refused = {
            "coupled weight_decay": bool(group["weight_decay"] != 0) and group["weight_decay_mode"] == "coupled",
            "clip_step": group["clip_step"] > 0,
            "nonfinite='zero'": group["nonfinite"] == "zero",
            "complex parameters": p.is_complex(),
            "kahan_summation": bool(group["kahan_summation"]) and _compensated(p),
        }
        for option, used in refused.items():
            if used:
                raise RuntimeError(f"{me}: {option} is not compatible with sparse gradients (parameter {name})")

    def _screen(self, plans: list[_Plan]) -> bool:
        """Apply the gradient side of the non-finite policy; False means: skip this step."""
        screened = [plan for plan in plans if plan.group["nonfinite"] in ("error", "skip") and plan.grads]
        if not screened:
            return True
        # Every screened group at once: one read of the gradients and one host sync per step. A sparse gradient
        # is screened by the values it holds (uncoalesced: no sum of duplicates hides one).
        bad = first_nonfinite([g._values() if g.is_sparse else g for plan in screened for g in plan.grads])
        if bad is None:
            return True
        for plan in screened:  # the first group holding a bad gradient decides, by its own policy
            if bad >= len(plan.grads):
                bad -= len(plan.grads)
                continue
            if plan.group["nonfinite"] == "error":
                raise NonFiniteError(
                    f"{type(self).__name__}: non-finite gradient in {plan.names[bad]}{rank_note()} "
                    f"(nonfinite='error'; parameters and state were not modified). Use nonfinite='skip' "
                    f"to skip such steps, or 'zero' to zero the bad gradients."
                )
            break
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (all groups, or none: everything is validated before any write)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        known = len(self.state)  # entries the gather adds (self.state is a defaultdict) go again if the step is refused
        try:
            plans = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
            stepping = self._screen(plans)
        except BaseException:
            self._drop_state_added_since(known)
            raise
        if not stepping:
            self._drop_state_added_since(known)
            self._counters["skipped_steps"] += 1
            return loss
        self._prepare_step(plans)
        for plan in plans:
            if plan.params:
                self._update_group(plan)
        self._counters["global_step"] += 1
        return loss

    def _prepare_step(self, plans: list[_Plan]) -> None:
        """Called once per step after the gradient screen, before any group is stepped (nothing is written yet).

        Optimizers whose step depends on statistics of the whole model (D-Adaptation's and Prodigy's estimate of
        the distance to the solution) or on counters kept in the param groups (schedule-free averaging) compute
        them here and leave them in the groups, where :attr:`Transform.group_values` hands them to the chain.
        """

    def _update_group(self, plan: _Plan) -> None:
        group = plan.group
        expected = self.expected_state_keys(group)
        kahan = group["kahan_summation"]
        for p, state in zip(plan.params, plan.states):
            if not expected.issubset(state) or (kahan and "kahan_comp" not in state and _compensated(p)):
                self._init_param_state(group, p, state)
        if any(g.is_sparse for g in plan.grads):
            plan = self._update_sparse(plan)
            if not plan.params:
                return
        if any(_is_dtensor(v) for v in plan.views):
            self._update_local_shards(plan)
            return
        self._update_plain(plan)

    def _update_local_shards(self, plan: _Plan) -> None:
        """Step DTensor parameters (FSDP2) on their local shards.

        The math is elementwise on plain local tensors (DTensor lacks some foreach ops and would refuse mixing them
        with plain tensors); per-tensor reductions learn the sharding from ``sharded_as`` and all-reduce. The state
        stays DTensors (as torch.optim keeps it, for distributed checkpoints); a state entry a transform replaces is
        wrapped back with its parameter's sharding.
        """
        saved = (plan.views, plan.grads, plan.states)
        plan.sizes = [v.numel() for v in plan.views]  # a chunk's reductions are collectives: the same chunks everywhere
        group = plan.group
        if group["state_codec"] != "fp32":
            # Decided from the whole shapes (the local ones differ between ranks); each rank decodes and encodes its
            # own shard, which holds whole blocks only: no communication.
            dtypes = [self._state_dtype(group, p) for p in plan.params]
            plan.coded = [self._coded_buffers(group, v, d) for v, d in zip(saved[0], dtypes)]
        local_states = [{k: _to_local(v) for k, v in state.items()} for state in plan.states]
        for view, local, keys in zip(saved[0], local_states, plan.coded or []):
            shape = _to_local(view).shape
            for part in (key + suffix for key, _ in keys for suffix in codecs.PART_SUFFIXES):
                if part in local and local[part].shape != shape:
                    local[part] = local[part].view(-1)  # int4's codes, the scales: flat as the codec reads them
        given = [dict(local) for local in local_states]
        plan.views, plan.grads, plan.states = (
            [_to_local(v) for v in saved[0]],
            [_to_local(g) for g in saved[1]],
            local_states,
        )
        try:
            with sharded_as(saved[0]):
                self._update_plain(plan)
        finally:
            plan.views, plan.grads, plan.states = saved
            plan.coded = None
        views: list[Any] = plan.views  # DTensors
        for view, state, local, handed in zip(views, plan.states, local_states, given):
            for key, value in local.items():
                if key in handed and value is handed[key]:
                    continue
                if _is_dtensor(view) and isinstance(value, Tensor) and value.shape == view.to_local().shape:
                    value = type(view).from_local(
                        value,
                        view.device_mesh,
                        view.placements,
                        run_check=False,
                        shape=view.shape,
                        stride=view.stride(),
                    )
                state[key] = value

    def _update_sparse(self, plan: _Plan) -> _Plan:
        """Step the parameters with sparse gradients; return the plan of the others (dense gradients).

        Sparse gradients are stepped as torch.optim does: per tensor (each has its own indices), eagerly, on the
        elements the gradient holds; the transforms receive sparse tensors and return sparse directions.
        """
        group = plan.group
        sparse = [i for i, g in enumerate(plan.grads) if g.is_sparse]
        dense = [i for i, g in enumerate(plan.grads) if not g.is_sparse]
        hypers = {name: _zero_dim(group[name]) for name in self.declared_hypers()}
        hypers["foreach"] = False
        zero = {name: _zero_flags(hypers[name]) for name in SCHEDULED_HYPERS if name in hypers}
        dtypes = [self._state_dtype(group, plan.params[i]) for i in sparse]
        group_step(hypers, zero, self._transforms, *plan.step_args(sparse, dtypes))
        rest = _Plan(plan.index, group)
        rest.params, rest.views, rest.grads = (_take(xs, dense) for xs in (plan.params, plan.views, plan.grads))
        rest.states, rest.names = _take(plan.states, dense), _take(plan.names, dense)
        rest.opt_args = _take(plan.opt_args, dense)
        return rest

    def _update_plain(self, plan: _Plan) -> None:
        group = plan.group
        by_dtype: dict[torch.dtype, torch.dtype] = {}  # the state dtype depends on the parameter's dtype only
        dtypes = [
            by_dtype.get(p.dtype) or by_dtype.setdefault(p.dtype, self._state_dtype(group, p)) for p in plan.params
        ]
        if self._fused_step(plan, dtypes):
            return
        hypers = {name: _zero_dim(group[name]) for name in self.declared_hypers()}
        values = {name for t in self._transforms for name in t.group_values}
        hypers.update((name, group[name]) for name in values)
        zero = {name: _zero_flags(hypers[name]) for name in SCHEDULED_HYPERS if name in hypers}
        args = (self._transforms, plan.views, plan.grads, plan.states, dtypes, plan.opt_args, plan.names)
        coded: list[list[tuple[str, bool]]] = []  # per parameter: its coded state keys (none without a codec)
        if plan.coded is not None:
            coded = plan.coded
        elif group["state_codec"] != "fp32":
            coded = [self._coded_buffers(group, v, d) for v, d in zip(plan.views, dtypes)]
        step: Callable[..., None] = group_step
        if any(coded):
            codec = group["state_codec"]
            step = functools.partial(coded_group_step, codec, coded) if not group["compiled"] else step
        if group["compiled"]:
            # Fused passes (one per bucket of an element-wise chain, else per group): inductor keeps the temporaries
            # in registers, so no chunking.
            device = plan.views[0].device
            eager_hypers = dict(hypers)  # numbers, as the eager path takes them
            for name in SCHEDULED_HYPERS:
                if name in hypers:
                    hypers[name] = _as_tensor(hypers[name], device)
            for name in values:  # numbers that change every step: tensors, or every step would recompile
                if isinstance(hypers[name], float):
                    hypers[name] = _as_tensor(hypers[name], device)
            compiled = self.__dict__.setdefault("_compiled_steps", {})
            # Inside a user's torch.compile the whole step is traced into the user's graph: no buckets there. On a
            # CPU that inductor does not vectorise for (no AVX2/AVX-512/NEON/SVE, or ATEN_CPU_CAPABILITY=default),
            # its C++ for symbolic lengths does not compile (it still names at::vec): one graph per group there.
            bucketed = not any(coded) and not torch.compiler.is_compiling() and _vectorised_codegen(device)
            if bucketed and all(t.elementwise and not t.needs_whole_group(group) for t in self._transforms):
                self._bucketed_step(plan, hypers, eager_hypers, zero, dtypes, compiled)
                return
            key = (id(group), any(coded))
            if key not in compiled:
                recompute = any(t.recompute_when_compiled for t in self._transforms)
                compiled[key] = compiled_group_step(coded_group_step if any(coded) else group_step, recompute=recompute)
            if any(coded):
                # Decode, update and encode in one compiled function (the decoded buffers, updated in place by the
                # transforms, are still materialized by inductor for the duration of the step).
                compiled[key](group["state_codec"], coded, hypers, zero, *args)
            else:
                compiled[key](hypers, zero, *args)
            return
        if any(t.needs_whole_group(group) for t in self._transforms):
            step(hypers, zero, *args)
            return
        # Eager temporaries are as large as what one call sees: bound them by stepping the group in chunks (a coded
        # state is decoded chunk by chunk too, so no full-precision copy of the whole state exists at once).
        limit = group["chunk_numel"]
        # An element-wise chain steps a coded parameter larger than a chunk slice by slice (per-tensor non-finite
        # policies look at whole tensors, so they keep whole ones).
        sliceable = all(t.elementwise for t in self._transforms) and group["nonfinite"] not in ("zero", "revert")
        for run in _chunks(plan.sizes or [p.numel() for p in plan.views], limit):
            if any(coded):
                step = functools.partial(coded_group_step, group["state_codec"], _take(coded, run))
                if sliceable and len(run) == 1 and limit > 0 and plan.views[run[0]].numel() > limit:
                    step = functools.partial(sliced_coded_step, group["state_codec"], _take(coded, run), limit)
            step(hypers, zero, self._transforms, *plan.step_args(run, _take(dtypes, run)))

    def _bucketed_step(
        self,
        plan: _Plan,
        hypers: dict[str, Any],
        eager_hypers: dict[str, Any],
        zero: dict[str, Any],
        dtypes: list[torch.dtype],
        compiled: dict[Any, Callable[..., None]],
    ) -> None:
        """The compiled step of an element-wise chain, in buckets of :data:`BUCKET` flattened tensors.

        One graph specialised to every shape of the group takes a compile time that grows with the number of
        tensors. An element-wise chain does not care about shapes, so each tensor is stepped as a 1-D view of its
        whole self (whole tensors: per-tensor policies such as ``nonfinite="zero"`` see the same tensor) whose length
        is symbolic, in buckets of a constant size: the last bucket is padded with 2-element dummies, so that one
        graph serves every bucket of the same dtypes. Tensors that cannot be stepped flat (fewer than 2 elements:
        dynamo specialises sizes 0 and 1; non-contiguous ones; per-parameter options) are stepped eagerly: they are
        few and small, and a graph of their own would cost a compilation of its own.
        """
        group = plan.group
        runs: dict[tuple[Any, ...], list[int]] = {}
        rest: list[int] = []
        for i, (view, grad, state) in enumerate(zip(plan.views, plan.grads, plan.states)):
            signature = _flat_signature(view, grad, state, dtypes[i]) if plan.opt_args[i] is None else None
            if signature is None:
                rest.append(i)
            else:
                runs.setdefault(signature, []).append(i)
        pads = self.__dict__.setdefault("_bucket_pads", {})
        calls = self.__dict__.setdefault("_bucket_calls", {})
        for signature, run in runs.items():
            # A code object per dtype signature: dynamo's limit of recompilations (8) is counted per code object.
            key = (id(group), "buckets", signature)
            if key not in compiled:
                # Lengths are marked dynamic below; automatic dynamic (dynamic=None) serves the frames a graph break
                # resumes in, whose tensors carry no mark: they recompile once with dynamic lengths, not per bucket.
                threads = 1 if signature[0] else None
                compiled[key] = compiled_group_step(group_step, dynamic=None, threads=threads)
                i = run[0]
                pads[key] = [_pad_entry(plan.views[i], plan.grads[i], plan.states[i]) for _ in range(BUCKET - 1)]
            for start in range(0, len(run), BUCKET):
                bucket = run[start : start + BUCKET]
                views = [plan.views[i].view(-1) for i in bucket]
                grads = [plan.grads[i].view(-1) for i in bucket]
                states = [_flat_state(plan.states[i]) for i in bucket]
                given = [dict(state) for state in states]
                padding = pads[key][: BUCKET - len(bucket)]
                for view, grad, state in padding:
                    views.append(view)
                    grads.append(grad)
                    states.append(state)
                if calls.get(key, 0) < MARKED_CALLS:
                    # Marks matter only while dynamo traces: once the graph is compiled with symbolic lengths, its
                    # guards take any length. Marking on every call cost about 4 us per tensor.
                    calls[key] = calls.get(key, 0) + 1
                    for view, grad, state in zip(views, grads, states):
                        for t in (view, grad, *(x for x in state.values() if isinstance(x, Tensor) and x.dim() == 1)):
                            torch._dynamo.maybe_mark_dynamic(t, 0)
                dts = [dtypes[bucket[0]]] * BUCKET
                names = _take(plan.names, bucket) + ["(padding)"] * len(padding)
                with _no_duck_shapes():
                    compiled[key](hypers, zero, self._transforms, views, grads, states, dts, [None] * BUCKET, names)
                for i, before, after in zip(bucket, given, states):
                    _store_flat_state(plan.states[i], plan.views[i], before, after)
        if rest:
            group_step(eager_hypers, zero, self._transforms, *plan.step_args(rest, _take(dtypes, rest)))

    def _fused_step(self, plan: _Plan, dtypes: list[torch.dtype]) -> bool:
        """Step the group with torch's fused kernel where its chain and options allow it (see :mod:`.fused`)."""
        group = plan.group
        if group["fused"] is False or group_blockers(group) or torch.compiler.is_compiling():
            # Inside a user's torch.compile the chain is traced and fused by inductor like the rest of the step.
            return False
        kernel = chain_kernel(self._transforms, group)
        if kernel is None:
            return False
        if not all_fusable(plan.views, plan.grads, plan.states, dtypes, plan.opt_args):
            return False  # e.g. opt_args set after construction: the chain handles every case
        run_fused(kernel, group, plan.views, plan.grads, plan.states)
        return True

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["gradstep"] = {"optimizer": type(self).__name__, "global_step": self.global_step}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by the same optimizer class, or by its ``torch.optim`` counterpart.

        Everything is checked before anything is written (see :mod:`gradstep.core.loading`): a refused dict raises
        ``ValueError`` or ``TypeError`` and leaves the optimizer exactly as it was. Group keys missing from the dict
        (older saves, torch.optim's dicts) take this optimizer's defaults, as torch does. Unlike ``torch.optim``,
        state tensors are copied (the source optimizer keeps its own) and keep their saved dtype (fp32 state of bf16
        parameters stays fp32); ``step`` counters become float64 tensors.
        """
        state_dict = dict(state_dict) if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups, global_step = validated_load(self, state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        self._counters["global_step"] = global_step
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        sd = super().__getstate__()
        sd.update(_transforms=self._transforms, _counters=dict(self._counters))
        return sd

    def __repr__(self) -> str:
        chain_text = ", ".join(map(repr, self._transforms))
        return f"{type(self).__name__}[{chain_text}]" + super().__repr__()[len(type(self).__name__) :]


def group_step(
    group: dict[str, Any],
    zero: dict[str, Any],
    transforms: Sequence[Transform],
    views: TensorList,
    raw_grads: TensorList,
    states: list[dict[str, Any]],
    dtypes: list[torch.dtype],
    opt_args: list[dict[str, Any] | None],
    names: list[str],
) -> None:
    """One step of one group: the math between the gathered gradients and the written parameters.

    A plain function of its inputs (no optimizer object), so that the fast path can hand it to ``torch.compile``.
    ``group`` holds the hyperparameter values (0-d tensors for the scheduled ones on the fast path), ``zero`` whether
    each scheduled one is zero (decided outside, so compiled code does not branch on tensor values).
    """
    ops = PER_TENSOR if group["foreach"] is False else FOREACH
    step_counts = [s["step"] for s in states]
    torch._foreach_add_(step_counts, 1.0)
    steps = torch.stack(step_counts).to(torch.float64)

    grads = ops.to(raw_grads, dtypes)
    if group["maximize"]:
        grads = ops.neg(grads)
    if group["nonfinite"] == "zero":
        ok = finite_flags(grads)
        grads = [torch.where(ok[i], g, torch.zeros_like(g)) for i, g in enumerate(grads)]
    params = ops.to([v.detach() for v in views], dtypes)
    ctx = GroupStep(group, params, grads, states, steps, opt_args, names, ops, zero)

    wd: Coef = ctx.param_hyper("weight_decay")
    wd_off = ctx.is_zero("weight_decay") and all(a is None or a.get("weight_decay") is None for a in opt_args)
    mode = group["weight_decay_mode"]
    updates: Direction = grads
    if mode == "coupled" and not wd_off and not coef_is_zero(wd):
        updates = ops.add(grads, ops.mul(params, wd))
    for t in transforms:
        updates = t.update(ctx, evaluate(updates))

    lr: Coef = coef_mul(ctx.param_hyper("lr"), ctx.param_hyper("lr_scale"))
    if group["backoff_steps"] > 0:
        lr = coef_mul(lr, ctx.per_param((steps > group["backoff_steps"]).to(torch.float64)))
    # Other modes (e.g. "trust_ratio") are declared and applied by a transform of the chain.
    decay = mode in ("decoupled", "proximal") and not wd_off and not coef_is_zero(wd)
    lr_wd = coef_mul(lr, wd) if decay else 0.0
    targets = [v.detach() for v in views]
    direct = (
        group["clip_step"] == 0
        and group["nonfinite"] not in ("zero", "revert")
        and not group["stochastic_rounding"]
        and not group["kahan_summation"]
        and all(t.dtype == d for t, d in zip(targets, dtypes))
    )
    if direct:
        if decay and mode == "decoupled":
            ops.mul_(targets, _one_minus(lr_wd))
        step_size = _negate(lr)
        fused: Coef | None = coef_mul(step_size, updates.scale) if isinstance(updates, Quotient) else None
        if isinstance(updates, Quotient) and fused is not None and _all_numbers(fused):
            # p += (-lr * scale) * numerator / denominator in one pass, without writing the direction out.
            torch._foreach_addcdiv_(targets, updates.numerator, updates.denominator, fused)  # type: ignore[arg-type]
        else:
            ops.add_scaled_(targets, evaluate(updates), step_size)
        if decay and mode == "proximal":
            ops.mul_(targets, _reciprocal_one_plus(lr_wd))
    else:
        # Stochastic rounding with a projection after the step (NeroPlus): project the full-precision value and
        # round once; rounding first would turn the part of the update the projection cancels into noise.
        project_wide = group["stochastic_rounding"] and any(
            type(t).after_step is not Transform.after_step for t in transforms
        )
        wide = _write_step(ctx, targets, evaluate(updates), lr, lr_wd if decay else None, defer_rounding=project_wide)
        if wide is not None:
            for t in transforms:
                t.after_step(ctx, wide)
            rounded = [_stochastic_round_to_bf16(n) if t.dtype == torch.bfloat16 else n for n, t in zip(wide, targets)]
            ops.copy_(targets, rounded)
            return
    for t in transforms:
        t.after_step(ctx, targets)


def coded_group_step(
    codec: str,
    coded: list[list[tuple[str, bool]]],
    group: dict[str, Any],
    zero: dict[str, Any],
    transforms: Sequence[Transform],
    views: TensorList,
    raw_grads: TensorList,
    states: list[dict[str, Any]],
    dtypes: list[torch.dtype],
    opt_args: list[dict[str, Any] | None],
    names: list[str],
) -> None:
    """:func:`group_step` over decoded copies of the coded state buffers, encoded back into the state after it.

    ``coded[i]`` lists parameter ``i``'s coded keys with whether each is signed. The transforms see plain tensors
    in the state dtype; an entry they replace (rather than update in place) is stored back as well.
    """
    plain: list[dict[str, Any]] = []
    for state, keys, view, dtype in zip(states, coded, views, dtypes):
        copy = dict(state)
        for key, signed in keys:
            parts = {suffix: state[key + suffix] for suffix in codecs.PART_SUFFIXES if key + suffix in state}
            copy[key] = codecs.decode(codec, parts, signed, view.shape, dtype)
            for suffix in codecs.PART_SUFFIXES[1:]:
                copy.pop(key + suffix, None)
        plain.append(copy)
    group_step(group, zero, transforms, views, raw_grads, plain, dtypes, opt_args, names)
    for state, copy, keys in zip(states, plain, coded):
        signs = dict(keys)
        salt = copy.get("step")  # this step's count: int4+sr's rounding draws afresh every step
        for key, value in copy.items():
            if key in signs:
                for suffix, part in codecs.encode(codec, value, signs[key], salt).items():
                    state[key + suffix].copy_(part)
            elif state.get(key) is not value:
                state[key] = value


def sliced_coded_step(
    codec: str,
    coded: list[list[tuple[str, bool]]],
    limit: int,
    group: dict[str, Any],
    zero: dict[str, Any],
    transforms: Sequence[Transform],
    views: TensorList,
    raw_grads: TensorList,
    states: list[dict[str, Any]],
    dtypes: list[torch.dtype],
    opt_args: list[dict[str, Any] | None],
    names: list[str],
) -> None:
    """:func:`coded_group_step` of one parameter of more than ``limit`` elements, for an element-wise chain: slice by
    slice of about ``limit`` elements (whole blocks), so that no full-precision copy of its whole state exists.

    Buffers shaped like the parameter are sliced (views: the math updates them in place); per-tensor state (the
    ``step`` count, other scalars) is stepped by every slice from a copy of its value before the step, and the last
    slice's value is kept. Non-contiguous tensors cannot be sliced into views: such a parameter is stepped whole.
    """
    (view,), (state,), (keys,), grad = views, states, coded, raw_grads[0]
    parts = {key + suffix: suffix for key, _ in keys for suffix in codecs.PART_SUFFIXES if key + suffix in state}
    whole = {k for k, v in state.items() if k not in parts and isinstance(v, Tensor) and v.shape == view.shape}
    if not all(t.is_contiguous() for t in [view, *(state[k] for k in [*parts, *whole])]):
        coded_group_step(codec, coded, group, zero, transforms, views, raw_grads, states, dtypes, opt_args, names)
        return
    flat_view, flat_grad = view.view(-1), grad.reshape(-1)
    size = max(limit // codecs.SLICE_ALIGN, 1) * codecs.SLICE_ALIGN
    piece: dict[str, Any] = {}
    for start in range(0, view.numel(), size):
        stop = min(start + size, view.numel())
        piece = {}
        for k, v in state.items():
            if k in parts:
                piece[k] = codecs.part_slice(codec, parts[k], v, start, stop)
            elif k in whole:
                piece[k] = v.view(-1)[start:stop]
            else:
                piece[k] = v.clone() if isinstance(v, Tensor) else v
        given = dict(piece)
        one_slice = ([flat_view[start:stop]], [flat_grad[start:stop]], [piece])
        coded_group_step(codec, coded, group, zero, transforms, *one_slice, dtypes, opt_args, names)
        for k in given.keys() & (parts.keys() | whole):
            if piece[k] is not given[k]:  # replaced rather than updated in place
                given[k].copy_(piece[k])
    for k, v in piece.items():
        if k in parts or k in whole:
            continue
        if isinstance(v, Tensor) and isinstance(state.get(k), Tensor) and state[k].shape == v.shape:
            state[k].copy_(v)
        else:
            state[k] = v


def _write_step(
    ctx: GroupStep,
    targets: TensorList,
    updates: TensorList,
    lr: Coef,
    lr_wd: Coef | None,
    defer_rounding: bool = False,
) -> TensorList | None:
    """The general write: explicit step (clipped), reverts of non-finite elements, low-precision parameters.

    With ``defer_rounding`` (stochastic rounding), the new values are returned in full precision, unwritten.
    """
    group, ops, params = ctx.group, ctx.ops, ctx.params
    mode = group["weight_decay_mode"]
    delta = ops.mul(updates, lr)
    if lr_wd is not None and mode == "decoupled":
        ops.add_scaled_(delta, params, lr_wd)
    if group["clip_step"] > 0:
        delta = ops.clamp(delta, -group["clip_step"], group["clip_step"])
    if group["stochastic_rounding"]:
        # Round once, from fp32, so that bf16 state or math does not round the new value to nearest first.
        wide = [torch.float32 if t.dtype == torch.bfloat16 else p.dtype for p, t in zip(params, targets)]
        params, delta = ops.to(params, wide), ops.to(delta, wide)
    new = ops.sub(params, delta)
    if lr_wd is not None and mode == "proximal":
        ops.mul_(new, _reciprocal_one_plus(lr_wd))
    if group["nonfinite"] in ("zero", "revert"):
        new = ops.where(ops.isfinite(new), new, params)
    if group["kahan_summation"]:
        kept = [i for i, t in enumerate(targets) if _compensated(t)]
        if kept:
            # The increment itself (not new - p: that difference would already be rounded at p's scale).
            increment = ops.sub(new, params) if lr_wd is not None and mode == "proximal" else ops.neg(delta)
            if group["nonfinite"] in ("zero", "revert"):
                increment = ops.where(ops.isfinite(increment), increment, 0.0)
            _kahan_write(
                [targets[i] for i in kept], [ctx.states[i]["kahan_comp"] for i in kept], [increment[i] for i in kept]
            )
            rest = [i for i in range(len(targets)) if i not in set(kept)]
            targets, new = [targets[i] for i in rest], [new[i] for i in rest]
    if defer_rounding:
        return new
    if group["stochastic_rounding"]:
        new = [_stochastic_round_to_bf16(n) if t.dtype == torch.bfloat16 else n for n, t in zip(new, targets)]
    ops.copy_(targets, new)
    return None


def _compensated(p: Tensor) -> bool:
    return p.dtype in (torch.bfloat16, torch.float16)


def _kahan_write(targets: TensorList, comps: TensorList, increments: TensorList) -> None:
    """Compensated summation of the step into low-precision parameters, as torch-optimi's ``kahan_sum``.

    ``c <- round(c + increment)``; ``p' <- round(p + c)``; ``c <- round(c + (p - p'))``: the compensation keeps the
    part of the step the parameter's rounding lost, so small updates accumulate instead of vanishing.
    """
    wide = [t.float() for t in targets]
    summed = [(c.float() + d.float()).to(c.dtype).float() for c, d in zip(comps, increments)]
    written = [(w + s).to(t.dtype) for w, s, t in zip(wide, summed, targets)]
    for t, c, w, s, n in zip(targets, comps, wide, summed, written):
        c.copy_(s + (w - n.float()))
        t.copy_(n)


SCHEDULED_HYPERS = ("lr", "betas", "momentum", "weight_decay")
"""Hyperparameters that LR schedulers change: 0-d tensors on the fast path, so that changing them never recompiles."""


BUCKET = 8
"""Tensors per compiled call on the bucketed fast path (element-wise chains): a constant, so that the number of graphs
does not grow with the number of tensors; larger buckets mean fewer Python calls per step and a longer first step."""
MARKED_CALLS = 2
"""Calls of a bucket graph whose lengths are marked dynamic (the first traces it; the second covers a retrace)."""


SMALL = 1 << 16
"""CPU tensors of at most this many elements are stepped by single-threaded kernels (see :func:`_flat_signature`)."""


@functools.cache
def _cpu_vectorised_codegen() -> bool:
    from torch._inductor import cpu_vec_isa

    return bool(cpu_vec_isa.pick_vec_isa())


def _vectorised_codegen(device: torch.device) -> bool:
    """Whether inductor generates vectorised code for ``device`` (always on CUDA; on the CPU, where it has a vector
    instruction set to use): the bucketed compiled step needs it."""
    return device.type != "cpu" or _cpu_vectorised_codegen()


def _flat_signature(view: Tensor, grad: Tensor, state: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...] | None:
    """What a bucket's graph depends on besides the lengths, or None for a tensor that cannot be stepped flat."""
    if view.numel() < 2 or not view.is_contiguous() or grad.layout != torch.strided or not grad.is_contiguous():
        return None
    entries: list[tuple[Any, ...]] = []
    for key, value in state.items():
        if isinstance(value, Tensor):
            if value.dim() > 0 and (value.shape != view.shape or not value.is_contiguous()):
                return None
            entries.append((key, value.dtype, value.dim() > 0))
        else:
            entries.append((key, type(value)))
    # Small tensors apart: with a symbolic length inductor cannot see that a loop is too short to be worth a
    # parallel region, and entering one per small tensor costs more than the tensor's update on the CPU.
    small = view.device.type == "cpu" and view.numel() <= SMALL
    return (small, view.device, view.dtype, view.requires_grad, grad.dtype, dtype, tuple(entries))


def _flat_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.view(-1) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in state.items()}


def _pad_entry(view: Tensor, grad: Tensor, state: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """A 2-element dummy parameter, zero gradient and state shaped like ``state``, filling a partial bucket."""
    pad = {
        k: (torch.zeros(2, dtype=v.dtype, device=v.device) if v.dim() > 0 else v.clone())
        if isinstance(v, Tensor)
        else v
        for k, v in state.items()
    }
    return view.new_zeros(2).requires_grad_(view.requires_grad), grad.new_zeros(2), pad


def _store_flat_state(state: dict[str, Any], view: Tensor, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Write back what the step replaced (rather than updated in place) in a flattened state."""
    for key, value in after.items():
        if before.get(key) is value:
            continue
        if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == view.numel() and view.dim() != 1:
            value = value.view(view.shape)
        if key in state and isinstance(state[key], Tensor) and state[key].dim() > 0 and isinstance(value, Tensor):
            state[key].copy_(value)
        else:
            state[key] = value


@contextlib.contextmanager
def _no_duck_shapes() -> Iterator[None]:
    """Trace without duck shapes: two tensors of one bucket that happen to have the same length must not share a
    symbol, or the graph would be guarded on that equality and recompiled for the next bucket."""
    with torch.fx.experimental._config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        yield


RECOMPUTE_READS_THRESHOLD = 1000
"""inductor's ``realize_reads_threshold`` for a graph that recomputes (``Transform.recompute_when_compiled``)."""


def compiled_group_step(
    function: Callable[..., None] | None = None,
    dynamic: bool | None = False,
    threads: int | None = None,
    recompute: bool = False,
) -> Callable[..., None]:
    """A fresh ``torch.compile``'d :func:`group_step` (or ``function``) with a code object of its own.

    Dynamo keeps its cache, and its limit of recompilations (8), per code object: one shared compiled function would
    fall back to eager once a few optimizers or groups had compiled. Each param group gets its own copy instead.

    ``recompute``: inductor stores an intermediate that two loops read once it reads more than
    ``realize_reads_threshold`` (4) inputs; LAMB's direction (read by its norm, then by the parameter's write) is
    one. Raising the threshold makes the write recompute it from the moments the first loop stored, instead of
    writing and reading back a whole-size temporary: LAMB 31.5 → 13.7 ms on the reference workload (BENCHMARKS.md).
    Not the default for every graph: inductor's CPU code fails to generate some graphs with per-row reductions
    (AdamP's) under it.
    """
    function = function or group_step
    code = function.__code__.replace()
    fn = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__)
    options: dict[str, Any] = {} if threads is None else {"cpp.threads": threads}
    if recompute:
        options["realize_reads_threshold"] = RECOMPUTE_READS_THRESHOLD
    return torch.compile(fn, dynamic=dynamic, options=options or None)


_T = TypeVar("_T")


def _take(items: list[_T], indices: list[int]) -> list[_T]:
    return [items[i] for i in indices]


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index runs whose sizes add up to about ``limit`` (a larger tensor is a run of its own)."""
    if limit <= 0:
        return [list(range(len(sizes)))]
    runs: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if runs[-1] and total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += size
    return runs


def _as_tensor(value: Any, device: torch.device) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_as_tensor(v, device) for v in value)
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _zero_dim(value: Any) -> Any:
    """A one-element tensor hyperparameter of any shape (torch accepts ``lr=torch.tensor([1e-3])``) as a 0-d view."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, tuple):
        return tuple(_zero_dim(v) for v in value)
    return value


def _zero_flags(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_zero_flags(v) for v in value)
    if isinstance(value, Tensor):
        return False  # a tensor value is never assumed to be zero (that would read it)
    return value == 0


def _all_numbers(c: Coef) -> bool:
    return all(map(is_number, c)) if isinstance(c, (list, tuple)) else is_number(c)


def _negate(c: Coef) -> Coef:
    return [-x for x in c] if isinstance(c, (list, tuple)) else -c  # type: ignore[operator]


def _one_minus(c: Coef) -> Coef:
    return [1 - x for x in c] if isinstance(c, (list, tuple)) else 1 - c  # type: ignore[operator]


def _reciprocal_one_plus(c: Coef) -> Coef:
    return [1 / (1 + x) for x in c] if isinstance(c, (list, tuple)) else 1 / (1 + c)  # type: ignore[operator]


def _init_sharded(init: Callable[[Tensor, torch.dtype], Any], view: Any, dtype: torch.dtype) -> Any:
    """A buffer of a DTensor parameter: built on the local shard, split like the parameter when it is shaped like it.

    Buffers shaped like the parameter are split like it; buffers with one entry per row (NeroPlus) are split along
    rows under Shard(0); others (per-tensor values, Kronecker factors) are whole on every rank, built from the whole
    shape. The kind is read from the buffer a global-shaped (meta) parameter would get, so that every rank decides
    alike.
    """
    local = view.to_local().detach()
    buf = init(local, dtype)
    if not isinstance(buf, Tensor):
        return buf
    whole = init(torch.empty(view.shape, dtype=view.dtype, device="meta"), dtype)
    per_row = False
    if view.dim() > 0 and whole.dim() > 0 and whole.shape[0] == view.shape[0]:
        taller = init(torch.empty((view.shape[0] + 1, *view.shape[1:]), dtype=view.dtype, device="meta"), dtype)
        per_row = taller.shape[0] == view.shape[0] + 1
    if whole.shape == view.shape or per_row:
        if whole.shape != view.shape and not all(not pl.is_shard() or pl.dim == 0 for pl in view.placements):
            raise NotImplementedError(f"a per-row state buffer for a DTensor placed as {view.placements}")
        stride = tuple(math.prod(whole.shape[i + 1 :]) for i in range(whole.dim()))
        return type(view).from_local(
            buf, view.device_mesh, view.placements, run_check=False, shape=whole.shape, stride=stride
        )
    if buf.shape != whole.shape:
        # Built from the whole shape (Kronecker factors of a whole matrix): the local shard's shape would give factors
        # of its rows only, which a distributed checkpoint could not load into.
        return init(torch.empty((), dtype=view.dtype, device=local.device).expand(view.shape), dtype)
    return buf  # a per-tensor value (TAdam's W_t): the same on every rank


def _split(view: Any) -> str | None:
    """How a parameter is split: ``None`` (a plain tensor), ``"rows"`` (a DTensor sharded along dim 0 only, or
    replicated), ``"other"`` (a DTensor sharded along another dim)."""
    if not _is_dtensor(view):
        return None
    return "rows" if all(not pl.is_shard() or pl.dim == 0 for pl in view.placements) else "other"


def _to_local(x: Any) -> Any:
    return x.to_local() if _is_dtensor(x) else x


def _as_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        got = "a Tensor" if isinstance(params, Tensor) else repr(params) if params is None else type(params).__name__
        raise TypeError(f"params argument given to the optimizer should be an iterable of Tensors or dicts, got {got}")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(params[0], dict):
        return [dict(g) for g in params]
    return [{"params": params}]


def chain(params: Iterable[Any], *transforms: Transform, **hypers: Any) -> ChainedOptimizer:
    """Build an optimizer from transforms, without subclassing.

    Example::

        >>> import torch, gradstep
        >>> from gradstep.transforms import ScaleBySign, Momentum
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = gradstep.chain([w], ScaleBySign(), Momentum(), lr=0.1, momentum=0.5)
        >>> w.grad = torch.tensor([1.0, -2.0, 0.0]); _ = opt.step()
        >>> w.detach()
        tensor([0.9000, 1.1000, 1.0000])
    """
    if not transforms:
        warnings.warn("chain() with no transforms is plain SGD on the raw gradient", stacklevel=2)
    return ChainedOptimizer(params, transforms, **hypers)

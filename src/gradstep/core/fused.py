"""torch's fused kernels as a path of the core.

Where a group's chain is exactly an algorithm that torch has a fused kernel for (``torch._fused_adam_``,
``torch._fused_adamw_``, ``torch._fused_sgd_``, ...) and the group's options ask for nothing the kernel cannot do, the
core steps the group with that kernel: one pass over each tensor, the same arithmetic as ``torch.optim.Adam(...,
fused=True)`` and therefore bitwise the same result. Everything else (the chain, the compiled path) is unchanged.

A transform offers a kernel through :meth:`~gradstep.core.transform.Transform.fused_kernel`; a transform that does
nothing for a group's options (GoMLX's ``sqrt_step_decay`` when off) says so with
:meth:`~gradstep.core.transform.Transform.is_identity`. The group option ``fused`` follows torch: ``None`` (default)
uses the kernel whenever the options allow it, ``True`` requires it (a group that cannot be fused is refused, with the
option that prevents it named), ``False`` never uses it.

What the kernels cannot do, and what therefore keeps a group on the chain: per-parameter ``lr_scale`` or ``opt_args``
overrides, ``clip_step``, ``backoff_steps``, stochastic rounding, the element-wise non-finite policies (``"zero"``,
``"revert"``), state kept in another dtype than the parameter's (the default for bf16/fp16 parameters), devices torch
has no fused kernel for, and the per-tensor reference (``foreach=False``). The ``"error"`` and ``"skip"`` policies
screen the gradients before the kernel runs, as on every path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .ops import TensorList

__all__ = [
    "FUSED_DEVICES",
    "FusedKernel",
    "all_fusable",
    "chain_kernel",
    "float32_counts",
    "group_blockers",
    "param_blockers",
    "run_fused",
]

FusedKernel = Callable[[dict[str, Any], TensorList, TensorList, list[dict[str, Any]]], None]
"""``kernel(group, params, grads, states)``: one fused step of tensors of one device and dtype (real views), the
parameters' state dicts in the same order; it advances each ``state["step"]`` itself, as torch's fused path does."""

FUSED_DEVICES = ("cpu", "cuda")
"""Devices with torch fused optimizer kernels (torch's ``_get_fused_kernels_supported_devices`` less the rare ones)."""


def chain_kernel(transforms: Sequence[Any], group: dict[str, Any]) -> FusedKernel | None:
    """The kernel of a chain for a group: the chain, less the transforms that are identities for the group's options,
    must be one transform that offers a kernel for them."""
    active = [t for t in transforms if not t.is_identity(group)]
    if len(active) != 1:
        return None
    kernel: FusedKernel | None = active[0].fused_kernel(group)
    return kernel


def group_blockers(group: dict[str, Any]) -> list[str]:
    """The group options that keep the group off the fused kernels, each as ``name=value``."""
    blockers = []
    if group["compiled"]:
        blockers.append("compiled=True")
    if group["foreach"] is False:
        blockers.append("foreach=False")
    for name, off in (("lr_scale", 1.0), ("clip_step", 0.0), ("backoff_steps", 0), ("stochastic_rounding", False)):
        if group[name] != off:
            blockers.append(f"{name}={group[name]!r}")
    if group["nonfinite"] in ("zero", "revert"):
        blockers.append(f"nonfinite={group['nonfinite']!r}")
    if group.get("state_codec", "fp32") != "fp32":  # torch's kernels read and write plain state tensors
        blockers.append(f"state_codec={group['state_codec']!r}")
    if group.get("kahan_summation"):
        blockers.append("kahan_summation=True")
    return blockers


def param_blockers(p: Tensor, state_dtype: torch.dtype, opt_args: dict[str, Any] | None) -> list[str]:
    """What keeps one parameter off the fused kernels."""
    blockers = []
    if p.device.type not in FUSED_DEVICES:
        blockers.append(f"device {p.device.type}")
    real = torch.view_as_real(p) if p.is_complex() else p
    if real.dtype != state_dtype:
        blockers.append(f"state dtype {state_dtype} differs from the parameter's {real.dtype}")
    if opt_args and any(opt_args.get(k) is not None for k in ("lr", "lr_scale", "weight_decay")):
        blockers.append("per-parameter opt_args")
    if type(p) is not torch.Tensor and not isinstance(p, torch.nn.Parameter):
        blockers.append(f"tensor subclass {type(p).__name__}")
    if not p.is_contiguous():
        # torch 2.13's CPU kernels walk a parameter and its gradient and state as flat memory: on a transposed or
        # sliced parameter they pair the wrong elements (torch.optim.AdamW(fused=True) itself then steps wrongly).
        blockers.append("non-contiguous parameter")
    return blockers


def all_fusable(
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Any]],
    state_dtypes: list[torch.dtype],
    opt_args: list[dict[str, Any] | None],
) -> bool:
    """Whether every parameter of a step can take the kernel: :func:`param_blockers` as one cheap pass (it runs every
    step for every tensor), with the gradients' and state's layout, which the kernels read as flat memory too."""
    for p, g, state, dtype, args in zip(params, grads, states, state_dtypes, opt_args):
        if (
            args
            or p.dtype != dtype
            or p.device.type not in FUSED_DEVICES
            or not (p.is_contiguous() and g.is_contiguous())
            or (type(p) is not torch.Tensor and not isinstance(p, torch.nn.Parameter))
        ):
            if param_blockers(p, dtype, args) or not g.is_contiguous():
                return False
        if not all(v.is_contiguous() for v in state.values() if isinstance(v, Tensor)):
            return False
    return True


def float32_counts(steps: TensorList) -> TensorList:
    """The step counts as torch's fused kernels read them: float32 (the CUDA kernels read the memory as float; the
    core keeps float64 counts, exact past 2^24). One stack and one cast for the whole list."""
    if all(s.dtype == torch.float32 for s in steps):
        return steps
    return list(torch.stack(steps).to(torch.float32).unbind(0))


def run_fused(
    kernel: FusedKernel, group: dict[str, Any], params: TensorList, grads: TensorList, states: list[dict[str, Any]]
) -> None:
    """Run ``kernel`` once per (device, dtype), as torch's fused optimizers do."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for indices in buckets.values():
        kernel(group, [params[i] for i in indices], [grads[i] for i in indices], [states[i] for i in indices])

r"""Pullback momentum (pytorch_optimizer's ``pullback_momentum``): what Lookahead does to the inner optimizer's
momentum buffers at a synchronisation.

With ``"reset"`` the buffers b (the inner state keys listed in ``momentum_keys``) are zeroed; with ``"pullback"`` they
are pulled back like the weights, :math:`b \leftarrow \beta + r\,(b - \beta)`, :math:`\beta \leftarrow b`,
with slow buffers β (``state[p]["slow_<key>"]``) that start at zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PULLBACK_MODES", "add_slow_buffers", "pull_back"]

PULLBACK_MODES = ("none", "reset", "pullback")


def add_slow_buffers(
    inner: torch.optim.Optimizer, tracked: list[tuple[Tensor, dict[str, Any]]], momentum_keys: Sequence[str]
) -> None:
    """Give each inner momentum buffer that exists its slow buffer ("pullback"), zero until the next sync.

    Created when the buffer appears, not at the first sync, so that a parameter's state lists every key it will
    hold from then on: DCP's flattened state dicts load only the keys the live state has.
    """
    for p, state in tracked:
        inner_state = inner.state.get(p)
        if not inner_state:
            continue
        for key in momentum_keys:
            buf = inner_state.get(key)
            if isinstance(buf, Tensor) and f"slow_{key}" not in state:
                state[f"slow_{key}"] = torch.zeros_like(buf)


def pull_back(
    inner: torch.optim.Optimizer,
    tracked: list[tuple[Tensor, dict[str, Any]]],
    momentum_keys: Sequence[str],
    mode: str,
    rate: float,
) -> None:
    """Reset or pull back the inner optimizer's momentum buffers at a synchronisation with rate ``rate``."""
    if mode == "none":
        return
    for p, state in tracked:
        inner_state = inner.state.get(p)
        if not inner_state:
            continue
        for key in momentum_keys:
            buf = inner_state.get(key)
            if not isinstance(buf, Tensor):
                continue
            if mode == "reset":
                buf.zero_()
                continue
            slow_key = f"slow_{key}"
            if slow_key not in state:
                state[slow_key] = torch.zeros_like(buf)
            buf.lerp_(state[slow_key], 1.0 - rate)  # pytorch_optimizer's form of slow + rate * (buf - slow)
            state[slow_key].copy_(buf)

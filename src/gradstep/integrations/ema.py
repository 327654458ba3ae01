"""An exponential moving average of a model's weights, updated with multi-tensor kernels.

After each optimizer step, every averaged tensor moves toward the model's::

    decay_t = 0                                              for t <= update_after_step + 1 (a copy)
    decay_t = decay                                          otherwise, or with use_warmup:
    decay_t = clamp(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay),  s = t - update_after_step - 1
    ema     = ema + (1 - decay_t) * (model - ema)            (torch._foreach_lerp_)

``t`` counts the updates. This is timm's ``ModelEmaV3`` updated with ``step=t``, and, without warm-up, torch's
``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` (whose first update copies the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """An exponential moving average of a module's parameters (and floating-point buffers).

    The averaged tensors are plain tensors kept beside the model (not a second module), updated in one
    ``torch._foreach_lerp_`` per dtype. :meth:`swapped` puts them into the model for evaluation and restores the
    trained weights afterwards; :meth:`copy_to` writes them for good (at the end of training).

    Args:
        model: the module whose weights are averaged. The average starts as a copy of its current weights.
        decay: the decay once warm-up is over, in ``[0, 1]``.
        min_decay: the lowest decay the warm-up gives (timm's ``min_decay``).
        update_after_step: updates up to and including number ``update_after_step + 1`` copy the model.
        use_warmup: ramp the decay up as ``1 - (1 + s / warmup_gamma) ** -warmup_power`` (timm's warm-up).
        warmup_gamma: see ``use_warmup``.
        warmup_power: see ``use_warmup``; 2/3 reaches 0.999 at about 31.6k updates, 3/4 at 10k.
        include_buffers: also average the floating-point buffers (BatchNorm's running statistics) and copy the
            others, as timm's ``ModelEmaV3`` does; ``False`` averages parameters only, as torch's ``AveragedModel``
            does by default.
        dtype: keep the average in this dtype (``torch.float32`` for a bfloat16 model, whose weights cannot hold
            the small ``(1 - decay) * (model - ema)`` steps); default: the model's dtypes.

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> opt = gradstep.SGD(model.parameters(), lr=0.1)
        >>> ema = gradstep.EMA(model, decay=0.9)
        >>> for _ in range(3):                  # the bias goes -0.1, -0.2, -0.3
        ...     model(torch.zeros(1, 2)).sum().backward()
        ...     _ = opt.step(); opt.zero_grad(); ema.update()
        >>> with ema.swapped():                 # the model holds the average here: -0.1, then 0.9 * ... + 0.1 * ...
        ...     round(model.bias.item(), 4)
        -0.129
        >>> round(model.bias.item(), 4)          # and the trained weights again after the block
        -0.3
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA averages a torch.nn.Module's weights, got {type(model).__name__}")
        for name, value in (("decay", decay), ("min_decay", min_decay)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1])")
        if not (isinstance(update_after_step, int) and update_after_step >= 0):
            raise ValueError(f"Invalid update_after_step: {update_after_step!r} (must be an int >= 0)")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(f"Invalid warmup_gamma/warmup_power: {warmup_gamma!r}/{warmup_power!r} (must be > 0)")
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.include_buffers = include_buffers
        self.num_updates = 0
        self._seen_step: int | None = None  # the attached optimizer's global_step at the last update
        self._model = model
        # Averaged (floating point) and copied (integer buffers such as num_batches_tracked) tensors, by name.
        self._averaged_names: list[str] = []
        self._copied_names: list[str] = []
        for name, tensor in self._tracked():
            (self._averaged_names if tensor.is_floating_point() else self._copied_names).append(name)
        sources = self._sources()
        self.shadow: dict[str, Tensor] = {
            name: t.detach().clone() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
            for name, t in sources.items()
            if name in self._averaged_names or name in self._copied_names
        }

    # --- the model's tensors --------------------------------------------------------------------------------
    def _tracked(self) -> Iterator[tuple[str, Tensor]]:
        yield from self._model.named_parameters()
        if self.include_buffers:
            yield from self._model.named_buffers()

    def _sources(self) -> dict[str, Tensor]:
        return {name: t for name, t in self._tracked()}

    # --- updates --------------------------------------------------------------------------------------------
    def get_decay(self, num_updates: int | None = None) -> float:
        """The decay used by update number ``num_updates`` (default: the next one)."""
        t = self.num_updates + 1 if num_updates is None else num_updates
        s = t - self.update_after_step - 1
        if s <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        warm = 1.0 - (1.0 + s / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the model's current weights (call after each optimizer step)."""
        decay = self.get_decay()
        sources = self._sources()
        by_dtype: dict[tuple[torch.device, torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for name in self._averaged_names:
            ema, current = self.shadow[name], sources[name].detach()
            pair = by_dtype.setdefault((ema.device, ema.dtype, current.dtype), ([], []))
            pair[0].append(ema)
            pair[1].append(current)
        for (_, ema_dtype, dtype), (emas, currents) in by_dtype.items():
            if ema_dtype == dtype:
                torch._foreach_lerp_(emas, currents, 1.0 - decay)
            else:  # lerp needs one dtype; add_ promotes inside the kernel, without a cast copy of the model
                torch._foreach_mul_(emas, decay)
                torch._foreach_add_(emas, currents, alpha=1.0 - decay)
        for name in self._copied_names:
            self.shadow[name].copy_(sources[name])
        self.num_updates += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Update after every step of ``optimizer`` (a step post-hook); returns the hook's handle.

        A step that a gradstep optimizer skips (``nonfinite="skip"``) does not update the average.
        """

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            step = getattr(opt, "global_step", None)
            if step is not None and step == self._seen_step:
                return  # skipped: the weights did not move
            self._seen_step = step
            self.update()

        self._seen_step = getattr(optimizer, "global_step", None)
        return optimizer.register_step_post_hook(after_step)

    # --- using the average ----------------------------------------------------------------------------------
    @contextmanager
    def swapped(self) -> Iterator[EMA]:
        """Within the block the model holds the averaged weights; the trained ones come back on exit, bit for bit.

        The trained weights are kept in a copy meanwhile (the average may be in another dtype, so the two cannot
        simply trade places without rounding the average).
        """
        sources = self._sources()
        targets = [sources[name].detach() for name in self.shadow]
        with torch.no_grad():
            backup = [t.clone() for t in targets]
            torch._foreach_copy_(targets, list(self.shadow.values()))
        try:
            yield self
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the averaged model) for good."""
        if model is None:
            sources = self._sources()
        else:
            sources = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        missing = sorted(set(self.shadow) - set(sources))
        if missing:
            raise KeyError(f"the model has no tensor named {', '.join(missing)}")
        torch._foreach_copy_([sources[n].detach() for n in self.shadow], list(self.shadow.values()))

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The average and the update count (tensors, numbers and strings: loads with ``weights_only=True``)."""
        return {
            "num_updates": self.num_updates,
            "decay": self.decay,
            "shadow": {name: t.clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of an EMA of the same model; a mismatch raises and changes nothing."""
        shadow = state_dict.get("shadow")
        if not isinstance(shadow, dict) or set(shadow) != set(self.shadow):
            got = sorted(shadow) if isinstance(shadow, dict) else type(shadow).__name__
            raise ValueError(
                f"EMA state_dict does not match the model: expected tensors {sorted(self.shadow)}, got {got}"
            )
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state_dict: {name} has shape {tuple(t.shape)}, the model's {tuple(self.shadow[name].shape)}"
                )
        with torch.no_grad():
            for name, t in shadow.items():
                self.shadow[name].copy_(t)
        self.num_updates = int(state_dict["num_updates"])

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, num_updates={self.num_updates}, tensors={len(self.shadow)})"

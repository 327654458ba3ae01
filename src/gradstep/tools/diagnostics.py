r"""Training diagnostics: ALF's gradient noise scale estimator.

The *simple gradient noise scale* of McCandlish et al. (2018) is

.. math::
    B_{\text{simple}} = \frac{\operatorname{tr}\Sigma}{\lVert G \rVert^2},

with :math:`G = \mathbb{E}_x[\nabla_\theta L_x]` the true gradient and :math:`\Sigma = \operatorname{cov}_x
(\nabla_\theta L_x)` the covariance of per-example gradients. It is the batch size around which averaging more
examples stops paying off ("critical batch size"). A mean gradient over :math:`B` examples has
:math:`\mathbb{E}\lVert g_B \rVert^2 = \lVert G \rVert^2 + \operatorname{tr}\Sigma / B`, which the estimator below
exploits with two disjoint parts of one batch.

References: S. McCandlish, J. Kaplan, D. Amodei, "An Empirical Model of Large-Batch Training", arXiv:1812.06162,
2018, Appendix A; ALF ``alf/optimizers/utils.py`` (``GradientNoiseScaleEstimator``) and ``alf/utils/averager.py``
(``ScalarEMAverager``), spec A.7.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.reductions import global_norm, tensor_dots
from .clipping import clip_scale

__all__ = ["GNS_MODES", "GradientNoiseScaleEstimator", "ScalarEMA"]

GNS_MODES = ("paper", "alternative")


class ScalarEMA(nn.Module):
    r"""A bias-corrected exponential moving average of a scalar (ALF's ``ScalarEMAverager``).

    .. math::
        a \leftarrow a + r\,(x - a), \qquad w \leftarrow w + r\,(1 - w), \qquad
        \text{average} = a / \max(w, r)

    with ``a`` and the mass ``w`` starting at 0: :math:`a/w` is the weighted mean of the values seen, without the
    bias towards 0 of a plain EMA (as Adam's bias correction). ``a`` is kept in ``dtype`` (ALF: float32), ``w`` in
    float64; both are buffers (saved in ``state_dict``).
    """

    avg: Tensor
    mass: Tensor

    def __init__(self, update_rate: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(update_rate, bool) or not isinstance(update_rate, (int, float)) or not 0 < update_rate <= 1:
            raise ValueError(f"Invalid update_rate: {update_rate!r} (must be in (0, 1])")
        self.update_rate = float(update_rate)
        self.register_buffer("avg", torch.zeros((), dtype=dtype))
        self.register_buffer("mass", torch.zeros((), dtype=torch.float64))

    def update(self, x: Tensor) -> None:
        r = self.update_rate
        self.avg.add_(r * (x.detach().to(self.avg.dtype) - self.avg))
        self.mass.add_(r * (1 - self.mass))

    def get(self) -> Tensor:
        return self.avg / torch.clamp(self.mass.to(self.avg.dtype), min=self.update_rate)

    def forward(self, x: Tensor) -> Tensor:
        """Add ``x`` and return the new average."""
        self.update(x)
        return self.get()


def _flatten(tensors: Any) -> list[Tensor]:
    """The tensors of a tensor, a module (its parameters that require grad), or a nest of dicts, lists, tuples."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if isinstance(tensors, nn.Module):
        return [p for p in tensors.parameters() if p.requires_grad]
    if isinstance(tensors, Mapping):
        return [t for value in tensors.values() for t in _flatten(value)]
    if isinstance(tensors, Iterable):
        return [t for item in tensors for t in _flatten(item)]
    raise TypeError(f"expected tensors, got {type(tensors).__name__}")


class GradientNoiseScaleEstimator(nn.Module):
    r"""Running estimate of the simple gradient noise scale from per-example losses (ALF; McCandlish et al., 2018).

    Each call splits the batch at random into a small part of :math:`b` examples and a large one of :math:`B`,
    takes the gradient of each part's mean loss (:math:`g_b`, :math:`g_B`, optionally clipped by global norm) and
    updates two bias-corrected moving averages (:class:`ScalarEMA`, rate ``update_rate``):

    * ``mode="paper"`` (appendix A of the paper), :math:`b = \max(1, \lfloor \text{ratio}\cdot n \rfloor)`,
      :math:`B = n - b`:

      .. math::
          \lVert G \rVert^2 \approx \frac{B\lVert g_B\rVert^2 - b\lVert g_b\rVert^2}{B - b}, \qquad
          \operatorname{tr}\Sigma \approx \frac{\lVert g_b\rVert^2 - \lVert g_B\rVert^2}{1/b - 1/B}, \qquad
          \text{GNS} = \frac{\overline{\operatorname{tr}\Sigma}}{\overline{\lVert G\rVert^2} + 10^{-8}}

    * ``mode="alternative"`` (ALF's default), two halves, :math:`b = B = n/2`:
      :math:`\alpha = \langle g_B, g_b \rangle` estimates :math:`\lVert G\rVert^2` and
      :math:`\beta = (\lVert g_B\rVert^2 + \lVert g_b\rVert^2)/2` estimates
      :math:`\lVert G\rVert^2 + \operatorname{tr}\Sigma / B`, so

      .. math::
          \text{GNS} = \Bigl(\frac{\bar\beta}{\bar\alpha + 10^{-8}} - 1\Bigr) B.

    Both sets of estimates are unbiased, so the ratio of their averages converges to :math:`\operatorname{tr}\Sigma /
    \lVert G\rVert^2` when the parameters move slowly. A negative or non-finite estimate is replaced by the last valid
    one (0 at first); statistics that are not finite (a NaN or infinite gradient) are not averaged in.

    Args:
        batch_size_ratio: ``"paper"`` mode's share of the batch in the small part, in (0, 0.5). Ignored (0.5) in
            ``"alternative"`` mode.
        update_rate: the moving averages' rate :math:`r` in (0, 1].
        gradient_norm_clip: if set (> 0), each part's gradients are scaled down to this global norm (ALF's rule,
            :func:`~gradstep.tools.clipping.clip_scale`) before their norms are taken. Out of place.
        mode: ``"alternative"`` or ``"paper"``.
        generator: a ``torch.Generator`` for the random split (default: the global generator, as ALF).
        dtype: dtype of the moving averages and of the returned estimate (ALF: float32).

    Call it as ``gns = estimator(losses, tensors)``, before or instead of the backward pass on ``losses.mean()``: it
    differentiates through the graph twice with ``retain_graph=True`` and leaves ``.grad`` alone.
    """

    grad_norm_average: ScalarEMA
    var_trace_average: ScalarEMA
    last_valid_gns: Tensor

    def __init__(
        self,
        batch_size_ratio: float = 0.1,
        update_rate: float = 0.001,
        gradient_norm_clip: float | None = None,
        mode: str = "alternative",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if mode not in GNS_MODES:
            raise ValueError(f"Invalid mode: {mode!r} (must be one of {', '.join(map(repr, GNS_MODES))})")
        if mode == "paper":
            if isinstance(batch_size_ratio, bool) or not isinstance(batch_size_ratio, (int, float)):
                raise ValueError(f"Invalid batch_size_ratio: {batch_size_ratio!r} (must be in (0, 0.5))")
            if not 0 < batch_size_ratio < 0.5:
                raise ValueError(f"Invalid batch_size_ratio: {batch_size_ratio!r} (must be in (0, 0.5))")
        else:
            batch_size_ratio = 0.5
        if gradient_norm_clip is not None and not (
            isinstance(gradient_norm_clip, (int, float))
            and not isinstance(gradient_norm_clip, bool)
            and gradient_norm_clip > 0
        ):
            raise ValueError(f"Invalid gradient_norm_clip: {gradient_norm_clip!r} (must be None or > 0)")
        self.mode = mode
        self.batch_size_ratio = float(batch_size_ratio)
        self.gradient_norm_clip = gradient_norm_clip
        self.generator = generator
        self.grad_norm_average = ScalarEMA(update_rate, dtype)  # of the |G|^2 estimates (alpha)
        self.var_trace_average = ScalarEMA(update_rate, dtype)  # of the tr(Sigma) estimates (beta)
        self.register_buffer("last_valid_gns", torch.zeros((), dtype=dtype))

    def split(self, batch_size: int) -> tuple[int, int]:
        """``(b, B)``: the sizes of the small and the large part of a batch of ``batch_size`` examples."""
        b = max(1, int(batch_size * self.batch_size_ratio))
        large = batch_size - b
        if self.mode == "alternative" and large != b:
            raise ValueError(
                f"mode 'alternative' splits the batch in two halves: the batch size must be even, got {batch_size}"
            )
        if self.mode == "paper" and large <= b:
            # B == b divides by zero in both formulas (ALF does: spec A.7 [QUIRK]).
            raise ValueError(
                f"mode 'paper' needs a large part bigger than the small one; batch size {batch_size} is too small"
            )
        return b, large

    def _gradient(self, loss: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        grads = torch.autograd.grad(loss.mean(), tensors, retain_graph=True, allow_unused=True)
        # A tensor the loss does not depend on has a zero gradient.
        flat = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
        if self.gradient_norm_clip is not None:
            scale = clip_scale(global_norm(flat), self.gradient_norm_clip)
            flat = [g * scale.to(g.dtype) for g in flat]
        return global_norm(flat) ** 2, flat

    def forward(self, loss: Tensor, tensors: Any) -> Tensor:
        """Update the averages with one batch and return the current estimate (a detached 0-d tensor).

        Args:
            loss: per-example losses, shape ``[B]`` or ``[T, B]`` (the last axis is the batch; ``T`` is averaged).
            tensors: the tensors whose gradient is measured: a tensor, a module (its trainable parameters), or a
                nest (dicts, lists, tuples) of tensors.
        """
        if loss.ndim not in (1, 2):
            raise ValueError(f"loss must have shape [B] or [T, B], got {tuple(loss.shape)}")
        flat = _flatten(tensors)
        if not flat:
            raise ValueError("no tensors to measure the gradient of")
        n = loss.shape[-1]
        b, large = self.split(n)
        order = torch.randperm(n, generator=self.generator, device="cpu").to(loss.device)
        shuffled = loss[..., order]
        large_norm2, large_grads = self._gradient(shuffled[..., b:], flat)
        small_norm2, small_grads = self._gradient(shuffled[..., :b], flat)
        if self.mode == "paper":
            grad_norm2 = (large * large_norm2 - b * small_norm2) / (large - b)
            var_trace = (small_norm2 - large_norm2) / (1.0 / b - 1.0 / large)
        else:
            var_trace = (large_norm2 + small_norm2) / 2
            grad_norm2 = tensor_dots(large_grads, small_grads).sum()
        if not bool(torch.isfinite(grad_norm2) & torch.isfinite(var_trace)):
            return self.last_valid_gns.clone()
        gns = self.var_trace_average(var_trace) / (self.grad_norm_average(grad_norm2) + 1e-8)
        if self.mode == "alternative":
            gns = (gns - 1) * large
        if not math.isfinite(float(gns)) or float(gns) < 0:
            # A noise scale is >= 0; a negative average of unbiased estimates is noise: keep the last valid value.
            return self.last_valid_gns.clone()
        self.last_valid_gns.copy_(gns)
        return gns.detach().clone()

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, batch_size_ratio={self.batch_size_ratio}, "
            f"update_rate={self.grad_norm_average.update_rate}, gradient_norm_clip={self.gradient_norm_clip}"
        )

"""Per-tensor and global reductions: the one place where norms are computed.

Every transform that needs a tensor's norm (clipping, trust ratios, projections) calls these functions, so that they
can be made sharding-aware (local partial sums all-reduced over the mesh) in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_norm", "tensor_norms"]


def tensor_norms(xs: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of each tensor (over all its elements), as one vector, computed in one multi-tensor pass."""
    if not xs:
        return torch.zeros(0)
    norms = torch._foreach_norm(list(xs), ord)
    return torch.stack([n.to(torch.float32) if n.dtype in (torch.bfloat16, torch.float16) else n for n in norms])


def global_norm(xs: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (0-d)."""
    if not xs:
        return torch.zeros(())
    return torch.linalg.vector_norm(tensor_norms(xs))

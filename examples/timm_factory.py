"""timm's optimizer factory conventions: ``gradstep.create_optimizer(model, name, lr=..., weight_decay=...,
layer_decay=...)`` builds the parameter groups timm's ``create_optimizer_v2`` builds.

Run: ``python examples/timm_factory.py``. The model mimics timm's VisionTransformer layout: ``no_weight_decay()``
names and a ``group_matcher()`` that assigns each parameter to a layer for layer-wise lr decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gradstep


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def no_weight_decay(self) -> set[str]:  # timm's hook: names (or patterns) never decayed
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:  # timm's hook: the layer of each parameter
        blocks = [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]  # the final norm joins the last block
        return {"stem": r"^cls_token|pos_embed|patch_embed", "blocks": blocks}


def main() -> torch.optim.Optimizer:
    model = TinyViT()
    opt = gradstep.create_optimizer(model, "lamb", lr=2e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        members = ", ".join(names[id(p)] for p in group["params"])
        print(f"lr_scale {group['lr_scale']:.4f}  weight_decay {group['weight_decay']:.2f}  {members}")
    return opt


if __name__ == "__main__":
    main()

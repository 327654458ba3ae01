"""gradstep.create_optimizer builds the parameter groups timm's create_optimizer_v2 builds.

timm does not import here (it needs torchvision, whose PyPI wheel does not load against the CPU torch). The expected
groups below are written from timm 1.0's documented rules (timm/optim/_param_groups.py and
timm/models/_manipulate.py): no decay for 1-D parameters, ``*.bias`` and ``model.no_weight_decay()``, the no-decay
group first; layer-wise decay groups in order of first appearance, layers from ``group_matcher(coarse=False)``
where a final norm marked ``(99999,)`` joins the last block and unmatched names (the head) come last, with
``lr_scale = layer_decay ** (L - 1 - layer)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradstep
from example_helpers import load_example


class TinyViT(nn.Module):
    """The parameter layout and grouping hooks of timm's VisionTransformer, two blocks deep."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(12, dim)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def _names(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [([name_of[id(p)] for p in g["params"]], g["weight_decay"], g["lr_scale"]) for g in opt.param_groups]


def test_weight_decay_groups_as_timm_builds_them() -> None:
    model = TinyViT()
    opt = gradstep.create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05)
    assert type(opt) is gradstep.LAMB
    no_decay = ["cls_token", "pos_embed", "patch_embed.proj.bias"]
    no_decay += [f"blocks.{i}.{n}" for i in range(2) for n in ("0.weight", "0.bias", "1.bias")]
    no_decay += ["norm.weight", "norm.bias", "head.bias"]
    decay = ["patch_embed.proj.weight", "blocks.0.1.weight", "blocks.1.1.weight", "head.weight"]
    assert _names(model, opt) == [(no_decay, 0.0, 1.0), (decay, 0.05, 1.0)]
    assert opt.defaults["weight_decay"] == 0.0 and all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_no_filter_and_zero_decay_give_one_group() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    everything = ["0.weight", "0.bias", "1.weight", "1.bias"]
    unfiltered = gradstep.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, filter_bias_and_bn=False)
    assert _names(model, unfiltered) == [(everything, 0.1, 1.0)]
    no_decay = gradstep.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0)
    assert _names(model, no_decay) == [(everything, 0.0, 1.0)]


def test_layer_decay_groups_follow_the_group_matcher() -> None:
    model = TinyViT()
    opt = gradstep.create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    # Layers: stem 0, blocks.0 1, blocks.1 2 (the final norm joins it), head 3. Scales 0.5**3 ... 1.
    assert _names(model, opt) == [
        (["cls_token", "pos_embed", "patch_embed.proj.bias"], 0.0, 0.125),
        (["patch_embed.proj.weight"], 0.05, 0.125),
        (["blocks.0.0.weight", "blocks.0.0.bias", "blocks.0.1.bias"], 0.0, 0.25),
        (["blocks.0.1.weight"], 0.05, 0.25),
        (["blocks.1.0.weight", "blocks.1.0.bias", "blocks.1.1.bias", "norm.weight", "norm.bias"], 0.0, 0.5),
        (["blocks.1.1.weight"], 0.05, 0.5),
        (["head.weight"], 0.05, 1.0),
        (["head.bias"], 0.0, 1.0),
    ]


def test_layer_decay_min_scale_and_no_opt_scale() -> None:
    model = TinyViT()
    opt = gradstep.create_optimizer(model, "sgd", lr=0.1, layer_decay=0.5, layer_decay_min_scale=0.3)
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == [0.3, 0.5, 1.0]
    frozen = TinyViT()
    opt = gradstep.create_optimizer(frozen, "sgd", lr=0.1, layer_decay=0.5, layer_decay_no_opt_scale=0.3)
    optimized = {n for names, _, _ in _names(frozen, opt) for n in names}
    assert "cls_token" not in optimized and "blocks.0.1.weight" not in optimized and "blocks.1.1.weight" in optimized
    assert not frozen.cls_token.requires_grad and not frozen.blocks[0][1].weight.requires_grad  # as timm does


def test_layer_decay_without_a_group_matcher_is_one_layer_with_timms_warning() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="Layer-wise lr decay has no effect"):
        opt = gradstep.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}
    # With timm's pretrained_cfg classifier, the trunk goes in runs of 12 parameter names and the head last.
    model.pretrained_cfg = {"classifier": "1"}
    opt = gradstep.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    assert [(len(g["params"]), g["lr_scale"]) for g in opt.param_groups] == [(1, 0.5), (1, 0.5), (1, 1.0), (1, 1.0)]


def test_lr_scale_scales_each_groups_step() -> None:
    model = TinyViT()
    opt = gradstep.create_optimizer(model, "sgd", lr=0.1, momentum=0.0, layer_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(before["patch_embed.proj.weight"] - model.patch_embed.proj.weight, torch.tensor(0.0125))
    assert torch.allclose(before["head.weight"] - model.head.weight, torch.tensor(0.1))


def test_momentum_default_lookahead_prefix_and_parameters_passed_through() -> None:
    model = nn.Linear(3, 2)
    sgd = gradstep.create_optimizer(model, "sgd", lr=0.1)
    assert sgd.defaults["momentum"] == 0.9  # timm passes its momentum=0.9 to optimizers that have one
    adamw = gradstep.create_optimizer(model, "adamw", lr=1e-3, betas=(0.8, 0.9))
    assert "momentum" not in adamw.defaults and adamw.defaults["betas"] == (0.8, 0.9)
    wrapped = gradstep.create_optimizer(model, "lookahead_adamw", lr=1e-3)
    assert type(wrapped) is gradstep.Lookahead
    groups = [{"params": [model.weight], "weight_decay": 0.3}, {"params": [model.bias]}]
    given = gradstep.create_optimizer(groups, "adamw", lr=1e-3, weight_decay=0.01)
    assert [g["weight_decay"] for g in given.param_groups] == [0.3, 0.01]
    with pytest.raises(TypeError, match="nesterow"):
        gradstep.create_optimizer(model, "sgd", nesterow=True)
    with pytest.raises(ValueError, match="unknown optimizer"):
        gradstep.create_optimizer(model, "adamww")


def test_the_example_builds_timms_layer_decay_groups(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("timm_factory")
    opt = example.main()
    # stem, three blocks (the final norm joins the last), head: 0.75**4 ... 1, each split by decay.
    assert [g["lr_scale"] for g in opt.param_groups][::2] == [0.75**4, 0.75**3, 0.75**2, 0.75, 1.0]
    assert "blocks.2.1.bias, norm.weight, norm.bias" in capsys.readouterr().out

"""Parameter groups: fastai's group tools on every optimizer, and groups built from a model.

* ``set_hyper(name, value)`` sets a hyperparameter in every group; a ``slice`` or list gives one value per group
  (``slice(lo, hi)`` geometric from the first group to the last, ``slice(hi)``: ``hi/10`` then ``hi``).
* ``freeze_to(n)``, ``freeze()``, ``unfreeze()`` switch ``requires_grad`` by group; a parameter whose ``opt_args``
  has ``force_train=True`` (normalisation layers, marked by :func:`param_groups`) stays trainable with
  ``train_bn=True``.
* :func:`param_groups` builds groups from a module: no weight decay on biases, normalisation weights and any names
  listed, optional layer-wise learning-rate decay through each group's ``lr_scale``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .hypers import spread

__all__ = ["GroupToolsMixin", "NORM_LAYERS", "mark_norm_params", "param_groups"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


class GroupToolsMixin:
    """fastai's group tools, for any optimizer whose hyperparameters live in ``param_groups``."""

    param_groups: list[dict[str, Any]]

    def set_hyper(self, name: str, value: Any) -> None:
        """Set ``name`` in every group; a slice or a list gives one value per group. Values are validated."""
        declared = self.declared_hypers() if hasattr(self, "declared_hypers") else {}
        if name not in declared and not all(name in g for g in self.param_groups):
            raise KeyError(f"unknown hyperparameter {name!r}; known: {', '.join(declared or self.param_groups[0])}")
        hyper = declared.get(name)
        per_group = isinstance(value, list) and all(isinstance(v, (tuple, list)) for v in value)
        # Undeclared (a wrapped torch optimizer's): tuple-valued when the groups already hold a tuple there.
        tuple_valued = not hyper.scalar if hyper is not None else isinstance(self.param_groups[0].get(name), tuple)
        if tuple_valued and not per_group:
            values = [value] * len(self.param_groups)  # a pair such as betas is one value, not one per group
        else:
            values = spread(value, len(self.param_groups), name)
        if hyper is not None:
            for v in values:
                hyper.validate(v)
        # Combinations are checked on the would-be groups first, so a refused value changes nothing.
        for group, v in zip(self.param_groups, values):
            for transform in getattr(self, "transforms", ()):
                transform.check_group({**group, name: v})
        for group, v in zip(self.param_groups, values):
            group[name] = v

    def set_hypers(self, **values: Any) -> None:
        for name, value in values.items():
            self.set_hyper(name, value)

    def _units(self) -> list[list[dict[str, Any]]]:
        # Groups made by param_groups() carry their layer: freezing counts layers, not (decay, no-decay) halves.
        groups = self.param_groups
        if groups and all("layer" in g for g in groups):
            layers = sorted({g["layer"] for g in groups})
            return [[g for g in groups if g["layer"] == layer] for layer in layers]
        return [[g] for g in groups]

    def freeze_to(self, n: int, train_bn: bool = True) -> None:
        """Freeze the groups (or layers, for groups from :func:`param_groups`) before ``n``; unfreeze the others.

        A negative ``n`` counts from the end.
        """
        units = self._units()
        frozen = n if n >= 0 else len(units) + n
        if frozen >= len(units):
            warnings.warn(f"freezing {frozen} groups of {len(units)}: the whole model is frozen", stacklevel=2)
        for unit in units[n:]:
            for group in unit:
                for p in group["params"]:
                    p.requires_grad_(True)
        for unit in units[:n]:
            for group in unit:
                for p in group["params"]:
                    args = getattr(p, "opt_args", None) or {}
                    p.requires_grad_(bool(train_bn and args.get("force_train", False)))

    def freeze(self, train_bn: bool = True) -> None:
        """Train only the last group (and normalisation layers when ``train_bn``)."""
        if len(self._units()) < 2:
            raise ValueError("freeze() needs at least two parameter groups (or layers)")
        self.freeze_to(-1, train_bn)

    def unfreeze(self) -> None:
        self.freeze_to(0)


def mark_norm_params(model: nn.Module) -> list[torch.Tensor]:
    """Mark the parameters of normalisation layers with ``opt_args['force_train'] = True`` and return them."""
    marked: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            for p in module.parameters(recurse=False):
                p.opt_args = {**(getattr(p, "opt_args", None) or {}), "force_train": True}  # type: ignore[attr-defined]
                marked.append(p)
    return marked


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    *,
    no_decay: Iterable[str] = (),
    decay_biases: bool = False,
    decay_norms: bool = False,
    layer_decay: float | None = None,
    layers: Iterable[nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for a model, ready for any optimizer.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: the decay given to the decayed groups (others get 0).
        no_decay: glob patterns of parameter names that get no decay (e.g. ``"*.pos_embed"``).
        decay_biases: decay biases too (off by default).
        decay_norms: decay normalisation-layer parameters too (off by default).
        layer_decay: layer-wise learning-rate decay: layer ``i`` of ``L`` gets ``lr_scale = layer_decay ** (L-1-i)``.
        layers: the layers, first to last, for ``layer_decay`` and for ``freeze_to`` (default: the model's
            children; parameters outside them join the first layer).

    Returns:
        Groups ordered from the first layer to the last, each ``{'params': [(name, p), ...], 'weight_decay': ...,
        'lr_scale': ..., 'layer': i}`` (named parameters, so errors and tracers can name them). ``freeze_to(n)``
        counts layers for such groups. Normalisation parameters are marked ``force_train`` (see
        :func:`mark_norm_params`).
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"Invalid layer_decay: {layer_decay!r} (must be in (0, 1])")
    norm_params = {id(p) for p in mark_norm_params(model)}
    patterns = list(no_decay)
    layer_list = list(layers) if layers is not None else list(model.children())
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layer_list):
        for p in layer.parameters():
            layer_of.setdefault(id(p), i)
    n_layers = max(len(layer_list), 1)
    buckets: dict[tuple[int, bool], list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith("bias")
        decayed = not (
            (is_bias and not decay_biases)
            or (id(p) in norm_params and not decay_norms)
            or any(fnmatch.fnmatch(name, pat) for pat in patterns)
        )
        buckets.setdefault((layer_of.get(id(p), 0), decayed), []).append((name, p))
    groups = []
    for (depth, decayed), named in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        scale = 1.0 if layer_decay is None else layer_decay ** (n_layers - 1 - depth)
        groups.append(
            {"params": named, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale, "layer": depth}
        )
    return groups

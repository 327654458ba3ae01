"""timm's optimizer factory conventions: ``create_optimizer(model, "lamb", lr=..., weight_decay=..., layer_decay=...)``.

The parameter groups are those timm's ``create_optimizer_v2`` builds (``timm.optim._param_groups`` and
``timm.models._manipulate.group_with_matcher``, timm 1.0, Apache-2.0), rebuilt here so that timm need not be
installed:

* weight decay: a no-decay group (1-D parameters, names ending in ``.bias``, and the names or patterns of the
  model's ``no_weight_decay()``) and a decay group, in that order, empty ones left out; with ``weight_decay=0``
  one group without decay.
* layer-wise lr decay: the layer of each parameter from the model's ``group_matcher(coarse=False)`` (timm's models
  have one), else timm's fallback (consecutive runs of 12 parameter names, the head from
  ``pretrained_cfg["classifier"]``; a plain model without either gets one layer, and timm's warning); groups
  ``layer_<i>_decay`` / ``layer_<i>_no_decay`` with ``lr_scale = max(min_scale, layer_decay ** (L - 1 - i))``.

The optimizer is looked up in gradstep's registry (``gradstep.available()``), so names have gradstep's meaning:
``"sgd"`` is torch's SGD (timm's ``"sgd"`` is Nesterov: pass ``nesterov=True``). A ``lookahead_`` prefix wraps it
in :class:`gradstep.Lookahead`. As in timm, ``momentum`` (default 0.9) is passed to optimizers that have one.
"""

from __future__ import annotations

import collections.abc
import fnmatch
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from itertools import chain
from typing import Any

import torch
from torch import nn

from ..core.registry import get

__all__ = ["create_optimizer", "param_groups_layer_decay", "param_groups_weight_decay"]

_MATCH_PREV_GROUP = 99999.0  # timm's marker: a layer that joins the previous group (a final norm joins the last block)


def _matches(name: str, patterns: Collection[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float = 1e-5,
    no_weight_decay_list: Collection[str] = (),
    *,
    weight_decay_exclude_1d: bool = True,
) -> list[dict[str, Any]]:
    """timm's ``param_groups_weight_decay``: ``[no-decay group, decay group]`` (empty ones left out).

    Parameters are given by name (``(name, p)`` pairs), so that gradstep's errors name them.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = weight_decay_exclude_1d and (p.ndim <= 1 or name.endswith(".bias"))
        if not weight_decay or excluded or _matches(name, no_weight_decay_list):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    groups: list[dict[str, Any]] = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def _layer_ids(names: Iterable[str], matcher: dict[str, Any] | Callable[[str], Any]) -> dict[str, int]:
    """timm's ``group_with_matcher(..., reverse=True)``: each name's layer index, from regexes or a function."""
    compiled: list[tuple[re.Pattern[str], tuple[int, ...], Any]] = []
    if isinstance(matcher, dict):
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            if isinstance(spec, (tuple, list)):  # several (regex, suffix) pairs
                compiled += [(re.compile(regex), (ordinal,), suffix) for regex, suffix in spec]
            else:
                compiled.append((re.compile(spec), (ordinal,), None))

    def ordinal_of(name: str) -> tuple[float, ...]:
        if not callable(matcher):
            for regex, prefix, suffix in compiled:
                found = regex.match(name)
                if found:
                    parts = (prefix, found.groups(), suffix)
                    return tuple(map(float, chain.from_iterable(filter(None, parts))))
            return (float("inf"),)  # unmatched (neck, head): after every matched layer
        value = matcher(name)
        return tuple(value) if isinstance(value, collections.abc.Iterable) else (value,)

    by_ordinal: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for name in names:
        by_ordinal[ordinal_of(name)].append(name)
    layer_of: dict[str, int] = {}
    layer = -1
    for key in sorted(by_ordinal):
        if layer < 0 or key[-1] != _MATCH_PREV_GROUP:
            layer += 1
        for name in by_ordinal[key]:
            layer_of[name] = layer
    return layer_of


def _auto_layer_ids(model: nn.Module, layers_per_group: int = 12) -> dict[str, int]:
    """timm's ``auto_group_layers``: runs of ``layers_per_group`` parameter names; the classifier last."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier", None)

    def in_head(name: str) -> bool:
        if not head:
            return True  # timm's rule: without a known classifier everything is "head" (one layer)
        prefixes = head if isinstance(head, (tuple, list)) else (head,)
        return any(name.startswith(prefix) for prefix in prefixes)

    names = [n for n, _ in model.named_parameters()]
    trunk = [n for n in names if not in_head(n)]
    layer_of = {n: i // layers_per_group for i, n in enumerate(trunk)}
    n_trunk_groups = -(-len(trunk) // layers_per_group)
    layer_of.update({n: n_trunk_groups for n in names if in_head(n)})
    return layer_of


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Collection[str] = (),
    *,
    weight_decay_exclude_1d: bool = True,
    layer_decay: float = 0.75,
    min_scale: float = 0.0,
    no_opt_scale: float | None = None,
) -> list[dict[str, Any]]:
    """timm's ``param_groups_layer_decay``: one group per (layer, decay or not), with the layer's ``lr_scale``.

    As in timm, a parameter whose scale falls below ``no_opt_scale`` is frozen (``requires_grad=False``) and left
    out. gradstep's optimizers multiply ``lr`` by each group's ``lr_scale`` themselves (timm leaves it to its
    schedulers: do not combine these groups with timm's schedulers, which would apply it twice).
    """
    group_matcher = getattr(model, "group_matcher", None)
    if group_matcher is not None:
        layer_of = _layer_ids((n for n, _ in model.named_parameters()), group_matcher(coarse=False))
    else:
        layer_of = _auto_layer_ids(model)
    n_layers = max(layer_of.values()) + 1 if layer_of else 1
    if n_layers == 1:
        warnings.warn(
            "Layer-wise lr decay has no effect, all parameters were assigned to one layer. Models without a "
            "group_matcher() need a pretrained_cfg['classifier'] for automatic layer grouping "
            "(or use gradstep.param_groups(model, layer_decay=...), which takes the model's children as layers).",
            stacklevel=3,
        )
    last = n_layers - 1
    scales = [max(min_scale, layer_decay ** (last - i)) for i in range(n_layers)]
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (weight_decay_exclude_1d and p.ndim <= 1) or _matches(name, no_weight_decay_list)
        layer = layer_of.get(name, last)
        scale = scales[layer]
        if no_opt_scale and scale < no_opt_scale:
            p.requires_grad_(False)
            continue
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay})
        group["lr_scale"] = scale
        group["params"].append((name, p))
    return list(groups.values())


def create_optimizer(
    model_or_params: nn.Module | Iterable[Any],
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    *,
    foreach: bool | None = None,
    filter_bias_and_bn: bool = True,
    layer_decay: float | None = None,
    layer_decay_min_scale: float = 0.0,
    layer_decay_no_opt_scale: float | None = None,
    param_group_fn: Callable[[nn.Module], Any] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a gradstep optimizer with timm's ``create_optimizer_v2`` parameter groups and conventions.

    Args:
        model_or_params: a model (its groups are built as timm builds them) or parameters / groups (used as given).
        opt: a gradstep registry name, optionally prefixed ``lookahead_``.
        lr: learning rate (``None``: the optimizer's default).
        weight_decay: the decay of the decayed groups.
        momentum: passed when the optimizer has a ``momentum`` hyperparameter (timm's habit), unless in ``kwargs``.
        foreach: gradstep's ``foreach`` hyperparameter, when given.
        filter_bias_and_bn: no decay on 1-D parameters (biases, normalisation weights) and on ``*.bias``.
        layer_decay: layer-wise lr decay (see :func:`param_groups_layer_decay`); takes precedence over the plain
            weight-decay groups, as in timm.
        layer_decay_min_scale: the lowest ``lr_scale`` a layer gets.
        layer_decay_no_opt_scale: layers whose scale is below this are frozen and left out.
        param_group_fn: builds the groups from the model instead (other grouping options are then ignored).
        **kwargs: further hyperparameters of the optimizer (an unknown one raises ``TypeError`` naming it).

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        >>> opt = gradstep.create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05)
        >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]   # biases and norm: no decay
        [(4, 0.0), (2, 0.05)]
    """
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        no_weight_decay = set(getattr(model, "no_weight_decay", lambda: set())())
        if param_group_fn is not None:
            params: Any = param_group_fn(model)
        elif layer_decay is not None:
            params = param_groups_layer_decay(
                model,
                weight_decay,
                no_weight_decay,
                weight_decay_exclude_1d=filter_bias_and_bn,
                layer_decay=layer_decay,
                min_scale=layer_decay_min_scale,
                no_opt_scale=layer_decay_no_opt_scale,
            )
        else:
            params = param_groups_weight_decay(
                model, weight_decay, no_weight_decay, weight_decay_exclude_1d=filter_bias_and_bn
            )
        weight_decay = 0.0  # each group carries its own
    else:
        params = model_or_params
    name = opt.lower()
    lookahead = name.startswith("lookahead_")
    entry = get(name.removeprefix("lookahead_"))
    hypers: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
    if lr is not None:
        hypers["lr"] = lr
    if foreach is not None:
        hypers["foreach"] = foreach
    if "momentum" in entry.hyperparameters():
        hypers.setdefault("momentum", momentum)
    optimizer = entry(params, **hypers)
    if lookahead:
        from ..wrappers import Lookahead

        return Lookahead(optimizer)
    return optimizer

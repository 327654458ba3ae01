"""Routing parameters by role: one optimizer made of several, each owning a set of parameters.

Matrix optimizers (Muon) are for the hidden weight matrices of a network; embeddings, the output head, biases, norm
parameters and scalars want an element-wise optimizer (AdamW). :func:`partition` builds one
``torch.optim.Optimizer`` out of several: one ``step()``, ``zero_grad()`` and ``state_dict()``, and ``param_groups``
that are every part's groups (the same dicts), so LR schedulers, ``GradScaler`` and checkpoints see all of them.

This lives beside :func:`gradstep.chain` rather than among the wrappers: a wrapper changes how *one* optimizer steps,
a partition decides *which* optimizer steps each parameter.

Who gets what, in order:

1. ``overrides``: ``(selector, part)`` pairs; a selector is a glob over parameter names (``"*.qkv.weight"``) or a
   module type (the parameters a module of that type holds directly). A parameter two overrides send to different
   parts is an error.
2. the role classifier (:func:`classify`): embeddings, the output head (also when tied to the embedding), biases,
   norm parameters, scalars and other vectors are ``"elementwise"``; other tensors of 2+ dimensions ``"matrix"``.
3. a parameter whose role has no part (and no override) is an error naming it: nothing is silently dropped.

:meth:`Partition.routes` (and ``repr``) lists each parameter with its shape, part, group and the rule that sent it.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .core.registry import Entry, from_config, register_partition_preset

__all__ = ["Partition", "Route", "classify", "partition"]

HEAD_NAMES = ("lm_head", "head", "classifier", "output", "fc_out")
"""Module names read as the output head; without one, the model's last ``nn.Linear`` is."""

OptimizerSpec = "str | Mapping[str, Any] | Callable[[list[Tensor]], torch.optim.Optimizer]"


@dataclass(frozen=True)
class Route:
    """Where one parameter went: its name and shape, the part and group that own it, and why."""

    name: str
    shape: tuple[int, ...]
    part: str
    group: int
    reason: str


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def classify(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """Each parameter's role, ``"matrix"`` or ``"elementwise"``, with the reason, by name (tied ones: first name)."""
    owner: dict[int, tuple[str, torch.nn.Module, str]] = {}
    linears: list[tuple[str, torch.nn.Module]] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.Linear):
            linears.append((module_name, module))
        for short, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{short}" if module_name else short
            owner.setdefault(id(p), (full, module, short))
    heads = [m for n, m in linears if n.rsplit(".", 1)[-1] in HEAD_NAMES] or [m for _, m in linears[-1:]]
    head_ids = {id(m.weight) for m in heads}
    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
        for p in m.parameters()
    }
    roles: dict[str, tuple[str, str]] = {}
    for name, p in model.named_parameters():
        _, module, short = owner[id(p)]
        if id(p) in embedding_ids and id(p) in head_ids:
            roles[name] = ("elementwise", "embedding tied to the output head")
        elif id(p) in embedding_ids:
            roles[name] = ("elementwise", "embedding")
        elif id(p) in head_ids:
            roles[name] = ("elementwise", "output head")
        elif _is_norm(module):
            roles[name] = ("elementwise", f"norm ({type(module).__name__})")
        elif p.dim() == 0:
            roles[name] = ("elementwise", "scalar")
        elif p.dim() == 1:
            roles[name] = ("elementwise", "bias" if short == "bias" else "vector")
        else:
            roles[name] = ("matrix", f"hidden {p.dim()}-D weight")
    return roles


def _module_types(model: torch.nn.Module) -> dict[int, list[type]]:
    types: dict[int, list[type]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            types.setdefault(id(p), []).append(type(module))
    return types


def _build(part: str, spec: Any, params: list[Tensor]) -> torch.optim.Optimizer:
    if isinstance(spec, (str, Mapping)):
        return from_config(spec if isinstance(spec, str) else dict(spec), params)
    if callable(spec):
        built = spec(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"part {part!r} built a {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    raise TypeError(f"part {part!r}: give a config string, a config dict or a callable, got {spec!r}")


def partition(
    model: torch.nn.Module,
    parts: Mapping[str, Any],
    *,
    overrides: Sequence[tuple[str | type, str]] = (),
    roles: bool = True,
) -> Partition:
    """One optimizer made of ``parts``, each given the parameters of ``model`` routed to it (see the module docstring).

    Args:
        model: the module whose parameters (``requires_grad`` ones) are routed.
        parts: part name to optimizer: a config (``"muon(lr=0.02)"``, ``{"name": "adamw", "lr": 3e-4}``) or a callable
            ``params -> optimizer``. The classifier's roles are ``"matrix"`` and ``"elementwise"``.
        overrides: ``(name glob or module type, part)`` pairs, applied before the classifier.
        roles: use the classifier; ``False``: only ``overrides`` route.

    Example::

        >>> import torch, gradstep
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
        >>> opt = gradstep.partition(model, {"matrix": "muon(lr=0.02)", "elementwise": "adamw(lr=3e-4)"})
        >>> [(r.name, r.part, r.reason) for r in opt.routes()][:2]
        [('1.weight', 'matrix', 'hidden 2-D weight'), ('0.weight', 'elementwise', 'embedding')]
    """
    classified = classify(model) if roles else {}
    types = _module_types(model)
    chosen: dict[str, tuple[str, str]] = {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in named:
        claims: dict[str, str] = {}
        for selector, part in overrides:
            hit = fnmatch.fnmatchcase(name, selector) if isinstance(selector, str) else selector in types[id(p)]
            if hit:
                label = selector if isinstance(selector, str) else selector.__name__
                claims.setdefault(part, f"override {label!r}")
        if len(claims) > 1:
            raise ValueError(
                f"parameter {name} is claimed twice: {', '.join(f'{v} -> {k}' for k, v in claims.items())}"
            )
        if claims:
            ((part, reason),) = claims.items()
        elif name in classified:
            part, reason = classified[name]
        else:
            raise ValueError(f"parameter {name} {tuple(p.shape)} is claimed by no rule (roles=False, no override)")
        if part not in parts:
            raise ValueError(
                f"parameter {name} {tuple(p.shape)} goes to part {part!r} ({reason}), which is not among the parts "
                f"({', '.join(parts)}): give that part, or an override"
            )
        chosen[name] = (part, reason)
    members = {part: [(n, p) for n, p in named if chosen[n][0] == part] for part in parts}
    built = {part: _build(part, spec, [p for _, p in members[part]]) for part, spec in parts.items() if members[part]}
    routes = []
    for part, opt in built.items():
        group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        routes += [Route(n, tuple(p.shape), part, group_of[id(p)], chosen[n][1]) for n, p in members[part]]
    return Partition(built, routes)


class Partition(torch.optim.Optimizer):
    """Several optimizers stepped as one (built by :func:`partition`).

    ``param_groups`` lists every part's groups in order of the parts (the same dicts: a scheduler's change reaches the
    part). ``state_dict()`` is torch's format over all the parameters (numbered across the parts in that order) plus
    each part's own metadata; ``load_state_dict`` gives each part its share.
    """

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer], routes: Iterable[Route] = ()) -> None:
        if not parts:
            raise ValueError("a partition needs at least one part with parameters")
        self.parts = dict(parts)
        self._routes = list(routes)
        self.defaults = {}
        torch.optim.Optimizer.__setstate__(self, {})  # hook registries and the hooked step, without new groups
        self.defaults.pop("differentiable", None)

    def __getstate__(self) -> dict[str, Any]:
        return {"parts": self.parts, "_routes": self._routes, "defaults": self.defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        torch.optim.Optimizer.__setstate__(self, {})
        self.defaults.pop("differentiable", None)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        raise AttributeError("a partition's param_groups are its parts'; set them on opt.parts[name]")

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, Any]:
        return {p: s for opt in self.parts.values() for p, s in opt.state.items()}

    @state.setter
    def state(self, value: Any) -> None:
        if value:
            raise AttributeError("a partition's state is its parts'; load it with load_state_dict")

    def routes(self) -> list[Route]:
        """Each parameter: name, shape, the part and group it went to, and why."""
        return list(self._routes)

    def report(self) -> str:
        """The routes as a table."""
        rows = [("parameter", "shape", "optimizer", "group", "why")]
        for r in self._routes:
            part = f"{r.part} ({type(self.parts[r.part]).__name__})"
            rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", part, str(r.group), r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {name}: {repr(opt)}".replace("\n", "\n  ") for name, opt in self.parts.items())
        return f"Partition(\n{inner}\n)\n{self.report()}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add a group to one part: opt.parts[name].add_param_group(...)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` once (with grad enabled), then step every part."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        meta: dict[str, Any] = {}
        offset = 0
        for name, opt in self.parts.items():
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            meta[name] = {
                "groups": len(sd["param_groups"]),
                **{k: v for k, v in sd.items() if k not in ("state", "param_groups")},
            }
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        # The routes travel as plain lists so `gradstep inspect` can show them and weights_only loads take them.
        routes = [[r.name, list(r.shape), r.part, r.group, r.reason] for r in self._routes]
        return {"state": state, "param_groups": groups, "partition": meta, "partition_routes": routes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each part its share; a dict refused by any part leaves every part as it was."""
        shares = self._shares(state_dict)
        before = {name: copy.deepcopy(opt.state_dict()) for name, opt in self.parts.items()}
        loaded: list[str] = []
        try:
            for name, opt in self.parts.items():
                opt.load_state_dict(shares[name])
                loaded.append(name)
        except Exception:
            # A part's own load is atomic; the parts loaded before the refusal get their old state back.
            for name in loaded:
                self.parts[name].load_state_dict(before[name])
            raise

    def _shares(self, state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each part's state_dict cut out of the partition's, after checking the layout matches this partition."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("a partition's state_dict is a dict with 'state', 'param_groups' and 'partition'")
        meta = state_dict.get("partition")
        if not isinstance(meta, dict) or list(meta) != list(self.parts):
            saved = list(meta) if isinstance(meta, dict) else "none"
            raise ValueError(f"this state_dict holds the parts {saved}, this partition {list(self.parts)}")
        groups, state = state_dict["param_groups"], state_dict.get("state", {})
        expected = sum(len(opt.param_groups) for opt in self.parts.values())
        counts = [m.get("groups") if isinstance(m, dict) else None for m in meta.values()]
        known = [c for c in counts if isinstance(c, int)]
        if len(groups) != expected or len(known) != len(counts) or sum(known) != expected:
            raise ValueError(f"this state_dict holds {len(groups)} param groups, this partition {expected}")
        shares: dict[str, dict[str, Any]] = {}
        start, offset = 0, 0
        for name, opt in self.parts.items():
            if meta[name]["groups"] != len(opt.param_groups):
                raise ValueError(
                    f"part {name!r}: the state_dict holds {meta[name]['groups']} param groups, "
                    f"the part {len(opt.param_groups)}"
                )
            mine = groups[start : start + meta[name]["groups"]]
            start += meta[name]["groups"]
            ids = [i for g in mine for i in g["params"]]
            sd = {k: v for k, v in meta[name].items() if k != "groups"}
            sd["param_groups"] = [{**g, "params": [i - offset for i in g["params"]]} for g in mine]
            sd["state"] = {i - offset: state[i] for i in ids if i in state}
            shares[name] = sd
            offset += len(ids)
        return shares


# --- presets ---------------------------------------------------------------------------------------------------------
_SCOPE: list[torch.nn.Module] = []


class model_scope:  # noqa: N801 (used as a function: ``with model_scope(model): ...``)
    """Within the block, a preset given bare parameters of ``model`` routes them by ``model``'s names and modules.

    Training loops that hand an optimizer factory ``model.parameters()`` (``gradstep compare``) wrap the call in it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        _SCOPE.append(self.model)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        _SCOPE.pop()


def _as_model(params: Any) -> torch.nn.Module:
    """``params`` as a module: itself, the model in scope that holds exactly them, or a flat container of them."""
    if isinstance(params, torch.nn.Module):
        return params
    items = list(params)
    if items and isinstance(items[0], dict):
        raise TypeError("a partition preset routes a model's or a list's parameters, not param groups")
    named = [(n, p) if isinstance(n, str) else (f"param{i}", p) for i, (n, p) in enumerate(_pairs(items))]
    tensors = {id(p) for _, p in named}
    for model in reversed(_SCOPE):
        if {id(p) for p in model.parameters()} >= tensors:
            return _Only(model, tensors)
    holder = torch.nn.Module()
    for name, p in named:
        holder.register_parameter(
            name.replace(".", "_"), p if isinstance(p, torch.nn.Parameter) else torch.nn.Parameter(p)
        )
    return holder


def _pairs(items: list[Any]) -> list[tuple[Any, Tensor]]:
    return [item if isinstance(item, tuple) else (None, item) for item in items]


class _Only(torch.nn.Module):
    """A model's parameters restricted to some of them (names and modules kept)."""

    def __init__(self, model: torch.nn.Module, keep: set[int]) -> None:
        super().__init__()
        self.model = model
        self.keep = keep

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return ((n[len("model.") :], p) for n, p in super().named_parameters(*args, **kwargs) if id(p) in self.keep)


class MuonAdamW(Partition):
    """Muon for the hidden matrices, AdamW for the rest: the usual split (Jordan et al.'s ``MuonWithAuxAdam``).

    AdamW's lr is ``lr * adamw_lr_ratio`` (0.02 and 3e-4 in the Muon reference: a ratio of 0.015), with betas
    (0.9, 0.95) and eps 1e-10; both parts share ``weight_decay``. Given a model (or its parameters inside
    :class:`model_scope`), roles come from :func:`classify`; given bare tensors, 2+-dimensional ones are matrices.
    Convolution weights (3+ dimensions) are orthogonalized as their ``(shape[0], rest)`` reshape, as the original
    Muon code does (Muon's ``tensor_mode="flatten"``).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        adamw_lr_ratio: float = 0.015,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-10,
        ns_dtype: str | None = "bfloat16",
    ) -> None:
        from .optim.adam import AdamW
        from .optim.muon import Muon

        if not 0 < adamw_lr_ratio:
            raise ValueError(f"Invalid adamw_lr_ratio: {adamw_lr_ratio!r} (must be a real number > 0)")
        parts: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
            "matrix": lambda ps: Muon(
                ps, lr=lr, weight_decay=weight_decay, momentum=momentum, ns_dtype=ns_dtype, tensor_mode="flatten"
            ),
            "elementwise": lambda ps: AdamW(
                ps, lr=lr * adamw_lr_ratio, betas=betas, eps=eps, weight_decay=weight_decay
            ),
        }
        built = partition(_as_model(params), parts)
        super().__init__(built.parts, built.routes())
        self.defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "adamw_lr_ratio": adamw_lr_ratio}
        self.defaults.update(betas=betas, eps=eps, ns_dtype=ns_dtype)


MUON_ADAMW = register_partition_preset(
    Entry(
        "muon_adamw",
        MuonAdamW,
        "Muon for hidden matrices, AdamW (lr x 0.015) for embeddings, head, biases, norms and scalars",
        "Jordan et al., 2024. Muon: An optimizer for hidden layers in neural networks",
        ("Muon reference's MuonWithAuxAdam split",),
        example={"lr": 0.02, "weight_decay": 0.01},
        invalid=(({"adamw_lr_ratio": -1.0}, "adamw_lr_ratio"),),
    )
)


def presets() -> dict[str, Any]:
    """The partition presets by name, as registry entries (built on a model, or on parameters in a model_scope).

    They are also known to :func:`gradstep.create` and :func:`gradstep.from_config`:
    ``gradstep.from_config("muon_adamw(lr=0.02)", model)``.
    """
    return {MUON_ADAMW.name: MUON_ADAMW}

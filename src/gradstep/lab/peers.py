"""The other implementations gradstep is compared with (benchmarks) and tested against (parity tests).

Each loader returns ``None`` when the package is not installed, so callers can list what is available.
``import holocron`` (package pylocron) fails on a CPU-only machine because its package ``__init__`` pulls in
torchvision's compiled ops; the optimizers themselves only need torch, so a bare package module whose ``__path__``
is the installed folder lets ``holocron.optim`` import on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = ["holocron_optim", "implementations"]

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def holocron_optim() -> ModuleType:
    """``holocron.optim`` from the installed pylocron, without running ``holocron/__init__.py``."""
    if "holocron.optim" in sys.modules:
        return sys.modules["holocron.optim"]
    spec = importlib.util.find_spec("holocron")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pylocron (holocron) is not installed: pip install '.[test]'")
    if "holocron" not in sys.modules:
        package = types.ModuleType("holocron")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["holocron"] = package
    return importlib.import_module("holocron.optim")


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _factory(module: Any, name: str, **hypers: Any) -> Factory:
    """A builder of ``module.name(params, **hypers)`` (a peer class or factory function)."""

    def build(params: list[torch.nn.Parameter]) -> Any:
        return getattr(module, name)(params, **hypers)

    return build


def implementations() -> dict[str, dict[str, Factory]]:
    """For each gradstep registry name, the other implementations of the same algorithm that import here.

    Each factory builds the peer with its own defaults (the benchmark measures speed, not numerics).
    """
    t = torch.optim
    table: dict[str, dict[str, Factory]] = {
        "sgd": {
            "torch foreach": lambda p: t.SGD(p, lr=1e-3, momentum=0.9, foreach=True),
            "torch fused": lambda p: t.SGD(p, lr=1e-3, momentum=0.9, fused=True),
        },
        "adam": {"torch foreach": lambda p: t.Adam(p, foreach=True), "torch fused": lambda p: t.Adam(p, fused=True)},
        "adamw": {"torch foreach": lambda p: t.AdamW(p, foreach=True), "torch fused": lambda p: t.AdamW(p, fused=True)},
        "adamax": {"torch foreach": lambda p: t.Adamax(p, foreach=True)},
        "rmsprop": {"torch foreach": lambda p: t.RMSprop(p, foreach=True)},
        "radam": {"torch foreach": lambda p: t.RAdam(p, foreach=True)},
    }
    pto = _optional("pytorch_optimizer")
    if pto is not None:
        for name, cls in [
            ("lamb", "Lamb"),
            ("adan", "Adan"),
            ("adabelief", "AdaBelief"),
            ("adamp", "AdamP"),
            ("ademamix", "AdEMAMix"),
            ("lars", "LARS"),
        ]:
            table.setdefault(name, {})["pytorch-optimizer"] = _factory(pto, cls)
    try:
        ho = holocron_optim()
    except ImportError:
        ho = None
    if ho is not None:
        for name, cls in [
            ("lamb", "LAMB"),
            ("lars", "LARS"),
            ("ralars", "RaLars"),
            ("tadam", "TAdam"),
            ("adabelief", "AdaBelief"),
            ("adan", "Adan"),
            ("ademamix", "AdEMAMix"),
            ("adamp", "AdamP"),
        ]:
            table.setdefault(name, {})["holocron"] = _factory(ho, cls, lr=1e-3)
    qh = _optional("qhoptim.pyt")
    if qh is not None:
        table.setdefault("qhadam", {})["qhoptim"] = _factory(qh, "QHAdam", lr=1e-3)
    fastai = _optional("fastai.optimizer")
    if fastai is not None:
        for name, fn in [
            ("fastai_sgd", "SGD"),
            ("fastai_rmsprop", "RMSProp"),
            ("fastai_adam", "Adam"),
            ("fastai_radam", "RAdam"),
            ("fastai_qhadam", "QHAdam"),
            ("fastai_lamb", "Lamb"),
            ("larc", "Larc"),
        ]:
            extra = {"mom": 0.9} if name == "fastai_sgd" else {}  # with momentum, as gradstep's row runs it
            table.setdefault(name, {})["fastai"] = _factory(fastai, fn, lr=1e-3, **extra)
    clova = _optional("adamp")
    if clova is not None:
        table.setdefault("adamp", {})["adamp (clovaai)"] = _factory(clova, "AdamP")
    return table

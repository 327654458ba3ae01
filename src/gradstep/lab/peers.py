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

    Each peer runs the configuration gradstep's row runs (gradstep's defaults, plus the registry's required
    arguments and :data:`gradstep.lab.bench.SAME_AS_PEERS`): where a peer's default differs, it is given gradstep's
    value. heavyball is left out: it compiles each step function with ``torch.compile`` (tens of seconds per shape on
    a CPU) and its classes' defaults (update clipping, betas, epsilon placement) are not the algorithms' as published.
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
        "nadam": {"torch foreach": lambda p: t.NAdam(p, foreach=True)},
        "adagrad": {
            "torch foreach": lambda p: t.Adagrad(p, foreach=True),
            "torch fused": lambda p: t.Adagrad(p, fused=True),
        },
        "adadelta": {"torch foreach": lambda p: t.Adadelta(p, foreach=True)},
        "asgd": {"torch foreach": lambda p: t.ASGD(p, foreach=True)},
        "rprop": {"torch foreach": lambda p: t.Rprop(p, foreach=True)},
        "lbfgs": {"torch": lambda p: t.LBFGS(p)},
        "adafactor": {"torch foreach": lambda p: t.Adafactor(p, foreach=True)},
        "muon": {"torch": lambda p: t.Muon(p)},
    }
    _add_modern_peers(table)
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


def _add_modern_peers(table: dict[str, dict[str, Factory]]) -> None:
    """Peers of the optimizers published since torch.optim's classics, each with gradstep's defaults."""

    def add(name: str, label: str, module: ModuleType | None, cls: str, **hypers: Any) -> None:
        if module is not None:
            table.setdefault(name, {})[label] = _factory(module, cls, **hypers)

    lion = _optional("lion_pytorch")
    add("lion", "lion-pytorch", lion, "Lion", lr=1e-4)
    optimi = _optional("optimi")
    add("lion", "torch-optimi", optimi, "Lion", lr=1e-4)
    add("stableadamw", "torch-optimi", optimi, "StableAdamW", lr=1e-3)
    came = _optional("came_pytorch")
    add("came", "came-pytorch", came, "CAME", lr=2e-3)  # gradstep's lr is required: the registry example's
    sf = _optional("schedulefree")
    add("sgd_schedule_free", "schedulefree", sf, "SGDScheduleFree")
    add("adamw_schedule_free", "schedulefree", sf, "AdamWScheduleFree")
    add("radam_schedule_free", "schedulefree", sf, "RAdamScheduleFree")
    add("prodigy", "prodigyopt", _optional("prodigyopt"), "Prodigy")
    dadapt = _optional("dadaptation")
    add("dadapt_adam", "dadaptation", dadapt, "DAdaptAdam")
    add("dadapt_sgd", "dadaptation", dadapt, "DAdaptSGD")
    add("dadapt_adagrad", "dadaptation", dadapt, "DAdaptAdaGrad")
    pto = _optional("pytorch_optimizer")
    label = "pytorch-optimizer"
    add("lion", label, pto, "Lion")
    add("cautious_lion", label, pto, "Lion", cautious=True)
    add("came", label, pto, "CAME", lr=2e-3)
    add("adopt", label, pto, "ADOPT")
    add("mars", label, pto, "MARS")
    add("laprop", label, pto, "LaProp")
    add("stableadamw", label, pto, "StableAdamW", eps=1e-6, kahan_sum=False)
    add("prodigy", label, pto, "Prodigy")
    add("dadapt_adam", label, pto, "DAdaptAdam")
    add("dadapt_sgd", label, pto, "DAdaptSGD", momentum=0.0)
    add("dadapt_adagrad", label, pto, "DAdaptAdaGrad", eps=1e-6)
    if pto is not None:  # its groups say which parameters are orthogonalized (the others would go to AdamW)
        table.setdefault("normuon", {})[label] = lambda p: pto.NorMuon([{"params": p, "use_muon": True}])
    add("sgd_schedule_free", label, pto, "ScheduleFreeSGD")
    add("adamw_schedule_free", label, pto, "ScheduleFreeAdamW")
    add("radam_schedule_free", label, pto, "ScheduleFreeRAdam")

"""Import helpers for the reference implementations the parity tests compare against.

``import holocron`` (package pylocron) fails on a CPU-only machine because its package ``__init__`` pulls in
torchvision's compiled ops; the optimizers themselves only need torch. A bare package module whose ``__path__`` is
the installed folder lets ``holocron.optim`` import on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType


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

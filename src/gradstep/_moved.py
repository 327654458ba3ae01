"""Old module paths of modules that moved into the wings, kept importable for one release.

``import gradstep.clipping`` (and ``from gradstep.clipping import ...``) still works: it warns with a
``DeprecationWarning`` naming the new path and gives the module at that path, the very same object (so a patch or an
``isinstance`` check made through either name holds for both). ``python -m gradstep.bench`` runs the moved module.
No file stands at the old paths: a finder on ``sys.meta_path`` answers for them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

MOVED: dict[str, str] = {
    "gradstep.clipping": "gradstep.tools.clipping",
    "gradstep.trusted": "gradstep.tools.trusted",
    "gradstep.derivative_free": "gradstep.tools.derivative_free",
    "gradstep.diagnostics": "gradstep.tools.diagnostics",
    "gradstep.projections": "gradstep.tools.projections",
    "gradstep.schedules": "gradstep.tools.schedules",
    "gradstep.checkpoint": "gradstep.tools.checkpoint",
    "gradstep.recipes": "gradstep.optim.recipes",
    "gradstep.cli": "gradstep.lab.cli",
    "gradstep.tasks": "gradstep.lab.tasks",
    "gradstep.plots": "gradstep.lab.plots",
    "gradstep.report": "gradstep.lab.report",
    "gradstep.bench": "gradstep.lab.bench",
    "gradstep.bench_fsdp": "gradstep.lab.bench_fsdp",
    "gradstep.peers": "gradstep.lab.peers",
}
"""Old module path -> where the module lives now."""


def warn_moved(old: str, stacklevel: int) -> None:
    warnings.warn(
        f"{old} moved to {MOVED[old]}; the old path goes away in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, old: str) -> None:
        self.old = old
        self.new = MOVED[old]
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # warnings skips the import system's own frames: level 3 is the line that imports the old path.
        warn_moved(self.old, stacklevel=3)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has just set the old name's spec on the module: give it back its own.
        module.__spec__ = self.spec

    def get_code(self, fullname: str) -> CodeType:
        """What ``python -m <old path>`` runs: the moved module, as ``__main__``."""
        source = (
            f"import runpy\nfrom gradstep._moved import warn_moved\nwarn_moved({self.old!r}, stacklevel=2)\n"
            f"runpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        )
        return compile(source, f"<{self.old}, moved to {self.new}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        if fullname not in MOVED:
            return None  # type: ignore[return-value]
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(fullname))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def moved_attribute(name: str) -> ModuleType:
    """``gradstep.<name>`` for a module that moved (module ``__getattr__`` of the package): warn, give the new one."""
    old = f"gradstep.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'gradstep' has no attribute {name!r}")
    warn_moved(old, stacklevel=4)
    return importlib.import_module(MOVED[old])

"""The package's wings and the dependency rule between them, checked from the imports themselves (docs/architecture.md).

Every module under src/gradstep is parsed with ``ast``; every ``import`` and ``from ... import`` in it, at the top or
inside a function (a lazy import is still a dependency), is resolved to an absolute module name. The rule:

- the library (everything outside ``gradstep.lab``) never imports ``gradstep.lab``;
- ``gradstep.core`` imports nothing from gradstep outside the core;
- ``tools``, ``optim``, ``wrappers`` and ``paramtransform`` import neither ``gradstep.integrations`` nor the lab.

``import gradstep`` is also run in a fresh interpreter: it must not load the lab or the lab's dependencies.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradstep

SRC = Path(gradstep.__file__).resolve().parent
LAB_DEPENDENCIES = ("matplotlib", "sklearn", "tqdm")
COMMAND_LINE_ENTRY = "gradstep.__main__"  # ``python -m gradstep`` runs the lab's command line: it is the lab's door


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute names (``from x import y`` counts as ``x`` and as ``x.y``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imported_modules(p) for p in sorted(SRC.rglob("*.py"))}


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(
    importers: str | None,
    forbidden: tuple[str, ...],
    *,
    excluding: tuple[str, ...] = (),
    modules: dict[str, set[str]] = MODULES,
) -> list[str]:
    """``importer -> imported`` for each module inside ``importers`` (all when None) that imports a forbidden one."""
    found = []
    for module, imports in modules.items():
        if importers is not None and not inside(module, importers):
            continue
        if any(inside(module, package) for package in excluding):
            continue
        found += [f"{module} -> {target}" for target in sorted(imports) if any(inside(target, f) for f in forbidden)]
    return found


def test_the_scan_sees_top_level_relative_and_lazy_imports() -> None:
    # The rule below is only as good as the scan: these edges exist, at the top and inside functions.
    assert "gradstep.core.registry" in MODULES["gradstep.lab.cli.common"]  # from ...core.registry import ... (top)
    assert "gradstep.lab.tasks" in MODULES["gradstep.lab.cli.compare"]  # from .. import tasks (inside a function)
    assert "gradstep.tools.clipping" in MODULES["gradstep.transforms"]
    assert "gradstep.lab.cli" in MODULES[COMMAND_LINE_ENTRY]
    assert len(MODULES) > 60


def test_the_library_never_imports_the_lab() -> None:
    outside_lab = [m for m in MODULES if not inside(m, "gradstep.lab") and m != COMMAND_LINE_ENTRY]
    assert "gradstep" in outside_lab and "gradstep.tools.checkpoint" in outside_lab
    found = violations(None, ("gradstep.lab",), excluding=("gradstep.lab", COMMAND_LINE_ENTRY))
    assert found == []


def test_the_core_imports_nothing_above_it() -> None:
    above = tuple(
        sorted({".".join(m.split(".")[:2]) for m in MODULES if m != "gradstep" and not inside(m, "gradstep.core")})
    )
    assert "gradstep.optim" in above and "gradstep.transforms" in above
    found = violations("gradstep.core", above) + [
        f"{m} -> gradstep" for m, imports in MODULES.items() if inside(m, "gradstep.core") and "gradstep" in imports
    ]
    assert found == []


@pytest.mark.parametrize("wing", ["gradstep.tools", "gradstep.optim", "gradstep.wrappers", "gradstep.paramtransform"])
def test_library_wings_import_neither_integrations_nor_the_lab(wing: str) -> None:
    assert any(inside(m, wing) for m in MODULES)
    assert violations(wing, ("gradstep.integrations", "gradstep.lab")) == []


def test_the_rule_check_reports_a_forbidden_import() -> None:
    with_a_bad_module = {**MODULES, "gradstep.tools.fake": {"torch", "gradstep.core.ops", "gradstep.lab.tasks"}}
    assert violations("gradstep.tools", ("gradstep.lab",), modules=with_a_bad_module) == [
        "gradstep.tools.fake -> gradstep.lab.tasks"
    ]
    assert (
        violations("gradstep.tools", ("gradstep.lab",), excluding=("gradstep.tools.fake",), modules=with_a_bad_module)
        == []
    )


def test_import_gradstep_loads_neither_the_lab_nor_its_dependencies() -> None:
    # torch itself may import some of these (this torch imports tqdm): only what gradstep adds counts.
    script = (
        "import json, sys\n"
        f"deps = {LAB_DEPENDENCIES!r}\n"
        "import torch\n"
        "before = {d for d in deps if d in sys.modules}\n"
        "import gradstep\n"
        "added = sorted(d for d in deps if d in sys.modules and d not in before)\n"
        "lab = sorted(m for m in sys.modules if m == 'gradstep.lab' or m.startswith('gradstep.lab.'))\n"
        "print(json.dumps({'added': added, 'lab': lab}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"added": [], "lab": []}

"""The public API stays importable: ``gradstep.__all__``, the documented submodules, and the old module paths.

The modules that moved into the wings (``gradstep.clipping`` is now ``gradstep.tools.clipping``, ``gradstep.cli`` is
``gradstep.lab.cli``, ...) stay importable for one release at their old paths, with a ``DeprecationWarning`` that
names the new one; the old path gives the very same module object.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gradstep
from gradstep._moved import MOVED

DOCS = Path(__file__).resolve().parents[1] / "docs"

BEFORE_THE_WINGS = [
    "AdEMAMix", "AdaBelief", "Adam", "AdamP", "AdamTF", "AdamW", "Adamax", "Adan", "CEMOptimizer", "Capabilities",
    "ChainedOptimizer", "ClampedGradientOptimizer", "ClampedParameterOptimizer", "CosineSchedule", "Entry",
    "FrankWolfe", "GradientClipping", "GradientNoiseScaleEstimator", "GroupStep", "Hyper", "L1FrankWolfe",
    "L1NormedGradientOptim", "L1qFrankWolfe", "L1qNormedGradientOptim", "L2FrankWolfe", "L2NormedGradientOptim",
    "L2ProjectedOptim", "LAMB", "LARC", "LARS", "LinfFrankWolfe", "LinfProjectedOptim", "Lookahead",
    "MonotonicProjection", "NeroPlus", "NonFiniteError", "NonFiniteEvent", "NonFiniteTracer", "OptimWrapper", "QHAdam",
    "RAdam", "REQUIRED", "RMSProp", "RMSprop", "RaLars", "RandomOptimizer", "SGD", "Scout", "SignedGradientOptim",
    "TAdam", "TopQGradientOptimizer", "Transform", "TrustedUpdater", "available", "chain", "clip_gradients", "create",
    "derivative_free", "diagnostics", "from_config", "get", "mark_norm_params", "monotonic_projection",
    "monotonic_projection_exact", "param_groups", "paramtransform", "projections", "ranger", "recipes", "register",
    "schedules", "transforms", "wrappers",
]  # fmt: skip
"""``gradstep.__all__`` before the package was split into wings."""

OLD_MODULES: dict[str, list[str]] = {
    "clipping": ["CLIP_MODES", "GradientClipping", "clip_gradients", "clip_scale"],
    "trusted": ["TrustedUpdater"],
    "derivative_free": ["CEMOptimizer", "CostFunc", "RandomOptimizer", "TrajOptimizer"],
    "diagnostics": ["GNS_MODES", "GradientNoiseScaleEstimator", "ScalarEMA"],
    "projections": ["MonotonicProjection", "monotonic_projection", "monotonic_projection_exact"],
    "schedules": ["CosineSchedule"],
    "checkpoint": ["ConversionError", "TARGETS", "convert", "find_state_dicts", "is_state_dict", "summarize"],
    "recipes": ["GOMLX_DEFAULT_OPTIMIZER", "gomlx"],
    "cli": ["main", "build_parser", "CommandError"],
    "tasks": [
        "CharLM", "DigitsCNN", "DigitsMLP", "History", "LRFinderResult", "Metric", "MissingDependency", "Rastrigin",
        "Rosenbrock", "Split", "SweepResult", "TASKS", "Target", "Task", "encode_text", "load_digits",
        "load_stdlib_text", "lr_range_test", "make_task", "sweep_lr", "train",
    ],
    "plots": ["plot_curves", "plot_lr_find", "plot_lr_sweep", "plot_trajectories", "smooth"],
    "report": ["compare_html", "summary_table"],
    "bench": ["Row", "bandwidth", "main", "markdown", "measure", "run", "workload"],
    "bench_fsdp": ["DEFAULT_OPTIMIZERS", "main", "make_model", "single_process", "under_fsdp2"],
    "peers": ["holocron_optim", "implementations"],
}  # fmt: skip
"""The public names of each module that moved, as they were at its old path."""

SUBPACKAGES = ["core", "optim", "wrappers", "paramtransform", "tools", "integrations", "lab", "lab.cli", "lab.tasks"]


def forget(old: str) -> None:
    """Undo an import of an old path: as in a fresh interpreter (the package attribute too, unless it is public)."""
    sys.modules.pop(old, None)
    name = old.removeprefix("gradstep.")
    if name not in gradstep.__all__ and name in vars(gradstep):
        delattr(gradstep, name)


def documented_paths() -> list[str]:
    """Every ``::: dotted.path`` the documentation renders (mkdocstrings)."""
    paths = {m for page in DOCS.rglob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)}
    return sorted(paths)


def resolve(path: str) -> object:
    """The module or object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_every_name_in_all_is_importable_and_none_was_lost() -> None:
    missing = [name for name in gradstep.__all__ if not hasattr(gradstep, name)]
    assert missing == []
    assert sorted(set(BEFORE_THE_WINGS) - set(gradstep.__all__)) == []
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the public names themselves are not deprecated
        exec("from gradstep import *", namespace)
    assert set(gradstep.__all__) <= set(namespace)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_wing_lists_its_public_names_and_they_import(name: str) -> None:
    module = importlib.import_module(f"gradstep.{name}")
    assert module.__doc__ and module.__doc__.strip(), f"gradstep.{name} says what it holds"
    for public in getattr(module, "__all__", ()):
        assert hasattr(module, public), f"gradstep.{name}.{public}"


def test_every_documented_path_resolves() -> None:
    paths = documented_paths()
    assert "gradstep.lab.cli" in paths and "gradstep.tools.clipping" in paths
    unresolved = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # the docs name the new paths, not the old ones
                resolve(path)
        except (ImportError, AttributeError, DeprecationWarning) as exc:
            unresolved.append(f"{path}: {exc}")
    assert unresolved == []


def test_the_modules_of_the_old_paths_are_where_moved_says() -> None:
    assert sorted(MOVED) == sorted(f"gradstep.{old}" for old in OLD_MODULES)
    for old, new in MOVED.items():
        module = importlib.import_module(new)
        assert module.__name__ == new and module.__spec__ is not None and module.__spec__.name == new
        for public in OLD_MODULES[old.removeprefix("gradstep.")]:
            assert hasattr(module, public), f"{new}.{public} (was {old}.{public})"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_warns_and_gives_the_moved_module(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    forget(old)
    try:
        with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {MOVED[old]}")) as caught:
            module = importlib.import_module(old)
        assert module is new
        assert module.__spec__ is not None and module.__spec__.name == MOVED[old]  # its own spec, not the alias's
        for public in OLD_MODULES[old.removeprefix("gradstep.")]:
            assert getattr(module, public) is getattr(new, public)
        assert len(caught) == 1
    finally:
        forget(old)


def test_from_import_and_attribute_of_an_old_path_warn_at_the_line_that_uses_them() -> None:
    forget("gradstep.clipping")
    try:
        with pytest.warns(DeprecationWarning, match="gradstep.tools.clipping") as caught:
            from gradstep.clipping import GradientClipping  # noqa: F401
        assert caught[0].filename == __file__
        forget("gradstep.clipping")
        with pytest.warns(DeprecationWarning, match="gradstep.tools.clipping") as caught:
            clipping = gradstep.clipping  # the attribute of the package, never imported under that name here
        assert clipping is importlib.import_module("gradstep.tools.clipping") and caught[0].filename == __file__
    finally:
        forget("gradstep.clipping")


def test_unknown_attributes_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = gradstep.no_such_name  # type: ignore[attr-defined]
    assert not hasattr(gradstep, "lab_of_nothing")


def test_scout_at_its_old_module_path_warns() -> None:
    import gradstep.wrappers.lookahead as lookahead

    with pytest.warns(DeprecationWarning, match="gradstep.wrappers.scout"):
        scout = lookahead.Scout
    assert scout is gradstep.Scout


def test_python_dash_m_with_an_old_module_path_runs_the_moved_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradstep.bench_fsdp", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m gradstep.lab.bench_fsdp")
    assert "DeprecationWarning: gradstep.bench_fsdp moved to gradstep.lab.bench_fsdp" in proc.stderr

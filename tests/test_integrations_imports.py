"""``import gradstep`` stays light: the training frameworks are imported only by the integration modules that need
them (gradstep.integrations.lightning), never by gradstep or gradstep.integrations themselves."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pytorch_lightning", "lightning", "transformers", "accelerate", "timm", "schedulefree")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(run.stdout.split())


def test_import_gradstep_and_its_integrations_imports_no_framework() -> None:
    loaded = _loaded_after("import gradstep, gradstep.integrations; gradstep.EMA, gradstep.create_optimizer")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_lightning_module_imports_lightning() -> None:
    loaded = _loaded_after("import gradstep.integrations.lightning")
    assert loaded & {"pytorch_lightning", "lightning"}

"""The integration examples of examples/ run, learn, and show what their docstrings say.

* ``train_amp_scheduler.py``: a gradstep optimizer with a OneCycle LR schedule, ``torch.amp`` autocast (bfloat16 on
  CPU) and a ``GradScaler``, whose skipped steps gradstep must not count; its checkpoint loads with
  ``weights_only=True``.
* ``compile_model.py``: a ``torch.compile``'d model trained by a gradstep optimizer. The test compiles with the
  ``aot_eager`` backend (dynamo's graph capture and AOTAutograd's joint forward/backward graph, without inductor's C++
  code generation, which takes tens of seconds on a 2-core machine); the example's default is inductor. The
  optimizer's own compiled path is covered by tests/test_fast_path.py.

Sizes are small and torch runs on one thread here, so the file takes a few seconds.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


_load = load_example


@pytest.fixture(scope="module")
def amp() -> ModuleType:
    return _load("train_amp_scheduler")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_amp_loop_learns_under_bf16_autocast_and_follows_the_one_cycle_schedule(amp: ModuleType) -> None:
    result = amp.main(steps=60, batch_size=32, max_lr=1e-2)
    assert result.output_dtype == torch.bfloat16  # autocast really ran the forward pass in bfloat16
    assert _mean(result.losses[-10:]) < 0.6 * _mean(result.losses[:10])
    assert result.accuracy > 0.5  # 10 classes: chance is 0.1
    # OneCycleLR rises to max_lr at about 30% of the run, then anneals far below it; the optimizer's groups carry it.
    lrs = result.lrs
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-2) and abs(peak - 0.3 * 60) <= 2
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] < 1e-2 / 1000
    assert result.skipped == [] and result.steps_taken == 60


def test_grad_scaler_skips_the_overflowing_step_and_gradstep_does_not_count_it(amp: ModuleType) -> None:
    result = amp.main(steps=12, batch_size=32, overflow_at=7)
    assert result.skipped == [7]
    assert result.scales[7] == result.scales[6] / 2  # the scaler backed off
    assert result.steps_taken == 11  # optimizer.step() was not called for the overflowing step
    checkpoint = torch.load(io.BytesIO(result.checkpoint), weights_only=True)
    steps = {float(s["step"]) for s in checkpoint["optimizer"]["state"].values()}
    assert steps == {11.0}  # every parameter's own step count skipped it too
    assert checkpoint["optimizer"]["gradstep"]["global_step"] == 11


def test_amp_checkpoint_resumes_in_a_fresh_optimizer_with_float32_state(amp: ModuleType) -> None:
    result = amp.main(steps=5, batch_size=16)
    checkpoint = torch.load(io.BytesIO(result.checkpoint), weights_only=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.LayerNorm(128), torch.nn.GELU(), torch.nn.Linear(128, 10)
    )
    model.load_state_dict(checkpoint["model"])
    optimizer = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.05), lr=1e-2)
    optimizer.load_state_dict(checkpoint["optimizer"])
    state = optimizer.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and float(state["step"]) == 5
    saved = checkpoint["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(state["exp_avg"], saved) and state["exp_avg"].data_ptr() != saved.data_ptr()  # a copy


def test_compiled_model_trains_exactly_like_the_uncompiled_model() -> None:
    example = _load("compile_model")
    torch._dynamo.reset()
    counters.clear()
    compiled = example.main(steps=30, backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph"
    eager = example.main(steps=30, backend=None)
    torch._dynamo.reset()
    # The same initial weights and batches: the compiled forward/backward computes the same gradients.
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert _mean(compiled[-10:]) < 0.85 * _mean(compiled[:10])


def test_amp_example_runs_as_a_script() -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_amp_scheduler.py"), "--steps", "20", "--overflow-at", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "steps skipped by the GradScaler: [3]" in run.stdout

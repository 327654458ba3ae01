"""gradstep with Hugging Face Accelerate (the real package, CPU): accelerator.prepare with gradient accumulation equals
the hand-written accumulation loop bit for bit, and the prepared optimizer keeps gradstep's features (the non-finite
policy on the accumulated gradient, set_hyper, state_dict through save_state/load_state)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

# The test extras install accelerate: a failed import fails these tests rather than skipping them.
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch import nn

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    return load_example("accelerate_loop")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    # Accelerate keeps process-wide singletons: each test starts from a clean one.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accumulation_equals_the_hand_written_loop_bitwise(ex: ModuleType) -> None:
    result = ex.main(accumulation=4)
    assert result.optimizer.global_step == 16 / 4 and type(result.optimizer) is gradstep.AdamW
    model, loader = ex.model_and_data()
    opt = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.01), lr=1e-2, nonfinite="skip")
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=64)
    for i, (x, y) in enumerate(loader):
        (nn.functional.mse_loss(model(x), y) / 4).backward()
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_prepared_optimizer_keeps_the_nonfinite_policy_and_set_hyper() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Linear(3, 1)
    inner = gradstep.SGD(model.parameters(), lr=0.1, nonfinite="skip")
    model, prepared = accelerator.prepare(model, inner)
    assert prepared.optimizer is inner

    def accumulate(value: float) -> None:
        for _ in range(2):
            with accelerator.accumulate(model):
                out = model(torch.ones(1, 3)).sum() * value
                accelerator.backward(out)
                prepared.step()
                prepared.zero_grad()

    before = model.weight.detach().clone()
    accumulate(float("nan"))  # the accumulated gradient is NaN: gradstep skips the step
    assert inner.skipped_steps == 1 and inner.global_step == 0 and torch.equal(model.weight, before)
    inner.set_hyper("lr", 0.5)  # the prepared optimizer shares the groups
    assert prepared.param_groups[0]["lr"] == 0.5
    accumulate(1.0)
    assert inner.global_step == 1
    assert torch.allclose(model.weight, before - 0.5 * torch.ones(1, 3))  # d(sum)/dw = 1, averaged over 2
    strict = gradstep.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    strict_prepared = accelerator.prepare(strict)
    strict.param_groups[0]["params"][0].grad = torch.tensor([float("inf"), 0.0])
    accelerator.gradient_state._set_sync_gradients(True)
    with pytest.raises(gradstep.NonFiniteError, match="non-finite gradient"):
        strict_prepared.step()


def test_save_state_and_load_state_resume_bitwise(ex: ModuleType, tmp_path: Path) -> None:
    straight = ex.main(accumulation=2, epochs=2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ex.main(accumulation=2, epochs=1, state_dir=tmp_path / "state")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = ex.main(accumulation=2, epochs=1, resume=tmp_path / "state")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.global_step == straight.optimizer.global_step == 16
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        for key, value in straight.optimizer.state[p].items():
            assert torch.equal(value, resumed.optimizer.state[q][key]), key

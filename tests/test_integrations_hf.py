"""gradstep in the Hugging Face Trainer (the real transformers package, CPU, a tiny GPT-2 built from a config):
``optimizers=(opt, sched)``, ``optimizer_cls_and_kwargs``, and ``resume_from_checkpoint`` bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers  # noqa: F401  (the test extras install it: a failed import fails, never skips)

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    return load_example("hf_trainer")


@pytest.fixture(autouse=True)
def _no_future_warnings() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _inner(trainer: Any) -> Any:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it


def test_optimizers_pair_trains_and_follows_the_schedule(ex: ModuleType, tmp_path: Path) -> None:
    trainer = ex.train_with_optimizer(tmp_path, max_steps=8)
    opt = _inner(trainer)
    assert type(opt) is gradstep.AdamW and opt.global_step == 8
    # Cosine with 2 warm-up steps over 8: the schedule ends at 0.
    assert trainer.lr_scheduler.get_last_lr() == [0.0] * len(opt.param_groups)
    assert ex.loss(trainer.model) < 0.95 * ex.loss(ex.tiny_gpt2())


def test_optimizer_cls_and_kwargs_builds_gradstep_on_the_trainers_groups(ex: ModuleType, tmp_path: Path) -> None:
    trainer = ex.train_with_class(tmp_path, max_steps=8)
    opt = _inner(trainer)
    assert type(opt) is gradstep.AdaBelief and opt.defaults["betas"] == (0.9, 0.99) and opt.global_step == 8
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(n.endswith("bias") or ".ln_" in n for n in plain) and "transformer.h.0.attn.c_attn.weight" in decayed
    assert ex.loss(trainer.model) < 0.95 * ex.loss(ex.tiny_gpt2())


def test_resume_from_checkpoint_is_bitwise(ex: ModuleType, tmp_path: Path) -> None:
    straight = ex.train_with_optimizer(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = ex.train_with_optimizer(tmp_path / "resumed", max_steps=6, resume=str(checkpoint))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    expected, got = _inner(straight).state_dict(), _inner(resumed).state_dict()
    assert expected["gradstep"] == got["gradstep"] == {"optimizer": "AdamW", "global_step": 6}
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got["state"][index][key]), (index, key)
    assert straight.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()


def test_an_ema_attached_to_the_optimizer_follows_the_trainers_steps(ex: ModuleType, tmp_path: Path) -> None:
    from transformers import Trainer

    model = ex.tiny_gpt2()
    optimizer = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.01), lr=1e-2)
    ema = gradstep.EMA(model, decay=0.5)
    ema.attach(optimizer)  # the Trainer steps the optimizer: the EMA updates after each step
    trainer = Trainer(
        model=model,
        args=ex.arguments(tmp_path, 4, gradient_accumulation_steps=2),
        train_dataset=ex.CountingSequences(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert optimizer.global_step == 4 and ema.num_updates == 4
    assert not torch.equal(ema.shadow["transformer.wte.weight"], model.transformer.wte.weight)  # an average

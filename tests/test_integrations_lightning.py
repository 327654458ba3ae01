"""gradstep in PyTorch Lightning (the real pytorch-lightning package, CPU): optimizers and schedulers from
configure_optimizers, checkpoint resume through the Trainer bit for bit, gradient clipping through the Trainer, and
the callbacks of gradstep.integrations.lightning (schedule-free train/eval, EMA weights for validation).

The Trainers are tiny (64 samples, batches of 16); the file takes some seconds, mostly Lightning's start-up.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ex() -> ModuleType:
    return load_example("lightning_train")


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        yield


def _state(model: nn.Module, trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer.optimizers[0].state_dict()


def _assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["gradstep"] == b["gradstep"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_checkpoint_resume_through_the_trainer_is_bitwise(ex: ModuleType, tmp_path: Path, name: str) -> None:
    straight = ex.Regressor(name)
    t = ex.trainer(4, gradient_clip_val=1.0)
    t.fit(straight, ex.data())
    expected_weights, expected_opt = _state(straight, t)
    expected_lr = t.lr_scheduler_configs[0].scheduler.get_last_lr()

    first = ex.Regressor(name)
    t1 = ex.trainer(2, gradient_clip_val=1.0)
    t1.fit(first, ex.data())
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = ex.Regressor(name)
    t2 = ex.trainer(4, gradient_clip_val=1.0)
    # weights_only=True: gradstep's state and the scheduler's need no pickled objects.
    t2.fit(resumed, ex.data(), ckpt_path=tmp_path / "half.ckpt", weights_only=True)
    weights, opt_state = _state(resumed, t2)
    assert all(torch.equal(weights[k], v) for k, v in expected_weights.items())
    _assert_same_optimizer_state(expected_opt, opt_state)
    assert type(t2.optimizers[0]) is type(gradstep.create(name, [nn.Parameter(torch.zeros(1))]))
    assert t2.optimizers[0].global_step == 16 and t2.lr_scheduler_configs[0].scheduler.get_last_lr() == expected_lr


def test_gradient_clipping_through_the_trainer_matches_clip_grad_norm(ex: ModuleType) -> None:
    for algorithm, clip in (("norm", torch.nn.utils.clip_grad_norm_), ("value", torch.nn.utils.clip_grad_value_)):
        model = ex.Regressor("sgd", lr=0.1)
        ex.trainer(1, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm).fit(model, ex.data())
        # The same four steps by hand: same initial weights, batches, optimizer, schedule and clipping.
        manual = ex.Regressor("sgd", lr=0.1)
        config = manual.configure_optimizers()
        opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
        unclipped = ex.Regressor("sgd", lr=0.1)
        unclipped_opt = unclipped.configure_optimizers()["optimizer"]
        for x, y in ex.data():
            opt.zero_grad()
            nn.functional.mse_loss(manual(x), y).backward()
            clip([p for g in opt.param_groups for p in g["params"]], 0.05)
            opt.step()
            sched.step()
            unclipped_opt.zero_grad()
            nn.functional.mse_loss(unclipped(x), y).backward()
            unclipped_opt.step()
        for (key, a), b in zip(model.state_dict().items(), manual.state_dict().values()):
            assert torch.equal(a, b), f"{algorithm}: {key}"
        assert not torch.equal(model.net[0].weight, unclipped.net[0].weight)  # the clip was active


class _ModeRecorder(torch.optim.SGD):
    """The train()/eval() protocol of schedule-free optimizers, recording the calls (and refusing eval-mode steps)."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.calls: list[str] = []
        self.training = False

    def train(self) -> None:
        self.calls.append("train")
        self.training = True

    def eval(self) -> None:
        self.calls.append("eval")
        self.training = False

    def step(self, closure: Any = None) -> Any:
        assert self.training, "stepped in eval mode"
        return super().step(closure)


def test_schedule_free_callback_switches_modes_around_validation(ex: ModuleType) -> None:
    class Model(ex.Regressor):  # type: ignore[misc, name-defined]
        def configure_optimizers(self) -> Any:
            return _ModeRecorder(self.parameters())

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.trainer.optimizers[0].calls.append("validation_step")

    model = Model()
    t = ex.trainer(2, [ex.ScheduleFreeCallback()], num_sanity_val_steps=1, limit_val_batches=1)
    t.fit(model, ex.data(), ex.data(16, seed=1))
    calls = t.optimizers[0].calls
    sanity, epochs = calls[:3], calls[3:]
    assert sanity == ["eval", "validation_step", "train"]
    assert epochs == ["train", "eval", "validation_step", "train", "eval", "validation_step", "train", "eval"]


@pytest.mark.parametrize("source", ["schedulefree", "gradstep"])
def test_schedule_free_optimizer_trains_and_validates_at_its_averaged_point(ex: ModuleType, source: str) -> None:
    import schedulefree

    cls = schedulefree.SGDScheduleFree if source == "schedulefree" else gradstep.SGDScheduleFree

    class Model(ex.Regressor):  # type: ignore[misc, name-defined]
        def configure_optimizers(self) -> Any:
            return cls(self.parameters(), lr=0.05, warmup_steps=2)

    if source == "schedulefree":  # starts in eval mode and refuses to step until train() is called
        with pytest.raises(Exception, match="train mode"):
            ex.trainer(1).fit(Model(), ex.data())
    model = Model()
    t = ex.trainer(2, [ex.ScheduleFreeCallback()])
    t.fit(model, ex.data(), ex.data(16, seed=1))
    opt = t.optimizers[0]
    assert opt.param_groups[0]["train_mode"] is False  # left in eval mode: the module holds the averaged x
    assert len(model.validation_weights) == 2
    assert torch.equal(model.validation_weights[-1], model.net[0].weight)  # validation saw the eval-mode weights
    opt.train()
    assert not torch.equal(model.net[0].weight, model.validation_weights[-1])  # train mode: another point (y)


def test_ema_callback_validates_with_the_average_and_resumes_bitwise(ex: ModuleType, tmp_path: Path) -> None:
    def run(epochs: int, ckpt: Path | None = None) -> tuple[Any, Any, Any]:
        model = ex.Regressor()
        callback = ex.EMACallback(decay=0.8)
        t = ex.trainer(epochs, [callback], limit_val_batches=1)
        t.fit(model, ex.data(), ex.data(16, seed=1), ckpt_path=ckpt, weights_only=True if ckpt else None)
        return model, callback, t

    model, callback, t = run(2)
    assert callback.ema.num_updates == 8  # once per optimizer step
    # Validation saw the average, and the trained weights came back afterwards.
    assert torch.equal(model.validation_weights[-1], callback.ema.shadow["net.0.weight"])
    assert not torch.equal(model.net[0].weight, callback.ema.shadow["net.0.weight"])
    t.save_checkpoint(tmp_path / "ema.ckpt")
    straight_model, straight_callback, _ = run(4)
    resumed_model, resumed_callback, _ = run(4, tmp_path / "ema.ckpt")
    assert resumed_callback.ema.num_updates == straight_callback.ema.num_updates == 16
    for name, value in straight_callback.ema.shadow.items():
        assert torch.equal(resumed_callback.ema.shadow[name], value), name
    for key, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_example_runs_and_learns(ex: ModuleType, tmp_path: Path) -> None:
    model = ex.main(tmp_path, epochs=1)
    x, y = next(iter(ex.data()))
    untrained = ex.Regressor()
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), y) < 0.5 * nn.functional.mse_loss(untrained(x), y)


def test_ema_callback_updates_once_per_accumulated_step(ex: ModuleType) -> None:
    callback = ex.EMACallback(decay=0.5)
    model = ex.Regressor()
    t = ex.trainer(1, [callback], accumulate_grad_batches=2)
    t.fit(model, ex.data())  # 4 batches: 2 optimizer steps
    assert t.global_step == 2 and callback.ema.num_updates == 2

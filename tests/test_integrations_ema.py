"""gradstep.EMA against torch's AveragedModel with get_ema_multi_avg_fn, and timm ModelEmaV3's documented warm-up.

timm does not import here (it needs torchvision, whose PyPI wheel does not load against the CPU torch), so the
warm-up is checked against the figures timm's ModelEmaV3 docstring gives and its formula written out below.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import gradstep
from example_helpers import load_example, one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()


def _train(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_matches_torch_averaged_model_with_the_ema_multi_avg_fn(decay: float) -> None:
    model = _model()
    opt = gradstep.AdamW(model.parameters(), lr=1e-2)
    ema = gradstep.EMA(model, decay=decay, include_buffers=False)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for step in range(15):
        _train(model, opt, step)
        ema.update()
        reference.update_parameters(model)
    for name, p in reference.module.named_parameters():
        assert torch.equal(ema.shadow[name], p.detach()), name  # the same foreach lerp: bit for bit
    assert ema.num_updates == 15 == int(reference.n_averaged)


def test_buffers_are_averaged_or_copied_as_timm_does() -> None:
    model = _model()
    opt = gradstep.SGD(model.parameters(), lr=0.1)
    ema = gradstep.EMA(model, decay=0.5)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for step in range(5):
        _train(model, opt, step)
        ema.update()
        reference.update_parameters(model)
    expected = dict(reference.module.named_buffers())
    assert torch.equal(ema.shadow["1.running_mean"], expected["1.running_mean"])
    assert torch.equal(ema.shadow["1.running_var"], expected["1.running_var"])
    # An integer buffer is copied (timm), not averaged in integer arithmetic.
    assert ema.shadow["1.num_batches_tracked"].item() == 5


def test_warmup_follows_timm_formula_and_its_documented_milestones() -> None:
    ema = gradstep.EMA(nn.Linear(1, 1), decay=0.9999, use_warmup=True, warmup_power=2 / 3, update_after_step=2)
    # timm: step = max(0, step - update_after_step - 1); step <= 0 -> 0 (a copy); then 1 - (1 + s/gamma)^-power.
    assert [ema.get_decay(t) for t in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert ema.get_decay(4) == pytest.approx(1 - 2 ** (-2 / 3))
    # ModelEmaV3's docstring: power 2/3 reaches 0.999 at 31.6K steps and 0.9999 at 1M; power 3/4 0.999 at 10K.
    assert ema.get_decay(31_623 + 3) == pytest.approx(0.999, abs=1e-6)
    assert ema.get_decay(1_000_000 + 3) == pytest.approx(0.9999, abs=1e-7)
    three_quarters = gradstep.EMA(nn.Linear(1, 1), decay=0.99999, use_warmup=True, warmup_power=3 / 4)
    assert three_quarters.get_decay(10_000) == pytest.approx(0.999, abs=1e-6)
    assert three_quarters.get_decay(215_444) == pytest.approx(0.9999, abs=1e-7)
    capped = gradstep.EMA(nn.Linear(1, 1), decay=0.99, use_warmup=True, min_decay=0.5)
    assert capped.get_decay(2) == 0.5 and capped.get_decay(10**9) == 0.99


def test_swap_shows_the_average_and_restores_the_trained_weights_bit_for_bit() -> None:
    model = _model().float()
    opt = gradstep.AdamW(model.parameters(), lr=1e-2)
    ema = gradstep.EMA(model, decay=0.9, dtype=torch.float64)  # a wider average than the model
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()
        ema.update()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ema.shadow[name].float())
        swapped_out = model(torch.ones(2, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not torch.equal(swapped_out, model(torch.ones(2, 4)))
    assert ema.shadow["0.weight"].dtype == torch.float64  # the average kept its precision through the swap


def test_state_dict_round_trip_through_weights_only_load_and_a_refused_mismatch() -> None:
    model = _model()
    opt = gradstep.SGD(model.parameters(), lr=0.1)
    ema = gradstep.EMA(model, decay=0.8)
    for step in range(4):
        _train(model, opt, step)
        ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = gradstep.EMA(_model(), decay=0.8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == 4
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    # Both go on identically.
    _train(model, opt, 9)
    ema.update()
    restored._model.load_state_dict(model.state_dict())
    restored.update()
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    other = gradstep.EMA(nn.Linear(4, 2))
    before = {k: v.clone() for k, v in other.shadow.items()}
    with pytest.raises(ValueError, match="does not match the model"):
        other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], v) for k, v in before.items()) and other.num_updates == 0


def test_attach_updates_after_each_taken_step_and_not_after_a_skipped_one() -> None:
    model = nn.Linear(3, 1)
    opt = gradstep.SGD(model.parameters(), lr=0.1, nonfinite="skip")
    ema = gradstep.EMA(model, decay=0.5)
    handle = ema.attach(opt)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert ema.num_updates == 1
    model.weight.grad.fill_(float("nan"))
    opt.step()  # skipped by the optimizer: the weights did not move
    assert opt.skipped_steps == 1 and ema.num_updates == 1
    handle.remove()
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert ema.num_updates == 1


def test_copy_to_and_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    ema = gradstep.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # the first update copies
    fresh = nn.Linear(2, 2)
    ema.copy_to(fresh)
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(ValueError, match="decay"):
        gradstep.EMA(model, decay=1.5)
    with pytest.raises(TypeError, match="nn.Module"):
        gradstep.EMA([torch.zeros(1)])  # type: ignore[arg-type]


def test_the_example_evaluates_the_average_and_restores_the_weights() -> None:
    example = load_example("ema_eval")
    last, averaged = example.main(steps=200)
    assert averaged < 0.5 * last  # the noisy last iterate is worse than the average here

r"""GradientNoiseScaleEstimator (ALF, spec A.7): a float64 reference of the spec's math, and a closed-form problem.

**Reference.** :class:`AlfGNS` transcribes ALF's ``forward`` as plain float64 arithmetic, with the gradients of a linear
least-squares model written out by hand (not autograd): the same random split (a generator with the same seed),
``b = max(1, int(n * ratio))``, both modes' formulas, the global-norm clipping rule, ALF's ``ScalarEMAverager``
(``avg += r (x - avg)``, ``mass += r (1 - mass)``, ``avg / max(mass, r)``) and the fallback to the last valid estimate.

**Closed form.** Linear regression with Gaussian inputs :math:`x \sim N(0, C)`, targets :math:`y = x^\top w^* +
\varepsilon`, :math:`\varepsilon \sim N(0, \sigma^2)`, per-example loss :math:`\tfrac12 (x^\top w - y)^2`, at a fixed
:math:`w = w^* + \delta`. The per-example gradient is :math:`g = x (x^\top \delta - \varepsilon)`, so

.. math::
    G = \mathbb{E}[g] = C\delta, \qquad
    \mathbb{E}[g g^\top] = \mathbb{E}[x x^\top (x^\top\delta)^2] + \sigma^2 C
                         = (\delta^\top C \delta + \sigma^2)\, C + 2\, C\delta\delta^\top C

(Isserlis' theorem for the fourth moment of a Gaussian), hence
:math:`\Sigma = \mathbb{E}[gg^\top] - GG^\top = (\delta^\top C\delta + \sigma^2)\,C + C\delta\delta^\top C` and

.. math::
    B_{\text{simple}} = \frac{\operatorname{tr}\Sigma}{\lVert G\rVert^2}
                      = \frac{(\delta^\top C\delta + \sigma^2)\operatorname{tr} C}{\lVert C\delta\rVert^2} + 1.

Fed fresh batches at that fixed point, both modes must converge to this value. The tolerances are about four
standard deviations of the estimate after 2000 batches, measured over 10 seeds while writing the test: 1.0-1.2% in
"alternative" mode (tolerance 5%), 3.6% in "paper" mode (tolerance 15%; its small part of 12 examples is noisier).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from gradstep.tools.diagnostics import GradientNoiseScaleEstimator, ScalarEMA

F64 = torch.float64


# --- ALF, literally (float64, hand-written gradients of a linear model) -----------------------------------------------
class Ema:
    def __init__(self, rate: float) -> None:
        self.rate, self.avg, self.mass = rate, 0.0, 0.0

    def __call__(self, x: float) -> float:
        self.avg += self.rate * (x - self.avg)
        self.mass += self.rate * (1 - self.mass)
        return self.avg / max(self.mass, self.rate)


def linear_grads(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, idx: Tensor) -> list[Tensor]:
    """Gradient of mean over (T, the examples idx) of 0.5 * |x W + c - y|^2, by hand."""
    xs, ys = x[..., idx, :], y[..., idx, :]
    residual = xs @ weight + bias - ys  # [..., n, k]
    count = residual.shape[:-1].numel()
    gw = (xs.unsqueeze(-1) * residual.unsqueeze(-2)).reshape(count, *weight.shape).sum(0) / count
    gb = residual.reshape(count, -1).sum(0) / count
    return [gw, gb]


class AlfGNS:
    def __init__(self, mode: str, ratio: float, rate: float, clip: float | None, seed: int) -> None:
        self.mode, self.ratio, self.clip = mode, 0.5 if mode == "alternative" else ratio, clip
        self.gen = torch.Generator().manual_seed(seed)
        self.ema_g, self.ema_var = Ema(rate), Ema(rate)
        self.last_valid = 0.0
        self.fallbacks = self.clipped = 0

    def norm2_and_grads(self, grads: list[Tensor]) -> tuple[float, list[Tensor]]:
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        if self.clip is not None:
            s = self.clip / norm
            if s < 1:
                grads = [g * s for g in grads]
                self.clipped += 1
        return sum(float((g * g).sum()) for g in grads), grads

    def __call__(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
        n = x.shape[-2]
        perm = torch.randperm(n, generator=self.gen)
        b = max(1, int(n * self.ratio))
        big = n - b
        n_big, g_big = self.norm2_and_grads(linear_grads(x, y, weight, bias, perm[b:]))
        n_small, g_small = self.norm2_and_grads(linear_grads(x, y, weight, bias, perm[:b]))
        if self.mode == "paper":
            grad_norm = (big * n_big - b * n_small) / (big - b)
            var_trace = (n_small - n_big) / (1.0 / b - 1.0 / big)
        else:
            assert big == b
            var_trace = (n_big + n_small) / 2.0
            grad_norm = sum(float((u * v).sum()) for u, v in zip(g_big, g_small))
        gns = self.ema_var(var_trace) / (self.ema_g(grad_norm) + 1e-8)
        if self.mode == "alternative":
            gns = (gns - 1) * big
        if gns < 0:
            self.fallbacks += 1
            return self.last_valid
        self.last_valid = gns
        return gns


def _batch(gen: torch.Generator, t: int, n: int, d: int, k: int, w_true: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    shape = (t, n) if t else (n,)
    x = scale * torch.randn(*shape, d, generator=gen, dtype=F64)
    y = x @ w_true + 2.0 * torch.randn(*shape, k, generator=gen, dtype=F64)
    return x, y


@pytest.mark.parametrize(
    ("mode", "ratio", "clip", "time_axis"),
    [
        ("alternative", 0.1, None, 0),
        ("alternative", 0.1, 2.0, 3),
        ("paper", 0.2, None, 0),
        ("paper", 0.3, 2.0, 2),
    ],
)
def test_matches_float64_reference_step_by_step(mode: str, ratio: float, clip: float | None, time_axis: int) -> None:
    d, k, n = 3, 2, 10
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, k, generator=gen, dtype=F64)
    weight = nn.Parameter(w_true + 0.1 * torch.randn(d, k, generator=gen, dtype=F64))
    bias = nn.Parameter(0.1 * torch.randn(k, generator=gen, dtype=F64))
    estimator = GradientNoiseScaleEstimator(
        batch_size_ratio=ratio,
        update_rate=0.2,
        gradient_norm_clip=clip,
        mode=mode,
        generator=torch.Generator().manual_seed(7),
        dtype=F64,
    )
    reference = AlfGNS(mode, ratio, 0.2, clip, seed=7)
    for step in range(40):
        x, y = _batch(gen, time_axis, n, d, k, w_true, scale=0.3 if step % 3 else 3.0)
        loss = 0.5 * ((x @ weight + bias - y) ** 2).sum(-1)  # [T, n] or [n]
        got = estimator(loss, {"layer": [weight, (bias,)]})
        expected = reference(x, y, weight.detach(), bias.detach())
        assert got.dtype == F64 and got.shape == ()
        # abs: when both parts are clipped to the same norm, paper mode's trace estimate is a difference of equal
        # numbers (~1e-16), whose sign, and so the fallback, is decided by rounding.
        assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12), step
    assert estimator.last_valid_gns.item() == pytest.approx(reference.last_valid, rel=1e-10)
    # The comparison covered the fallback to the last valid value, and clipping where it was asked for.
    assert 0 < reference.fallbacks < 40
    if clip is not None:
        assert 0 < reference.clipped < 80


# --- the closed-form problem ------------------------------------------------------------------------------------------
def closed_form_gns(cov_diag: Tensor, delta: Tensor, sigma: float) -> float:
    c_delta = cov_diag * delta
    return float((delta @ c_delta + sigma**2) * cov_diag.sum() / (c_delta @ c_delta) + 1)


def run_linear_regression(mode: str, sigma: float, steps: int, seed: int = 0) -> tuple[float, float]:
    d, n = 32, 128
    gen = torch.Generator().manual_seed(seed)
    cov_diag = 0.5 + 1.5 * torch.rand(d, generator=gen, dtype=F64)
    w_true = torch.randn(d, generator=gen, dtype=F64)
    delta = torch.randn(d, generator=gen, dtype=F64)
    delta /= delta.norm()
    w = nn.Parameter(w_true + delta)
    estimator = GradientNoiseScaleEstimator(
        batch_size_ratio=0.1, update_rate=1e-4, mode=mode, generator=torch.Generator().manual_seed(seed), dtype=F64
    )
    for _ in range(steps):
        x = torch.randn(n, d, generator=gen, dtype=F64) * cov_diag.sqrt()
        y = x @ w_true + sigma * torch.randn(n, generator=gen, dtype=F64)
        gns = estimator(0.5 * (x @ w - y) ** 2, [w])
    return float(gns), closed_form_gns(cov_diag, delta, sigma)


@pytest.mark.parametrize("mode", ["alternative", "paper"])
@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_converges_to_the_closed_form_noise_scale(mode: str, sigma: float) -> None:
    estimate, expected = run_linear_regression(mode, sigma, steps=2000)
    assert estimate == pytest.approx(expected, rel=0.05 if mode == "alternative" else 0.15)


def test_closed_form_noise_scale_of_the_test_problem_matches_a_monte_carlo_covariance() -> None:
    # The derivation above, checked directly: tr(Sigma)/|G|^2 from 200k explicit per-example gradients.
    gen = torch.Generator().manual_seed(1)
    d, sigma = 6, 1.5
    cov_diag = 0.5 + 1.5 * torch.rand(d, generator=gen, dtype=F64)
    delta = torch.randn(d, generator=gen, dtype=F64)
    x = torch.randn(200_000, d, generator=gen, dtype=F64) * cov_diag.sqrt()
    g = x * (x @ delta - sigma * torch.randn(200_000, generator=gen, dtype=F64)).unsqueeze(1)
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum(1).mean()
    assert float(trace / (cov_diag * delta).pow(2).sum()) == pytest.approx(
        closed_form_gns(cov_diag, delta, sigma), rel=0.02
    )
    torch.testing.assert_close(mean, cov_diag * delta, rtol=0.05, atol=0.05)


# --- behaviour -------------------------------------------------------------------------------------------------------
def _tiny(seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1).double()
    x = torch.randn(16, 3, dtype=F64)
    y = torch.randn(16, 1, dtype=F64)
    return model, x, y


def test_leaves_grad_alone_and_keeps_the_graph_for_backward() -> None:
    model, x, y = _tiny()
    loss = ((model(x) - y) ** 2).squeeze(1)
    estimator = GradientNoiseScaleEstimator(generator=torch.Generator().manual_seed(0))
    estimator(loss, model)
    assert all(p.grad is None for p in model.parameters())
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_module_a_list_and_a_dict_of_its_parameters_give_the_same_estimate() -> None:
    model, x, y = _tiny()
    results = []
    for tensors in (model, list(model.parameters()), {"w": model.weight, "b": [model.bias]}):
        estimator = GradientNoiseScaleEstimator(update_rate=0.5, generator=torch.Generator().manual_seed(3), dtype=F64)
        for _ in range(3):
            value = estimator(((model(x) - y) ** 2).squeeze(1), tensors)
        results.append(value.item())
    assert results[0] == results[1] == results[2]


def test_non_finite_batch_keeps_averages_and_returns_last_valid_value() -> None:
    model, x, y = _tiny()
    estimator = GradientNoiseScaleEstimator(update_rate=0.3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for _ in range(5):
        estimator(((model(x) - y) ** 2).squeeze(1), model)
    before = {k: v.clone() for k, v in estimator.state_dict().items()}
    bad_x = x.clone()
    bad_x[3, 0] = float("nan")
    value = estimator(((model(bad_x) - y) ** 2).squeeze(1), model)
    assert value.item() == before["last_valid_gns"].item()
    assert all(torch.equal(before[k], v) for k, v in estimator.state_dict().items())


def test_state_dict_resumes_identically() -> None:
    model, x, y = _tiny()
    first = GradientNoiseScaleEstimator(update_rate=0.3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for _ in range(4):
        first(((model(x) - y) ** 2).squeeze(1), model)
    second = GradientNoiseScaleEstimator(update_rate=0.3, generator=torch.Generator(), dtype=F64)
    second.load_state_dict(first.state_dict())
    second.generator.set_state(first.generator.get_state())
    for _ in range(3):
        loss = ((model(x) - y) ** 2).squeeze(1)
        assert torch.equal(first(loss, model), second(loss, model))


def test_scalar_ema_is_alf_bias_corrected_average() -> None:
    ema, reference = ScalarEMA(0.1, F64), Ema(0.1)
    values = [3.0, -1.0, 4.0, 1.5, 9.0]
    for v in values:
        assert ema(torch.tensor(v, dtype=F64)).item() == pytest.approx(reference(v), rel=1e-14)
    assert ScalarEMA(0.1)(torch.tensor(5.0)).item() == pytest.approx(5.0)  # no bias towards 0 at the first value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "fast"}, "mode"),
        ({"mode": "paper", "batch_size_ratio": 0.5}, "batch_size_ratio"),
        ({"mode": "paper", "batch_size_ratio": 0.0}, "batch_size_ratio"),
        ({"update_rate": 0.0}, "update_rate"),
        ({"update_rate": 1.5}, "update_rate"),
        ({"gradient_norm_clip": 0.0}, "gradient_norm_clip"),
    ],
)
def test_invalid_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoiseScaleEstimator(**kwargs)


def test_alternative_mode_ignores_the_ratio_and_needs_an_even_batch() -> None:
    estimator = GradientNoiseScaleEstimator(batch_size_ratio=0.9)
    assert estimator.split(10) == (5, 5)
    model, x, y = _tiny()
    with pytest.raises(ValueError, match="even"):
        estimator(((model(x[:15]) - y[:15]) ** 2).squeeze(1), model)


def test_paper_mode_refuses_batches_whose_parts_would_be_equal() -> None:
    # ALF divides by B - b = 0 for a batch of 2.
    estimator = GradientNoiseScaleEstimator(mode="paper", batch_size_ratio=0.4)
    assert estimator.split(10) == (4, 6)
    with pytest.raises(ValueError, match="too small"):
        estimator.split(2)


def test_loss_must_be_one_or_two_dimensional() -> None:
    model, x, y = _tiny()
    with pytest.raises(ValueError, match="shape"):
        GradientNoiseScaleEstimator()(((model(x) - y) ** 2).reshape(2, 2, 4), model)


def test_a_tensor_the_loss_does_not_use_counts_as_a_zero_gradient() -> None:
    # ALF's torch.autograd.grad call raises for it; gradstep measures it as zero (it adds nothing to any norm).
    model, x, y = _tiny()
    unused = nn.Parameter(torch.ones(5, dtype=F64))
    values = []
    for tensors in ([model.weight, model.bias], [model.weight, unused, model.bias]):
        estimator = GradientNoiseScaleEstimator(update_rate=0.5, generator=torch.Generator().manual_seed(2), dtype=F64)
        values.append([estimator(((model(x) - y) ** 2).squeeze(1), tensors).item() for _ in range(3)])
    assert values[0] == values[1] and values[0][-1] > 0

"""TrustedUpdater (ALF, spec A.6) against a float64 transcription of ALF's loop, plus behaviour around an optimizer.

:class:`AlfTrustedUpdater` is ALF's ``adjust_step`` written literally (Python floats for the ratio, the compounding
shrink ``v <- prev + (0.9/ratio)(v - prev)``, at most 100 shrinks and ALF's ``assert steps < 100``). gradstep's
updater must give the same variables, initial change and shrink count on random nonlinear problems. One ALF
behaviour is not reproduced (spec A.6 [QUIRK]): a change that first drops within its limit on exactly the 100th shrink
fails ALF's assertion; gradstep accepts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradstep.tools.trusted import TrustedUpdater

NAN = float("nan")


# --- ALF, literally ---------------------------------------------------------------------------------------------------
def _leaves(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [leaf for k in sorted(x) for leaf in _leaves(x[k])]
    if isinstance(x, (list, tuple)):
        return [leaf for item in x for leaf in _leaves(item)]
    return [x]


class AlfTrustedUpdater:
    def __init__(self, variables: list[Tensor], shrink: float = 0.9) -> None:
        assert len(variables) > 0
        self.variables = variables
        self.prev = [v.detach().clone() for v in variables]
        self.shrink = shrink

    @staticmethod
    def ratio(change: Any, max_change: Any) -> float:
        # tf.nest.map_structure(lambda c, m: |c| / m) then max over the flattened leaves
        return max(abs(float(c)) / float(m) for c, m in zip(_leaves(change), _leaves(max_change)))

    @torch.no_grad()
    def adjust_step(self, change_f: Callable[[], Any], max_change: Any) -> tuple[Any, int]:
        steps = 0
        change0 = change_f()
        ratio = self.ratio(change0, max_change)
        while ratio > 1.0 and steps < 100:
            r = self.shrink / ratio
            for v, prev in zip(self.variables, self.prev):
                v.copy_(prev + r * (v - prev))
            ratio = self.ratio(change_f(), max_change)
            steps += 1
        assert steps < 100, "change cannot be reduced"
        for v, prev in zip(self.variables, self.prev):
            prev.copy_(v)
        return change0, steps


# --- problems ---------------------------------------------------------------------------------------------------------
def _problem(seed: int) -> tuple[list[Tensor], Callable[[list[Tensor]], Callable[[], Any]], Any]:
    """Two float64 tensors, a step, and a nest of nonlinear changes (relative to the pre-step values)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    a += 2.0 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
    b += 2.0 * torch.randn(b.shape, generator=gen, dtype=torch.float64)
    limits = {
        "exp": 0.05 + torch.rand((), generator=gen).item(),
        "root": 0.2 + 0.2 * torch.rand((), generator=gen).item(),
        "pair": [0.5, torch.tensor(0.3)],
    }

    def change_of(vs: list[Tensor]) -> Callable[[], Any]:
        def change_f() -> Any:
            x, y = vs
            return {
                "exp": torch.exp(0.3 * x).sum() - torch.exp(0.3 * a0).sum(),
                # sub-linear in the step size: one shrink by 0.9/ratio is not enough
                "root": torch.sqrt(torch.linalg.vector_norm(torch.cat([(x - a0).reshape(-1), y - b0]))),
                "pair": [float((x - a0).pow(2).sum()), torch.tanh(y).sum() - torch.tanh(b0).sum()],
            }

        return change_f

    return [a0, b0, a, b], change_of, limits


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shrink", [0.9, 0.5])
def test_adjust_step_matches_alf_reference(seed: int, shrink: float) -> None:
    (a0, b0, a, b), change_of, limits = _problem(seed)
    ours, ref = [a0.clone(), b0.clone()], [a0.clone(), b0.clone()]
    updater, alf = TrustedUpdater(ours, shrink=shrink), AlfTrustedUpdater(ref, shrink=shrink)
    for v in (ours, ref):  # the "optimizer step"
        v[0].copy_(a)
        v[1].copy_(b)
    change0, steps = updater.adjust_step(change_of(ours), limits)
    alf_change0, alf_steps = alf.adjust_step(change_of(ref), limits)
    assert steps == alf_steps
    assert [float(c) for c in _leaves(change0)] == pytest.approx([float(c) for c in _leaves(alf_change0)], rel=1e-15)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)
    # every change is now within its limit, and the step was kept along its own direction
    assert AlfTrustedUpdater.ratio(change_of(ours)(), limits) <= 1.0
    if steps:
        factor = float((ours[1] - b0).norm() / (b - b0).norm())
        assert 0 < factor < 1
        torch.testing.assert_close(ours[0] - a0, factor * (a - a0), rtol=1e-12, atol=1e-14)


def test_reference_problems_exercise_compounding_shrinks() -> None:
    # The comparison above proves little if no problem needs more than one shrink.
    counts = []
    for seed in range(8):
        (a0, b0, a, b), change_of, limits = _problem(seed)
        alf = AlfTrustedUpdater([a0.clone(), b0.clone()])
        alf.variables = [a.clone(), b.clone()]
        counts.append(alf.adjust_step(change_of(alf.variables), limits)[1])
    assert max(counts) >= 2, counts


def test_alf_unit_test_example() -> None:
    # ALF's trusted_updater_test: v1 = [1, 2] + 1, v2 = ones(8) + 1; changes (2, 8), limits (1, 2): ratio 4, one shrink.
    v1 = nn.Parameter(torch.tensor([1.0, 2.0]))
    v2 = nn.Parameter(torch.ones(8))
    updater = TrustedUpdater([v1, v2])
    old1, old2 = v1.sum().item(), v2.sum().item()
    with torch.no_grad():
        v1.add_(1.0)
        v2.add_(1.0)

    def change_f() -> tuple[Tensor, Tensor]:
        return v1.sum() - old1, v2.sum() - old2

    changes, steps = updater.adjust_step(change_f, (1.0, 2.0))
    assert (changes[0].item(), changes[1].item(), steps) == (2.0, 8.0, 1)
    assert v1.tolist() == pytest.approx([1.225, 2.225]) and v2.tolist() == pytest.approx([1.225] * 8)
    after = change_f()
    assert after[0].item() < 1.0 and after[1].item() < 2.0

    with pytest.raises(RuntimeError, match="cannot be reduced"):
        updater.adjust_step(lambda: (torch.tensor(8.0), torch.tensor(8.0)), (1.0, 2.0))


def test_no_shrink_when_within_limits_and_backup_moves_forward() -> None:
    v = torch.zeros(3, dtype=torch.float64)
    updater = TrustedUpdater([v])
    v += 1.0
    change0, steps = updater.adjust_step(lambda: float(v.sum()), 5.0)
    assert (change0, steps) == (3.0, 0) and torch.equal(v, torch.ones(3, dtype=torch.float64))
    # The backup is now ones: a second step of +2 is shrunk towards ones, not towards zeros.
    v += 2.0
    _, steps = updater.adjust_step(lambda: float((v - 1).sum()), 3.0)  # change 6 > 3: ratio 2
    assert steps == 1
    torch.testing.assert_close(v, torch.full((3,), 1.0 + 0.45 * 2.0, dtype=torch.float64), rtol=1e-15, atol=0)


def test_exactly_100_shrinks_succeed_unlike_alf() -> None:
    # A scripted change: too big for the first 100 evaluations (the initial one and 99 after shrinks), fine after the
    # 100th shrink. ALF's loop stops at 100 and then fails its assertion `steps < 100`.
    def scripted() -> Callable[[], float]:
        calls = iter([2.0] * 100 + [0.5])
        return lambda: next(calls)

    ours = TrustedUpdater([torch.ones(2)])
    change0, steps = ours.adjust_step(scripted(), 1.0)
    assert (change0, steps) == (2.0, 100)
    with pytest.raises(AssertionError):
        AlfTrustedUpdater([torch.ones(2)]).adjust_step(scripted(), 1.0)


def test_failure_leaves_backup_unrefreshed() -> None:
    v = torch.zeros(2, dtype=torch.float64)
    updater = TrustedUpdater([v], max_shrinks=5)
    v += 4.0
    with pytest.raises(RuntimeError, match="after 5 shrinks"):
        updater.adjust_step(lambda: 10.0, 1.0)
    shrunk = v.clone()
    torch.testing.assert_close(shrunk, torch.full((2,), 4.0 * 0.09**5, dtype=torch.float64), rtol=1e-14, atol=0)
    # The next call still shrinks towards the old backup (zeros).
    _, steps = updater.adjust_step(lambda: float(v.sum()) / shrunk[0].item(), 1.0)  # ratio 2 on the first call
    assert steps == 1
    torch.testing.assert_close(v, shrunk * 0.45, rtol=1e-15, atol=0)


def test_scalar_max_change_applies_to_every_leaf() -> None:
    v = torch.zeros(4, dtype=torch.float64)
    updater = TrustedUpdater([v])
    v += torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    change0, steps = updater.adjust_step(lambda: {"a": v[0], "b": [v[1], (v[3],)]}, 2.0)
    assert steps == 1  # worst leaf 4/2 = 2
    torch.testing.assert_close(v, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) * 0.45, rtol=1e-15, atol=0)
    # The initial change is returned as it was, although its leaves here are views of the shrunk variable.
    assert (change0["a"].item(), change0["b"][0].item(), change0["b"][1][0].item()) == (1.0, 2.0, 4.0)


@pytest.mark.parametrize(
    ("change", "limit", "error", "match"),
    [
        (NAN, 1.0, ValueError, "NaN"),
        ((1.0, 2.0), (1.0,), ValueError, "structure"),
        ({"a": 1.0}, {"b": 1.0}, ValueError, "structure"),
        (1.0, (1.0, 1.0), ValueError, "nest"),
        (1.0, 0.0, ValueError, "> 0"),
        (1.0, -1.0, ValueError, "> 0"),
        (torch.ones(2), 1.0, ValueError, "scalar"),
        ("big", 1.0, TypeError, "number"),
    ],
)
def test_bad_changes_and_limits_are_refused_before_anything_moves(change, limit, error, match: str) -> None:
    v = torch.zeros(2)
    updater = TrustedUpdater([v])
    v += 5.0
    with pytest.raises(error, match=match):
        updater.adjust_step(lambda: change, limit)
    assert torch.equal(v, torch.full((2,), 5.0))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TrustedUpdater([])
    with pytest.raises(ValueError, match="shrink"):
        TrustedUpdater([torch.ones(1)], shrink=1.0)
    with pytest.raises(ValueError, match="max_shrinks"):
        TrustedUpdater([torch.ones(1)], max_shrinks=0)


def test_bounds_the_kl_of_a_softmax_policy_after_an_adam_step() -> None:
    torch.manual_seed(0)
    policy = nn.Linear(5, 4).double()
    obs = torch.randn(32, 5, dtype=torch.float64)
    actions = torch.randint(0, 4, (32,))
    advantages = torch.randn(32, dtype=torch.float64)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.3)
    updater = TrustedUpdater(policy.parameters())
    max_kl = 0.01
    shrunk_steps = 0
    for _ in range(5):
        old_logp = torch.log_softmax(policy(obs), -1).detach()
        before = [p.detach().clone() for p in policy.parameters()]
        loss = -(torch.log_softmax(policy(obs), -1)[torch.arange(32), actions] * advantages).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        full = [p.detach() - b for p, b in zip(policy.parameters(), before)]

        def kl(old_logp: Tensor = old_logp) -> Tensor:
            new_logp = torch.log_softmax(policy(obs), -1)
            return (old_logp.exp() * (old_logp - new_logp)).sum(-1).mean()

        with torch.no_grad():
            kl0, shrinks = updater.adjust_step(kl, max_kl)
            assert kl().item() <= max_kl
        shrunk_steps += shrinks > 0
        if shrinks:
            assert kl0.item() > max_kl
            kept = [p.detach() - b for p, b in zip(policy.parameters(), before)]
            factor = float(kept[0].norm() / full[0].norm())
            assert 0 < factor < 1
            for k, f in zip(kept, full):
                torch.testing.assert_close(k, factor * f, rtol=1e-10, atol=1e-13)
    assert shrunk_steps >= 3  # lr 0.3 is far too big for this KL budget: the updater had work to do
    assert math.isfinite(loss.item())

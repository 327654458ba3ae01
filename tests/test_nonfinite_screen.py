"""The gradient screen of the non-finite policy: exact flags from the quick multi-tensor pass, one decision per step."""

from __future__ import annotations

import pytest
import torch

import gradstep
from gradstep import NonFiniteError
from gradstep.core.nonfinite import finite_flags, first_nonfinite

BAD = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", [0, 17, 1022, 1023])  # first, inside a vector lane, the tail (or first again)
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("size", [1023, 5001])  # screened with the other small tensors, or alone
def test_flags_find_one_bad_element_anywhere(dtype: torch.dtype, where: int, value: float, size: int) -> None:
    xs = [torch.randn(1023).to(dtype), torch.randn(size).to(dtype), torch.randn(6000).to(dtype)]
    xs += [torch.randn(4, 5).to(dtype)]
    xs[1][where % size] = value
    assert finite_flags(xs).tolist() == [True, False, True, True]
    assert first_nonfinite(xs) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_finite_gradients_are_finite(dtype: torch.dtype) -> None:
    # Their sums overflow: the quick pass finds them infinite, the exact re-read must clear them.
    big = torch.finfo(dtype).max
    xs = [
        torch.full((2,), big, dtype=dtype),
        torch.full((1000,), float(big) / 4, dtype=dtype),
        torch.ones(3, dtype=dtype),
    ]
    assert finite_flags(xs).tolist() == [True, True, True]
    assert first_nonfinite(xs) is None
    xs[1][999] = float("nan")
    assert finite_flags(xs).tolist() == [True, False, True]


def test_half_precision_norms_do_not_overflow_into_a_reread(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1e5 fp16 elements of 100: an fp16 sum (1e7) would overflow; the screen's float32 sum does not.
    calls: list[int] = []
    original = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x: calls.append(1) or original(x))
    xs = [torch.full((100_000,), 100.0, dtype=torch.float16)]
    assert finite_flags(xs).tolist() == [True]
    assert calls == []


def test_mixed_dtypes_and_empty_tensors_keep_their_order() -> None:
    xs = [torch.ones(3), torch.ones(0), torch.ones(2, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
    xs[2][1] = float("inf")
    assert finite_flags(xs).tolist() == [True, True, False, True]
    assert first_nonfinite(xs) == 2
    assert finite_flags([]).tolist() == []


def test_the_screen_reads_the_gradients_without_writing_them() -> None:
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.randn(8)
    before = (p.grad._version, p.grad.clone())
    gradstep.AdamW([p], lr=0.1).step()
    assert p.grad._version == before[0] and torch.equal(p.grad, before[1])


def _two_groups(first: str, second: str, bad: int | None) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    for i, p in enumerate(ps):
        p.grad = torch.full((3,), float("nan") if i == bad else 1.0)
    groups = [{"params": ps[:2], "nonfinite": first}, {"params": ps[2:], "nonfinite": second}]
    return gradstep.AdamW(groups, lr=0.1), ps


@pytest.mark.parametrize(
    ("first", "second", "bad", "outcome"),
    [
        ("skip", "error", 1, "skip"),  # the first group holding a bad gradient decides, by its own policy
        ("error", "skip", 3, "skip"),
        ("skip", "error", 3, "raise"),
        ("error", "error", 2, "raise"),
        ("ignore", "error", 0, "step"),  # an unscreened group's gradients are not read
        ("skip", "skip", None, "step"),
    ],
)
def test_one_decision_for_all_groups(first: str, second: str, bad: int | None, outcome: str) -> None:
    opt, ps = _two_groups(first, second, bad)
    if outcome == "raise":
        with pytest.raises(NonFiniteError, match=rf"param_groups\[1\]\['params'\]\[{bad - 2}\]"):  # type: ignore[operator]
            opt.step()
    else:
        opt.step()
    moved = [not torch.equal(p.detach(), torch.ones(3)) for p in ps]
    if outcome == "step":
        assert moved[1:] == [True] * 3 and opt.skipped_steps == 0 and opt.global_step == 1
    else:
        assert moved == [False] * 4 and opt.global_step == 0
        assert all(not state for state in opt.state_dict()["state"].values())  # no buffer, no step count
        assert opt.skipped_steps == (1 if outcome == "skip" else 0)

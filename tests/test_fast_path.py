"""The fast path (``compiled=True``): numerics against the per-tensor reference, and no recompiles under schedulers.

Every registered optimizer that accepts ``compiled`` runs 100 steps on the compiled path and on the plain per-tensor
reference path (``foreach=False``) from the same start with the same gradients. In float64 they agree to 1e-9: the
same math. In float32 inductor's fused kernels round differently (reordered arithmetic), and momentum amplifies that
over 100 steps to ~1e-4 on these dynamics, so float32 is held to 1e-3 on a representative set.

Schedulers that change lr, betas and momentum every step must not make ``torch.compile`` build a second graph.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import gradstep
from gradstep.core.optimizer import _vectorised_codegen
from gradstep.core.registry import Entry, entries

SHAPES = [(12, 10), (10,), (2, 3, 4), ()]
STEPS = 100


def _compilable(entry: Entry) -> bool:
    # Sparse gradients are stepped eagerly per tensor, as torch does: a sparse-only optimizer has no compiled path.
    return "compiled" in entry.hyperparameters() and not entry.capabilities.sparse_only


def _params(dtype: torch.dtype = torch.float32, min_ndim: int = 0) -> list[torch.nn.Parameter]:
    # A matrix optimizer (Entry.min_ndim = 2) gets (10, 1) for (10,) and (1, 1) for ().
    shapes = [s + (1,) * (min_ndim - len(s)) for s in SHAPES]
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _run(entry: Entry, steps: int, dtype: torch.dtype = torch.float32, **hypers: Any) -> list[torch.Tensor]:
    params = _params(dtype, entry.min_ndim)
    opt = entry(params, **{**entry.example, **hypers})
    for t in range(steps):
        torch.manual_seed(t)  # optimizers that draw random numbers draw the same ones on both paths
        for i, p in enumerate(params):
            p.grad = torch.sin(3 * p.detach() + t + i) + 0.3 * p.detach()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _assert_close(fast: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float) -> None:
    for i, (a, b) in enumerate(zip(fast, reference)):
        assert torch.isfinite(a).all(), f"parameter {i} is not finite on the fast path"
        scale = max(b.abs().max().item(), 1e-6)
        diff = (a - b).abs().max().item() / scale
        assert diff <= tolerance, f"parameter {i}: fast path differs from the reference by {diff:.2e} (relative)"
    assert counters["stats"]["unique_graphs"] >= 1, "the fast path did not compile anything"


@pytest.mark.parametrize("entry", [e for e in entries() if _compilable(e)], ids=lambda e: e.name)
def test_fast_path_equals_reference_path_float64(entry: Entry) -> None:
    fast = _run(entry, STEPS, torch.float64, compiled=True)
    _assert_close(fast, _run(entry, STEPS, torch.float64, foreach=False), 1e-9)


FLOAT32_SET = ["adamw", "sgd", "rmsprop", "lamb", "adan", "neroplus", "adamp", "l2_projected"]


@pytest.mark.parametrize("name", FLOAT32_SET)
def test_fast_path_float32_tracks_reference_path(name: str) -> None:
    entry = gradstep.get(name)
    fast = _run(entry, STEPS, compiled=True)
    _assert_close(fast, _run(entry, STEPS, foreach=False), 1e-3)


def _graphs_over(make_scheduler: Any, name: str, steps: int = 30, **hypers: Any) -> int:
    params = _params()
    opt = gradstep.create(name, params, compiled=True, **hypers)
    scheduler = make_scheduler(opt)
    for t in range(steps):
        for p in params:
            p.grad = torch.cos(p.detach() + t)
        opt.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a loss that never improves: lr drops every `patience` steps
        else:
            scheduler.step()
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize(
    "name, hypers", [("adamw", {}), ("sgd", {"momentum": 0.9}), ("rmsprop", {"momentum": 0.5}), ("lamb", {})]
)
def test_one_cycle_lr_never_recompiles(name: str, hypers: dict[str, Any]) -> None:
    def one_cycle(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=31, cycle_momentum=True)

    lrs_seen = _graphs_over(one_cycle, name, **hypers)
    assert lrs_seen == 1, f"{name} compiled {lrs_seen} graphs while OneCycleLR changed lr and momentum/betas"


def test_reduce_lr_on_plateau_and_weight_decay_changes_never_recompile() -> None:
    def plateau(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5)

    params = _params()
    opt = gradstep.AdamW(params, compiled=True)
    scheduler = plateau(opt)
    lrs = set()
    for t in range(20):
        for p in params:
            p.grad = torch.cos(p.detach() + t)
        opt.step()
        scheduler.step(1.0)
        opt.param_groups[0]["weight_decay"] = 0.01 * (1 + t % 3)  # a hand-made weight-decay schedule
        lrs.add(opt.param_groups[0]["lr"])
    assert len(lrs) > 3, "the plateau scheduler did not change lr: the test would prove nothing"
    assert counters["stats"]["unique_graphs"] == 1


def test_fast_path_state_dict_round_trip_resumes_identically() -> None:
    def run(split: int | None) -> list[torch.Tensor]:
        params = _params()
        opt = gradstep.Adam(params, lr=1e-2, compiled=True)
        for t in range(10):
            if t == split:
                state = opt.state_dict()
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = gradstep.Adam(params, lr=1e-2, compiled=True)
                opt.load_state_dict(state)
            for p in params:
                p.grad = torch.sin(p.detach() * (t + 1))
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(None), run(5)):
        assert torch.equal(a, b)


def test_fast_path_first_step_creates_the_same_state_as_eager() -> None:
    a, b = _params(), _params()
    fast, eager = gradstep.Adam(a, amsgrad=True, compiled=True), gradstep.Adam(b, amsgrad=True)
    for ps in (a, b):
        for p in ps:
            p.grad = torch.ones_like(p)
    fast.step()
    eager.step()
    for pa, pb in zip(a, b):
        assert fast.state[pa].keys() == eager.state[pb].keys()
        for key in eager.state[pb]:
            assert fast.state[pa][key].dtype == eager.state[pb][key].dtype
            assert torch.allclose(fast.state[pa][key], eager.state[pb][key], rtol=1e-6, atol=1e-7)
    assert math.isclose(float(fast.state[a[0]]["step"]), 1.0)


def test_many_optimizers_and_groups_all_stay_compiled() -> None:
    # Dynamo allows 8 recompilations per code object; each group must have its own, or later ones run eagerly.
    opts, params = [], []
    for i in range(10):
        p = torch.nn.Parameter(torch.randn(i + 2, 3))
        params.append(p)
        opts.append(gradstep.SGD([p], lr=0.1, momentum=0.9, compiled=True))
    for p, opt in zip(params, opts):
        p.grad = torch.ones_like(p)
        opt.step()
    assert counters["stats"]["unique_graphs"] >= len(opts), "some optimizers fell back to eager"


def test_compiled_graphs_do_not_grow_with_the_number_of_tensors() -> None:
    # An element-wise chain is stepped in buckets of flattened tensors with symbolic lengths: the graph compiled for
    # 40 tensors of distinct shapes is the one for 8 (one graph specialised to every shape would trace, and compile,
    # work growing with the number of tensors).
    def compile_work(count: int) -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        gen = torch.Generator().manual_seed(count)
        shapes = [(i + 2, 3) if i % 2 else (5 * i + 2,) for i in range(count)] + [(), (4, 5)]
        fast = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        fast[-1] = torch.nn.Parameter(fast[-1].detach().t())  # non-contiguous: stepped apart
        eager = [torch.nn.Parameter(p.detach().clone()) for p in fast]
        opts = [
            gradstep.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw) for ps, kw in ((fast, {"compiled": True}), (eager, {}))
        ]
        for t in range(3):
            for ps, opt in zip((fast, eager), opts):
                for i, p in enumerate(ps):
                    p.grad = torch.sin(3 * p.detach() + t + i)
                opt.step()
        for a, b in zip(fast, eager):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for pa, pb in zip(fast, eager):
            for key, value in opts[1].state[pb].items():
                assert opts[0].state[pa][key].shape == value.shape
                torch.testing.assert_close(opts[0].state[pa][key], value, rtol=1e-12, atol=1e-12)
        return int(counters["stats"]["unique_graphs"]), int(counters["stats"]["calls_captured"])

    (few_graphs, few_ops), (many_graphs, many_ops) = compile_work(8), compile_work(40)
    assert few_graphs == many_graphs == 1, f"{few_graphs} graphs for 8 tensors, {many_graphs} for 40"
    if not _vectorised_codegen(torch.device("cpu")):
        # No vector instruction set for inductor (ATEN_CPU_CAPABILITY=default): one graph per group, specialised.
        assert many_ops > few_ops
        return
    assert 0 < many_ops <= few_ops, f"{few_ops} operations traced for 8 tensors, {many_ops} for 40"

"""PSGDKron against heavyball 3.2.1's PSGDKron, and against a float64 transcription of Li's Kronecker-factor update.

Both sides draw their random probes alike: heavyball's ``dampen_grad`` (its only use of torch's global RNG on this
path) is replaced by the same draw as gradstep's, from a ``torch.Generator`` seeded by ``draw_seed`` with gradstep's
seed, the shape of the stacked draw (same-shape parameters stacked, one draw per stack) and the draw's number.
Everything else of heavyball runs as installed (eager: ``heavyball.utils.compile_mode = None``), in float64
(``q_dtype``, ``storage_dtype``), but for the float32 debiasing weight (see ``_eager_heavyball``).
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Iterator
from typing import Any

import heavyball
import heavyball.utils as hb_utils
import pytest
import torch
from torch import Tensor

import gradstep
from example_helpers import one_torch_thread  # noqa: F401  (one_torch_thread: a fixture)
from gradstep.optim.psgd import (
    KronPreconditioner,
    draw_seed,
    max_eigenvalue,
    stream_key,
    triangular_dims,
    update_factors,
)
from parity import gradient, make_params, relative_difference, split_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: two threads only fight

SHAPES = ((), (7,), (2, 3, 4, 5), (3, 4), (3, 40), (3, 4), (5, 1, 3), (6, 4))
STEPS = 200


def _float64_debias(beta: Any, step: Any) -> Any:
    return 1 - (1 - beta) / (1 - beta ** float(step))


@pytest.fixture(autouse=True)
def _eager_heavyball(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(hb_utils, "compile_mode", None)
    # heavyball computes the debiased momentum weight in float32 (a float raised to its int64 step tensor gives
    # torch's default dtype), which alone moves a float64 run by ~1e-7 per step; gradstep computes it in float64.
    monkeypatch.setattr(hb_utils, "beta_debias", _float64_debias)
    yield


def _seeded_probes(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    draws: dict[str, int] = {}

    def dampen_grad(g: Tensor, damp: float = 1e-9) -> tuple[Tensor, Tensor]:
        # Seeded as gradstep's: the shape of the stacked draw and its number (every parameter of a shape is updated
        # at the same steps here, so heavyball's n-th draw of a shape is gradstep's draw number n).
        key = stream_key(g.device, g.shape)
        draws[key] = draws.get(key, 0) + 1
        gen = torch.Generator().manual_seed(draw_seed(seed, key.split("|")[1], draws[key]))
        v = torch.randn(g.shape, generator=gen, dtype=g.dtype, device=g.device)
        return v, g + (damp + torch.finfo(torch.float32).eps * g.abs()) * v

    monkeypatch.setattr(hb_utils, "dampen_grad", dampen_grad)


def _heavyball_state(opt: Any, p: Tensor) -> dict[str, Any]:
    """heavyball's state of ``p`` in gradstep's names: exp_avg, Q_i (full matrices), running_lower_bound_i."""
    (inner,) = opt.state[p].values()
    out: dict[str, Any] = {}
    for key, value in inner.items():
        if re.fullmatch(r"exp_avg_exp_avg_\d+", key):
            out["exp_avg"] = value
        elif re.fullmatch(r"(scale|update)_by_psgd_Q_\d+", key):
            for i, q in enumerate(hb_utils.line_to_triu(value)):
                out[f"Q_{i}"] = q[0]
        elif re.fullmatch(r"(scale|update)_by_psgd_running_lower_bound_\d+", key):
            for i, b in enumerate(value):
                out[f"running_lower_bound_{i}"] = b[0]
    return out


# Learning rates are powers of two: heavyball multiplies lr by its int64 step tensor, which rounds it to float32.
CONFIGS = {
    "alternate-updates": (
        {"preconditioner_update_probability": 0.5},
        {"lr": 2**-7},
        {"lr": 2**-6},
    ),
    "decayed-schedule-one_diag": (
        {
            "preconditioner_update_probability": (1.0, 0.1, 0.9, 20),
            "memory_save_mode": "one_diag",
            "precond_init_scale": 0.5,
        },
        {"lr": 2**-6, "beta": 0.8, "weight_decay": 0.1, "precond_lr": 0.3},
        {"lr": 2**-7, "beta": 0.95, "weight_decay": 0.0, "precond_lr": 0.05},
    ),
    "gradient-fit-smart_one_diag": (
        {
            "momentum_into_precond_update": False,
            "memory_save_mode": "smart_one_diag",
            "max_size_triangular": 4,
            "lower_bound_beta": 0.5,
            "dampening": 1e-4,
            "precond_update_power_iterations": 4,
            "precond_init_scale_scale": 2.0,
            "precond_init_scale_power": 0.3,
        },
        {"lr": 2**-7},
        {"lr": 2**-8, "weight_decay": 0.05},
    ),
    "one_triu-no-clip": (
        {"memory_save_mode": "one_triu", "update_clipping": None, "min_ndim_triangular": 3},
        {"lr": 3 * 2**-10},
        {"lr": 2**-8},
    ),
}

# heavyball's names where they differ (its schedule is a function; its clipping is a function or None)
GROUP_KEYS = ("lr", "beta", "weight_decay", "precond_lr")


def _build_pair(groups_hb: list[list[Tensor]], groups_gs: list[list[Tensor]], config: tuple[dict, dict, dict]) -> Any:
    common, g0, g1 = config
    hb_kwargs = {k: v for k, v in common.items() if k not in ("preconditioner_update_probability", "update_clipping")}
    schedule = common.get("preconditioner_update_probability")
    if isinstance(schedule, tuple):
        schedule = hb_utils.precond_update_prob_schedule(*schedule)
    if schedule is not None:
        hb_kwargs["preconditioner_update_probability"] = schedule
    if "update_clipping" in common:
        hb_kwargs["update_clipping"] = common["update_clipping"]
    hb = heavyball.PSGDKron(
        [{"params": g, **h} for g, h in zip(groups_hb, (g0, g1))],
        q_dtype="float64",
        storage_dtype="float64",
        **hb_kwargs,
    )
    gs = gradstep.PSGDKron([{"params": g, **h} for g, h in zip(groups_gs, (g0, g1))], seed=7, **common)
    return hb, gs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_heavyball(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _seeded_probes(monkeypatch, 7)
    hb_params, gs_params = make_params(SHAPES), make_params(SHAPES)
    initial = [p.detach().clone() for p in gs_params]
    hb_opt, gs_opt = _build_pair(split_groups(hb_params), split_groups(gs_params), CONFIGS[name])
    worst: dict[str, float] = {}
    for t in range(1, STEPS + 1):
        for params, opt in ((hb_params, hb_opt), (gs_params, gs_opt)):
            for i, p in enumerate(params):
                p.grad = gradient(p.detach(), t, i)
            opt.step()
        for i, (a, b) in enumerate(zip(hb_params, gs_params)):
            worst[f"param {i} {SHAPES[i]}"] = max(worst.get(f"param {i} {SHAPES[i]}", 0.0), relative_difference(a, b))
            if t <= 3 or t % 10 == 0:
                ref_state, mine = _heavyball_state(hb_opt, a), gs_opt.state[b]
                assert {k for k in mine if mine[k] is not None and k != "step"} == set(ref_state)
                for key, value in ref_state.items():
                    worst[f"{i} {key}"] = max(worst.get(f"{i} {key}", 0.0), relative_difference(value, mine[key]))
    assert max(worst.values()) <= 1e-6, {k: v for k, v in worst.items() if v > 1e-6}
    moved = [relative_difference(p, p0) for p, p0 in zip(gs_params, initial)]
    assert min(moved) > 1e-3, moved
    print(f"{name}: max relative difference {max(worst.values()):.2e}")


def test_diagonal_factor_for_a_large_dimension() -> None:
    assert triangular_dims((3, 40), 32, 2, None) == [True, False]
    assert triangular_dims((3, 40), 2048, 2, "one_diag") == [True, False]
    assert triangular_dims((4, 4), 2048, 2, "smart_one_diag") == [True, True]
    assert triangular_dims((5, 2, 3), 2048, 2, "one_triu") == [False, True, False]
    assert triangular_dims((7,), 2048, 2, None) == [False]
    w = torch.nn.Parameter(torch.ones(3, 40))
    opt = gradstep.PSGDKron([w], max_size_triangular=32)
    w.grad = torch.ones(3, 40)
    opt.step()
    assert opt.state[w]["Q_0"].shape == (3, 3) and opt.state[w]["Q_1"].shape == (40,)


@pytest.mark.parametrize("schedule", [None, 0.3, (1.0, 0.2, 0.8, 3)], ids=str)
def test_update_schedule_is_heavyballs(schedule: Any) -> None:
    if isinstance(schedule, tuple):
        reference: Any = hb_utils.precond_update_prob_schedule(*schedule)
    else:
        reference = schedule if schedule is not None else hb_utils.precond_update_prob_schedule()
    counter: dict[str, Any] = {}
    expected = [hb_utils.psgd_should_update(counter, reference) for _ in range(1500)]
    kron = KronPreconditioner()
    assert [kron.due(schedule, t) for t in range(1, 1501)] == expected
    # groups at other step counts (one added 500 steps later) read the same schedule, each at its own count
    mixed = KronPreconditioner()
    assert [(mixed.due(schedule, t), mixed.due(schedule, max(1, t - 500)))[0] for t in range(1, 1501)] == expected


# --- a float64 transcription of the factor update (Li's psgd_torch, with heavyball's lower bound) ---------------
def _reference_update(qs: list[Tensor], bounds: list[float], h: Tensor, v: Tensor, lr: float, beta: float) -> None:
    """One matrix ``h`` (d1 x d2), factors ``qs`` (triangular matrices), written plainly with explicit inverses."""
    q1, q2 = qs
    a = q1 @ h @ q2.T  # Q h for Q = Q1 (x) Q2 acting on the matrix as Q1 h Q2^T
    conj_b = torch.linalg.inv(q1).T @ v @ torch.linalg.inv(q2)  # Q^{-T} v
    grams = [(a @ a.T, conj_b @ conj_b.T), (a.T @ a, conj_b.T @ conj_b)]
    news = []
    for i, (q, (t1, t2)) in enumerate(zip(qs, grams)):
        ell = float(torch.linalg.eigvalsh(t1 + t2).max())
        ell = max(ell, bounds[i] + (ell - bounds[i]) * (1 - beta))
        bounds[i] = ell
        news.append(q - lr / ell * torch.triu(t1 - t2) @ q)
    qs[:] = news


def test_factor_update_matches_a_float64_transcription() -> None:
    gen = torch.Generator().manual_seed(0)
    q1 = torch.eye(5, dtype=torch.float64) + 0.1 * torch.randn(5, 5, generator=gen, dtype=torch.float64).triu()
    q2 = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64).triu()
    ref_qs, ref_bounds = [q1.clone(), q2.clone()], [0.0, 0.0]
    mine = [q1.clone()[None], q2.clone()[None]]
    mine_bounds = [torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    for _ in range(30):
        h = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        v = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        _reference_update(ref_qs, ref_bounds, h, v, 0.1, 0.9)
        # the power iteration estimates the top eigenvalue: enough iterations make it exact
        update_factors(mine, mine_bounds, h[None], v[None], 0.1, 0.9, 100)
    for ref, got in zip(ref_qs, mine):
        assert relative_difference(ref, got[0]) < 1e-10
    assert relative_difference(torch.tensor(ref_bounds, dtype=torch.float64), torch.cat(mine_bounds)) < 1e-10


def test_power_iteration_bounds_the_top_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    spd = x @ x.mT
    top = torch.linalg.eigvalsh(spd)[:, -1]
    assert torch.allclose(max_eigenvalue(spd, 200), top, rtol=1e-8)
    assert bool((max_eigenvalue(spd, 2) <= top * (1 + 1e-12)).all())


# --- seeding and checkpoints -------------------------------------------------------------------------------------
SMALL = ((), (7,), (3, 4), (2, 3, 4))


def _run(opt: Any, params: list[Tensor], steps: range) -> None:
    for t in steps:
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i)
        opt.step()


def test_same_seed_same_run_other_seed_other_run() -> None:
    runs = []
    for seed in (3, 3, 4):
        params = make_params(SMALL)
        _run(gradstep.PSGDKron(params, lr=0.01, seed=seed), params, range(1, 21))
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_user_generator_is_used() -> None:
    runs, generators = [], []
    for _ in range(2):
        params, gen = make_params(SMALL), torch.Generator().manual_seed(5)
        fresh = gen.get_state()
        _run(gradstep.PSGDKron(params, generator=gen), params, range(1, 6))
        assert not torch.equal(gen.get_state(), fresh)  # the probes came from it
        runs.append(params)
        generators.append(gen)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_state_dict_round_trip_resumes_identically() -> None:
    straight = make_params(SMALL)
    opt = gradstep.PSGDKron(straight, lr=0.01, preconditioner_update_probability=(1.0, 0.2, 0.8, 3))
    _run(opt, straight, range(1, 31))

    first = make_params(SMALL)
    opt1 = gradstep.PSGDKron(first, lr=0.01, preconditioner_update_probability=(1.0, 0.2, 0.8, 3))
    _run(opt1, first, range(1, 16))
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    buffer.seek(0)
    resumed = [p.detach().clone().requires_grad_(True) for p in first]
    opt2 = gradstep.PSGDKron(resumed, lr=0.01, preconditioner_update_probability=(1.0, 0.2, 0.8, 3), seed=99)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    _run(opt2, resumed, range(16, 31))
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert opt2.state_dict()["gradstep"]["probe_seed"] == 0  # the saver's seed, not the constructor's 99
    # a deep copy continues alike too
    twin = copy.deepcopy(opt2)
    twin_params = twin.param_groups[0]["params"]
    _run(opt2, resumed, range(31, 36))
    _run(twin, twin_params, range(31, 36))
    assert all(torch.equal(a, b) for a, b in zip(resumed, twin_params))


def test_refused_generator_state_changes_nothing() -> None:
    params = make_params(SMALL)
    opt = gradstep.PSGDKron(params)
    _run(opt, params, range(1, 3))
    sd = opt.state_dict()
    sd["gradstep"]["probe_generators"] = {"cpu|3x4": "not a state"}
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="probe_generators"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["gradstep"]["probe_seed"] = "7"
    with pytest.raises(ValueError, match="probe_seed"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][k]["exp_avg"], after["state"][k]["exp_avg"]) for k in before["state"])


def test_bad_arguments_name_themselves() -> None:
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(TypeError, match="seed"):
        gradstep.PSGDKron(p, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        gradstep.PSGDKron(p, generator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        gradstep.PSGDKron(p, preconditioner_update_probability=(1.0, 0.5))

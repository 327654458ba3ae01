"""RandomOptimizer and CEMOptimizer (ALF, spec A.5).

ALF cannot run here. Each optimizer is checked against a literal float64 transcription of the spec's math that draws
the same random numbers from an identically seeded ``torch.Generator`` (one ``rand``/``randn`` call of shape
``[B, P, D]`` per iteration, as the spec says) and does everything else with Python floats; and on problems whose
optimum is known in closed form: a shifted quadratic and a one-step planning toy whose best action hits the bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradstep.tools.derivative_free import CEMOptimizer, RandomOptimizer, TrajOptimizer

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Problems


def quadratic_cost(obs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d w_d (x_d - obs_d)^2, batched: obs [B, D], x [B, P, D] -> [B, P]; the optimum is x = obs."""
    w = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    return (w * (x - obs[:, None, :]) ** 2).sum(-1)


def quadratic_cost_scalar(obs: list[float], x: list[float]) -> float:
    return sum((d + 1) * (xd - od) ** 2 for d, (xd, od) in enumerate(zip(x, obs)))


GOAL = torch.tensor([0.5, -0.5], dtype=F64)
ACTION_PENALTY = 0.01


def planning_cost(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """One step of s' = s + a, cost ||s' - goal||^2 + 0.01 ||a||^2."""
    nxt = state[:, None, :] + action
    return ((nxt - GOAL) ** 2).sum(-1) + ACTION_PENALTY * (action**2).sum(-1)


def planning_optimum(state: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # Separable and convex per coordinate: the unconstrained minimiser (goal - s) / (1 + 0.01), clamped.
    return ((GOAL - state) / (1 + ACTION_PENALTY)).clamp(low, high)


# ---------------------------------------------------------------------------------------------------------------------
# Literal references


def random_reference(obs, cost_scalar, dim, population, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = len(obs)
    draws = torch.rand((batch, population, dim), generator=gen, dtype=F64).tolist()
    solutions = []
    for b in range(batch):
        samples = [[draws[b][p][d] * (high[d] - low[d]) + low[d] for d in range(dim)] for p in range(population)]
        costs = [cost_scalar(obs[b], s) for s in samples]
        solutions.append(samples[min(range(population), key=lambda p: costs[p])])
    return solutions


def cem_reference(obs, cost_scalar, dim, population, low, high, seed, *, elites, max_iter, eps, tau, min_var,
                  init_mean=None, init_var=None):  # fmt: skip
    """Spec A.5, step by step. Returns (final mean per observation, iterations run, whether min_var ever bit)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(obs)
    mean = init_mean or [[(high[d] + low[d]) / 2 for d in range(dim)] for _ in range(batch)]
    var = init_var or [[(high[d] - low[d]) / 2 for d in range(dim)] for _ in range(batch)]
    floored = False
    i = 0
    while i < max_iter and max(max(row) for row in var) > eps:
        floored |= min(min(row) for row in var) < min_var
        var = [[max(v, min_var) for v in row] for row in var]
        noise = torch.randn((batch, population, dim), generator=gen, dtype=F64).tolist()
        for b in range(batch):
            samples = [
                [noise[b][p][d] * math.sqrt(var[b][d]) + mean[b][d] for d in range(dim)] for p in range(population)
            ]
            costs = [cost_scalar(obs[b], [min(max(s[d], low[d]), high[d]) for d in range(dim)]) for s in samples]
            order = sorted(range(population), key=lambda p: costs[p])
            # The elite set is only defined when no tie straddles its boundary (topk's order among ties is not).
            assert costs[order[elites - 1]] != costs[order[elites]], "tie at the elite boundary: change the seed"
            best = order[:elites]
            chosen = [samples[p] for p in best]
            for d in range(dim):
                m = sum(e[d] for e in chosen) / elites
                v = sum((e[d] - m) ** 2 for e in chosen) / (elites - 1)
                mean[b][d] = (1 - tau) * mean[b][d] + tau * m
                var[b][d] = (1 - tau) * var[b][d] + tau * v
        i += 1
    return mean, i, floored


def counting(cost):
    calls = []

    def wrapped(obs, x):
        calls.append(x.shape)
        return cost(obs, x)

    return wrapped, calls


# ---------------------------------------------------------------------------------------------------------------------
# RandomOptimizer


def test_random_matches_reference_and_returns_the_cheapest_draw():
    obs = torch.tensor([[0.2, -0.3, 0.9], [1.5, 0.0, -2.0]], dtype=F64)
    low, high = [-1.0, -2.0, -1.0], [1.0, 0.5, 3.0]
    opt = RandomOptimizer(
        3, 50, quadratic_cost, torch.tensor(high, dtype=F64), torch.tensor(low, dtype=F64),
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    x = opt.obtain_solution(obs)
    assert x.shape == (2, 3) and x.dtype == F64
    expected = random_reference(obs.tolist(), quadratic_cost_scalar, 3, 50, low, high, seed=7)
    torch.testing.assert_close(x, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-15)
    assert ((x >= torch.tensor(low, dtype=F64)) & (x < torch.tensor(high, dtype=F64))).all()


def test_random_finds_known_optima_with_a_large_population():
    gen = torch.Generator().manual_seed(0)
    obs = torch.tensor([[0.3, -0.6], [-0.9, 0.9], [0.0, 0.0]], dtype=F64)
    x = RandomOptimizer(2, 4000, quadratic_cost, 1.0, -1.0, generator=gen, dtype=F64).obtain_solution(obs)
    assert (x - obs).abs().max() < 0.1
    state = torch.tensor([[0.0, 0.0], [2.0, -3.0]], dtype=F64)
    a = RandomOptimizer(2, 4000, planning_cost, 1.0, -1.0, generator=gen, dtype=F64).obtain_solution(state)
    assert (a - planning_optimum(state, -1.0, 1.0)).abs().max() < 0.1


def test_random_is_reproducible_with_a_generator_and_with_the_global_seed():
    obs = torch.zeros(4, 2)
    make = lambda gen=None: RandomOptimizer(2, 16, quadratic_cost, 1.0, -1.0, generator=gen)  # noqa: E731
    a = make(torch.Generator().manual_seed(3)).obtain_solution(obs)
    b = make(torch.Generator().manual_seed(3)).obtain_solution(obs)
    assert torch.equal(a, b) and a.dtype == torch.float32
    torch.manual_seed(5)
    c = make().obtain_solution(obs)
    torch.manual_seed(5)
    assert torch.equal(c, make().obtain_solution(obs))


# ---------------------------------------------------------------------------------------------------------------------
# CEMOptimizer against the reference

CEM_CONFIGS = {
    "alf_defaults_small": dict(elites=5, max_iter=5, eps=0.01, tau=0.9, min_var=1e-5),
    "min_var_floor_bites": dict(elites=4, max_iter=8, eps=0.0, tau=0.8, min_var=0.05),
    "slow_soft_update": dict(elites=6, max_iter=30, eps=0.1, tau=0.3, min_var=1e-5),
}


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("name", sorted(CEM_CONFIGS))
def test_cem_matches_float64_reference(name, clamp):
    cfg = CEM_CONFIGS[name]
    # The second optimum is out of bounds in its first coordinate only, so clamped samples never tie.
    obs = torch.tensor([[0.2, -0.3, 0.9], [1.5, 0.0, -0.2]], dtype=F64)
    low, high = [-1.0, -1.0, -1.5], [1.0, 0.5, 1.5]
    cost, calls = counting(quadratic_cost)
    opt = CEMOptimizer(
        3, 24, cost, torch.tensor(high, dtype=F64), torch.tensor(low, dtype=F64),
        elite_size=cfg["elites"], max_iter_num=cfg["max_iter"], epsilon=cfg["eps"], tau=cfg["tau"],
        min_var=cfg["min_var"], clamp_solution=clamp, generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    x = opt.obtain_solution(obs)
    mean, iterations, floored = cem_reference(obs.tolist(), quadratic_cost_scalar, 3, 24, low, high, 11, **cfg)
    expected = torch.tensor(mean, dtype=F64)
    if clamp:
        expected = expected.clamp(torch.tensor(low, dtype=F64), torch.tensor(high, dtype=F64))
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    assert len(calls) == iterations and all(s == (2, 24, 3) for s in calls)
    if name == "min_var_floor_bites":
        assert floored and iterations == 8
    if name == "slow_soft_update":
        assert iterations < 30  # stopped on epsilon


def test_cem_unclamped_mean_leaves_the_bounds_where_alf_does():
    # Costs are read at clamped samples but elites are unclamped: past a bound the mean keeps drifting.
    obs = torch.tensor([[3.0, 0.0]], dtype=F64)
    make = lambda clamp: CEMOptimizer(  # noqa: E731
        2, 32, quadratic_cost, 1.0, -1.0, elite_size=8, max_iter_num=10, epsilon=0.0, clamp_solution=clamp,
        generator=torch.Generator().manual_seed(0), dtype=F64,
    )  # fmt: skip
    raw, clamped = make(False).obtain_solution(obs), make(True).obtain_solution(obs)
    assert raw[0, 0] > 1.0
    torch.testing.assert_close(clamped, raw.clamp(-1.0, 1.0))


def test_cem_init_mean_and_var_are_used():
    obs = torch.tensor([[0.4, 0.1], [-0.2, 0.3]], dtype=F64)
    init_mean = torch.tensor([[[0.3, 0.0]], [[0.0, 0.2]]], dtype=F64)
    init_var = torch.tensor([[[0.05, 0.02]], [[0.1, 0.2]]], dtype=F64)
    opt = CEMOptimizer(
        2, 20, quadratic_cost, 1.0, -1.0, elite_size=5, max_iter_num=3, epsilon=0.0, clamp_solution=False,
        generator=torch.Generator().manual_seed(2), dtype=F64,
    )  # fmt: skip
    x = opt.obtain_solution(obs, init_mean=init_mean, init_var=init_var)
    mean, _, _ = cem_reference(
        obs.tolist(), quadratic_cost_scalar, 2, 20, [-1.0, -1.0], [1.0, 1.0], 2, elites=5, max_iter=3, eps=0.0,
        tau=0.9, min_var=1e-5, init_mean=init_mean.squeeze(1).tolist(), init_var=init_var.squeeze(1).tolist(),
    )  # fmt: skip
    torch.testing.assert_close(x, torch.tensor(mean, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"init_mean must be a tensor shaped \(2, 1, 2\)"):
        opt.obtain_solution(obs, init_mean=init_mean.squeeze(1))
    with pytest.raises(ValueError, match="init_var"):
        opt.obtain_solution(obs, init_var=torch.ones(2, 1, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------------
# Stopping rules


def test_cem_max_iter_num_accepts_a_tensor_read_at_every_search():
    obs = torch.zeros(2, 2)
    cost, calls = counting(quadratic_cost)
    limit = torch.tensor(3)
    opt = CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, max_iter_num=limit, epsilon=0.0)
    opt.obtain_solution(obs)
    assert len(calls) == 3
    limit.fill_(1)  # a schedule changing it in place
    opt.obtain_solution(obs)
    assert len(calls) == 4
    calls.clear()
    # The loop runs while i < max_iter_num, as in ALF: 2.5 gives three iterations.
    CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, max_iter_num=torch.tensor(2.5), epsilon=0.0).obtain_solution(obs)
    assert len(calls) == 3


def test_cem_stops_on_epsilon_over_the_whole_batch():
    obs = torch.zeros(2, 2, dtype=F64)
    cost, calls = counting(quadratic_cost)
    # Initial variance (1 - (-1)) / 2 = 1 is not above epsilon 1: no iteration, the initial mean comes back.
    x = CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, epsilon=1.0).obtain_solution(obs + 0.7)
    assert calls == [] and torch.equal(x, torch.zeros(2, 2, dtype=F64))
    # One observation with a still-wide variance keeps the whole batch iterating.
    init_var = torch.tensor([[[1e-4, 1e-4]], [[0.5, 1e-4]]], dtype=F64)
    opt = CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, max_iter_num=1, epsilon=0.01, dtype=F64)
    opt.obtain_solution(obs, init_var=init_var)
    assert len(calls) == 1
    opt.obtain_solution(obs, init_var=init_var[:1].expand(2, 1, 2).contiguous())
    assert len(calls) == 1
    assert CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, max_iter_num=0).obtain_solution(obs).shape == (2, 2)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Known optima


def test_cem_converges_on_a_shifted_quadratic():
    obs = torch.tensor([[0.3, -0.6, 0.1], [-0.9, 0.9, 0.5], [0.0, 0.0, -0.25], [0.7, 0.2, 0.9]], dtype=F64)
    opt = CEMOptimizer(
        3, 100, quadratic_cost, 1.0, -1.0, elite_size=10, max_iter_num=30, epsilon=1e-8,
        generator=torch.Generator().manual_seed(0), dtype=F64,
    )  # fmt: skip
    assert (opt.obtain_solution(obs) - obs).abs().max() < 1e-2


def test_cem_solves_a_one_step_planning_toy_with_active_bounds():
    state = torch.tensor([[0.0, 0.0], [2.0, -3.0], [0.4, 0.1], [-1.0, 1.0]], dtype=F64)
    low, high = -1.0, 1.0
    opt = CEMOptimizer(
        2, 64, planning_cost, high, low, elite_size=8, max_iter_num=25, epsilon=1e-8,
        generator=torch.Generator().manual_seed(1), dtype=F64,
    )  # fmt: skip
    action = opt.obtain_solution(state)
    expected = planning_optimum(state, low, high)
    assert (expected.abs() == 1.0).any() and (expected.abs() < 1.0).any()  # both regimes are exercised
    assert (action - expected).abs().max() < 1e-2
    assert ((action >= low) & (action <= high)).all()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, devices, dtypes, validation


def test_observation_may_be_a_nest_and_the_search_builds_no_graph():
    model = torch.nn.Linear(2, 2).double()
    seen = []

    def cost(obs, x):
        seen.append(torch.is_grad_enabled())
        return ((model(x) - obs["target"][:, None, :]) ** 2).sum(-1)

    obs = {"meta": "ignored", "target": torch.zeros(3, 2, dtype=F64)}
    for opt in (
        CEMOptimizer(2, 10, cost, 1.0, -1.0, elite_size=3, max_iter_num=2, dtype=F64),
        RandomOptimizer(2, 10, cost, 1.0, -1.0, dtype=F64),
    ):
        x = opt.obtain_solution(obs)
        assert x.shape == (3, 2) and not x.requires_grad
    assert seen and not any(seen)


def test_sample_dtype_follows_the_bounds_or_the_argument():
    assert CEMOptimizer(2, 4, quadratic_cost, torch.ones(2, dtype=F64), -1.0, elite_size=2).dtype == F64
    assert RandomOptimizer(2, 4, quadratic_cost, 1.0, 0.0).dtype == torch.get_default_dtype()
    opt = RandomOptimizer(2, 4, quadratic_cost, 1.0, 0.0, dtype=F64)
    assert opt.obtain_solution(torch.zeros(1, 2)).dtype == F64
    with pytest.raises(ValueError, match="floating-point"):
        RandomOptimizer(2, 4, quadratic_cost, 1.0, 0.0, dtype=torch.int64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(elite_size=11), "elite_size"),
        (dict(elite_size=1), "elite_size"),
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(min_var=-1.0), "min_var"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(max_iter_num=-1), "max_iter_num"),
        (dict(max_iter_num=torch.ones(2)), "max_iter_num"),
        (dict(lower_bound=2.0), "lower_bound must be <= upper_bound"),
        (dict(upper_bound=torch.ones(3)), "cannot broadcast"),
        (dict(population_size=0), "population_size"),
        (dict(solution_dim=0), "solution_dim"),
    ],
)
def test_cem_rejects_invalid_arguments(kwargs, match):
    args = dict(solution_dim=2, population_size=10, cost_func=quadratic_cost, upper_bound=1.0, lower_bound=-1.0)
    args.update(elite_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CEMOptimizer(**args)


def test_bad_cost_shape_and_observation_are_reported():
    bad = RandomOptimizer(2, 4, lambda obs, x: x.sum(-1, keepdim=True), 1.0, -1.0)
    with pytest.raises(ValueError, match=r"cost_func must return costs shaped \(3, 4\)"):
        bad.obtain_solution(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="leading batch dimension"):
        RandomOptimizer(2, 4, quadratic_cost, 1.0, -1.0).obtain_solution({"a": "no tensor"})
    with pytest.raises(TypeError, match="callable"):
        RandomOptimizer(2, 4, None, 1.0, -1.0)  # type: ignore[arg-type]


def test_base_class_is_abstract_and_reset_is_a_no_op():
    opt = TrajOptimizer(2, 4, quadratic_cost, 1.0, -1.0)
    opt.reset()
    with pytest.raises(NotImplementedError):
        opt.obtain_solution(torch.zeros(1, 2))

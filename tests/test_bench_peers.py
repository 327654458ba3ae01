"""gradstep bench's peers and its handling of every registered optimizer, on a tiny workload.

Each peer listed by gradstep.lab.peers.implementations() must construct and step on the benchmark's workload (a peer
that fails would only be reported by the benchmark, so a broken one would go unnoticed there), and the benchmark must
give every registered optimizer a row or a stated reason.
"""

from __future__ import annotations

import pytest
import torch

from gradstep.core.registry import available, get
from gradstep.lab import bench
from gradstep.lab.peers import implementations

TINY = bench.workload(1e-6)  # 8x8 matrices, a 32x8, 8x2 matrices and 8-vectors: the reference workload's shapes

PEERS = sorted((name, label) for name, peers in implementations().items() for label in peers)


@pytest.mark.parametrize(("name", "label"), PEERS, ids=[f"{n}-{label}" for n, label in PEERS])
def test_every_peer_constructs_and_steps_on_the_workload(name: str, label: str) -> None:
    assert name in available(), f"peer listed for {name!r}, which is not registered"
    shapes = bench._eligible(name, TINY)
    params = bench._params(shapes, "cpu")
    before = [p.detach().clone() for p in params]
    ms, first, _state, _peak = bench.measure(
        implementations()[name][label],
        shapes,
        "cpu",
        steps=1,
        warmup=0,
        closure=get(name).capabilities.closure_required,
    )
    assert ms > 0 and first > 0
    # measure() works on its own parameters: step a fresh set here to see the peer moves them.
    opt = implementations()[name][label](params)
    if callable(getattr(opt, "train", None)):
        opt.train()  # type: ignore[attr-defined]
    closure = bench._linear_loss_closure(params) if get(name).capabilities.closure_required else None
    for _ in range(6):  # ADOPT first only initializes its second moment; RAdam holds still while rho_t <= 4
        opt.step(closure) if closure is not None else opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True)), f"{label} left {name} unchanged"


def test_bench_run_covers_every_registered_optimizer() -> None:
    notes: list[str] = []
    _bw, rows = bench.run(None, scale=1e-6, steps=1, warmup=0, modes=("eager",), peers=False, notes=notes)
    timed = {r.optimizer for r in rows}
    left_out = {note.split(":")[0] for note in notes if ": left out:" in note}
    missing = [n for n in available() if n not in timed and n not in left_out]
    assert not missing, f"neither timed nor left out with a reason: {missing}"
    assert not timed & left_out
    assert "sparseadam" in left_out  # sparse gradients only
    assert {"lbfgs", "muon", "sgd_schedule_free"} <= timed  # closure, >=2-D only, train() mode


def test_adaptations_are_read_from_the_registry() -> None:
    assert bench.excluded("sparseadam") and bench.excluded("adam") is None
    assert all(len(s) >= 2 for s in bench._eligible("muon", TINY)) and len(bench._eligible("muon", TINY)) == 16
    assert any("closure" in line for line in bench.adaptations("lbfgs", TINY, ("eager", "compiled")))
    assert any("2-D" in line for line in bench.adaptations("muon", TINY, ("eager",)))
    assert bench.adaptations("adam", TINY, ("eager", "compiled")) == []
    # L-BFGS has no compiled path: its compiled row is dropped, not attempted.
    assert bench._modes_for("lbfgs", ("eager", "compiled")) == ("eager",)


def test_rotated_measurement_times_every_implementation_in_turn_and_reports_a_failing_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shapes = bench._eligible("lamb", TINY)
    stepped: list[str] = []

    def counting(label: str, factory: bench.Factory) -> bench.Factory:
        def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            opt = factory(params)
            opt.register_step_post_hook(lambda *_: stepped.append(label))
            return opt

        return build

    def broken(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise RuntimeError("cannot take this workload")

    peers = implementations()["lamb"]
    factories = {label: counting(label, f) for label, f in peers.items()}
    factories["broken"] = broken
    results = bench.measure_rotated(factories, shapes, "cpu", steps=3, warmup=1)
    assert set(results) == set(peers), "the failing implementation is left out, the others kept"
    assert "broken: RuntimeError: cannot take this workload" in capsys.readouterr().out
    for ms, first, state, _peak in results.values():
        assert ms > 0 and first > 0 and state >= 0
    labels = list(peers)
    # first step and warm-up per implementation, then rounds of one step each, each round starting one further on
    timed = stepped[2 * len(labels) : 2 * len(labels) + 3 * len(labels)]
    rounds = [timed[i * len(labels) : (i + 1) * len(labels)] for i in range(3)]
    assert all(sorted(r) == sorted(labels) for r in rounds)
    assert [r[0] for r in rounds] == [labels[i % len(labels)] for i in range(3)]


def test_bench_run_rotates_when_asked() -> None:
    _bw, rows = bench.run(["lars"], scale=1e-6, steps=2, warmup=0, modes=("eager",), peers=True, rotate=True)
    assert {r.implementation for r in rows} == {"gradstep eager", *implementations()["lars"]}

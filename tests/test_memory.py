"""Memory of a step: chunking bounds the eager path's temporaries without changing a single bit of the result."""

from __future__ import annotations

import pytest
import torch

import gradstep
from gradstep.lab.bench import _peak_extra_bytes

SHAPES = [(256, 256)] * 6 + [(256,)] * 4


def _run(
    name: str, chunk_numel: int, steps: int = 3, **options: object
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    entry = gradstep.get(name)
    opt = entry(params, **{**entry.example, "chunk_numel": chunk_numel, **options})
    for t in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (t + 2))
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop", "lamb", "adan", "neroplus", "adamp", "ademamix"])
def test_chunked_step_is_bitwise_the_whole_group_step(name: str) -> None:
    whole, _ = _run(name, 0)
    chunked, _ = _run(name, 70_000)  # one 256x256 tensor (65536) per chunk, the vectors grouped
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_chunking_bounds_the_peak_of_temporaries() -> None:
    # The chain's temporaries (torch's fused kernel, Adam's default path, keeps none).
    _, whole = _run("adam", 0, fused=False)
    _, chunked = _run("adam", 70_000, fused=False)
    for opt in (whole, chunked):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
    peak_whole, peak_chunked = _peak_extra_bytes(whole.step), _peak_extra_bytes(chunked.step)
    group_bytes = sum(torch.Size(s).numel() for s in SHAPES) * 4
    assert peak_whole >= group_bytes, "the whole-group step should hold at least one group-sized temporary"
    assert peak_chunked <= peak_whole / 3, f"chunked peak {peak_chunked} vs whole-group {peak_whole}"


def test_a_whole_group_transform_is_not_chunked() -> None:
    # Global-norm clipping reduces over the group: chunking would clip each chunk by its own norm.
    def run(chunk_numel: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        opt = gradstep.chain(params, gradstep.transforms.ClipByGlobalNorm(), lr=0.1, max_global_norm=1.0)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(0), run(70_000)):
        assert torch.equal(a, b)


def _compiled_peak(name: str, recompute: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    entry = gradstep.get(name)
    opt = entry(params, **{**entry.example, "compiled": True, "nonfinite": "ignore"})
    flagged = [t for t in opt._transforms if t.recompute_when_compiled]
    assert flagged, "the chain should ask the compiled step to recompute"
    for t in flagged:
        t.recompute_when_compiled = recompute
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # compiles
    return _peak_extra_bytes(opt.step)


@pytest.mark.parametrize("name", ["lamb", "ralars", "neroplus"])
def test_compiled_reduction_chain_recomputes_instead_of_storing_the_direction(name: str) -> None:
    # Their norms (trust ratio, row constraints) sit between the direction and the parameter's write: stored, the
    # direction is a group-sized temporary; recomputed from the stored moments, nothing group-sized is held.
    group_bytes = sum(torch.Size(s).numel() for s in SHAPES) * 4
    assert _compiled_peak(name, recompute=True) < group_bytes / 4
    assert _compiled_peak(name, recompute=False) >= group_bytes / 4  # what the flag saves

"""Every registered optimizer under torch.distributed (gloo, CPU, 2 ranks on 127.0.0.1) against the single-process run.

One group of 2 ranks is spawned once for the whole file (spawning per optimizer would cost seconds each). Inside it:

* FSDP2: a small transformer-like model (Linear/LayerNorm blocks, ``fully_shard`` per layer, so every parameter is a
  DTensor split along dim 0) takes 20 steps of each registered optimizer; the full parameters are gathered and
  compared, in the parent, with the same model stepped in one process on the whole batch. Each rank sees half the
  batch; FSDP2 averages the gradients, so the two runs see the same gradients up to rounding. The model is float64,
  so "the same up to rounding" is ~1e-15, far below what a shard-local norm or count changes (~1e-3).
* the non-finite policy: a NaN in one rank's shard makes ``"skip"`` skip on every rank, ``"error"`` raise on every
  rank, naming the parameter and the rank.
* DDP and ``ZeroRedundancyOptimizer(optimizer_class=...)`` for a few optimizers (per-tensor reductions among them).
* distributed checkpoints (``get/set_optimizer_state_dict``, also flattened): a round trip leaves the state and the
  step counters unchanged (``global_step``; the wrappers' ``fast_steps`` and their inner optimizer's state), and a
  resumed optimizer continues bitwise.
* state codecs (``state_codec=``): every element-wise optimizer with every codec, on a model with
  a weight of whole 256-element blocks per row (its 17 rows split 9/8), 6 steps: the parameters and the coded state
  against the single process (each rank codes its own rows), every part a DTensor split along rows; DCP round trips
  of coded state; ``convert_state_codec`` of sharded AdamW state between codecs (on each rank, against one process's
  conversion of the gathered state, and a step after loading it); a full (DCP ``full_state_dict``) int4 and int8
  state loaded into one process's optimizer, and one process's into FSDP2 after ``convert_state_codec`` (the parts'
  layouts differ), each then stepped alongside the other.
* the rai transforms in a user's chain with blocks that span the split dim (``param_ndim=None``: each block is a whole
  tensor; ``param_ndim=1``: the 1-D parameters' blocks are), against the single process.

A second group, of 4 ranks, is spawned once for a subset of the optimizers (each sharding kind, and the per-tensor and
whole-tensor reductions of both kinds of wrappers): 2 rows of the batch per rank, and the last layer's 5 rows split
2/2/1/0, so one rank holds empty shards. Collectives among 4 processes on 2 cores cost ~10x more than among 2, so
these runs take 7 steps (one synchronisation of Scout's k=6), not 20. There too, AdamW with int8, int4 and fp8 state
on a (3, 2048) weight split 1/1/1/0: the rank with an empty shard codes nothing and the state equals one process's,
also converted to another codec by ``convert_state_codec``.

Set ``GRADSTEP_FSDP_DIFFS`` to a file name to have the FSDP2 tests append ``name<TAB>ranks<TAB>largest difference``
lines to it (the table of the issue's closing note); the asserts do not depend on it.

Ranks time out by themselves (the process group's timeout, and the parent kills ranks that outlive the deadline).
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradstep
from gradstep.core import codecs, registry
from gradstep.core.nonfinite import NonFiniteError
from gradstep.core.optimizer import ChainedOptimizer
from gradstep.core.registry import Entry

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
WORLD4 = 4
STEPS = 20
STEPS4 = 7  # on 4 ranks
BATCH = 8  # split evenly over 2 and over 4 ranks
DEADLINE_S = 420  # the whole spawned group; the parent kills ranks still running then
DEADLINE4_S = 240
# FSDP2 and DDP hand the optimizer dense gradients: a sparse-only optimizer (SparseAdam) has no run to compare.
ENTRIES: list[Entry] = [e for e in registry.entries() if not e.capabilities.sparse_only]
# Also run on 4 ranks: elementwise (adamw); per-tensor reductions (lamb, lars, neroplus's row and whole-tensor
# statistics, the L2-normed gradient and the L2-ball projection of the wrappers, adamp's cosines); whole-tensor ones
# (top-q selections of a whole tensor, Scout's coherence); whole-matrix ones (Muon and NorMuon, one owner rank per
# matrix; Shampoo, SOAP and PSGD-Kron, whole factors on every rank); whole-model reductions
# (Prodigy's estimate of d, summed over all groups). A run whose ranks disagree on a
# collective hangs until the process group's timeout and leaves the group unusable for the runs after it: every run
# still gets its own result, but those later ones fail too (read the first failure).
FSDP4_NAMES = (
    "adamw",
    "lamb",
    "lars",
    "neroplus",
    "l2_normed_gradient",
    "l2_projected",
    "topq_gradient",
    "scout",
    "adamp",
    "muon",
    "normuon",
    "shampoo",
    "soap",
    "psgd_kron",
    "prodigy",
)
# Optimizers also run under DDP and ZeRO: elementwise, per-tensor-reduction and every whole-matrix one.
DDP_NAMES = ("adamw", "lamb", "adamp", "lars", "tadam", "muon", "normuon", "shampoo", "soap", "psgd_kron")
DCP_NAMES = ("adam", "lamb", "lookahead", "scout", "ranger", "muon", "normuon", "shampoo", "soap", "psgd_kron")
# Also through DCP's flattened form (StateDictOptions(flatten_optimizer_state_dict=True)), which rebuilds the state
# from the live optimizer's keys.
DCP_FLAT_NAMES = ("adam", "lookahead", "scout", "ranger")
# Coded state (the wide model, see make_model) through DCP, also flattened.
DCP_CODED = ("adamw/int8", "adamw/int4/flat", "adamw/fp8", "adamw/bf16+ecc", "lookahead/int8")
DCP_CASES = (*DCP_NAMES, *(f"{name}/flat" for name in DCP_FLAT_NAMES), *DCP_CODED)
# On 4 ranks: a (3, 2048) weight split 1/1/1/0, so one rank codes an empty shard.
EMPTY_SHARD_CODECS = ("int8", "int4", "fp8")
NARROW_CONVERSIONS = {"int8": "int4", "int4": "fp8", "fp8": "fp32"}  # convert_state_codec there too
# convert_state_codec of FSDP2 AdamW state (sharded), on each rank, against one process's conversion of it.
CONVERSIONS = (("fp32", "int8"), ("int8", "int4"), ("int4", "fp32"), ("bf16+ecc", "int8"))
# Full FSDP2 state into one process, and one process's into FSDP2 (the parts' layouts differ: see codecs).
INTERCHANGE_CODECS = ("int4", "int8")
CODEC_STEPS = 6  # each case's own single-process reference; the 230 coded runs add about 25 s to the FSDP2 world
CHAIN_PARAM_NDIMS = (None, 1)
TOL = 1e-10  # float64: rounding differences are ~1e-15


def _name(entry: Entry) -> str:
    return entry.name


def _takes_codecs(entry: Entry) -> bool:
    """Element-wise entries that code their state (schedule-free's and OptimWrapper's refuse or lack state_codec)."""
    if entry.capabilities.sharding != "elementwise" or "state_codec" not in entry.hyperparameters():
        return False
    probe = entry([torch.nn.Parameter(torch.zeros(3))], **entry.example)
    inner = getattr(probe, "optimizer", probe)
    if not isinstance(inner, ChainedOptimizer):
        return True
    return type(inner)._prepare_step is ChainedOptimizer._prepare_step and inner._sparse_gradients() != "required"


CODEC_CASES = (
    *(f"{e.name}/{codec}" for e in ENTRIES if _takes_codecs(e) for codec in codecs.CODECS if codec != "fp32"),
    # the fast path: decode, update and encode compiled together on each rank's shards (against one process, compiled)
    "adamw/int8/compiled",
    "lion/int4+sr/compiled",
)


def _codec_case(case: str) -> tuple[str, str, dict[str, Any]]:
    """``name/codec`` or ``name/codec/compiled``: the registry name, the codec and the extra options."""
    name, codec, *rest = case.split("/")
    return name, codec, {"compiled": True} if rest == ["compiled"] else {}


# --- the model, the data and the training loop (the same in the ranks and in the parent) ---------------------------
def make_model(wide: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    if wide:  # for state codecs: model[2].weight is (17, 256), rows of whole blocks (4352 elements: coded)
        return torch.nn.Sequential(
            torch.nn.Linear(12, 256),
            torch.nn.GELU(),
            torch.nn.Linear(256, 17),  # 17 rows over 2 ranks: uneven shards of whole blocks
            torch.nn.LayerNorm(17),
            torch.nn.Linear(17, 5),
        ).double()
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 24),
        torch.nn.LayerNorm(24),
        torch.nn.GELU(),
        torch.nn.Linear(24, 24),
        torch.nn.LayerNorm(24),
        torch.nn.Linear(24, 5),  # 5 rows over 2 ranks: uneven shards
    )
    return model.double()


def make_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 12, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def build(entry: Entry, params: Any, codec: str | None = None, **extra: Any) -> torch.optim.Optimizer:
    # A matrix optimizer (Entry.min_ndim = 2) steps the weights; biases and norms stay as they are on both sides.
    hypers = {**entry.example, **({"state_codec": codec} if codec else {}), **extra}
    return entry([p for p in params if p.dim() >= entry.min_ndim], **hypers)


def train(model: torch.nn.Module, opt: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], rows: slice) -> None:
    for x, y in batches:
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()


def reference(entry: Entry, steps: int = STEPS) -> list[torch.Tensor]:
    """The parameters after ``steps`` single-process steps on the whole batch (computed once per optimizer)."""
    return list(_reference(entry.name, steps))


@functools.cache
def _reference(name: str, steps: int) -> tuple[torch.Tensor, ...]:
    # One intra-op thread: these tensors are tiny, and a second thread only waits for a core (2 cores, often busy)
    # at every op, which made each reference take ~1 s instead of ~0.04 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        train(model, build(registry.get(name), model.parameters()), make_batches(steps), slice(None))
    finally:
        torch.set_num_threads(threads)
    return tuple(p.detach() for p in model.parameters())


@functools.cache
def coded_reference(case: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The parameters and the coded weight's state after CODEC_STEPS single-process steps of ``name/codec``."""
    name, codec, extra = _codec_case(case)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _reference
    try:
        model = make_model(wide=True)
        opt = build(registry.get(name), model.parameters(), codec, **extra)
        train(model, opt, make_batches(CODEC_STEPS), slice(None))
    finally:
        torch.set_num_threads(threads)
    return [p.detach() for p in model.parameters()], _param_state(opt, model[2].weight)


def narrow_run(codec: str, world: int = 1, rank: int = 0, mesh: Any = None) -> dict[str, Any]:
    """AdamW with ``codec`` on a (3, 2048) weight (whole blocks per row), 3 steps; FSDP2 when given a mesh."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 3, bias=False).double()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    opt = gradstep.AdamW(model.parameters(), lr=0.01, state_codec=codec)
    gen = torch.Generator().manual_seed(2)
    rows = _my_rows(rank, world) if mesh is not None else slice(None)
    for _ in range(3):
        x = torch.randn(BATCH, 2048, generator=gen, dtype=torch.float64)
        y = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    local_rows = model.weight.to_local().shape[0] if mesh is not None else 3  # type: ignore[operator]
    # convert_state_codec on each rank alone, the rank of an empty shard among them (in one process: the reference).
    target = gradstep.AdamW(model.parameters(), lr=0.01, state_codec=NARROW_CONVERSIONS[codec])
    converted = gradstep.convert_state_codec(target, opt.state_dict())["state"][0]
    return {
        "params": _full(model),
        "state": _param_state(opt, model.weight),
        "rows": local_rows,
        "converted": {k: _gathered(v) for k, v in converted.items()},
    }


def build_chain(params: Any, param_ndim: int | None) -> torch.optim.Optimizer:
    """A user's chain of the rai transforms, each reducing over blocks of ``param_ndim``."""
    from gradstep.paramtransform.transforms import L2BallProjection, LpNormedGradient, TopQGradient

    transforms = (TopQGradient(), LpNormedGradient(p=2), L2BallProjection())
    return gradstep.chain(params, *transforms, lr=0.05, q=0.3, epsilon=1.0, param_ndim=param_ndim)


@functools.cache
def chain_reference(param_ndim: int | None) -> tuple[torch.Tensor, ...]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _reference
    try:
        model = make_model()
        train(model, build_chain(model.parameters(), param_ndim), make_batches(STEPS), slice(None))
    finally:
        torch.set_num_threads(threads)
    return tuple(p.detach() for p in model.parameters())


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# --- inside the ranks -------------------------------------------------------------------------------------------------
def _fsdp_model(mesh: Any, wide: bool = False) -> Any:
    from torch.distributed.fsdp import fully_shard

    model = make_model(wide)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in model.parameters()
    ]


def _my_rows(rank: int, world: int = WORLD) -> slice:
    n = BATCH // world
    return slice(rank * n, (rank + 1) * n)


def _attempt(out: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Record fn's result, or its error (a failing optimizer must not stop the others' runs)."""
    try:
        out[key] = fn()
    except Exception:
        out[key] = "error: " + traceback.format_exc()[-1200:]


def _fsdp_all(rank: int, world: int, mesh: Any, entries: list[Entry], steps: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for entry in entries:

        def run(entry: Entry = entry) -> list[torch.Tensor]:
            model = _fsdp_model(mesh)
            train(model, build(entry, model.parameters()), make_batches(steps), _my_rows(rank, world))
            return _full(model)

        _attempt(results, entry.name, run)

    def chunked() -> list[torch.Tensor]:
        # Chunks small enough to split the group: each chunk's reductions are collectives, so ranks must agree on them.
        model = _fsdp_model(mesh)
        opt = registry.get("lamb")(model.parameters(), **{**registry.get("lamb").example, "chunk_numel": 200})
        train(model, opt, make_batches(steps), _my_rows(rank, world))
        return _full(model)

    _attempt(results, "lamb/chunked", chunked)
    return results


def _coded_all(rank: int, mesh: Any) -> dict[str, Any]:
    """Each codec case: the full parameters, the coded weight's state gathered, and how each part is placed."""
    results: dict[str, Any] = {}
    for case in CODEC_CASES:

        def run(case: str = case) -> dict[str, Any]:
            name, codec, extra = _codec_case(case)
            model = _fsdp_model(mesh, wide=True)
            opt = build(registry.get(name), model.parameters(), codec, **extra)
            train(model, opt, make_batches(CODEC_STEPS), _my_rows(rank))
            weight = model[2].weight
            states = {"": opt.state[weight], **({"inner.": opt.inner.state[weight]} if hasattr(opt, "inner") else {})}
            placed = {
                prefix + k: (type(v).__name__, tuple(map(repr, getattr(v, "placements", ()))), tuple(v.shape))
                for prefix, state in states.items()
                for k, v in state.items()
                if isinstance(v, torch.Tensor) and v.dim() > 0
            }
            return {"params": _full(model), "state": _param_state(opt, weight), "placed": placed}

        _attempt(results, case, run)

    for source, target in CONVERSIONS:
        _attempt(results, f"convert/{source}/{target}", functools.partial(_converted, rank, mesh, source, target))
    for codec in INTERCHANGE_CODECS:
        _attempt(results, f"to_one/{codec}", functools.partial(_fsdp2_to_one_process, rank, mesh, codec))
        _attempt(results, f"to_fsdp2/{codec}", functools.partial(_one_process_to_fsdp2, rank, mesh, codec))
    return results


def _placed(state: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """How each state tensor (but scalars) is placed: its type, placements and (whole) shape."""
    return {
        k: (type(v).__name__, tuple(map(repr, getattr(v, "placements", ()))), tuple(v.shape))
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }


def _converted(rank: int, mesh: Any, source: str, target: str) -> dict[str, Any]:
    """FSDP2 AdamW state (``source``) converted to ``target`` on every rank alone, gathered; the state it was
    converted from, gathered, for the parent's single-process conversion; and the parameters after a step of the
    converted state loaded into a fresh optimizer."""
    model = _fsdp_model(mesh, wide=True)
    opt = gradstep.AdamW(model.parameters(), state_codec=source)
    batches = make_batches(3)
    train(model, opt, batches[:2], _my_rows(rank))
    saved = opt.state_dict()
    converted_to = gradstep.AdamW(model.parameters(), state_codec=target)
    converted = gradstep.convert_state_codec(converted_to, saved)
    params = _full(model)
    converted_to.load_state_dict(converted)
    train(model, converted_to, batches[2:], _my_rows(rank))
    return {
        "saved": {pid: {k: _gathered(v) for k, v in state.items()} for pid, state in saved["state"].items()},
        "groups": saved["param_groups"],
        "converted": {pid: {k: _gathered(v) for k, v in state.items()} for pid, state in converted["state"].items()},
        "placed": _placed(converted["state"][2]),  # model[2].weight, the coded one
        "params": params,
        "stepped": _full(model),
    }


def _fsdp2_to_one_process(rank: int, mesh: Any, codec: str) -> dict[str, Any]:
    """A full (gathered) FSDP2 state through DCP, loaded as it is into one process's optimizer of the same model;
    then 2 steps of each."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    model = _fsdp_model(mesh, wide=True)
    opt = gradstep.AdamW(model.parameters(), state_codec=codec)
    batches = make_batches(4)
    train(model, opt, batches[:2], _my_rows(rank))
    full = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, opt, options=full)
    plain = make_model(wide=True)
    plain.load_state_dict(msd)
    single = gradstep.AdamW(plain.parameters(), state_codec=codec)
    try:
        gradstep.convert_state_codec(single, opt.state_dict())  # sharded: not for a plain parameter
        sharded = "converted"
    except ValueError as exc:
        sharded = str(exc)
    single.load_state_dict(osd)
    out = {
        "saved_shapes": {k: tuple(v.shape) for k, v in osd["state"]["2.weight"].items()},
        # (cloned: DCP hands out the live step counters, which the steps below advance)
        "converted": {k: v.clone() for k, v in gradstep.convert_state_codec(single, osd)["state"]["2.weight"].items()},
        "loaded": _param_state(single, plain[2].weight),
        "fsdp": _param_state(opt, model[2].weight),
        "sharded": sharded,
        "start": _full(model),
    }
    train(model, opt, batches[2:], _my_rows(rank))
    train(plain, single, batches[2:], slice(None))
    return {**out, "fsdp_params": _full(model), "single_params": [p.detach().clone() for p in plain.parameters()]}


def _one_process_to_fsdp2(rank: int, mesh: Any, codec: str) -> dict[str, Any]:
    """One process's state (DCP's full form of it) into FSDP2: refused as it is (its flat parts), loaded after
    convert_state_codec; then 2 steps of each."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    plain = make_model(wide=True)
    single = gradstep.AdamW(plain.parameters(), state_codec=codec)
    batches = make_batches(4)
    train(plain, single, batches[:2], slice(None))
    full = StateDictOptions(full_state_dict=True)
    osd = get_optimizer_state_dict(plain, single, options=full)
    model = _fsdp_model(mesh, wide=True)
    set_model_state_dict(model, plain.state_dict(), options=full)
    opt = gradstep.AdamW(model.parameters(), state_codec=codec)
    opt.init_state()  # (else DCP takes a step of zero gradients to create the state)
    before = _param_state(opt, model[2].weight)
    try:
        set_optimizer_state_dict(model, opt, osd, options=full)
        refused = "loaded"
    except ValueError as exc:
        refused = str(exc)
    after = _param_state(opt, model[2].weight)
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    set_optimizer_state_dict(model, opt, gradstep.convert_state_codec(opt, osd), options=full)
    out = {
        "refused": refused,
        "unchanged": unchanged,
        "loaded": _param_state(opt, model[2].weight),
        "placed": _placed(opt.state[model[2].weight]),
        "single": _param_state(single, plain[2].weight),
    }
    train(model, opt, batches[2:], _my_rows(rank))
    train(plain, single, batches[2:], slice(None))
    return {**out, "fsdp_params": _full(model), "single_params": [p.detach().clone() for p in plain.parameters()]}


def _chains(rank: int, mesh: Any) -> dict[Any, Any]:
    results: dict[Any, Any] = {}
    for param_ndim in CHAIN_PARAM_NDIMS:

        def run(param_ndim: int | None = param_ndim) -> list[torch.Tensor]:
            model = _fsdp_model(mesh)
            train(model, build_chain(model.parameters(), param_ndim), make_batches(STEPS), _my_rows(rank))
            return _full(model)

        _attempt(results, param_ndim, run)

    def unsupported() -> dict[str, str]:
        # Weights placed as Shard(1): a whole-tensor top-k cannot be rebuilt from the shards in rank order, and a row
        # of a -1 block is split; both must refuse (on every rank alike), never use the local part.
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        from gradstep.paramtransform.transforms import LpNormedGradient, TopQGradient

        messages = {}
        for name, transform, hypers in (
            ("TopQGradient", TopQGradient(), {"q": 0.3, "param_ndim": None}),
            ("LpNormedGradient", LpNormedGradient(), {"param_ndim": -1}),
        ):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 6).double()
            fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
            opt = gradstep.chain(model.parameters(), transform, lr=0.1, **hypers)
            model(torch.ones(3, 4, dtype=torch.float64)).sum().backward()
            try:
                opt.step()
                messages[name] = "stepped"
            except NotImplementedError as exc:
                messages[name] = str(exc)
        return messages

    _attempt(results, "unsupported", unsupported)
    return results


def _nonfinite(rank: int, mesh: Any) -> dict[str, Any]:
    """A NaN in rank 1's shard only: what each policy does on each rank."""
    out: dict[str, Any] = {}
    for policy in ("skip", "error"):
        model = _fsdp_model(mesh)
        opt = registry.get("lamb")(model.parameters(), lr=0.01, nonfinite=policy)
        x, y = make_batches(1)[0]
        ((model(x[_my_rows(rank)]) - y[_my_rows(rank)]) ** 2).mean().backward()
        weight = model[3].weight
        if rank == 1:
            weight.grad.to_local().view(-1)[0] = float("nan")  # type: ignore[union-attr]
        before = _full(model)
        try:
            opt.step()
            out[policy] = ("stepped", getattr(opt, "skipped_steps", None), max_difference(before, _full(model)))
        except NonFiniteError as exc:
            out[policy] = ("raised", str(exc), max_difference(before, _full(model)))
    return out


def _ddp_and_zero(rank: int) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    for name in DDP_NAMES:
        entry = registry.get(name)

        def ddp(entry: Entry = entry) -> list[torch.Tensor]:
            model = DistributedDataParallel(make_model())
            train(model, build(entry, model.parameters()), make_batches(STEPS), _my_rows(rank))
            return [p.detach().clone() for p in model.module.parameters()]

        def zero(entry: Entry = entry) -> list[torch.Tensor]:
            model = DistributedDataParallel(make_model())
            hypers = {**entry.preset, **entry.example}
            params = [p for p in model.parameters() if p.dim() >= entry.min_ndim]  # as build()
            opt = ZeroRedundancyOptimizer(params, optimizer_class=entry.cls, **hypers)
            train(model, opt, make_batches(STEPS), _my_rows(rank))
            return [p.detach().clone() for p in model.module.parameters()]

        _attempt(out, f"ddp/{name}", ddp)
        _attempt(out, f"zero/{name}", zero)
    return out


def _gathered(v: Any) -> Any:
    """A state value whole (a DTensor gathered); float8 codes as their bytes (uint8: gloo gathers no float8)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.element_size() == 1:
        v = v.view(torch.uint8) if not hasattr(v, "to_local") else _as_bytes(v)
    if hasattr(v, "full_tensor"):
        return v.full_tensor().clone()
    return v.clone() if isinstance(v, torch.Tensor) else v


def _as_bytes(v: Any) -> Any:
    from torch.distributed.tensor import DTensor

    local = v.to_local().view(torch.uint8)
    return DTensor.from_local(local, v.device_mesh, v.placements, run_check=False, shape=v.shape, stride=v.stride())


def _param_state(opt: Any, p: torch.Tensor) -> dict[str, Any]:
    """``p``'s state, gathered; for a wrapper also its inner optimizer's (keys ``inner.<key>``)."""
    # A wrapper's state shows its inner optimizer's as a live view (not a copy): it is read from the inner one.
    entry = {k: _gathered(v) for k, v in opt.state[p].items() if not isinstance(v, Mapping)}
    inner = getattr(opt, "inner", None)
    if inner is not None:
        entry.update({f"inner.{k}": _gathered(v) for k, v in inner.state[p].items()})
    return entry


def _state_copy(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """Every parameter's state, gathered; for a wrapper also its inner optimizer's (keys ``inner.<key>``)."""
    return {i: _param_state(opt, p) for i, p in enumerate(opt.param_groups[0]["params"])}


def _steps(opt: Any) -> tuple[int, ...]:
    """The step counters: ``global_step``; for a wrapper ``fast_steps`` and its inner optimizer's ``global_step``."""
    if hasattr(opt, "fast_steps"):
        return (opt.fast_steps, opt.inner.global_step)
    return (opt.global_step,)


def _dcp(rank: int, mesh: Any) -> dict[str, Any]:
    """get/set_optimizer_state_dict: round trip, then resume from it in a fresh model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out: dict[str, Any] = {}
    batches = make_batches(8)
    for case in DCP_CASES:
        name, *forms = case.split("/")
        entry = registry.get(name)
        options = StateDictOptions(flatten_optimizer_state_dict="flat" in forms)
        codec = next((form for form in forms if form in codecs.CODECS), None)

        def run(entry: Entry = entry, options: StateDictOptions = options, codec: str | None = codec) -> dict[str, Any]:
            model = _fsdp_model(mesh, wide=codec is not None)
            opt = build(entry, model.parameters(), codec)
            train(model, opt, batches[:5], _my_rows(rank))
            before, steps_before = _state_copy(opt), _steps(opt)
            model_state: dict[str, Any] = dict(get_model_state_dict(model))
            msd = {k: v.full_tensor().clone() for k, v in model_state.items()}
            osd = get_optimizer_state_dict(model, opt, options=options)
            set_optimizer_state_dict(model, opt, osd, options=options)
            round_trip, steps_round_trip = _state_copy(opt), _steps(opt)
            # Resume: a fresh model and optimizer (state allocated by init_state, so DCP takes no dummy step).
            fresh = _fsdp_model(mesh, wide=codec is not None)
            set_model_state_dict(fresh, msd, options=StateDictOptions(full_state_dict=True))
            resumed = build(entry, fresh.parameters(), codec)
            resumed.init_state()  # type: ignore[attr-defined]
            set_optimizer_state_dict(
                fresh, resumed, get_optimizer_state_dict(model, opt, options=options), options=options
            )
            train(model, opt, batches[5:], _my_rows(rank))
            train(fresh, resumed, batches[5:], _my_rows(rank))
            return {
                "before": before,
                "round_trip": round_trip,
                "continued": _full(model),
                "resumed": _full(fresh),
                # The counters (gradstep's global_step is in the "gradstep" entry, which DCP's state dicts drop; the
                # wrappers' fast_steps are per-parameter state).
                "steps": (steps_before, steps_round_trip, _steps(opt), _steps(resumed)),
            }

        _attempt(out, case, run)
    return out


def _reductions(mesh: Any) -> dict[str, list[torch.Tensor]]:
    """Each shared reduction of DTensors (split along dim 0; their batched views split rows) and of the full tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradstep.core import reductions as red

    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((5, 4), (7,), (1, 3))]
    other = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in full]
    shard = [distribute_tensor(x, mesh, [Shard(0)]) for x in full]
    shard_other = [distribute_tensor(x, mesh, [Shard(0)]) for x in other]
    batched, full_batched = [x.unsqueeze(0) for x in shard[:1]], [x.unsqueeze(0) for x in full[:1]]
    cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...], tuple[Any, ...]]] = {
        "tensor_norms": (red.tensor_norms, (shard,), (full,)),
        "tensor_norms_inf": (functools.partial(red.tensor_norms, ord=float("inf")), (shard,), (full,)),
        "tensor_norms_1": (functools.partial(red.tensor_norms, ord=1.0), (shard,), (full,)),
        "tensor_sums": (red.tensor_sums, (shard,), (full,)),
        "tensor_dots": (red.tensor_dots, (shard, shard_other), (full, other)),
        "tensor_numels": (red.tensor_numels, (shard,), (full,)),
        "global_norm": (red.global_norm, (shard,), (full,)),
        "row_norms": (red.row_norms, (shard,), (full,)),
        "row_dots": (red.row_dots, (shard, shard_other), (full, other)),
        "row_means": (red.row_means, (shard,), (full,)),
        "split_row_norms": (red.row_norms, (batched,), (full_batched,)),
        "split_row_l1_norms": (functools.partial(red.row_lp_norms, ord=1.0), (batched,), (full_batched,)),
        "split_row_means": (red.row_means, (batched,), (full_batched,)),
        "split_keep_top_k": (red.keep_top_k, (batched, [5]), (full_batched, [5])),
        "split_row_signed_argmax": (red.row_signed_argmax, (batched,), (full_batched,)),
        "tensor_keep_top_k": (red.tensor_keep_top_k, (shard, [7, 3, 2]), (full, [7, 3, 2])),
        "declared_tensor_keep_top_k": (_declared_keep_top_k, (shard, [7, 3, 2]), (full, [7, 3, 2])),
        "whole_model_sum": (_whole_model_sum, (shard, shard_other), (full, other)),
        "declared_column_means": (_declared_column_means, (shard[::2],), (full[::2],)),
    }
    out = {}
    for name, (fn, sharded_args, full_args) in cases.items():
        got, expected = fn(*sharded_args), fn(*full_args)
        got = list(got) if isinstance(got, list) else [got]
        expected = list(expected) if isinstance(expected, list) else [expected]
        out[name] = [_whole(g) for g in got] + [e.clone() for e in expected]
    return out


def _whole_model_sum(xs: list[Any], ys: list[Any]) -> Any:
    """WholeModelSum of two "groups" (the first two tensors with their local shards declared, as the optimizers add
    them; the third as a DTensor): sums of squares and inner products, and a whole (replicated) tensor counted once."""
    from gradstep.core import reductions as red

    def local(x: Any) -> Any:
        return x.to_local() if hasattr(x, "to_local") else x

    sums = red.WholeModelSum()
    with red.sharded_as(xs[:2]):
        first = [local(x) for x in xs[:2]]
        pairs = zip(first, [local(y) for y in ys[:2]])
        sums.add(first, torch.stack([torch.stack([(x * x).sum(), (x * y).sum()]) for x, y in pairs]))
    x, y = xs[2], ys[2]
    sums.add([x], torch.stack([(local(x) * local(x)).sum(), (local(x) * local(y)).sum()]).unsqueeze(0))
    whole = torch.arange(3.0, dtype=torch.float64)  # not split: the same on every rank, added once
    sums.add([whole], torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    return sums.total(2)


def _declared_keep_top_k(xs: list[Any], ks: list[int]) -> list[Any]:
    """tensor_keep_top_k of the local shards of ``xs`` declared by sharded_as (as the core steps DTensors), each
    rank's result put back into a DTensor; of plain tensors, as it is."""
    from torch.distributed.tensor import DTensor

    from gradstep.core import reductions as red

    if not isinstance(xs[0], DTensor):
        return red.tensor_keep_top_k(xs, ks)
    with red.sharded_as(xs):
        kept = red.tensor_keep_top_k([x.to_local() for x in xs], ks)
    return [
        DTensor.from_local(k, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())
        for k, x in zip(kept, xs)
    ]


def _declared_column_means(xs: list[Any]) -> list[Any]:
    """dim_means over dim -2 of the local shards of 2-D DTensors declared by sharded_as (Adafactor's column
    statistics, which span the split rows): every rank gets the whole result."""
    from gradstep.core import reductions as red

    if not hasattr(xs[0], "to_local"):
        return red.dim_means(xs, -2)
    with red.sharded_as(xs):
        return red.dim_means([x.to_local() for x in xs], -2)


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor().clone() if hasattr(x, "full_tensor") else x.clone()


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120 if world == WORLD else 60)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results: dict[str, Any] = {}
        if world == WORLD:
            _attempt(results, "reductions", functools.partial(_reductions, mesh))
            _attempt(results, "nonfinite", functools.partial(_nonfinite, rank, mesh))
            _attempt(results, "ddp", functools.partial(_ddp_and_zero, rank))
            _attempt(results, "dcp", functools.partial(_dcp, rank, mesh))
            _attempt(results, "chain", functools.partial(_chains, rank, mesh))
            _attempt(results, "fsdp", functools.partial(_fsdp_all, rank, world, mesh, ENTRIES, STEPS))
            _attempt(results, "coded", functools.partial(_coded_all, rank, mesh))
        else:  # the 4-rank group: the FSDP2 subset only
            subset = [registry.get(name) for name in FSDP4_NAMES]
            _attempt(results, "fsdp", functools.partial(_fsdp_all, rank, world, mesh, subset, STEPS4))
            for codec in EMPTY_SHARD_CODECS:
                _attempt(results, f"narrow/{codec}", functools.partial(narrow_run, codec, world, rank, mesh))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


# --- the parent --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(world: int, deadline_s: float) -> list[dict[str, Any]]:
    """Run the scenarios of a group of ``world`` ranks once; the results of each rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main, args=(world, _free_port(), out_dir), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + deadline_s
        try:
            # join() returns when one rank ends (raising if it failed): loop until all have ended, or the deadline.
            while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {world} ranks did not finish within {deadline_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Every distributed scenario, run once in one group of 2 ranks."""
    return _spawn(WORLD, DEADLINE_S)


@pytest.fixture(scope="module")
def ranks4() -> list[dict[str, Any]]:
    """The FSDP2 subset, run once in one group of 4 ranks."""
    return _spawn(WORLD4, DEADLINE4_S)


def _ok(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("error: "):
        pytest.fail(value)
    return value


def _record(name: str, world: int, difference: float) -> None:
    """Append the largest difference seen to $GRADSTEP_FSDP_DIFFS, when set (for the closing note's table)."""
    path = os.environ.get("GRADSTEP_FSDP_DIFFS")
    if path:
        with open(path, "a") as f:
            f.write(f"{name}\t{world}\t{difference:.3e}\n")


def _check_fsdp2(results: list[dict[str, Any]], name: str, steps: int = STEPS) -> None:
    got = [_ok(_ok(r["fsdp"])[name]) for r in results]
    expected = reference(registry.get(name.split("/")[0]), steps)
    differences = [max_difference(rank_params, expected) for rank_params in got]
    _record(name, len(results), max(differences))
    assert max(differences) < TOL
    # The model moved: the comparison is not between two untouched models.
    assert max_difference(expected, [p.detach() for p in make_model().parameters()]) > 1e-4


@pytest.mark.parametrize("case", CODEC_CASES)
def test_fsdp2_coded_state_matches_single_process_and_stays_split(ranks: list[dict[str, Any]], case: str) -> None:
    expected_params, expected_state = coded_reference(case)
    weight_shape = tuple(make_model(wide=True)[2].weight.shape)
    for r in ranks:
        got = _ok(_ok(r["coded"])[case])
        assert max_difference(got["params"], expected_params) < TOL
        state = got["state"]
        # The same parts as one process, of the same values: each rank's rows hold whole blocks, coded alone.
        # (int4's codes and the scales are one row per weight row under FSDP2, flat in one process.)
        assert state.keys() == expected_state.keys()
        for key, value in expected_state.items():
            if not isinstance(value, torch.Tensor):
                assert state[key] == value, key
            elif value.dtype in (torch.float32, torch.float64):
                torch.testing.assert_close(state[key].reshape(-1), value.reshape(-1), rtol=1e-12, atol=TOL)
            else:
                assert torch.equal(state[key].reshape(-1), value.reshape(-1)), key
        # Nothing shaped like the weight left in float64 (but a wrapper's own slow weights), every part split by rows.
        own = {k for k in state if "inner.step" in state and not k.startswith("inner.")}
        plain = [k for k, v in state.items() if k not in own and isinstance(v, torch.Tensor) and v.dtype.itemsize == 8]
        assert not [k for k in plain if tuple(state[k].shape) == weight_shape], plain
        for key, (kind, placements, shape) in got["placed"].items():
            if shape[0] == weight_shape[0]:
                assert kind == "DTensor" and placements == ("Shard(dim=0)",), key


def _assert_same_elements(got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """The same keys, each tensor of the same elements bit for bit (layouts may differ: flat and by rows)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key].reshape(-1), value.reshape(-1)), key


@pytest.mark.parametrize(("source", "target"), CONVERSIONS)
def test_convert_state_codec_of_fsdp2_state_equals_one_process_conversion(
    ranks: list[dict[str, Any]], source: str, target: str
) -> None:
    block = codecs.BLOCK_SIZES.get(target)
    for r in ranks:
        got = _ok(_ok(r["coded"])[f"convert/{source}/{target}"])
        # One process converts the same (gathered) state for the same parameters.
        model = make_model(wide=True)
        with torch.no_grad():
            for p, value in zip(model.parameters(), got["params"]):
                p.copy_(value)
        single = gradstep.AdamW(model.parameters(), state_codec=target)
        expected = gradstep.convert_state_codec(single, {"state": got["saved"], "param_groups": got["groups"]})
        assert expected["state"].keys() == got["converted"].keys()
        for pid, state in expected["state"].items():
            _assert_same_elements(got["converted"][pid], state)
        weight = got["converted"][2]
        assert weight["exp_avg"].dtype == (torch.float64 if target == "fp32" else torch.uint8)
        assert ("exp_avg_scale" in weight) == (block is not None) and "exp_avg_ecc" not in weight
        # Every part of the coded weight a DTensor split along rows like the parameter, in FSDP2's row layout.
        for key, (kind, placements, shape) in got["placed"].items():
            assert kind == "DTensor" and placements == ("Shard(dim=0)",) and shape[0] == 17, key
        if block is not None:
            assert got["placed"]["exp_avg_scale"][2] == (17, 256 // block)
            assert got["placed"]["exp_avg"][2] == ((17, 128) if target == "int4" else (17, 256))
        # A step of the converted state loaded: as one process's step of its own conversion.
        single.load_state_dict(expected)
        train(model, single, make_batches(3)[2:], slice(None))
        assert max_difference(got["stepped"], [p.detach() for p in model.parameters()]) < TOL
        assert max_difference(got["stepped"], got["params"]) > 1e-6


@pytest.mark.parametrize("codec", INTERCHANGE_CODECS)
def test_codec_state_of_a_full_fsdp2_checkpoint_loads_into_one_process(ranks: list[dict[str, Any]], codec: str) -> None:
    block = codecs.BLOCK_SIZES[codec]
    for r in ranks:
        got = _ok(_ok(r["coded"])[f"to_one/{codec}"])
        # DCP's full state holds FSDP2's row layout; one process's load takes it, flat, with the same elements.
        assert got["saved_shapes"]["exp_avg_scale"] == (17, 256 // block)
        assert tuple(got["loaded"]["exp_avg_scale"].shape) == (17 * 256 // block,)
        assert tuple(got["loaded"]["exp_avg"].shape) == ((17 * 128,) if codec == "int4" else (17, 256))
        _assert_same_elements(got["loaded"], got["fsdp"])
        _assert_same_elements(got["converted"], got["loaded"])  # convert_state_codec lays it out alike
        assert all(got["converted"][k].shape == got["loaded"][k].shape for k in got["loaded"])
        assert got["sharded"].startswith(
            "convert_state_codec: the state of param_groups[0]['params'][0] holds DTensors"
        )
        assert max_difference(got["fsdp_params"], got["single_params"]) < TOL
        assert max_difference(got["fsdp_params"], got["start"]) > 1e-6


@pytest.mark.parametrize("codec", INTERCHANGE_CODECS)
def test_one_process_state_loads_into_fsdp2_after_convert_state_codec(ranks: list[dict[str, Any]], codec: str) -> None:
    block = codecs.BLOCK_SIZES[codec]
    for r in ranks:
        got = _ok(_ok(r["coded"])[f"to_fsdp2/{codec}"])
        # As saved, one process's flat scales do not split like FSDP2's rows: refused, naming the parameter, and
        # nothing loaded.
        assert "the state of param_groups[0]['params'][2]: exp_avg" in got["refused"], got["refused"]
        assert got["unchanged"]
        _assert_same_elements(got["loaded"], got["single"])
        for key, (kind, placements, shape) in got["placed"].items():
            assert kind == "DTensor" and placements == ("Shard(dim=0)",) and shape[0] == 17, key
        assert got["placed"]["exp_avg_scale"][2] == (17, 256 // block)
        assert max_difference(got["fsdp_params"], got["single_params"]) < TOL


@pytest.mark.parametrize("codec", [c for c in codecs.CODECS if c != "fp32"])
def test_fsdp2_adamw_codes_the_wide_weight(ranks: list[dict[str, Any]], codec: str) -> None:
    parts = {"bf16": ("exp_avg",), "bf16+ecc": ("exp_avg", "exp_avg_ecc")}.get(codec, ("exp_avg", "exp_avg_scale"))
    dtype = {"bf16": torch.bfloat16, "bf16+ecc": torch.bfloat16, "int4": torch.uint8, "int8": torch.uint8}
    for r in ranks:
        state = _ok(_ok(r["coded"])[f"adamw/{codec}"])["state"]
        assert set(parts) <= set(state) and state["exp_avg"].dtype == dtype.get(codec, torch.uint8)  # fp8: its bytes
    if codec in codecs.BLOCK_SIZES:
        block = codecs.BLOCK_SIZES[codec]
        assert tuple(state["exp_avg_scale"].shape) == (17, 256 // block)


@pytest.mark.parametrize("entry", ENTRIES, ids=_name)
def test_fsdp2_matches_single_process(ranks: list[dict[str, Any]], entry: Entry) -> None:
    if entry.capabilities.sharding == "unsharded":  # LBFGS: refused on every rank, with a message saying why
        for r in ranks:
            outcome = _ok(r["fsdp"])[entry.name]
            assert isinstance(outcome, str) and "does not support DTensor (FSDP2-sharded) parameters" in outcome
        return
    _check_fsdp2(ranks, entry.name)


def test_fsdp2_chunked_steps_match_single_process(ranks: list[dict[str, Any]]) -> None:
    _check_fsdp2(ranks, "lamb/chunked")


@pytest.mark.parametrize("name", [*FSDP4_NAMES, "lamb/chunked"])
def test_fsdp2_on_4_ranks_matches_single_process(ranks4: list[dict[str, Any]], name: str) -> None:
    assert len(ranks4) == WORLD4
    _check_fsdp2(ranks4, name, STEPS4)


@pytest.mark.parametrize("codec", EMPTY_SHARD_CODECS)
def test_fsdp2_coded_state_with_an_empty_shard_matches_single_process(ranks4: list[dict[str, Any]], codec: str) -> None:
    expected = narrow_run(codec)
    assert "exp_avg_scale" in expected["state"]  # coded
    assert [_ok(r[f"narrow/{codec}"])["rows"] for r in ranks4] == [1, 1, 1, 0]
    for r in ranks4:
        got = _ok(r[f"narrow/{codec}"])
        assert max_difference(got["params"], expected["params"]) < TOL
        assert got["state"].keys() == expected["state"].keys()
        for key, value in expected["state"].items():
            assert torch.equal(got["state"][key].reshape(-1), value.reshape(-1)), key
        # Converted to another codec on each rank alone: one process's conversion, bit for bit.
        assert got["converted"].keys() == expected["converted"].keys()
        assert ("exp_avg_scale" in got["converted"]) == (NARROW_CONVERSIONS[codec] != "fp32")
        for key, value in expected["converted"].items():
            assert torch.equal(got["converted"][key].reshape(-1), value.reshape(-1)), key


def test_the_4_rank_subset_covers_every_sharding_kind() -> None:
    kinds = {registry.get(name).capabilities.sharding for name in FSDP4_NAMES}
    assert kinds == {e.capabilities.sharding for e in ENTRIES} - {"unsharded"}


def test_every_entry_declares_a_sharding_kind() -> None:
    kinds = {
        "elementwise",
        "per-tensor reduction",
        "whole-tensor",
        "whole-matrix",
        "whole-model reduction",
        "unsharded",
    }
    assert {e.capabilities.sharding for e in ENTRIES} <= kinds


REDUCTIONS = (
    "tensor_norms tensor_norms_inf tensor_norms_1 tensor_sums tensor_dots tensor_numels global_norm row_norms row_dots "
    "row_means split_row_norms split_row_l1_norms split_row_means split_keep_top_k split_row_signed_argmax "
    "tensor_keep_top_k declared_tensor_keep_top_k declared_column_means whole_model_sum"
).split()


@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_of_dtensors_equals_the_unsharded_one(ranks: list[dict[str, Any]], name: str) -> None:
    for r in ranks:
        values = _ok(_ok(r["reductions"])[name])
        got, expected = values[: len(values) // 2], values[len(values) // 2 :]
        assert len(got) == len(expected) > 0
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_nonfinite_skip_skips_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        outcome, skipped, moved = _ok(r["nonfinite"])["skip"]
        assert (outcome, skipped, moved) == ("stepped", 1, 0.0)


def test_nonfinite_error_raises_on_every_rank_naming_parameter_and_rank(ranks: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(ranks):
        outcome, message, moved = _ok(r["nonfinite"])["error"]
        assert outcome == "raised" and moved == 0.0
        assert "param_groups[0]['params'][4]" in message  # model[3].weight, the fifth parameter
        assert f"rank {rank} of {WORLD}" in message


@pytest.mark.parametrize("kind", ["ddp", "zero"])
@pytest.mark.parametrize("name", DDP_NAMES)
def test_ddp_and_zero_match_single_process(ranks: list[dict[str, Any]], kind: str, name: str) -> None:
    expected = reference(registry.get(name))
    for r in ranks:
        assert max_difference(_ok(_ok(r["ddp"])[f"{kind}/{name}"]), expected) < TOL


@pytest.mark.parametrize("case", DCP_CASES)
def test_dcp_round_trip_keeps_state_and_resume_is_bitwise(ranks: list[dict[str, Any]], case: str) -> None:
    for r in ranks:
        result = _ok(_ok(r["dcp"])[case])
        before, after = result["before"], result["round_trip"]
        assert before.keys() == after.keys()
        for i in before:
            assert before[i].keys() == after[i].keys()
            for key in before[i]:
                a, b = before[i][key], after[i][key]
                # A plain entry (PSGDKron's None placeholder for a factor it does not keep) round-trips as itself.
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (i, key)
        if case.split("/")[0] in ("lookahead", "scout", "ranger"):
            # The round trip carried the inner optimizer's state, not only the wrapper's slow weights.
            assert {"slow_param", "fast_steps", "inner.step"} <= set(before[0])
        for continued, resumed in zip(result["continued"], result["resumed"]):
            assert torch.equal(continued, resumed)


@pytest.mark.parametrize("case", DCP_CASES)
def test_dcp_round_trip_and_resume_keep_the_step_counters(ranks: list[dict[str, Any]], case: str) -> None:
    for r in ranks:
        before, round_trip, continued, resumed = _ok(_ok(r["dcp"])[case])["steps"]
        # 5 steps before the checkpoint, 3 after; a wrapper's counters are fast_steps and the inner global_step.
        assert set(before) == {5} and set(continued) == {8}
        assert round_trip == before
        assert resumed == continued


@pytest.mark.parametrize("param_ndim", CHAIN_PARAM_NDIMS)
def test_rai_transforms_in_a_chain_with_blocks_spanning_the_split_dim_match_single_process(
    ranks: list[dict[str, Any]], param_ndim: int | None
) -> None:
    expected = list(chain_reference(param_ndim))
    for r in ranks:
        got = _ok(_ok(r["chain"])[param_ndim])
        assert max_difference(got, expected) < TOL
    assert max_difference(expected, [p.detach() for p in make_model().parameters()]) > 1e-4


def test_rai_transforms_in_a_chain_refuse_a_sharding_they_cannot_reduce_naming_themselves(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        messages = _ok(_ok(r["chain"])["unsupported"])
        assert messages["TopQGradient"].startswith("TopQGradient with param_ndim=None")
        assert messages["LpNormedGradient"].startswith("LpNormedGradient with param_ndim=-1")

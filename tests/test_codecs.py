"""State codecs (``state_codec=``): the quantizers against torchao and bitsandbytes, every element-wise optimizer with
every codec, state size, checkpoints and refusals."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import gradstep
from gradstep.core import codecs, registry
from gradstep.core.optimizer import ChainedOptimizer

CODECS = [c for c in codecs.CODECS if c != "fp32"]
# OptimWrapper (any torch optimizer inside) has no core of gradstep's to code state: it takes no state_codec.
ELEMENTWISE = [e for e in registry.entries() if e.sharding == "elementwise" and "state_codec" in e.hyperparameters()]
SHAPE = (64, 128)  # 8192 elements: coded by every codec (>= 4096, whole blocks)


def _values(seed: int = 0) -> torch.Tensor:
    """Values over six decades, as optimizer moments are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    return x * torch.logspace(-6, 0, x.numel())[torch.randperm(x.numel(), generator=g)].reshape(SHAPE)


# --- the quantizers against torchao (bit for bit) -------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizers_match_torchao(codec: str, signed: bool) -> None:
    pytest.importorskip("torchao")
    from torchao.optim import subclass_4bit, subclass_8bit, subclass_fp8

    x = _values() if signed else _values().abs()
    if codec == "int8":
        ref = subclass_8bit.OptimState8bit.zeros(x.shape, signed, 256)
        assert codecs.quantization_map("int8", signed).tolist() == list(
            subclass_8bit.get_qmap_signed() if signed else subclass_8bit.get_qmap_unsigned()
        )
    elif codec == "int4":
        ref = subclass_4bit.OptimState4bit.zeros(x.shape, signed, 128)
        assert codecs.quantization_map("int4", signed).tolist() == list(
            subclass_4bit.get_qmap_signed() if signed else subclass_4bit.get_qmap_unsigned()
        )
    else:
        ref = subclass_fp8.OptimStateFp8.zeros(x.shape, 256)
    ref.copy_(x)
    parts = codecs.encode(codec, x, signed)
    assert torch.equal(parts[""], ref.codes)
    assert torch.equal(parts["_scale"], ref.scale)
    assert torch.equal(codecs.decode(codec, parts, signed, x.shape, torch.float32), ref.dequantize())


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("signed", [True, False])
def test_table_quantizer_equals_torchao_rounding(codec: str, signed: bool) -> None:
    """The lookup-table quantizer gives torchao's search-and-round code for every scaled value tried: each decision
    threshold and the floats either side of it, each map entry and its neighbours, every 4099th float32 in [-1, 1],
    signed zeros, subnormals and NaN."""
    qmap = codecs.quantization_map(codec, signed)
    midpoints = (qmap[:-1] + qmap[1:]) / 2  # the thresholds lie within float32 rounding of them
    bits = torch.arange(0, 1 << 32, 4099, dtype=torch.int64)
    sweep = torch.where(bits < 1 << 31, bits, bits - (1 << 32)).to(torch.int32).view(torch.float32)
    down, up = torch.tensor(-torch.inf), torch.tensor(torch.inf)
    values = [sweep[sweep.abs() <= 1], torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45])]
    for exact in (midpoints, qmap):
        for _ in range(3):
            values += [exact, torch.nextafter(exact, down), torch.nextafter(exact, up)]
            exact = torch.nextafter(exact, down)
    scaled = (torch.cat(values) if signed else torch.cat(values).abs()).clamp(-1, 1)
    # Blocks led by a 1.0: their absmax is 1, so the quantizer rounds exactly these values; a last block of NaN.
    block = codecs.BLOCK_SIZES[codec]
    scaled = torch.cat([scaled, scaled.new_zeros(-scaled.numel() % (block - 1))]).reshape(-1, block - 1)
    x = torch.cat([torch.ones(scaled.shape[0], 1), scaled], dim=1)
    x = torch.cat([x, torch.full((1, block), torch.nan)])
    codes, scale = codecs.quantize_blockwise(x, codec, signed)
    assert torch.equal(scale[:-1], torch.ones_like(scale[:-1])) and scale[-1].isnan()
    assert torch.equal(codes.long(), codecs.nearest_codes_reference(x / scale.view(-1, 1), qmap))


@pytest.mark.parametrize(("codec", "name"), [("int8", "AdamW8bit"), ("int4", "AdamW4bit"), ("fp8", "AdamWFp8")])
def test_adamw_steps_match_torchao(codec: str, name: str) -> None:
    """One step from zero state: the same codes, scales and parameters (to float32 rounding) as torchao's AdamW."""
    torchao_optim = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    p0 = torch.randn(SHAPE)
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    hypers = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    opt = gradstep.AdamW([ours], state_codec=codec, **hypers)
    ref = getattr(torchao_optim, name)([theirs], **hypers)
    grad = torch.randn(SHAPE)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", lambda fn, **_: fn)  # torchao compiles its step: run it eagerly, same math
        ref.step()
    # torchao forms the second moment as (1 - beta2) * g.square() (a lerp from zero), gradstep's Adam as an addcmul:
    # the moments can differ by a float32 rounding, so scales by an ULP and a rare code by one step.
    for key in ("exp_avg", "exp_avg_sq"):
        theirs_state = ref.state[theirs][key]
        scale = opt.state[ours][key + "_scale"]
        assert ((scale - theirs_state.scale).abs() <= 2 * torch.finfo(torch.float32).eps * scale).all(), key
        codes, their_codes = opt.state[ours][key], theirs_state.codes
        if codec == "fp8":
            codes, their_codes = codes.float(), their_codes.float()
            assert ((codes - their_codes).abs() <= 0.125 * codes.abs()).all(), key
        else:
            steps = (codes.int() - their_codes.int()).abs()
            assert steps.max().item() <= (1 if codec == "int8" else 17) and (steps > 0).float().mean() <= 1e-3, key
    # |p| < 4 and a step of at most ~lr: a few float32 roundings of the parameter.
    assert (ours - theirs).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * 4


# --- bitsandbytes: its documented blockwise quantizer and its 8-bit AdamW ----------------------------------------
def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("signed", [True, False])
def test_int8_matches_bitsandbytes_dynamic_map(signed: bool) -> None:
    """bitsandbytes' dynamic map exactly; its reference (pure torch) blockwise quantizer rounds to the nearest map
    entry by midpoints of ``x * (1 / absmax)``: ours (torchao's ``x / absmax``) differs only where the scaled value
    lies within float32 rounding of a midpoint."""
    _bnb()
    import bitsandbytes.functional as F

    qmap = F.create_dynamic_map(signed=signed)
    assert torch.equal(qmap, codecs.quantization_map("int8", signed))
    x = _values(1) if signed else _values(1).abs()
    theirs, absmax = _bnb_reference_quantize(x, qmap, 256)
    parts = codecs.encode("int8", x, signed)
    assert torch.equal(parts["_scale"], absmax)
    scaled = (x.reshape(-1, 256) / absmax.view(-1, 1)).reshape(-1).double()
    mids = ((qmap[:-1] + qmap[1:]) / 2).double()
    differ = (parts[""].reshape(-1) != theirs.reshape(-1)).nonzero().flatten()
    if differ.numel():
        distance = (scaled[differ, None] - mids[None, :]).abs().amin(1)
        assert distance.max().item() <= 2 * torch.finfo(torch.float32).eps
    assert differ.numel() <= x.numel() // 1000


def _bnb_reference_quantize(x: torch.Tensor, qmap: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes 0.50's default-backend quantize_blockwise (backends/default/ops.py), for whole blocks."""
    blocks = x.reshape(-1, block).float()
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    bounds = (qmap[:-1] + qmap[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).reshape(x.shape), absmax


def test_adamw_step_close_to_bitsandbytes_adamw8bit() -> None:
    """bitsandbytes' AdamW8bit runs on this CPU: one step from zero state gives the same parameters (to float32
    rounding) and scales; its CPU kernel searches the map approximately (a few codes land on a neighbouring entry,
    within 2% of the block's absmax), where ours takes the nearest entry."""
    bnb = _bnb()
    torch.manual_seed(1)
    p0 = torch.randn(SHAPE)
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt = gradstep.AdamW([ours], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, state_codec="int8")
    ref = bnb.optim.AdamW8bit([theirs], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    grad = torch.randn(SHAPE)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    state = ref.state[theirs]
    moments = {"exp_avg": ("state1", "absmax1", 0.1 * grad), "exp_avg_sq": ("state2", "absmax2", 0.01 * grad**2)}
    for key, (codes, absmax, exact) in moments.items():
        signed = key == "exp_avg"
        scale = opt.state[ours][key + "_scale"]
        assert torch.equal(scale, state[absmax])
        qmap = codecs.quantization_map("int8", signed)
        mine = codecs.dequantize_blockwise(opt.state[ours][key], qmap, scale)
        their = codecs.dequantize_blockwise(state[codes], qmap, state[absmax])
        assert (opt.state[ours][key] != state[codes]).float().mean() < 0.05
        assert ((mine - their).abs().reshape(-1, 256).amax(1) <= 0.02 * scale).all()
        assert (mine - exact).abs().sum() <= (their - exact).abs().sum()  # nearest entry: never a larger error
    assert (ours - theirs).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * 4


# --- bf16+ecc ---------------------------------------------------------------------------------------------------------
def test_bf16_ecc_error_bound() -> None:
    """heavyball's error correction: the int8 term stores the bf16 rounding error to 1/254 of a bf16 ULP."""
    x = _values(2)
    parts = codecs.encode("bf16+ecc", x, True)
    back = codecs.decode("bf16+ecc", parts, True, x.shape, torch.float32)
    plain = x.to(torch.bfloat16).float()
    ulp = torch.finfo(torch.bfloat16).eps * x.abs()
    assert ((back - x).abs() <= ulp / 254 * 1.01 + 1e-30).all()
    assert (back - x).abs().mean() < (plain - x).abs().mean() / 50


# --- every element-wise optimizer with every codec --------------------------------------------------------------------
BOUNDS = {"bf16+ecc": 2e-3, "bf16": 3e-2, "fp8": 0.15, "int8": 0.1, "int4": 0.35, "int4+sr": 0.35}
"""Relative difference of the parameters' movement from fp32 state after a few steps."""


def _run(
    entry: registry.Entry, codec: str, steps: int = 4, **extra: object
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(SHAPE)), torch.nn.Parameter(torch.randn(7))]
    opt = entry(params, **{**entry.example, **extra, "state_codec": codec})
    for t in range(steps):
        for p in params:
            p.grad = torch.sin(3 * p.detach() + t) + 0.3 * p.detach()
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("entry", ELEMENTWISE, ids=lambda e: e.name)
def test_every_elementwise_optimizer_accepts_every_codec(entry: registry.Entry, codec: str) -> None:
    probe = entry([torch.nn.Parameter(torch.zeros(3))], **entry.example)
    if _refused(probe):
        with pytest.raises(ValueError, match="state_codec"):
            entry([torch.nn.Parameter(torch.zeros(3))], **{**entry.example, "state_codec": codec})
        return
    torch.manual_seed(0)
    start = torch.randn(SHAPE)
    exact, _ = _run(entry, "fp32")
    coded, opt = _run(entry, codec)
    assert all(torch.isfinite(p).all() for p in coded)
    moved = (exact[0] - start).norm()
    if moved > 0:
        assert ((coded[0] - exact[0]).norm() / moved).item() <= BOUNDS[codec]
    big = opt.param_groups[0]["params"][0]
    stored = {k: v for k, v in opt.state[big].items() if k != "step" and isinstance(v, torch.Tensor)}
    if codec in ("int8", "int4", "int4+sr", "fp8", "bf16+ecc") and isinstance(opt, ChainedOptimizer):
        # (wrappers such as Lookahead keep their own slow weights in full precision; their inner optimizer codes)
        assert not any(v.dtype == torch.float32 and v.shape == big.shape for v in stored.values()), stored.keys()


def _refused(opt: torch.optim.Optimizer) -> bool:
    """Optimizers that read their state outside the chain (schedule-free's train/eval switch, model-wide estimates)
    or step sparse gradients only: they refuse every codec but fp32."""
    inner = getattr(opt, "optimizer", opt)
    if not isinstance(inner, ChainedOptimizer):
        return False
    return type(inner)._prepare_step is not ChainedOptimizer._prepare_step or inner._sparse_gradients() == "required"


BYTES = {"int8": 2.1, "int4": 1.1, "int4+sr": 1.1, "bf16+ecc": 6.0, "bf16": 4.0, "fp8": 2.1}


@pytest.mark.parametrize("codec", CODECS)
def test_adamw_state_bytes_per_parameter(codec: str) -> None:
    _, opt = _run(registry.get("adamw"), codec, steps=1)
    big = opt.param_groups[0]["params"][0]
    size = sum(v.numel() * v.element_size() for k, v in opt.state[big].items() if k != "step")
    assert size / big.numel() <= BYTES[codec]
    small = opt.param_groups[0]["params"][1]  # below the threshold: fp32 as today
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in opt.state[small]


@pytest.mark.parametrize("codec", ["int8", "int4", "int4+sr", "bf16+ecc"])
@pytest.mark.parametrize("entry", ELEMENTWISE, ids=lambda e: e.name)
def test_sliced_eager_step_matches_whole_tensor(entry: registry.Entry, codec: str) -> None:
    """A coded parameter larger than chunk_numel is stepped slice by slice (element-wise chains): bit for bit the
    whole-tensor step, parameters and every state tensor (scalars such as ``step`` stepped once)."""
    probe = entry([torch.nn.Parameter(torch.zeros(3))], **entry.example)
    if _refused(probe):
        return
    whole, a = _run(entry, codec, chunk_numel=0)
    sliced, b = _run(entry, codec, chunk_numel=1000)  # slices of 768 elements of the 8192
    assert all(torch.equal(x, y) for x, y in zip(whole, sliced))
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert a.state[pa].keys() == b.state[pb].keys()
        for key, value in a.state[pa].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b.state[pb][key]), key


def test_sliced_eager_step_bounds_peak_memory() -> None:
    """The extra memory of an eager int8 AdamW step on a 2**20-element parameter is bounded by the slice, not by
    the parameter: a whole-tensor decode holds both moments in fp32 (8 MiB) and more."""
    from gradstep.lab.bench_codecs import peak_extra_bytes

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    p.grad = torch.randn_like(p)
    peaks = {}
    for chunk in (0, 1 << 16):
        opt = gradstep.AdamW([p], lr=1e-3, state_codec="int8", chunk_numel=chunk)
        opt.step()
        peaks[chunk] = peak_extra_bytes(opt.step)
    assert peaks[0] >= 8 << 20
    assert peaks[1 << 16] <= 2 << 20  # slices of 65536 elements: 256 KiB per fp32 buffer


# --- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_coded_state_round_trips_weights_only(codec: str) -> None:
    _, opt = _run(registry.get("adamw"), codec, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    other = gradstep.AdamW(params, state_codec=codec)
    other.load_state_dict(saved)
    for p, q in zip(opt.param_groups[0]["params"], params):
        for key, value in opt.state[p].items():
            assert torch.equal(value, other.state[q][key]), key
    for p, q in zip(opt.param_groups[0]["params"], params):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    other.step()
    assert all(torch.equal(p, q) for p, q in zip(opt.param_groups[0]["params"], params))


@pytest.mark.parametrize(
    ("key", "corrupt", "message"),
    [
        ("exp_avg", lambda v: v.float(), "exp_avg has dtype torch.float32"),
        ("exp_avg_scale", lambda v: v[:-1], "exp_avg_scale has shape"),
        ("exp_avg_sq", lambda v: v.to(torch.int8), "exp_avg_sq has dtype torch.int8"),
    ],
)
def test_corrupt_coded_state_refused(key: str, corrupt, message: str) -> None:
    _, opt = _run(registry.get("adamw"), "int8", steps=1)
    sd = opt.state_dict()
    sd["state"][0][key] = corrupt(sd["state"][0][key])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"param_groups\\[0\\]\\['params'\\]\\[0\\].*{message}"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][0][k], after["state"][0][k]) for k in before["state"][0])


def test_state_saved_with_another_codec_refused() -> None:
    _, opt = _run(registry.get("adamw"), "fp32", steps=1)
    params = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    other = gradstep.AdamW(params, state_codec="int8")
    sd = opt.state_dict()
    sd["param_groups"][0]["state_codec"] = "int8"
    with pytest.raises(ValueError, match="lacks exp_avg_scale.*convert_state_codec"):
        other.load_state_dict(sd)


# --- refusals ---------------------------------------------------------------------------------------------------------
def test_unknown_codec_refused() -> None:
    with pytest.raises(ValueError, match="state_codec"):
        gradstep.AdamW([torch.nn.Parameter(torch.zeros(3))], state_codec="int3")


def test_codec_refused_for_complex_parameters() -> None:
    z = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="state_codec='int8'.*complex64"):
        gradstep.AdamW([z], state_codec="int8")


def test_codec_refused_for_a_buffer_that_is_not_elementwise() -> None:
    """Adafactor's factored second moment (a row and a column vector) cannot be coded element by element."""
    w = torch.nn.Parameter(torch.zeros(64, 128))
    opt = registry.get("adafactor")([w], lr=1e-3)
    with pytest.raises(ValueError, match="state_codec='int8' cannot store .* of parameter"):
        registry.get("adafactor")([w], lr=1e-3, state_codec="int8")
    with pytest.raises(ValueError, match="state_codec"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(8, 8))], "state_codec": "int8"})
    assert len(opt.param_groups) == 1


def test_codec_refused_for_whole_model_optimizers() -> None:
    with pytest.raises(ValueError, match="state_codec must be 'fp32'"):
        registry.get("prodigy")([torch.nn.Parameter(torch.zeros(3))], state_codec="int8")


@pytest.mark.parametrize("codec", ["int8", "int4+sr", "bf16+ecc"])
def test_compiled_path_decodes_and_encodes_inside(codec: str) -> None:
    """compiled=True runs decode, update and encode in one compiled function: the same state as the eager path, to
    the rounding that fused float32 arithmetic may change (a code moves by at most one step)."""
    eager, a = _run(registry.get("adamw"), codec, steps=3)
    compiled, b = _run(registry.get("adamw"), codec, steps=3, compiled=True)
    if codec == "int4+sr":
        # The dither hashes each value's bits: where fused arithmetic changes a moment's last bit, its draw (and at
        # most its code, by one level) changes too: such a parameter moves differently by at most lr per step
        # (lr 0.02, 3 steps), the others agree.
        assert ((eager[0] - compiled[0]).abs() <= 3 * 0.02).all()
        assert ((eager[0] - compiled[0]).abs() <= 1e-5).float().mean() > 0.8
    else:
        assert ((eager[0] - compiled[0]).abs() <= 1e-5).all()
    big_a, big_b = a.param_groups[0]["params"][0], b.param_groups[0]["params"][0]
    assert a.state[big_a]["exp_avg"].dtype == b.state[big_b]["exp_avg"].dtype
    if codec == "int8":
        assert (a.state[big_a]["exp_avg"].int() - b.state[big_b]["exp_avg"].int()).abs().max() <= 1


@pytest.mark.parametrize(
    ("source", "target"), [("fp32", "int8"), ("int8", "int4"), ("int4", "bf16+ecc"), ("fp8", "fp32")]
)
def test_convert_state_codec_between_checkpoints(source: str, target: str) -> None:
    _, opt = _run(registry.get("adamw"), source, steps=2)
    saved = opt.state_dict()
    params = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    other = gradstep.AdamW(params, state_codec=target)
    # The groups carry their codec: loaded as saved, a dict restores its own codec (as any hyperparameter). A dict
    # relabelled to the target codec without converting its state is refused.
    relabelled = {**saved, "param_groups": [{**saved["param_groups"][0], "state_codec": target}]}
    with pytest.raises(ValueError, match="convert_state_codec"):
        other.load_state_dict(relabelled)
    converted = gradstep.convert_state_codec(other, saved)
    other.load_state_dict(converted)
    assert saved["state"][0]["exp_avg"].dtype == opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype
    big_old, big_new = opt.param_groups[0]["params"][0], params[0]
    exact = _decoded(opt, big_old, source)
    again = _decoded(other, big_new, target)
    tolerance = {"fp32": 0.0, "bf16+ecc": 1e-3, "int8": 0.03, "int4": 0.2}[target]
    for key in ("exp_avg", "exp_avg_sq"):
        assert ((again[key] - exact[key]).norm() <= tolerance * exact[key].norm()).item(), key


def _decoded(opt: Any, p: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    state = opt.state[p]
    out = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        if codec == "fp32":
            out[key] = state[key]
            continue
        parts = {suffix: state[key + suffix] for suffix in codecs.PART_SUFFIXES if key + suffix in state}
        out[key] = codecs.decode(codec, parts, signed, p.shape, torch.float32)
    return out


def test_convert_state_codec_refuses_corrupt_parts() -> None:
    _, opt = _run(registry.get("adamw"), "int8", steps=1)
    saved = opt.state_dict()
    saved["state"][0]["exp_avg_scale"] = saved["state"][0]["exp_avg_scale"][:3]
    other = gradstep.AdamW([torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]])
    with pytest.raises(ValueError, match=r"exp_avg_scale of param_groups\[0\]\['params'\]\[0\]"):
        gradstep.convert_state_codec(other, saved)


# --- one process and FSDP2: the parts' layouts, the buffers each codes ---------------------------------------------
ROWS_SHAPE = (32, 256)  # rows of whole blocks of every codec: FSDP2 codes it too (see test_distributed.py)
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))


def _rows_run(codec: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """AdamW on a matrix of whole-block rows and a 1-D bias of 8192 elements (coded in one process, but rows of one
    element under FSDP2, which leaves it in the state dtype), 2 steps."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ROWS_SHAPE)), torch.nn.Parameter(torch.randn(8192))]
    opt = gradstep.AdamW(params, lr=1e-2, state_codec=codec)
    for t in range(2):
        for p in params:
            p.grad = torch.sin(3 * p.detach() + t)
        opt.step()
    return params, opt


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape and bits (float8 through its bytes: torch.equal has no float8 kernel)."""
    if a.is_floating_point() and a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and torch.equal(a, b)


def _in_rows(state: dict[str, Any], codec: str) -> dict[str, Any]:
    """The matrix's state with its parts laid out as a full (gathered) FSDP2 state holds them: one row per row."""
    state = dict(state)
    for key, _ in MOMENTS:
        for part, template in codecs.part_templates(codec, key, ROWS_SHAPE, "meta", rows=True).items():
            state[part] = state[part].reshape(template.shape)
    return state


@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
def test_load_takes_the_fsdp2_row_layout_of_coded_parts(codec: str) -> None:
    """One process's load takes the row layout of int4's codes and the scales (the same elements in the same order),
    stored flat; a part of another number of elements is still refused, naming the parameter, and changes nothing."""
    params, opt = _rows_run(codec)
    saved = opt.state_dict()
    rows = {**saved, "state": {**saved["state"], 0: _in_rows(saved["state"][0], codec)}}
    assert rows["state"][0]["exp_avg_scale"].shape != saved["state"][0]["exp_avg_scale"].shape
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = gradstep.AdamW(fresh, lr=1e-2, state_codec=codec)
    other.load_state_dict(rows)
    for p, q in zip(params, fresh):
        for key, value in opt.state[p].items():
            assert _bitwise_equal(value, other.state[q][key]), key
    before = copy.deepcopy(other.state_dict())
    rows["state"][0] = {**rows["state"][0], "exp_avg_scale": rows["state"][0]["exp_avg_scale"][:-1]}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: exp_avg_scale has shape \(31, "):
        other.load_state_dict(rows)
    after = other.state_dict()
    assert all(_bitwise_equal(before["state"][0][k], after["state"][0][k]) for k in before["state"][0])


@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
def test_convert_state_codec_brings_a_full_fsdp2_state_to_one_process(codec: str) -> None:
    """A full FSDP2 state differs from one process's in its parts' row layout and in the buffers it codes (not the
    1-D bias). With the same codec, convert_state_codec keeps the matrix's codes bit for bit, laid out flat, and
    codes the bias as a step would; the plain load refuses the uncoded bias, pointing to convert_state_codec."""
    params, opt = _rows_run(codec)
    saved = opt.state_dict()
    bias = dict(saved["state"][1])
    decoded = {}
    for key, signed in MOMENTS:
        parts = {suffix: bias.pop(key + suffix) for suffix in ("", "_scale")}
        decoded[key] = bias[key] = codecs.decode(codec, parts, signed, torch.Size((8192,)), torch.float32)
    fsdp = {**saved, "state": {0: _in_rows(saved["state"][0], codec), 1: bias}}
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = gradstep.AdamW(fresh, lr=1e-2, state_codec=codec)
    with pytest.raises(ValueError, match=r"params'\]\[1\] lacks exp_avg_scale.*FSDP2.*convert_state_codec"):
        other.load_state_dict(fsdp)
    converted = gradstep.convert_state_codec(other, fsdp)
    for key, value in saved["state"][0].items():
        assert _bitwise_equal(value, converted["state"][0][key]), key
    for key, signed in MOMENTS:
        for suffix, part in codecs.encode(codec, decoded[key], signed).items():
            assert _bitwise_equal(converted["state"][1][key + suffix], part), key + suffix
    assert fsdp["state"][0]["exp_avg_scale"].dim() == 2 and "exp_avg_scale" not in fsdp["state"][1]  # not modified
    other.load_state_dict(converted)
    for p, q in zip(params, fresh):
        p.grad, q.grad = torch.cos(p.detach()), torch.cos(p.detach())
    opt.step()
    other.step()
    assert torch.equal(params[0], fresh[0])  # the same codes: the same step
    assert (params[1] - fresh[1]).abs().max() <= 2e-3  # the bias's codes re-rounded (lr 1e-2)


@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
def test_row_shards_code_as_the_whole_tensor(codec: str) -> None:
    """FSDP2's shards of rows of whole blocks (uneven, one empty) coded one by one give the whole tensor's parts."""
    x = _values()[:17, :].reshape(17, 128).repeat(1, 2)  # rows of 256: whole blocks of every codec
    assert codecs.codec_applies(codec, x, x, rows=True)
    assert not codecs.codec_applies(codec, x.reshape(-1, 8), x.reshape(-1, 8), rows=True)  # rows of 8 elements
    whole = codecs.encode(codec, x, True)
    shards = [codecs.encode(codec, x[rows], True) for rows in (slice(0, 9), slice(9, 17), slice(17, 17))]
    for suffix, part in whole.items():
        joined = torch.cat([shard[suffix].reshape(-1).view(torch.uint8) for shard in shards])
        assert torch.equal(joined, part.reshape(-1).view(torch.uint8)), suffix
    empty = codecs.decode(codec, shards[2], True, torch.Size((0, 256)), torch.float32)
    assert empty.shape == (0, 256)
    templates = codecs.part_templates(codec, "m", (17, 256), "meta", rows=True)
    assert tuple(templates["m_scale"].shape) == (17, 256 // codecs.BLOCK_SIZES[codec])
    assert tuple(templates["m"].shape) == ((17, 128) if codec == "int4" else (17, 256))


# --- int4+sr: int4 with stochastic rounding of signed buffers ------------------------------------------------------


def _ema_of_a_constant(codec: str, steps: int = 400) -> torch.Tensor:
    """Each step's value of a coded first moment m <- lerp(m, g, 0.1) (Adam's beta1 = 0.9): half the elements' g is
    about 0.05, the other half's 1.0, the block maximum; 0.05 lies between the signed map's levels 0.0325 and 0.0775."""
    g = torch.ones(4096)
    g[::2] = 0.05 + 0.002 * torch.linspace(-1, 1, 2048)  # distinct values: each element draws on its own
    parts = codecs.encode(codec, torch.zeros(4096), True)
    seen = []
    for t in range(1, steps + 1):
        m = codecs.decode(codec, parts, True, g.shape, torch.float32)
        m.lerp_(g, 0.1)
        parts = codecs.encode(codec, m, True, torch.tensor(float(t), dtype=torch.float64))
        seen.append(codecs.decode(codec, parts, True, g.shape, torch.float32)[::2].mean())
    return torch.stack(seen)


def test_int4_sr_moment_reaches_a_value_between_levels_on_average() -> None:
    # Rounded to the nearest level, an increment of 0.1 * (0.05 - 0.0325) never moves the moment off 0.0325: it stays
    # 35% low for ever. Rounded stochastically, it is right on average.
    nearest, stochastic = _ema_of_a_constant("int4"), _ema_of_a_constant("int4+sr")
    assert torch.allclose(nearest[100:], torch.full_like(nearest[100:], 0.0325), rtol=1e-4)
    assert abs(float(stochastic[100:].mean()) - 0.05) < 0.003


def test_int4_sr_rounds_to_a_neighbouring_level_without_bias() -> None:
    qmap = codecs.quantization_map("int4", signed=True)
    gen = torch.Generator().manual_seed(0)
    lo = torch.randint(0, 15, (1 << 16,), generator=gen)
    fraction = torch.rand(1 << 16, generator=gen)
    values = qmap[lo] + fraction * (qmap[lo + 1] - qmap[lo])
    codes = codecs.stochastic_codes(values, qmap, torch.tensor(3.0, dtype=torch.float64)).long()
    assert bool(((codes == lo) | (codes == lo + 1)).all())
    # Taken up with probability `fraction`: the mean error, in units of the gap, is near 0 (nearest: +-0.25 on average).
    gap = qmap[lo + 1] - qmap[lo]
    error = (qmap[codes] - values) / gap
    assert abs(float(error.mean())) < 0.01
    assert abs(float((codes == lo + 1).float().mean() - fraction.mean())) < 0.01
    # The same values and step give the same codes; another step draws again.
    again = codecs.stochastic_codes(values, qmap, torch.tensor(3.0, dtype=torch.float64)).long()
    other = codecs.stochastic_codes(values, qmap, torch.tensor(4.0, dtype=torch.float64)).long()
    assert torch.equal(codes, again) and not torch.equal(codes, other)


def test_int4_sr_codes_second_moments_as_int4() -> None:
    x = torch.rand(1 << 14, generator=torch.Generator().manual_seed(1))
    step = torch.tensor(5.0, dtype=torch.float64)
    a, b = codecs.encode("int4", x, False), codecs.encode("int4+sr", x, False, step)
    assert torch.equal(a[""], b[""]) and torch.equal(a["_scale"], b["_scale"])
    # and decodes like int4, with the same parts and bytes
    assert torch.equal(
        codecs.decode("int4", a, False, x.shape, torch.float32),
        codecs.decode("int4+sr", b, False, x.shape, torch.float32),
    )


# --- the fast path (compiled=True) with codecs: every element-wise optimizer with every codec ------------------------
# 252 compilations, about 8 minutes on 2 cores with an empty inductor cache (2 s each, the first of an optimizer more).
COMPILED_PAIRS = [(entry, codec) for entry in ELEMENTWISE for codec in CODECS]


@pytest.mark.parametrize(("entry", "codec"), COMPILED_PAIRS, ids=[f"{e.name}-{c}" for e, c in COMPILED_PAIRS])
def test_every_elementwise_optimizer_steps_coded_state_on_the_fast_path(entry: registry.Entry, codec: str) -> None:
    probe = entry([torch.nn.Parameter(torch.zeros(3))], **entry.example)
    if _refused(probe) or "compiled" not in entry.hyperparameters():
        return  # refusing every codec is tested above; an optimizer without a fast path has nothing to compile
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    start = torch.randn(SHAPE)
    eager, a = _run(entry, codec)
    compiled, b = _run(entry, codec, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1, "the fast path compiled nothing"
    assert all(torch.isfinite(p).all() for p in compiled)
    moved = (eager[0] - start).norm()
    if moved > 0:
        # Fused float32 arithmetic may move a value across a rounding threshold of the codec: the two runs agree to the
        # codec's own error (the bound against fp32 state of the test above).
        assert ((compiled[0] - eager[0]).norm() / moved).item() <= BOUNDS[codec]
    big_a, big_b = a.param_groups[0]["params"][0], b.param_groups[0]["params"][0]
    inner_a, inner_b = getattr(a, "optimizer", a), getattr(b, "optimizer", b)
    stored_a = {k: (v.dtype, v.shape) for k, v in inner_a.state[big_a].items() if isinstance(v, torch.Tensor)}
    stored_b = {k: (v.dtype, v.shape) for k, v in inner_b.state[big_b].items() if isinstance(v, torch.Tensor)}
    assert stored_a == stored_b, "the fast path stores the coded parts as the eager path does"


def test_int4_sr_table_path_equals_the_search() -> None:
    # The encoder finds the lower level from the nearest code (two table reads); the search is the definition.
    qmap = codecs.quantization_map("int4", signed=True)
    tables = codecs._tables("int4", True, "cpu")
    up, down = torch.full_like(qmap, 2.0), torch.full_like(qmap, -2.0)
    x = torch.cat([torch.linspace(-1, 1, 1 << 20), qmap, torch.nextafter(qmap, up), torch.nextafter(qmap, down)])
    salt = torch.tensor(9.0, dtype=torch.float64)
    assert torch.equal(codecs.stochastic_codes(x, qmap, salt), codecs.stochastic_codes(x, qmap, salt, tables))

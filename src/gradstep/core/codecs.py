"""State codecs: optimizer state kept in fewer bits than fp32, decoded for the math and encoded after it.

A codec stores one element-wise state buffer (shaped like its parameter) as *parts* under the buffer's own state
key and, where it needs them, under derived keys:

========== ============================================== ================================= ===============
codec      ``state[key]``                                 extra part                        bytes / element
========== ============================================== ================================= ===============
fp32       the state dtype (today's layout)               none                              4
bf16       bfloat16, round to nearest even                none                              2
bf16+ecc   bfloat16, round to nearest even                ``key + "_ecc"``: int8, the error 3
                                                          in units of half a bf16 ULP / 127
int8       uint8 codes into a 256-entry map, like the     ``key + "_scale"``: fp32 absmax   1 + 4/256
           parameter                                      per block of 256
int4       uint8, two 4-bit codes a byte, flat            ``key + "_scale"``: fp32 absmax   0.5 + 4/128
                                                          per block of 128
int4+sr    as int4                                        as int4                           0.5 + 4/128
fp8        float8_e4m3fn, like the parameter              ``key + "_scale"``: fp32 per      1 + 4/256
                                                          block of 256 (absmax / 448)
========== ============================================== ================================= ===============

The block-wise schemes are torchao's low-bit optimizer states (``torchao.optim``: OptimState8bit, OptimState4bit,
OptimStateFp8), reproduced bit for bit: a block's values are divided by their absolute maximum (clipped at 1e-12)
and each is rounded to the nearest entry of a quantization map. int8 uses bitsandbytes' dynamic-tree map (signed
for first moments, unsigned for second moments); int4 the signed dynamic map with 3 exponent bits for first moments
and the linear map without zero (lpmm's) for second moments. The rounding is torchao's search, computed with two
reads of lookup tables indexed by a value's top bits (:func:`_build_tables`), which vectorise. As torchao and
bitsandbytes do, a buffer with fewer than :data:`MIN_NUMEL` elements, or (block-wise codecs) not a whole number of
blocks, stays in the state dtype; blocks never straddle two tensors.

Under FSDP2 (a DTensor parameter split along dim 0) each rank codes its own shard, decided from the whole shape so
that every rank decides alike: block-wise codecs only where every row is a whole number of blocks (then every shard
is too, and its codes and scales are those of the whole tensor; nothing is communicated). The parts are DTensors
split like the parameter; int4's codes and the scales are laid out one row per parameter row
(:func:`part_templates` with ``rows``) instead of flat. :func:`convert_state_codec` converts such state on each rank
alone, and brings a checkpoint from FSDP2 to one process or back: it lays the parts out as the optimizer stores them
and codes (or decodes) the buffers that one process codes and FSDP2 does not (rows that are not whole blocks); a
single process's ``load_state_dict`` also takes the row layout as it is.

int4+sr is int4 with the first moments (signed buffers) rounded stochastically instead of to the nearest level
(:func:`stochastic_codes`; second moments as int4). An exponential average that moves by less than half a level per
step never leaves its level when rounded to the nearest one, which is most of what int4 costs in training; rounded
stochastically it is right on average. The draw is a hash of the value and the step count (:func:`dither`), so it
needs no generator state and gives the same codes whole, sliced, sharded or compiled (up to the last bit that fused
arithmetic may change in a value). Stochastic rounding of 4-bit states is an option of lpmm (Li et al., 2023,
"Memory Efficient Optimizers with 4-bit States"), not its default, and not torchao's scheme.

bf16+ecc is heavyball's error-corrected bf16: the bf16 value plus an int8 correction that stores what rounding to
bf16 lost, in units of ``ULP / 254``; decoding adds it back (about 16 significant bits for 3 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CODECS",
    "MIN_NUMEL",
    "NONNEGATIVE_BUFFERS",
    "BLOCK_SIZES",
    "PART_SUFFIXES",
    "codec_applies",
    "convert_state_codec",
    "decode",
    "dequantize_blockwise",
    "dither",
    "dynamic_map",
    "encode",
    "encode_sharded",
    "is_dtensor",
    "part_slice",
    "part_templates",
    "nearest_codes_reference",
    "quantization_map",
    "quantize_blockwise",
    "stochastic_codes",
]

HAS_FP8 = hasattr(torch, "float8_e4m3fn")
CODECS: tuple[str, ...] = ("fp32", "bf16", "bf16+ecc", "int8", "int4", "int4+sr") + (("fp8",) if HAS_FP8 else ())
MIN_NUMEL = 4096
"""Buffers with fewer elements stay in the state dtype (bitsandbytes' ``min_8bit_size``, torchao's threshold)."""
BLOCK_SIZES = {"int8": 256, "int4": 128, "int4+sr": 128, "fp8": 256}
PACKED = frozenset({"int4", "int4+sr"})
"""Codecs that pack two 4-bit codes a byte (flat, or one row per parameter row under FSDP2)."""

NONNEGATIVE_BUFFERS = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "exp_inf", "sum", "square_avg", "acc_delta", "exp_avg_var", "max_exp_avg_var"}
)
"""State keys that hold non-negative values (second moments): the unsigned quantization maps serve them. A transform
declares others with :attr:`~gradstep.core.transform.Transform.nonnegative_buffers`."""


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """bitsandbytes' dynamic-tree quantization map (``create_dynamic_map``), as torchao builds it (no zero padding).

    Each exponent ``i`` (a power of ten from ``10**-(max_exponent_bits - 1)`` to 1) gets the midpoints of a linear
    split of [0.1, 1] into more and more fractions; the map is completed with 0 and 1 and sorted.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits
        fraction_items = int(2**shift + 1 if signed else 2 ** (shift + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"a dynamic map of {total_bits} bits needs {2**total_bits} entries, got {len(data)}")
    return sorted(data)


def _map_values_of(codec: str, signed: bool) -> tuple[float, ...]:
    if codec == "int8":
        return tuple(dynamic_map(signed))
    if signed:
        return tuple(dynamic_map(True, 3, 4))
    return tuple(torch.linspace(0, 1, 17)[1:].tolist())  # lpmm's linear map without zero


# Built once at import (compiled code then reads constants instead of tracing the construction).
_MAPS = {(codec, signed): _map_values_of(codec, signed) for codec in ("int8", "int4") for signed in (True, False)}


def _map_values(codec: str, signed: bool) -> tuple[float, ...]:
    return _MAPS[(codec, signed)]


def quantization_map(codec: str, signed: bool, device: Any = "cpu") -> Tensor:
    """The float32 map of ``"int8"`` (256 entries) or ``"int4"`` (16 entries), signed or unsigned (a copy)."""
    return _tables(codec, signed, device).qmap.clone()


def nearest_codes_reference(scaled: Tensor, qmap: Tensor) -> Tensor:
    """torchao's rounding of scaled values to map indices (int64), the definition the fast quantizer reproduces.

    A branchless binary search finds the code below (the largest map entry <= the value); the code above is taken
    when the value is at least half-way to it, in float32: ``scaled - low >= (high - low) * 0.5``.
    """
    n = qmap.numel()
    below = torch.where(scaled >= qmap[n // 2], n // 2, 0)
    step = n // 4
    while step:
        below = below + torch.where(scaled >= qmap[below + step], step, 0)
        step //= 2
    above = (below + 1).clamp(max=n - 1)
    low, high = qmap[below], qmap[above]
    return torch.where(scaled - low >= (high - low) * 0.5, above, below)


class _Tables(NamedTuple):
    """A map and the lookup tables that quantize to it and decode from it (see :func:`_build_tables`)."""

    qmap: Tensor  # float32 map
    pairs: Tensor  # (256, 2) float32: the two int4 values of each packed byte (high nibble first)
    base: Tensor  # uint8, per bucket of float32 values: the code of the bucket's lowest value
    rise: Tensor  # float32, per bucket: the value from which the code is base + 1 (NaN: none in the bucket)
    shift: int  # bucket of a value: (its int32 bits >> shift) + offset
    offset: int


def _float_key(x: Tensor) -> Tensor:
    """int64 keys that order float32 values as numbers (-0.0 and 0.0 alike)."""
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _float_of_key(key: Tensor) -> Tensor:
    return torch.where(key >= 0, key, -key - (1 << 31)).to(torch.int32).view(torch.float32)


def _build_tables(values: tuple[float, ...]) -> _Tables:
    """Lookup tables equivalent, value for value, to :func:`nearest_codes_reference` on the map ``values``.

    That rounding is monotone in the value, so it is the number of decision thresholds at or below the value, each
    the smallest float32 that reaches the next code (found exactly by bisection over the floats between two map
    entries). A value's top bits (sign, exponent and the first ``m`` mantissa bits) then name a bucket of floats that
    holds at most one threshold, with ``m`` the fewest bits for which that is true: the code is the bucket's base
    code, plus one from the bucket's threshold on. Two table reads and a comparison replace a search, and vectorise.
    """
    qmap = torch.tensor(values, dtype=torch.float32)
    n = qmap.numel()
    index = torch.arange(1, n)
    low, high = _float_key(qmap[:-1]), _float_key(qmap[1:])  # code(low) = j - 1 < j <= code(high) = j
    while bool((high - low > 1).any()):
        mid = (low + high) // 2
        reaches = nearest_codes_reference(_float_of_key(mid), qmap) >= index
        high, low = torch.where(reaches, mid, high), torch.where(reaches, low, mid)
    thresholds = _float_of_key(high)
    for mantissa_bits in range(2, 12):  # the fewest bits that give every threshold a bucket of its own
        shift = 23 - mantissa_bits
        if (thresholds.view(torch.int32) >> shift).unique().numel() == n - 1:
            break
    else:  # pragma: no cover - the maps' thresholds are far apart
        raise ValueError("a quantization map with thresholds closer than 2**-11 relative")
    offset = 1 << (8 + mantissa_bits)
    start = (torch.arange(2 * offset, dtype=torch.int64) - offset) << shift
    ends = torch.stack([start, start + (1 << shift) - 1]).to(torch.int32).view(torch.float32)
    lowest = ends.amin(0)
    base = torch.bucketize(lowest, thresholds)  # thresholds below the bucket (its own is counted by rise)
    rise = torch.full_like(lowest, torch.nan)
    rise[(thresholds.view(torch.int32) >> shift) + offset] = thresholds
    nan = lowest.isnan()  # exponent 255: NaN, whose code is 0 (+inf cannot be a scaled value)
    base, rise = base.masked_fill(nan, 0), rise.masked_fill(nan, torch.nan)
    pairs = torch.stack([qmap.repeat_interleave(16), qmap.repeat(16)], dim=-1) if n == 16 else qmap.new_empty(0, 2)
    return _Tables(qmap, pairs, base.to(torch.uint8), rise.float(), shift, offset)


_TABLES: dict[tuple[str, bool, str], _Tables] = {}


@torch.compiler.disable
def _tables_of(codec: str, signed: bool, device: str) -> _Tables:
    """Built on first use, on the CPU (milliseconds), and copied to other devices; compiled code reads the cache."""
    cpu = _TABLES.get((codec, signed, "cpu")) or _build_tables(_map_values(codec, signed))
    _TABLES[(codec, signed, "cpu")] = cpu
    moved = cpu._replace(**{name: getattr(cpu, name).to(device) for name in ("qmap", "pairs", "base", "rise")})
    return _TABLES.setdefault((codec, signed, device), moved)


def _tables(codec: str, signed: bool, device: Any) -> _Tables:
    codec = "int4" if codec in PACKED else codec  # int4+sr: int4's maps, rounded otherwise
    device = str(torch.device(device))
    return _TABLES.get((codec, signed, device)) or _tables_of(codec, signed, device)


def quantize_blockwise(x: Tensor, codec: str, signed: bool, salt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Codes (uint8, one per element, shaped like ``x``) and per-block scales (float32) of ``x``.

    Bit for bit :func:`nearest_codes_reference` (torchao's rounding) of the values divided by their block's absolute
    maximum (clipped at 1e-12), computed with two reads of the map's lookup tables per element. ``"int4+sr"``
    rounds signed values stochastically instead (:func:`stochastic_codes`, drawn with ``salt``), unsigned ones as
    ``"int4"``.
    """
    tables = _tables(codec, signed, x.device)
    blocks = x.reshape(-1, BLOCK_SIZES[codec]).float()
    scale = blocks.abs().amax(-1).clip(1e-12)
    scaled = (blocks / scale.view(-1, 1)).reshape(-1)
    if codec == "int4+sr" and signed:
        return stochastic_codes(scaled, tables.qmap, salt, tables).reshape(x.shape), scale
    bucket = (scaled.view(torch.int32) >> tables.shift) + tables.offset
    codes = tables.base.index_select(0, bucket) + (scaled >= tables.rise.index_select(0, bucket))
    return codes.reshape(x.shape), scale


def dither(values: Tensor, salt: Tensor | None = None) -> Tensor:
    """A number in [0, 1) per float32 value: a hash of its bits and of ``salt`` (the parameter's step count), by
    murmur3's 32-bit finaliser; 24 bits, exact in float32.

    Drawn from the value and the step, not from a generator: a step gives the same codes whether its tensors are
    stepped whole, in slices, sharded (FSDP2) or compiled, and there is no generator state to checkpoint. The step
    makes a value that recurs (a moment held still by a constant gradient) draw afresh at every step. The arithmetic
    is int32, whose products wrap (two's complement) in torch's kernels and inductor's code alike; shifts right are
    masked to be logical.
    """
    h = values.view(torch.int32)
    if salt is not None:
        h = h ^ (salt.to(torch.int64) * 0x2545F491 & 0x7FFFFFFF).to(torch.int32)
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * -2048144789  # 0x85EBCA6B as int32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * -1028477387  # 0xC2B2AE35 as int32
    h = h ^ ((h >> 16) & 0xFFFF)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def stochastic_codes(scaled: Tensor, qmap: Tensor, salt: Tensor | None = None, tables: Any = None) -> Tensor:
    """Codes (uint8) of values in [-1, 1] rounded stochastically to the sorted map ``qmap``: a value between levels
    ``lo`` and ``lo + 1`` takes ``lo + 1`` with probability ``(value - q[lo]) / (q[lo + 1] - q[lo])`` (its
    :func:`dither` below that fraction), so the decoded value is right on average, where rounding to the nearest level
    is biased the same way step after step for a moment that moves by less than half a level per step.

    ``tables`` (the map's :class:`_Tables`): ``lo`` from the nearest code, one of its two neighbours (two table reads
    instead of a search).
    """
    n = qmap.numel()
    y = scaled.clamp(qmap[0], qmap[n - 1])
    if tables is None:
        lo = torch.bucketize(y, qmap[1 : n - 1], out_int32=True, right=True)  # largest lo with q[lo] <= y, <= n - 2
    else:
        bucket = (y.view(torch.int32) >> tables.shift) + tables.offset
        nearest = (tables.base.index_select(0, bucket) + (y >= tables.rise.index_select(0, bucket))).int()
        lo = (nearest - (qmap.index_select(0, nearest) > y).int()).clamp(max=n - 2)
    low, high = qmap.index_select(0, lo), qmap.index_select(0, lo + 1)
    up = dither(scaled, salt) < (y - low) / (high - low)
    return (lo + up).to(torch.uint8)


def dequantize_blockwise(codes: Tensor, qmap: Tensor, scale: Tensor) -> Tensor:
    """float32 values of ``codes`` (uint8 indices into ``qmap``) scaled per block."""
    return _times_scale(qmap.index_select(0, codes.reshape(-1).int()), scale).reshape(codes.shape)


def _times_scale(values: Tensor, scale: Tensor) -> Tensor:
    """``values`` (a whole number of blocks, in order) times their block's scale; no blocks (an empty FSDP2 shard)
    leave nothing to scale, and nothing to infer a block's size from."""
    if scale.numel() == 0:
        return values
    return values.reshape(scale.numel(), -1) * scale.view(-1, 1)


def _log_half_ulp(x: Tensor) -> Tensor:
    """log2 of half the spacing of bf16 numbers at ``x`` (heavyball's ``_log_ulp(x) - 1``), as float32."""
    exponent = (x.view(torch.int16).to(torch.int32) & 0x7FFF) >> 7
    return (torch.where(exponent == 0, torch.full_like(exponent, 1 - 127 - 7), exponent - (127 + 7)) - 1).float()


def _times_exp2(x: Tensor, log_scale: Tensor) -> Tensor:
    half = (log_scale / 2.0).floor()  # two factors: 2**log_scale alone may overflow float32
    return (x * torch.exp2(half)) * torch.exp2(log_scale - half)


def codec_applies(codec: str, template: Any, view: Tensor, rows: bool = False) -> bool:
    """Whether ``codec`` codes a buffer like ``template`` (its first-step value) of a parameter like ``view``.

    ``rows``: the parameter is split along dim 0 into shards that are coded each on its own (FSDP2), so a block-wise
    codec applies only where every row is a whole number of blocks: then every shard is too, and coding the shards
    one by one gives the codes and scales of the whole tensor. Decided from the whole (global) shape.
    """
    if codec == "fp32" or not isinstance(template, Tensor) or not template.is_floating_point():
        return False
    if tuple(template.shape) != tuple(view.shape) or template.numel() < MIN_NUMEL:
        return False
    block = BLOCK_SIZES.get(codec)
    if block is None:
        return True
    if rows:
        return view.dim() >= 1 and _row_numel(tuple(view.shape)) % block == 0
    return template.numel() % block == 0


def _row_numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape[1:]:
        numel *= size
    return numel


def part_templates(codec: str, key: str, shape: tuple[int, ...], device: Any, rows: bool = False) -> dict[str, Tensor]:
    """Empty tensors of the dtype and shape of each stored part of a coded buffer (for checks and creation).

    ``rows`` (a parameter split along dim 0, see :func:`codec_applies`): int4's codes and the scales are laid out
    with one row per row of the parameter, ``(rows, row_numel // 2)`` and ``(rows, row_numel // block)``, so that
    they split along dim 0 exactly as the parameter does; otherwise they are flat.
    """
    numel = 1
    for size in shape:
        numel *= size
    meta = {"device": device}
    if rows and codec in BLOCK_SIZES:
        row = _row_numel(shape)
        scale = torch.empty((shape[0], row // BLOCK_SIZES[codec]), dtype=torch.float32, **meta)
        if codec in PACKED:
            return {key: torch.empty((shape[0], row // 2), dtype=torch.uint8, **meta), key + "_scale": scale}
        dtype = torch.uint8 if codec == "int8" else torch.float8_e4m3fn
        return {key: torch.empty(shape, dtype=dtype, **meta), key + "_scale": scale}
    if codec == "bf16":
        return {key: torch.empty(shape, dtype=torch.bfloat16, **meta)}
    if codec == "bf16+ecc":
        return {
            key: torch.empty(shape, dtype=torch.bfloat16, **meta),
            key + "_ecc": torch.empty(shape, dtype=torch.int8, **meta),
        }
    scale = torch.empty(numel // BLOCK_SIZES[codec], dtype=torch.float32, **meta)
    if codec == "int8":
        return {key: torch.empty(shape, dtype=torch.uint8, **meta), key + "_scale": scale}
    if codec in PACKED:
        return {key: torch.empty(numel // 2, dtype=torch.uint8, **meta), key + "_scale": scale}
    return {key: torch.empty(shape, dtype=torch.float8_e4m3fn, **meta), key + "_scale": scale}


def _part_shapes(codec: str, key: str, shape: tuple[int, ...]) -> dict[str, list[tuple[int, ...]]]:
    """The shapes a whole (unsharded) part of a coded buffer may have: one process's, then, where every row is whole
    blocks, FSDP2's one row per parameter row (:func:`part_templates` with ``rows``; the same elements in the same
    order), as a full (gathered) FSDP2 state holds them."""
    shapes = {k: [tuple(t.shape)] for k, t in part_templates(codec, key, shape, "meta").items()}
    block = BLOCK_SIZES.get(codec)
    if block is not None and len(shape) >= 1 and _row_numel(shape) % block == 0:
        for k, t in part_templates(codec, key, shape, "meta", rows=True).items():
            if tuple(t.shape) not in shapes[k]:
                shapes[k].append(tuple(t.shape))
    return shapes


def encode(codec: str, x: Tensor, signed: bool, salt: Tensor | None = None) -> dict[str, Tensor]:
    """The stored parts of the float values ``x`` (see the module table); keys relative to the buffer's key.

    ``salt`` (the parameter's step count, a tensor) seeds ``"int4+sr"``'s stochastic rounding; other codecs round
    deterministically and ignore it."""
    if codec == "bf16":
        return {"": x.to(torch.bfloat16)}
    if codec == "bf16+ecc":
        wide = x.float()
        narrow = wide.to(torch.bfloat16)
        # bf16 -> fp32 through the bits, so that compiled code cannot fold the round trip into an identity.
        back = (narrow.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
        error = _times_exp2(wide - back, -_log_half_ulp(narrow))
        return {"": narrow, "_ecc": torch.round(error.clamp(-1.0, 1.0) * 127.0).to(torch.int8)}
    block = BLOCK_SIZES[codec]
    if codec == "fp8":
        blocks = x.reshape(-1, block).float()
        scale = blocks.abs().amax(-1).clip(1e-12) / torch.finfo(torch.float8_e4m3fn).max
        codes = (blocks / scale.view(-1, 1)).to(torch.float8_e4m3fn)
        return {"": codes.reshape(x.shape), "_scale": scale}
    codes, scale = quantize_blockwise(x, codec, signed, salt)
    if codec in PACKED:
        flat = codes.reshape(-1)
        codes = (flat[::2] << 4) | flat[1::2]  # torchao's packing: the even element in the high nibble
    return {"": codes, "_scale": scale}


def decode(codec: str, parts: dict[str, Tensor], signed: bool, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The values held by the stored ``parts`` (keys relative to the buffer's key), in ``dtype``."""
    codes = parts[""]
    if codec == "bf16":
        return codes.to(dtype)
    if codec == "bf16+ecc":
        correction = _times_exp2(parts["_ecc"].float() / 127.0, _log_half_ulp(codes))
        return (codes.float() + correction).to(dtype)
    scale = parts["_scale"]
    if codec == "fp8":
        return _times_scale(codes.float(), scale).reshape(shape).to(dtype)
    tables = _tables(codec, signed, codes.device)
    if codec in PACKED:  # one read per byte: both of its values
        return _times_scale(tables.pairs.index_select(0, codes.int()), scale).reshape(shape).to(dtype)
    return dequantize_blockwise(codes, tables.qmap, scale).reshape(shape).to(dtype)


PART_SUFFIXES = ("", "_scale", "_ecc")
"""Suffixes of the state keys of a coded buffer's parts (the codes under the buffer's own key)."""

SLICE_ALIGN = 256
"""Slices of a coded buffer (:func:`part_slice`) start and stop at multiples of this many elements: whole blocks of
every codec, whole bytes of int4."""


def encode_sharded(codec: str, buf: Any, signed: bool, view: Any) -> dict[str, Any]:
    """The parts of a DTensor buffer: its local shard coded on its own, each part a DTensor split like ``view``.

    Parts shaped like the parameter take its placements and shape; int4's codes and the scales (flat for one
    process) are laid out one row per row of the parameter, so they split along dim 0 as it does (the decision of
    :meth:`~gradstep.core.optimizer.ChainedOptimizer._coded_buffers` guarantees whole blocks per row and a split
    along rows only).
    """
    local_shape = view.to_local().shape
    templates = part_templates(codec, "", tuple(view.shape), "meta", rows=True)
    parts = {}
    for suffix, part in encode(codec, buf.to_local(), signed).items():
        shape = tuple(templates[suffix].shape)
        if part.shape != local_shape:
            part = part.reshape(local_shape[0], shape[1])  # (shard rows, per row): also for an empty shard
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        parts[suffix] = type(view).from_local(
            part, view.device_mesh, view.placements, run_check=False, shape=shape, stride=stride
        )
    return parts


def part_slice(codec: str, suffix: str, part: Tensor, start: int, stop: int) -> Tensor:
    """The piece of a contiguous stored part that codes elements ``start:stop`` of the flattened buffer (a view).

    ``start`` is a multiple of :data:`SLICE_ALIGN`, ``stop`` one or the buffer's size (a whole number of blocks).
    """
    if suffix == "_scale":
        block = BLOCK_SIZES[codec]
        return part[start // block : stop // block]
    if codec in PACKED and suffix == "":
        return part.view(-1)[start // 2 : stop // 2]
    return part.view(-1)[start:stop]


def convert_state_codec(optimizer: Any, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` with its state re-coded to the ``state_codec`` of each of ``optimizer``'s groups, each
    coded part laid out as ``optimizer`` stores it.

    ``state_dict`` was saved by an optimizer of the same class and parameters with any codec (the one its groups
    name; ``"fp32"`` when they name none), in one process or under FSDP2. Loading a checkpoint into an optimizer with
    another codec refuses the mismatched parts; this conversion is the explicit step between the two::

        opt = gradstep.AdamW(model.parameters(), state_codec="int8")
        opt.load_state_dict(gradstep.convert_state_codec(opt, torch.load("fp32-state.pt", weights_only=True)))

    Decoding is exact for fp32 and as exact as the source codec allows otherwise; encoding rounds as a step does.
    A buffer coded in both with the same codec keeps its parts bit for bit (reshaped only); which buffers the source
    coded is read from the dict (a block-wise codec's ``_scale`` parts), since one process and FSDP2 code different
    buffers (FSDP2 codes int8/int4/fp8 only where every row is whole blocks).

    The state of a DTensor (FSDP2) parameter comes in two forms, both converted without communication:

    * sharded, as ``optimizer.state_dict()`` or DCP's default ``get_optimizer_state_dict`` return it (its tensors
      DTensors split like the parameter): each rank decodes its own shards and encodes them on their own (whole
      blocks: the codes and scales of the whole tensor); the result is DTensors split like the parameter;
    * full (plain whole tensors, as ``get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))``
      returns it, or as one process saved it): the result is whole tensors, int4's codes and the scales in the layout
      of one row per parameter row that FSDP2 stores (:func:`part_templates` with ``rows``), ready for
      ``set_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))``.

    For a plain parameter the parts end flat, as one process stores them (a full FSDP2 state's row layout holds the
    same elements in the same order: it is reshaped). A sharded state for a plain parameter, or a part of the wrong
    dtype or of neither shape, raises ``ValueError`` naming the parameter; ``state_dict`` is not modified.
    """
    me = type(optimizer).__name__
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"convert_state_codec: the state_dict has {len(saved_groups)} groups, {me} has "
            f"{len(optimizer.param_groups)}"
        )
    saved_state = state_dict["state"]
    new_state: dict[Any, Any] = {pid: value for pid, value in saved_state.items()}
    new_groups = []
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        source, target = saved.get("state_codec", "fp32"), group["state_codec"]
        if source not in CODECS:
            raise ValueError(f"convert_state_codec: param group {gi} names state_codec {source!r}, not a codec")
        new_groups.append({**saved, "state_codec": target})
        names = group.get("param_names")
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            pstate = saved_state.get(pid)
            if not pstate:
                continue
            name = names[i] if names else f"param_groups[{gi}]['params'][{i}]"
            new_state[pid] = _converted(optimizer, group, source, p, dict(pstate), name)
    return {**state_dict, "state": new_state, "param_groups": new_groups}


def _converted(
    optimizer: Any, group: dict[str, Any], source: str, p: Tensor, state: dict[str, Any], name: str
) -> dict[str, Any]:
    """One parameter's ``state`` (saved with ``source``) re-coded to ``group``'s codec and laid out for ``p``."""
    target = group["state_codec"]
    view: Any = torch.view_as_real(p) if p.is_complex() else p
    dtype = optimizer._state_dtype(group, p)
    split = is_dtensor(view)  # an FSDP2 parameter: its parts are laid out by rows (part_templates)
    sharded = any(is_dtensor(v) for v in state.values())  # else whole tensors (one process's, or gathered)
    if sharded and not split:
        raise ValueError(
            f"convert_state_codec: the state of {name} holds DTensors (a sharded FSDP2 state) but {name} is not a "
            "DTensor; gather it first (get_optimizer_state_dict with StateDictOptions(full_state_dict=True))"
        )
    shape = tuple(view.shape)  # whole (global) shape
    # Which buffers the source coded: a block-wise codec codes fewer under FSDP2 (whole blocks per row) than in one
    # process, and the dict may come from either, so its own scales tell; the other codecs decide alike in both.
    meta = torch.empty(shape, dtype=view.dtype, device="meta")
    candidates = optimizer._coded_buffers({**group, "state_codec": source}, meta, dtype)
    coded_in = [(key, signed) for key, signed in candidates if source not in BLOCK_SIZES or key + "_scale" in state]
    coded_out = dict(optimizer._coded_buffers(group, view, dtype))
    where = "" if not split else (" (sharded)" if sharded else " (whole)")
    # The target's parts as the optimizer stores them (rows under FSDP2, where its decision guarantees whole blocks).
    layout = part_templates(target, "", shape, "meta", rows=split) if coded_out else {}
    for key, signed in coded_in:
        flat = part_templates(source, key, shape, "meta")
        shapes = _part_shapes(source, key, shape)
        parts = {}
        for part_key, template in flat.items():
            value = state.pop(part_key, None)
            ok = isinstance(value, Tensor) and value.dtype == template.dtype and is_dtensor(value) == sharded
            if ok and sharded:  # FSDP2's own layout, split like the parameter
                ok = tuple(value.shape) == shapes[part_key][-1] and value.placements == view.placements
            elif ok:  # one process's layout or a gathered FSDP2 one
                ok = tuple(value.shape) in shapes[part_key]
            if not ok:
                layouts = " or ".join(map(str, shapes[part_key][-1:] if sharded else shapes[part_key]))
                raise ValueError(
                    f"convert_state_codec: {part_key} of {name} is not a{where} {template.dtype} tensor of shape "
                    f"{layouts} (state_codec={source!r})"
                )
            parts[part_key[len(key) :]] = value
        if source == target and key in coded_out:  # the same codes: kept bit for bit, laid out for the optimizer
            state.update((key + suffix, _laid_out(part, layout[suffix])) for suffix, part in parts.items())
            continue
        if sharded:
            # This rank's shards, read flat as the codec reads them (whole blocks: no other rank's data needed).
            local = {suffix: part.to_local() for suffix, part in parts.items()}
            local = {s: v.reshape(-1) if v.shape != view.to_local().shape else v for s, v in local.items()}
            values = decode(source, local, signed, view.to_local().shape, dtype)
            state[key] = type(view).from_local(
                values, view.device_mesh, view.placements, run_check=False, shape=view.shape, stride=view.stride()
            )
        else:
            device = view.device
            whole = {s: v.to(device).reshape(flat[key + s].shape) for s, v in parts.items()}
            state[key] = decode(source, whole, signed, torch.Size(shape), dtype)
    for key, signed in coded_out.items():
        if source == target and key in dict(coded_in):
            continue
        value = state.get(key)
        if (
            not isinstance(value, Tensor)
            or is_dtensor(value) != sharded
            or (sharded and getattr(value, "placements", None) != view.placements)
            or not value.is_floating_point()
            or value.element_size() < 2  # float8 codes without their scales
            or tuple(value.shape) != shape
        ):
            raise ValueError(
                f"convert_state_codec: {key} of {name} is not a{where} floating-point tensor of shape {shape}, as a "
                f"buffer that state_codec={source!r} left uncoded is (or its coded parts are incomplete)"
            )
        if sharded:
            shard = value.to_local().to(dtype)  # type: ignore[attr-defined]
            value = type(view).from_local(
                shard, view.device_mesh, view.placements, run_check=False, shape=view.shape, stride=view.stride()
            )
            encoded = encode_sharded(target, value, signed, view)
        else:
            encoded = {
                suffix: _laid_out(part, layout[suffix])
                for suffix, part in encode(target, value.to(view.device, dtype), signed).items()
            }
        del state[key]
        state.update((key + suffix, part) for suffix, part in encoded.items())
    return state


def _laid_out(part: Tensor, template: Tensor) -> Tensor:
    """A whole part in the layout ``template`` gives (flat, or one row per parameter row): the same elements in the
    same order. A sharded part is already laid out by rows (checked by the caller)."""
    if is_dtensor(part):
        return part
    return part.reshape(template.shape)


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (FSDP2), without importing torch.distributed."""
    return type(x).__name__ == "DTensor" and hasattr(x, "to_local")

"""ggml block formats as data: the type table, `dequantize`, `quantize`, `decode_blocks`, `QuantArray`.

Layout (every function): a *row* of ggml blocks lies on the last axis, any leading shape.

    raw    uint8   [..., n_blocks * block_bytes]     ggml's bytes, little-endian, blocks back to back
    values float32 [..., n_blocks * block_size]      what ggml's dequantizer produces

Facts are taken from ggml's ``ggml-common.h`` (block structs) and agree with gguf's
``GGML_QUANT_SIZES`` except Q8_1, where gguf-py still lists 40 bytes (ggml: 36, static_assert'ed).

``quantize`` reproduces ggml's reference quantizers (``quantize_row_*_ref`` in ``ggml-quants.c``) byte
for byte, including F16 scale rounding (round to nearest even), ``roundf`` (half away from zero) and
the ``(int8_t)(x + 8.5f)`` truncations. It works in float64 holding float32 values, rounding to
float32 after every operation with an exact integer-only rounding: XLA on CPU flushes float32
subnormals to zero (ggml does not), XLA on GPU saturates f64->f32 converts and may drop an
f64->f32->f64 rounding as excess precision; the bytes are the same on CPU and GPU.

``fmt`` arguments accept a name (``"q4_0"``, case-insensitive), a ``gguf.GGMLQuantizationType``, an
int ggml type id, or a `Format`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "is_quant",    "KV_TYPES", "BLOCK_KV_TYPES", "FLOAT_KV_TYPES", "QUANT_TYPES", "ggml_name", "selection",
    "Field", "Format", "FORMATS", "KVALUES_IQ4NL", "get_format", "row_bytes", "dequantize",
    "quantize", "quantize_iq4_nl", "Blocks", "decode_blocks", "QuantArray",
]

# ----------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Field:
    """One member of a ggml block struct: ``name`` at byte ``offset``, ``size`` bytes, stored as ``kind``.

    kinds: 'f32', 'f16', 'bf16' (one float), 'u32' (little-endian bit mask), 'i8' (one int8 per
    element), 'nib' (two 4-bit quants per byte: element j in the low nibble of byte j, element
    j + block_size/2 in the high nibble).
    """

    name: str
    offset: int
    size: int
    kind: str


@dataclass(frozen=True)
class Format:
    """A ggml tensor type: ``block_size`` elements stored in ``block_bytes`` bytes laid out as ``fields``.

    ``dot_type`` is ggml's CPU ``vec_dot_type`` (the type the other operand of a dot product with this
    type is converted to). Quantized formats: ``q_bits`` bits per stored quant (a 'qh' field holds bit 4
    of 5-bit quants); the integer value is ``codebook[stored]`` when there is a codebook (iq4_nl), else
    ``stored - q_offset`` (q4_0: 8, q5_0: 16); the element is ``d * value`` (``+ m`` with an 'm' field).
    """

    name: str
    type_id: int
    block_size: int
    block_bytes: int
    fields: tuple[Field, ...]
    dot_type: str | None
    q_bits: int = 0
    q_offset: int = 0
    codebook: tuple[int, ...] | None = None

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


#: ggml-common.h ``kvalues_iq4nl``
KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _fmt(name, tid, bs, bb, fields, dot, q_bits=0, q_offset=0, codebook=None) -> Format:
    fs = tuple(Field(*f) for f in fields)
    assert sum(f.size for f in fs) == bb, name
    return Format(name, tid, bs, bb, fs, dot, q_bits, q_offset, codebook)


FORMATS: dict[str, Format] = {f.name: f for f in [
    _fmt("f32", 0, 1, 4, [("x", 0, 4, "f32")], "f32"),
    _fmt("f16", 1, 1, 2, [("x", 0, 2, "f16")], "f16"),
    _fmt("bf16", 30, 1, 2, [("x", 0, 2, "bf16")], "bf16"),
    # block_q4_0 { ggml_half d; uint8_t qs[16]; }
    _fmt("q4_0", 2, 32, 18, [("d", 0, 2, "f16"), ("qs", 2, 16, "nib")], "q8_0", 4, 8),
    # block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }
    _fmt("q4_1", 3, 32, 20, [("d", 0, 2, "f16"), ("m", 2, 2, "f16"), ("qs", 4, 16, "nib")], "q8_1", 4),
    # block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }
    _fmt("q5_0", 6, 32, 22, [("d", 0, 2, "f16"), ("qh", 2, 4, "u32"), ("qs", 6, 16, "nib")], "q8_0", 5, 16),
    # block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }
    _fmt("q5_1", 7, 32, 24, [("d", 0, 2, "f16"), ("m", 2, 2, "f16"), ("qh", 4, 4, "u32"),
                             ("qs", 8, 16, "nib")], "q8_1", 5),
    # block_q8_0 { ggml_half d; int8_t qs[32]; }
    _fmt("q8_0", 8, 32, 34, [("d", 0, 2, "f16"), ("qs", 2, 32, "i8")], "q8_0", 8),
    # block_q8_1 { ggml_half d; ggml_half s; int8_t qs[32]; }   s = d * sum(qs)
    _fmt("q8_1", 9, 32, 36, [("d", 0, 2, "f16"), ("s", 2, 2, "f16"), ("qs", 4, 32, "i8")], "q8_1", 8),
    # block_iq4_nl { ggml_half d; uint8_t qs[16]; }   value = d * kvalues_iq4nl[nibble]
    _fmt("iq4_nl", 20, 32, 18, [("d", 0, 2, "f16"), ("qs", 2, 16, "nib")], "q8_0", 4, 0, KVALUES_IQ4NL),
]}

_BY_ID: dict[int, Format] = {f.type_id: f for f in FORMATS.values()}

#: the types ggml-cpu's attention reads a K/V cache in (its ``flash_attn_ext`` and the ``mul_mat`` of
#: the unfused path): F32, F16 and the block types with a CPU ``vec_dot`` against Q8_0/Q8_1. BF16 and
#: Q8_1 are formats here but not modelled as K/V by ``jaxkv.ggml_cpu``. Every other list of type names
#: is derived from this table (lower case at the API; ``ggml_name`` converts at the edges).
KV_TYPES: tuple[str, ...] = ("f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")
#: the block-quantized K/V types (the cold region of a mixed cache)
BLOCK_KV_TYPES: tuple[str, ...] = tuple(n for n in KV_TYPES if FORMATS[n].quantized)
#: the float K/V types (one element per block: F32, F16)
FLOAT_KV_TYPES: tuple[str, ...] = tuple(n for n in KV_TYPES if not FORMATS[n].quantized)
#: every block-quantized format
QUANT_TYPES: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.quantized)


def ggml_name(fmt: Any) -> str:
    """ggml's spelling of a type (``GGML_TYPE_<NAME>`` without the prefix): ``"q8_0"`` -> ``"Q8_0"``."""
    return get_format(fmt).name.upper()


def selection(reason: str, names) -> tuple:
    """A hand-picked selection of K/V types, documented: ``names`` (type names in either spelling, or
    tuples of them, e.g. (K, V) pairs) returned as a tuple, unchanged, once every name is checked to be
    one of :data:`KV_TYPES`; ``reason``: why these (a list of every type, or of every block type, is
    derived from the table instead). ValueError naming the name or the missing reason."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("selection: expected a reason (why these types), got none")
    out = tuple(tuple(n) if isinstance(n, (tuple, list)) else n for n in names)
    for n in (m for x in out for m in (x if isinstance(x, tuple) else (x,))):
        if not isinstance(n, str) or n.lower() not in KV_TYPES:
            raise ValueError(f"selection: {n!r} is not a K/V type (expected one of {', '.join(KV_TYPES)})")
    return out

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c


def get_format(fmt: Any) -> Format:
    """Name (case-insensitive) | gguf.GGMLQuantizationType | int type id | Format -> Format."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        f = FORMATS.get(fmt.strip().lower())
        if f is None:
            raise ValueError(f"format: unknown ggml type name {fmt!r}; known: {sorted(FORMATS)}")
        return f
    if isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool):  # includes IntEnum
        f = _BY_ID.get(int(fmt))
        if f is None:
            label = getattr(fmt, "name", int(fmt))
            raise ValueError(f"format: ggml type {label} (id {int(fmt)}) is not supported; "
                             f"supported ids: {sorted(_BY_ID)}")
        return f
    raise ValueError(f"format: expected a name, GGMLQuantizationType, int type id or Format, got {fmt!r}")


def row_bytes(fmt: Any, n: int) -> int:
    """Bytes of a row of ``n`` elements (n must be a multiple of the block size)."""
    f = get_format(fmt)
    if n % f.block_size:
        raise ValueError(f"{f.name}: row length must be a multiple of {f.block_size} elements, got {n}")
    return n // f.block_size * f.block_bytes


# ----------------------------------------------------------------------------------------------------
# dequantize


def _check_raw(raw, f: Format):
    dt = getattr(raw, "dtype", None)
    if dt is None:
        raw = np.asarray(raw)
        dt = raw.dtype
    if np.dtype(dt) != np.uint8:
        raise ValueError(f"{f.name}: raw must be uint8 blocks, got dtype {dt}")
    shape = np.shape(raw)
    if len(shape) == 0:
        raise ValueError(f"{f.name}: raw must have at least one axis (the row of blocks), got a scalar")
    if shape[-1] % f.block_bytes:
        raise ValueError(f"{f.name}: raw last axis must be a multiple of {f.block_bytes} bytes "
                         f"(block_bytes), got {shape[-1]}")
    return jnp.asarray(raw)


def _u16(b, off):
    """Little-endian uint16 at byte ``off`` of the last axis of uint8 blocks [..., bb]."""
    return b[..., off].astype(jnp.uint16) | (b[..., off + 1].astype(jnp.uint16) << 8)


def _f16_to_f32(u16):
    """IEEE half bits -> float32 (exact; NaN stays NaN)."""
    return lax.bitcast_convert_type(u16, jnp.float16).astype(jnp.float32)


def _nibbles(b, off):
    """Packed nibbles -> uint8 [..., 32]: element j low nibble of byte j, element j+16 the high one."""
    qs = b[..., off:off + 16]
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits(b, off, bit):
    """Bit j of the little-endian u32 at ``off`` -> uint8 [..., 32], moved to position ``bit``."""
    qh = b[..., off:off + 4]  # byte k holds bits 8k..8k+7
    bits = jnp.repeat(qh, 8, axis=-1) >> jnp.tile(jnp.arange(8, dtype=jnp.uint8), 4)
    return (bits & 1) << bit


def _lookup(q, table):
    """table[q] for q uint8 in [0, 16) as float32, without a gather (a select tree on the 4 bits)."""
    lvl = [np.float32(v) for v in table]
    for k in range(4):
        bit = ((q >> k) & 1) == 1
        lvl = [jnp.where(bit, lvl[i + 1], lvl[i]) for i in range(0, len(lvl), 2)]
    return lvl[0]


def _split_blocks(raw, f: Format):
    nb = raw.shape[-1] // f.block_bytes
    return raw.reshape(raw.shape[:-1] + (nb, f.block_bytes))


def _decode(raw, f: Format):
    """Quantized uint8 [..., nb*bb] -> (stored quants uint8/int8 [..., nb, bs], d, m | None, s | None),
    read from the format's field table."""
    b = _split_blocks(raw, f)
    fld = {x.name: x for x in f.fields}
    scale = {k: _f16_to_f32(_u16(b, fld[k].offset)) if k in fld else None for k in ("d", "m", "s")}
    qs = fld["qs"]
    if qs.kind == "nib":
        q = _nibbles(b, qs.offset)
    else:  # 'i8'
        q = lax.bitcast_convert_type(b[..., qs.offset:qs.offset + qs.size], jnp.int8)
    if "qh" in fld:
        q = q | _high_bits(b, fld["qh"].offset, f.q_bits - 1)
    return q, scale["d"], scale["m"], scale["s"]


def _values(q, f: Format):
    """Stored quants -> the integer values as float32 (codebook or offset)."""
    if f.codebook is not None:
        return _lookup(q, f.codebook)
    return (q.astype(jnp.int32) - f.q_offset).astype(jnp.float32)


def dequantize(raw, fmt) -> jax.Array:
    """uint8 [..., n_blocks*block_bytes] ggml blocks -> float32 [..., n_blocks*block_size].

    Bit-identical to ggml's ``dequantize_row_*`` (and gguf's ``quants.dequantize``): value = d * q
    (+ m), all in float32 with d, m converted exactly from F16. Pure JAX; jit/vmap-safe.
    """
    f = get_format(fmt)
    return _dequantize(_check_raw(raw, f), f)


@partial(jax.jit, static_argnums=1)
def _dequantize(raw, f: Format):
    lead = raw.shape[:-1]
    if not f.quantized:  # one float per element, by the field's kind
        kind = f.fields[0].kind
        if kind == "f32":
            return lax.bitcast_convert_type(raw.reshape(lead + (-1, 4)), jnp.float32)
        u = lax.bitcast_convert_type(raw.reshape(lead + (-1, 2)), jnp.uint16)
        if kind == "f16":
            return _f16_to_f32(u)
        return lax.bitcast_convert_type(u.astype(jnp.uint32) << 16, jnp.float32)  # bf16
    q, d, m, _ = _decode(raw, f)
    out = d[..., None] * _values(q, f)
    if m is not None:
        out = out + m[..., None]
    return out.reshape(lead + (-1,))


# ----------------------------------------------------------------------------------------------------
# decode_blocks


@dataclass(frozen=True)
class Blocks:
    """Integer view of quantized blocks (value = d*q (+ m)):

    q int32 [..., n_blocks, block_size]; d float32 [..., n_blocks]; m float32 [..., n_blocks] (q4_1,
    q5_1) or None; s float32 [..., n_blocks] (q8_1: the stored F16 d*sum(q)) or None.
    """

    q: jax.Array
    d: jax.Array
    m: jax.Array | None = None
    s: jax.Array | None = None


jax.tree_util.register_dataclass(Blocks, data_fields=["q", "d", "m", "s"], meta_fields=[])


def decode_blocks(raw, fmt) -> Blocks:
    """uint8 [..., n_blocks*block_bytes] of a quantized format -> Blocks (integer quants, F16 scales as f32).

    q ranges: q4_0 [-8, 7]; q4_1 [0, 15]; q5_0 [-16, 15]; q5_1 [0, 31]; q8_0/q8_1 int8; iq4_nl the
    kvalues_iq4nl table value.
    """
    f = get_format(fmt)
    if not f.quantized:
        raise ValueError(f"{f.name}: decode_blocks needs a block-quantized format, got a float format")
    return _decode_blocks(_check_raw(raw, f), f)


@partial(jax.jit, static_argnums=1)
def _decode_blocks(raw, f: Format) -> Blocks:
    q, d, m, s = _decode(raw, f)
    return Blocks(q=_values(q, f).astype(jnp.int32), d=d, m=m, s=s)


# ----------------------------------------------------------------------------------------------------
# exact float32 arithmetic carried in float64 (XLA CPU flushes float32 subnormals; ggml does not)

_TWO149 = float(2.0 ** 149)
_MIN_NORMAL32 = float(2.0 ** -126)


def _exact64(x32):
    """float32 -> float64, exact also for subnormals (built from the bits, no float32 arithmetic)."""
    bits = lax.bitcast_convert_type(x32, jnp.uint32)
    e = (bits >> 23) & 0xFF
    mant = (bits & 0x7FFFFF).astype(jnp.float64) / _TWO149
    sub = jnp.where(bits >> 31 == 1, -mant, mant)
    return jnp.where(e == 0, sub, x32.astype(jnp.float64))


_OVERFLOW32 = float(2.0 ** 128 - 2.0 ** 103)  # FLT_MAX + half an ulp: from here on RNE gives Inf


def _r32(y):
    """Round float64 to the nearest float32 value (ties to even; subnormals and overflow exact), as f64.

    Integer arithmetic on the float64 bits, no float32 convert: XLA's CPU convert flushes float32
    subnormals, its GPU convert saturates at FLT_MAX, and XLA may drop an f64->f32->f64 convert pair
    as excess precision.
    """
    a = jnp.abs(y)
    bits = lax.bitcast_convert_type(y, jnp.uint64)
    keep, low = bits >> 29, bits & ((1 << 29) - 1)  # float32 keeps 23 of float64's 52 mantissa bits
    up = (low > (1 << 28)) | ((low == (1 << 28)) & ((keep & 1) == 1))
    normal = lax.bitcast_convert_type((keep + up.astype(jnp.uint64)) << 29, jnp.float64)
    tiny = jnp.round(y * _TWO149) / _TWO149  # the subnormal grid; exact in f64
    r = jnp.where(a < _MIN_NORMAL32, tiny, normal)
    r = jnp.where(a >= _OVERFLOW32, jnp.where(y > 0, jnp.inf, -jnp.inf), r)
    return jnp.where(jnp.isnan(y), y, r)


def _f32_bits(v):
    """uint32 float32 bits of a float32-exact float64 (subnormals included), from its float64 bits."""
    a = jnp.abs(v)
    b64 = lax.bitcast_convert_type(v, jnp.uint64)
    sign = ((b64 >> 63) << 31).astype(jnp.uint32)
    e32 = ((b64 >> 52) & 0x7FF).astype(jnp.int32) - (1023 - 127)
    mant = ((b64 >> 29) & 0x7FFFFF).astype(jnp.uint32)
    normal = sign | (jnp.clip(e32, 0, 255).astype(jnp.uint32) << 23) | mant
    sub = sign | jnp.where(a < _MIN_NORMAL32, a * _TWO149, 0.0).astype(jnp.uint32)
    special = sign | jnp.where(jnp.isnan(v), jnp.uint32(0x7FC00000), jnp.uint32(0x7F800000))
    ordinary = (a >= _MIN_NORMAL32) & (a < jnp.inf)
    return jnp.where(ordinary, normal, jnp.where(a < _MIN_NORMAL32, sub, special))


def _f16_bits_from_f32_bits(b):
    """float32 bits -> IEEE half bits (uint16), round to nearest even, as ggml's portable
    ``ggml_compute_fp32_to_fp16`` (ggml-impl.h): overflow -> Inf, every NaN -> sign | 0x7E00."""
    b = b.astype(jnp.uint32)
    sign = (b >> 16) & 0x8000
    e = ((b >> 23) & 0xFF).astype(jnp.int32)
    m = b & 0x7FFFFF
    E = e - 127
    # normal half (E >= -14): keep 10 mantissa bits, round the dropped 13
    h = ((jnp.clip(E, -14, 16) + 15).astype(jnp.uint32) << 10) | (m >> 13)
    rem = m & 0x1FFF
    h = h + ((rem > 0x1000) | ((rem == 0x1000) & ((h & 1) == 1))).astype(jnp.uint32)
    h = jnp.where(E > 15, jnp.uint32(0x7C00), h)
    # subnormal half (E < -14): value = M * 2^(E-23), half ulp 2^-24 -> k = M >> (-E-1)
    M = m | 0x800000
    s = jnp.clip(-E - 1, 1, 31).astype(jnp.uint32)
    k = M >> s
    r = M & ((jnp.uint32(1) << s) - 1)
    half = jnp.uint32(1) << (s - 1)
    k = k + ((r > half) | ((r == half) & ((k & 1) == 1))).astype(jnp.uint32)
    k = jnp.where(E < -25, jnp.uint32(0), k)
    h = jnp.where(E < -14, k, h)
    h = jnp.where(e == 0, jnp.uint32(0), h)  # zero and f32 subnormals
    h = jnp.where(e == 0xFF, jnp.where(m != 0, jnp.uint32(0x7E00), jnp.uint32(0x7C00)), h)
    return (sign | h).astype(jnp.uint16)


def _f16_bits(v):
    """float32-exact float64 -> half bits (round to nearest even)."""
    return _f16_bits_from_f32_bits(_f32_bits(v))


def _roundf(v):
    """C roundf on float32-exact f64 values: half away from zero."""
    t = jnp.trunc(v)
    return jnp.where(jnp.abs(v - t) >= 0.5, t + jnp.sign(v), t)


def _cvtt_low_byte(v):
    """Low byte of x86 ``cvttss2si`` (C float->int8/uint8 casts, numpy astype): NaN/Inf/out of range -> 0."""
    ok = jnp.isfinite(v) & (jnp.abs(v) < 2.0 ** 31)
    i = jnp.where(ok, jnp.trunc(jnp.where(ok, v, 0.0)), -(2.0 ** 31)).astype(jnp.int64)
    return (i & 0xFF).astype(jnp.uint8)


def _first_absmax(x):
    """ggml's ``if (amax < fabsf(v)) {amax = fabsf(v); max = v;}`` from amax = max = 0 -> (amax, max)."""
    a = jnp.abs(x)
    amax = jnp.max(a, axis=-1)
    idx = jnp.argmax(a == amax[..., None], axis=-1)
    mx = jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return amax, jnp.where(amax > 0, mx, 0.0)


_FLT_MAX = float(np.finfo(np.float32).max)


def _first_min_max(x):
    """ggml's ``min = FLT_MAX; max = -FLT_MAX; if (v < min) min = v; if (v > max) max = v;`` -> the first
    minimum and first maximum (signs of zeros as ggml), FLT_MAX / -FLT_MAX when nothing passes (Inf)."""
    lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
    mn = jnp.take_along_axis(x, jnp.argmax(x == lo[..., None], axis=-1)[..., None], axis=-1)[..., 0]
    mx = jnp.take_along_axis(x, jnp.argmax(x == hi[..., None], axis=-1)[..., None], axis=-1)[..., 0]
    return jnp.where(lo < _FLT_MAX, mn, _FLT_MAX), jnp.where(hi > -_FLT_MAX, mx, -_FLT_MAX)


def _u16_bytes(h):
    """uint16 [..., nb] -> uint8 [..., nb, 2] little-endian."""
    h = h.astype(jnp.uint16)
    return jnp.stack([(h & 0xFF).astype(jnp.uint8), (h >> 8).astype(jnp.uint8)], axis=-1)


def _pack_nibbles(q):
    """uint8 [..., nb, 32] values < 16 -> [..., nb, 16]: byte j = q[j] | q[j+16] << 4."""
    return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _pack_qh(q):
    """5-bit quants [..., nb, 32] -> the 4 qh bytes: bit j = bit 4 of q[j]."""
    bits = ((q >> 4) & 1).astype(jnp.uint8).reshape(q.shape[:-1] + (4, 8))
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _safe_inv(d):
    """``d ? 1.0f/d : 0.0f`` in float32 semantics (d float32-exact f64)."""
    return jnp.where(d != 0, _r32(1.0 / jnp.where(d != 0, d, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------------------
# quantize


def _q_sym4_5(xb, nmax_neg, bias, qmax):
    """q4_0 / q5_0: d = max/-nmax; q = MIN(qmax, (int8)(x*id + bias)); returns (dh bits, q uint8)."""
    _, mx = _first_absmax(xb)
    d = _r32(mx / -nmax_neg)
    idd = _safe_inv(d)
    q = _cvtt_low_byte(_r32(_r32(xb * idd[..., None]) + bias))
    return _f16_bits(d), jnp.minimum(q, qmax)


def _q_asym4_5(xb, nlev, qmax):
    """q4_1 / q5_1: d = (max-min)/nlev, m = min; q = (x-min)*id + 0.5 truncated."""
    mn, mx = _first_min_max(xb)
    d = _r32(_r32(mx - mn) / nlev)
    idd = _safe_inv(d)
    q = _cvtt_low_byte(_r32(_r32(_r32(xb - mn[..., None]) * idd[..., None]) + 0.5))
    return _f16_bits(d), _f16_bits(mn), jnp.minimum(q, qmax)


def _q8(xb):
    """q8_0 / q8_1: d = amax/127, q = roundf(x*id) as int8 -> (d f64, dh bits, q int8 as f64)."""
    amax = jnp.max(jnp.abs(xb), axis=-1)
    d = _r32(amax / 127.0)
    idd = _safe_inv(d)
    qb = _cvtt_low_byte(_roundf(_r32(xb * idd[..., None])))
    return d, _f16_bits(d), qb


def _best_index(al):
    """ggml's best_index_int8(16, kvalues_iq4nl, al) on float32-exact f64 (NaN -> 15, as the C search)."""
    vals = np.array(KVALUES_IQ4NL, np.float64)
    ml = jnp.zeros(al.shape, jnp.int32)
    for i in range(1, 15):  # the binary search keeps val[ml] <= x < val[ml+1]
        ml = ml + jnp.logical_not(al < vals[i]).astype(jnp.int32)
    lo = jnp.asarray(vals)[ml]
    hi = jnp.asarray(vals)[ml + 1]
    l = jnp.where(_r32(al - lo) < _r32(hi - al), ml, ml + 1)
    l = jnp.where(al >= vals[15], 15, l)
    return jnp.where(al <= vals[0], 0, l)


def _seq_sum(t):
    """Sum over the last axis left to right with float32 rounding after every add (ggml's loop order)."""
    def step(acc, v):
        return _r32(acc + v), None
    return lax.scan(step, jnp.zeros(t.shape[:-1], jnp.float64), jnp.moveaxis(t, -1, 0))[0]


def _iq4_sums(xb, w, idd):
    """For scales ``idd`` [..., nb, T] and blocks xb, w [..., nb, 32]: L = best_index(id*x) [..., nb, T, 32]
    and the sequential float32 sums sumqx += w*q*x, sumq2 += w*q*q over the block ([..., nb, T])."""
    xe, we = xb[..., None, :], w[..., None, :]
    L = _best_index(_r32(idd[..., None] * xe))
    q = jnp.asarray(np.array(KVALUES_IQ4NL, np.float64))[L]
    wq = _r32(we * q)
    return L, _seq_sum(_r32(wq * xe)), _seq_sum(_r32(wq * q))


def _q_iq4_nl(xb, ntry):
    """quantize_row_iq4_nl_impl(32, 32, ..., quant_weights=NULL, ntry) per block -> (dh bits, L uint8)."""
    vals0 = float(KVALUES_IQ4NL[0])
    w = _r32(xb * xb)
    amax, mx = _first_absmax(xb)
    tiny = amax < float(GROUP_MAX_EPS)
    mxs = jnp.where(tiny, 1.0, mx)
    d = _r32((-mxs if ntry > 0 else mxs) / vals0)
    L, sqx, sq2 = _iq4_sums(xb, w, _r32(1.0 / d)[..., None])
    L, sqx, sq2 = L[..., 0, :], sqx[..., 0], sq2[..., 0]
    d = jnp.where(sq2 > 0, _r32(sqx / jnp.where(sq2 > 0, sq2, 1.0)), 0.0)
    if ntry >= 0:
        best = _r32(d * sqx)
        tries = np.arange(-ntry, ntry + 1, dtype=np.float64) + vals0  # (itry + values[0]), exact
        _, sx, s2 = _iq4_sums(xb, w, _r32(tries / mxs[..., None]))  # [..., nb, 2*ntry+1]
        for t in range(len(tries)):  # ggml's order: a later try wins only if strictly better
            better = (s2[..., t] > 0) & (_r32(sx[..., t] * sx[..., t]) > _r32(best * s2[..., t]))
            dn = _r32(sx[..., t] / jnp.where(s2[..., t] > 0, s2[..., t], 1.0))
            d = jnp.where(better, dn, d)
            best = jnp.where(better, _r32(dn * sx[..., t]), best)
    d = jnp.where(tiny, 0.0, d)
    if ntry > 0:
        L = _best_index(_r32(_safe_inv(d)[..., None] * xb))
    else:
        # ggml leaves L untouched for an all-(near-)zero block: the previous block's L in the same row
        # is reused (its scale is 0, so the values are 0 either way). No previous block: undefined in
        # ggml (stack memory); we use best_index(0) = 8, what the ntry > 0 path stores.
        nb = xb.shape[-2]
        src = jnp.where(tiny, -1, jnp.arange(nb, dtype=jnp.int32))
        src = lax.cummax(src, axis=src.ndim - 1)
        filled = jnp.take_along_axis(L, jnp.maximum(src, 0)[..., None], axis=-2)
        L = jnp.where((src >= 0)[..., None], filled, 8)
    return _f16_bits(d), L.astype(jnp.uint8)


@partial(jax.jit, static_argnums=(1, 2))
def _quantize_blocks(x, f: Format, ntry: int):
    lead, n = x.shape[:-1], x.shape[-1]
    if f.name == "f32":
        return lax.bitcast_convert_type(x, jnp.uint8).reshape(lead + (n * 4,))
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    if f.name == "f16":
        h = _f16_bits_from_f32_bits(bits)
        return _u16_bytes(h).reshape(lead + (n * 2,))
    if f.name == "bf16":
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        h = jnp.where(nan, (bits >> 16) | 64, (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16)
        return _u16_bytes(h).reshape(lead + (n * 2,))
    xb = _exact64(x).reshape(lead + (n // 32, 32))
    if f.name in ("q4_0", "q5_0"):
        nmax, qmax = (8.0, 15) if f.name == "q4_0" else (16.0, 31)
        dh, q = _q_sym4_5(xb, nmax, nmax + 0.5, qmax)
        parts = [_u16_bytes(dh)]
        if f.name == "q5_0":
            parts.append(_pack_qh(q))
        parts.append(_pack_nibbles(q))
    elif f.name in ("q4_1", "q5_1"):
        nlev, qmax = (15.0, 15) if f.name == "q4_1" else (31.0, 31)
        dh, mh, q = _q_asym4_5(xb, nlev, qmax)
        parts = [_u16_bytes(dh), _u16_bytes(mh)]
        if f.name == "q5_1":
            parts.append(_pack_qh(q))
        parts.append(_pack_nibbles(q))
    elif f.name == "q8_0":
        _, dh, qb = _q8(xb)
        parts = [_u16_bytes(dh), qb]
    elif f.name == "q8_1":
        d, dh, qb = _q8(xb)
        qsum = jnp.sum(lax.bitcast_convert_type(qb, jnp.int8).astype(jnp.int32), axis=-1)
        sh = _f16_bits(_r32(qsum.astype(jnp.float64) * d))
        parts = [_u16_bytes(dh), _u16_bytes(sh), qb]
    elif f.name == "iq4_nl":
        dh, L = _q_iq4_nl(xb, ntry)
        parts = [_u16_bytes(dh), _pack_nibbles(L)]
    else:
        raise AssertionError(f.name)
    return jnp.concatenate(parts, axis=-1).reshape(lead + (-1,))


def _check_float(x, f: Format):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{f.name}: quantize expects float32 values, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{f.name}: quantize needs at least one axis (the row), got a scalar")
    if x.shape[-1] % f.block_size:
        raise ValueError(f"{f.name}: last axis must be a multiple of {f.block_size} elements "
                         f"(block_size), got {x.shape[-1]}")
    if x.dtype == jnp.float64:  # round to float32 exactly (XLA's convert would flush f32 subnormals)
        return _f64_to_f32(x)
    return x.astype(jnp.float32)


@jax.jit
def _f64_to_f32(x):
    return lax.bitcast_convert_type(_f32_bits(_r32(x)), jnp.float32)


def quantize(x, fmt) -> jax.Array:
    """float32 [..., n] -> uint8 [..., row_bytes(fmt, n)], byte-identical to ggml's ``quantize_row_*_ref``.

    F16: round to nearest even, NaN -> sign|0x7E00 (ggml's ``ggml_fp32_to_fp16_row``); BF16:
    ``ggml_compute_fp32_to_bf16``; F32: the bytes. IQ4_NL follows ``quantize_row_iq4_nl_ref`` (no scale
    search; what ggml's CPU ``from_float`` / ``ggml_cpy`` uses); `quantize_iq4_nl` gives
    ``ggml_quantize_chunk``'s search. Inputs are rounded to float32 first (float64: exactly, RNE).
    Pure JAX, jit- and vmap-able. Inf inputs follow x86 ggml (casts of NaN/Inf give quant 0); NaN
    inputs are outside the contract (ggml's own result depends on where in the block the NaN sits).
    IQ4_NL blocks with max|x| < 1e-15 get d = 0 and, as in ggml, the previous block's quants in the
    row; for the row's first block ggml reads uninitialised memory, we store index 8 (value 1).
    """
    f = get_format(fmt)
    return _quantize_blocks(_check_float(x, f), f, -1)


def quantize_iq4_nl(x, ntry: int = 7) -> jax.Array:
    """float32 [..., n] -> IQ4_NL blocks as ggml's ``quantize_iq4_nl`` (``ggml_quantize_chunk`` without an
    importance matrix): the best-scale search over ``ntry`` steps either side (ntry=-1 is `quantize`)."""
    f = FORMATS["iq4_nl"]
    return _quantize_blocks(_check_float(x, f), f, ntry)


# ----------------------------------------------------------------------------------------------------
# QuantArray


@dataclass(frozen=True)
class QuantArray:
    """ggml blocks with a logical float shape: raw uint8 [..., row_bytes(fmt, n)] -> logical [..., n].

    A pytree: ``raw`` is the child; ``fmt`` (Format) and ``n`` are static. Indexing along leading axes
    returns a QuantArray.
    """

    raw: Any
    fmt: Format
    n: int

    def __post_init__(self):
        object.__setattr__(self, "fmt", get_format(self.fmt))
        shp = getattr(self.raw, "shape", None)
        if shp is not None and len(shp) and isinstance(self.n, int):
            want = row_bytes(self.fmt, self.n)
            if shp[-1] != want:
                raise ValueError(f"{self.fmt.name}: raw last axis must be row_bytes({self.n}) = {want} "
                                 f"bytes, got {shp[-1]}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape[:-1]) + (self.n,)

    @property
    def ndim(self) -> int:
        return len(self.raw.shape)

    def dequantize(self) -> jax.Array:
        """float32 [*shape]."""
        return dequantize(self.raw, self.fmt)

    @classmethod
    def from_float(cls, x, fmt) -> "QuantArray":
        """float32 [..., n] -> QuantArray (``quantize``)."""
        f = get_format(fmt)
        return cls(raw=quantize(x, f), fmt=f, n=int(jnp.shape(x)[-1]))

    def __getitem__(self, idx) -> "QuantArray":
        idx = idx if isinstance(idx, tuple) else (idx,)
        real = [i for i in idx if i is not None]
        if any(i is Ellipsis for i in idx) or len(real) >= self.ndim:
            raise IndexError("QuantArray: index leading axes only (no Ellipsis; the last axis is blocks)")
        return QuantArray(raw=self.raw[idx], fmt=self.fmt, n=self.n)

    def __len__(self) -> int:
        return self.shape[0]


jax.tree_util.register_dataclass(QuantArray, data_fields=["raw"], meta_fields=["fmt", "n"])


def is_quant(x) -> bool:
    """Whether ``x`` is quantized blocks (a :class:`QuantArray`): the one test for it."""
    return isinstance(x, QuantArray)

"""ggml's CPU dot products on x86, operation by operation: the ISA table, the conversion of the
F32 operand to the vector-dot type (``quantize_row_q8_0`` / ``quantize_row_q8_1`` of
``arch/x86/quants.c``, F16 rounding), and ``vec_dot`` for F16, F32 and the block types.

All values are f32 carriers (float64 arrays holding float32 numbers, see :mod:`jaxkv.ggml_cpu.fp`).

Lane orders (``simd-mappings.h``, ``vec.cpp``):

- ``ggml_vec_dot_f16`` / ``ggml_vec_dot_f32``: ``GGML_F*_ARR = 4`` accumulators of ``EPR`` lanes
  (AVX-512: 16, AVX2: 8); element ``i*STEP + j*EPR + l`` goes to accumulator ``j`` lane ``l``
  (``STEP = 4*EPR``), each by an FMA (exact for F16 x F16 products). Reduction: ``a0 += a2; a1 += a3;
  a0 += a1``, then AVX-512 ``_mm512_reduce_add_ps`` (halving tree 16 -> 8 -> 4 -> 2 -> 1) or AVX
  (``lo128 + hi128``, then ``_mm_hadd_ps`` twice: ``(t0 + t1) + (t2 + t3)``). The ``n % STEP`` leftover
  elements: F16 in double (``sumf += (double)(x*y)``); F32 in float, ``sumf += x[i]*y[i]``, which GCC
  vectorizes as an in-order reduction: the products of all but the last ``r % f32_tail_group`` of the
  ``r`` leftovers are rounded (vector multiply) and added one by one in order, the last
  ``r % f32_tail_group`` go through the scalar epilogue, contracted to an FMA (``Isa.f32_tail_group``,
  measured against live ggml: ``mul_mat`` of F32 rows, n = 1..139).
- block dots (``ggml_vec_dot_q4_0_q8_0`` etc.; the ``__AVX2__`` kernels, used by AVX-512 builds too):
  per 32-block, 8 int32 lanes each the exact sum of 4 consecutive products; ``acc = fma(d, lanes, acc)``
  with ``d = d_x * d_y`` (exact); ``hsum_float_8``: ``((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))``.
  q4_1 / q5_1 add ``summs = sum_blocks m_x * s_y`` (sequential float) after the horizontal sum;
  iq4_nl keeps two accumulators (even / odd blocks) added before ``hsum_float_8``, and an odd last
  block goes through a scalar ``sumf = fma(d, sumi, sumf)`` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxkv import formats
from jaxkv.ggml_cpu.fp import F64, add32, div32, fma32, mul32, r16, r32

__all__ = ["Isa", "ISA_TABLE", "get_isa", "quantize_q8_x86", "convert_q", "hsum_float_8", "dot_f16",
           "dot_f32", "dot_blocks"]


@dataclass(frozen=True)
class Isa:
    """SIMD facts of one x86 build of ggml-cpu.

    f32_epr / f16_epr: lanes per register (``GGML_F32_EPR`` / ``GGML_F16_EPR``); arr: accumulators
    (``GGML_F*_ARR``); reduce: horizontal sum of ``GGML_F32_VEC_REDUCE`` ("tree": AVX-512
    ``_mm512_reduce_add_ps``; "hadd": AVX ``_mm_hadd_ps``); vexp_width: lanes of ``ggml_v_expf`` in
    ``ggml_vec_soft_max_f32``; f32_tail_group: the F32 dot's leftover loop (``n % f32_step`` elements)
    as compiled: all but the last ``r % f32_tail_group`` of the ``r`` leftovers are multiplied (rounded),
    then added in order; the last ``r % f32_tail_group`` are fused (FMA). 0 = every leftover fused;
    f16_arith_step: 0 = F16 vectors are converted to F32 for arithmetic (``GGML_F32Cx*``); n > 0 = native
    FP16 SIMD arithmetic (``__AVX512FP16__``: ``GGML_F16_STEP`` = 128) in ``ggml_vec_mad_f16`` /
    ``ggml_vec_scale_f16`` on the first ``DV - DV % n`` elements (F16 dots keep F32 accumulation there:
    ``GGML_F16_DOT_*``, so ``f16_epr`` is the F32 width)."""

    name: str
    f32_epr: int
    f16_epr: int
    arr: int
    reduce: str
    vexp_width: int
    f32_tail_group: int = 0
    f16_arith_step: int = 0

    @property
    def f32_step(self) -> int:
        return self.arr * self.f32_epr

    @property
    def f16_step(self) -> int:
        return self.arr * self.f16_epr


ISA_TABLE: dict[str, Isa] = {
    # __AVX512F__ (no AVX512-FP16): simd-mappings.h "F32 AVX512" / "F16 AVX512 Fallback FP16 <-> FP32"
    # tail group 8: ggml 0.25.3 built natively by GCC 12.2 (llama-cpp-python 0.3.36), mul_mat F32
    # n = 1..139, 8 rows each, all bitwise equal (group 4: 59 of 139 sizes
    # wrong; all leftovers fused: 116)
    "avx512": Isa("avx512", 16, 16, 4, "tree", 16, f32_tail_group=8),
    # __AVX512F__ with __AVX512FP16__ (a native build on Sapphire Rapids or later), ggml >= 0.9.8 for the
    # FP16 vec_mad/vec_scale (llama.cpp PR 20529), with GGML_F16_DOT_* (F32-accumulated F16 dots; after
    # ggml 0.21.0, present in 0.25.3): older FP16 builds accumulate F16 dots in F16 (not modelled)
    # (f32_tail_group assumed as for "avx512": no AVX512-FP16 machine measured)
    "avx512fp16": Isa("avx512fp16", 16, 16, 4, "tree", 16, f32_tail_group=8, f16_arith_step=128),
    # __AVX__ with __FMA__ and __F16C__ (an AVX2 build); tail group 4: libggml-python 0.20.2 wheel,
    # mul_mat F32 n = 1..139, 8 rows each, all bitwise equal (group 8: 56 of 139 sizes wrong; all leftovers
    # fused, the earlier model: 116)
    "avx2": Isa("avx2", 8, 8, 4, "hadd", 8, f32_tail_group=4),
}


def get_isa(isa) -> Isa:
    if isinstance(isa, Isa):
        return isa
    t = ISA_TABLE.get(str(isa).lower())
    if t is None:
        raise ValueError(f"isa: expected one of {tuple(ISA_TABLE)}, got {isa!r}")
    return t


# ----------------------------------------------------------------------------------------------------
# horizontal sums


def _reduce_tree(x):
    """_mm512_reduce_add_ps on the last axis (16 lanes): halving tree."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = add32(x[..., :h], x[..., h:])
    return x[..., 0]


def _reduce_hadd(x):
    """AVX: t = lo128 + hi128; hadd twice -> (t0 + t1) + (t2 + t3) on the last axis (8 lanes)."""
    t = add32(x[..., :4], x[..., 4:])
    return add32(add32(t[..., 0], t[..., 1]), add32(t[..., 2], t[..., 3]))


def hsum_float_8(x):
    """quants.c ``hsum_float_8`` on the last axis (8 lanes): ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))."""
    r = add32(x[..., 4:], x[..., :4])
    r = add32(r[..., :2], r[..., 2:])
    return add32(r[..., 0], r[..., 1])


def _vec_reduce(acc, isa: Isa):
    """GGML_F32_VEC_REDUCE / GGML_F16_VEC_REDUCE of acc [..., 4, EPR] -> [...]."""
    a0 = add32(acc[..., 0, :], acc[..., 2, :])
    a1 = add32(acc[..., 1, :], acc[..., 3, :])
    a0 = add32(a0, a1)
    return _reduce_tree(a0) if isa.reduce == "tree" else _reduce_hadd(a0)


# ----------------------------------------------------------------------------------------------------
# conversion of the float operand to the vec-dot type


def quantize_q8_x86(x, with_sum: bool):
    """x86 ``quantize_row_q8_0`` (with_sum=False) / ``quantize_row_q8_1`` (True) of f32 carriers
    [..., n] (n % 32 == 0) -> formats.Blocks(q int32 [..., nb, 32], d [..., nb] (F16 value),
    s [..., nb] or None).

    Per block: amax = max|x|; d = amax/127 (float division, stored as F16); id = 127/amax (0 if
    amax == 0; not 1/d); q = round-half-even(x*id) (float product); q8_1: s = F16(float(d * sum q)),
    with the float d, not the F16 one."""
    x = jnp.asarray(x, F64)
    n = x.shape[-1]
    if n % 32:
        raise ValueError(f"q: row length {n} is not a multiple of 32 (quantized K)")
    xb = x.reshape(x.shape[:-1] + (n // 32, 32))
    amax = jnp.max(jnp.abs(xb), axis=-1)
    d = div32(amax, 127.0)
    idv = jnp.where(amax != 0, div32(127.0, jnp.where(amax != 0, amax, 1.0)), 0.0)
    q = jnp.round(mul32(xb, idv[..., None]))  # _mm256_round_ps(_MM_ROUND_NEAREST): ties to even
    qi = q.astype(jnp.int32)
    s = None
    if with_sum:
        s = r16(mul32(d, jnp.sum(qi, axis=-1).astype(F64)))
    return formats.Blocks(q=qi, d=r16(d), m=None, s=s)


def convert_q(x, dot_type: str):
    """The F32 operand converted to ``dot_type`` ("f16", "f32", "q8_0", "q8_1"): f32 carriers for
    the float types (F16-rounded for "f16"), formats.Blocks for the block types."""
    if dot_type == "f16":
        return r16(x)
    if dot_type == "f32":
        return jnp.asarray(x, F64)
    f = formats.FORMATS.get(dot_type)
    if f is not None and f.quantized and f.dot_type == f.name:  # a block type that is a dot type: q8_0, q8_1
        return quantize_q8_x86(x, dot_type == "q8_1")
    raise ValueError(f"dot_type: unsupported vec_dot_type {dot_type!r}")


# ----------------------------------------------------------------------------------------------------
# float dots


def dot_f16(x, y, isa):
    """``ggml_vec_dot_f16`` of F16 values (f32 carriers) along the last axis (broadcasting) -> f32 carrier.

    F16 x F16 products are exact in float32 and no sum of them is a float32 subnormal, so the SIMD
    part runs in plain float32 (XLA's FMA contraction cannot change an exact product)."""
    isa = get_isa(isa)
    x32 = jnp.asarray(x, F64).astype(jnp.float32)
    y32 = jnp.asarray(y, F64).astype(jnp.float32)
    n = x32.shape[-1]
    step, epr = isa.f16_step, isa.f16_epr
    npm = n - n % step
    shape = jnp.broadcast_shapes(x32.shape[:-1], y32.shape[:-1])
    if npm:
        acc = None
        for i in range(0, npm, step):
            p = (x32[..., i:i + step] * y32[..., i:i + step]).reshape(
                jnp.broadcast_shapes(x32[..., :1].shape, y32[..., :1].shape)[:-1] + (4, epr))
            acc = p if acc is None else acc + p
        a0 = acc[..., 0, :] + acc[..., 2, :]
        a1 = acc[..., 1, :] + acc[..., 3, :]
        a0 = a0 + a1
        if isa.reduce == "tree":
            while a0.shape[-1] > 1:
                h = a0.shape[-1] // 2
                a0 = a0[..., :h] + a0[..., h:]
            s = a0[..., 0].astype(F64)
        else:
            t = a0[..., :4] + a0[..., 4:]
            s = ((t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])).astype(F64)
    else:
        s = jnp.zeros(shape, F64)
    for i in range(npm, n):  # leftovers: sumf += (ggml_float)(x*y), in double, in order
        s = s + (x32[..., i] * y32[..., i]).astype(F64)
    return r32(jnp.broadcast_to(s, shape))


def dot_f32(x, y, isa):
    """``ggml_vec_dot_f32`` of f32 carriers along the last axis (broadcasting) -> f32 carrier."""
    isa = get_isa(isa)
    x = jnp.asarray(x, F64)
    y = jnp.asarray(y, F64)
    n = x.shape[-1]
    step, epr = isa.f32_step, isa.f32_epr
    npm = n - n % step
    shape = jnp.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    if npm:
        acc = jnp.zeros(shape + (4, epr), F64)
        for i in range(0, npm, step):
            xa = x[..., i:i + step].reshape(x.shape[:-1] + (4, epr))
            ya = y[..., i:i + step].reshape(y.shape[:-1] + (4, epr))
            acc = fma32(xa, ya, acc)
        s = _vec_reduce(acc, isa)
    else:
        s = jnp.zeros(shape, F64)
    r = n - npm
    g = isa.f32_tail_group
    n_vec = npm + (r - r % g if g else 0)
    for i in range(npm, n_vec):  # leftovers, vectorized in-order reduction: products rounded, added in order
        s = add32(s, mul32(x[..., i], y[..., i]))
    for i in range(n_vec, n):    # the scalar epilogue: sumf += x*y contracted to an FMA
        s = fma32(x[..., i], y[..., i], s)
    return jnp.broadcast_to(s, shape)


# ----------------------------------------------------------------------------------------------------
# block dots


def _lanes(qx, qy):
    """int32 [..., nb, 32] x [..., nb, 32] -> [..., nb, 8]: exact sums of 4 consecutive products."""
    p = qx * qy
    return jnp.sum(p.reshape(p.shape[:-1] + (8, 4)), axis=-1)


def dot_blocks(kb: formats.Blocks, k_fmt: str, qb: formats.Blocks):
    """x86 ``ggml_vec_dot_<k_fmt>_<q8>`` of K blocks (formats.Blocks [..., nb, 32]) with converted
    query blocks (broadcasting leading axes) -> f32 carrier [...]."""
    lanes = _lanes(kb.q, qb.q).astype(F64)  # [..., nb, 8]
    dk = jnp.asarray(kb.d, F64)
    dq = jnp.asarray(qb.d, F64)
    nb = lanes.shape[-2]
    d = mul32(dk, dq)  # [..., nb] exact (F16 x F16)
    lead = lanes.shape[:-2]
    if k_fmt == "iq4_nl":
        acc1 = jnp.zeros(lead + (8,), F64)
        acc2 = jnp.zeros(lead + (8,), F64)
        b = 0
        while b + 1 < nb:
            acc1 = fma32(d[..., b, None], lanes[..., b, :], acc1)
            acc2 = fma32(d[..., b + 1, None], lanes[..., b + 1, :], acc2)
            b += 2
        s = hsum_float_8(add32(acc1, acc2))
        if b < nb:
            s = fma32(d[..., b], jnp.sum(lanes[..., b, :], axis=-1), s)
        return s
    if k_fmt in formats.BLOCK_KV_TYPES:  # one accumulator; formats with a min add sum(m * s)
        acc = jnp.zeros(lead + (8,), F64)
        for b in range(nb):
            acc = fma32(d[..., b, None], lanes[..., b, :], acc)
        s = hsum_float_8(acc)
        if formats.FORMATS[k_fmt].field("m") is not None:
            summs = jnp.zeros(lead, F64)
            mk = jnp.asarray(kb.m, F64)
            sq = jnp.asarray(qb.s, F64)
            for b in range(nb):
                summs = add32(summs, mul32(mk[..., b], sq[..., b]))
            s = add32(s, summs)
        return s
    raise ValueError(f"k: unsupported block type {k_fmt!r}")

"""llamafile's ``tinyBLAS`` (``ggml-cpu/llamafile/sgemm.cpp``, ``llamafile_sgemm``) on x86: the path
ggml's CPU ``mul_mat`` takes for float operands with two or more src1 columns in a build with
``GGML_USE_LLAMAFILE`` (a build fact: ``ggml.llamafile`` in a trace's metadata, ``LLAMAFILE = 1`` in
llama.cpp's system info).

Shapes: ``mul_mat(A, B)`` with A [m, k] (src0: K, or V transposed) and B [n, k] (src1: q, or the
probabilities) gives C [n, m]; here every dot is taken along the last axis of broadcasting arrays of
f32 carriers (float64 arrays holding float32 values, :mod:`jaxkv.ggml_cpu.fp`).

Which path ``ggml_compute_forward_mul_mat`` (ggml 0.25.3) takes, as data (:func:`mul_mat_path`):

1. src1 contiguous: ``llamafile_sgemm(A type, src1 type)``;
2. else, or if (1) declined, and src1's type is not A's ``vec_dot_type``: src1 converted to
   ``vec_dot_type`` (F32 -> F16 round-to-nearest-even for F16 A), then ``llamafile_sgemm(A type,
   vec_dot_type)``;
3. otherwise ggml's own chunked ``vec_dot`` (:mod:`jaxkv.ggml_cpu.dot`).

``llamafile_sgemm`` on x86 accepts (:data:`SGEMM_RULES`): C F32, ``n >= 2``; A, B both F32 or both F16
(tinyBLAS, ``k % KN == 0`` and ``m % 4 == 0``, else declined); A in Q8_0 / Q4_0 / Q5_0 / IQ4_NL with B
Q8_0 (``tinyBLAS_Q0_AVX``, :func:`q0_dot`; :func:`mul_mat_path` says ``"sgemm_q0"``).

tinyBLAS's arithmetic for one output element (``gemm_bloc``; the RM x RN register tiling and the
threads' job split choose *which* elements are computed together, never *how*): one vector
accumulator of KN float lanes (:data:`SGEMM_LANES`: 16 with AVX-512 ``__m512``, 8 with AVX/AVX2
``__m256``) starting at zero; for ``l = 0, KN, 2KN, ...``: ``acc = fma(A[l:l+KN], B[l:l+KN], acc)``
(``_mm512_fmadd_ps`` / ``_mm256_fmadd_ps``; F16 loads are exact conversions); then ``hsum``: AVX-512
``_mm512_reduce_add_ps``, AVX ``(hi128 + lo128)``, ``movehl``, ``movehdup`` -- both the halving tree
16 -> 8 -> 4 -> 2 -> 1 (AVX: 8 -> 4 -> 2 -> 1). So unlike ``ggml_vec_dot_f16/f32`` (4 accumulators,
AVX's ``hadd`` order, leftovers) there is one accumulator and no leftover (``k % KN == 0``).

``tinyBLAS_Q0_AVX`` (block A, Q8_0 B; every x86 build uses its ``__m256`` kernel): per 32-block, 8
int32 lanes each the exact sum of 4 consecutive products (``_mm256_dpbusd`` or ``maddubs`` + ``madd``
on sign-adjusted bytes), ``acc = fma(d_a * d_b, lanes, acc)`` in one ``__m256`` accumulator, then the
halving-tree ``hsum``. That is ggml's own ``vec_dot`` for Q4_0 / Q5_0 / Q8_0 (same lanes, one
accumulator, ``hsum_float_8``), but not for IQ4_NL, whose ``vec_dot`` keeps two accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from jaxkv import formats
from jaxkv.ggml_cpu.dot import get_isa, hsum_float_8
from jaxkv.ggml_cpu.fp import F64, add32, fma32, mul32

__all__ = ["SGEMM_LANES", "SgemmRule", "SGEMM_RULES", "M_MULTIPLE", "MIN_N", "sgemm_accepts",
           "mul_mat_path", "sgemm_dot", "q0_dot", "ggml_contiguous"]

#: tinyBLAS vector lanes (template argument KN) of the float kernels per x86 build: ``__AVX512F__``
#: (also with AVX512-FP16: llamafile_sgemm tests ``__AVX512F__`` first) ``__m512``, else ``__m256``
SGEMM_LANES: dict[str, int] = {"avx512": 16, "avx512fp16": 16, "avx2": 8}
M_MULTIPLE = 4   # tinyBLAS::matmul: m % 4 == 0 (RM = 4), else declined
MIN_N = 2        # llamafile_sgemm: "only enable sgemm for prompt processing" (n < 2 declined, x86)


@dataclass(frozen=True)
class SgemmRule:
    """One (A type, B type) pair ``llamafile_sgemm`` accepts on x86: ``kernel`` ("sgemm": tinyBLAS,
    "sgemm_q0": tinyBLAS_Q0_AVX); ``k_lanes``: k must be a multiple of the
    ISA's :data:`SGEMM_LANES` (tinyBLAS only)."""

    a_type: str
    b_type: str
    kernel: str
    k_lanes: bool


SGEMM_RULES: tuple[SgemmRule, ...] = (
    SgemmRule("f32", "f32", "sgemm", True),
    SgemmRule("f16", "f16", "sgemm", True),
    SgemmRule("q8_0", "q8_0", "sgemm_q0", False),  # k counts blocks here: no lane condition
    SgemmRule("q4_0", "q8_0", "sgemm_q0", False),
    SgemmRule("q5_0", "q8_0", "sgemm_q0", False),
    SgemmRule("iq4_nl", "q8_0", "sgemm_q0", False),
)


def _lanes(isa) -> int:
    name = get_isa(isa).name
    if name not in SGEMM_LANES:
        raise ValueError(f"isa: llamafile's sgemm is not modelled for the {name!r} build")
    return SGEMM_LANES[name]


def sgemm_accepts(a_type: str, b_type: str, m: int, n: int, k: int, isa) -> str | None:
    """The kernel ``llamafile_sgemm`` runs for C = A[m, k] . B[n, k]^T (``k`` in elements) on the
    x86 build ``isa``, or None where it declines (returns false to ggml)."""
    if n < MIN_N:
        return None
    kn = _lanes(isa)
    for r in SGEMM_RULES:
        if r.a_type == a_type and r.b_type == b_type:
            if r.k_lanes and (k % kn or m % M_MULTIPLE):
                return None
            return r.kernel
    return None


def mul_mat_path(a_type: str, b_type: str, m: int, n: int, k: int, *, isa, llamafile: bool,
                 src1_contiguous: bool = True) -> str:
    """The path of ggml 0.25.3's CPU ``mul_mat(A, B)``: "sgemm", "sgemm_q0" or "vec_dot".

    A (src0) of type ``a_type`` [m rows of k]; B (src1) of type ``b_type`` [n rows of k];
    ``llamafile``: the build has GGML_USE_LLAMAFILE; ``src1_contiguous``: ggml_is_contiguous(src1)."""
    if not llamafile:
        return "vec_dot"
    if src1_contiguous:
        kern = sgemm_accepts(a_type, b_type, m, n, k, isa)
        if kern:
            return kern
    vdt = formats.get_format(a_type).dot_type
    if b_type != vdt:
        kern = sgemm_accepts(a_type, vdt, m, n, k, isa)
        if kern:
            return kern
    return "vec_dot"


def _halving_tree(x):
    """_mm512_reduce_add_ps / sgemm's AVX ``hsum``: pairwise halves of the last axis, summed down to one."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = add32(x[..., h:], x[..., :h])
    return x[..., 0]


def sgemm_dot(a, b, isa):
    """tinyBLAS's dot of A and B rows (already of the kernel's type: F32 values, or F16 values) along
    the last axis, broadcasting the leading axes -> f32 carriers. The last axis must be a multiple of
    the ISA's lanes (:data:`SGEMM_LANES`)."""
    kn = _lanes(isa)
    a = jnp.asarray(a, F64)
    b = jnp.asarray(b, F64)
    k = a.shape[-1]
    if k % kn or b.shape[-1] != k:
        raise ValueError(f"sgemm_dot: row lengths {k}, {b.shape[-1]} must be equal multiples of {kn}")
    shape = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    steps = k // kn
    # [steps, ..., kn]: scan over the KN-wide steps in order
    a_s = jnp.moveaxis(a.reshape(a.shape[:-1] + (steps, kn)), -2, 0)
    b_s = jnp.moveaxis(b.reshape(b.shape[:-1] + (steps, kn)), -2, 0)

    def step(acc, ab):
        return fma32(ab[0], ab[1], acc), None

    acc0 = jnp.zeros(shape + (kn,), F64)
    acc, _ = lax.scan(step, acc0, (a_s, b_s))
    return _halving_tree(acc)


def ggml_contiguous(ne, nb, type_size: int) -> bool:
    """``ggml_is_contiguous`` of a float tensor with ggml-order ``ne`` / ``nb`` (bytes): each dimension
    of more than one element strides by the product of the ones before it (size-1 dimensions skipped)."""
    nxt = int(type_size)
    if int(ne[0]) != 1 and int(nb[0]) != nxt:
        return False
    nxt *= int(ne[0])
    for n, s in zip(list(ne)[1:], list(nb)[1:]):
        if int(n) != 1:
            if int(s) != nxt:
                return False
            nxt *= int(n)
    return True


def q0_dot(kb: formats.Blocks, qb: formats.Blocks):
    """``tinyBLAS_Q0_AVX``'s dot of A blocks (formats.Blocks [..., nb, 32]: Q4_0 / Q5_0 / Q8_0 / IQ4_NL
    values with their F16 scales) with Q8_0 B blocks (broadcasting leading axes) -> f32 carriers [...]."""
    p = kb.q * qb.q
    lanes = jnp.sum(p.reshape(p.shape[:-1] + (8, 4)), axis=-1).astype(F64)  # [..., nb, 8], exact
    d = mul32(jnp.asarray(kb.d, F64), jnp.asarray(qb.d, F64))              # exact (F16 x F16)
    acc = jnp.zeros(lanes.shape[:-2] + (8,), F64)
    for b in range(lanes.shape[-2]):
        acc = fma32(d[..., b, None], lanes[..., b, :], acc)
    return hsum_float_8(acc)

"""Exact float32 / float16 arithmetic of an x86 CPU, carried in float64, and the C library's math.

Every value of the ``ggml-cpu`` model is a float64 array holding a float32-representable number (an
"f32 carrier"). Each C operation is computed in float64 and rounded once to float32 by :func:`r32`:

- ``+ - * /`` of two float32 values: computing in float64 and rounding to float32 gives the correctly
  rounded float32 result (53 >= 2*24 + 2), products are even exact in float64;
- fused multiply-add (``_mm*_fmadd_ps``, compiler-contracted ``a*b + c``): :func:`fma32` rounds the
  exact sum to odd in float64 first (TwoSum), which makes the final rounding to float32 correct;
- float16 storage (``_mm*_cvtps_ph(x, 0)``, ``_cvtss_sh``): :func:`r16`, round to nearest even.

Why not plain float32 in XLA: on CPU XLA contracts ``a*b + c`` into an FMA and flushes float32
subnormals to zero; ggml does neither (except where it asks for an FMA explicitly).

Math functions (all on f32 carriers, returning f32 carriers):
- :func:`expf`: glibc's ``expf`` (glibc >= 2.27, ARM optimized-routines algorithm: 32-entry table of
  2^(i/32), cubic polynomial, evaluated in double, rounded once to float), reimplemented.
- :func:`v_expf`: ggml's SIMD ``ggml_v_expf`` (``vec.h``) for AVX-512 or AVX2, used by ``soft_max``.
- :func:`tanhf` / :func:`expm1f`: glibc's fdlibm-derived float versions, reimplemented (as in glibc
  2.36, which the shared traces' libm matches bit for bit; newer glibc releases may ship correctly
  rounded CORE-MATH versions instead).

Each emulation is checked bit for bit against the machine's libm in ``tests/test_ggml_cpu.py``.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["r32", "r16", "r16x", "mul16", "fma16", "add32", "sub32", "mul32", "div32", "fma32", "expf", "v_expf",
           "tanhf", "expm1f",
           "f32_bits", "from_f32_bits"]

_TWO149 = float(2.0 ** 149)
_MIN_NORMAL32 = float(2.0 ** -126)
F64 = jnp.float64


def r32(y):
    """Round float64 -> nearest float32 value (ties to even; subnormals exact, overflow -> inf), as f64."""
    y = jnp.asarray(y, F64)
    tiny = jnp.round(y * _TWO149) / _TWO149  # the float32 subnormal grid, exact in float64
    return jnp.where(jnp.abs(y) < _MIN_NORMAL32, tiny, y.astype(jnp.float32).astype(F64))


def r16(y):
    """Round an f32 carrier to the nearest float16 value (ties to even, overflow -> inf), as f64
    (x86 ``vcvtps2ph`` with rounding mode 0). The f64 -> f32 step is exact for f32 carriers (float32
    subnormals flush to zero there, and they round to a float16 zero anyway)."""
    y = jnp.asarray(y, F64)
    return y.astype(jnp.float32).astype(jnp.float16).astype(F64)


def add32(a, b):
    return r32(jnp.asarray(a, F64) + jnp.asarray(b, F64))


def sub32(a, b):
    return r32(jnp.asarray(a, F64) - jnp.asarray(b, F64))


def mul32(a, b):
    return r32(jnp.asarray(a, F64) * jnp.asarray(b, F64))


def div32(a, b):
    return r32(jnp.asarray(a, F64) / jnp.asarray(b, F64))


def _round_to_odd_sum(p, c):
    """p + c rounded to odd in float64 (p, c float64; exact sum needs at most 106 bits)."""
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: p + c == s + err exactly
    bits = lax.bitcast_convert_type(s, jnp.int64)
    even = (bits & 1) == 0
    # move one ulp toward the exact value when inexact and s has an even last bit
    toward = jnp.where((err > 0) == (s > 0), 1, -1).astype(jnp.int64)
    fix = (err != 0) & even & jnp.isfinite(s) & (s != 0)
    return jnp.where(fix, lax.bitcast_convert_type(bits + toward, F64), s)


def fma32(a, b, c):
    """float32 fused multiply-add ``round32(a*b + c)`` (single rounding) on f32 carriers."""
    a, b, c = (jnp.asarray(t, F64) for t in (a, b, c))
    p = a * b  # exact: 24 + 24 bits
    return r32(_round_to_odd_sum(p, c))


def _pow2(n):
    """2.0**n for integer-valued n, exactly (XLA's ``exp2`` is off by an ulp at most integers)."""
    n = jnp.asarray(n)
    return jnp.ldexp(jnp.ones(n.shape, F64), n.astype(jnp.int32))


def r16x(y):
    """Round a float64 value once to the nearest float16 value (ties to even, float16 subnormals kept,
    overflow -> inf), as f64: the rounding of native FP16 arithmetic (AVX512-FP16 ``vmulph``,
    ``vfmadd*ph``). Unlike :func:`r16` (which goes through float32) it is exact for any float64 input."""
    y = jnp.asarray(y, F64)
    _, e = jnp.frexp(jnp.where(y == 0, 1.0, y))          # |y| in [2^(e-1), 2^e)
    k = jnp.maximum(e - 1, -14) - 10                        # float16 spacing there: 2^k (2^-24 subnormal)
    r = jnp.ldexp(jnp.round(jnp.ldexp(y, -k)), k)          # exact scalings; round half to even
    r = jnp.where(jnp.abs(r) > 65504.0, jnp.sign(y) * jnp.inf, r)
    return jnp.where(jnp.isfinite(y) & (y != 0), r, y)


def mul16(a, b):
    """float16 product of two float16 values (f64 carriers), rounded once (``vmulph``)."""
    return r16x(jnp.asarray(a, F64) * jnp.asarray(b, F64))  # exact in float64: 11 + 11 bits


def fma16(a, b, c):
    """float16 fused multiply-add ``round16(a*b + c)`` of float16 values (``vfmadd*ph``): the exact sum
    rounded to odd in float64 (53 >= 11 + 2 bits), then once to float16."""
    a, b, c = (jnp.asarray(t, F64) for t in (a, b, c))
    return r16x(_round_to_odd_sum(a * b, c))


def f32_bits(v):
    """uint32 bits of an f32 carrier (normal numbers, zeros, inf; subnormals as zero are never needed)."""
    return lax.bitcast_convert_type(jnp.asarray(v, F64).astype(jnp.float32), jnp.uint32)


def from_f32_bits(b):
    return lax.bitcast_convert_type(jnp.asarray(b, jnp.uint32), jnp.float32).astype(F64)


# ----------------------------------------------------------------------------------------------------
# glibc expf


def _exp2_table() -> np.ndarray:
    """tab[i] = bits(2^(i/32) rounded to double) - (i << 47), computed exactly with Decimal."""
    getcontext().prec = 60
    out = np.zeros(32, np.uint64)
    for i in range(32):
        v = float(Decimal(2) ** (Decimal(i) / Decimal(32)))  # float(Decimal) rounds correctly
        out[i] = np.uint64(np.float64(v).view(np.uint64)) - np.uint64(i << 47)
    return out


_EXP2F_TAB = _exp2_table()
_N = 32.0
_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * _N
_SHIFT = float.fromhex("0x1.8p+52")
_C = (float.fromhex("0x1.c6af84b912394p-5") / _N / _N / _N,
      float.fromhex("0x1.ebfce50fac4f3p-3") / _N / _N,
      float.fromhex("0x1.62e42ff0c52d6p-1") / _N)
_OFLOW = float(np.float32(float.fromhex("0x1.62e42ep6")))
_UFLOW = float(np.float32(-float.fromhex("0x1.9fe368p6")))


def expf(x):
    """glibc ``expf`` on an f32 carrier -> f32 carrier.

    exp(x) = 2^(k/32) * 2^(r/32): k = round(x*32/ln2), table lookup of 2^((k mod 32)/32) with k div 32
    added to the exponent bits, cubic polynomial in r, all in double, one final rounding to float.
    -inf -> 0, x > 88.72 -> inf, x < -103.97 -> 0, NaN -> NaN."""
    x = jnp.asarray(x, F64)
    xs = jnp.where(jnp.isfinite(x), x, 0.0)
    z = _INVLN2N * xs
    # the barrier keeps XLA from folding (z + SHIFT) - SHIFT into z (it reassociates constants)
    kd = lax.optimization_barrier(z + _SHIFT)
    ki = lax.bitcast_convert_type(kd, jnp.uint64)
    kd = kd - _SHIFT
    r = z - kd
    tab = jnp.asarray(_EXP2F_TAB)
    t = tab[(ki & jnp.uint64(31)).astype(jnp.int32)] + (ki << jnp.uint64(47))
    s = lax.bitcast_convert_type(t, F64)
    zz = _C[0] * r + _C[1]
    r2 = r * r
    y = _C[2] * r + 1.0
    y = zz * r2 + y
    y = y * s
    out = r32(y)
    out = jnp.where(x > _OFLOW, jnp.inf, out)
    out = jnp.where(x < _UFLOW, 0.0, out)
    return jnp.where(jnp.isnan(x), x, out)


# ----------------------------------------------------------------------------------------------------
# ggml_v_expf (vec.h), AVX-512 and AVX2 variants

_H = float.fromhex
_VX_SHIFT = _H("0x1.8p23")
_VX_LOG2E = float(np.float32(_H("0x1.715476p+0")))
_VX_LN2HI = float(np.float32(_H("0x1.62e4p-1")))
_VX_LN2LO = float(np.float32(_H("0x1.7f7d1cp-20")))
_VX_P = tuple(float(np.float32(_H(h))) for h in
              ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))


def _vexp_common(x):
    z = fma32(x, _VX_LOG2E, _VX_SHIFT)
    n = sub32(z, _VX_SHIFT)
    b = fma32(-n, _VX_LN2LO, fma32(-n, _VX_LN2HI, x))
    u = mul32(b, b)
    hi = fma32(fma32(_VX_P[0], b, _VX_P[1]), u, fma32(_VX_P[2], b, _VX_P[3]))
    return z, n, b, u, hi


def v_expf(x, isa: str):
    """ggml's SIMD exp approximation ``ggml_v_expf`` for ``isa`` ("avx512", "avx512fp16" or "avx2"), lane-wise on
    f32 carriers (no -inf/NaN special casing beyond what the instructions do)."""
    x = jnp.asarray(x, F64)
    xs = jnp.where(jnp.isfinite(x), x, jnp.where(x > 0, 1e30, -1e30))  # inf lanes take the |n| > 192 branch
    z, n, b, u, hi = _vexp_common(xs)
    if isa in ("avx512", "avx512fp16"):  # the __AVX512F__ variant
        j = fma32(hi, u, fma32(_VX_P[4], b, 1.0))
        # vscalefps: j * 2^n, one rounding (ldexp: XLA's exp2 is not exact at integers)
        res = r32(jnp.ldexp(j, jnp.clip(n, -300, 300).astype(jnp.int32)))
        alt = jnp.where(n <= 0, 0.0, jnp.inf)
        out = jnp.where(jnp.abs(n) > 192, alt, res)
    elif isa == "avx2":
        j = fma32(hi, u, mul32(_VX_P[4], b))
        zb = f32_bits(z)
        e = zb << jnp.uint32(23)
        k = from_f32_bits(e + jnp.uint32(0x3F800000))
        c = jnp.abs(n) > 126
        g = jnp.where(n <= 0, jnp.uint32(0x82000000), jnp.uint32(0))
        s1 = from_f32_bits(g + jnp.uint32(0x7F000000))
        s2 = from_f32_bits(e - g)
        d = jnp.abs(n) > 192
        big = jnp.where(d, mul32(s1, s1), mul32(fma32(s2, j, s2), s1))
        out = jnp.where(c, big, fma32(k, j, k))
    else:
        raise ValueError(f"isa: expected 'avx512', 'avx512fp16' or 'avx2', got {isa!r}")
    return jnp.where(jnp.isnan(x), x, out)


# glibc's float expm1f / tanhf (sysdeps/ieee754/flt-32, the fdlibm algorithms, float arithmetic
# without FMA contraction in the generic x86-64 build); the shared traces' libm is such a glibc (2.36).
_F = lambda h: float(np.float32(h))  # noqa: E731
_LN2_HI = _F(6.9313812256e-01)
_LN2_LO = _F(9.0580006145e-06)
_INVLN2 = _F(1.4426950216e+00)
_fb = lambda b: float(np.uint32(b).view(np.float32))  # noqa: E731
_HALF_LN2 = _fb(0x3EB17218)        # |x| > 0.5 ln2: reduce
_THREE_HALF_LN2 = _fb(0x3F851592)  # |x| < 1.5 ln2: k = +-1
_27LN2 = _fb(0x4195B844)           # x <= -27 ln2: -1
_Q = tuple(_F(c) for c in (-3.3333335072e-02, 1.5873016091e-03, -7.9365076090e-05, 4.0082177293e-06,
                           -2.0109921195e-07))


def expm1f(x):
    """glibc ``expm1f`` (fdlibm ``s_expm1f.c``) on f32 carriers, for finite |x| < 27*ln2 or x > 0 up to
    the overflow threshold (what ``tanhf`` needs); x < -27*ln2 -> -1."""
    x = jnp.asarray(x, F64)
    neg = x < 0
    ax = jnp.abs(x)
    # argument reduction: |x| in (0.5 ln2, 1.5 ln2) -> k = +-1; beyond, k = (int)(invln2*x +- 0.5)
    k_big = jnp.trunc(add32(mul32(_INVLN2, x), jnp.where(neg, -0.5, 0.5)))
    k = jnp.where(ax > _HALF_LN2, jnp.where(ax < _THREE_HALF_LN2, jnp.where(neg, -1.0, 1.0), k_big), 0.0)
    one_k = jnp.abs(k) == 1
    hi = jnp.where(one_k, jnp.where(neg, add32(x, _LN2_HI), sub32(x, _LN2_HI)), sub32(x, mul32(k, _LN2_HI)))
    lo = jnp.where(one_k, jnp.where(neg, -_LN2_LO, _LN2_LO), mul32(k, _LN2_LO))
    xr = jnp.where(k == 0, x, sub32(hi, lo))
    c = jnp.where(k == 0, 0.0, sub32(sub32(hi, xr), lo))
    x = xr
    hfx = mul32(0.5, x)
    hxs = mul32(x, hfx)
    r = add32(_Q[3], mul32(hxs, _Q[4]))
    r = add32(_Q[2], mul32(hxs, r))
    r = add32(_Q[1], mul32(hxs, r))
    r = add32(_Q[0], mul32(hxs, r))
    r1 = add32(1.0, mul32(hxs, r))
    t = sub32(3.0, mul32(r1, hfx))
    e = mul32(hxs, div32(sub32(r1, t), sub32(6.0, mul32(x, t))))
    res0 = sub32(x, sub32(mul32(x, e), hxs))
    e = sub32(sub32(mul32(x, sub32(e, c)), c), hxs)
    res_m1 = sub32(mul32(0.5, sub32(x, e)), 0.5)
    res_p1 = jnp.where(x < -0.25, mul32(-2.0, sub32(e, add32(x, 0.5))), add32(1.0, mul32(2.0, sub32(x, e))))
    p2k = _pow2(jnp.clip(k, -200, 200))
    res_far = sub32(mul32(sub32(1.0, sub32(e, x)), p2k), 1.0)
    kc = jnp.clip(k, 0, 22)
    t_small = 1.0 - _pow2(-kc)  # 0x3f800000 - (0x1000000 >> k): 1 - 2^-k
    res_mid = mul32(sub32(t_small, sub32(e, x)), p2k)
    res_hi = mul32(add32(sub32(x, add32(e, _pow2(-jnp.clip(k, 23, 56)))), 1.0), p2k)
    res = jnp.where(k < 23, res_mid, res_hi)
    res = jnp.where((k <= -2) | (k > 56), res_far, res)
    res = jnp.where(k == 1, res_p1, res)
    res = jnp.where(k == -1, res_m1, res)
    res = jnp.where(k == 0, res0, res)
    res = jnp.where(ax < 2.0 ** -25, x, res)  # hx < 0x33000000
    return jnp.where(neg & (ax >= _27LN2), -1.0, res)


def tanhf(x):
    """glibc ``tanhf`` (fdlibm ``s_tanhf.c``) on f32 carriers: |x| >= 1: 1 - 2/(expm1f(2|x|) + 2);
    |x| < 1: -t/(t + 2) with t = expm1f(-2|x|); |x| >= 22: +-1; sign restored; NaN -> NaN."""
    x = jnp.asarray(x, F64)
    ax = jnp.abs(x)
    axs = jnp.where(ax < 22.0, ax, 1.0)
    tb = expm1f(2.0 * axs)
    zb = sub32(1.0, div32(2.0, add32(tb, 2.0)))
    ts = expm1f(-2.0 * axs)
    zs = div32(-ts, add32(ts, 2.0))
    z = jnp.where(axs >= 1.0, zb, zs)
    z = jnp.where(ax >= 22.0, 1.0, z)
    z = jnp.where(ax < 2.0 ** -55, ax, z)
    out = jnp.where(jnp.signbit(x), -z, z)
    return jnp.where(jnp.isnan(x), x, out)

"""jaxkv.formats against independent oracles.

Oracles, none of them our code:
- gguf-py (``gguf.quants``): dequantize for every format it has (all ours but Q8_1), quantize for F32,
  F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. Compared bit for bit (NaNs: same places).
- hand-derived vectors for Q8_1 and IQ4_NL (derivations written next to them), and a straightforward
  scalar numpy-float32 transliteration of ggml's C reference (``quantize_row_q8_1_ref``,
  ``quantize_row_iq4_nl_ref`` / ``quantize_iq4_nl``), written here independently of the JAX code.
- ggml itself (libggml-base.so from the optional ``libggml-python`` dev dependency) through ctypes,
  when installed: ``quantize_row_*_ref``, ``ggml_quantize_chunk``, ``ggml_fp32_to_fp16_row``.

Every comparison is exact (byte / bit identity): these are format conversions, no tolerance applies.
Shapes are fixed per test so each jitted function compiles once per format.
"""

from __future__ import annotations

import ctypes
import os

import gguf
import gguf.quants as gq
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv import formats as F

QUANT = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "iq4_nl"]
ALL = ["f32", "f16", "bf16"] + QUANT
GGUF_DEQ = [n for n in ALL if n != "q8_1"]  # gguf has no Q8_1 class
GGUF_Q = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # gguf quantizers

_deq = jax.jit(F.dequantize, static_argnums=1)
_q = jax.jit(F.quantize, static_argnums=1)
_q_search = jax.jit(F.quantize_iq4_nl, static_argnums=1)

N_BLOCKS = 64  # blocks per hypothesis example (rows x blocks), one compiled shape per format
ROWS = 4


def _gtype(name):
    return gguf.GGMLQuantizationType(F.get_format(name).type_id)


def _same_bits32(a, b):
    """float32 arrays identical bit for bit, NaNs in the same places (payloads may differ)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(a.view(np.uint32)[~na], b.view(np.uint32)[~nb])


# ----------------------------------------------------------------------------------------------------
# the table


def test_table_matches_gguf_sizes_and_ids():
    for name, f in F.FORMATS.items():
        t = gguf.GGMLQuantizationType[name.upper()]
        assert f.type_id == int(t)
        if name == "q8_1":
            # ggml-common.h: block_q8_1 {ggml_half d; ggml_half s; int8_t qs[32];} static_assert'ed to
            # 2*2 + 32 = 36 bytes; gguf-py's table still says 40 (float d and s, an older layout).
            assert (f.block_size, f.block_bytes) == (32, 36) and gguf.GGML_QUANT_SIZES[t] == (32, 40)
        else:
            assert (f.block_size, f.block_bytes) == gguf.GGML_QUANT_SIZES[t]
        # fields tile the block exactly, in order
        off = 0
        for fld in f.fields:
            assert fld.offset == off
            off += fld.size
        assert off == f.block_bytes
    assert F.FORMATS["q8_1"].type_id == 9
    assert set(F.FORMATS) == set(ALL)


def test_dot_types():
    want = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0",
            "iq4_nl": "q8_0", "q4_1": "q8_1", "q5_1": "q8_1", "q8_1": "q8_1"}
    assert {n: f.dot_type for n, f in F.FORMATS.items()} == want


def test_get_format_forms():
    f = F.FORMATS["q4_0"]
    assert F.get_format("Q4_0") is f and F.get_format(" q4_0 ") is f
    assert F.get_format(gguf.GGMLQuantizationType.Q4_0) is f
    assert F.get_format(2) is f and F.get_format(np.int64(2)) is f and F.get_format(f) is f
    assert F.get_format(9).name == "q8_1"
    assert F.row_bytes("q5_1", 128) == 4 * 24 and F.row_bytes("bf16", 3) == 6


@pytest.mark.parametrize("bad, words", [
    ("q4_k", ["q4_k"]), (12, ["12"]), (gguf.GGMLQuantizationType.Q6_K, ["Q6_K"]), (1.5, ["1.5"]),
])
def test_get_format_errors(bad, words):
    with pytest.raises(ValueError) as e:
        F.get_format(bad)
    for w in words:
        assert w in str(e.value)


def test_bad_input_errors_name_format_multiple_and_size():
    with pytest.raises(ValueError, match=r"q4_0.*multiple of 18.*got 20"):
        F.dequantize(np.zeros((2, 20), np.uint8), "q4_0")
    with pytest.raises(ValueError, match=r"q5_1.*uint8.*float32"):
        F.dequantize(np.zeros((2, 24), np.float32), "q5_1")
    with pytest.raises(ValueError, match=r"nope"):
        F.dequantize(np.zeros((2, 18), np.uint8), "nope")
    with pytest.raises(ValueError, match=r"iq4_nl.*multiple of 32.*got 48"):
        F.quantize(np.zeros((2, 48), np.float32), "iq4_nl")
    with pytest.raises(ValueError, match=r"q8_0.*multiple of 32.*got 33"):
        F.row_bytes("q8_0", 33)
    with pytest.raises(ValueError, match=r"f16.*decode_blocks"):
        F.decode_blocks(np.zeros((2, 4), np.uint8), "f16")
    with pytest.raises(ValueError, match=r"q4_0.*18.*got 36"):
        F.QuantArray(raw=jnp.zeros((2, 36), jnp.uint8), fmt="q4_0", n=32)


# ----------------------------------------------------------------------------------------------------
# dequantize vs gguf on random bytes with special F16 scale bits

# F16 bit patterns by class: NaN (any payload, either sign), +-Inf, subnormal, +-0, ordinary.
_F16_SPECIAL = {
    "nan": lambda r, k: (0x7C00 | r.integers(1, 0x400, k) | (r.integers(0, 2, k) << 15)),
    "inf": lambda r, k: 0x7C00 | (r.integers(0, 2, k) << 15),
    "sub": lambda r, k: r.integers(1, 0x400, k) | (r.integers(0, 2, k) << 15),
    "zero": lambda r, k: r.integers(0, 2, k) << 15,
}


def _random_raw(name, seed, special_frac):
    """uint8 [ROWS, row bytes] of N_BLOCKS blocks; a fraction of every F16 (scale or element) replaced by
    a special bit pattern. BF16/F32 elements get NaN/Inf/subnormal patterns of their own width."""
    f = F.get_format(name)
    r = np.random.default_rng(seed)
    if f.quantized:
        b = r.integers(0, 256, (ROWS, N_BLOCKS // ROWS, f.block_bytes), dtype=np.uint8)
        for fld in f.fields:
            if fld.kind != "f16":
                continue
            h = b[..., fld.offset:fld.offset + 2].copy().view(np.uint16)[..., 0]
            for kind, gen in _F16_SPECIAL.items():
                pick = r.random(h.shape) < special_frac / len(_F16_SPECIAL)
                h = np.where(pick, gen(r, h.shape).astype(np.uint16), h)
            b[..., fld.offset:fld.offset + 2] = h[..., None].view(np.uint8)
        return b.reshape(ROWS, -1)
    n = N_BLOCKS * 8
    if name == "f16":
        h = r.integers(0, 1 << 16, (ROWS, n)).astype(np.uint16)
        for kind, gen in _F16_SPECIAL.items():
            pick = r.random(h.shape) < special_frac / len(_F16_SPECIAL)
            h = np.where(pick, gen(r, h.shape).astype(np.uint16), h)
        return h.view(np.uint8)
    if name == "bf16":  # bf16 = top half of f32: NaN 0x7F81.., Inf 0x7F80, subnormal exponent 0
        h = r.integers(0, 1 << 16, (ROWS, n)).astype(np.uint16)
        sp = np.array([0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x0001, 0x807F, 0x0000, 0x8000], np.uint16)
        h = np.where(r.random(h.shape) < special_frac, sp[r.integers(0, len(sp), h.shape)], h)
        return h.view(np.uint8)
    w = r.integers(0, 1 << 32, (ROWS, n), dtype=np.uint64).astype(np.uint32)
    sp = np.array([0x7F800000, 0xFF800000, 0x7FC00001, 0xFF800001, 0x00000001, 0x807FFFFF, 0, 1 << 31],
                  np.uint32)
    w = np.where(r.random(w.shape) < special_frac, sp[r.integers(0, len(sp), w.shape)], w)
    return w.view(np.uint8)


@pytest.mark.parametrize("name", GGUF_DEQ)
@given(seed=st.integers(0, 2**32 - 1), special_frac=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_dequantize_matches_gguf(name, seed, special_frac):
    raw = _random_raw(name, seed, special_frac)
    got = _deq(raw, F.get_format(name))
    assert got.dtype == jnp.float32
    _same_bits32(got, gq.dequantize(raw, _gtype(name)))


def test_dequantize_q8_1_by_hand():
    # block_q8_1 {d f16, s f16, qs int8[32]}: value_j = d * qs_j; s is not used by dequantize.
    qs = np.arange(-16, 16, dtype=np.int8) * 7  # -112 .. 105
    d = np.float16(0.375)                      # 0x3600
    blk = np.concatenate([np.array([d], np.float16).view(np.uint8), np.array([np.float16(-3.0)]).view(np.uint8),
                          qs.view(np.uint8)])
    got = np.asarray(_deq(np.tile(blk, (ROWS, N_BLOCKS // ROWS)), F.FORMATS["q8_1"]))
    want = qs.astype(np.float32) * np.float32(0.375)  # products of small ints and 3/8: exact
    np.testing.assert_array_equal(got.reshape(-1, 32), np.broadcast_to(want, (N_BLOCKS, 32)))
    b = F.decode_blocks(blk[None], "q8_1")
    assert float(b.d[0, 0]) == 0.375 and float(b.s[0, 0]) == -3.0 and b.m is None
    np.testing.assert_array_equal(np.asarray(b.q)[0, 0], qs.astype(np.int32))


@pytest.mark.parametrize("name", [n for n in QUANT if n != "q8_1"])
def test_decode_blocks_reconstructs_gguf(name):
    """decode_blocks' ints and scales give gguf's values: d*q (+m) in float32 (the formula of every
    ggml dequantizer) and the q ranges stated in the docstring."""
    raw = _random_raw(name, 7, 0.0)
    b = F.decode_blocks(raw, name)
    q, d = np.asarray(b.q), np.asarray(b.d)
    assert q.dtype == np.int32 and q.shape == (ROWS, N_BLOCKS // ROWS, 32) and d.shape == q.shape[:-1]
    rng = {"q4_0": (-8, 7), "q4_1": (0, 15), "q5_0": (-16, 15), "q5_1": (0, 31), "q8_0": (-128, 127)}
    if name == "iq4_nl":
        assert set(np.unique(q)) <= set(F.KVALUES_IQ4NL)
    else:
        assert q.min() >= rng[name][0] and q.max() <= rng[name][1]
    val = d[..., None] * q.astype(np.float32)
    if b.m is not None:
        val = val + np.asarray(b.m)[..., None]
    else:
        assert name not in ("q4_1", "q5_1")
    _same_bits32(val.reshape(ROWS, -1), gq.dequantize(raw, _gtype(name)))


def test_dequantize_jit_vmap_and_leading_shapes():
    raw = _random_raw("q5_1", 3, 0.0)  # [ROWS, bytes]
    f = F.FORMATS["q5_1"]
    want = np.asarray(gq.dequantize(raw, _gtype("q5_1")))
    _same_bits32(jax.vmap(lambda r: F.dequantize(r, f))(raw), want)
    _same_bits32(jax.jit(jax.vmap(jax.vmap(lambda r: F.dequantize(r, f))))(raw.reshape(2, 2, -1)),
                 want.reshape(2, 2, -1))
    _same_bits32(F.dequantize(raw.reshape(-1), f), want.reshape(-1))  # one row, no leading axes
    _same_bits32(F.dequantize(raw.reshape(2, 1, 2, -1), f), want.reshape(2, 1, 2, -1))
    assert F.dequantize(np.zeros((3, 0), np.uint8), f).shape == (3, 0)
    x = np.asarray(want)  # quantize under vmap too (the cache quantizes inside jit/vmap)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda r: F.quantize(r, f))(x)), np.asarray(_q(x, f)))


# ----------------------------------------------------------------------------------------------------
# quantize vs gguf on awkward floats

_BLOCK_KINDS = ["normal", "zero", "large", "subnormal", "outlier", "tiny_normal", "ties"]


def _awkward_floats(seed, kinds):
    """float32 [ROWS, N_BLOCKS/ROWS*32]: each 32-block drawn from one kind of ``kinds``."""
    r = np.random.default_rng(seed)
    out = np.empty((N_BLOCKS, 32), np.float32)
    for i in range(N_BLOCKS):
        k = kinds[r.integers(len(kinds))]
        if k == "normal":
            x = r.standard_normal(32) * 10.0 ** r.uniform(-6, 6)
        elif k == "zero":  # signed zeros in any order
            x = np.where(r.random(32) < 0.5, -0.0, 0.0)
        elif k == "large":  # near FLT_MAX: scales overflow F16, max-min may overflow float32
            x = r.uniform(-1, 1, 32) * 3.4e38
        elif k == "subnormal":  # float32 subnormals (and zeros)
            x = (r.integers(-(1 << 23), 1 << 23, 32) * r.random(32).round()).astype(np.float64) * 2.0**-149
        elif k == "outlier":
            x = r.standard_normal(32) * 1e-3
            x[r.integers(32)] = r.choice([-1, 1]) * 10.0 ** r.uniform(0, 4)
        elif k == "tiny_normal":  # normal inputs whose scale is an F16 subnormal / underflows
            x = r.standard_normal(32) * 10.0 ** r.uniform(-12, -5)
        else:  # "ties": small integers and halves, exercising roundf / +0.5 truncation ties
            x = r.integers(-16, 17, 32) / 2.0
        out[i] = x
    return out.reshape(ROWS, -1)


@pytest.mark.parametrize("name", GGUF_Q)
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(_BLOCK_KINDS), min_size=1,
                                                    max_size=4, unique=True))
def test_quantize_matches_gguf(name, seed, kinds):
    x = _awkward_floats(seed, kinds)
    got = np.asarray(_q(x, F.get_format(name)))
    want = np.ascontiguousarray(gq.quantize(x, _gtype(name))).view(np.uint8)
    if name in ("q4_0", "q5_0", "q4_1", "q5_1"):
        want = _gguf_signed_zero_fix(name, x, want)
    np.testing.assert_array_equal(got, want)


def _gguf_signed_zero_fix(name, x, want):
    """gguf differs from ggml only in the sign of zero scales; patch those bytes with ggml's rule.

    - q4_0/q5_0, a block whose |max| is 0: ggml keeps ``max = 0.0f`` (its ``amax < fabsf(v)`` never
      fires), so d = +0/-8 = -0 (F16 0x8000); gguf takes max = x[argmax] which may be -0.0 (d = +0).
    - q4_1/q5_1: ggml's min / max are the *first* elements equal to the minimum / maximum (``v < min``,
      ``v > max``); numpy's ``min``/``max`` may return the other zero. Blocks whose min or max is a
      zero get m = F16(first min) and d = F16((first max - first min) / nlev) recomputed.
    Checked against ggml itself in test_quantize_matches_ggml_ref (libggml).
    """
    xb = x.reshape(-1, 32)
    w = want.reshape(xb.shape[0], -1).copy()
    if name in ("q4_0", "q5_0"):
        hit = np.abs(xb).max(axis=1) == 0
        w[hit, 0], w[hit, 1] = 0x00, 0x80
        return w.reshape(want.shape)
    nlev = np.float32(15 if name == "q4_1" else 31)
    for i in np.where((xb.min(1) == 0) | (xb.max(1) == 0))[0]:
        mn = xb[i][np.argmax(xb[i] == xb[i].min())]
        mx = xb[i][np.argmax(xb[i] == xb[i].max())]
        w[i, 0:2] = np.array([(mx - mn) / nlev], np.float32).astype(np.float16).view(np.uint8)
        w[i, 2:4] = np.array([mn], np.float16).view(np.uint8)
    return w.reshape(want.shape)


def test_float64_input_rounds_to_float32_exactly():
    """quantize(x64) == quantize(numpy's RNE float32 of x64), subnormal results included."""
    r = np.random.default_rng(4)
    x64 = np.concatenate([r.standard_normal(96) * 1e-40, r.standard_normal(32) * 1e-3,
                          (r.integers(1, 1 << 20, 128) + 0.5) * 2.0**-149])
    x32 = x64.astype(np.float32)
    assert (np.abs(x32[:96]) < 2.0**-126).mean() > 0.5  # the subnormal range is exercised
    for name in ("f32", "q8_0"):
        np.testing.assert_array_equal(np.asarray(F.quantize(jnp.asarray(x64, jnp.float64), name)),
                                      np.asarray(F.quantize(x32, name)))


def test_f16_nan_and_rounding_edges():
    """F16 conversion edges against numpy (RNE) and ggml's NaN rule (sign | 0x7E00, payload dropped)."""
    u = np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,
                  0x387FE000, 0x00000001, 0x80000000, 0x7F800000, 0xFF800000, 0x3F801000, 0x3F803000],
                 np.uint32)
    x = np.tile(u.view(np.float32), 4)  # 56 elements, not a block format: any n
    got = np.asarray(F.quantize(x[None], "f16")).view(np.uint16)[0]
    np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))
    nan = np.array([0x7F800001, 0xFF812345, 0x7FC00000, 0xFFFFFFFF], np.uint32).view(np.float32)
    got = np.asarray(F.quantize(nan, "f16")).view(np.uint16)
    np.testing.assert_array_equal(got, [0x7E00, 0xFE00, 0x7E00, 0xFE00])


def test_bf16_nan_matches_gguf():
    nan = np.array([0x7F800001, 0xFF812345, 0x7FC00000, 0xFFFFFFFF, 0x7F7FFFFF, 0x3F808000, 0x3F818000],
                   np.uint32).view(np.float32)
    got = np.asarray(F.quantize(nan, "bf16"))
    np.testing.assert_array_equal(got, gq.quantize(nan, gguf.GGMLQuantizationType.BF16).view(np.uint8))


# ----------------------------------------------------------------------------------------------------
# Q8_1 and IQ4_NL: hand-derived vectors


def _f16_bytes(v):
    return list(np.array([v], np.float16).view(np.uint8))


def test_q8_1_hand_vector():
    # x_j = c*(8j - 127), c = 2^-4: amax = 127c, d = 127c/127 = c (exact), id = 1/c = 16 (exact),
    # qs_j = roundf(x_j * id) = 8j - 127 exactly; sum(qs) = 8*496 - 127*32 = -96; s = -96*c = -6.0.
    c = 2.0**-4
    j = np.arange(32)
    x = (c * (8 * j - 127)).astype(np.float32)
    want = _f16_bytes(c) + _f16_bytes(-6.0) + list((8 * j - 127).astype(np.int8).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(F.quantize(x, "q8_1")), want)


def test_q8_1_roundf_half_away_from_zero():
    # amax = 127 -> d = 1, id = 1; x*id = x exactly, so qs = roundf(x): halves go away from zero
    # (0.5 -> 1, -0.5 -> -1, 2.5 -> 3, -2.5 -> -3; half-to-even would give 0, 0, 2, -2).
    x = np.array([127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997] + [0] * 24, np.float32)
    qs = [127, 1, -1, 2, -2, 3, -3, 0] + [0] * 24  # 0.49999997 -> 0 (not floor(x + 0.5) = 1)
    want = _f16_bytes(1.0) + _f16_bytes(float(sum(qs))) + list(np.array(qs, np.int8).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(F.quantize(x, "q8_1")), want)


def test_iq4_nl_hand_vector_exact_grid():
    # x_j = c * kvalues[j % 16], c = 2^-3. The first |x| maximum is x_0 = -127c, so (ntry = -1)
    # d0 = max / kvalues[0] = c and id = 1/c = 8: id*x_j = kvalues[j%16] exactly -> L_j = j % 16.
    # Refit d = sum(w q x) / sum(w q^2) with w = x^2: every term of the first sum is c times the second's,
    # and c is a power of two, so the float32 sums keep that ratio exactly: d = c, F16 0x3000.
    # qs byte j = L_j | L_{j+16} << 4 = j | j << 4.
    c = 2.0**-3
    x = np.array([c * F.KVALUES_IQ4NL[j % 16] for j in range(32)], np.float32)
    want = _f16_bytes(c) + [j | (j << 4) for j in range(16)]
    np.testing.assert_array_equal(np.asarray(F.quantize(x, "iq4_nl")), want)


def test_iq4_nl_hand_vector_tie_goes_up():
    # x = c*[-127, -4.5, 0, ..., 0], c = 1: d0 = -127/-127 = 1, id = 1. best_index(-4.5): between
    # kvalues[7] = -10 and kvalues[8] = 1 the distances are 5.5 and 5.5; ggml's test is
    # `x - val[mu-1] < val[mu] - x ? mu-1 : mu`, so the tie goes to index 8. best_index(0) = 8 too
    # (10 vs 1). Refit: sum(wqx) = 16129*16129 - 20.25*4.5 and sum(wq^2) = 16129*16129 + 20.25 (float32
    # sums, each term rounded): the ratio is within 1e-6 of 1, so d rounds to F16 1.0 (0x3C00).
    # L = [0, 8, 8, ...] -> byte 0 = 0 | 8 << 4 = 0x80, bytes 1.. = 0x88.
    x = np.zeros(32, np.float32)
    x[0], x[1] = -127.0, -4.5
    want = _f16_bytes(1.0) + [0x80] + [0x88] * 15
    np.testing.assert_array_equal(np.asarray(F.quantize(x, "iq4_nl")), want)


def test_iq4_nl_search_hand_vector():
    # quantize_iq4_nl (ntry = 7) on the exact-grid block above: the first fit already has zero error
    # (d = c, every x_j = d*kvalue), and a search step only replaces it when sumqx^2 > best*sumq2 strictly;
    # best = d*sumqx = sumqx^2/sumq2 is the maximum of that ratio (Cauchy-Schwarz), so nothing beats it.
    # The final pass recomputes L with id = 1/d = 8: L_j = j % 16 again.
    c = 2.0**-3
    x = np.array([c * F.KVALUES_IQ4NL[j % 16] for j in range(32)], np.float32)
    want = _f16_bytes(c) + [j | (j << 4) for j in range(16)]
    np.testing.assert_array_equal(np.asarray(F.quantize_iq4_nl(x)), want)


# ----------------------------------------------------------------------------------------------------
# Q8_1 and IQ4_NL: scalar numpy transliteration of ggml's C reference (float32 scalars, C order)

_f32 = np.float32
_KV = [_f32(v) for v in F.KVALUES_IQ4NL]


def _f16_round_bits(v):
    """float32 -> ggml half bits: numpy's RNE for numbers, ggml's portable rule for NaN."""
    if np.isnan(v):
        return 0xFE00 if np.signbit(v) else 0x7E00
    return int(np.array([v], np.float32).astype(np.float16).view(np.uint16)[0])


def _c_i8(v):
    """C (int8_t) of a float on x86: cvttss2si (NaN/Inf/out of range -> INT_MIN), low byte."""
    if not np.isfinite(v) or abs(float(v)) >= 2.0**31:
        return 0
    return int(np.trunc(v)) & 0xFF


def _c_roundf(v):
    t = np.trunc(v)
    return t + np.sign(v) if abs(v - t) >= _f32(0.5) else t


def _ref_q8_1_block(x):
    amax = _f32(0)
    for v in x:
        amax = max(amax, abs(v))  # MAX(amax, fabsf(v))
    d = amax / _f32(127)
    idd = _f32(1) / d if d else _f32(0)
    qs, s = [], 0
    for j in range(32):
        b = _c_i8(_c_roundf(x[j] * idd))
        qs.append(b)
        s += b - 256 if b >= 128 else b
    h, sh = _f16_round_bits(d), _f16_round_bits(_f32(s) * d)
    return [h & 0xFF, h >> 8, sh & 0xFF, sh >> 8] + qs


def _best_index(x):
    if x <= _KV[0]:
        return 0
    if x >= _KV[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _KV[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - _KV[mu - 1] < _KV[mu] - x else mu


def _ref_iq4_nl_block(x, ntry, L):
    """quantize_row_iq4_nl_impl(32, 32, ...) without quant weights; L is the caller's scratch (kept
    between blocks as in ggml). Returns the 18 bytes."""
    w = [v * v for v in x]
    amax, mx = _f32(0), _f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < _f32(1e-15):
        d = _f32(0)
    else:
        d = -mx / _KV[0] if ntry > 0 else mx / _KV[0]
        idd = _f32(1) / d
        sqx = sq2 = _f32(0)
        for j in range(32):
            L[j] = _best_index(idd * x[j])
            q = _KV[L[j]]
            sqx += w[j] * q * x[j]
            sq2 += w[j] * q * q
        d = sqx / sq2 if sq2 > 0 else _f32(0)
        best = d * sqx
        for itry in range(-ntry, ntry + 1):
            idd = (_f32(itry) + _KV[0]) / mx
            sqx = sq2 = _f32(0)
            for j in range(32):
                q = _KV[_best_index(idd * x[j])]
                sqx += w[j] * q * x[j]
                sq2 += w[j] * q * q
            if sq2 > 0 and sqx * sqx > best * sq2:
                d = sqx / sq2
                best = d * sqx
    if ntry > 0:
        idd = _f32(1) / d if d else _f32(0)
        for j in range(32):
            L[j] = _best_index(idd * x[j])
    h = _f16_round_bits(d)
    return [h & 0xFF, h >> 8] + [L[j] | (L[j + 16] << 4) for j in range(16)]


def _ref_rows(x, block_fn):
    out = []
    for row in np.asarray(x, np.float32).reshape(-1, x.shape[-1]):
        L = [8] * 32  # jaxkv's choice for ggml's uninitialised scratch (see formats._q_iq4_nl)
        out.append(sum((block_fn(list(row[i:i + 32]), L) for i in range(0, row.size, 32)), []))
    return np.array(out, np.uint8).reshape(x.shape[:-1] + (-1,))


_REF_KINDS = ["normal", "zero", "outlier", "tiny_normal", "ties", "subnormal", "large"]


@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(_REF_KINDS), min_size=1, max_size=3,
                                                    unique=True))
def test_q8_1_matches_c_transliteration(seed, kinds):
    x = _awkward_floats(seed, kinds)
    with np.errstate(all="ignore"):
        want = _ref_rows(x, lambda b, L: _ref_q8_1_block([_f32(v) for v in b]))
    np.testing.assert_array_equal(np.asarray(_q(x, F.FORMATS["q8_1"])), want)


# IQ4_NL's weighted sums overflow float32 for "large" blocks (x^4 ~ 1e152): both sides then carry
# inf/NaN through the same comparisons; they are kept in the property.
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(_REF_KINDS), min_size=1, max_size=3,
                                                    unique=True))
def test_iq4_nl_matches_c_transliteration(seed, kinds):
    x = _awkward_floats(seed, kinds)
    with np.errstate(all="ignore"):
        want = _ref_rows(x, lambda b, L: _ref_iq4_nl_block([_f32(v) for v in b], -1, L))
    np.testing.assert_array_equal(np.asarray(_q(x, F.FORMATS["iq4_nl"])), want)


_SEARCH_ROWS = 2  # the scalar search reference is slow (15 tries x 32 x binary search per block)


@settings(max_examples=max(3, settings.default.max_examples // 5))
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(_REF_KINDS), min_size=1, max_size=3,
                                                    unique=True))
def test_iq4_nl_search_matches_c_transliteration(seed, kinds):
    x = _awkward_floats(seed, kinds)[:, :_SEARCH_ROWS * 32]
    with np.errstate(all="ignore"):
        want = _ref_rows(x, lambda b, L: _ref_iq4_nl_block([_f32(v) for v in b], 7, L))
    np.testing.assert_array_equal(np.asarray(_q_search(x, 7)), want)


# ----------------------------------------------------------------------------------------------------
# ggml itself, when libggml-python (dev extra) is installed


@pytest.fixture(scope="module")
def libggml_base():
    libggml = pytest.importorskip("libggml", reason="libggml-python (dev extra) not installed")
    path = os.path.join(os.path.dirname(libggml.__file__), "lib64", "libggml-base.so")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def _ggml_row_ref(lib, name, x):
    f = F.get_format(name)
    out = []
    for row in np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1]):
        row = np.ascontiguousarray(row)
        y = np.zeros(F.row_bytes(f, row.size), np.uint8)
        getattr(lib, f"quantize_row_{name}_ref")(row.ctypes.data_as(ctypes.c_void_p),
                                                 y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(row.size))
        out.append(y)
    return np.stack(out).reshape(x.shape[:-1] + (-1,))


@pytest.mark.parametrize("name", QUANT)
def test_quantize_matches_ggml_ref(libggml_base, name):
    x = _awkward_floats(11, _BLOCK_KINDS)
    x[:, :32] = np.random.default_rng(1).standard_normal(32)  # iq4_nl: block 0 of a row never tiny
    np.testing.assert_array_equal(np.asarray(_q(x, F.get_format(name))), _ggml_row_ref(libggml_base, name, x))


@pytest.mark.parametrize("name", QUANT)
def test_quantize_inf_matches_ggml_ref(libggml_base, name):
    """Blocks with +-Inf (one, several, all; and FLT_MAX pairs whose range overflows): ggml's running
    min/max start at +-FLT_MAX, casts of NaN/Inf give 0, scales overflow to F16 Inf."""
    r = np.random.default_rng(13)
    x = r.standard_normal((8, 64)).astype(np.float32)
    x[0, 3] = np.inf
    x[1, 40] = -np.inf
    x[2, :32] = np.inf
    x[3, 32:] = -np.inf
    x[4, 5], x[4, 9] = np.inf, -np.inf
    x[5, 0], x[5, 1] = 3.4e38, -3.4e38
    x[6, :32] = np.float32(3.4028235e38)
    x[:, 32:][7] = np.inf * np.sign(r.standard_normal(32))
    with np.errstate(all="ignore"):
        want = _ggml_row_ref(libggml_base, name, x)
    np.testing.assert_array_equal(np.asarray(F.quantize(x, name)), want)


def test_table_matches_ggml_type_traits(libggml_base):
    libggml_base.ggml_type_size.restype = ctypes.c_size_t
    libggml_base.ggml_blck_size.restype = ctypes.c_int64
    libggml_base.ggml_type_name.restype = ctypes.c_char_p
    for name, f in F.FORMATS.items():
        t = ctypes.c_int(f.type_id)
        assert libggml_base.ggml_type_name(t).decode() == name
        assert (libggml_base.ggml_blck_size(t), libggml_base.ggml_type_size(t)) == (f.block_size, f.block_bytes)


def test_iq4_nl_search_matches_ggml_quantize_chunk(libggml_base):
    x = _awkward_floats(12, _BLOCK_KINDS)
    nrows, n = x.shape
    y = np.zeros(nrows * F.row_bytes("iq4_nl", n), np.uint8)
    libggml_base.ggml_quantize_init(ctypes.c_int(20))
    libggml_base.ggml_quantize_chunk(ctypes.c_int(20), np.ascontiguousarray(x).ctypes.data_as(ctypes.c_void_p),
                                     y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(0),
                                     ctypes.c_int64(nrows), ctypes.c_int64(n), ctypes.c_void_p(0))
    np.testing.assert_array_equal(np.asarray(_q_search(x, 7)), y.reshape(nrows, -1))


def test_f16_matches_ggml_fp32_to_fp16_row(libggml_base):
    r = np.random.default_rng(5)
    x = r.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    y = np.zeros(x.size, np.uint16)
    libggml_base.ggml_fp32_to_fp16_row(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p),
                                       ctypes.c_int64(x.size))
    np.testing.assert_array_equal(np.asarray(F.quantize(x, "f16")).view(np.uint16), y)


# ----------------------------------------------------------------------------------------------------
# QuantArray


def test_quantarray_pytree_and_indexing():
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    qa = F.QuantArray.from_float(x, "q4_1")
    assert qa.shape == (2, 3, 64) and qa.raw.shape == (2, 3, 40) and qa.fmt is F.FORMATS["q4_1"]
    leaves, tree = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 1 and leaves[0] is qa.raw
    deq = np.asarray(qa.dequantize())
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.dequantize())(qa)), deq)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda a: a.dequantize())(qa)), deq)
    np.testing.assert_array_equal(np.asarray(qa[1].dequantize()), deq[1])
    np.testing.assert_array_equal(np.asarray(qa[:, 1:].dequantize()), deq[:, 1:])
    assert qa[0, 2].shape == (64,)
    with pytest.raises(IndexError):
        qa[0, 0, 0]
    with pytest.raises(IndexError):
        qa[..., 0]
    # quantize error bound (ggml's q4_1 rounding): |x - deq| <= d/2 per block, d = (max-min)/15,
    # plus the F16 rounding of d and m (relative 2^-11 of max|x| each; 4x margin below).
    xb, db = x.reshape(-1, 32), deq.reshape(-1, 32)
    d = (xb.max(1) - xb.min(1)) / 15
    bound = d / 2 + 4 * 2.0**-11 * np.abs(xb).max(1) * 16
    assert (np.abs(xb - db).max(1) <= bound).all()


def test_selection_checks_names_and_reason():
    """jaxkv.formats.selection: a hand-picked list of K/V types, returned unchanged once each name is
    one of KV_TYPES (either spelling) and a reason is given."""
    pairs = (("F16", "Q8_0"), ("iq4_nl", "f32"))
    assert F.selection("why", pairs) == pairs and F.selection("why", ["q4_0"]) == ("q4_0",)
    with pytest.raises(ValueError, match="q4_7"):
        F.selection("why", ("q8_0", "q4_7"))
    with pytest.raises(ValueError, match="Q8_1"):
        F.selection("why", (("F16", "Q8_1"),))  # a format, but not a K/V type
    with pytest.raises(ValueError, match="reason"):
        F.selection(" ", ("q8_0",))

"""Live ggml oracle (jaxkv.oracles.ggml): ABI facts, quantize_chunk bytes, agreement with the shared ggml
traces, plumbing (mask / GQA / sinks / softcap / ALiBi / mixed cache) against an independent float64 numpy
reference, and input validation (bad inputs raise, the process survives).

Tolerances (each stated where used):
- ``TOL_ISA``: the shared traces were written by ggml 0.21 built for AVX-512; the wheel is ggml 0.20.2 built
  for AVX2. F16/F32 dot products reduce 8 lanes instead of 16 and the F16 V accumulator then rounds at
  different points, so outputs differ by F16 roundings: bounded by two F16 ulps of relative error,
  ``NMSE <= (2 * 2**-11)**2 = 9.5e-7``. The trace build also fuses ``S = S*ms + vs`` into an FMA and the
  wheel does not (measured, docs/ggml-findings.md): an ulp in a row's sum at a new maximum, far below that
  bound. Same-type quantized K/V (no F16/F32 SIMD reduction, no such event in those traces) are measured
  bit-exact and asserted exact.
- plumbing against float64: see ``TOL_F32`` / ``TOL_F16`` / ``TOL_Q``.
"""

from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys
import textwrap

import gguf
import gguf.quants
import numpy as np
import pytest
from conftest import GGML_TRACES, REPO
from hypothesis import given
from hypothesis import strategies as st

from jaxkv.oracles import ggml as og
from jaxkv.oracles.ggml_replay import read_trace
from jaxkv.oracles.ggml_replay import replay as run_trace

pytestmark = pytest.mark.skipif(not og.available(), reason="libggml-python wheel not installed (ggml oracle)")

BLOCK_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
U16 = 2.0**-11  # F16 unit roundoff
TOL_ISA = (2 * U16) ** 2
# F32 K/V: every op is an F32 rounding (u = 2**-24) on sums of up to n_kv terms; relative error
# <= n_kv * u ~ 1e-5 worst case, so NMSE <= 1e-10 holds with margin for n_kv <= 100.
TOL_F32 = 1e-10
# F16 K/V: q is rounded to F16 for the dot (u_f16) and the V accumulator is F16, rounded after every
# scale and add: a random-walk of n_kv roundings of relative size u_f16 -> NMSE ~ n_kv * u_f16**2 / 3
# (~1e-5 for n_kv = 100); bound TOL_F16 = 4 * n_kv * u_f16**2.
# Block formats (vs the float64 reference on the dequantized K/V): q is quantized to Q8_0/Q8_1 for the dot;
# rounding to steps d = amax/127 (amax ~ 2.5 sigma over 32 Gaussian values) has relative variance
# (2.5/127)**2/12 ~ 3e-5, which reaches the output at about that size (measured 1.6e-5 .. 1.8e-5): 1e-4.
TOL_Q = 1e-4


# --- helpers ------------------------------------------------------------------------------------------------


def nmse(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(((x - ref) ** 2).sum() / max((ref**2).sum(), 1e-300))


def alibi(H: int, max_bias: float) -> np.ndarray:
    """ALiBi slopes as trace-format.md states them, in float64."""
    if max_bias <= 0:
        return np.ones(H)
    n2 = 2 ** int(np.floor(np.log2(H)))
    m0, m1 = 2.0 ** (-max_bias / n2), 2.0 ** (-max_bias / 2 / n2)
    return np.array([m0 ** (h + 1) if h < n2 else m1 ** (2 * (h - n2) + 1) for h in range(H)])


def reference(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None):
    """float64 attention in the canonical layout, written from trace-format.md (independent of jaxkv)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    H, Hkv = q.shape[2], k.shape[2]
    kr, vr = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)  # head h -> h // (H // Hkv)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if mask is not None:
        s = s + alibi(H, max_bias)[None, :, None, None] * np.asarray(mask, np.float64)
    if sinks is not None:
        s = np.concatenate([s, np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None],
                                               s.shape[:3] + (1,))], axis=-1)
    m = s.max(axis=-1, keepdims=True)
    e = np.where(np.isneginf(s), 0.0, np.exp(s - np.where(np.isneginf(m), 0.0, m)))
    tot = e.sum(axis=-1, keepdims=True)
    p = np.where(tot > 0, e / np.where(tot > 0, tot, 1.0), 0.0)
    if sinks is not None:
        p = p[..., :-1]
    return np.einsum("bhqk,bkhd->bqhd", p, vr)


def gguf_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    return np.asarray(gguf.quants.quantize(np.asarray(x, np.float32), gguf.GGMLQuantizationType[fmt]))


def gguf_dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]), np.float32)


def case(seed, B=2, n_q=3, H=8, Hkv=2, n_kv=96, Dk=64, Dv=64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n_q, H, Dk)).astype(np.float32)
    k = rng.standard_normal((B, n_kv, Hkv, Dk)).astype(np.float32)
    v = rng.standard_normal((B, n_kv, Hkv, Dv)).astype(np.float32)
    return rng, q, k, v


def exact_across_isa(md, ts) -> bool:
    """flash_attn_ext with K and V of one block format: integer block dots, F32 V accumulation; measured
    bit-identical between the AVX-512 ggml 0.21 traces and the AVX2 ggml 0.20.2 wheel."""
    return (md["trace.op"] == "flash_attn_ext" and ts["k"][0] == ts["v"][0]
            and ts["k"][0] not in ("F16", "F32", "BF16"))


# --- library facts ------------------------------------------------------------------------------------------


def test_library_info_records_the_build():
    info = og.library_info()
    feats = info["features"]
    widest = next((n for n in ("avx512", "avx2", "avx", "neon") if feats[n]), "scalar")
    # AVX-512 with native FP16 arithmetic is told apart by a probe (ggml reports no such feature)
    assert info["isa"] == ("avx512fp16" if info["f16_arith"] == "f16" else widest)
    assert info["f16_arith"] in ("f16", "f32") and (info["f16_arith"] == "f32" or widest == "avx512")
    assert info["version"].count(".") == 2 and info["commit"]
    if info["wheel"] and info["wheel"].startswith("0.20.2") and "JAXKV_GGML_LIB_DIR" not in os.environ:
        # the libggml-python 0.20.2 wheel: ggml 0.20.2 compiled for AVX2/FMA/F16C, no AVX-512
        assert info["version"] == "0.20.2"
        assert info["isa"] == "avx2" and feats["fma"] and feats["f16c"] and not feats["avx512"]


def test_library_info_names_the_loaded_build_not_the_installed_wheel(tmp_path):
    """``wheel`` is the libggml-python version only when the loaded libraries are that wheel's: a build
    loaded through JAXKV_GGML_LIB_DIR (e.g. llama-cpp-python's ggml 0.25.3) reports its own version and no
    wheel, so ``record`` writes the right facts into traces. ``contract`` carries the build's
    ``ggml.contract.*`` facts (what ``record`` writes)."""
    from jaxkv.oracles import ggml_lib as gl

    info = og.library_info()
    assert gl.wheel_version(tmp_path) is None
    assert info["wheel"] == gl.wheel_version(info["lib_dir"])
    assert info["version"] == gl.lib().ggml_version().decode()
    if info["wheel"] is None:
        assert pathlib.Path(info["lib_dir"]).resolve() == pathlib.Path(os.environ["JAXKV_GGML_LIB_DIR"]).resolve()
    from jaxkv.ggml_cpu import ISAS

    if info["isa"] in ISAS:
        assert set(info["contract"]) >= {"ggml.contract.sum_update", "ggml.contract.sinks_update"}


def _model_isa():
    from jaxkv.ggml_cpu import ISAS

    isa = og.library_info()["isa"]
    if isa not in ISAS:
        pytest.skip(f"the ggml-cpu model has no {isa} build")
    return isa


_LEFTOVER_SIZES = (3, 5, 7, 12, 15, 20, 28, 31, 44, 60, 76, 100, 127, 139)


def test_mul_mat_f32_is_the_modelled_vec_dot():
    """Raw F32 ``mul_mat`` (``ggml_vec_dot_f32``) of the loaded build against ``ggml_cpu.dot.dot_f32`` at
    its ISA, bit for bit, at sizes covering every leftover count mod 4 and mod 8 after both SIMD steps
    (32 and 64). The all-FMA leftover model (f32_tail_group = 0) is wrong at some of them.
    (benchmarks/check_ggml_dims.py --mul-mat sweeps n = 1..139.)"""
    import dataclasses

    from jaxkv.ggml_cpu import dot as gdot

    import jax

    isa = gdot.get_isa(_model_isa())
    fused = dataclasses.replace(isa, f32_tail_group=0)
    dot = {i: jax.jit(lambda a, b, i=i: gdot.dot_f32(a, b, i)) for i in (isa, fused)}
    rng = np.random.default_rng(21)
    fused_wrong = 0
    for n in _LEFTOVER_SIZES:
        x = rng.standard_normal((8, n)).astype(np.float32)
        y = rng.standard_normal((1, n)).astype(np.float32)
        live = og.mul_mat(x, y)[0]
        emu = np.asarray(dot[isa](x.astype(np.float64), y.astype(np.float64))).astype(np.float32)
        assert np.array_equal(live.view(np.uint32), emu.view(np.uint32)), f"n={n}: {np.sum(live != emu)} of 8 differ"
        if n in (12, 28, 60):  # >= 4 leftovers after the SIMD steps of both ISAs
            alt = np.asarray(dot[fused](x.astype(np.float64), y.astype(np.float64))).astype(np.float32)
            fused_wrong += not np.array_equal(alt, live)
    assert fused_wrong > 0


@pytest.mark.parametrize("dk", (12, 60, 139))
def test_f32_kv_flash_attn_bit_exact_at_leftover_head_sizes(dk):
    """flash_attn_ext with F32 K/V whose head size leaves F32 dot leftovers (12: all leftovers; 60 and 139:
    after one and two/four SIMD steps) is bit-exact with the model at the loaded build's ISA
    (benchmarks/check_ggml_dims.py sweeps Dk = 1..139)."""
    from jaxkv import ggml_cpu

    isa = _model_isa()
    rng = np.random.default_rng(dk)
    q = rng.standard_normal((1, 3, 4, dk)).astype(np.float32)
    k = rng.standard_normal((1, 7, 2, dk)).astype(np.float32)
    v = rng.standard_normal((1, 7, 2, dk)).astype(np.float32)
    scale = float(np.float32(1 / np.sqrt(dk)))
    live = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", scale=scale)
    emu = np.asarray(ggml_cpu.flash_attn_ext(q, k, v, scale=scale, isa=isa))
    assert np.array_equal(live.view(np.uint32), emu.view(np.uint32)), f"{np.sum(live != emu)} of {live.size} differ"


def test_f16_vector_arith_probe_is_cached_and_consistent():
    """The FP16-arithmetic probe answers 'f32' or 'f16' and matches library_info's ISA."""
    a = og.f16_vector_arith()
    assert a == og.f16_vector_arith() and a in ("f32", "f16")
    assert (og.library_info()["isa"] == "avx512fp16") == (a == "f16")


def test_missing_library_raises_oracle_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXKV_GGML_LIB_DIR", str(tmp_path))  # a directory without libggml-base.so
    assert not og.available()
    with pytest.raises(og.OracleUnavailable, match="cannot load"):
        og.library_info()
    _, q, k, v = case(0, B=1, n_q=1, H=1, Hkv=1, n_kv=4)
    with pytest.raises(og.OracleUnavailable):
        og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", scale=1.0)


# --- quantize_chunk -----------------------------------------------------------------------------------------


def quant_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 128)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block
    x[2, 32:64] = 3.0  # a constant block
    x[3] *= 1e-6  # tiny values (F16 subnormal scales)
    x[4, ::7] *= 50.0  # outliers
    x[5] = np.round(x[5] * 4) / 4  # ties for the rounding rules
    return x


@pytest.mark.parametrize("fmt", BLOCK_FORMATS + ("BF16",))
def test_quantize_chunk_bytes_equal_gguf(fmt):
    x = quant_inputs()
    got = og.quantize_chunk(x, fmt)
    assert got.dtype == np.uint8 and got.shape == (6, og._gl.TYPES[fmt].row_bytes(128))
    np.testing.assert_array_equal(got, gguf_quantize(x, fmt).view(np.uint8).reshape(got.shape))


def test_quantize_chunk_f16_is_round_to_nearest_even():
    x = quant_inputs()
    np.testing.assert_array_equal(og.quantize_chunk(x, "F16").view(np.float16), x.astype(np.float16))


# --- agreement with the shared ggml traces ------------------------------------------------------------------


@pytest.mark.parametrize("path", GGML_TRACES, ids=lambda p: p.stem)
def test_agrees_with_shared_trace(path):
    md, ts = read_trace(path)
    out = run_trace(md, ts)
    ref = ts["out"][1]
    assert out.shape == ref.shape and out.dtype == np.float32
    if exact_across_isa(md, ts):
        np.testing.assert_array_equal(out, ref)
    else:
        assert nmse(out, ref) <= TOL_ISA, (path.stem, nmse(out, ref))


def test_quantized_path_is_thread_count_invariant():
    # the per-row loop gives each (query, head) row to one thread: results cannot depend on n_threads
    md, ts = read_trace(next(p for p in GGML_TRACES if p.stem == "fa_q4_1_decode"))
    np.testing.assert_array_equal(run_trace(md, ts, n_threads=1), run_trace(md, ts, n_threads=3))


def test_replay_cli(tmp_path, capsys):
    """``python -m jaxkv.oracles.ggml_replay``: exit 0 when live ggml reproduces every file bit for bit
    (the recorded NaN trace, NaN rows listed), 1 when one differs (an F16 shared trace: another ISA),
    2 for an unreadable file."""
    from jaxkv.oracles import ggml_replay

    nan_trace = REPO / "tests" / "data" / "ggml020_sm_fullrow_nan.gguf"
    assert ggml_replay.main([str(nan_trace)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SAME ") and "NaN rows 12 of 16" in out
    assert ggml_replay.main([str(REPO / "tests" / "data" / "ggml020_fa_f16v_overflow.gguf")]) == 0
    assert capsys.readouterr().out.startswith("SAME ")
    f16 = next(p for p in GGML_TRACES if p.stem == "fa_f16_decode_t1")
    assert ggml_replay.main([str(nan_trace), str(f16)]) == 1
    assert "DIFF " in capsys.readouterr().out
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    assert ggml_replay.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and err.count("\n") == 1


# --- plumbing against float64 ------------------------------------------------------------------------------


def masks(rng, B, H, n_q, n_kv, per_head):
    m = rng.uniform(-1, 1, (B, H if per_head else 1, n_q, n_kv)).astype(np.float32)
    m[rng.random(m.shape) < 0.3] = -np.inf
    m[..., 0] = 0.0  # keep one live key per row
    return m.astype(np.float16).astype(np.float32)  # ggml stores the mask as F16: give it F16 values


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(mask="shared"),
        dict(mask="per_head", max_bias=8.0),
        dict(softcap=20.0, q_amp=4.0),
        dict(sinks=True, mask="shared"),
        dict(mask="per_head", softcap=10.0, sinks=True, max_bias=4.0, mask_pad=8),
    ],
    ids=["plain", "mask", "alibi", "softcap", "sinks", "all"],
)
def test_flash_attn_ext_f32_kv_matches_float64(opts):
    rng, q, k, v = case(1)
    q = q * np.float32(opts.get("q_amp", 1.0))
    B, n_q, H, _ = q.shape
    mask = None if "mask" not in opts else masks(rng, B, H, n_q, k.shape[1], opts["mask"] == "per_head")
    sinks = rng.standard_normal(H).astype(np.float32) if opts.get("sinks") else None
    kw = dict(scale=0.125, mask=mask, softcap=opts.get("softcap", 0.0), max_bias=opts.get("max_bias", 0.0),
              sinks=sinks)
    out = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", n_threads=2,
                            mask_pad=opts.get("mask_pad", 1), **kw)
    assert nmse(out, reference(q, k, v, **kw)) <= TOL_F32


@st.composite
def plumbing_cases(draw):
    B, n_q, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n_kv, Dk, Dv = draw(st.integers(1, 70)), draw(st.sampled_from([8, 32, 40])), draw(st.sampled_from([8, 24, 64]))
    mask_kind = draw(st.sampled_from(["none", "shared", "per_head", "per_batch", "full"]))
    return dict(B=B, n_q=n_q, H=Hkv * G, Hkv=Hkv, n_kv=n_kv, Dk=Dk, Dv=Dv, mask=mask_kind,
                sinks=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 5.0])),
                max_bias=draw(st.sampled_from([0.0, 2.0])), n_threads=draw(st.integers(1, 3)),
                mask_pad=draw(st.sampled_from([1, 4])), seed=draw(st.integers(0, 2**16)))


@given(plumbing_cases())
def test_flash_attn_ext_plumbing_property(c):
    # F32 K/V keep ggml in F32 arithmetic, so any shape/broadcast/head-mapping mistake shows far above TOL_F32
    rng, q, k, v = case(c["seed"], c["B"], c["n_q"], c["H"], c["Hkv"], c["n_kv"], c["Dk"], c["Dv"])
    mb = c["B"] if c["mask"] in ("per_batch", "full") else 1
    mh = c["H"] if c["mask"] in ("per_head", "full") else 1
    mask = None if c["mask"] == "none" else masks(rng, c["B"], c["H"], c["n_q"], c["n_kv"], True)[:mb, :mh]
    max_bias = c["max_bias"] if mask is not None else 0.0
    sinks = rng.standard_normal(c["H"]).astype(np.float32) if c["sinks"] else None
    kw = dict(scale=0.3, mask=mask, softcap=c["softcap"], max_bias=max_bias, sinks=sinks)
    out = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", n_threads=c["n_threads"],
                            mask_pad=c["mask_pad"], **kw)
    assert out.shape == (c["B"], c["n_q"], c["H"], c["Dv"])
    assert nmse(out, reference(q, k, v, **kw)) <= TOL_F32


def test_flash_attn_ext_f16_kv_matches_float64_within_accumulator_rounding():
    rng, q, k, v = case(2)
    mask = masks(rng, 2, 8, 3, 96, per_head=False)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    out = og.flash_attn_ext(q, k16, v16, scale=0.125, mask=mask)
    # reference on the F16 values ggml stores (K, V exact) and on q rounded to F16 (K's dot type)
    ref = reference(q.astype(np.float16), k16, v16, scale=0.125, mask=mask)
    assert nmse(out, ref) <= 4 * 96 * U16**2  # TOL_F16 above, n_kv = 96 (measured 1.4e-6)


def test_flash_attn_ext_bf16_kv_matches_float64():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng, q, k, v = case(13, B=1, n_q=2, H=4, Hkv=2, n_kv=50)
    out = og.flash_attn_ext(q, k, v, k_format="BF16", v_format="BF16", scale=0.125)
    bf = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    # K/V stored as BF16 (round to nearest even, like ggml_fp32_to_bf16_row_ref), q converted to BF16 for the
    # dot (K's vec_dot_type), V dequantized to F32 and accumulated in F32: only F32 roundings remain.
    assert nmse(out, reference(bf(q), bf(k), bf(v), scale=0.125)) <= TOL_F32


def test_fully_masked_row_gives_zeros_and_batch_mask_broadcast():
    rng, q, k, v = case(3, B=2, n_q=2, H=4, Hkv=4, n_kv=40)
    mask = np.zeros((2, 1, 2, 40), np.float32)
    mask[1, 0, 0, :] = -np.inf  # batch 1, query 0: nothing live
    mask[0, 0, 1, 20:] = -np.inf
    out = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", scale=0.2, mask=mask)
    np.testing.assert_array_equal(out[1, 0], 0.0)
    assert nmse(out, reference(q, k, v, scale=0.2, mask=mask)) <= TOL_F32


@pytest.mark.parametrize("fmt", BLOCK_FORMATS + ("IQ4_NL",))
def test_block_formats_float_and_raw_inputs_agree(fmt):
    rng, q, k, v = case(4, B=1, n_q=2, H=4, Hkv=2, n_kv=50)
    mask = masks(rng, 1, 4, 2, 50, per_head=True)
    out = og.flash_attn_ext(q, k, v, k_format=fmt, v_format=fmt, scale=0.125, mask=mask)
    raw_k, raw_v = og.quantize_chunk(k, fmt), og.quantize_chunk(v, fmt)
    np.testing.assert_array_equal(
        og.flash_attn_ext(q, raw_k, raw_v, k_format=fmt, v_format=fmt, scale=0.125, mask=mask), out)
    if fmt in BLOCK_FORMATS:  # gguf cannot quantize IQ4_NL; dequantize via gguf for the reference
        ref = reference(q, gguf_dequantize(raw_k, fmt), gguf_dequantize(raw_v, fmt), scale=0.125, mask=mask)
        assert nmse(out, ref) <= TOL_Q


def test_quantarray_like_input_is_accepted():
    formats = pytest.importorskip("jaxkv.formats")
    rng, q, k, v = case(5, B=1, n_q=1, H=2, Hkv=1, n_kv=33)
    raw = og.quantize_chunk(k, "Q8_0")
    qa = formats.QuantArray(raw=raw, fmt="q8_0", n=64)
    a = og.flash_attn_ext(q, qa, v.astype(np.float16), scale=0.125)
    b = og.flash_attn_ext(q, raw, v.astype(np.float16), k_format="Q8_0", scale=0.125)
    np.testing.assert_array_equal(a, b)


def test_soft_max_attn_matches_float64():
    rng, q, k, v = case(6, B=1, n_q=3, H=8, Hkv=8, n_kv=64)
    mask = masks(rng, 1, 8, 3, 64, per_head=False)
    out = og.soft_max_attn(q, k, v, k_format="F32", v_format="F32", scale=0.125, mask=mask, max_bias=8.0)
    assert nmse(out, reference(q, k, v, scale=0.125, mask=mask, max_bias=8.0)) <= TOL_F32
    # the mask as F32 (soft_max_ext accepts it) gives the same result for F16-representable masks
    out32 = og.soft_max_attn(q, k, v, k_format="F32", v_format="F32", scale=0.125,
                             mask=mask.astype(np.float16).astype(np.float32), max_bias=8.0, mask_type="f32")
    np.testing.assert_array_equal(out32, out)


@pytest.mark.parametrize("kv_order", ["cold,hot", "hot,cold"])
def test_mixed_equals_flash_attn_on_the_f16_concatenation(kv_order):
    rng, q, k, v = case(8, B=1, n_q=2, H=4, Hkv=2, n_kv=80)
    kc, vc = og.quantize_chunk(k[:, :64], "Q4_1"), og.quantize_chunk(v[:, :64], "Q5_0")
    kh, vh = k[:, 64:].astype(np.float16), v[:, 64:].astype(np.float16)
    mask = masks(rng, 1, 4, 2, 80, per_head=False)
    out = og.mixed_flash_attn(q, kc, vc, kh, vh, cold_format=("Q4_1", "Q5_0"), kv_order=kv_order,
                              scale=0.125, mask=mask)
    parts_k = [gguf_dequantize(kc, "Q4_1").astype(np.float16), kh]
    parts_v = [gguf_dequantize(vc, "Q5_0").astype(np.float16), vh]
    if kv_order == "hot,cold":
        parts_k, parts_v = parts_k[::-1], parts_v[::-1]
    expect = og.flash_attn_ext(q, np.concatenate(parts_k, 1), np.concatenate(parts_v, 1), scale=0.125, mask=mask)
    np.testing.assert_array_equal(out, expect)


def test_mixed_with_empty_hot_window():
    rng, q, k, v = case(9, B=1, n_q=1, H=2, Hkv=1, n_kv=32)
    kc, vc = og.quantize_chunk(k, "Q8_0"), og.quantize_chunk(v, "Q8_0")
    empty = np.zeros((1, 0, 1, 64), np.float16)
    out = og.mixed_flash_attn(q, kc, vc, empty, empty, cold_format="Q8_0", scale=0.125)
    expect = og.flash_attn_ext(q, gguf_dequantize(kc, "Q8_0").astype(np.float16),
                               gguf_dequantize(vc, "Q8_0").astype(np.float16), scale=0.125)
    np.testing.assert_array_equal(out, expect)


# --- input validation ---------------------------------------------------------------------------------------


def bad_cases():
    _, q, k, v = case(10, B=1, n_q=2, H=4, Hkv=2, n_kv=32)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    good = dict(q=q, k=k16, v=v16, scale=0.125)
    m = np.zeros((1, 1, 2, 32), np.float32)
    nan_q = q.copy()
    nan_q[0, 0, 0, 0] = np.nan
    raw = og.quantize_chunk(k, "Q4_0")
    raw_nan = raw.copy()
    raw_nan[0, 0, 0, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    return {
        "q f16": (dict(good, q=q.astype(np.float16)), "q"),
        "q 3-D": (dict(good, q=q[0]), "q"),
        "mask int": (dict(good, mask=m.astype(np.int32)), "mask"),
        "mask bool": (dict(good, mask=m == 0), "mask"),
        "mask too few rows": (dict(good, mask=m[:, :, :1]), "mask"),
        "mask wrong n_kv": (dict(good, mask=m[..., :31]), "mask"),
        "mask 2 heads of 4": (dict(good, mask=np.zeros((1, 2, 2, 32), np.float32)), "mask"),
        "mask +inf": (dict(good, mask=np.where(m == 0, np.inf, m)), "mask"),
        "mask NaN": (dict(good, mask=np.full_like(m, np.nan)), "mask"),
        "mask overflows f16": (dict(good, mask=np.full_like(m, -1e9)), "mask"),
        "mask_pad 0": (dict(good, mask=m, mask_pad=0), "mask_pad"),
        "GQA 4 % 3": (dict(good, k=np.zeros((1, 32, 3, 64), np.float16), v=np.zeros((1, 32, 3, 64), np.float16)), "k"),
        "k/v n_kv differ": (dict(good, v=v16[:, :31]), "v"),
        "k Dk != q Dk": (dict(good, k=k16[..., :32]), "k"),
        "batch differs": (dict(good, k=np.concatenate([k16, k16]), v=np.concatenate([v16, v16])), "k"),
        "format Q8_1": (dict(good, k=k, k_format="Q8_1"), "k_format"),
        "format Q4_K": (dict(good, k=k, k_format="q4_k"), "k_format"),
        "Q4_0 Dk 48": (dict(good, q=q[..., :48], k=k[..., :48], k_format="Q4_0"), "k"),
        "f32 k without format": (dict(good, k=k), "k_format"),
        "raw blocks without format": (dict(good, k=raw), "k_format"),
        "raw NaN scale": (dict(good, k=raw_nan, k_format="Q4_0"), "k"),
        "k int": (dict(good, k=k.astype(np.int16)), "k"),
        "k overflows f16": (dict(good, k=k * 1e5, k_format="F16"), "k"),
        "q NaN": (dict(good, q=nan_q), "q"),
        "sinks shape": (dict(good, sinks=np.zeros(3, np.float32)), "sinks"),
        "sinks NaN": (dict(good, sinks=np.full(4, np.nan, np.float32)), "sinks"),
        "max_bias without mask": (dict(good, max_bias=8.0), "max_bias"),
        "negative softcap": (dict(good, softcap=-1.0), "softcap"),
        "NaN scale": (dict(good, scale=float("nan")), "scale"),
        "n_threads 0": (dict(good, n_threads=0), "n_threads"),
        "prec": (dict(good, prec="f64"), "prec"),
        "nonfinite policy": (dict(good, nonfinite="ignore"), "nonfinite"),
    }


BAD = bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_field(name):
    kwargs, field = BAD[name]
    with pytest.raises(og.OracleInputError, match=rf"^{field}\b"):
        og.flash_attn_ext(**kwargs)


def test_bad_inputs_of_the_other_ops():
    _, q, k, v = case(11, B=1, n_q=2, H=4, Hkv=2, n_kv=32)
    with pytest.raises(og.OracleInputError, match="^v_format"):
        og.soft_max_attn(q, k, v, k_format="F16", v_format="Q8_0", scale=0.1)
    with pytest.raises(og.OracleInputError, match="^mask_type"):
        og.soft_max_attn(q, k, v, k_format="F16", v_format="F16", scale=0.1, mask_type="bf16")
    kc = og.quantize_chunk(k, "Q8_0")
    with pytest.raises(og.OracleInputError, match="^kv_order"):
        og.mixed_flash_attn(q, kc, kc, k, v, cold_format="Q8_0", kv_order="hot-cold", scale=0.1)
    with pytest.raises(og.OracleInputError, match="^v_hot"):
        og.mixed_flash_attn(q, kc, og.quantize_chunk(v, "Q8_0"), k, v[..., :32], cold_format="Q8_0", scale=0.1)
    with pytest.raises(og.OracleInputError, match="^x"):
        og.quantize_chunk(np.zeros((2, 33), np.float32), "Q4_0")


def test_nonfinite_allow_hands_nan_to_ggml():
    _, q, k, v = case(12, B=1, n_q=1, H=2, Hkv=1, n_kv=16)
    q[0, 0, 1, :] = np.nan  # head 1 only
    out = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", scale=0.1, nonfinite="allow")
    assert np.isnan(out[0, 0, 1]).all() and np.isfinite(out[0, 0, 0]).all()


SURVIVAL = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_oracle_ggml import BAD, case
    from jaxkv.oracles import ggml as og
    for name, (kwargs, field) in BAD.items():
        try:
            og.flash_attn_ext(**kwargs)
        except og.OracleInputError:
            pass
        else:
            print("accepted", name); sys.exit(3)
    _, q, k, v = case(0, B=1, n_q=1, H=2, Hkv=1, n_kv=8)
    out = og.flash_attn_ext(q, k, v, k_format="F32", v_format="F32", scale=0.1)
    print("alive", out.shape)
    """
)

RAW_ABORT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from jaxkv.oracles import ggml_lib as gl
    L = gl.lib()
    owner, addr = gl.aligned_buffer(1 << 20)
    ctx = L.ggml_init(gl.InitParams(1 << 20, addr, False))
    q = L.ggml_new_tensor_4d(ctx, 0, 64, 1, 2, 1)
    k = L.ggml_new_tensor_4d(ctx, 1, 64, 8, 1, 1)
    m = L.ggml_new_tensor_4d(ctx, 0, 8, 1, 1, 1)   # an F32 mask: GGML_ASSERT(mask->type == GGML_TYPE_F16)
    L.ggml_flash_attn_ext(ctx, q, k, k, m, 0.1, 0.0, 0.0)
    print("not reached")
    """
)


def _run_py(src: str) -> subprocess.CompletedProcess:
    code = src.format(repo=str(REPO), tests=str(REPO / "tests"))
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # ggml would otherwise attach gdb on abort (slow)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))


def test_process_survives_every_bad_input():
    r = _run_py(SURVIVAL)
    assert r.returncode == 0 and "alive (1, 1, 2, 64)" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_unchecked_ggml_aborts_the_process():
    # why the checks exist: the same F32 mask handed to ggml directly kills the interpreter (SIGABRT)
    r = _run_py(RAW_ABORT)
    assert r.returncode != 0 and "not reached" not in r.stdout
    assert "mask->type == GGML_TYPE_F16" in r.stderr

"""ggml's tiled CPU flash-attention path (jaxkv.ggml_cpu.tiled): path rule, query tiles, recorded traces.

tests/data/ggml020_tiled_*.gguf were recorded from live ggml (the libggml-python 0.20.2 AVX2 wheel),
tests/data/ggml025_tiled_*.gguf from a native AVX-512 GCC build of ggml 0.25.3 (llama-cpp-python 0.3.36's
libggml, through JAXKV_GGML_LIB_DIR), by ``python -m fuzz record`` (the exact arguments are in each file's
``record.args`` metadata); the model must reproduce their outputs bit for bit and ``python -m fuzz verify``
must pass them (exit 0, never 2).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from jaxkv import ggml_cpu
from jaxkv import trace as tr
from jaxkv import verify as vf
from jaxkv.ggml_cpu import tiled

DATA = REPO / "tests" / "data"
TILED_TRACES = sorted(DATA.glob("ggml02*_tiled_*.gguf"))


def _model(t, **over):
    kw = dict(scale=t.scale, mask=t.mask, softcap=t.softcap, max_bias=t.max_bias, sinks=t.sinks,
              n_threads=t.n_threads, isa=vf.trace_isa(t), version=t.metadata["ggml.version"])
    kw.update(over)
    if t.op == "mixed_flash_attn":
        return np.asarray(ggml_cpu.mixed_flash_attn(t.q, t.k_cold, t.v_cold, t.k_hot, t.v_hot,
                                                    kv_order=t.kv_order, **kw))
    return np.asarray(ggml_cpu.flash_attn_ext(t.q, t.k, t.v, **kw))


def _path(t):
    B, n_q = t.q.shape[:2]
    if t.op == "mixed_flash_attn":
        kt = vt = "f16"
        n_kv, dv = t.k_cold.shape[1] + t.k_hot.shape[1], t.v_hot.shape[-1]
    else:
        kt, vt = ggml_cpu.kv_type(t.k, "k"), ggml_cpu.kv_type(t.v, "v")
        n_kv, dv = t.k.shape[1], t.v.shape[-1]
    return ggml_cpu.path(n_q, B, kt, vt, n_kv, dv, vf.trace_isa(t), t.metadata["ggml.version"])


def test_recorded_tiled_traces_exist_and_take_the_tiled_path():
    names = {p.stem for p in TILED_TRACES}
    assert {"ggml020_tiled_f16_causal_t2", "ggml020_tiled_f32_gqa_sinks_d40", "ggml020_tiled_mixed_q8_0_causal",
            "ggml020_tiled_f16_causal_n256_t4", "ggml025_tiled_f32_d60_sinks_t2",
            "ggml025_tiled_mixed_q4_0_causal_d96"} <= names
    for p in TILED_TRACES:
        t = tr.load(p)
        builds = {"ggml020": ("0.20.2", "avx2"), "ggml025": ("0.25.3", "avx512")}
        assert (t.metadata["ggml.version"], vf.trace_isa(t)) == builds[p.stem[:7]]
        assert t.q.shape[1] >= 64 and _path(t) == "tiled", p.name


@pytest.mark.parametrize("path", TILED_TRACES, ids=[p.stem for p in TILED_TRACES])
def test_model_reproduces_recorded_tiled_trace_bit_for_bit(path):
    t = tr.load(path)
    np.testing.assert_array_equal(_model(t), np.asarray(t.out))


def test_fuzz_verify_passes_every_tiled_trace(capsys):
    """The CLI gives a verdict (exit 0: all PASS) on every recorded prefill trace; none exits 2."""
    from fuzz import verify_cmd

    rc = verify_cmd.main([str(p) for p in TILED_TRACES])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS") == len(TILED_TRACES) and "emu 0 units" in out


@pytest.mark.parametrize("name, isa", [("ggml020_tiled_f32_gqa_sinks_d40", "avx2"),
                                       ("ggml025_tiled_f32_d60_sinks_t2", "avx512")])
def test_tiled_sinks_step_is_fused(monkeypatch, name, isa):
    """Both builds contract the tiled path's sinks step ``S*ms + vs`` (the AVX2 wheel not its per-row
    loop's): modelled unfused, the sinks traces are off in some rows -- the fact in SINKS_FUSED is
    measured, not assumed."""
    t = tr.load(DATA / f"{name}.gguf")
    monkeypatch.setitem(tiled.SINKS_FUSED, isa, False)
    assert not np.array_equal(_model(t), np.asarray(t.out))


def test_softcap_padding_order_is_a_version_fact():
    """ggml 0.20.2 sets the padded key slots of the last key tile to -inf before tanh/softcap (they become
    -softcap and, with no mask, weigh in); 0.25.3 applies softcap first. The recorded 0.20.2 trace (n_kv =
    130, no mask, softcap 20) is reproduced only by the 0.20.2 facts."""
    old, new = (tr.load(DATA / f"ggml02{v}_tiled_f16_softcap_nomask_pad.gguf") for v in "05")
    for t in (old, new):
        assert t.mask is None and t.softcap > 0 and t.k.shape[1] % 64
    assert not np.array_equal(_model(old, version="0.25.3", isa="avx2"), np.asarray(old.out))
    assert not np.array_equal(_model(new, version="0.20.2", isa="avx512"), np.asarray(new.out))


def test_dv_leftover_rule_is_a_version_fact():
    """Dv = 60 is no multiple of AVX-512's 16 F32 lanes: ggml 0.25.3 still tiles (its simd_gemm has a
    masked tail), 0.20.2 falls back to the per-row loop, whose F32 dot and softmax round differently."""
    t = tr.load(DATA / "ggml025_tiled_f32_d60_sinks_t2.gguf")
    assert t.v.shape[-1] == 60 and _path(t) == "tiled"
    assert ggml_cpu.path(64, 1, "f32", "f32", t.k.shape[1], 60, "avx512", "0.20.2") == "per-row"
    assert not np.array_equal(_model(t, version="0.20.2"), np.asarray(t.out))


# ----------------------------------------------------------------------------------------------------
# the path rule and the query tiles (no ggml needed)


@pytest.mark.parametrize("args, want", [
    ((64, 1, "f16", "f16", 100, 64, "avx2", "0.20.2"), "tiled"),
    ((63, 1, "f16", "f16", 100, 64, "avx2", "0.20.2"), "per-row"),
    ((64, 1, "f16", "f32", 100, 64, "avx2", "0.20.2"), "per-row"),       # K and V of one type only
    ((64, 1, "q8_0", "q8_0", 100, 64, "avx2", "0.20.2"), "per-row"),
    ((128, 2, "f32", "f32", 600, 40, "avx2", "0.20.2"), "tiled"),        # 40 % 8 == 0
    ((128, 2, "f32", "f32", 600, 40, "avx512", "0.20.2"), "per-row"),    # 40 % 16 != 0
    ((128, 2, "f32", "f32", 600, 40, "avx512", "0.25.3"), "tiled"),      # rule gone on x86
    ((128, 1, "f16", "f16", 600, 60, "avx2", "0.21.0"), "per-row"),
    ((128, 1, "f16", "f16", 600, 60, "avx2", "0.26.0"), "tiled"),
    ((128, 1, "f16", "f16", 600, 64, "avx2", "0.9.5"), "per-row"),       # before the tiled path
    ((1, 1, "f16", "f16", 512, 64, "avx2", "0.20.2"), "split-kv"),
    ((1, 1, "f16", "f16", 511, 64, "avx2", "0.20.2"), "per-row"),
])
def test_path_rule(args, want):
    assert ggml_cpu.path(*args) == want


def test_versions():
    assert tiled.tiled_build("0.20.2") == tiled.tiled_build(None) == tiled.tiled_build("v0.21.0")
    assert tiled.tiled_build("0.25.3").softcap_after_pad is False
    assert tiled.tiled_build("0.9.5") is None
    with pytest.raises(ValueError, match="version"):
        tiled.tiled_build("main")
    assert tiled.trace_version({"ggml.version": "0.25.3"}, "ggml 0.20.2") == "0.25.3"
    assert tiled.trace_version({}, "ggml 0.20.2 (8c63e70) CPU avx2 n_threads=2") == "0.20.2"
    assert tiled.trace_version(None, "ggml cpu (n_threads=2)") is None


def test_query_tiles_follow_ggml_chunking():
    # one thread: one chunk; tiles of 64 rows that stop at a head boundary
    ids, n = tiled.query_tiles(1, 2, 100, 1)
    assert n == 4
    assert [int(ids[0, 0, i]) for i in (0, 63, 64, 99)] == [0, 0, 1, 1]
    assert [int(ids[0, 1, i]) for i in (0, 63, 64, 99)] == [2, 2, 3, 3]
    # three threads: 200 rows in 12 chunks of 17 (ceil(200 / ceil(200 / 12))): chunk 5 = rows 85..101
    # crosses the head boundary at row 100, so it holds two tiles (85..99, 100..101)
    ids, n = tiled.query_tiles(1, 2, 100, 3)
    flat = ids.reshape(-1)
    assert n == 13
    assert len(set(flat[85:100])) == 1 and flat[84] != flat[85] and flat[99] != flat[100] == flat[101]
    assert flat[101] != flat[102]


def test_threads_only_regroup_rows():
    """Rows are independent on the tiled path: n_threads changes the query tiles, not the values (finite
    inputs)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 70, 4, 32)).astype(np.float32)
    k = rng.standard_normal((1, 75, 2, 32)).astype(np.float16)
    v = rng.standard_normal((1, 75, 2, 32)).astype(np.float16)
    mask = np.where(rng.random((1, 1, 70, 75)) < 0.5, -np.inf, 0.0).astype(np.float16)
    mask[..., :40, :64] = -np.inf  # the first key tile dead for the first 40 queries
    a = np.asarray(ggml_cpu.flash_attn_ext(q, k, v, scale=0.17, mask=mask, n_threads=1, isa="avx2"))
    b = np.asarray(ggml_cpu.flash_attn_ext(q, k, v, scale=0.17, mask=mask, n_threads=3, isa="avx2"))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


# ----------------------------------------------------------------------------------------------------
# the live-ggml fuzz targets' own cases (python -m fuzz --target ggml|ggml-unfused|ggml-mixed)


def _draws(name, n=600, seed=0, **kw):
    from fuzz import ggml_targets as T
    from fuzz import strategies as S

    draw = S.rng_drawer(np.random.default_rng(seed))
    return [T.draw_case(name, draw, **kw) for _ in range(n)]


def test_target_cases_reach_every_path_type_and_option():
    from fuzz import ggml_targets as T

    cases = _draws("ggml")
    paths = {ggml_cpu.path(c["n_q"], c["B"], c["k_fmt"], c["v_fmt"], c["n_kv"], c["Dv"], "avx512", "0.25.3")
             for c in cases}
    assert paths == {"per-row", "split-kv", "tiled"}
    assert {c["shape"] for c in cases} == set(T.SHAPES)
    assert {c["k_fmt"] for c in cases} == set(T.FLOATS + T.BLOCKS) == {c["v_fmt"] for c in cases}
    assert {c["Dk"] for c in cases} >= {40, 60, 80, 96, 256, 576} and 112 in {c["Dv"] for c in cases}
    assert max(c["heads"][0] // c["heads"][1] for c in cases) == 32
    assert {c["threads"] for c in cases} == {1, 2, 3, 4} and {c["mask"] for c in cases} == set(T.CASE_MASKS)
    assert all(any(c[f] for c in cases) for f in ("sinks", "softcap", "max_bias"))
    for c in cases:  # block types only on whole 32-element blocks; ALiBi only with a mask
        assert c["k_fmt"] in T.FLOATS or c["Dk"] % 32 == 0
        assert c["v_fmt"] in T.FLOATS or c["Dv"] % 32 == 0
        assert c["max_bias"] == 0 or c["mask"] != "none"


def test_target_cases_respect_each_target():
    from fuzz import ggml_targets as T

    for c in _draws("ggml-unfused", 200, unsupported=T.UNSUPPORTED["ggml-unfused"], threads=3):
        assert c["v_fmt"] in T.FLOATS and not c["sinks"] and c["softcap"] == 0 and c["threads"] == 3
    mixed = _draws("ggml-mixed", 200)
    assert all(c["k_fmt"] in T.BLOCKS and c["v_fmt"] in T.BLOCKS and c["Dk"] % 32 == c["Dv"] % 32 == 0
               for c in mixed)
    assert any(c["n_q"] >= 64 for c in mixed)  # the mixed cache's F16 concatenation on the tiled path


def test_coverage_table_counts_paths_and_types():
    from collections import Counter

    from fuzz import ggml_targets as T

    k16 = np.zeros((1, 100, 2, 64), np.float16)
    cov = Counter()
    cov[T.coverage_key("ggml", (1, 64, 4, 64), dict(k=k16, v=k16), "avx2", "0.20.2", 2)] += 1
    cov[T.coverage_key("ggml", (1, 1, 4, 64), dict(k=k16, v=k16.astype(np.float32)), "avx2", "0.20.2", 1)] += 2
    assert set(cov) == {("flash_attn_ext", "tiled", "f16", "f16", 2), ("flash_attn_ext", "per-row", "f16", "f32", 1)}
    text = T.coverage_table(cov)
    assert "tiled" in text and "f16/f32" in text and "per-row 2, tiled 1 (3 calls)" in text


@pytest.mark.skipif(not __import__("jaxkv.oracles.ggml", fromlist=["available"]).available(),
                    reason="live ggml not available")
def test_live_target_on_a_tiled_case_is_bit_exact_and_counted():
    from fuzz import ggml_targets as T

    fn = T.make_target("ggml", 1)
    c = dict(shape="tiled", heads=[4, 2], B=1, n_q=64, Dk=64, Dv=64, n_kv=100, bucket=100, k_fmt="f32",
             v_fmt="f32", mask="causal", mask_param=5, mask_heads=False, softcap=0.0, max_bias=0.0, sinks=True,
             threads=3, scale=0.125, dist="normal", seed=11)
    a = fn.case_arrays(c)
    kw = dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"], sinks=a["sinks"],
              n_threads=a["n_threads"])
    got = fn(a["q"], a["k"], a["v"], **kw)
    np.testing.assert_array_equal(got, fn.model(a["q"], a["k"], a["v"], **kw))
    assert fn.coverage == {("flash_attn_ext", "tiled", "f32", "f32", 3): 1}


def test_ggml_020_softcap_padding_bug_is_reproduced_and_real():
    """ggml 0.20.2's tiled path with softcap and no mask gives the padded key slots of a ragged last key
    tile the logit -softcap (stale V rows behind them): with softcap 2 that is a real accuracy bug (fixed
    in 0.25.3, which applies softcap before padding). The model reproduces ggml bit for bit, and the same
    inputs under the 0.25.3 facts are accurate: the error is the padding's, not the path's arithmetic.
    (`python -m fuzz verify` currently PASSes this trace: its ggml-cpu budget is a multiple of the model's
    own error, which carries the bug; the verdict is given, never exit 2.)"""
    from fuzz import verify_cmd
    from fuzz.target import Case
    from jaxkv import ops

    t = tr.load(DATA / "ggml020_softcap_pad_bug.gguf")
    assert t.mask is None and t.softcap == 2.0 and t.k.shape[1] % 64 and _path(t) == "tiled"
    np.testing.assert_array_equal(_model(t), np.asarray(t.out))
    g = ops.get("flash_attn_ext").golden(Case(  # the op's float64 golden over the stored K/V
        op="flash_attn_ext", q=np.asarray(t.q, np.float64), k=np.asarray(t.k, np.float64),
        v=np.asarray(t.v, np.float64), scale=t.scale, softcap=t.softcap))
    err_020 = np.abs(np.asarray(t.out, np.float64) - g).max()
    err_025 = np.abs(_model(t, version="0.25.3").astype(np.float64) - g).max()
    assert err_020 > 1e-2 and err_025 < 1e-5, (err_020, err_025)
    assert verify_cmd.main([str(DATA / "ggml020_softcap_pad_bug.gguf")]) in (0, 1)

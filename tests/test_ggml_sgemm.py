"""llamafile's sgemm path of ggml's CPU mul_mat (jaxkv.ggml_cpu.sgemm) in the unfused attention model.

Ground truth: traces recorded from live ggml 0.25.3 (the native AVX-512 build bundled with
llama-cpp-python 0.3.36, ``LLAMAFILE = 1``) in tests/data/sgemm (provenance in its README.md), the
Gemma 3 prefill shipped in traces/gemma3-270m, and, when that library is installed, live ggml itself
(in a subprocess: one process loads one ggml). The sweep over n_q 2..128, head sizes 64..256, F16/F32
K/V and n_kv that make tinyBLAS decline is ``python tests/test_ggml_sgemm.py --sweep``.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxkv import ggml_cpu as M
from jaxkv import trace as T
from jaxkv import verify as V
from jaxkv.ggml_cpu import sgemm as S

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "sgemm"
RECORDED = sorted(DATA.glob("*.gguf"))
GEMMA_SM = sorted((REPO / "traces" / "gemma3-270m" / "sm_f16").glob("*prefill*.gguf"))


def _bits_differ(a, b) -> int:
    return int(np.sum(np.asarray(a, np.float32).view(np.uint32) != np.asarray(b, np.float32).view(np.uint32)))


# ----------------------------------------------------------------------------------------------------
# the path table, against ggml_compute_forward_mul_mat / llamafile_sgemm (ggml 0.25.3, read from source)


@pytest.mark.parametrize("a, b, m, n, k, isa, lf, cont, want", [
    ("f16", "f32", 256, 80, 256, "avx512", False, True, "vec_dot"),    # no llamafile in the build
    ("f16", "f32", 256, 1, 256, "avx512", True, True, "vec_dot"),      # n < 2: decode
    ("f16", "f32", 256, 2, 256, "avx512", True, False, "sgemm"),       # q -> F16 work buffer, then sgemm
    ("f32", "f32", 256, 2, 256, "avx512", True, True, "sgemm"),        # contiguous F32 src1
    ("f32", "f32", 256, 2, 256, "avx512", True, False, "vec_dot"),     # permuted F32 q: no conversion, no sgemm
    ("f16", "f32", 62, 8, 256, "avx512", True, True, "vec_dot"),       # m % 4
    ("f16", "f32", 64, 8, 72, "avx512", True, True, "vec_dot"),        # k % 16 (AVX-512 KN)
    ("f16", "f32", 64, 8, 72, "avx2", True, True, "sgemm"),            # k % 8 (AVX2 KN)
    ("q8_0", "f32", 64, 8, 64, "avx512", True, False, "sgemm_q0"),     # q -> Q8_0, tinyBLAS_Q0_AVX
    ("iq4_nl", "f32", 64, 8, 4, "avx512", True, True, "sgemm_q0"),
    ("q8_0", "f32", 64, 1, 64, "avx512", True, False, "vec_dot"),
    ("q4_1", "f32", 64, 8, 64, "avx512", True, False, "vec_dot"),      # no llamafile kernel
])
def test_mul_mat_path_table(a, b, m, n, k, isa, lf, cont, want):
    assert S.mul_mat_path(a, b, m, n, k, isa=isa, llamafile=lf, src1_contiguous=cont) == want


def test_ggml_contiguous():
    assert S.ggml_contiguous([256, 80, 4, 1], [4, 1024, 81920, 327680], 4)
    assert not S.ggml_contiguous([256, 80, 4, 1], [4, 4096, 1024, 327680], 4)  # llama.cpp's permuted q
    assert S.ggml_contiguous([256, 1, 4, 1], [4, 4096, 1024, 4096], 4)         # size-1 dims are skipped


# ----------------------------------------------------------------------------------------------------
# the arithmetic: one KN-lane FMA accumulator, halving-tree hsum (tinyBLAS); one 8-lane accumulator
# over blocks (tinyBLAS_Q0_AVX)


def _tinyblas_f16_ref(a16, b16, kn):
    """numpy float32, element by element: F16 x F16 products are exact in float32, so the FMA is the
    product added with one rounding."""
    a = a16.astype(np.float32)
    b = b16.astype(np.float32)
    acc = np.zeros(kn, np.float32)
    for l0 in range(0, a.size, kn):
        acc = acc + a[l0:l0 + kn] * b[l0:l0 + kn]
    while acc.size > 1:
        h = acc.size // 2
        acc = acc[h:] + acc[:h]
    return acc[0]


@pytest.mark.parametrize("isa, kn", [("avx512", 16), ("avx2", 8)])
def test_sgemm_dot_order(isa, kn):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((40, 256)) * np.exp2(rng.integers(-6, 7, (40, 256)))).astype(np.float16)
    b = rng.standard_normal((40, 256)).astype(np.float16)
    got = np.asarray(S.sgemm_dot(a.astype(np.float64), b.astype(np.float64), isa)).astype(np.float32)
    want = np.array([_tinyblas_f16_ref(a[i], b[i], kn) for i in range(40)], np.float32)
    assert _bits_differ(got, want) == 0
    # and the order is not vec_dot's: the same rows through ggml_vec_dot_f16 differ somewhere
    vd = np.asarray(M.dot.dot_f16(a.astype(np.float64), b.astype(np.float64), isa)).astype(np.float32)
    assert _bits_differ(vd, want) > 0


def test_q0_dot_one_accumulator():
    """IQ4_NL through tinyBLAS_Q0_AVX: one accumulator over all blocks, where ggml's vec_dot keeps two
    (even / odd blocks); Q8_0 through it equals vec_dot (one accumulator both)."""
    from jaxkv import formats as F

    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    y = rng.standard_normal((64, 128)).astype(np.float32)
    qb = M.dot.quantize_q8_x86(y.astype(np.float64), False)
    for fmt, same in (("q8_0", True), ("iq4_nl", False)):
        kb = F.decode_blocks(F.quantize(x, fmt), fmt)
        got = np.asarray(S.q0_dot(kb, qb))
        # independent: float32 numpy, lanes exact in int, d exact, each step an FMA of an exact product
        # of an F16 x F16 scale and an int sum below 2^24 ... computed here in float64 then rounded once
        lanes = (np.asarray(kb.q) * np.asarray(qb.q)).reshape(64, 4, 8, 4).sum(-1).astype(np.float64)
        d = (np.asarray(kb.d, np.float64) * np.asarray(qb.d, np.float64))
        acc = np.zeros((64, 8), np.float32)
        for b in range(4):
            acc = (d[:, b, None] * lanes[:, b] + acc.astype(np.float64)).astype(np.float32)
        r = acc[:, 4:] + acc[:, :4]
        r = r[:, 2:] + r[:, :2]
        want = r[:, 1] + r[:, 0]
        assert _bits_differ(got, want) == 0
        vd = np.asarray(M.dot.dot_blocks(kb, fmt, qb))
        assert (_bits_differ(vd, want) == 0) == same


def test_sgemm_dot_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiples of 16"):
        S.sgemm_dot(np.zeros((2, 72)), np.zeros((2, 72)), "avx512")


# ----------------------------------------------------------------------------------------------------
# recorded ground truth


@pytest.mark.skipif(not RECORDED, reason="tests/data/sgemm traces absent")
@pytest.mark.parametrize("path", [p for p in RECORDED if p.name.startswith("sm_")], ids=lambda p: p.name)
def test_recorded_live_0253_bit_exact(path):
    t = T.load(str(path))
    facts = V.mul_mat_facts(t)
    assert facts["llamafile"] is True  # recorded from a llamafile build (metadata ggml.llamafile)
    kw = dict(scale=t.scale, mask=t.mask, isa=V.trace_isa(t), q_contiguous=facts["q_contiguous"])
    kt = M.kv_type(t.k, "k")
    assert M.soft_max_attn_paths(t.q.shape, kt, M.kv_type(t.v, "v"), t.k.shape[1], t.v.shape[-1],
                                 isa=kw["isa"], llamafile=True) == ("sgemm_q0" if kt == "iq4_nl" else "sgemm", "sgemm")
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, llamafile=True, **kw), t.out) == 0
    # the trace exercises the path: the vec_dot model (no llamafile) is not bit-exact on it
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, llamafile=False, **kw), t.out) > 0


def test_shared_trace_without_llamafile(shared_dir):
    """The shared ggml traces carry no ``ggml.llamafile``: read as False, and rightly so: their unfused
    n_q = 2 call is bit-exact on vec_dot and not on tinyBLAS."""
    t = T.load(str(shared_dir / "traces" / "ggml" / "sm_f16_alibi.gguf"))
    facts = V.mul_mat_facts(t)
    assert facts["llamafile"] is False
    kw = dict(scale=t.scale, mask=t.mask, max_bias=t.max_bias, isa=V.trace_isa(t))
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, **kw, **facts), t.out) == 0
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, **kw, llamafile=True), t.out) > 0


def test_gemma_f32_permuted_q_takes_vec_dot():
    """A real F32-cache prefill (cut, tests/data/sgemm/README.md): llama.cpp's q is a permuted view, so
    ggml's first sgemm call (contiguous src1 only) is skipped and, F32 being K's vec_dot_type, no
    conversion gives it a second one: kq goes through vec_dot, kqv through tinyBLAS. Modelling kq as
    tinyBLAS (as for a contiguous q) is not bit-exact."""
    t = T.load(str(DATA / "gemma3_f32_prefill_cut.gguf"))
    facts = V.mul_mat_facts(t)
    assert facts == {"llamafile": True, "q_contiguous": False}
    assert M.soft_max_attn_paths(t.q.shape, "f32", "f32", t.k.shape[1], t.v.shape[-1], isa="avx512",
                                 **facts) == ("vec_dot", "sgemm")
    kw = dict(scale=t.scale, mask=t.mask, isa=V.trace_isa(t), llamafile=True)
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, q_contiguous=False, **kw), t.out) == 0
    assert _bits_differ(M.soft_max_attn(t.q, t.k, t.v, q_contiguous=True, **kw), t.out) > 0


@pytest.mark.skipif(not GEMMA_SM, reason="traces/gemma3-270m/sm_f16 absent")
def test_gemma_prefill_facts():
    """The captured Gemma prefill says llamafile and carries llama.cpp's permuted (non-contiguous) q;
    the model with those facts is bit-exact with it."""
    t = T.load(str(GEMMA_SM[0]))
    facts = V.mul_mat_facts(t)
    assert facts == {"llamafile": True, "q_contiguous": False}
    out = M.soft_max_attn(t.q, t.k, t.v, scale=t.scale, mask=t.mask, isa=V.trace_isa(t), **facts)
    assert _bits_differ(out, t.out) == 0


# ----------------------------------------------------------------------------------------------------
# live ggml with llamafile (llama-cpp-python's libggml), in a subprocess


def _llamafile_lib_dir():
    d = os.environ.get("JAXKV_SGEMM_LIB_DIR")
    if d:
        return d
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    lib = pathlib.Path(spec.origin).parent / "lib"
    return str(lib) if (lib / "libggml-cpu.so").exists() else None


# F32 cases where tinyBLAS declines go through ggml_vec_dot_f32 with leftover elements (n_kv % 64), a
# model of its own (branch ggmldot): here only F16 declines; the sweep has both
QUICK = [("f16", 256, 3, 64), ("f16", 64, 5, 60), ("f16", 64, 4, 62), ("f32", 128, 64, 64)]
# (head size, n_q, n_kv): tinyBLAS on both mul_mats, then declines (n_kv % 16: kqv; n_kv % 4: kq; Dk % 16: kq)
SWEEP_SHAPES = ((64, 2, 64), (96, 7, 256), (128, 16, 64), (192, 33, 64), (256, 64, 256), (256, 128, 64),
                (128, 80, 60), (64, 5, 62), (256, 3, 60), (72, 4, 64))
SWEEP = [(t, d, nq, nkv) for t, (d, nq, nkv) in itertools.product(("f16", "f32"), SWEEP_SHAPES)]


def live_check(cases, seed=0) -> int:
    """Every case (type, head size, n_q, n_kv) through live ggml's unfused attention and the model with
    the loaded library's llamafile fact; prints one line per case, returns the number of cases with
    any bit different."""
    from jaxkv.oracles import ggml as og

    info = og.library_info()
    lf = bool(info["features"].get("llamafile", False))
    print(f"ggml {info['version']} {info['isa']} llamafile={lf} ({info['lib_dir']})")
    rng = np.random.default_rng(seed)
    bad = 0
    for t, d, n_q, n_kv in cases:
        q = rng.standard_normal((1, n_q, 4, d)).astype(np.float32)
        k = rng.standard_normal((1, n_kv, 2, d)).astype(np.float32)
        v = rng.standard_normal((1, n_kv, 2, d)).astype(np.float32)
        if t == "f16":
            k, v = k.astype(np.float16), v.astype(np.float16)
        mask = np.where(rng.random((1, 1, n_q, n_kv)) < 0.25, -np.inf, 0.0).astype(np.float32)
        mask[..., 0] = 0.0
        scale = float(np.float32(1 / np.sqrt(d)))
        got = og.soft_max_attn(q, k, v, k_format=t, v_format=t, scale=scale, mask=mask)
        paths = M.soft_max_attn_paths(q.shape, t, t, n_kv, d, isa=info["isa"], llamafile=lf)
        emu = M.soft_max_attn(q, k, v, scale=scale, mask=mask, isa=info["isa"], llamafile=lf)
        nd = _bits_differ(got, emu)
        bad += nd > 0
        print(f"{t} D={d:3d} n_q={n_q:3d} n_kv={n_kv:3d} kq={paths[0]:8s} kqv={paths[1]:8s} "
              f"differ {nd}/{got.size}", flush=True)
    return bad


@pytest.mark.skipif(_llamafile_lib_dir() is None, reason="no ggml with llamafile (llama-cpp-python) installed")
def test_live_llamafile_ggml_quick():
    env = dict(os.environ, JAXKV_GGML_LIB_DIR=_llamafile_lib_dir(), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(pathlib.Path(__file__)), "--quick"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    if "llamafile=True" not in r.stdout:
        pytest.skip(f"the library there has no llamafile: {r.stdout.splitlines()[:1]} {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "kq=sgemm" in r.stdout and "kq=vec_dot" in r.stdout and "kqv=vec_dot" in r.stdout


if __name__ == "__main__":
    import jaxkv  # noqa: F401  (x64)

    sys.exit(1 if live_check(SWEEP if "--sweep" in sys.argv else QUICK) else 0)

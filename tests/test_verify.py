"""jaxkv.verify, jaxkv.precision and the verify command (fuzz/verify_cmd.py)."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxkv
import jaxkv.attention
from jaxkv.verify import mutations as mu
from jaxkv import verify as vf
from jaxkv.precision import f16_attention, round_to_dot_type

import verify_cases as vc
from conftest import GGML_TRACES, REPO, SHARED

FOREIGN = sorted((SHARED / "traces" / "foreign").glob("*.gguf"))


# ----------------------------------------------------------------------------------------------------
# the golden reference and the metrics


@pytest.mark.parametrize("cfg", vc.CONFIGS, ids=lambda c: f"seed{c['seed']}")
def test_numpy_golden_equals_attention_f64(cfg):
    cfg = dict(cfg)
    case = vc.random_case(cfg.pop("seed"), **cfg)
    a = vf.golden_output(case)
    b = np.asarray(jaxkv.attention.attention(case.q, case.k, case.v, scale=case.scale, mask=case.mask,
                                             softcap=case.softcap, max_bias=case.max_bias,
                                             sinks=case.sinks, precision="f64"))
    # two float64 evaluations of the same sums in different orders: a few f64 ulps of O(1) values
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_errors_hand_values():
    ref = np.zeros((1, 2, 2, 2))
    ref[0, 0, 0] = [3.0, 4.0]  # |ref|^2 = 25
    got = ref.copy()
    got[0, 1, 1, 0] = 0.5
    got[0, 0, 0, 1] = 4.5
    e = vf.errors(got, ref)
    assert e.nmse == pytest.approx((0.25 + 0.25) / 25)
    assert e.max_abs == 0.5
    assert e.per_head_max_abs == (0.5, 0.5)
    assert e.nan_count == 0
    got[0, 1, 0, 0] = np.nan
    e = vf.errors(got, ref)
    assert e.nan_count == 1 and math.isinf(e.nmse) and math.isinf(e.max_abs)
    assert e.worst["query"] == 1 and e.worst["head"] == 0
    # both NaN at the same place: not an error
    ref2 = ref.copy()
    ref2[0, 1, 0, 0] = np.nan
    assert vf.errors(got, ref2).nan_count == 0
    with pytest.raises(ValueError, match="out"):
        vf.errors(np.zeros((1, 2, 2, 3)), ref)


def test_nmse_from_sums_hand_values():
    """The one NMSE formula on its sums (jaxkv.budget.nmse_from_sums): 0/0 and 0/x are 0, x/0 and a
    non-finite error sum are inf, elementwise on arrays, a Python float for scalars."""
    from jaxkv.budget import nmse_from_sums

    assert nmse_from_sums(0.5, 25.0) == 0.02 and type(nmse_from_sums(0.5, 25.0)) is float
    assert nmse_from_sums(0.0, 0.0) == 0.0 and nmse_from_sums(0.0, 3.0) == 0.0
    assert math.isinf(nmse_from_sums(1.0, 0.0)) and math.isinf(nmse_from_sums(math.inf, 2.0))
    assert math.isinf(nmse_from_sums(math.nan, 2.0))
    got = nmse_from_sums(np.array([[0.0, 1.0, 2.0, np.nan]]), np.array([[0.0], [4.0]]))
    np.testing.assert_array_equal(got, [[0.0, np.inf, np.inf, np.inf], [0.0, 0.25, 0.5, np.inf]])


def test_budget_is_factor_times_model_error_plus_floor():
    g = np.ones((1, 1, 2, 4))
    model = g.copy()
    model[0, 0, 1, 2] += 1e-3
    b = vf.derive_budget(g, model, "m")
    floor = vf.FLOOR_UNITS * vf.U32
    assert b.max_abs == pytest.approx(vf.FACTOR * 1e-3 + floor)
    assert b.nmse == pytest.approx(vf.FACTOR ** 2 * 1e-6 / 8 + floor ** 2)
    assert "3^2" in b.derivation() and "floor" in b.derivation()
    # an exact model (an f64 claim) still leaves the F32 storage floor
    b0 = vf.derive_budget(g, g, "f64 golden")
    assert b0.max_abs == pytest.approx(floor) and b0.allows(vf.errors(g.astype(np.float32), g))
    assert not b0.allows(vf.errors(g + 3 * floor, g))


def test_golden_stored_in_f32_passes_an_f64_claim_and_a_perturbed_one_fails():
    case = vc.random_case(7, mask="perhead", sinks=True)
    g = vf.golden_output(case)
    ok = vf.verify_case(case, g.astype(np.float32), g, "f64", golden=g)
    assert ok.status == "pass"
    bad = g.astype(np.float32)
    bad[0, 1, 3, 5] *= 1.001
    v = vf.verify_case(case, bad, g, "f64", golden=g)
    assert v.status == "fail" and v.errors.worst == dict(v.errors.worst, query=1, head=3, dim=5)


def test_resolve_precision():
    class T:
        producer = "ggml cpu (n_threads=2)"

    assert vf.resolve_precision(T()) == "ggml-cpu"
    T.producer = "float64 reference (jaxkv)"
    assert vf.resolve_precision(T()) == "f64"
    T.producer = "my-cuda-kernel"
    assert vf.resolve_precision(T()) == "f16"
    assert vf.resolve_precision(T(), "f32") == "f32"
    with pytest.raises(ValueError, match="precision"):
        vf.resolve_precision(T(), "bf16")


def test_trace_isa_from_metadata_then_producer_then_default():
    from types import SimpleNamespace as NS

    from jaxkv import ggml_cpu

    def t(producer, **md):
        return NS(producer=producer, metadata=md)

    assert vf.trace_isa(t("anything", **{"ggml.isa": "avx2"})) == "avx2"
    assert vf.trace_isa(t("ggml 0.21 CPU avx2", **{"ggml.isa": "AVX512"})) == "avx512"  # metadata first
    assert vf.trace_isa(t("ggml 0.20.2 (8c63e70) CPU avx2 n_threads=2")) == "avx2"
    assert vf.trace_isa(t("ggml 0.21 CPU AVX512F n_threads=4")) == "avx512"
    assert vf.trace_isa(t("ggml cpu (n_threads=2)")) == ggml_cpu.DEFAULT_ISA == "avx512"
    assert vf.trace_isa(NS(producer=None, metadata=None)) == "avx512"
    with pytest.raises(ValueError, match="^ggml.isa: .*'neon'"):
        vf.trace_isa(t("ggml cpu", **{"ggml.isa": "neon"}))
    with pytest.raises(ValueError, match="^producer: .*'avx'"):
        vf.trace_isa(t("ggml 0.21 CPU avx n_threads=1"))


def test_shared_ggml_traces_declare_the_default_isa():
    from jaxkv import trace as tr

    assert GGML_TRACES
    assert {vf.trace_isa(tr.load(p)) for p in GGML_TRACES} == {"avx512"}


RECORDED = sorted((REPO / "traces").glob("ggml020_*.gguf"))


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_recorded_avx2_traces_verify_bit_exact_with_their_isa(path):
    """traces/ggml020_*.gguf were recorded by the AVX2 libggml-python wheel (metadata ggml.isa = avx2):
    the model at the ISA taken from the trace reproduces ``out`` bit for bit; an explicit isa overrides
    it (the AVX-512 model's F16 lane order differs on F16 and mixed caches)."""
    from jaxkv import trace as tr

    t = tr.load(path)
    assert vf.trace_isa(t) == "avx2"
    case = vf.case_from_trace(t)
    out = np.asarray(t.out, np.float64)
    np.testing.assert_array_equal(vf.model_output(t, case, "ggml-cpu"), out)
    np.testing.assert_array_equal(vf.model_output(t, case, "ggml-cpu", isa="avx2"), out)
    other = vf.model_output(t, case, "ggml-cpu", isa="avx512")
    if "q4_0_decode" not in path.stem:  # same-type block K/V: the two builds agree (no F16/F32 SIMD sum)
        assert not np.array_equal(other, out)
    v = vf.verify_trace(t)
    assert v.status == "pass" and v.emu.units == 0.0


def test_f16_v_accumulator_overflow_is_ggml_behaviour_under_ggml_cpu():
    """ggml's fused kernel accumulates F16 V in F16: 48 keys of |V| ~ 1e4 overflow to inf
    (docs/ggml-findings.md, finding 7; recorded by `python -m fuzz record ... --v-scale 1e4`). The model
    reproduces the infinities, so the trace passes under ggml-cpu with 0 units; a kernel that saturates
    at the F16 maximum instead fails."""
    import dataclasses

    from jaxkv import trace as tr

    t = tr.load(REPO / "tests" / "data" / "ggml020_fa_f16v_overflow.gguf")
    out = np.asarray(t.out)
    assert np.isinf(out).sum() == 2 and not np.isnan(out).any()
    v = vf.verify_trace(t, diagnose=False)
    assert v.status == "pass" and v.emu.units == 0.0
    saturated = np.where(np.isinf(out), np.sign(out) * np.float32(65504), out).astype(np.float32)
    assert vf.verify_trace(dataclasses.replace(t, out=saturated), diagnose=False).status == "fail"


def test_unfused_nan_rows_are_ggml_behaviour_under_ggml_cpu():
    """soft_max_ext gives NaN on rows with no live key (docs/ggml-findings.md, finding 2): under ggml-cpu
    the unfused op's golden is NaN there, so the recorded trace passes; a kernel giving 0 there (or NaN
    in a live row) fails, and so does the NaN output under a precision that does not claim ggml."""
    import dataclasses

    from jaxkv import trace as tr

    t = tr.load(REPO / "tests" / "data" / "ggml020_sm_fullrow_nan.gguf")
    case = vf.case_from_trace(t)
    dead = vf.dead_rows(case.q, case.mask, case.sinks)
    assert dead.sum() == 12 and np.array_equal(np.isnan(np.asarray(t.out)).all(-1), dead)
    v = vf.verify_trace(t, diagnose=False)
    assert v.status == "pass" and v.emu.units == 0.0 and v.errors.nan_count == 0
    assert np.isnan(vf.golden_for("soft_max_attn", case, "ggml-cpu")[dead]).all()
    assert not np.isnan(vf.golden_for("flash_attn_ext", case, "ggml-cpu")).any()
    assert not np.isnan(vf.golden_for("soft_max_attn", case, "f16")).any()
    zeroed = np.where(dead[..., None], np.float32(0), np.asarray(t.out))
    assert vf.verify_trace(dataclasses.replace(t, out=zeroed), diagnose=False).status == "fail"
    live_nan = np.array(t.out, np.float32)
    live_nan[0, 0, 0, 0] = np.nan                        # query 0 has live keys
    assert vf.verify_trace(dataclasses.replace(t, out=live_nan), diagnose=False).status == "fail"
    assert vf.verify_trace(t, "f16", diagnose=False).status == "fail"


def test_emu_check_units():
    emu = np.zeros((1, 1, 2, 4))
    emu[0, 0, 0] = [1.0, -2.0, 0.5, 0.0]
    got = emu.copy()
    got[0, 0, 0, 1] += 3 * vf.U16 * 2.0  # 3 units of the row (max |row| = 2)
    c = vf.emu_check(got, emu, vf.U16)
    assert c.units == pytest.approx(3.0) and c.ok and c.n_differ == 1
    got[0, 0, 1, 0] = 1e-30  # a row of zeros must stay (nearly) zero
    assert not vf.emu_check(got, emu, vf.U16).ok


def test_emu_check_equal_infinities_are_no_difference():
    """ggml's F16 V accumulator overflows to inf for large V (docs/ggml-findings.md) and the model
    reproduces it: the same infinity is no difference, a different one or a finite value is infinite,
    and the row's scale comes from its finite outputs."""
    emu = np.array([[[[np.inf, 1.0, -2.0]]]])
    assert vf.emu_check(emu.copy(), emu, vf.U16).units == 0.0
    for bad in (-np.inf, np.nan, 1e30):
        got = emu.copy()
        got[..., 0] = bad
        assert vf.emu_check(got, emu, vf.U16).units == np.inf
    got = emu.copy()
    got[..., 1] = 1.0 + 4 * vf.U16 * 2.0  # 4 units of the finite row maximum |-2|
    assert vf.emu_check(got, emu, vf.U16).units == pytest.approx(4.0)


@pytest.mark.parametrize("unit", [vf.U16, vf.U32])
def test_emu_check_rows_of_zeros_and_subnormals(unit):
    """A row of zeros or float32 subnormals has max|row| ~ 0: the scale floors at the float32 subnormal
    spacing (the output's resolution), so no division by zero, one output rounding there is one unit
    whatever the accumulator, and a real difference still fails."""
    sp = vf.DENORM32
    emu = np.zeros((1, 1, 3, 4))
    emu[0, 0, 0] = [1.0, -2.0, 0.5, 0.0]                 # a normal row
    emu[0, 0, 1] = np.array([3, -7, 0, 100]) * sp         # subnormals (exact multiples of 2^-149)
    assert np.all(np.abs(emu[0, 0, 1]) < 2.0**-126)      # row 2: zeros
    with np.errstate(all="raise"):
        same = vf.emu_check(emu, emu, unit)
        assert same.ok and same.units == 0.0 and same.n_differ == 0
        got = emu.copy()
        got[0, 0, 1, 1] -= sp                             # one rounding in the subnormal row
        got[0, 0, 2, 3] = sp                              # and one in the zero row
        c = vf.emu_check(got, emu, unit)
        assert c.units == 1.0 and c.ok and c.n_differ == 2
        got[0, 0, 1, 2] = 1000 * sp                       # 1000 spacings: not a rounding
        c = vf.emu_check(got, emu, unit)
        assert c.units == 1000.0 and not c.ok
        flushed = emu.copy()
        flushed[0, 0, 1] = 0.0                            # a kernel flushing subnormals to zero
        assert vf.emu_check(flushed, emu, unit).units == 100.0
    with pytest.raises(ValueError, match="^unit"):
        vf.emu_check(emu, emu, 0.0)


# ----------------------------------------------------------------------------------------------------
# the f16 precision model


def test_round_to_dot_type():
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.arange(-16, 16) * 4.0  # amax 64: d = 64/127, values snap to multiples of f16(d)
    x[0, 32:] = np.linspace(-1, 1, 32)
    d16 = np.float32(np.float16(np.float32(64) / np.float32(127)))
    r = np.asarray(round_to_dot_type(x, "q8_0"))
    np.testing.assert_array_equal(r[0, :32] / d16, np.round(x[0, :32] * (127 / 64)))
    assert np.all(np.abs(r[0, 32:] - x[0, 32:]) <= np.float16(1 / 127) * 0.5 + 1e-7)
    np.testing.assert_array_equal(np.asarray(round_to_dot_type(x, "f16")),
                                  x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(round_to_dot_type(x, "f32")), x)
    with pytest.raises(ValueError, match="dot_type"):
        round_to_dot_type(x, "q4_0")


def test_f16_model_accumulator_is_f16():
    # three keys with equal logits: acc = f16(f16(1 + 2^-11) + 2^-11) = 1 (ties to even twice)
    q = np.zeros((1, 1, 1, 32))
    k = np.zeros((1, 3, 1, 32))
    v = np.zeros((1, 3, 1, 32))
    v[0, :, 0, 0] = [1.0, 2.0 ** -11, 2.0 ** -11]
    out = np.asarray(f16_attention(q, k, v, scale=1.0))
    assert out[0, 0, 0, 0] == np.float32(1.0) / np.float32(3.0)
    exact = (1 + 2.0 ** -10) / 3
    assert out[0, 0, 0, 0] != np.float32(exact)


@pytest.mark.parametrize("cfg", vc.CONFIGS, ids=lambda c: f"seed{c['seed']}")
def test_honest_f16_kernel_passes_f16_and_fails_f32_claim(cfg):
    """An F16 kernel written independently (ggml's online order) is within the f16 budget, and the
    f32 budget is too sharp for it: the tolerance separates the two precisions."""
    cfg = dict(cfg)
    case = vc.random_case(cfg.pop("seed"), f16_kv=True, **cfg)
    g = vf.golden_output(case)
    kernel = vc.honest_f16_kernel(case)
    m16 = f16_attention(case.q, case.k, case.v, scale=case.scale, mask=case.mask,
                        softcap=case.softcap, max_bias=case.max_bias, sinks=case.sinks,
                        dot_type="f16", kv_f16=bool(case.regions))
    assert vf.verify_case(case, kernel, np.asarray(m16), "f16", golden=g).status == "pass"
    f = np.float32
    m32 = jaxkv.attention.attention(
        case.q.astype(f), case.k.astype(f), case.v.astype(f), scale=case.scale,
        mask=None if case.mask is None else case.mask.astype(f), softcap=case.softcap,
        max_bias=case.max_bias, sinks=None if case.sinks is None else case.sinks.astype(f),
        precision="f32")
    v32 = vf.verify_case(case, kernel, np.asarray(m32), "f32", golden=g, diagnose=False)
    assert v32.status == "fail"


# ----------------------------------------------------------------------------------------------------
# shared traces (need jaxkv.trace and jaxkv.ggml_cpu)


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "fuzz.verify_cmd", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def _verify_json(paths, precision):
    from fuzz.verify_cmd import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*map(str, paths), "--json", "--precision", precision])
    return rc, [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]


@pytest.mark.parametrize("precision", ["auto", "f16"])
def test_shared_ggml_traces_pass(precision):
    pytest.importorskip("jaxkv.trace")
    pytest.importorskip("jaxkv.ggml_cpu")
    assert GGML_TRACES, f"no shared traces under {SHARED}"
    rc, rows = _verify_json(GGML_TRACES, precision)
    for r in rows:
        print(f"{pathlib.Path(r['trace']).name:32s} {r['status']} [{r['precision']}] nmse "
              f"{r['nmse']} budget {r['budget'] and r['budget']['nmse']} emu "
              f"{r.get('emulation', {}).get('units')} {r['error'] or ''}")
    assert len(rows) == len(GGML_TRACES)
    assert [r["status"] for r in rows] == ["pass"] * len(rows), rows
    assert rc == 0
    want = "ggml-cpu" if precision == "auto" else "f16"
    assert {r["precision"] for r in rows} == {want}


def test_shared_foreign_dumps_pass():
    pytest.importorskip("jaxkv.trace")
    pytest.importorskip("jaxkv.ggml_cpu")
    assert len(FOREIGN) == 2
    rc, rows = _verify_json(FOREIGN, "auto")
    assert len(rows) >= 4  # two steps each
    assert all(r["status"] == "pass" for r in rows), rows
    assert rc == 0


def test_cli_unreadable_inputs_exit_2_one_line_each(tmp_path):
    pytest.importorskip("jaxkv.trace")
    good = SHARED / "traces" / "ggml" / "fa_f16_prefill_causal.gguf"
    data = good.read_bytes()
    (tmp_path / "a_truncated.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "b_garbage.gguf").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "c_empty.gguf").write_bytes(b"")
    shutil.copy(good, tmp_path / "d_good.gguf")
    p = _cli([tmp_path, tmp_path / "missing.gguf"])
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stdout.splitlines()
    errs = [x for x in lines if x.startswith("ERROR")]
    assert len(errs) == 4, lines
    assert any(x.startswith("PASS") and "d_good" in x for x in lines), lines
    p = _cli([tmp_path / "b_garbage.gguf", "--json"])
    row = json.loads(p.stdout.splitlines()[0])
    assert p.returncode == 2 and row["status"] == "error" and "\n" not in row["error"]


def test_cli_mismatch_exit_1_with_details_and_timings(tmp_path):
    tr = pytest.importorskip("jaxkv.trace")
    pytest.importorskip("jaxkv.ggml_cpu")
    src = SHARED / "traces" / "ggml" / "fa_f16_sinks.gguf"
    t = tr.load(src)
    tr.save(tmp_path / "bad.gguf", t, out=np.asarray(t.out)[:, :, ::-1].copy())  # heads reversed
    p = _cli([tmp_path / "bad.gguf", "--timings"])
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.startswith("FAIL") and "budget:" in p.stdout and "timings: load" in p.stdout
    p = _cli([tmp_path / "bad.gguf", "--json"])
    row = json.loads(p.stdout.splitlines()[0])
    for key in ("trace", "status", "nmse", "max_abs", "budget", "precision", "worst",
                "per_head_max_abs", "nan_count", "diagnosis", "error"):
        assert key in row
    assert set(row["worst"]) == {"batch", "query", "head", "dim", "got", "expected"}


def test_cli_bad_arguments_exit_2():
    p = _cli(["--precision", "bf16", "x.gguf"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_parse_names(tmp_path):
    from fuzz.verify_cmd import parse_names

    assert parse_names(None) is None
    assert parse_names("q=Qcur-0,out=kqv_out-0") == {"q": "Qcur-0", "out": "kqv_out-0"}
    f = tmp_path / "names.json"
    f.write_text('{"q": "Qcur"}')
    assert parse_names(str(f)) == {"q": "Qcur"}
    with pytest.raises(ValueError, match="--names"):
        parse_names("qQcur")
    f.write_text("[1]")
    with pytest.raises(ValueError, match="--names"):
        parse_names(str(f))


# ----------------------------------------------------------------------------------------------------
# verdicts that cannot be trusted: undecided (issue 13, "False passes")


def test_below_signal_hand_values():
    g = np.zeros((1, 1, 1, 4))
    g[..., 0] = 2.0
    tight = vf.derive_budget(g, g * (1 + 1e-6), "m")
    assert vf.below_signal(tight, g)
    loose = vf.derive_budget(g, np.zeros_like(g), "m")  # model as far off as zero: budget nmse 9
    assert loose.allows(vf.errors(np.zeros_like(g), g)) and not vf.below_signal(loose, g)
    assert loose.allows(vf.errors(-g, g))  # such a budget passes the wrong sign too
    # the sharp check can still reject the zero output
    assert vf.below_signal(loose, g, emu=g, emu_unit=vf.U16)
    # a zero golden: zero is the right answer, the rule does not apply
    assert vf.below_signal(loose, np.zeros_like(g))


def _tiny_v_trace(out_kind, producer="my-kernel"):
    """(trace, golden): F32 K/V with |V| ~ 1e-9, which an F16 accumulator flushes to zero."""
    from jaxkv import trace as tr

    case = vc.random_case(11, n_q=2, H=4, Hkv=2, n_kv=48, mask="causal")
    f = np.float32
    q, k, v = case.q.astype(f), case.k.astype(f), (case.v * 1e-9).astype(f)
    case = mu.Case(op=case.op, q=q.astype(float), k=k.astype(float), v=v.astype(float),
                   mask=case.mask, scale=case.scale)
    g = vf.golden_output(case)
    out = {"golden": g, "zero": np.zeros_like(g), "negated": -g}[out_kind].astype(f)
    t = tr.Trace(path=None, op="flash_attn_ext", producer=producer, scale=case.scale, max_bias=0.0,
                 softcap=0.0, n_threads=1, kv_order=None, metadata={}, q=q, out=out, k=k, v=v,
                 mask=case.mask.astype(f))
    return t, g


@pytest.mark.parametrize("out_kind", ["golden", "zero", "negated"])
def test_false_pass_a_budget_above_the_signal_is_undecided(out_kind):
    """Issue 13 (a): an f16 budget can exceed the signal (here the f16 model's F16 accumulator flushes
    V of 1e-9 to zero, model NMSE 1, budget ~9): the all-zero and the sign-flipped output must never
    PASS. Under f32 the same trace decides: the right output passes, the others fail."""
    t, g = _tiny_v_trace(out_kind)
    v16 = vf.verify_trace(t, "f16", diagnose=False)
    assert v16.budget.nmse > 1 and v16.status == "undecided", v16.line()
    assert "budget not below the signal" in v16.reason and v16.line().startswith("UNDECIDED")
    v32 = vf.verify_trace(t, "f32", diagnose=False)
    assert v32.status == ("pass" if out_kind == "golden" else "fail"), v32.line()


def test_cli_undecided_exits_3_and_fail_wins(tmp_path):
    from jaxkv import trace as tr

    t, _ = _tiny_v_trace("zero")
    tr.save(tmp_path / "zero.gguf", t)
    p = _cli([tmp_path / "zero.gguf"])
    assert p.returncode == 3, p.stdout + p.stderr
    assert p.stdout.startswith("UNDECIDED") and "undecided: budget not below the signal" in p.stdout
    row = json.loads(_cli([tmp_path / "zero.gguf", "--json"]).stdout.splitlines()[0])
    assert row["status"] == "undecided" and "all-zero output would pass" in row["reason"]
    from fuzz.verify_cmd import exit_status

    assert exit_status({"pass"}) == 0 and exit_status({"pass", "undecided"}) == 3
    assert exit_status({"undecided", "fail"}) == 1 and exit_status({"fail", "error", "undecided"}) == 2


def test_cli_no_traces_found_exits_2_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no traces here")
    for d in ("empty", "notes"):
        p = _cli([tmp_path / d])
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stdout.splitlines() == [f"ERROR {tmp_path / d}: no traces found under {tmp_path / d}"]
        assert "Traceback" not in p.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.gguf").write_bytes(b"\x00garbage")
    p = _cli([tmp_path / "bad"])  # only unreadable traces: one ERROR line each, exit 2
    assert p.returncode == 2 and len(p.stdout.splitlines()) == 1
    assert p.stdout.startswith(f"ERROR {tmp_path / 'bad' / 'x.gguf'}: ")


# NaN semantics: every precision model propagates a NaN input to its rows as ggml does


def _nan_inputs(where):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 4, 32)).astype(np.float32)
    k = rng.standard_normal((1, 20, 2, 32)).astype(np.float16)
    v = rng.standard_normal((1, 20, 2, 32)).astype(np.float16)
    mask = np.zeros((1, 1, 2, 20), np.float32)
    mask[..., -3:] = -np.inf  # keys 17..19 are read by no row
    scale = 32 ** -0.5
    if where == "q":
        q[0, 1, 2, 5] = np.nan
    elif where == "live_k":
        k[0, 3, 1, 0] = np.nan
    elif where == "dead_k":
        k[0, 18, 1, 0] = np.nan
        v[0, 19, 0, 3] = np.inf
    elif where == "mask":
        mask[0, 0, 1, 4] = np.nan
    elif where == "scale_nan":
        scale = float("nan")
    elif where == "scale_inf":
        scale = float("inf")
    return q, k, v, mask, scale


NAN_ROWS = {  # [n_q, H] rows that must be NaN (ggml: a NaN logit enters S and the accumulator)
    "q": [(1, 2)], "live_k": [(i, h) for i in range(2) for h in (2, 3)], "dead_k": [],
    "mask": [(1, h) for h in range(4)], "scale_nan": "all", "scale_inf": "all"}


@pytest.mark.parametrize("where", list(NAN_ROWS))
def test_false_pass_b_nan_input_propagates_in_every_model(where):
    """Issue 13 (b): NaN in q, a live K entry, the mask, or scale NaN/inf: each model gives NaN in exactly
    the rows ggml's kernel (the bit-faithful emulation) gives NaN, never zero rows; NaN in keys no row
    reads changes nothing."""
    from jaxkv import ggml_cpu

    q, k, v, mask, scale = _nan_inputs(where)
    want = np.zeros((1, 2, 4), bool)
    if NAN_ROWS[where] == "all":
        want[:] = True
    for i, h in NAN_ROWS[where] if NAN_ROWS[where] != "all" else []:
        want[0, i, h] = True
    case = mu.Case(op="flash_attn_ext", q=q.astype(float), k=k.astype(float), v=v.astype(float),
                   mask=mask.astype(float), scale=scale)
    outs = {
        "ggml-cpu": ggml_cpu.flash_attn_ext(q, k, v, scale=scale, mask=mask),
        "attention": jaxkv.attention.attention(q, k, v, scale=scale, mask=mask, precision="f32"),
        "online": jaxkv.attention.online_attention(q, k, v, scale=scale, mask=mask, precision="f64"),
        "flash_decode": jaxkv.attention.flash_decode(q, k, v, chunk=7, scale=scale, mask=mask),
        "f16 model": f16_attention(q, k, v, scale=scale, mask=mask),
        "golden": vf.golden_output(case),
    }
    for name, o in outs.items():
        o = np.asarray(o, np.float64)
        rows = np.isnan(o).any(-1)
        assert np.array_equal(rows, want), (name, rows)
        assert np.isnan(o[want]).all() and np.isfinite(o[~want]).all(), name


def _nan_trace(where, out):
    from jaxkv import trace as tr

    q, k, v, mask, scale = _nan_inputs(where)
    return tr.Trace(path=None, op="flash_attn_ext", producer="ggml cpu (n_threads=1)", scale=scale,
                    max_bias=0.0, softcap=0.0, n_threads=1, kv_order=None, metadata={}, q=q,
                    out=out, k=k, v=v, mask=mask)


def _ggml_live_or_emulated(where):
    """ggml's output on the NaN inputs: the live library when it loads (checked equal to the emulation's
    NaN rows; the oracle refuses a non-finite scale), else the bit-faithful emulation."""
    from jaxkv import ggml_cpu
    from jaxkv.oracles import ggml as og

    q, k, v, mask, scale = _nan_inputs(where)
    emu = np.asarray(ggml_cpu.flash_attn_ext(q, k, v, scale=scale, mask=mask))
    if og.available() and math.isfinite(scale):
        live = og.flash_attn_ext(q, k, v, scale=scale, mask=mask, nonfinite="allow")
        assert np.array_equal(np.isnan(live), np.isnan(emu))
        return np.asarray(live, np.float32)
    return emu


@pytest.mark.parametrize("where", ["q", "live_k", "mask", "scale_nan"])
def test_false_pass_c_ggml_nan_is_undecided_never_pass_or_fail(where):
    """Issue 13 (c): where ggml gives NaN, `--precision f16` must not PASS a zero output, and `auto`
    (ggml-cpu) must not FAIL ggml's own output: the reference is undefined -> undecided, naming the
    NaN input. A NaN in keys that no row reads keeps the reference defined: ggml's output passes."""
    ggml_out = _ggml_live_or_emulated(where)
    zeroed = np.where(np.isnan(ggml_out), np.float32(0), ggml_out)
    loc = {"q": "q[0, 1, 2, 5] (b, query, head, dim) = nan", "live_k": "k[0, 3, 1, 0]",
           "mask": "mask[0, 0, 1, 4] (b, head, query, key) = nan", "scale_nan": "scale = nan"}[where]
    for prec, out in (("auto", ggml_out), ("f16", zeroed), ("f16", ggml_out), ("auto", zeroed)):
        v = vf.verify_trace(_nan_trace(where, out), prec, diagnose=False)
        assert v.status == "undecided", (prec, v.line())
        assert v.reason.startswith("reference undefined: non-finite input") and loc in v.reason
    t = _nan_trace("dead_k", _ggml_live_or_emulated("dead_k"))
    assert np.isfinite(np.asarray(t.out)).all()
    assert vf.verify_trace(t, diagnose=False).status == "pass"
    assert vf.verify_trace(t, "f16", diagnose=False).status == "pass"


def test_undefined_inputs_names_tensor_and_index():
    case = vc.random_case(3, n_q=2, H=4, Hkv=2, n_kv=10, mask="causal")
    assert vf.undefined_inputs(case) == ()
    v = case.v.copy()
    v[0, 9, 1, 2] = np.nan                      # key 9 is read by query 1 only: live
    sk = np.zeros(4)
    sk[3] = np.inf
    import dataclasses

    c2 = dataclasses.replace(case, v=v, sinks=sk, softcap=float("inf"))
    got = vf.undefined_inputs(c2)
    assert got == ("softcap = inf", "v[0, 9, 1, 2] (b, key, kv head, dim) = nan",
                   "sinks[3] (head) = inf"), got


def test_fallback_budget_when_the_model_does_not_cover_the_trace(tmp_path, monkeypatch, capsys):
    """Issue 13, 'a verdict on every ggml path': ggml's tiled path (n_q >= 64, F16 K/V) raised
    NotImplementedError and exited 2. Now a model raising ggml_cpu.Unmodelled gives a verdict under the
    fallback budget, and the line says so; the right output passes (exit 0), a zero output fails."""
    from fuzz.verify_cmd import main
    from jaxkv import ggml_cpu
    from jaxkv import trace as tr

    assert issubclass(ggml_cpu.Unmodelled, NotImplementedError)
    rng = np.random.default_rng(9)
    n_q, n_kv = 64, 80
    q = rng.standard_normal((1, n_q, 2, 32)).astype(np.float32)
    k = rng.standard_normal((1, n_kv, 1, 32)).astype(np.float16)
    v = rng.standard_normal((1, n_kv, 1, 32)).astype(np.float16)
    j, i = np.arange(n_kv)[None, :], np.arange(n_q)[:, None]
    mask = np.where(j <= n_kv - n_q + i, 0.0, -np.inf).astype(np.float32)[None, None]
    # ggml's tiled path computes in F32 from F16 K/V: the f32 reference plays the kernel
    out = np.asarray(jaxkv.attention.attention(q, k, v, scale=32 ** -0.5, mask=mask, precision="f32"))
    t = tr.Trace(path=None, op="flash_attn_ext", producer="ggml cpu (n_threads=1)", scale=32 ** -0.5,
                 max_bias=0.0, softcap=0.0, n_threads=1, kv_order=None, metadata={}, q=q, out=out,
                 k=k, v=v, mask=mask)
    tr.save(tmp_path / "tiled.gguf", t)
    tr.save(tmp_path / "zero.gguf", t, out=np.zeros_like(out))

    def unmodelled(*a, **kw):
        raise ggml_cpu.Unmodelled("n_q=64 >= 64 with f16 K and V takes ggml's tiled path")

    monkeypatch.setattr(ggml_cpu, "flash_attn_ext", unmodelled)
    assert main([str(tmp_path / "tiled.gguf")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("PASS")
    assert "[ggml-cpu -> fallback generic model (q as f16, f16 accumulator)]" in line
    assert main([str(tmp_path / "tiled.gguf"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["fallback"].startswith("the ggml-cpu model does not cover this trace (n_q=64")
    assert row["model"] == "generic model (q as f16, f16 accumulator)" and "emulation" not in row
    assert main([str(tmp_path / "zero.gguf")]) == 1
    assert "fallback:" in capsys.readouterr().out


TILED_SHAPES = [(64, 64, True), (128, 200, True), (256, 256, False)]  # n_q, n_kv, causal


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_live_ggml_tiled_shapes_get_a_verdict(dtype):
    """Live ggml on shapes of its tiled path (n_q >= 64, F16/F32 K/V): a verdict, never exit 2; the
    honest output passes (under the tiled model if one exists, else under the fallback budget). ci: the
    first shape, one seed; HYPOTHESIS_PROFILE=fuzz: every shape, seeds 0-2 (`pytest -s` prints them)."""
    import os

    from jaxkv import trace as tr
    from jaxkv.oracles import ggml as og

    if not og.available():
        pytest.skip("ggml library not loadable")
    full = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
    H, Hkv, D = 4, 2, 64
    dt = np.float16 if dtype == "f16" else np.float32
    for seed in range(3 if full else 1):
        rng = np.random.default_rng(seed)
        for n_q, n_kv, causal in TILED_SHAPES if full else TILED_SHAPES[:1]:
            q = rng.standard_normal((1, n_q, H, D)).astype(np.float32)
            k = rng.standard_normal((1, n_kv, Hkv, D)).astype(dt)
            v = rng.standard_normal((1, n_kv, Hkv, D)).astype(dt)
            j, i = np.arange(n_kv)[None, :], np.arange(n_q)[:, None]
            m = np.where(j <= n_kv - n_q + i, 0.0, -np.inf) if causal else rng.uniform(-1, 1, (n_q, n_kv))
            mask = m.astype(np.float16).astype(np.float32)[None, None]
            fmt = None if dtype == "f16" else "f32"
            out = og.flash_attn_ext(q, k, v, k_format=fmt, v_format=fmt, scale=D ** -0.5, mask=mask,
                                    n_threads=2)
            t = tr.Trace(path=None, op="flash_attn_ext", producer="ggml 0.20.2 CPU avx2", scale=D ** -0.5,
                         max_bias=0.0, softcap=0.0, n_threads=2, kv_order=None, metadata={}, q=q,
                         out=np.asarray(out, np.float32), k=k, v=v, mask=mask)
            verdict = vf.verify_trace(t, diagnose=False)
            print(dtype, seed, n_q, n_kv, causal, verdict.line())
            assert verdict.status == "pass", verdict.line()


def test_unmodelled_isa_falls_back_instead_of_exit_2():
    """A trace from a SIMD build the emulation does not model (NEON) is readable: it gets a verdict under
    the fallback budget, naming the build, not an error."""
    import dataclasses

    from jaxkv import trace as tr

    t = tr.load(SHARED / "traces" / "ggml" / "fa_f16_sinks.gguf")
    t = dataclasses.replace(t, metadata=dict(t.metadata, **{"ggml.isa": "neon"}))
    with pytest.raises(ValueError, match="'neon' is not modelled"):
        vf.trace_isa(t)
    v = vf.verify_trace(t, diagnose=False)
    assert v.status == "pass" and v.emu is None, v.line()
    assert "'neon' is not modelled" in v.fallback and "fallback generic model (q as f16" in v.line()


def test_overflowing_f16_model_budget_is_undecided_not_pass():
    """The f16 model's F16 accumulator overflows on this trace (|V| ~ 1e4): its budget is infinite, which
    passed any output before, the all-zero one included. Now undecided under f16; under auto the sharp
    check still decides (ggml's output passes, zero fails)."""
    import dataclasses

    from jaxkv import trace as tr

    t = tr.load(REPO / "tests" / "data" / "ggml020_fa_f16v_overflow.gguf")
    zero = dataclasses.replace(t, out=np.zeros_like(np.asarray(t.out)))
    for x in (t, zero):
        v = vf.verify_trace(x, "f16", diagnose=False)
        assert v.status == "undecided" and math.isinf(v.budget.nmse), v.line()
    assert vf.verify_trace(t, diagnose=False).status == "pass"
    assert vf.verify_trace(zero, diagnose=False).status == "fail"

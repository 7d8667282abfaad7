"""Live ggml (libggml-python wheel) against the ``ggml-cpu`` precision model: the fuzz targets
(fuzz.ggml_targets), ``python -m fuzz record`` (fuzz.record_cmd) and a hypothesis campaign over
the ggml case menus (fuzz.strategies.MENUS, ``python -m fuzz --target ggml --menu``) over formats (K and V independent), masks, softcap, ALiBi, sinks, thread counts,
the per-row, split-KV, unfused and mixed-cache paths.

Budgets: jaxkv.verify's (error vs an f64 golden <= 3x the model's + 4 f32 units; within EMU_UNITS
accumulator roundings of the emulation), and bitwise equality with the emulation, which is what the
model claims for this build (measured: every case of the campaign; docs/ggml-findings.md).

Skips: only where ggml cannot load *and* the platform is not x86-64 Linux (the ``dev`` extra installs
libggml-python there, so on x86-64 Linux a missing wheel is a failure, not a skip).

Profiles: ``ci`` runs CI_CASES cases from the small ``ci`` menu (few compiled model programs);
``HYPOTHESIS_PROFILE=fuzz`` runs max(2000, max_examples) cases from the ``full`` menu (all 64 K/V format
pairs, every flag set, two shape buckets).
"""

import io
import os
import pathlib
import platform
import sys
from contextlib import redirect_stderr

import numpy as np
import pytest
from hypothesis import given, settings

from jaxkv.oracles import ggml as G

_X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
if not G.available():
    if _X86_LINUX:
        pytest.fail("libggml-python does not load on x86-64 Linux: install the dev extra "
                    "(pip install -e '.[dev]')", pytrace=False)
    pytest.skip(f"ggml unavailable on {sys.platform}/{platform.machine()} (no libggml-python wheel)",
                allow_module_level=True)

from fuzz import cases as C  # noqa: E402
from fuzz import engine as E  # noqa: E402
from fuzz import ggml_targets as T  # noqa: E402
from fuzz import properties as P  # noqa: E402
from fuzz import record_cmd  # noqa: E402
from fuzz import strategies as S  # noqa: E402
from jaxkv import alibi  # noqa: E402
from jaxkv import ggml_cpu as M  # noqa: E402
from jaxkv import trace as TR  # noqa: E402
from jaxkv import verify as V  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RECORDED = sorted((REPO / "traces").glob("ggml020_*.gguf"))
NAN_TRACE = REPO / "tests" / "data" / "ggml020_sm_fullrow_nan.gguf"
FUZZ = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "fuzz"
CI_CASES = 300
N_CASES = max(2000, settings.default.max_examples) if FUZZ else CI_CASES


FLT_MIN = 2.0 ** -126  # smallest normal float32


def _run(c):
    """A menu case through the campaign's engine: (got (live ggml), model (ggml-cpu emulation), golden,
    acc unit) over the case's real region."""
    t, view = T.menu_case_target(c)
    return P.sharp_case(t, view, t.case_arrays(c))[:4]


def _check(c):
    t, view = T.menu_case_target(c)
    return P.check_sharp(t, view, t.case_arrays(c))


# ----------------------------------------------------------------------------------------------------
# the campaign

@settings(max_examples=N_CASES)
@given(S.menu_case_strategy("full" if FUZZ else "ci"))
def test_live_ggml_matches_ggml_cpu_model(c):
    r = _check(c)
    assert r.ok, f"{c}: {r.why}"
    assert r.bitwise == 1.0, f"{c}: bitwise-equal fraction {r.bitwise}, nmse vs model {r.nmse_model:.3g}"


def test_campaign_menu_covers_every_format_and_path():
    """The full menu draws every K and V format independently and every path (a campaign that never
    draws a format cannot find its bugs)."""
    full = S.MENUS["full"]
    assert {a for a, _ in full["pairs"]} == set(S.MENU_FORMATS) == {b for _, b in full["pairs"]}
    assert len(full["pairs"]) == len(S.MENU_FORMATS) ** 2
    rng = np.random.default_rng(0)
    draw = S.rng_drawer(rng)
    cases = [S.draw_menu_case(draw, "full") for _ in range(400)]
    assert {(c["op"], c["bucket"]) for c in cases} >= {("ggml", "row"), ("ggml", "gqa3"), ("ggml", "split"),
                                                       ("ggml-unfused", "row"), ("ggml-mixed", "gqa3")}
    assert {c["threads"] for c in cases} == {1, 2, 3, 4}
    assert {c["mask"] for c in cases} == set(S.MENU_MASKS)
    split = [c for c in cases if c["bucket"] == "split"]
    assert all(c["k_fmt"] == c["v_fmt"] and c["k_fmt"] in ("F16", "F32") for c in split)
    B, n_q, *_, n_kv = S.MENU_BUCKETS["split"]
    assert (B, n_q) == (1, 1) and n_kv >= M.SPLIT_KV_MIN


# ----------------------------------------------------------------------------------------------------
# findings

def _alibi_case(seed):
    return dict(op="ggml", bucket="row", k_fmt="Q4_0", v_fmt="F32", flags="alibi", mask="causal",
                mask_param=19, softcap=0.0, max_bias=6.217944145202637, threads=1,
                scale=0.4143098294734955, dist="normal", seed=seed)


def _numpy_slopes(H, max_bias):
    """ALiBi slopes with numpy's float32 power (what jaxkv.ggml_cpu used before it called libm powf)."""
    n_log2 = 1 << int(np.floor(np.log2(H)))
    mb = np.float32(max_bias)
    m0 = np.power(np.float32(2.0), -mb / np.float32(n_log2), dtype=np.float32)
    m1 = np.power(np.float32(2.0), -(mb / np.float32(2.0)) / np.float32(n_log2), dtype=np.float32)
    h = np.arange(H)
    base = np.where(h < n_log2, m0, m1).astype(np.float32)
    ex = np.where(h < n_log2, h + 1, 2 * (h - n_log2) + 1).astype(np.float32)
    return np.power(base, ex, dtype=np.float32).astype(np.float64)


def test_alibi_slopes_are_libm_powf(monkeypatch):
    """ggml computes ALiBi slopes with libm ``powf``; numpy's float32 power differs by an ulp for
    some bases (here head 1 and 2 of 4). With libm slopes the model is bit-exact; with numpy's, whole
    output rows differ by a few ulps (the case the campaign found)."""
    c = _alibi_case(1586302505)
    a = C.menu_arrays(c)
    assert not np.array_equal(_numpy_slopes(4, c["max_bias"]), alibi.slopes(4, c["max_bias"], "libm"))
    st = T.prepare("ggml", a["k"], a["v"], k_format="Q4_0", v_format="F32")
    kw = dict(scale=a["scale"], mask=a["mask"], max_bias=a["max_bias"])
    got = G.flash_attn_ext(a["q"], st["k"], st["v"], v_format="F32", **kw)
    fixed = np.asarray(M.flash_attn_ext(a["q"], st["k"], st["v"], isa="avx2", **kw))
    np.testing.assert_array_equal(got, fixed)
    with monkeypatch.context() as mp:  # jaxkv.ggml_cpu with numpy's slopes instead of libm's
        mp.setattr(M, "_slopes", _numpy_slopes)
        off = np.asarray(M.flash_attn_ext(a["q"], st["k"], st["v"], isa="avx2", **kw))
    assert 0 < np.mean(off != got) and np.max(np.abs(off - got)) < 1e-5 * np.max(np.abs(got))


def _model_slopes_agree(n_head, max_bias):
    """Whether jaxkv.ggml_cpu's slopes equal libm powf's (jaxkv.alibi.slopes, pow="libm")."""
    return bool(np.array_equal(np.asarray(M._slopes(n_head, max_bias), np.float64),
                               alibi.slopes(n_head, max_bias, "libm")))


def test_model_slopes_equal_libm_powf():
    assert all(_model_slopes_agree(H, mb) for H in (4, 6, 8) for mb in (3.7637746, 6.2179441, 1.8681055))


def _subnormal(x):
    return (x != 0) & (np.abs(x) < FLT_MIN)


def test_model_keeps_subnormal_outputs():
    """A peaked softmax (outlier channels, scale 0.5) leaves output elements of ~1e-43: ggml returns the
    float32 subnormal and so does the model (it converts its float64 carriers to float32 on the host;
    inside XLA the conversion flushed them to zero)."""
    c = dict(op="ggml", bucket="row", k_fmt="Q8_0", v_fmt="Q8_0", flags="plain", mask="none", mask_param=1,
             softcap=0.0, max_bias=0.0, threads=1, scale=0.5, dist="outlier", seed=0)
    got, model, _, _ = _run(c)
    assert _subnormal(got).sum() == 2
    np.testing.assert_array_equal(model, got)
    r = _check(c)
    assert r.ok and r.bitwise == 1.0
    # a row of tiny outputs (max ~1e-37, 13 of 64 subnormal: sinks dominate), found by the fuzz profile
    c = dict(c, k_fmt="Q4_0", v_fmt="F16", flags="alibi_sinks", mask="window", max_bias=1.0, scale=0.125,
             dist="big", seed=1)
    got, model, _, _ = _run(c)
    tiny = (np.max(np.abs(got), axis=-1) < 2.0**-120) & np.any(_subnormal(got), axis=-1)
    assert tiny.sum() == 1 and _subnormal(got).sum() == 13
    np.testing.assert_array_equal(model, got)
    r = _check(c)
    assert r.ok and r.bitwise == 1.0 and r.emu_units == 0.0


def test_unfused_fully_masked_rows_are_nan():
    """ggml's unfused path (soft_max_ext) gives NaN on a row whose every key is masked; the fused
    flash_attn_ext gives 0 there. The saved trace replays bit for bit (NaN in place), the model agrees."""
    t = TR.load(NAN_TRACE)
    dead = V.dead_rows(t.q, t.mask, None)
    assert dead.any() and not dead.all()
    live = G.soft_max_attn(np.asarray(t.q), t.k, np.asarray(t.v), scale=t.scale, mask=np.asarray(t.mask))
    np.testing.assert_array_equal(live, np.asarray(t.out))  # NaN == NaN in assert_array_equal
    assert np.array_equal(np.isnan(live), np.broadcast_to(dead[..., None], live.shape))
    model = np.asarray(M.soft_max_attn(t.q, t.k, t.v, scale=t.scale, mask=t.mask, isa="avx2"))
    np.testing.assert_array_equal(model, live)
    fused = G.flash_attn_ext(np.asarray(t.q), t.k, np.asarray(t.v), scale=t.scale, mask=np.asarray(t.mask))
    assert np.all(fused[dead] == 0) and np.isfinite(fused).all()


def test_thread_count_dependence():
    """The per-row loop does not depend on n_threads; the split-KV path does (n_threads chunks), and
    the model with the same n_threads follows it bit for bit."""
    row = C.menu_arrays(dict(_alibi_case(5), flags="plain", mask="none", max_bias=0.0))
    outs = [T.make_target("ggml", n, k_format="Q8_0", v_format="Q4_1")(
        row["q"], row["k"], row["v"], scale=row["scale"]) for n in (1, 3)]
    np.testing.assert_array_equal(outs[0], outs[1])
    c = dict(op="ggml", bucket="split", k_fmt="F32", v_fmt="F32", flags="plain", mask="none", mask_param=1,
             softcap=0.0, max_bias=0.0, threads=1, scale=0.125, dist="normal", seed=3)
    a = C.menu_arrays(c)
    got = {n: T.make_target("ggml", n, k_format="F32", v_format="F32")(a["q"], a["k"], a["v"], scale=0.125)
           for n in (1, 4)}
    assert not np.array_equal(got[1], got[4])
    model4 = T.make_model("ggml", 4, isa="avx2", k_format="F32", v_format="F32")(a["q"], a["k"], a["v"], scale=0.125)
    np.testing.assert_array_equal(got[4], model4)


# ----------------------------------------------------------------------------------------------------
# the targets

def test_target_api_and_errors():
    f = T.make_target("ggml-unfused", 2)
    assert (f.declared_precision, f.isa, f.n_threads, f.op.name) == ("ggml-cpu", "avx2", 2, "soft_max_attn")
    assert callable(f.model)
    q = np.zeros((1, 1, 2, 32), np.float32)
    kv = np.zeros((1, 4, 1, 32), np.float16)
    with pytest.raises(ValueError, match="^softcap"):
        f(q, kv, kv, scale=1.0, softcap=5.0)
    with pytest.raises(ValueError, match="^sinks"):
        f(q, kv, kv, scale=1.0, sinks=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="^name"):
        T.make_target("ggml-gpu", 1)
    with pytest.raises(ValueError, match="^n_threads"):
        T.make_target("ggml", 0)
    with pytest.raises(ValueError, match="^k_format"):
        T.make_target("ggml", 1, k_format="Q2_K")
    with pytest.raises(ValueError, match="^k_format"):
        T.make_target("ggml-mixed", 1, k_format="F16")(q, kv, kv, scale=1.0)


def test_module_level_targets_take_formats_from_dtypes():
    """``--target fuzz.ggml_targets:ggml``: float16 operands are F16, float32 F32, QuantArrays their type."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 4, 64)).astype(np.float32)
    k = rng.standard_normal((1, 40, 2, 64)).astype(np.float16)
    v = rng.standard_normal((1, 40, 2, 64)).astype(np.float32)
    got = T.ggml(q, k, v, scale=0.125)
    np.testing.assert_array_equal(got, G.flash_attn_ext(q, k, v, v_format="F32", scale=0.125))
    kq = T.prepare("ggml", k, v, k_format="Q5_1")["k"]
    np.testing.assert_array_equal(T.ggml(q, kq, v, scale=0.125),
                                  G.flash_attn_ext(q, k.astype(np.float32), v, k_format="Q5_1", v_format="F32",
                                                   scale=0.125))


# ----------------------------------------------------------------------------------------------------
# python -m fuzz --target ggml | ggml-unfused | ggml-mixed (the campaign's `target` property)

TARGET_CASES = 8


def _target_cases(fn, n=TARGET_CASES, seed=0):
    from fuzz import campaign as Cm
    from fuzz import properties as P

    ctx = P.Context(seed=seed, target=fn, target_spec=getattr(fn, "name", None))
    prop = P.get("target")
    return prop, ctx, Cm.generate(prop, ctx, seed, 0, n)


def _spy(fn, seen):
    """fn, recording the dtypes of the K/V it is handed (attributes copied: it declares ggml-cpu too)."""
    def spy(q, k, v, **kw):
        seen.append((np.asarray(k).dtype, np.asarray(v).dtype))
        return fn(q, k, v, **kw)

    for a in ("name", "op", "n_threads", "declared_precision", "unsupported", "prepare", "isa", "model"):
        setattr(spy, a, getattr(fn, a))
    return spy


@pytest.mark.parametrize("name", T.TARGETS)
def test_fuzz_target_property_judges_live_ggml_by_its_model(name):
    """Every case passes against the ggml-cpu model (jaxkv.verify's budget + the sharp check: 2 checks a
    case, not the f32 path's 1); F16 storage reaches ggml as float16; ggml-unfused never gets softcap or
    sinks drawn."""
    seen = []
    fn = _spy(T.make_target(name, 2), seen)
    prop, ctx, cs = _target_cases(fn)
    if name == "ggml-unfused":
        assert not any(c["softcap"] or c["sinks"] for c in cs)
    else:
        assert any(c["softcap"] for c in cs) and any(c["sinks"] for c in cs)
    outs = prop.evaluate(cs, ctx)
    assert all(o["ok"] and o["checks"] == 2 for o in outs), [o["error"] for o in outs if not o["ok"]]
    from fuzz.properties import _target_key as key

    order = [c for k in dict.fromkeys(map(key, cs)) for c in cs if key(c) == k]  # the runner's call order
    assert [(str(k), str(v)) for k, v in seen] == [
        ("float16" if c["k_fmt"] == "f16" else "float32", "float16" if c["v_fmt"] == "f16" else "float32")
        for c in order]
    assert any(c["k_fmt"] == "f16" for c in cs) and any(c["v_fmt"] != "f16" for c in cs)


def test_judge_equal_infinities_are_no_difference():
    """An F16 V accumulator overflowing (|V| ~1e4 over ~50 keys: found by `python -m fuzz --target
    ggml`) gives inf in ggml and in the model alike: no difference for the sharp check; an inf the model
    does not have is one (inf units)."""
    rng = np.random.default_rng(0)
    model = rng.standard_normal((1, 2, 2, 8))
    g = model.copy()
    model[0, 0, 0, 3] = np.inf
    r = E.judge(model.copy(), model, g, V.U16)
    assert r.ok and r.bitwise == 1.0 and r.emu_units == 0.0
    got = model.copy()
    got[0, 1, 1, 2] = np.inf
    r = E.judge(got, model, g, V.U16)
    assert not r.ok and r.emu_units == np.inf and "vs emulation" in r.why


def test_fuzz_target_property_finds_a_buggy_ggml_target():
    """fuzz.ggml_targets:buggy_q_f16 (live ggml on an F16-rounded query, claiming the honest model):
    found on F32 K and on the tiled path (n_q >= 64: q stays F32 there); with F16 K elsewhere ggml rounds
    the query so itself, and those cases pass."""
    prop, ctx, cs = _target_cases(T.buggy_q_f16)
    outs = prop.evaluate(cs, ctx)
    bad = [c for c, o in zip(cs, outs) if not o["ok"]]
    assert bad and all(c["k_fmt"] != "f16" or c["n_q"] >= 64 for c in bad)
    assert all("ggml-cpu model" in o["error"] for o in outs if not o["ok"])


def test_python_m_fuzz_target_ggml_with_threads(tmp_path):
    import json
    import subprocess

    out = tmp_path / "o"
    env = dict(os.environ, JAXKV_FUZZ_CACHE=str(tmp_path / "xla"))
    r = subprocess.run([sys.executable, "-m", "fuzz", "--target", "ggml-mixed", "--threads", "2",
                        "--max-examples", "4", "--out", str(out), "--quiet"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert recs[0]["type"] == "campaign" and recs[0]["target"] == "ggml-mixed" and recs[0]["threads"] == 2
    assert sum(x["type"] == "case" and x["ok"] for x in recs) == 4


# ----------------------------------------------------------------------------------------------------
# python -m fuzz record and the recorded traces

@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_recorded_trace_replays_and_matches_model(path):
    """Each shipped trace: live ggml on its stored inputs reproduces its out bit for bit, and so does the
    avx2 model; the producer names the ggml build."""
    t = TR.load(path)
    assert t.producer.startswith("ggml ") and f"n_threads={t.n_threads}" in t.producer
    assert V.resolve_precision(t) == "ggml-cpu"
    isa = t.metadata["ggml.isa"]
    kw = dict(scale=t.scale, mask=None if t.mask is None else np.asarray(t.mask), max_bias=t.max_bias,
              n_threads=t.n_threads)
    if t.op == "mixed_flash_attn":
        live = G.mixed_flash_attn(np.asarray(t.q), t.k_cold, t.v_cold, np.asarray(t.k_hot), np.asarray(t.v_hot),
                                  softcap=t.softcap, sinks=t.sinks, **kw)
        model = M.mixed_flash_attn(t.q, t.k_cold, t.v_cold, t.k_hot, t.v_hot, softcap=t.softcap,
                                   sinks=t.sinks, isa=isa, **kw)
    else:
        k, v = (x if hasattr(x, "raw") else np.asarray(x) for x in (t.k, t.v))
        live = G.flash_attn_ext(np.asarray(t.q), k, v, k_format=T._gfmt(k), v_format=T._gfmt(v),
                                softcap=t.softcap, sinks=t.sinks, **kw)
        model = M.flash_attn_ext(t.q, t.k, t.v, softcap=t.softcap, sinks=t.sinks, isa=isa, **kw)
    np.testing.assert_array_equal(live, np.asarray(t.out))
    np.testing.assert_array_equal(np.asarray(model), live)


def test_record_writes_a_trace(tmp_path):
    out = tmp_path / "r.gguf"
    argv = ["--op", "flash_attn_ext", "--k-format", "q8_0", "--v-format", "iq4_nl", "--n-q", "2", "--n-kv", "70",
            "--heads", "4", "--kv-heads", "1", "--head-dim", "32", "--mask", "window", "--softcap", "20",
            "--max-bias", "2", "--sinks", "--threads", "3", "--seed", "9", "--out", str(out)]
    assert record_cmd.main(argv) == 0
    t = TR.load(out)
    info = G.library_info()
    assert t.producer == f"ggml {info['version']} ({info['commit']}) CPU {info['isa']} n_threads=3"
    assert (t.types["k"], t.types["v"], t.n_threads, t.q.shape) == ("q8_0", "iq4_nl", 3, (1, 2, 4, 32))
    assert t.sinks is not None and t.mask is not None and t.softcap == 20.0 and t.max_bias == 2.0
    again = tmp_path / "s.gguf"
    assert record_cmd.main(argv[:-1] + [str(again)]) == 0
    assert np.array_equal(np.asarray(TR.load(again).out), np.asarray(t.out))  # seeded: same call, same out


@pytest.mark.parametrize("argv,field", [
    (["--op", "flash_attn"], "--op"),
    (["--op", "soft_max_attn", "--softcap", "3"], "--softcap"),
    (["--op", "soft_max_attn", "--v-format", "q8_0"], "--v-format"),
    (["--op", "mixed_flash_attn", "--k-format", "f16"], "--k-format"),
    (["--op", "mixed_flash_attn", "--k-format", "q8_0", "--v-format", "q8_0", "--n-cold", "999"], "--n-cold"),
    (["--op", "flash_attn_ext", "--n-cold", "3"], "--n-cold"),
    (["--op", "flash_attn_ext", "--heads", "6", "--kv-heads", "4"], "--kv-heads"),
    (["--op", "flash_attn_ext", "--max-bias", "2"], "--max-bias"),
    (["--op", "flash_attn_ext", "--threads", "0"], "--threads"),
    (["--op", "flash_attn_ext", "--k-format", "q4_0", "--head-dim", "40"], "--k-format"),
    (["--op", "flash_attn_ext", "--softcap", "nan"], "--softcap"),
    (["--op", "flash_attn_ext", "--n-kv", "x"], "--n-kv"),
])
def test_record_bad_arguments(tmp_path, argv, field):
    err = io.StringIO()
    out = tmp_path / "x.gguf"
    with redirect_stderr(err):
        rc = record_cmd.main(argv + ["--out", str(out)])
    msg = err.getvalue()
    assert rc == 2 and msg.count("\n") == 1 and field in msg and "Traceback" not in msg, msg
    assert not out.exists()


def test_python_m_fuzz_menu_target_runs_menu_cases_on_their_own_ops():
    """``--target ggml --menu ci`` (what ``python -m fuzz.ggml_campaign`` was): the target property draws
    menu cases, each run on the live target of the op it names and judged by the sharp check; the
    menu's one coverage table counts every op's calls."""
    from fuzz import campaign as Cm
    from fuzz.target_spec import load_target

    t = load_target("ggml", None, "ci")
    ctx = P.Context(seed=0, target=t, target_spec="ggml")
    prop = P.get("target")
    cs = Cm.generate(prop, ctx, 0, 0, 6)
    assert all(c["bucket"] in S.MENU_BUCKETS and c["op"] in T.TARGETS for c in cs)
    outs = prop.evaluate(cs, ctx)
    assert all(o["ok"] and o["checks"] == 2 for o in outs), [o["error"] for o in outs if not o["ok"]]
    assert sum(t.coverage.values()) == len(cs)
    assert {k[0] for k in t.coverage} == {T.OPS[c["op"]] for c in cs}
    with pytest.raises(ValueError, match="^--threads"):
        load_target("ggml", 2, "ci")
    with pytest.raises(ValueError, match="^--menu"):
        load_target("ggml", None, "huge")


@pytest.mark.parametrize("menu", sorted(S.MENUS))
def test_every_menu_draws_with_both_drawers(menu):
    """Every menu's cases draw from a numpy Generator and from hypothesis alike: no menu choice can be
    read as a drawing spec (the tiled menu's case kinds once started with 'float', a float spec)."""
    draw = S.rng_drawer(np.random.default_rng(0))
    cases = [S.draw_menu_case(draw, menu) for _ in range(40)]
    assert all(c["bucket"] in S.MENUS[menu]["buckets"] + S.MENUS[menu]["split_buckets"]
               + S.MENUS[menu]["float_buckets"] for c in cases)

    @settings(max_examples=10, deadline=None, database=None)
    @given(S.menu_case_strategy(menu))
    def check(c):
        assert c["bucket"] in S.MENUS[menu]["buckets"] + S.MENUS[menu]["split_buckets"] + S.MENUS[menu]["float_buckets"]

    check()

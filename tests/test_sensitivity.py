"""jaxkv.sensitivity and ``python -m fuzz sensitivity``: the sweep reproduces what the formats imply
(bits, block statistics, hot window, outliers), the first-order prediction, the per-channel split, the
mixed-cache semantics (against jaxkv.cache), sharding invariance and the CLI.

Trend assertions use 95% bootstrap confidence intervals over Monte-Carlo samples (paired where the
compared configurations share their samples), never single samples.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv  # noqa: F401  (x64)
from jaxkv import attention as att
from jaxkv import cache as kvcache
from jaxkv import sensitivity as sens

REPO = pathlib.Path(__file__).resolve().parent.parent

FMTS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
WINDOWS = (0, 32, 128, 256)
L, D, S = 256, 64, 48


@pytest.fixture(scope="module")
def sweep_results():
    """Per-sample metrics of a small sweep: {(fmt, dist): (group, per_sample)}; one shape for all groups
    (the attention stage compiles once)."""
    sw = sens.Sweep(format_pairs=sens.pairs_from(FMTS), hot_windows=WINDOWS, kv_lens=(L,), head_dims=(D,),
                    dists=("normal", "outliers"), samples=S, seed=1)
    mesh = sens.make_mesh(1)
    return {(g.k_format, g.dist): (g, sens.run_group(g, mesh=mesh)) for g in sw.groups()}


def _nmse(res, fmt, dist, w=0):
    g, ps = res[(fmt, dist)]
    return ps["nmse"][:, 0, g.hot_windows.index(w)]


def _ci(x):
    return sens.bootstrap_ci(x)


# ----------------------------------------------------------------------------------------------------
# what the formats imply


@pytest.mark.parametrize("dist", ["normal", "outliers"])
def test_error_falls_as_bits_rise(sweep_results, dist):
    """Q8_0 far below the 5-bit formats, 5-bit below 4-bit. The uniform-noise model gives the expected
    MSE ratios from the steps: Q8_0 (absmax/127) vs Q5_x (absmax/16, ~range/31) ~ 50-63x, one bit ~ 4x;
    the CIs of the means must separate by 20x and 1.5x (well inside the model, outside the noise)."""
    ci = {f: _ci(_nmse(sweep_results, f, dist)) for f in FMTS}
    for f5 in ("q5_0", "q5_1"):
        assert ci["q8_0"][1] * 20 < ci[f5][0], (f5, ci)
        for f4 in ("q4_0", "q4_1"):
            # same family (q5_0/q4_0, q5_1/q4_1): 1 bit ~ 4x, ask 2x. Across families only separation:
            # with K outliers the min+range formats gain ~2x (see the block-statistics test), so
            # q5_0 vs q4_1 is ~2x apart
            factor = 2.0 if f5[-1] == f4[-1] else 1.0
            assert ci[f5][1] * factor < ci[f4][0], (f5, f4, ci)


@pytest.mark.parametrize("dist", ["normal", "outliers"])
@pytest.mark.parametrize("pair", [("q4_0", "q4_1"), ("q5_0", "q5_1")])
def test_min_offset_formats_ordered_by_block_statistics(sweep_results, dist, pair):
    """Q4_1 vs Q4_0 (and Q5_1 vs Q5_0): the measured output error is ordered as the uniform-noise model
    of their block statistics predicts (step absmax/2^(b-1) vs (max-min)/(2^b-1)), evaluated on the very
    samples of the sweep; the paired CI of the difference must exclude 0."""
    a, b = pair
    g, _ = sweep_results[(a, dist)]
    key = sens._data_key(g.seed, dist, D)
    ks = jnp.asarray(sens.channel_scales(g.seed, D, dist))
    _, k, v = jax.jit(jax.vmap(lambda i: sens.draw(jax.random.fold_in(key, i), L, D, ks)))(jnp.arange(S))
    mk = {f: float(sens.block_noise_model(k, f)) for f in pair}
    mv = {f: float(sens.block_noise_model(v, f)) for f in pair}
    assert (mk[a] > mk[b]) == (mv[a] > mv[b])  # K and V agree: the prediction is unambiguous
    lo, hi = sens.paired_diff_ci(_nmse(sweep_results, a, dist), _nmse(sweep_results, b, dist))
    assert not lo <= 0.0 <= hi, (pair, dist, lo, hi)
    assert (lo > 0) == (mk[a] > mk[b]), (pair, dist, mk, mv, lo, hi)


def test_block_noise_model_tracks_round_trip_error(sweep_results):
    """The block-statistics model predicts each uniform format's K round-trip MSE within 25% (the
    uniform-noise approximation d^2/12 ignores F16 scale rounding and the clipped +7 side of Q4_0)."""
    for f in ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1"):
        g, ps = sweep_results[(f, "normal")]
        key = sens._data_key(g.seed, "normal", D)
        _, k, _ = sens.draw(jax.random.fold_in(key, 0), L, D, jnp.ones((D,), jnp.float32))
        model = float(sens.block_noise_model(k, f))
        measured = float(ps["k_qerr"][0, 0, 0])  # sample 0, W=0: the whole of k
        assert 0.75 < measured / model < 1.25, (f, measured, model)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("dist", ["normal", "outliers"])
def test_error_falls_with_hot_window_and_vanishes_when_it_covers_the_context(sweep_results, fmt, dist):
    g, ps = sweep_results[(fmt, dist)]
    x = ps["nmse"][:, 0, :]
    for j in range(len(WINDOWS) - 1):  # paired: same samples at every window
        lo, _ = sens.paired_diff_ci(x[:, j], x[:, j + 1])
        assert lo > 0, (fmt, dist, WINDOWS[j], WINDOWS[j + 1], lo)
    assert WINDOWS[-1] >= L
    for m in ("nmse", "max_abs", "pred_nmse", "k_qerr", "v_qerr"):
        assert np.all(ps[m][:, 0, -1] == 0.0), m       # nothing quantized: bitwise the reference
    assert np.all(ps["cos"][:, 0, -1] > 1 - 1e-15)     # |o|^2 rounding in the cosine only


def test_outliers_hurt_4bit_formats_most(sweep_results):
    """K outlier channels raise every format's error (CI separated); the absolute increase for each
    4-bit format is > 20x Q8_0's (CI bounds compared)."""
    inc = {}
    for f in FMTS:
        n, o = _nmse(sweep_results, f, "normal"), _nmse(sweep_results, f, "outliers")
        assert _ci(n)[1] < _ci(o)[0], f
        inc[f] = _ci(o - n)  # same sample index, different draws: still a valid CI of the mean difference
    for f4 in ("q4_0", "q4_1"):
        assert inc[f4][0] > 20 * inc["q8_0"][1], inc


# ----------------------------------------------------------------------------------------------------
# gradient-based view


@pytest.mark.parametrize("dist", ["normal", "outliers"])
def test_first_order_prediction_holds_for_q8_0(sweep_results, dist):
    """For Q8_0 the jvp predicts the measured error: mean predicted / mean measured NMSE within 2%, and
    the linearisation misses < 1% of the error energy per sample. Reason: the remainder is second order,
    relative size ~ the logit perturbation (RMS ~ |q| |dk| / sqrt(D) ~ 1e-2 for 8-bit blocks)."""
    g, ps = sweep_results[("q8_0", dist)]
    for j, w in enumerate(WINDOWS[:-1]):
        ratio = ps["pred_nmse"][:, 0, j].mean() / ps["nmse"][:, 0, j].mean()
        assert abs(ratio - 1) < 0.02, (w, ratio)
        assert ps["lin_resid"][:, 0, j].max() < 1e-2, (w, ps["lin_resid"][:, 0, j].max())


def test_first_order_prediction_degrades_for_4bit_with_outliers(sweep_results):
    """Where it stops holding: 4-bit blocks holding outliers perturb the logits by O(1), and the
    linearisation residual is > 10x Q8_0's (CI bounds compared)."""
    r8 = _ci(sweep_results[("q8_0", "outliers")][1]["lin_resid"][:, 0, 0])
    r4 = _ci(sweep_results[("q4_0", "outliers")][1]["lin_resid"][:, 0, 0])
    assert r4[0] > 10 * r8[1], (r4, r8)


def test_channel_terms_sum_to_the_jvp_and_find_outlier_blocks(sweep_results):
    """The per-channel split is exact (sum of channel terms == jax.jvp, relative 1e-20 in energy: f64
    rounding of D+Dv terms), and with K outliers the 32-channel blocks holding an outlier carry > 90% of
    the first-order error for 4-bit formats (their absmax/range sets every step in the block)."""
    for (f, dist), (g, ps) in sweep_results.items():
        assert np.max(ps["ch_check"]) < 1e-20, (f, dist)
    for f in ("q4_0", "q4_1"):
        g, ps = sweep_results[(f, "outliers")]
        rec = sens.rank_channels(g, ps)[0]
        blocks = {c // 32 for c in rec["outlier_channels"]}
        assert len(blocks) < D // 32  # the test needs an outlier-free block to compare against
        share = sum(s for c, s in enumerate(rec["k_share"]) if c // 32 in blocks)
        assert share > 0.9, (f, share, rec["top"])
        assert all(lab.startswith("K") and int(lab[1:]) // 32 in blocks for lab in rec["top"][:4])


# ----------------------------------------------------------------------------------------------------
# semantics


def test_mixed_outputs_match_the_mixed_cache_and_the_reference():
    """sample_outputs' mixed output for window W equals jaxkv.cache.attend over a MixedCache filled by
    append (K and V in different formats), and its reference equals attention(precision='f64'); both to
    1e-12 relative (f64 split-K vs one softmax: reassociated sums of <= 160 terms)."""
    n, d, ws = 160, 64, (0, 32, 96)
    key = jax.random.PRNGKey(3)
    ks = jnp.asarray(sens.channel_scales(0, d, "outliers"))
    q, k, v = sens.draw(key, n, d, ks)
    kq, vq = sens.roundtrip(k, "q4_0"), sens.roundtrip(v, "q8_0")
    res = jax.jit(lambda *a: sens.sample_outputs(*a, (n,), ws, channels=False))(q, k, v, kq, vq)
    out = np.asarray(res["out"][0])
    ref = np.asarray(att.attention(q[None, None, None], k[None, :, None], v[None, :, None],
                                   scale=1 / math.sqrt(d), precision="f64"))[0, 0, 0]
    tol = 1e-12 * np.max(np.abs(ref))
    np.testing.assert_allclose(out[-1], ref, rtol=0, atol=tol)
    for j, w in enumerate(ws):
        c = kvcache.init(1, 1, d, cap_cold=n - w, window=w, k_format="q4_0", v_format="q8_0")
        c = kvcache.append(c, k[None, :, None], v[None, :, None])
        got = np.asarray(kvcache.attend(c, q[None, None, None].astype(jnp.float64), scale=1 / math.sqrt(d),
                                        precision="f64"))[0, 0, 0]
        np.testing.assert_allclose(out[j], got, rtol=0, atol=tol, err_msg=f"W={w}")
        assert np.max(np.abs(out[j] - ref)) > 100 * tol  # the case is not trivially unquantized


def test_draws_are_f16_exact_with_fixed_outlier_channels():
    ks = sens.channel_scales(7, 128, "outliers")
    oc = sens.outlier_channels(7, 128, "outliers")
    assert len(oc) == 4 and np.all(ks[oc] == 10.0) and np.sum(ks != 1.0) == 4
    assert len(sens.outlier_channels(7, 128, "normal")) == 0
    q, k, v = sens.draw(jax.random.PRNGKey(0), 512, 128, jnp.asarray(ks))
    for x in (q, k, v):
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x.astype(jnp.float16).astype(jnp.float32)))
    big = np.std(np.asarray(k), axis=0)
    assert np.all(big[oc] > 5) and np.all(np.delete(big, oc) < 2)


def test_bootstrap_ci_covers_and_is_deterministic():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    lo, hi = sens.bootstrap_ci(x)
    assert (lo, hi) == sens.bootstrap_ci(x)
    assert lo < x.mean() < hi
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)        # normal-theory half width
    assert abs((hi - lo) / 2 - half) < 0.15 * half          # bootstrap vs t: same to ~10% at n=400


@pytest.mark.parametrize("kw, field", [
    (dict(format_pairs=(("q9_9", "q4_0"),)), "k_format"),
    (dict(format_pairs=(("q4_0", "q4_0"),), head_dims=(48,)), "head_dim"),
    (dict(format_pairs=(("q4_0", "q4_0"),), dists=("cauchy",)), "dist"),
    (dict(format_pairs=(("q4_0", "q4_0"),), samples=1), "samples"),
    (dict(format_pairs=(("q4_0", "q4_0"),), hot_windows=(-1,)), "hot_window"),
    (dict(format_pairs=(("q4_0", "q4_0"),), kv_lens=(0,)), "kv_len"),
])
def test_sweep_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        sens.Sweep(**kw)


# ----------------------------------------------------------------------------------------------------
# sharding

_SHARD_SCRIPT = r"""
import json, sys, numpy as np, jax
import jaxkv
from jaxkv import sensitivity as sens
assert len(jax.devices()) == 4, jax.devices()
g = sens.Group("iq4_nl", "q5_1", "outliers", 32, (48, 96), (0, 16, 96), 10, 5)  # scan-based quantizers
res = {n: sens.run_group(g, mesh=sens.make_mesh(n)) for n in (1, 2, 4)}
bitwise = all(np.array_equal(res[2][m], res[4][m]) for m in res[1])
rel = max(float(np.max(np.abs(res[n][m] - res[1][m]) / np.maximum(np.abs(res[1][m]), 1e-300)
                 * (res[1][m] != res[n][m]))) for n in (2, 4) for m in res[1] if m != "ch_check")
rows = {n: sens.summarize(g, res[n]) for n in (1, 4)}
srel = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300) for a, b in zip(rows[1], rows[4]) for k in a
           if isinstance(a[k], float) and a[k] == a[k])
print(json.dumps(dict(bitwise=bitwise, rel=rel, srel=srel, nmse=float(res[1]["nmse"].mean()))))
"""


def test_sharded_and_unsharded_runs_agree():
    """Same seed on 1 / 2 / 4 CPU devices (XLA_FLAGS in a subprocess; 10 samples, so batches are padded):
    2 and 4 devices agree bitwise; 1 device (a single-partition XLA program, which may associate f64
    reductions differently: observed <= 2 ulp) agrees to 1e-12 relative, per sample and in every summary
    statistic (the bootstrap is deterministic)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["bitwise"], out
    assert out["rel"] < 1e-12 and out["srel"] < 1e-12, out
    assert out["nmse"] > 0


# ----------------------------------------------------------------------------------------------------
# CLI

from fuzz import sensitivity_cmd  # noqa: E402

_SMALL = ["--formats", "q8_0,q4_0", "--kv-len", "64,128", "--head-dim", "32", "--hot-window", "0,16,128",
          "--samples", "6", "--seed", "2"]


@pytest.mark.parametrize("argv, needle", [
    (["--formats", "q4_7"], "q4_7"),
    (["--kv-len", "abc"], "--kv-len"),
    (["--samples", "1"], "samples"),
    (["--devices", "0"], "--devices"),
    (["--devices", "64"], "devices"),
    (["--head-dim", "48"], "head_dim"),
    (["--dist", "cauchy"], "dist"),
    (["--bogus"], "unrecognized"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    jax.devices()  # backend started: --devices cannot add CPU devices in-process any more
    rc = sensitivity_cmd.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_cli_module_entry_points_reject_bad_args_without_traceback():
    for mod in (["-m", "fuzz", "sensitivity"], ["-m", "fuzz.sensitivity_cmd"]):
        p = subprocess.run([sys.executable, *mod, "--hot-window", "x"], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert p.returncode == 2, (mod, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cli_writes_tables_plots_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert sensitivity_cmd.main(_SMALL + ["--out", str(out), "--k-format", "q4_0", "--v-format", "q8_0,f16"]) == 0
    cap = capsys.readouterr()
    assert "NMSE mean" in cap.out
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    # 2 format pairs x 2 kv_len x 3 windows x 1 head_dim x 2 dists
    assert len(rows) == 24 and len((out / "results.csv").read_text().splitlines()) == 25
    for r in rows:
        for f in ("k_format", "v_format", "hot_window", "kv_len", "head_dim", "dist", "samples", "seed",
                  "nmse_mean", "nmse_p95", "nmse_ci_lo", "nmse_ci_hi", "pred_ratio", "cos_mean"):
            assert f in r
        assert r["nmse_ci_lo"] <= r["nmse_mean"] <= r["nmse_ci_hi"]
        if r["hot_window"] >= r["kv_len"]:
            assert r["nmse_mean"] == 0.0
    assert {(r["k_format"], r["v_format"]) for r in rows} == {("q4_0", "q8_0"), ("q4_0", "f16")}
    for png in ("error_vs_window.png", "heatmap.png", "channels.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ch = json.loads((out / "channels.json").read_text())["channels"]
    assert len(ch) == 2 * 2 * 2 and all(len(c["k"]) == 32 for c in ch)

    # interrupted run: drop the last group's rows, resume, get the same table
    jl = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(jl[:-6]) + "\n" + jl[-6][:20])  # and a cut line
    assert sensitivity_cmd.main(_SMALL + ["--out", str(out), "--k-format", "q4_0", "--v-format", "q8_0,f16",
                                          "--resume", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "(3 already done)" in err and "[1/1]" in err, err
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    assert [r["nmse_mean"] for r in again] == [r["nmse_mean"] for r in rows]

    # the same --out without --resume or --overwrite is refused (earlier results are never deleted)
    before = (out / "results.jsonl").read_bytes()
    assert sensitivity_cmd.main(_SMALL + ["--out", str(out), "--k-format", "q4_0", "--v-format", "q8_0,f16",
                                          "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "results.jsonl").read_bytes() == before

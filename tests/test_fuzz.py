"""python -m fuzz end to end (subprocesses): campaigns, a buggy target found / shrunk / saved / replayed,
crash safety (SIGKILL + --resume), --list, bad arguments, --shard, reproducibility, multi-device.

Every subprocess shares one persistent XLA compilation cache (JAXKV_FUZZ_CACHE, per test session), so a
program compiled by one campaign is loaded, not recompiled, by the next.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

PY = sys.executable


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["JAXKV_FUZZ_CACHE"] = str(tmp_path_factory.mktemp("xla-cache"))
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("XLA_FLAGS", None)
    return e


def fuzz(env, *args, timeout=240, **kw):
    return subprocess.run([PY, "-m", "fuzz", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def cases(out):
    recs = [json.loads(x) for x in (pathlib.Path(out) / "results.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r["type"] == "case"]


def test_list(env):
    r = fuzz(env, "--list")
    assert r.returncode == 0, r.stderr
    for name in ("dequantize", "quantize", "split_k", "online", "merge_laws", "gqa", "masked_rows",
                 "large_logits", "mixed_cache", "cache_append", "layout", "trace_roundtrip",
                 "trace_robustness", "traces", "target"):
        assert any(line.split()[0] == name for line in r.stdout.splitlines()), name


@pytest.mark.parametrize("args", [
    ["--shard", "2/2"], ["--shard", "x"], ["--max-examples", "many"], ["--properties", "nope"],
    ["--target", "no_such_module_xyz:f"], ["--target", "fuzz.targets:no_such_fn"], ["--traces", "/no/such/dir"],
    ["--max-examples", "3", "--time-budget", "5"], ["--bogus"], ["replay", "/no/such/file.json"],
    ["merge", "/no/such/dir"], ["replay"], ["--threads", "2"], ["--target", "ggml", "--threads", "0"],
    ["--target", "fuzz.targets:flash_decode", "--threads", "2"], ["--target", "ggml-gpu"],
])
def test_bad_args_exit_2_without_traceback(env, args, tmp_path):
    r = fuzz(env, *args, "--out", str(tmp_path)) if args[0] not in ("replay", "merge") else fuzz(env, *args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ggml_target_without_the_extra_is_one_line_exit_2(env, tmp_path):
    """No loadable ggml (JAXKV_GGML_LIB_DIR pointing nowhere stands in for a missing libggml-python);
    the three names take one code path (fuzz.__main__.load_target)."""
    name = "ggml-unfused"
    e = dict(env, JAXKV_GGML_LIB_DIR=str(tmp_path / "no-ggml"))
    r = fuzz(e, "--target", name, "--threads", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--target {name}" in r.stderr and "ggml" in r.stderr


def test_help_names_the_ggml_targets_and_threads(env):
    r = fuzz(env, "--help")
    assert r.returncode == 0
    assert "ggml|ggml-unfused|ggml-mixed" in r.stdout and "--threads N" in r.stdout


def test_small_campaign_end_to_end(env, tmp_path):
    out = tmp_path / "o"
    props = ("dequantize", "layout", "trace_roundtrip")  # cheap to compile; attention: the target test
    r = fuzz(env, "--max-examples", "5", "--properties", ",".join(props), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    cs = cases(out)
    assert sorted({c["property"] for c in cs}) == sorted(props)
    assert all(sum(c["property"] == p for c in cs) == 5 for p in props)
    assert all(c["ok"] for c in cs)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["property", "cases", "failures", "checks", "checks/s", "compiled", "programs"]
    row = next(x for x in lines if x.startswith("dequantize")).split()
    assert row[1:3] == ["5", "0"]


def test_buggy_target_found_shrunk_saved_replayed(env, tmp_path):
    out = tmp_path / "o"
    r = fuzz(env, "--max-examples", "16", "--properties", "target", "--target",
             "fuzz.targets:buggy_scale_twice", "--out", str(out), "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr
    fails = sorted((out / "failures").glob("*.json"))
    assert len(fails) == 1
    rec = json.loads(fails[0].read_text())
    assert rec["property"] == "target" and rec["target"] == "fuzz.targets:buggy_scale_twice"
    # shrunk: hypothesis minimised the failing parameters (a scale of exactly 1 would hide this bug)
    p = rec["params"]
    assert p["n_kv"] <= rec["original"]["n_kv"] and p["B"] == 1
    assert rec["arrays"].endswith((".gguf", ".npz")) and pathlib.Path(rec["arrays"]).is_file()
    assert rec["replay"] == f"python -m fuzz replay {fails[0]} --target fuzz.targets:buggy_scale_twice"
    labels = [d["hypothesis"] for d in (rec["diagnosis"] or {}).get("diagnosis") or []]
    assert "scale" in " ".join(labels), rec["diagnosis"]
    # replay never imports the kernel a record names: without --target it refuses in one line
    r0 = fuzz(env, "replay", str(fails[0]))
    assert r0.returncode == 2 and "--target" in r0.stderr and len(r0.stderr.splitlines()) == 1, r0.stderr
    r2 = fuzz(env, "replay", str(fails[0]), "--target", "fuzz.targets:buggy_scale_twice")
    assert r2.returncode == 1, r2.stdout + r2.stderr
    assert r2.stdout.startswith("FAIL target")
    # the replayed case passes against a correct kernel: replay exits 0
    r3 = fuzz(env, "replay", str(fails[0]), "--target", "fuzz.targets:numpy_attention")
    assert r3.returncode == 0, r3.stdout + r3.stderr


def test_same_seed_same_cases_and_verdicts(env, tmp_path):
    args = ["--max-examples", "40", "--properties", "layout,trace_roundtrip,dequantize"]
    r1 = fuzz(env, *args, "--seed", "7", "--out", str(tmp_path / "a"))
    r2 = fuzz(env, *args, "--seed", "7", "--out", str(tmp_path / "b"))
    r3 = fuzz(env, *args, "--seed", "8", "--out", str(tmp_path / "c"))
    assert r1.returncode == r2.returncode == r3.returncode == 0, r1.stderr + r2.stderr + r3.stderr
    key = [(c["id"], json.dumps(c["params"], sort_keys=True), c["ok"], c["error"]) for c in cases(tmp_path / "a")]
    assert key == [(c["id"], json.dumps(c["params"], sort_keys=True), c["ok"], c["error"])
                   for c in cases(tmp_path / "b")]
    other = [json.dumps(c["params"], sort_keys=True) for c in cases(tmp_path / "c")]
    assert other != [k[1] for k in key]


def test_shards_are_disjoint_and_merge(env, tmp_path):
    args = ["--max-examples", "50", "--properties", "layout,trace_roundtrip"]
    full = fuzz(env, *args, "--out", str(tmp_path / "full"))
    s0 = fuzz(env, *args, "--shard", "0/2", "--out", str(tmp_path / "s0"))
    s1 = fuzz(env, *args, "--shard", "1/2", "--out", str(tmp_path / "s1"))
    assert full.returncode == s0.returncode == s1.returncode == 0
    a = {c["id"]: c["params"] for c in cases(tmp_path / "s0")}
    b = {c["id"]: c["params"] for c in cases(tmp_path / "s1")}
    f = {c["id"]: c["params"] for c in cases(tmp_path / "full")}
    assert a and b and not set(a) & set(b)
    assert {**a, **b} == f
    m = fuzz(env, "merge", str(tmp_path / "s0"), str(tmp_path / "s1"))
    assert m.returncode == 0, m.stderr
    row = next(x for x in m.stdout.splitlines() if x.startswith("layout")).split()
    assert row[1] == "50"


def test_sigkill_then_resume_every_case_once(env, tmp_path):
    out = tmp_path / "o"
    args = ["--max-examples", "1000", "--properties", "trace_robustness", "--out", str(out), "--quiet"]
    p = subprocess.Popen([PY, "-m", "fuzz", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    res = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if res.exists() and sum('"type": "case"' in x for x in res.read_text().splitlines()) >= 40:
            break
        time.sleep(0.05)
    assert p.poll() is None, "campaign finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = cases(out)
    assert 40 <= len(before) < 1000
    r = fuzz(env, *args, "--resume")
    assert r.returncode == 0, r.stderr
    after = cases(out)
    ids = [c["id"] for c in after]
    assert len(ids) == len(set(ids)) == 1000  # every case exactly once: nothing lost, nothing redone
    assert [c["id"] for c in after[:len(before)]] == [c["id"] for c in before]
    row = next(x for x in r.stdout.splitlines() if x.startswith("trace_robustness")).split()
    assert row[1] == "1000"


SLOW_TARGET = """
import os, time
import numpy as np
from fuzz.targets import numpy_attention


def f(q, k, v, **kw):
    if isinstance(q, np.ndarray):  # a real call (not the campaign's tracing probe): log it, then work
        with open(os.environ["FUZZ_CALL_LOG"], "a") as log:
            log.write("call\\n")
        time.sleep(0.01)
    return numpy_attention(q, k, v, **kw)
"""


def test_sigkill_loses_at_most_the_case_in_flight(env, tmp_path):
    """A per-case target (numpy, not vmapped): each verdict is written when known, so a SIGKILL at any
    moment leaves at most one started case unrecorded, and --resume redoes exactly that one."""
    (tmp_path / "slow_target.py").write_text(SLOW_TARGET)
    log = tmp_path / "calls.log"
    e = dict(env, PYTHONPATH=str(tmp_path) + os.pathsep + env["PYTHONPATH"], FUZZ_CALL_LOG=str(log))
    out = tmp_path / "o"
    n = 120
    args = ["--max-examples", str(n), "--target", "slow_target:f", "--out", str(out), "--quiet"]
    p = subprocess.Popen([PY, "-m", "fuzz", *args], cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    res = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if res.exists() and sum('"type": "case"' in x for x in res.read_text().splitlines()) >= 45:
            break
        time.sleep(0.01)
    assert p.poll() is None, "campaign finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    started, recorded = len(log.read_text().splitlines()), len(cases(out))
    assert 45 <= recorded < n
    assert recorded <= started <= recorded + 1  # lost: at most the case in flight
    r = fuzz(e, *args, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [c["id"] for c in cases(out)]
    assert len(ids) == len(set(ids)) == n  # nothing missing, nothing twice
    assert len(log.read_text().splitlines()) == n + (started - recorded)  # only the lost case redone


def _sometimes_failing():
    """A cheap host-side property failing on x % 7 == 3 (several failures per chunk of 64 cases)."""
    from hypothesis import strategies as st

    from fuzz import properties as P

    def check(c):
        bad = c["x"] % 7 == 3
        return P._outcome(not bad, 1, f"x = {c['x']}" if bad else None)

    return P.Property("sometimes_fails", "test property", lambda ctx: st.fixed_dictionaries(
        {"x": st.integers(0, 10**6)}), P.each_case(check), batch=1)


def test_resume_after_a_kill_anywhere_matches_the_uninterrupted_campaign(tmp_path, monkeypatch):
    """Cut a finished campaign's results.jsonl anywhere (with a partial last line, as a kill in the
    middle of a write leaves it) and --resume: the same cases exactly once, the failing property still
    stops after its first failing chunk, its failure shrunk and saved exactly once."""
    from fuzz import properties as P
    from fuzz.campaign import CHUNK, Campaign, Options, read_records, summarize

    prop = _sometimes_failing()
    monkeypatch.setitem(P.PROPERTIES, prop.name, prop)

    def run(out, resume=False):
        opts = Options(max_examples=3 * CHUNK, seed=1, properties=(prop.name, "layout"), out=str(out),
                       resume=resume, quiet=True)
        return Campaign(opts, P.Context(seed=1)).run()

    full = tmp_path / "full"
    assert run(full) == 1
    ref = read_records(full / "results.jsonl")
    ref_ids = sorted(r["id"] for r in ref if r["type"] == "case")
    ref_fail = [(r["id"], r["error"]) for r in ref if r["type"] == "failure"]
    assert len(ref_fail) == 1
    assert sum(i.startswith(prop.name) for i in ref_ids) == CHUNK  # stopped after the failing chunk
    assert sum(i.startswith("layout") for i in ref_ids) == 3 * CHUNK
    lines = (full / "results.jsonl").read_bytes().splitlines(keepends=True)
    kinds = [json.loads(x)["type"] for x in lines]
    first_case = kinds.index("case")
    cuts = [first_case, first_case + 5,  # before / after the first failing case
            kinds.index("failure") - 1,  # every case of the failing property, failure not yet saved
            kinds.index("failure") + 30]  # inside the next property
    for cut in cuts:
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "results.jsonl").write_bytes(b"".join(lines[:cut]) + lines[cut][:25])
        assert run(d, resume=True) == 1
        got = read_records(d / "results.jsonl")
        ids = [r["id"] for r in got if r["type"] == "case"]
        assert len(ids) == len(set(ids)) and sorted(ids) == ref_ids, cut
        assert [(r["id"], r["error"]) for r in got if r["type"] == "failure"] == ref_fail, cut
        s, s_ref = summarize(got), summarize(ref)
        assert {k: (v["cases"], v["failures"]) for k, v in s.items()} == \
               {k: (v["cases"], v["failures"]) for k, v in s_ref.items()}
        assert all(v["seconds"] > 0 for v in s.values())


def test_ctrl_c_writes_summary_exit_130(env, tmp_path):
    out = tmp_path / "o"
    p = subprocess.Popen([PY, "-m", "fuzz", "--max-examples", "5000", "--properties", "trace_robustness",
                          "--out", str(out), "--quiet"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    res = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if res.exists() and sum('"type": "case"' in x for x in res.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    row = next(x for x in stdout.splitlines() if x.startswith("trace_robustness")).split()
    assert int(row[1]) == len(cases(out)) >= 10


def test_time_budget(env, tmp_path):
    r = fuzz(env, "--time-budget", "2", "--properties", "layout", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert len(cases(tmp_path)) >= 64


def test_devices_shard_batches(env, tmp_path):
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = ("import jax, numpy as np, jaxkv\n"
            "from fuzz import properties as P, campaign as C\n"
            "assert jax.device_count() == 2\n"
            "ctx = P.Context()\n"
            "p = P.get('dequantize')\n"
            "cs = C.generate(p, ctx, 0, 0, 40)\n"
            "o = p.evaluate(cs, ctx)\n"
            "assert len(o) == 40 and all(x['ok'] for x in o), o\n"
            "assert P._dequant_batched.last_devices == 2\n"
            "print('ok', jax.device_count())\n")
    r = subprocess.run([PY, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "ok 2" in r.stdout, r.stderr[-2000:]


def test_shards_partition_the_campaign_whatever_fails(tmp_path, monkeypatch):
    """Shards of a campaign in which a property fails rarely (so shards meet their own first failure in
    different chunks) merge (fuzz.campaign.partition_view) into exactly the unsharded campaign: the
    same case ids with the same verdicts, the same failure record."""
    from hypothesis import strategies as st

    from fuzz import properties as P
    from fuzz.campaign import CHUNK, Campaign, Options, partition_view, read_records, summarize

    def check(c):
        bad = c["x"] % 61 == 5
        return P._outcome(not bad, 1, f"x = {c['x']}" if bad else None)

    prop = P.Property("rarely_fails", "test property", lambda ctx: st.fixed_dictionaries(
        {"x": st.integers(0, 10**6)}), P.each_case(check), batch=1)
    monkeypatch.setitem(P.PROPERTIES, prop.name, prop)

    def run(out, shard=(0, 1)):
        opts = Options(max_examples=8 * CHUNK, seed=3, properties=(prop.name,), out=str(out), quiet=True,
                       shard=shard, shrink=False)
        Campaign(opts, P.Context(seed=3)).run()
        return read_records(out / "results.jsonl")

    def view(recs):
        recs = partition_view(recs)
        return (sorted((r["id"], r["ok"]) for r in recs if r["type"] == "case"),
                sorted(r["id"] for r in recs if r["type"] == "failure"))

    full = run(tmp_path / "full")
    shards = [run(tmp_path / f"s{i}", (i, 3)) for i in range(3)]
    merged = [r for s in shards for r in s]
    ids_full = {r["id"] for r in full if r["type"] == "case"}
    ids_union = {r["id"] for r in merged if r["type"] == "case"}
    assert ids_union > ids_full  # some shard ran past the campaign's first failing chunk: the test bites
    assert view(merged) == view(full)
    s, s_ref = summarize(partition_view(merged)), summarize(full)
    assert {k: (v["cases"], v["failures"]) for k, v in s.items()} == \
           {k: (v["cases"], v["failures"]) for k, v in s_ref.items()}


def test_cases_do_not_depend_on_what_the_process_imported(tmp_path):
    """A chunk's cases are a function of (seed, property, chunk). Hypothesis also draws from constants it
    harvests from the local modules loaded so far, so without fuzz.campaign pinning that pool, importing
    jaxkv.verify.diagnose (as a first failure's diagnosis does) changed the cases drawn afterwards under the same
    ids -- and shards, whose first failures come at different points, drew different cases. Run in a
    fresh interpreter (a test suite has imported everything already); the modules imported mid-draw are
    ones ``fuzz.properties`` does not load (jaxkv.verify is imported with it now)."""
    code = (
        "import json, sys, importlib\n"
        "from fuzz import properties as P\n"
        "from fuzz.campaign import generate\n"
        "ctx = P.Context(seed=7)\n"
        "draw = lambda: [generate(P.get(n), ctx, 7, j) for n in ('large_logits', 'layout') for j in (0, 1)]\n"
        "before = draw()\n"
        "new = [m for m in ('jaxkv.capture', 'jaxkv.realstudy', 'jaxkv.sensitivity', 'fuzz.ggml_targets') "
        "if m not in sys.modules]\n"
        "for m in new: importlib.import_module(m)\n"
        "print(json.dumps(dict(new=new, same=draw() == before)))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"jaxkv.capture", "jaxkv.realstudy", "jaxkv.sensitivity"} <= set(got["new"]) and got["same"], got

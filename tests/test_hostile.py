"""Every CLI entry point over the hostile-input corpus (tests/hostile_corpus.py; issue 14).

Each invocation runs inside one driver subprocess per entry point (python startup and jax import paid
once) under an address-space limit (RLIMIT_AS 4 GiB) and a per-invocation alarm. An invocation passes
when it returns exit status 0, 1 or 2 (no exception escapes ``main``: the ``python -m`` wrappers are
``sys.exit(main())``, so an escaping exception is a traceback), writes at most one stderr line per bad
input, no ``Traceback``, no raw control characters (terminal escapes) on stdout or stderr, and finishes
within its time limit; an invocation ending in exit 2 (bad input) writes at most one stderr line per
input (a run that proceeds may print its progress there). The default (ci) profile runs a representative subset; ``HYPOTHESIS_PROFILE=fuzz``
(or ``JAXKV_HOSTILE_FULL=1``) the whole corpus (>= 300 files). A few invocations also run as real
``python -m`` subprocesses, to cover the wrappers themselves.

    python tests/test_hostile.py --drive PLAN.json RESULTS.jsonl     (the driver; used by the tests)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
#: the code under test (default this checkout; JAXKV_HOSTILE_CODE=/other/checkout for a before/after figure)
CODE = pathlib.Path(os.environ.get("JAXKV_HOSTILE_CODE", REPO))
AS_LIMIT = 4 << 30
#: seconds one invocation may take (jax compiles of a small verify included) and a whole driver run
CALL_LIMIT = 30
FULL = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" or os.environ.get("JAXKV_HOSTILE_FULL") == "1"
#: raw control characters other than newline and tab, DEL, the C1 CSI, and bidi overrides
_CTRL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x9b\u202a-\u202e\u2066-\u2069]")


# ----------------------------------------------------------------------------------------------------
# the driver (runs in the subprocess)

def _drive(plan_path: str, out_path: str) -> None:
    import io
    import resource
    import signal
    import warnings  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    sys.path.insert(0, str(CODE))
    plan = json.loads(pathlib.Path(plan_path).read_text())

    class Alarm(BaseException):
        pass

    def on_alarm(signum, frame):
        raise Alarm()

    signal.signal(signal.SIGALRM, on_alarm)
    with open(out_path, "a") as log:
        for item in plan:
            log.write(json.dumps({"id": item["id"], "started": True}) + "\n")
            log.flush()
            if item["entry"] == "fuzz":
                from fuzz.__main__ import main
            else:
                from jaxkv.oracles.ggml_replay import main
            out, err = io.StringIO(), io.StringIO()
            old = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err
            exc, rc = None, None
            t0 = time.perf_counter()
            signal.alarm(item.get("timeout", CALL_LIMIT))
            try:
                rc = main(list(item["argv"]))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Alarm:
                exc = "timeout"
            except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
                exc = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                signal.alarm(0)
                sys.stdout, sys.stderr = old
            log.write(json.dumps({"id": item["id"], "rc": rc, "exc": exc, "stdout": out.getvalue()[-4000:],
                                  "stderr": err.getvalue()[-4000:], "seconds": time.perf_counter() - t0,
                                  "inputs": item.get("inputs", 1), "quiet": item.get("quiet", False),
                                  "timeout": item.get("timeout", CALL_LIMIT),
                                  "codes": item.get("codes", (0, 1, 2))}) + "\n")
            log.flush()


def run_plan(plan: list, tmp: pathlib.Path, total_timeout: float, cwd: pathlib.Path | None = None) -> list:
    """Run ``plan`` in a driver subprocess (working directory ``cwd``, default ``tmp``) -> one result dict
    per invocation (a crashed or killed driver leaves the invocation it was running reported as such, and
    the rest unrun)."""
    tmp.mkdir(parents=True, exist_ok=True)
    pp, rp = tmp / "plan.json", tmp / "results.jsonl"
    pp.write_text(json.dumps(plan))
    if rp.exists():
        rp.unlink()
    env = dict(os.environ, PYTHONPATH=str(CODE), JAX_PLATFORMS="cpu", PYTHONWARNINGS="default")
    try:
        p = subprocess.run([sys.executable, __file__, "--drive", str(pp), str(rp)], env=env, cwd=cwd or tmp,
                           capture_output=True, text=True, timeout=total_timeout)
        tail = p.stderr[-2000:]
    except subprocess.TimeoutExpired:
        tail = "driver timed out"
    res, started = {}, None
    if rp.exists():
        for line in rp.read_text().splitlines():
            r = json.loads(line)
            if r.get("started"):
                started = r["id"]
            else:
                res[r["id"]] = r
                started = None
    out = []
    for item in plan:
        if item["id"] in res:
            out.append(res[item["id"]])
        elif item["id"] == started:
            out.append({"id": item["id"], "rc": None, "exc": f"driver died here: {tail}", "stdout": "",
                        "stderr": "", "seconds": 0.0, "inputs": 1})
    return out


def problems(r: dict) -> list[str]:
    """What is wrong with one invocation's result (empty: it behaved)."""
    bad = []
    if r["exc"]:
        bad.append(f"exception escaped: {r['exc']}")
    if r["rc"] not in r.get("codes", (0, 1, 2)):
        bad.append(f"exit status {r['rc']!r}")
    if "Traceback" in r["stderr"] or "Traceback" in r["stdout"]:
        bad.append("a traceback was printed")
    n_err = len([x for x in r["stderr"].splitlines() if x.strip()])
    if r.get("quiet") and n_err:
        bad.append(f"stderr not empty: {r['stderr'][:300]!r}")
    if r["rc"] == 2 and n_err > r.get("inputs", 1):  # bad input: one line each (a run's progress may be more)
        bad.append(f"{n_err} stderr lines: {r['stderr'][:300]!r}")
    for stream in ("stdout", "stderr"):
        m = _CTRL.search(r[stream])
        if m:
            bad.append(f"raw control character {m.group()!r} on {stream}")
    if r["seconds"] > r.get("timeout", CALL_LIMIT):
        bad.append(f"took {r['seconds']:.0f} s")
    return bad


# ----------------------------------------------------------------------------------------------------
# plans

def _plans(c, tmp: pathlib.Path) -> dict:
    """entry-point group -> list of invocations over corpus ``c``."""
    fz = lambda i, argv, **kw: dict(id=i, entry="fuzz", argv=[str(a) for a in argv], **kw)  # noqa: E731
    traces = [str(p) for p in c.traces] + [str(p) for p in c.special]
    v3 = (0, 1, 2, 3)  # verify's 3: undecided (jaxkv.verify.EXIT_CODES)
    verify = [fz(f"verify {pathlib.Path(t).name[:60]}", ["verify", t], codes=v3) for t in traces]
    # --json: verdicts (errors included) are JSON on stdout; nothing (no numpy RuntimeWarning) on stderr
    verify.append(fz("verify --json batch", ["verify", "--json"] + traces, inputs=0, quiet=True,
                         timeout=300, codes=v3))
    ggml_replay = [dict(id=f"ggml_replay {pathlib.Path(t).name[:60]}", entry="ggml_replay", argv=[t])
                   for t in traces]
    replay = [fz(f"replay {p.name}", ["replay", p]) for p in c.records]
    replay += [fz(f"replay special {p.name[:40]}", ["replay", p]) for p in c.special]
    replay.append(fz("replay evil with --target", ["replay", c.root / "records" / "target_evil.json",
                                                   "--target", "ggml"]))
    merge = [fz(f"merge {d.name}", ["merge", d]) for d in c.results + c.fifo_results]
    merge += [fz(f"merge special {p.name[:40]}", ["merge", p]) for p in c.special]
    out = tmp / "outs"
    (out / "nonempty").mkdir(parents=True, exist_ok=True)
    (out / "nonempty" / "results.jsonl").write_text('{"type": "campaign", "seed": 0}\n')
    (out / "afile").write_text("x")
    small = ["--properties", "layout", "--max-examples", "2", "--quiet", "--compile-cache", "off"]
    campaign = [fz(f"resume {d.name}", small + ["--resume", "--out", d], inputs=1)
                for d in c.results + c.fifo_results]
    campaign += [fz(f"campaign --out {name}", small + ["--out", o]) for name, o in (
        ("file", out / "afile"), ("/dev/null", "/dev/null"), ("missing parent", out / "no" / "such" / "dir"),
        ("long name", out / ("n" * 300)), ("nonempty", out / "nonempty"))]
    campaign += [fz(f"campaign --traces {p.name[:40]}", ["--traces", p, "--quiet", "--compile-cache", "off",
                                                         "--out", out / f"tr{i}"])
                 for i, p in enumerate(c.special[:4] + c.traces[:1])]
    campaign += [fz("campaign --properties ''", ["--properties", ",", "--out", out / "e"]),
                 fz("campaign --shard 3/2", ["--shard", "3/2", "--out", out / "e"]),
                 fz("campaign --target evil", ["--target", "\x1b[31mnosuchmod:f", "--out", out / "e"])]
    sens = [fz(f"sensitivity {' '.join(map(str, a))[:60]}", ["sensitivity", "--no-plot", "--out", out / "s"] + a) for a in (
        ["--formats", ""], ["--kv-len", "1000000000", "--samples", "1000000000"], ["--head-dim", "1000000"],
        ["--samples", "1"], ["--kv-len", "-5"], ["--hot-window", "99999999999"], ["--formats", "\x1b[31m"],
        ["--devices", "0"])]
    sens.append(fz("sensitivity --resume FIFO", ["sensitivity", "--no-plot", "--resume", "--out",
                                                 c.fifo_results[0], "--formats", "q8_0", "--kv-len", "64",
                                                 "--head-dim", "32", "--hot-window", "0", "--dist", "normal",
                                                 "--samples", "2"]))
    sens.append(fz("sensitivity --out /dev/null", ["sensitivity", "--no-plot", "--out", "/dev/null",
                                                   "--formats", "q8_0", "--kv-len", "64", "--head-dim", "32",
                                                   "--hot-window", "0", "--dist", "normal", "--samples", "2"]))
    record = [fz(f"record {' '.join(map(str, a))[:60]}", ["record", "--op", "flash_attn_ext"] + a) for a in (
        ["--out", "/dev/null"], ["--out", out / "no" / "such" / "x.gguf"], ["--out", out / ("n" * 300)],
        ["--out", out / "r.gguf", "--n-kv", "1000000000"], ["--out", out / "r.gguf", "--heads", "0"],
        ["--out", out])]
    capture = [fz(f"capture --model {pathlib.Path(m).name[:40]}", ["capture", "--model", m, "--prompt", "hi",
                                                                   "--out", out / "cap", "--n-predict", "1"])
               for m in [str(p) for p in c.special] + [str(p) for p in c.traces[:3]]]
    capture.append(fz("capture --out /dev/null", ["capture", "--model", c.traces[0], "--prompt", "hi", "--out",
                                                  "/dev/null"]))
    return dict(verify=verify, ggml_replay=ggml_replay, replay=replay, merge=merge, campaign=campaign,
                sensitivity=sens, record=record, capture=capture)


# ----------------------------------------------------------------------------------------------------
# tests

import pytest  # noqa: E402

sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import hostile_corpus

    return hostile_corpus.build(tmp_path_factory.mktemp("hostile"), full=FULL)


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    import hostile_corpus

    tmp = tmp_path_factory.mktemp("drive")
    marker = tmp / "evil_was_imported"
    # the evil module: importing it writes the marker (a replay record names it as its target)
    (tmp / f"{hostile_corpus.EVIL_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\ndef f(*a, **k):\n    "
        f"pathlib.Path({str(marker)!r}).write_text('called')\n")
    plans = _plans(corpus, tmp)
    out = {}
    for name, plan in plans.items():
        # working directory: where the evil module lies (an import of the record's target would find it)
        out[name] = run_plan(plan, tmp / name, total_timeout=sum(i.get("timeout", CALL_LIMIT) for i in plan) + 60,
                             cwd=tmp)
    return out, marker, plans


def test_corpus_size(corpus):
    """The fuzz profile's corpus holds >= 300 hostile files; the ci subset is representative."""
    n = corpus.count()
    assert n >= (300 if FULL else 100), n


@pytest.mark.parametrize("entry", ["verify", "ggml_replay", "replay", "merge", "campaign", "sensitivity",
                                   "record", "capture"])
def test_entry_point_survives_corpus(results, entry):
    res, _, plans = results
    got = res[entry]
    bad = [f"{r['id']!r}: {'; '.join(problems(r))}" for r in got if problems(r)]
    missing = len(plans[entry]) - len(got)
    assert not bad and not missing, (f"{len(bad)} of {len(plans[entry])} invocations misbehaved, {missing} "
                                     f"never ran:\n" + "\n".join(bad[:40]))


def test_replay_never_imports_the_records_target(results):
    """A record naming a module as its target: replay refuses without --target (one line, exit 2), the
    module is never imported (its import would write the marker file), its name is shown escaped."""
    res, marker, _ = results
    by = {r["id"]: r for r in res["replay"]}
    r = by["replay target_evil.json"]
    assert r["rc"] == 2 and "--target" in r["stderr"], r
    assert not marker.exists(), marker.read_text()
    esc = by["replay target_escape.json"]
    assert esc["rc"] == 2 and "\\x1b" in esc["stderr"], esc


def test_python_m_wrappers(corpus, tmp_path):
    """The real ``python -m`` entry points on a few hostile inputs: exit 0/1/2, one stderr line, no
    traceback (covers what the in-process driver does not: the module wrappers)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    env = dict(os.environ, PYTHONPATH=str(CODE), JAX_PLATFORMS="cpu")
    t = corpus.root / "traces"
    for argv in (["-m", "fuzz", "replay", corpus.root / "records" / "list.json"],
                 ["-m", "fuzz", "merge", corpus.results[0]],
                 ["-m", "jaxkv.oracles.ggml_replay", t / "honest_sm_f32v.gguf", t / "n_kv_7.gguf"]):
        p = subprocess.run([sys.executable] + [str(a) for a in argv], env=env, capture_output=True, text=True,
                           timeout=120, preexec_fn=limit, cwd=tmp_path)
        r = dict(id=argv, rc=p.returncode, exc=None, stdout=p.stdout, stderr=p.stderr, seconds=0.0,
                 inputs=len(argv) - 3)
        assert not problems(r), (argv, problems(r), p.stderr[-800:])


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--drive":
    _drive(sys.argv[2], sys.argv[3])


def test_results_lines_are_checked_with_file_and_line(tmp_path):
    """fuzz.schema: a results line of the wrong shape is an error naming file, line and field; a cut last
    line (a kill mid-write) is ignored; a FIFO is refused without being opened."""
    from fuzz import schema

    p = tmp_path / "results.jsonl"
    good = '{"type": "case", "id": "layout/0/0", "property": "layout", "ok": true, "checks": 1, "error": null}'
    p.write_text('{"type": "campaign", "seed": 0}\n' + good + '\n{"type": "case", "id": 5}\n')
    with pytest.raises(schema.SchemaError, match=r"results.jsonl:3: property"):
        schema.read_lines(p)
    p.write_text('{"type": "campaign", "seed": 0}\n' + good + '\n{"type": "ca')
    assert [r["type"] for r in schema.read_lines(p)] == ["campaign", "case"]
    p.write_text(good.replace('"ok": true', '"ok": false') + "\n")  # a failing case needs its error
    with pytest.raises(schema.SchemaError, match=r":1: error: expected a string"):
        schema.read_lines(p)
    f = tmp_path / "fifo"
    os.mkfifo(f)
    with pytest.raises(ValueError, match="FIFO"):
        schema.read_lines(f)


def test_out_refuses_earlier_results_unless_resume_or_overwrite(tmp_path):
    """--out never destroys an earlier run: a second run into the same directory is refused with a line
    saying what to add; --overwrite replaces the results and failures/, --resume continues them."""
    from fuzz import properties as P
    from fuzz.campaign import Campaign, Options, read_records

    out = tmp_path / "o"

    def run(**kw):
        opts = Options(max_examples=3, properties=("layout",), out=str(out), quiet=True, **kw)
        return Campaign(opts, P.Context()).run()

    assert run() == 0
    (out / "failures").mkdir()
    (out / "failures" / "old.json").write_text("{}")
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(ValueError, match="--resume.*--overwrite.*--out"):
        run()
    assert (out / "results.jsonl").read_bytes() == before
    assert run(resume=True) == 0
    assert [r["type"] for r in read_records(out / "results.jsonl")].count("campaign") == 2
    assert run(overwrite=True) == 0
    assert [r["type"] for r in read_records(out / "results.jsonl")].count("campaign") == 1
    assert not (out / "failures").exists()


def test_trace_bounds_broadcast_zero_and_max_elements(corpus):
    """A view broadcasting stored bytes (nb = 0), a view with a zero count and a call past max_elements
    are TraceErrors naming the tensor or key; the honest file loads, and a bound it exceeds is named."""
    from jaxkv import trace

    t = corpus.root / "traces"
    with pytest.raises(trace.TraceError, match=r"trace\.view\.k\.ne.*stored tensor 'k'"):
        trace.load(t / "kv_broadcast_1048576.gguf")
    with pytest.raises(trace.TraceError, match=r"trace\.view\.k\.ne.*positive"):
        trace.load(t / "k_view_zero_ne1.gguf")
    honest = trace.load(t / "honest_f16.gguf")
    assert honest.n_kv == 8 and honest.n_head == 2
    with pytest.raises(trace.TraceError, match=r"max_elements = 15"):
        trace.load(t / "honest_f16.gguf", max_elements=15)  # q holds 64 elements, the logits 16
    with pytest.raises(trace.TraceError, match=r"tensor 'k' ne.*max_elements = 255"):
        trace.load(t / "honest_f16.gguf", max_elements=255)  # k and v hold 32*8 = 256 elements
    assert trace.load(t / "honest_f16.gguf", max_elements=256).n_kv == 8

"""Campaigns: deterministic case generation, batched evaluation, crash-safe records, shrinking, saving.

Cases. Property ``p`` draws its cases in *chunks* of ``CHUNK`` examples; chunk ``j`` is the generate
phase of a hypothesis run of ``p``'s strategy seeded with ``sha256(seed, p, j)`` (no database), whose
test body only records the examples. Case ``k`` of chunk ``j`` has id ``p/j/k`` and number
``j * CHUNK + k``. So the same ``--seed`` gives the same cases in the same order whatever the budget,
sharding or resumption (hypothesis' pool of constants harvested from loaded modules is pinned while
drawing, `_fixed_constants`: otherwise a module imported by a first failure's diagnosis changed the cases
drawn after it). ``--shard I/N`` evaluates the cases with ``number % N == I`` (disjoint, no
coordination); ``--max-examples`` counts the campaign's cases (all shards together). A shard stops a
failing property after *its own* first failing chunk, which may be later than the campaign's; ``merge``
(`partition_view`) drops the later chunks' cases and failures, so merged shards give exactly the
unsharded campaign's case ids, verdicts and failure (with ``--max-examples``; a ``--time-budget`` run
is cut by time and is not reproducible case for case).

Records. ``OUT/results.jsonl``: one JSON line per event, appended. A case's line is handed to the
kernel (one ``os.write``, ``O_APPEND``) the moment its verdict is known, so it survives the process
being killed, SIGKILL included; the file is fsync'ed after every group of ``engine.BATCH`` cases and at
the end of each property (what a machine crash could lose beyond that). Verdicts become known per case
for properties checked case by case (``batch=1``: layout, trace round trip and robustness, traces; a
``--target`` that does not trace under JAX, e.g. numpy code or live ggml, streams its verdicts case by
case) and per vmapped batch (at most ``engine.BATCH`` cases, one program call) for the batched JAX
programs. A SIGKILL therefore loses at most the case in flight, resp. the batch in flight. ``--resume``
drops a line cut by a kill in the middle of a write, re-reads the file, skips exactly the recorded case
ids and adds the new counts to the old; a failing property still stops after its first failing chunk,
and its failure is shrunk and saved then if the killed run had not saved it (a shrink in progress at
the kill is redone). Lines: ``campaign`` (arguments), ``case`` (id, property, ok, checks, error, params,
``elapsed`` seconds and ``compiled`` programs since its property started in this run: the time of a
killed run), ``property`` (seconds and compiles spent on a property in one run), ``failure`` (the saved
minimal case).

Failures. The first failing case of a property (the smallest case number) is shrunk by hypothesis (the
failing chunk's run replayed with the shrink phase; the test body raises on a failing case) and saved
under ``OUT/failures/`` as a JSON record (property, seed, ids, minimal and original parameters, error,
diagnosis, replay command, ``--target`` and ``--threads``) plus the arrays of the attention call (trace v1
``.gguf`` via ``jaxkv.trace.save`` when available, else ``.npz``). A ``--target`` declaring the
``ggml-cpu`` precision is diagnosed under it (its emulation, the sharp check), one declaring another
precision under that one (its op's golden and model; the trace saved as its op's), others under ``f32``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import sys
import time

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed as hseed, settings

from fuzz import cases as C
from fuzz import properties as P
from fuzz import schema
from fuzz.engine import BATCH, COMPILES
from fuzz.properties_io import save_call
from fuzz.target import Case, as_target, dense_case
from jaxkv import attention as A
from jaxkv import ops
from jaxkv import verify
from jaxkv.textsafe import escape

__all__ = ["CHUNK", "Options", "chunk_seed", "generate", "Campaign", "read_records", "summarize", "undecided",
           "format_summary", "save_failure", "shrink"]

CHUNK = 64
MAX_SHRINK_CALLS = 300


@dataclasses.dataclass
class Options:
    max_examples: int | None = None
    time_budget: float | None = None
    seed: int = 0
    properties: tuple = ()
    target: str | None = None
    traces: str | None = None
    out: str = "fuzz-out"
    resume: bool = False
    overwrite: bool = False  # --overwrite: replace the results (and failures/) already in --out
    quiet: bool = False
    shard: tuple = (0, 1)
    shrink: bool = True
    threads: int | None = None  # --threads of a ggml --target (recorded for replay)
    menu: str | None = None  # --menu of a ggml --target (recorded for replay)


def chunk_seed(seed: int, prop: str, chunk: int) -> int:
    h = hashlib.sha256(f"{seed}:{prop}:{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63)


def _settings(n, phases):
    return settings(max_examples=n, database=None, phases=phases, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                    print_blob=False, verbosity=settings.default.verbosity.quiet)


try:  # hypothesis' internal constants pool (a private module: absent from other versions)
    from hypothesis.internal.conjecture import providers as _hypothesis_providers
except ImportError:  # pragma: no cover - another hypothesis
    _hypothesis_providers = None


@contextlib.contextmanager
def _fixed_constants():
    """Hypothesis also draws from a pool of constants it harvests from the source of every *local* module
    in ``sys.modules`` (hypothesis.internal.conjecture.providers), so the cases of one (seed, property,
    chunk) would depend on what the process happened to import before -- e.g. the modules a first
    failure's diagnosis imports -- and the shards of a campaign (whose first failures come at different
    points) would draw different cases under the same ids. While a campaign draws, that pool is pinned
    empty (the global constants stay), so a chunk's cases depend on (seed, property, chunk) only."""
    hp = _hypothesis_providers
    try:
        orig, empty, cache = hp._get_local_constants, hp.Constants(), hp.CONSTANTS_CACHE
    except AttributeError:  # a hypothesis without the pool (or without the module): nothing to pin
        yield
        return
    hp._get_local_constants = lambda: empty
    cache.cache.clear()
    try:
        yield
    finally:
        hp._get_local_constants = orig
        cache.cache.clear()


def generate(prop: P.Property, ctx: P.Context, seed: int, chunk: int, n: int = CHUNK) -> list:
    """The cases (parameter dicts) of chunk ``chunk`` of ``prop`` for campaign ``seed`` (a function of
    these arguments only: `_fixed_constants`)."""
    if prop.files is not None:
        return prop.files(ctx) if chunk == 0 else []
    got = []
    strategy = prop.strategy(ctx)

    @_settings(n, [Phase.generate])
    @hseed(chunk_seed(seed, prop.name, chunk))
    @given(strategy)
    def collect(c):
        got.append(c)

    with _fixed_constants():
        collect()
    return got


def _key(c) -> str:
    return json.dumps(c, sort_keys=True)


def shrink(prop: P.Property, ctx: P.Context, seed: int, chunk: int, n: int = CHUNK):
    """Replay chunk ``chunk`` with hypothesis' shrink phase, failing on failing cases; returns
    (minimal params, outcome) or None when the failure did not reproduce. At most MAX_SHRINK_CALLS
    evaluations: past that, unseen examples count as passing (the minimal one found stays a real,
    re-verified failure)."""
    if prop.files is not None:
        return None
    memo, last = {}, [None]

    @_settings(n, [Phase.generate, Phase.shrink])
    @hseed(chunk_seed(seed, prop.name, chunk))
    @given(prop.strategy(ctx))
    def run(c):
        k = _key(c)
        if k not in memo:
            if len(memo) >= MAX_SHRINK_CALLS:
                return
            memo[k] = prop.evaluate([c], ctx)[0]
        o = memo[k]
        if not o["ok"]:
            last[0] = (c, o)
            raise AssertionError(o["error"])

    try:
        with _fixed_constants():
            run()
    except AssertionError:
        pass
    except Exception:  # hypothesis Flaky / unsatisfiable: keep the best failure seen
        pass
    return last[0]


# ----------------------------------------------------------------------------------------------------
# records

class Records:
    """Append-only JSON lines: :meth:`write` hands its lines to the kernel in one ``os.write`` (a process
    killed afterwards, even by SIGKILL, keeps them), :meth:`sync` fsyncs (what survives a machine crash)."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, objs, sync=False):
        if objs:
            data = "".join(json.dumps(o, default=_json_default) + "\n" for o in objs).encode()
            os.write(self.fd, data)
        if sync:
            self.sync()

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def drop_partial_line(path) -> int:
    """Cut a results file back to its last complete line (a kill in the middle of a write can leave a
    partial one; appending after it would corrupt the next record). Returns the bytes dropped."""
    p = pathlib.Path(path)
    if not p.is_file():
        return 0
    data = p.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(p, "r+b") as f:
            f.truncate(keep)
    return len(data) - keep


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def read_records(path) -> list:
    """Validated records of a results.jsonl (fuzz.schema; a truncated last line, from a kill mid-write,
    is ignored; a missing file has none). A line of the wrong shape, or a path that is not a regular file,
    raises ValueError naming the file and line."""
    try:
        return schema.read_lines(path)
    except FileNotFoundError:
        return []


def first_failures(records) -> dict:
    """property -> the smallest failing case number (chunk, k) among ``records``."""
    first = {}
    for r in records:
        if r.get("type") == "case" and not r["ok"]:
            n = schema.case_number(r["id"])
            if r["property"] not in first or n < first[r["property"]]:
                first[r["property"]] = n
    return first


def partition_view(records) -> list:
    """The records an unsharded campaign would have written, from the union of its shards' records:
    a failing property stops after the chunk of its first failing case (the smallest case number over
    all shards), so case records of later chunks (a shard that saw its own first failure later ran
    them) are dropped, and of the failure records only the one of that first failing case is kept."""
    first = first_failures(records)
    out = []
    for r in records:
        f = first.get(r.get("property"))
        if f is not None and r.get("type") == "case" and schema.case_number(r["id"])[0] > f[0]:
            continue
        if f is not None and r.get("type") == "failure" and schema.case_number(r["id"]) != f:
            continue
        out.append(r)
    return out


def _slot(props, name):
    return props.setdefault(name, dict(cases=0, failures=0, checks=0, seconds=0.0, compiles=0, skipped=None))


def undecided(outcome: dict) -> bool:
    """A passing case none of whose judged outputs could have failed: a kernel's bound reached the
    signal (``fuzz.bounds``: ``vacuous``, the bound would pass an all-zero output). Counted apart, never
    as evidence (docs/tolerance.md)."""
    m = outcome.get("metrics") or {}
    return bool(outcome.get("ok")) and any(isinstance(v, dict) and v.get("vacuous") for v in m.values())


def summarize(records) -> dict:
    """property -> dict(cases, failures, checks, seconds, compiles, skipped) from records (case ids
    deduplicated: the last record of an id wins). Time and compiles come from the ``property`` records;
    a run that was killed before writing one (SIGKILL) is counted up to its last case record (each
    carries ``elapsed`` seconds and ``compiled`` programs since its property started in that run)."""
    cases, props = {}, {}
    last, closed = {}, set()  # in the current run: property -> (elapsed, compiled); properties closed

    def end_run():
        for name, (el, nc) in last.items():
            if name not in closed:
                s = _slot(props, name)
                s["seconds"] += el
                s["compiles"] += nc
        last.clear()
        closed.clear()

    for r in records:
        t = r.get("type")
        if t == "campaign":
            end_run()
        elif t == "case":
            cases[r["id"]] = r
            if "elapsed" in r:
                last[r["property"]] = (r["elapsed"], r.get("compiled", 0))
        elif t == "property":
            s = _slot(props, r["property"])
            s["seconds"] += r.get("seconds", 0.0)
            s["compiles"] += r.get("compiles", 0)
            if r.get("skipped"):
                s["skipped"] = r["skipped"]
            if r.get("phase") != "shrink":
                closed.add(r["property"])
    end_run()
    for r in cases.values():
        s = _slot(props, r["property"])
        s["cases"] += 1
        s["checks"] += r.get("checks", 0)
        s["failures"] += 0 if r.get("ok") else 1
        s["undecided"] = s.get("undecided", 0) + (1 if r.get("ok") and r.get("undecided") else 0)
        s["skipped"] = None
    return props


def format_summary(props: dict) -> str:
    rows = [("property", "cases", "failures", "checks", "checks/s", "compiled programs")]
    tot = dict(cases=0, failures=0, checks=0, seconds=0.0, compiles=0)
    for name, s in props.items():
        if s.get("skipped") and not s["cases"]:
            rows.append((name, "-", "-", "-", "-", f"skipped: {escape(s['skipped'], 120)}"))
            continue
        rate = s["checks"] / s["seconds"] if s["seconds"] > 0 else 0.0
        rows.append((name, str(s["cases"]), str(s["failures"]), str(s["checks"]), f"{rate:.0f}",
                     str(s["compiles"])))
        for k in tot:
            tot[k] += s[k]
    rate = tot["checks"] / tot["seconds"] if tot["seconds"] > 0 else 0.0
    rows.append(("total", str(tot["cases"]), str(tot["failures"]), str(tot["checks"]), f"{rate:.0f}",
                 str(tot["compiles"])))
    w = [max(len(r[i]) for r in rows if i < len(r) and not (r[0] != "property" and r[-1].startswith("skipped")
                                                                  and i == 5)) for i in range(6)]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) if i < 5 else x
                               for i, x in enumerate(r)).rstrip())
        if j == 0 or j == len(rows) - 2:
            lines.append("-" * (sum(w) + 10))
    und = {name: s.get("undecided", 0) for name, s in props.items() if s.get("undecided")}
    if und:
        lines.append(f"undecided (passed, but the error bound reached the signal, so nothing was decided): "
                     f"{sum(und.values())} cases (" + ", ".join(f"{k} {v}" for k, v in und.items()) + ")")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# saving failures

def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in s)


def _verdict_of_target(a, t, params):
    """jaxkv.verify's verdict (diagnosis included) of target ``t`` (a :class:`fuzz.target.Target`) on the
    call ``a`` of case ``params`` -> (Verdict, out, call): under the ``ggml-cpu`` precision for a target
    declaring it (its emulation, its op's golden under ggml-cpu over its stored operands, the sharp
    check), else under ``f32``; ``call`` is ``a`` with K/V as the kernel received them (float16 for a
    ggml-cpu target's F16 storage). A target declaring another precision (``f32``, ``f16``, ``f64``) is
    judged op-generically (:func:`fuzz.properties.declared_verdict`: its op's golden and model)."""
    kw = dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"], sinks=a["sinks"])
    if t.sharp:
        k, v = P.target_operands(t, params, a)
        got = np.asarray(t(a["q"], k, v, **kw), np.float32)
        model, _, unit, _ = P.ggml_cpu_reference(t, a, k, v, kw)
        c = dense_case(t, a["q"], k, v, kw)
        g = t.kernel_op.judged_golden(c, t.declared_precision)
        return verify.verify_case(c, got, model, t.declared_precision, name="fuzz case", emu=model, emu_unit=unit,
                                  golden=g), got, dict(a, k=k, v=v)
    got = np.asarray(t(a["q"], a["k"], a["v"], **kw), np.float32)
    if t.declared_precision is not None:
        return P.declared_verdict(t, a, got, kw), got, a
    c = Case(q=a["q"], k=a["k"], v=a["v"], op=ops.get("flash_attn_ext").name, mask=a["mask"], sinks=a["sinks"],
             scale=float(a["scale"]), softcap=float(a["softcap"]), max_bias=float(a["max_bias"]))
    model = np.asarray(A.attention(a["q"], a["k"], a["v"], precision="f32", **kw))
    return verify.verify_case(c, got, model, "f32", name="fuzz case"), got, a


def _kernel_artifacts(base: pathlib.Path, params, padded, kernel, producer):
    """Save a failing kernel call as a trace v1 file and diagnose it with jaxkv.verify. The call is the
    minimal case at its own shapes when the kernel fails there too, else the padded call the campaign
    made (a target with its own cases: its own call only). Returns (path, which call, diagnosis dict)."""
    diag, tried = None, []
    t, view = as_target(kernel).for_case(params)
    calls = (("case", padded),) if t.case_arrays is not None else (("case", C.attention_arrays(params)),
                                                                 ("padded program call", padded))
    for which, a in calls:
        try:
            v, got, a = _verdict_of_target(a, t, view)
        except Exception as e:
            tried.append(f"{which}: {type(e).__name__}: {str(e)[:160]}")
            continue
        d = v.to_json()
        diag = dict(call=which, status=v.status, diagnosis=d.get("diagnosis"), budget=d.get("budget"),
                    localization=d.get("localization"), worst=d.get("worst"), nmse=d.get("nmse"),
                    max_abs=d.get("max_abs"))
        if v.status == "fail" or which != "case":
            op = t.op.name if t.declared_precision is not None and not t.sharp and t.op is not None else None
            try:
                return save_call(base.with_suffix(".gguf"), a, None, producer=producer, out=got, op=op), which, diag
            except Exception as e:  # not representable as a trace
                np.savez(base.with_suffix(".npz"), out=got, **{k: np.asarray(x) for k, x in a.items() if x is not None})
                return str(base.with_suffix(".npz")), which, dict(diag, trace_error=str(e)[:200])
    return None, None, dict(error="; ".join(tried))


def _save_arrays(base: pathlib.Path, prop, params, ctx) -> str | None:
    """The padded attention call of a failing case (.npz: its inputs; no single kernel output)."""
    if prop.call is None:
        return None
    a = prop.call(params, ctx)
    path = base.with_suffix(".npz")
    np.savez(path, **{k: np.asarray(v) for k, v in a.items() if v is not None})
    return str(path)


def save_failure(out: pathlib.Path, prop, ctx, opts: Options, case_id, original, minimal, outcome) -> dict:
    """Write OUT/failures/<property>-<id>.json (+ arrays); returns the record."""
    d = out / "failures"
    d.mkdir(parents=True, exist_ok=True)
    base = d / _safe(f"{prop.name}-{case_id.replace('/', '-')}")
    if prop.name == "target" and ctx.target is not None:
        arrays, call, diagnosis = _kernel_artifacts(base, minimal, P.target_call(minimal, ctx), ctx.target,
                                                    f"fuzz --target {ctx.target_spec}")
    elif prop.kernel is not None:
        arrays, call, diagnosis = _kernel_artifacts(base, minimal, prop.call(minimal, ctx), prop.kernel,
                                                    f"fuzz {prop.name}: {getattr(prop.kernel, '__doc__', '')}")
    else:
        arrays, call, diagnosis = _save_arrays(base, prop, minimal, ctx), "padded program call", None
    rec = dict(property=prop.name, seed=opts.seed, case_id=case_id, params=minimal, original=original,
               shrunk=minimal != original, error=outcome["error"], metrics=outcome.get("metrics"),
               target=opts.target, threads=opts.threads, menu=opts.menu, traces=opts.traces, arrays=arrays,
               arrays_call=call,
               diagnosis=diagnosis)
    path = base.with_suffix(".json")
    kernel = f" --target {shlex.quote(opts.target)}" if opts.target else ""
    kernel += f" --threads {int(opts.threads)}" if opts.target and opts.threads else ""
    kernel += f" --menu {shlex.quote(opts.menu)}" if opts.target and opts.menu else ""
    rec["replay"] = f"python -m fuzz replay {shlex.quote(str(path))}{kernel}"
    path.write_text(json.dumps(rec, indent=1, default=_json_default) + "\n")
    rec["file"] = str(path)
    return rec


# ----------------------------------------------------------------------------------------------------
# the campaign

class Progress:
    def __init__(self, quiet: bool, budget: float | None):
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.budget = budget
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, prop, cases, failures, checks, t_prop, force=False):
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        el = now - self.t0
        rate = checks / t_prop if t_prop > 0 else 0.0
        bud = f"/{self.budget:.0f}s" if self.budget else "s"
        sys.stderr.write(f"\r\x1b[K{prop:<14} cases {cases:>6}  failures {failures:>3}  {rate:8.0f} checks/s  "
                         f"{el:6.1f}{bud}")
        sys.stderr.flush()

    def line(self, text):
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        print(text, file=sys.stderr, flush=True)


def _number(case_id: str) -> tuple:
    """(chunk, k) of a case id ``property/chunk/k``."""
    _, j, k = case_id.rsplit("/", 2)
    return int(j), int(k)


class Campaign:
    def __init__(self, opts: Options, ctx: P.Context):
        self.opts = opts
        self.ctx = ctx
        self.out = pathlib.Path(opts.out)
        self.path = self.out / "results.jsonl"
        self.failed = False

    def prepare_out(self) -> list:
        """Check and prepare --out; returns the records a --resume continues. An existing --out must be a
        directory; a non-empty one is refused unless --resume (continue it) or --overwrite (its
        results.jsonl and failures/ are removed). ValueError with one line otherwise."""
        o = self.opts
        where = f"--out {escape(self.out)}"
        if o.resume and o.overwrite:
            raise ValueError("--resume and --overwrite: choose one")
        try:
            if self.out.exists() and not self.out.is_dir():
                raise ValueError(f"{where}: expected a directory, found a file or device")
            self.out.mkdir(parents=True, exist_ok=True)
            entries = sorted(x.name for x in self.out.iterdir())
        except OSError as e:
            raise ValueError(f"{where}: cannot use it as the results directory ({e.strerror or type(e).__name__})"
                             ) from None
        if entries and not o.resume and not o.overwrite:
            raise ValueError(f"{where}: holds an earlier run's files ({', '.join(map(escape, entries[:3]))}"
                             f"{', ...' if len(entries) > 3 else ''}); add --resume to continue it, --overwrite "
                             f"to replace its results, or give a new --out DIR")
        if o.overwrite:
            if self.path.exists() or self.path.is_symlink():
                self.path.unlink()
            if (self.out / "failures").is_dir():
                shutil.rmtree(self.out / "failures")
        old = []
        if o.resume and (self.path.exists() or self.path.is_symlink()):
            schema.regular_file(self.path, "--resume")
            drop_partial_line(self.path)
            old = read_records(self.path)
            seeds = {r.get("seed") for r in old if r.get("type") == "campaign"}
            if seeds and seeds != {o.seed}:
                raise ValueError(f"--resume: {escape(self.path)} holds a campaign with seed {sorted(seeds)[0]}, "
                                 f"not --seed {o.seed}")
        return old

    def run(self) -> int:
        o = self.opts
        old = self.prepare_out()
        self.done = {r["id"] for r in old if r.get("type") == "case"}
        self.prior = self._prior(old)
        self.rec = Records(self.path)
        self.rec.write([dict(type="campaign", seed=o.seed, properties=list(o.properties), shard=list(o.shard),
                             max_examples=o.max_examples, time_budget=o.time_budget, target=o.target,
                             threads=o.threads, menu=o.menu, resume=o.resume, started=time.time())], sync=True)
        self.progress = Progress(o.quiet, o.time_budget)
        self.ctx = dataclasses.replace(self.ctx, active=tuple(o.properties), runners={})
        t0 = time.perf_counter()
        interrupted = False
        try:
            for i, name in enumerate(o.properties):
                left = None
                if o.time_budget is not None:
                    left = (o.time_budget - (time.perf_counter() - t0)) / (len(o.properties) - i)
                self._property(P.get(name), left)
        except KeyboardInterrupt:
            interrupted = True
            self.progress.line("interrupted: writing the summary")
        finally:
            self.rec.close()
        props = summarize(read_records(self.path))
        props = {k: props[k] for k in o.properties if k in props}
        print(format_summary(props), flush=True)
        if self.ctx.target is not None and self.ctx.target.coverage_table is not None:  # live ggml's paths, types
            print(self.ctx.target.coverage_table(), flush=True)
        fails = [r for r in read_records(self.path) if r.get("type") == "failure"]
        for f in fails:
            print(f"FAIL {f['property']}: {escape(f['error'])}\n  saved {escape(f['file'])}\n  replay: "
                  f"{escape(f['replay'])}", flush=True)
        if interrupted:
            return 130
        return 1 if any(s["failures"] for s in props.values()) else 0

    @staticmethod
    def _prior(old) -> dict:
        """property -> [first failing case (number, id, params, outcome) or None, failure saved] from the
        records a resumed campaign continues."""
        prior = {}
        for r in old:
            if r.get("type") == "case" and not r.get("ok"):
                p = prior.setdefault(r["property"], [None, False])
                n = _number(r["id"])
                if p[0] is None or n < p[0][0]:
                    p[0] = (n, r["id"], r.get("params"),
                            dict(ok=False, checks=r.get("checks", 1), error=r.get("error"), metrics=None))
            elif r.get("type") == "failure":
                prior.setdefault(r["property"], [None, False])[1] = True
        return prior

    def _property(self, prop, seconds):
        """Evaluate ``prop``'s cases chunk by chunk. Every verdict is written (one line, one os.write)
        the moment it is known; the file is fsync'ed after every group of ``engine.BATCH`` cases. A
        property stops after the chunk holding its first failing case (the smallest case number; on
        --resume also among the recorded cases), which is then shrunk and saved."""
        o, ctx = self.opts, self.ctx
        why = P.available(prop, ctx)
        if why:
            self.rec.write([dict(type="property", property=prop.name, seconds=0.0, compiles=0, skipped=why)])
            self.progress.line(f"{prop.name}: skipped ({why})")
            return
        t0 = time.perf_counter()
        c0 = COMPILES.count
        n_cases = n_fail = n_checks = 0
        shard_i, shard_n = o.shard
        first_fail, saved = self.prior.get(prop.name, [None, False])
        chunk = 0
        limit = None if prop.files is not None else o.max_examples  # input files: all of them
        try:
            while True:
                if seconds is not None and time.perf_counter() - t0 >= seconds:
                    break
                base = chunk * CHUNK
                if limit is not None and base >= limit:
                    break
                if first_fail is not None and first_fail[0][0] < chunk:
                    break  # a failing property stops after its first failing chunk: shrink and report
                cases = generate(prop, ctx, o.seed, chunk)
                if not cases:
                    break
                if limit is not None:
                    cases = cases[:limit - base]
                todo = [(f"{prop.name}/{chunk}/{k}", c) for k, c in enumerate(cases)
                        if (base + k) % shard_n == shard_i]
                todo = [(cid, c) for cid, c in todo if cid not in self.done]
                for s in range(0, len(todo), BATCH):
                    if seconds is not None and time.perf_counter() - t0 >= seconds:
                        break
                    part = todo[s:s + BATCH]
                    for i, oc in P.outcomes(prop, [c for _, c in part], ctx):
                        cid, c = part[i]
                        line = dict(type="case", id=cid, property=prop.name, ok=oc["ok"],
                                    checks=oc["checks"], error=oc["error"], params=c,
                                    elapsed=round(time.perf_counter() - t0, 4), compiled=COMPILES.count - c0)
                        if undecided(oc):
                            line["undecided"] = True
                        self.rec.write([line])
                        n_cases += 1
                        n_checks += oc["checks"]
                        if not oc["ok"]:
                            n_fail += 1
                            n = (chunk, int(cid.rsplit("/", 1)[1]))
                            if first_fail is None or n < first_fail[0]:
                                first_fail, saved = (n, cid, c, oc), False
                        self.progress.update(prop.name, n_cases, n_fail, n_checks, time.perf_counter() - t0)
                    self.rec.sync()
                if prop.files is not None or len(cases) < CHUNK:
                    break
                chunk += 1
        finally:
            spent = time.perf_counter() - t0
            self.rec.write([dict(type="property", property=prop.name, seconds=spent,
                                 compiles=COMPILES.count - c0)], sync=True)
        self.progress.update(prop.name, n_cases, n_fail, n_checks, spent, force=True)
        self.progress.line(f"{prop.name}: {n_cases} cases, {n_fail} failures, {n_checks} checks, "
                           f"{spent:.1f} s, {COMPILES.count - c0} compiles")
        if first_fail is not None and not saved:
            (chunk, _), cid, params, oc = first_fail
            try:
                self._report_failure(prop, cid, chunk, params, oc)
            except Exception as e:  # e.g. a resumed record's params this property cannot rebuild
                self.progress.line(f"{prop.name}: FAIL {cid}: could not shrink and save it: "
                                   f"{escape(type(e).__name__)}: {escape(str(e), 160)}")

    def _report_failure(self, prop, cid, chunk, params, outcome):
        o, ctx = self.opts, self.ctx
        t0 = time.perf_counter()
        c0 = COMPILES.count
        minimal, mo = params, outcome
        if o.shrink:
            r = shrink(prop, ctx, o.seed, chunk)
            if r is not None:
                minimal, mo = r
        rec = save_failure(self.out, prop, ctx, o, cid, params, minimal, mo)
        self.rec.write([dict(type="failure", property=prop.name, id=cid, file=rec["file"], error=mo["error"],
                             replay=rec["replay"]),
                        dict(type="property", property=prop.name, seconds=time.perf_counter() - t0,
                             compiles=0, report_compiles=COMPILES.count - c0, phase="shrink")], sync=True)
        self.progress.line(f"{prop.name}: FAIL {cid} shrunk in {time.perf_counter() - t0:.1f} s -> {rec['file']}")

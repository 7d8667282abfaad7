"""The default fuzz campaign over many seeds: does correct code ever fail?

    python -m benchmarks.seeds [--seeds 0-99] [--jobs 1] [--max-examples 100] [--out DIR]
                               [--properties P1,P2] [--no-shrink] [--seeds-per-process 8]

Runs ``python -m fuzz --max-examples N --seed S`` for every seed S of ``--seeds`` (``A-B``, ``A,B,C``
or a mix; default 0-99), in at most ``--jobs`` worker processes at a time. Each worker runs ``--seeds-per-process`` seeds one after
the other in one process (``fuzz.__main__.main``), so the compiled attention programs (one per bucket, kept
by fuzz.engine.Batched) and JAX's persistent compilation cache are reused across them, and is then
replaced (one process for all seeds died after 22 seeds of the default campaign with live ggml:
'LLVM compilation error: Cannot allocate memory', then a segfault); a worker that dies reports its unfinished seeds as crashed; each campaign
writes to ``OUT/seed-S``. Prints one line per seed as it finishes (exit code, cases, failures, seconds,
the first failure's message) and a final ``N seeds, F failures`` line (F: seeds whose campaign did
not exit 0); exits 1 when F > 0. Not a CI test: 100 seeds take tens of minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import pathlib
import queue
import sys
import time

from fuzz.__main__ import main as fuzz_main

__all__ = ["parse_seeds", "run_seed", "main"]


def parse_seeds(spec: str) -> list[int]:
    """``'0-99'``, ``'3,5,7'``, ``'0-9,20'`` -> sorted distinct seeds; ValueError names the bad part."""
    out = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"--seeds: bad range {part!r} (expected A-B, A or a comma list)") from None
    if not out or min(out) < 0:
        raise ValueError(f"--seeds: expected non-negative seeds, got {spec!r}")
    return sorted(out)


def _summary(out: pathlib.Path) -> tuple[int, int, str | None]:
    """(cases, failing cases, first failing case's error) from a campaign's results.jsonl."""
    cases = fails = 0
    first = None
    path = out / "results.jsonl"
    if not path.exists():
        return 0, 0, None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("type") == "case":
            cases += 1
            if not r.get("ok"):
                fails += 1
                if first is None:
                    first = f"{r.get('property')}: {r.get('error')}"
    return cases, fails, first


def run_seed(seed: int, args) -> dict:
    """One default campaign (in this process) -> dict(seed, rc, cases, failures, seconds, error)."""
    out = pathlib.Path(args.out) / f"seed-{seed}"
    argv = ["--max-examples", str(args.max_examples), "--seed", str(seed), "--out", str(out), "--quiet"]
    if args.properties:
        argv += ["--properties", args.properties]
    if args.no_shrink:
        argv += ["--no-shrink"]
    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = fuzz_main(argv)
    cases, fails, first = _summary(out)
    return dict(seed=seed, rc=int(rc), cases=cases, failures=fails, seconds=time.perf_counter() - t0,
                error=first)


def _line(r: dict) -> str:
    s = (f"seed {r['seed']:3d}: exit {r['rc']}, {r['cases']} cases, {r['failures']} failing, "
         f"{r['seconds']:.0f} s")
    return s + (f"  FIRST: {r['error'][:300]}" if r["error"] else "")


def _worker(seeds, args, q):
    for s in seeds:
        try:
            q.put(run_seed(s, args))
        except BaseException as e:  # report, keep going
            q.put(dict(seed=s, rc=3, cases=0, failures=0, seconds=0.0,
                       error=f"crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _run_batches(seeds, args, jobs: int, per_process: int):
    """Yield each seed's result as it finishes. Seeds run in fresh spawned processes, ``per_process`` seeds
    each (compiled programs are reused within a process; a long-lived process accumulates XLA executables
    until LLVM cannot map more memory), at most ``jobs`` at a time. A process that dies (a segfault, an
    out-of-memory kill) reports its unfinished seeds as crashed with its exit code."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    batches = [seeds[i:i + per_process] for i in range(0, len(seeds), per_process)]
    running: dict = {}  # process -> seeds not yet reported

    def take(r):
        for left in running.values():
            left.discard(r["seed"])
        return r

    while batches or running:
        while batches and len(running) < jobs:
            b = batches.pop(0)
            proc = ctx.Process(target=_worker, args=(b, args, q))
            proc.start()
            running[proc] = set(b)
        try:
            yield take(q.get(timeout=1.0))
        except queue.Empty:
            pass
        for proc in [x for x in running if not x.is_alive()]:
            while True:  # results it put before exiting
                try:
                    yield take(q.get(timeout=0.5))
                except queue.Empty:
                    break
            for s_ in sorted(running.pop(proc)):
                yield dict(seed=s_, rc=3, cases=0, failures=0, seconds=0.0,
                           error=f"crashed: worker process exit code {proc.exitcode}")


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-99", help="seeds: A-B, A or a comma list (default 0-99)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-examples", type=int, default=100, help="cases per property (default 100)")
    p.add_argument("--out", default="fuzz-seeds", help="campaign records go to OUT/seed-S (default fuzz-seeds)")
    p.add_argument("--properties", default=None, help="comma list (default: every property)")
    p.add_argument("--no-shrink", action="store_true", help="do not shrink failures (faster)")
    p.add_argument("--seeds-per-process", type=int, default=8,
                   help="seeds run in one worker process before it is replaced (default 8)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.jobs < 1:
            raise ValueError("--jobs: must be >= 1")
        if args.max_examples < 1:
            raise ValueError("--max-examples: must be >= 1")
        if args.seeds_per_process < 1:
            raise ValueError("--seeds-per-process: must be >= 1")
    except ValueError as e:
        print(f"python -m benchmarks.seeds: error: {e}", file=sys.stderr)
        return 2
    jobs = min(args.jobs, len(seeds))
    t0 = time.perf_counter()
    results = []
    print(f"{len(seeds)} seeds ({args.seeds}), --max-examples {args.max_examples}, {jobs} job(s)", flush=True)
    for r in _run_batches(seeds, args, jobs, args.seeds_per_process):
        results.append(r)
        print(_line(r), flush=True)
    bad = [r["seed"] for r in results if r["rc"] != 0]
    print(f"{len(results)} seeds, {len(bad)} failures" + (f" (seeds {', '.join(map(str, sorted(bad)))})" if bad
                                                          else "") + f", {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

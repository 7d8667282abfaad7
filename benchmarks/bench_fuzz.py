"""Fuzz throughput of the split-K-vs-standard property: bucketed + vmapped programs vs naive per-case jit.

    python benchmarks/bench_fuzz.py [--cases 512] [--naive-cases 12] [--seed 0]

Both paths evaluate the same cases (``fuzz.campaign.generate`` of property ``split_k``, seed ``--seed``)
with the same check: flash_decode (f32) and the f32 reference vs the f64 golden, verdict by the tolerance
budget. Timings include everything a campaign pays (case materialisation, compilation, evaluation,
verdicts); the persistent compilation cache is off, so every compile is a real one.

* bucketed: ``fuzz.properties`` (what ``python -m fuzz`` runs): cases padded into a bounded set of shapes
  (one program per head layout), ``engine.BATCH`` cases per vmapped call; reported cold (first
  ``--cases`` cases, compiles included) and warm (the next ``--cases`` cases, programs compiled).
* naive: one ``jax.jit`` per case on the case's exact shapes (no padding, no batching): JAX retraces and
  recompiles for every new shape, which is nearly every case. Only ``--naive-cases`` cases (it is slow).

Printed: checks/s of each, the number of XLA compiles (jax.monitoring), and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxkv  # noqa: E402,F401
from fuzz import campaign as Cm  # noqa: E402
from fuzz import cases as C  # noqa: E402
from fuzz import properties as P  # noqa: E402
from fuzz import strategies as S  # noqa: E402
from fuzz.engine import COMPILES, stats, verdict  # noqa: E402
from jaxkv import attention as A  # noqa: E402


def cases_of(prop, ctx, seed, n, skip=0):
    out, chunk = [], skip // Cm.CHUNK
    while len(out) < n:
        out += Cm.generate(prop, ctx, seed, chunk)
        chunk += 1
    return out[:n]


def naive_check(c):
    """One case at its exact shapes: a fresh jit (retrace + compile for every new shape)."""
    a = C.attention_arrays(c)
    chunk = S.KV_BUCKETS[c["bucket"]]
    kw = dict(scale=np.float32(a["scale"]), mask=a["mask"], softcap=np.float32(a["softcap"]),
              max_bias=np.float32(a["max_bias"]), sinks=a["sinks"])
    valid = np.ones((1, 1, 1, 1), np.float32)

    @jax.jit
    def f(q, k, v, kw):
        g = A.attention(q, k, v, precision="f64", **kw)
        m = A.attention(q, k, v, precision="f32", **kw)
        fl = A.flash_decode(q, k, v, chunk=chunk, precision="f32", **kw)
        return stats(fl, g, valid), stats(m, g, valid)
    got, model = jax.device_get(f(a["q"], a["k"], a["v"], kw))
    return verdict(got, model)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=512)
    ap.add_argument("--naive-cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ctx = P.Context(seed=args.seed)
    prop = P.get("split_k")
    P.set_active(["split_k"])  # as `python -m fuzz --properties split_k`: a program for this property
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    rows = []
    for label, skip in (("bucketed (cold: compiles included)", 0), ("bucketed (warm)", args.cases)):
        c0 = COMPILES.count
        t0 = time.perf_counter()
        cs = cases_of(prop, ctx, args.seed, args.cases, skip)
        outs = prop.evaluate(cs, ctx)
        dt = time.perf_counter() - t0
        checks = sum(o["checks"] for o in outs)
        assert all(o["ok"] for o in outs), [o["error"] for o in outs if not o["ok"]][:3]
        rows.append((label, len(cs), checks / dt, COMPILES.count - c0, dt))

    c0 = COMPILES.count
    t0 = time.perf_counter()
    cs = cases_of(prop, ctx, args.seed, args.naive_cases)
    ok = [naive_check(c) for c in cs]
    dt = time.perf_counter() - t0
    assert all(ok)
    rows.append(("naive per-case jit", len(cs), len(cs) / dt, COMPILES.count - c0, dt))

    print(f"{'path':<36} {'cases':>6} {'checks/s':>9} {'compiles':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r[0]:<36} {r[1]:>6} {r[2]:>9.1f} {r[3]:>9} {r[4]:>8.1f}")
    naive = rows[-1][2]
    print(f"speed-up vs naive: cold {rows[0][2] / naive:.0f}x, warm {rows[1][2] / naive:.0f}x")


if __name__ == "__main__":
    main()

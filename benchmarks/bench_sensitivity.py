"""Throughput of the sensitivity sweep (jaxkv.sensitivity): configurations x samples per second, with the
sample axis sharded over 1 vs 2 CPU devices.

    python benchmarks/bench_sensitivity.py [--devices 1,2] [--formats q8_0,q4_0] [--kv-len 512,4096]
        [--head-dim 128] [--hot-window 0,32,128,512] [--samples 64] [--repeat 3]

Each device count runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(and ``JAX_PLATFORMS=cpu``) over the same workload: one group per format (every kv_len x hot window
of that format), head dims x ``normal``. Timed: the first pass (compile included) and the best of
``--repeat`` further passes (steady state). The per-sample metrics of every device count are checked
against the first's (1e-10 relative; see jaxkv.sensitivity._sharded). Printed: a markdown table of configs x samples per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

_CHILD = r"""
import json, sys, time
import numpy as np, jax
import jaxkv
from jaxkv import sensitivity as sens
a = json.loads(sys.argv[1])
sw = sens.Sweep(format_pairs=sens.pairs_from(a["formats"]), hot_windows=a["windows"], kv_lens=a["kv_lens"],
                head_dims=a["head_dims"], dists=("normal",), samples=a["samples"], seed=0)
mesh = sens.make_mesh(a["devices"])
def one_pass():
    vals = []
    for g in sw.groups():
        r = sens.run_group(g, mesh=mesh)
        vals += [float(x) for m in sorted(r) if m != "ch_check" for x in np.ravel(r[m])]  # ch_check: ~1e-30 noise
    return vals
t = time.perf_counter(); digest = one_pass(); first = time.perf_counter() - t
best = float("inf")
for _ in range(a["repeat"]):
    t = time.perf_counter(); one_pass(); best = min(best, time.perf_counter() - t)
n_cfg = len(sw.configs())
print(json.dumps(dict(devices=a["devices"], jax_devices=len(jax.devices()), configs=n_cfg,
                      samples=sw.samples, first_s=first, best_s=best, values=digest)))
"""


def _ints(s):
    return [int(x) for x in s.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2")
    p.add_argument("--formats", default="q8_0,q4_0")
    p.add_argument("--kv-len", default="512,4096")
    p.add_argument("--head-dim", default="128")
    p.add_argument("--hot-window", default="0,32,128,512")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    results = []
    for n in _ints(a.devices):
        args = dict(devices=n, formats=a.formats.split(","), kv_lens=_ints(a.kv_len),
                    head_dims=_ints(a.head_dim), windows=_ints(a.hot_window), samples=a.samples,
                    repeat=a.repeat)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "values"}), file=sys.stderr, flush=True)
    base = results[0]["values"]
    rel = max((abs(a - b) / max(abs(a), 1e-300) for r in results[1:] for a, b in zip(base, r["values"])
               if a != b), default=0.0)
    print(f"workload: formats {a.formats}, kv_len {a.kv_len}, head_dim {a.head_dim}, hot windows "
          f"{a.hot_window}, dist normal, {a.samples} samples; {os.cpu_count()} CPU cores")
    print("| devices | configs x samples | first pass (compile incl.) | steady state (best of "
          f"{a.repeat}) | configs x samples / s (steady) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        work = r["configs"] * r["samples"]
        print(f"| {r['devices']} | {work} | {r['first_s']:.1f} s | {r['best_s']:.2f} s | "
              f"{work / r['best_s']:.0f} |")
    print(f"per-sample metrics vs {results[0]['devices']} device(s): max relative difference {rel:.1e} "
          "(1e-10 allowed: a 1-device program may associate f64 sums differently)")
    return 0 if rel < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time to load a trace and produce its canonical operands.

    python benchmarks/bench_trace.py [--trace PATH] [--repeat 7]

Default trace: shared/traces/ggml/mixed_q4_1_long.gguf (5.3 MiB: q [1,1,32,128], Q4_1 cold K/V of 4,096
tokens x 8 heads, F16 hot K/V of 64 tokens). Warm: one untimed run first (page cache filled, modules
imported), then best and median of ``--repeat`` runs of each stage:

- ``load``: `jaxkv.trace.load` -- bounded header scan, gguf.GGUFReader, validation, canonical operands as
  memory-mapped views (nothing copied);
- ``load + materialize``: the same, then every canonical operand copied to a contiguous numpy array
  (QuantArray: its raw blocks), i.e. every byte of the file read into canonical order;
- ``dense_kv f32``: K and V dequantized to dense float32 [B, n_kv, Hkv, D] (jitted formats.dequantize,
  compiled in the warm-up run), informational.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from jaxkv import formats as F  # noqa: E402
from jaxkv import trace as T  # noqa: E402

DEFAULT = os.path.join(os.environ.get("JAXKV_SHARED", os.path.join(ROOT, "..", "shared")), "traces", "ggml",
                       "mixed_q4_1_long.gguf")


def _materialize(t: T.Trace) -> int:
    n = 0
    for x in t.operands().values():
        a = np.ascontiguousarray(x.raw if isinstance(x, F.QuantArray) else x)
        n += a.nbytes
    return n


def _time(fn, repeat):
    fn()  # warm
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)
    t = T.load(a.trace)
    size = os.path.getsize(a.trace)
    print(f"trace {os.path.basename(a.trace)}: {size / 2**20:.1f} MiB, op {t.op}, n_kv {t.n_kv}, "
          f"H {t.n_head}, Hkv {t.n_head_kv}, Dk {t.Dk}, types {t.types}")
    nbytes = _materialize(t)
    rows = [
        ("load", lambda: T.load(a.trace)),
        ("load + materialize", lambda: _materialize(T.load(a.trace))),
        ("dense_kv f32", lambda: t.dense_kv(np.float32)),
    ]
    print(f"{'stage':<22}{'best ms':>10}{'median ms':>12}")
    for name, fn in rows:
        best, med = _time(fn, a.repeat)
        print(f"{name:<22}{best * 1e3:>10.2f}{med * 1e3:>12.2f}")
    print(f"(materialize copies {nbytes / 2**20:.1f} MiB of canonical operands)")


if __name__ == "__main__":
    main()

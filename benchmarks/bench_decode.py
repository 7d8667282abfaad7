"""Decode attention speed: jaxkv split-K ``flash_decode`` against XLA's attention and numpy.

    python benchmarks/bench_decode.py [--n-kv 4096,32768] [--chunk 2048,1024] [--repeat 7]
                                      [--peak-gbs GB/S] [--markdown] [--emitted]

One query token (B=1, n_q=1), H=32 query heads over Hkv=8 KV heads, D=128, KV cache of ``n_kv`` tokens
stored F16 in the canonical layout ``[B, n_kv, Hkv, D]``. Decode attention is memory-bound: its limit is
the K/V bytes it reads per second. Rows:

- ``jaxkv flash_decode``: ``jaxkv.attention.flash_decode`` on the F16 K/V, f32 compute, chunks of
  ``--chunk`` keys converted inside the scan (never a whole F32 copy of the cache); one row per chunk
  size given (a chunk of n_kv or more is one pass, no loop);
- ``jax.nn.dot_product_attention``: XLA's fused attention on the same F16 K/V (accepted on CPU by the
  installed JAX; where a JAX version rejects F16 the row says so and is skipped) and on F32 copies
  (what every JAX version accepts; it then reads twice the bytes);
- ``numpy``: a plain numpy implementation (F16 -> F32 per KV head, two matmuls, softmax in f64).

Every output is checked against the float64 reference (``jaxkv.attention.attention(precision="f64")``)
before it is timed: a row that disagrees beyond 1e-4 relative is flagged. Times are the best of
``--repeat`` calls after a warm-up (compile excluded). ``GB/s`` is the K/V bytes of that row's inputs
divided by the time; ``vs dpa`` is the time of ``jax.nn.dot_product_attention`` on the same F16 inputs
divided by the row's time (F32 inputs where F16 is rejected); ``% read BW`` is the row's GB/s over the
read bandwidth measured in the same run: on CPU a numpy float32 sum over a 512 MiB array, on GPU a
jitted sum over a 512 MiB device array (and ``--peak-gbs``, e.g. 3350 for an H100 SXM, adds a column
against the nominal peak). ``--emitted`` prints the operations XLA emitted in flash_decode's loop body.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxkv import attention as A  # noqa: E402

B, H, HKV, D = 1, 32, 8, 128
SCALE = 1.0 / np.sqrt(D)
READ_BW_BYTES = 512 * 2**20
AGREE = 1e-4  # relative max error vs f64 allowed before a row is flagged (f32 compute over <= 32k keys)


def best_time(fn, repeat: int) -> float:
    """Best wall time of ``fn()`` over ``repeat`` calls after one warm-up call (results blocked on)."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def read_bandwidth(repeat: int) -> tuple[float, str]:
    """Measured read bandwidth in bytes/s and how it was measured (backend dependent)."""
    n = READ_BW_BYTES // 4
    if jax.default_backend() == "cpu":
        a = np.ones(n, np.float32)
        t = best_time(lambda: a.sum(), repeat)
        return READ_BW_BYTES / t, "numpy float32 sum over 512 MiB"
    a = jnp.ones(n, jnp.float32)
    f = jax.jit(jnp.sum)
    t = best_time(lambda: f(a), repeat)
    return READ_BW_BYTES / t, f"jitted float32 sum over 512 MiB on {jax.devices()[0].device_kind}"


def numpy_decode(q, k, v):
    """Plain numpy decode attention: q [B, 1, H, D] f32, k/v [B, n, Hkv, D] f16 -> [B, 1, H, D] f32."""
    g = H // HKV
    out = np.empty((B, 1, H, D), np.float32)
    for b in range(B):
        for h in range(HKV):
            kh = k[b, :, h, :].astype(np.float32)
            vh = v[b, :, h, :].astype(np.float32)
            qh = q[b, 0, h * g:(h + 1) * g, :]
            s = (qh @ kh.T).astype(np.float64) * SCALE
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            o = (p.astype(np.float32) @ vh) / p.sum(axis=-1, keepdims=True)
            out[b, 0, h * g:(h + 1) * g, :] = o
    return out


def loop_body_ops(hlo: str) -> list[str]:
    """The operations XLA emitted in the body of each while loop of a compiled program's HLO text:
    one line per fusion / custom call / dot / copy / conditional, as ``name: shape kind``."""
    bodies = re.findall(r"body=(%[\w.\-]+)", hlo)
    out = []
    for body in dict.fromkeys(bodies):
        m = re.search(re.escape(body) + r" \(.*?\{\n(.*?)\n\}", hlo, re.S)
        if not m:
            continue
        out.append(f"while body {body}:")
        for line in m.group(1).splitlines():
            op = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+) (fusion|custom-call|dot|copy|conditional|convert)\(",
                          line)
            if op:
                kind = re.search(r"kind=(\w+)", line)
                out.append(f"  {op.group(1)}: {op.group(2)} {op.group(3)}"
                           + (f" {kind.group(1)}" if kind else ""))
    return out


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run(n_kv: int, chunks: list[int], repeat: int, bw: float, peak: float | None, rng) -> list[dict]:
    q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    k16 = rng.standard_normal((B, n_kv, HKV, D)).astype(np.float16)
    v16 = rng.standard_normal((B, n_kv, HKV, D)).astype(np.float16)
    ref = np.asarray(A.attention(q, k16, v16, scale=SCALE, precision="f64"))
    qj, kj, vj = jnp.asarray(q), jnp.asarray(k16), jnp.asarray(v16)
    k32, v32 = jnp.asarray(k16.astype(np.float32)), jnp.asarray(v16.astype(np.float32))
    by16 = k16.nbytes + v16.nbytes
    dpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=SCALE))
    rows = []

    def add(name, fn, nbytes, note=""):
        err = rel_err(fn(), ref)
        t = best_time(fn, repeat)
        rows.append(dict(n_kv=n_kv, impl=name, ms=t * 1e3, nbytes=nbytes, gbs=nbytes / t / 1e9, err=err,
                         note=note + ("" if err <= AGREE else f" DISAGREES ({err:.1e} > {AGREE:g})")))

    for c in chunks:
        add("jaxkv flash_decode (F16 K/V, f32 compute)",
            lambda c=c: A.flash_decode(qj, kj, vj, chunk=c, scale=SCALE), by16, f"chunk {c}")
    add("jaxkv flash_decode (F32 K/V)",
        lambda: A.flash_decode(qj, k32, v32, chunk=chunks[0], scale=SCALE), 2 * by16, f"chunk {chunks[0]}")
    try:
        add("jax.nn.dot_product_attention (F16 K/V)", lambda: dpa(qj.astype(jnp.float16), kj, vj), by16,
            "q cast to F16, F16 output")
    except Exception as e:  # a JAX version that rejects F16 on this backend
        rows.append(dict(n_kv=n_kv, impl="jax.nn.dot_product_attention (F16 K/V)", ms=float("nan"),
                         nbytes=by16, gbs=float("nan"), err=float("nan"),
                         note=f"rejected: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))
    add("jax.nn.dot_product_attention (F32 K/V)", lambda: dpa(qj, k32, v32), 2 * by16)
    if jax.default_backend() == "cpu":
        add("numpy", lambda: numpy_decode(q, k16, v16), by16)
    base = next((r["ms"] for r in rows if r["impl"].startswith("jax.nn") and np.isfinite(r["ms"])), None)
    for r in rows:
        r["vs_dpa"] = base / r["ms"] if base and np.isfinite(r["ms"]) else float("nan")
        r["bw_frac"] = r["gbs"] * 1e9 / bw
        r["peak_frac"] = r["gbs"] / peak if peak else None
    return rows


def machine() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{dev.device_kind} ({jax.default_backend()}), host {cpu}, {os.cpu_count()} cores, "
            f"jax {jax.__version__}, load average {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-kv", default="4096,32768")
    p.add_argument("--chunk", default="2048,1024", help="flash_decode chunk sizes, comma-separated (the first "
                   "also runs the F32 row and --emitted)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--peak-gbs", type=float, default=None, help="nominal peak bandwidth, GB/s")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--emitted", action="store_true",
                   help="print the operations XLA emitted in flash_decode's loop body (largest n_kv)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    bw, how = read_bandwidth(a.repeat)
    print(f"# machine: {machine()}")
    print(f"# read bandwidth: {bw / 1e9:.1f} GB/s ({how})")
    rows = []
    for n in (int(x) for x in a.n_kv.split(",")):
        rows += run(n, [min(int(c), n) for c in a.chunk.split(",")], a.repeat, bw, a.peak_gbs, rng)
    peak_h = f" | % of {a.peak_gbs:g} GB/s" if a.peak_gbs else ""
    if a.markdown:
        print(f"\n| n_kv | implementation | ms | K/V MB | GB/s | vs dpa | % read BW{peak_h} | max rel err | note |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if a.peak_gbs else "") + " ---: | --- |")
    for r in rows:
        pk = f" | {100 * r['peak_frac']:.0f}%" if r["peak_frac"] is not None else ""
        if a.markdown:
            print(f"| {r['n_kv']} | {r['impl']} | {r['ms']:.2f} | {r['nbytes'] / 1e6:.0f} | {r['gbs']:.2f} | "
                  f"{r['vs_dpa']:.2f}x | {100 * r['bw_frac']:.0f}%{pk} | {r['err']:.1e} | {r['note']} |")
        else:
            print(f"n_kv={r['n_kv']:6d}  {r['impl']:45s} {r['ms']:8.2f} ms  {r['gbs']:6.2f} GB/s  "
                  f"{r['vs_dpa']:5.2f}x dpa  {100 * r['bw_frac']:4.0f}% read BW{pk}  err {r['err']:.1e}  {r['note']}")
    if a.emitted:
        n = max(int(x) for x in a.n_kv.split(","))
        q = jnp.zeros((B, 1, H, D), jnp.float32)
        kv = jnp.zeros((B, n, HKV, D), jnp.float16)
        c = int(a.chunk.split(",")[0])
        hlo = A._flash_core.lower(q, kv, kv, SCALE, None, 0.0, None, None, chunk=c,
                                  precision="f32").compile().as_text()
        print(f"\nXLA's loop body of flash_decode (F16 K/V, n_kv={n}, chunk {c}):")
        print("\n".join(loop_body_ops(hlo)))
    bad = [r for r in rows if "DISAGREES" in r["note"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

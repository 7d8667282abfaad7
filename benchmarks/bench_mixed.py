"""Mixed-precision cache attention speed: quantized cold region + F16 hot window vs all-F16.

    python benchmarks/bench_mixed.py [--n-kv 32768] [--window 128] [--formats Q4_0,Q8_0]
                                     [--chunk 2048] [--repeat 7] [--markdown]

Decode shape of bench_decode.py (B=1, n_q=1, H=32, Hkv=8, D=128): a ``jaxkv.cache.MixedCache`` whose
``n_kv - window`` oldest tokens are stored in a ggml block format (K and V) and whose ``window`` newest
tokens are F16, attended with ``jaxkv.cache.attend`` (split-K; each cold chunk is dequantized inside
the scan). Baseline, measured in the same run: ``jaxkv.attention.flash_decode`` over the same tokens all
in F16. Printed per format:

- bytes of K/V read per token (all KV heads) and the ratio to F16;
- time, and the time ratio ``F16 / mixed`` (above 1: the mixed cache is faster);
- ``temp MB``: XLA's temporary buffer size of the compiled ``attend`` program
  (``compiled.memory_analysis()``), against the size of an F32 copy of the cache: the proof that the
  cache is dequantized chunk by chunk and never materialised;
- ``max rel err`` against the float64 reference on the dequantized cache (``to_dense``).

``--dequant`` adds the cause of the gap on CPU: the throughput of the per-chunk decode alone (a scan
over ``--chunk``-key chunks that decodes K and reduces it over the keys, the access pattern of the
p.v product) for F16 and each format, in elements per second.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench_decode import B, D, H, HKV, SCALE, best_time, loop_body_ops, machine, rel_err  # noqa: E402
from jaxkv import attention as A  # noqa: E402
from jaxkv import cache as C  # noqa: E402
from jaxkv import formats as F  # noqa: E402


def build(fmt: str, k16, v16, window: int) -> C.MixedCache:
    """Cache holding k16/v16 [B, n, Hkv, D] float16: tokens [0, n - window) quantized (from their F16
    values converted to F32, as :func:`jaxkv.cache.append` does), the rest in the hot window."""
    n = k16.shape[1]
    nc = n - window
    f = F.get_format(fmt)

    def cold(x):
        return F.QuantArray(raw=F.quantize(jnp.asarray(x[:, :nc].astype(np.float32)), f), fmt=f, n=D)

    return C.MixedCache(k_cold=cold(k16), v_cold=cold(v16), k_hot=jnp.asarray(k16[:, nc:]),
                        v_hot=jnp.asarray(v16[:, nc:]), n_cold=jnp.int32(nc), n_hot=jnp.int32(window))


def compiled_attend(cache: C.MixedCache, q, chunk: int):
    """The compiled program :func:`jaxkv.cache.attend` runs for this cache (no mask, sinks, softcap)."""
    return C._regions_jit.lower(q, cache.k_cold, cache.v_cold, cache.k_hot, cache.v_hot, cache.n_cold,
                                cache.n_hot, SCALE, None, 0.0, None, None, chunk=chunk,
                                precision="f32").compile()


def temp_bytes(cache: C.MixedCache, q, chunk: int) -> float:
    """Temporary buffer bytes of the compiled attend program (nan where the backend does not say)."""
    try:
        return float(compiled_attend(cache, q, chunk).memory_analysis().temp_size_in_bytes)
    except Exception:  # memory_analysis is optional per backend
        return float("nan")


def decode_rate(fmt: str | None, k16, chunk: int, repeat: int) -> float:
    """Elements per second of decoding K chunk by chunk and reducing it over the keys (p.v pattern)."""
    n = (k16.shape[1] // chunk) * chunk
    w = jnp.asarray(np.random.default_rng(1).standard_normal((HKV, D)).astype(np.float32))
    if fmt is None:
        x = jnp.asarray(k16[0, :n])
        dec = lambda c: c.astype(jnp.float32)  # noqa: E731
    else:
        x = F.quantize(jnp.asarray(k16[0, :n].astype(np.float32)), fmt)
        dec = lambda c: F.dequantize(c, fmt)  # noqa: E731

    @jax.jit
    def run(x):
        xs = x.reshape((n // chunk, chunk) + x.shape[1:])
        return lax.scan(lambda acc, c: (acc + (dec(c) * w).sum(0), None), jnp.zeros((HKV, D), jnp.float32),
                        xs)[0]

    t = best_time(lambda: run(x), repeat)
    return n * HKV * D / t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-kv", type=int, default=32768)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--formats", default="Q4_0,Q8_0")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--dequant", action="store_true", help="also measure the per-chunk decode rate")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--emitted", action="store_true",
                   help="print the operations XLA emitted in attend's loop bodies (first format)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    n = a.n_kv
    q = jnp.asarray(rng.standard_normal((B, 1, H, D)).astype(np.float32))
    k16 = rng.standard_normal((B, n, HKV, D)).astype(np.float16)
    v16 = rng.standard_normal((B, n, HKV, D)).astype(np.float16)
    kj, vj = jnp.asarray(k16), jnp.asarray(v16)
    f32_cache = 2 * B * n * HKV * D * 4
    print(f"# machine: {machine()}")
    print(f"# shape: B={B} H={H} Hkv={HKV} D={D} n_kv={n} (cold {n - a.window} + hot {a.window} F16), "
          f"chunk {a.chunk}; F32 copy of the cache would be {f32_cache / 1e6:.0f} MB")
    ref16 = np.asarray(A.attention(q, k16, v16, scale=SCALE, precision="f64"))
    t16 = best_time(lambda: A.flash_decode(q, kj, vj, chunk=a.chunk, scale=SCALE), a.repeat)
    per_tok16 = 2 * HKV * D * 2
    rows = [dict(name="all F16 (flash_decode)", bpt=per_tok16, ms=t16 * 1e3, temp=float("nan"),
                 err=rel_err(A.flash_decode(q, kj, vj, chunk=a.chunk, scale=SCALE), ref16))]
    for fmt in a.formats.split(","):
        cache = build(fmt, k16, v16, a.window)
        kd, vd = C.to_dense(cache)
        ref = np.asarray(A.attention(q, kd, vd, scale=SCALE, precision="f64"))
        fn = lambda: C.attend(cache, q, scale=SCALE, chunk=a.chunk)  # noqa: E731
        err = rel_err(fn(), ref)
        t = best_time(fn, a.repeat)
        cold_bpt = 2 * HKV * F.row_bytes(fmt, D)
        bpt = ((n - a.window) * cold_bpt + a.window * per_tok16) / n
        rows.append(dict(name=f"{fmt} cold + {a.window} F16 (attend)", bpt=bpt, ms=t * 1e3,
                         temp=temp_bytes(cache, q, a.chunk), err=err))
    if a.markdown:
        print("\n| cache | bytes/token | F16 bytes / bytes | ms | F16 ms / ms | temp MB (F32 cache MB) "
              "| max rel err |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tmp = "—" if np.isnan(r["temp"]) else f"{r['temp'] / 1e6:.1f} ({f32_cache / 1e6:.0f})"
        if a.markdown:
            print(f"| {r['name']} | {r['bpt']:.0f} | {per_tok16 / r['bpt']:.2f}x | {r['ms']:.2f} | "
                  f"{t16 * 1e3 / r['ms']:.2f}x | {tmp} | {r['err']:.1e} |")
        else:
            print(f"{r['name']:32s} {r['bpt']:7.0f} B/token ({per_tok16 / r['bpt']:.2f}x fewer)  "
                  f"{r['ms']:8.2f} ms  F16/mixed {t16 * 1e3 / r['ms']:.2f}x  temp {tmp} MB  err {r['err']:.1e}")
    if a.dequant:
        print("\nper-chunk decode + key reduction alone (K only), elements/s:")
        for fmt in [None] + a.formats.split(","):
            rate = decode_rate(fmt, k16, a.chunk, a.repeat)
            print(f"  {fmt or 'F16':6s} {rate / 1e9:.2f} G elements/s")
    if a.emitted:
        fmt = a.formats.split(",")[0]
        print(f"\nXLA's loop bodies of attend ({fmt} cold + F16 hot, chunk {a.chunk}):")
        print("\n".join(loop_body_ops(compiled_attend(build(fmt, k16, v16, a.window), q, a.chunk).as_text())))
    bad = [r for r in rows if not r["err"] <= 1e-4]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of jaxkv.formats.dequantize (jitted) vs gguf.quants.dequantize on the same blocks.

    python benchmarks/bench_formats.py [--mib 64] [--repeat 5] [--formats q4_0,q8_0] [--malloc reuse]

For every format: the same ``--mib`` MiB of random ggml blocks (finite F16 scales) are dequantized by
both, each best-of-``--repeat`` after one warm-up, alternately on CPU (jax: ``block_until_ready``;
compile excluded). The outputs are checked equal bit for bit first. Printed: ms per call, GB/s of
float32 written, the ratio gguf/jax, the written GB/s as a fraction of the write bandwidth measured
in the same run (numpy filling a 512 MiB float32 array; on a GPU: a jitted ``jnp.full``), and the
'floor': a jitted ``jnp.full`` of a fresh float32 array of the same output size.

Allocation (``--malloc``): the output of every call is a fresh buffer, and at these sizes getting
fresh memory from the kernel costs as much as the dequantization. XLA's CPU buffers come from glibc
malloc without ``MADV_HUGEPAGE`` (numpy madvises its large arrays), so with transparent huge pages in
``madvise`` mode each 4 KiB page of a jitted output is faulted in and zeroed separately. The script
re-runs itself with glibc tunables, which apply to gguf/numpy in the same process alike:
``system`` (none), ``thp`` (``hugetlb=1``: huge pages, still zeroed by the kernel on every call), and
``reuse`` (default: ``thp`` plus one arena and no ``mmap`` for large blocks, so freed buffers are
reused as a caching allocator would, e.g. XLA's own on GPU): the steady state of a loop that
dequantizes repeatedly, which isolates the dequantizer's own cost.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gguf  # noqa: E402
import gguf.quants as gq  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxkv import formats as F  # noqa: E402

ORDER = list(F.FORMATS)  # every format of the type table, in its order


def _gguf_version():
    try:
        return importlib.metadata.version("gguf")
    except Exception:  # noqa: BLE001
        return "?"


def best_of(fn, repeat):
    fn()  # warm-up (and compile, for jax)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def best_of_pair(fa, fb, repeat):
    """Best-of-``repeat`` seconds of fa and fb, timed alternately (both see the same machine load)."""
    fa()
    if fb is not None:
        fb()
    ta, tb = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        if fb is not None:
            t = time.perf_counter()
            fb()
            tb.append(time.perf_counter() - t)
    return min(ta), (min(tb) if tb else float("nan"))


def write_bandwidth(nbytes, repeat):
    """GB/s of numpy filling a float32 array of ``nbytes`` (pages touched once before timing)."""
    a = np.empty(nbytes // 4, np.float32)
    a.fill(0.0)
    return nbytes / best_of(lambda: a.fill(1.0), repeat) / 1e9


def random_blocks(f, nbytes, seed=0):
    """uint8 [n_blocks * block_bytes] with random quants and finite, ordinary F16 scales."""
    r = np.random.default_rng(seed)
    nb = nbytes // f.block_bytes
    raw = r.integers(0, 256, (nb, f.block_bytes), dtype=np.uint8)
    if f.quantized:
        for fld in f.fields:
            if fld.kind == "f16":  # |scale| in [2^-10, 2^5): exponent field 5..19
                h = r.integers(5, 20, nb) << 10 | r.integers(0, 1024, nb) | r.integers(0, 2, nb) << 15
                raw[:, fld.offset:fld.offset + 2] = h.astype(np.uint16)[:, None].view(np.uint8)
    elif f.name in ("f16", "bf16"):
        h = raw.view(np.uint16)
        ok = 0x3C00 if f.name == "f16" else 0x3F80
        inf = 0x7C00 if f.name == "f16" else 0x7F80
        raw = np.where((h & 0x7FFF) >= inf, ok, h).astype(np.uint16).view(np.uint8)
    else:
        w = raw.view(np.uint32)
        raw = np.where((w & 0x7FFFFFFF) >= 0x7F800000, np.uint32(0x3F800000), w)
        raw = raw.astype(np.uint32).view(np.uint8)
    return np.ascontiguousarray(raw.reshape(-1))


def device_fill_bandwidth(nbytes, repeat):
    """GB/s of a jitted fill producing a fresh float32 array of ``nbytes`` on the default device."""
    fill = jax.jit(lambda x: jnp.full((nbytes // 4,), 1.0, jnp.float32) + x)
    x = jnp.zeros((), jnp.float32)
    return nbytes / best_of(lambda: fill(x).block_until_ready(), repeat) / 1e9


MALLOC = {  # glibc tunables per --malloc mode
    "system": "",
    "thp": "glibc.malloc.hugetlb=1",
    "reuse": ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
              "glibc.malloc.trim_threshold=68719476736"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB of blocks per format (default 64)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N timed calls after a warm-up")
    ap.add_argument("--formats", default=",".join(ORDER))
    ap.add_argument("--malloc", choices=list(MALLOC), default="reuse",
                    help="glibc malloc configuration the script re-runs itself under (module docstring)")
    args = ap.parse_args(argv)
    want = MALLOC[args.malloc]
    if os.environ.get("JAXKV_BENCH_MALLOC") != args.malloc:
        env = dict(os.environ, GLIBC_TUNABLES=want, JAXKV_BENCH_MALLOC=args.malloc)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    nbytes = args.mib << 20
    load = os.getloadavg()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), gguf-py {_gguf_version()}, "
          f"cpus {os.cpu_count()}, load avg {load[0]:.2f} {load[1]:.2f}, "
          f"--malloc {args.malloc} (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")
    bw = write_bandwidth(512 << 20, args.repeat)
    print(f"numpy fill of a 512 MiB float32 array: {bw:.2f} GB/s (the host's write bandwidth)")
    dbw = device_fill_bandwidth(512 << 20, args.repeat)
    print(f"jitted jnp.full of a fresh 512 MiB float32 array on {dev.platform}: {dbw:.2f} GB/s")
    if dev.platform != "cpu":
        bw = dbw  # '% of bw' below: of the device's fill
    print(f"{args.mib} MiB of blocks per format; best of {args.repeat} after warm-up\n")
    hdr = (f"{'format':8} {'out MiB':>8} {'jax ms':>8} {'gguf ms':>8} {'ratio':>6} {'jax GB/s':>9} "
           f"{'% of bw':>8} {'floor ms':>9}")
    print(hdr)
    print("-" * len(hdr))
    fails = []
    for name in args.formats.split(","):
        f = F.get_format(name)
        raw_np = random_blocks(f, nbytes - nbytes % f.block_bytes)
        raw = jax.device_put(raw_np)
        deq = jax.jit(lambda r, f=f: F.dequantize(r, f))
        out = np.asarray(deq(raw))
        gtype = gguf.GGMLQuantizationType(f.type_id)
        run_j = lambda: deq(raw).block_until_ready()  # noqa: E731
        run_g = None if name == "q8_1" else (lambda: gq.dequantize(raw_np, gtype))  # gguf-py: no Q8_1
        if run_g is not None:
            ref = run_g()
            if not np.array_equal(out.view(np.uint32), np.asarray(ref, np.float32).view(np.uint32)):
                fails.append(name)
            del ref
        if dev.platform == "cpu":  # same cores: alternate so both see the same load
            t_j, t_g = best_of_pair(run_j, run_g, args.repeat)
        else:  # alternating would let the accelerator clock down during each gguf call
            t_j = best_of(run_j, args.repeat)
            t_g = best_of(run_g, args.repeat) if run_g is not None else float("nan")
        fill = jax.jit(lambda x, n=out.size: jnp.full((n,), 1.0, jnp.float32) + x)
        t_f = best_of(lambda: fill(jnp.zeros((), jnp.float32)).block_until_ready(), args.repeat)
        out_bytes = out.size * 4
        gbs = out_bytes / t_j / 1e9
        print(f"{name:8} {out_bytes / 2**20:8.0f} {t_j * 1e3:8.1f} {t_g * 1e3:8.1f} {t_g / t_j:6.1f} "
              f"{gbs:9.2f} {100 * gbs / bw:7.0f}% {t_f * 1e3:9.1f}")
        del raw, out
    print("\nratio = gguf ms / jax ms (gguf's F32 'dequantize' is a zero-copy view; q8_1: gguf has none);"
          "\nfloor = a jitted jnp.full of a fresh float32 array of the same output size (allocation + write)")
    if fails:
        print(f"MISMATCH vs gguf: {fails}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

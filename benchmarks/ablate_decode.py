"""Ablations behind the decode numbers in docs/benchmarks.md: which formulation XLA:CPU runs fast.

    python benchmarks/ablate_decode.py [--n-kv 32768] [--repeat 7] [--only NAME,...]

Each ablation times two or more formulations of the same computation on the bench_decode shape (one
query, H=32, Hkv=8, D=128, K/V ``[n_kv, Hkv, D]``), best of ``--repeat`` after a warm-up, all variants of
one ablation interleaved call by call (so a busy machine slows them alike). Outputs of the variants of
one ablation are checked against each other (max relative difference printed).

- ``qk-layout``: q.k over F32 K chunks (scan over 1024-key chunks): query-major einsum
  (``hgd,chd->hgc``, what the first flash_decode did) vs key-major reduction (``[c, h, g]``).
- ``unit-axes``: the whole chunk kernel (F16 K/V, online merge, chunk 1024) with B=1 and n_q=1 kept as
  size-1 axes vs dropped before the products.
- ``schedule``: ``jaxkv.attention.flash_decode`` with the sequential scan of merges
  (``TWO_PASS_MAX_LOGITS = 0``) vs the two-pass schedule, chunks 1024 / 2048.
- ``f16-convert``: F16 -> F32 by ``astype`` vs by integer bit operations, in the chunk kernel (chunk 256).
- ``q4-decode``: decoding Q4_0 chunks and reducing over the keys (the p.v pattern): ``formats.dequantize``
  vs scales by integer ops vs scales behind an ``optimization_barrier`` vs planar blocks (quants and
  scales in separate arrays; low/high nibbles reduced separately; with the per-block scale), against
  F16 ``astype`` on the same pattern.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench_decode import D, H, HKV, SCALE, machine  # noqa: E402
from jaxkv import attention as A  # noqa: E402
from jaxkv import formats as F  # noqa: E402

G = H // HKV


def interleaved(fns: dict, args: dict, repeat: int) -> dict:
    """Best time of each jitted fn(*args[name]) with calls interleaved; also returns the outputs."""
    outs = {k: np.asarray(jax.block_until_ready(f(*args[k]))) for k, f in fns.items()}
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[k]))
            ts[k].append(time.perf_counter() - t0)
    return {k: (min(v), outs[k]) for k, v in ts.items()}


def report(title: str, res: dict, nbytes: float | None = None) -> None:
    first = next(iter(res.values()))[1].astype(np.float64)
    print(f"\n{title}")
    for k, (t, o) in res.items():
        d = np.max(np.abs(o.astype(np.float64) - first)) / max(np.max(np.abs(first)), 1e-30)
        gbs = f"  {nbytes / t / 1e9:6.2f} GB/s" if nbytes else ""
        print(f"  {k:52s} {t * 1e3:8.2f} ms{gbs}  rel diff {d:.1e}")


def f16_bits_to_f32(h):
    """F16 -> F32 by integer operations (exact: normals, subnormals, inf, NaN)."""
    u = lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32)
    sign = (u & 0x8000) << 16
    em = u & 0x7FFF
    e = em >> 10
    normal = (em << 13) + jnp.uint32(112 << 23)
    normal = jnp.where(e == 31, normal + jnp.uint32(112 << 23), normal)
    f = lax.bitcast_convert_type(normal | sign, jnp.float32)
    sub = (em & 0x3FF).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)
    return jnp.where(e == 0, jnp.where(sign != 0, -sub, sub), f)


def online(q, k, v, chunk, qk, pv, conv):
    """Online split-K over [n, Hkv, D] K/V with q [Hkv, G, D]; qk/pv give the two products."""
    n = k.shape[0]
    nc = n // chunk
    xs = (k.reshape(nc, chunk, HKV, D), v.reshape(nc, chunk, HKV, D))

    def body(carry, x):
        m, l, acc = carry
        s = qk(q, conv(x[0])) * float(SCALE)  # [c, h, g]
        mn = jnp.maximum(m, s.max(0))
        p = jnp.exp(s - mn[None])
        a = jnp.exp(m - mn)
        return (mn, l * a + p.sum(0), acc * a[..., None] + pv(p, conv(x[1]))), None

    init = (jnp.full((HKV, G), -jnp.inf, jnp.float32), jnp.zeros((HKV, G), jnp.float32),
            jnp.zeros((HKV, G, D), jnp.float32))
    (m, l, acc), _ = lax.scan(body, init, xs)
    return acc / l[..., None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-kv", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--only", default="qk-layout,unit-axes,schedule,f16-convert,q4-decode")
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    n = a.n_kv
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((HKV, G, D)).astype(np.float32))
    k16 = rng.standard_normal((n, HKV, D)).astype(np.float16)
    v16 = rng.standard_normal((n, HKV, D)).astype(np.float16)
    k, v = jnp.asarray(k16), jnp.asarray(v16)
    kb = k16.nbytes
    print(f"# machine: {machine()}")
    print(f"# n_kv={n}, Hkv={HKV}, G={G}, D={D}; K is {kb / 1e6:.0f} MB in F16")
    ident = lambda x: x  # noqa: E731
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    if "qk-layout" in only:
        k32 = k.astype(jnp.float32)

        def scan_qk(qk):
            def f(q, k):
                xs = k.reshape(n // 1024, 1024, HKV, D)
                return lax.scan(lambda c, kc: (c + qk(q, kc).max(), None), jnp.float32(0), xs)[0]
            return jax.jit(f)

        res = interleaved({
            "query-major einsum hgd,chd->hgc": scan_qk(lambda q, kc: jnp.einsum("hgd,chd->hgc", q, kc)),
            "key-major reduction (q * k).sum(-1) -> [c, h, g]":
                scan_qk(lambda q, kc: (q[None] * kc[:, :, None, :]).sum(-1)),
        }, {"query-major einsum hgd,chd->hgc": (q, k32),
            "key-major reduction (q * k).sum(-1) -> [c, h, g]": (q, k32)}, a.repeat)
        report("qk-layout: q.k over F32 K, scan of 1024-key chunks (output: max logit)", res, 2 * kb)

    if "unit-axes" in only:
        q4 = q[None, None]  # [1, 1, Hkv, G, D]
        k4, v4 = k[None], v[None]

        def unit(q, k, v):
            def qk(q, kc):
                return (q[:, None] * kc[:, :, None, :, None, :]).sum(-1)[0, :, 0]
            def pv(p, vc):
                return (p[None, :, None, :, :, None] * vc[:, :, None, :, None, :]).sum(1)[0, 0]
            return online(q, k, v, 1024, lambda q, kc: qk(q4, kc[None]), lambda p, vc: pv(p, vc[None]), f32)

        res = interleaved({
            "size-1 axes kept in the products": jax.jit(unit),
            "size-1 axes dropped": jax.jit(lambda q, k, v: online(
                q, k, v, 1024, lambda q, kc: (q[None] * kc[:, :, None, :]).sum(-1),
                lambda p, vc: (p[..., None] * vc[:, :, None, :]).sum(0), f32)),
        }, {"size-1 axes kept in the products": (q, k, v), "size-1 axes dropped": (q, k, v)}, a.repeat)
        del k4, v4
        report("unit-axes: chunk kernel, F16 K/V, online merge, chunk 1024", res, 2 * kb)

    if "schedule" in only:
        qc = jnp.asarray(rng.standard_normal((1, 1, H, D)).astype(np.float32))
        raw = A._flash_core.__wrapped__
        fns, args = {}, {}
        old = A.TWO_PASS_MAX_LOGITS
        try:
            for name, thr, chunk in (("sequential scan of merges, chunk 1024", 0, 1024),
                                     ("sequential scan of merges, chunk 2048", 0, 2048),
                                     ("two-pass, chunk 1024", 1 << 22, 1024),
                                     ("two-pass, chunk 2048", 1 << 22, 2048)):
                A.TWO_PASS_MAX_LOGITS = thr
                f = jax.jit(lambda q, k, v, c=chunk: raw(q, k, v, SCALE, None, 0.0, None, None, chunk=c,
                                                         precision="f32"))
                jax.block_until_ready(f(qc, k[None], v[None]))  # traced with this schedule
                fns[name], args[name] = f, (qc, k[None], v[None])
        finally:
            A.TWO_PASS_MAX_LOGITS = old
        report("schedule: jaxkv flash_decode, F16 K/V", interleaved(fns, args, a.repeat), 2 * kb)

    if "f16-convert" in only:
        qk = lambda q, kc: (q[None] * kc[:, :, None, :]).sum(-1)  # noqa: E731
        pv = lambda p, vc: (p[..., None] * vc[:, :, None, :]).sum(0)  # noqa: E731
        res = interleaved({
            "astype(float32)": jax.jit(lambda q, k, v: online(q, k, v, 256, qk, pv, f32)),
            "integer bit operations": jax.jit(lambda q, k, v: online(q, k, v, 256, qk, pv, f16_bits_to_f32)),
        }, {"astype(float32)": (q, k, v), "integer bit operations": (q, k, v)}, a.repeat)
        report("f16-convert: chunk kernel, F16 K/V, chunk 256", res, 2 * kb)

    if "q4-decode" in only:
        chunk = 1024
        nc = n // chunk
        w = jnp.asarray(rng.standard_normal((HKV, D)).astype(np.float32))
        raw = F.quantize(jnp.asarray(k16.astype(np.float32)), "Q4_0")  # [n, Hkv, 72]
        blocks = np.asarray(raw).reshape(n, HKV, 4, 18)
        d_planar = jnp.asarray(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
        qs_planar = jnp.asarray(np.ascontiguousarray(blocks[..., 2:]).reshape(n, HKV, 64))

        def over_chunks(dec):
            def f(*xs):
                xs = tuple(x.reshape((nc, chunk) + x.shape[1:]) for x in xs)
                return lax.scan(lambda c, x: (c + dec(*x), None), jnp.zeros((HKV, D), jnp.float32), xs)[0]
            return jax.jit(f)

        def scale_bits(b):  # F16 scale from its two bytes by integer ops
            u = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
            return f16_bits_to_f32(lax.bitcast_convert_type(u, jnp.float16))

        def q4_from_blocks(x, scale):
            b = x.reshape(x.shape[:-1] + (4, 18))
            qs = b[..., 2:]
            nib = jnp.stack([qs & 0xF, qs >> 4], axis=-2).astype(jnp.int32) - 8  # [..., 4, 2, 16]
            return (nib.astype(jnp.float32) * scale(b)[..., None, None]).reshape(x.shape[:-1] + (D,))

        def planar(qs, d, with_scale):
            x = qs.reshape(qs.shape[:-1] + (4, 16))
            lo = ((x & 0xF).astype(jnp.int32) - 8).astype(jnp.float32)
            hi = ((x >> 4).astype(jnp.int32) - 8).astype(jnp.float32)
            if with_scale:
                lo, hi = lo * d[..., None], hi * d[..., None]
            wr = w.reshape(HKV, 4, 2, 16)
            return jnp.stack([(lo * wr[:, :, 0]).sum(0), (hi * wr[:, :, 1]).sum(0)], axis=-2).reshape(HKV, D)

        f16_scale = lambda b: lax.bitcast_convert_type(  # noqa: E731
            b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8), jnp.float16).astype(jnp.float32)
        variants = {
            "F16 astype (reference pattern)": (over_chunks(lambda x: (x.astype(jnp.float32) * w).sum(0)), (k,)),
            "Q4_0 formats.dequantize": (over_chunks(lambda x: (F.dequantize(x, "Q4_0") * w).sum(0)), (raw,)),
            "Q4_0 blocks, scale by integer ops": (
                over_chunks(lambda x: (q4_from_blocks(x, scale_bits) * w).sum(0)), (raw,)),
            "Q4_0 blocks, scale behind optimization_barrier": (over_chunks(
                lambda x: (q4_from_blocks(x, lambda b: lax.optimization_barrier(f16_scale(b))) * w).sum(0)),
                (raw,)),
            "Q4_0 planar, nibbles reduced apart, no scale": (
                over_chunks(lambda qs, d: planar(qs, d, False)), (qs_planar, d_planar)),
            "Q4_0 planar, nibbles reduced apart, with scale": (
                over_chunks(lambda qs, d: planar(qs, d, True)), (qs_planar, d_planar)),
        }
        res = interleaved({k_: f for k_, (f, _) in variants.items()},
                          {k_: x for k_, (_, x) in variants.items()}, a.repeat)
        print("\nq4-decode: decode K chunk by chunk (1024 keys) and reduce over the keys (p.v pattern)")
        for k_, (t, _) in res.items():
            print(f"  {k_:52s} {t * 1e3:8.2f} ms  {n * HKV * D / t / 1e9:5.2f} G elements/s")
        print("  (rel diff not compared: the planar 'no scale' variant omits the scales on purpose)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ggml's tiled CPU flash-attention path (``ggml_compute_forward_flash_attn_ext_tiled``), emulated.

ggml-cpu takes it for F32 q, K and V both F16 or both F32, ``n_q >= GGML_FA_TILE_Q`` (64), off the
split-KV path, and -- in the builds that have the rule -- ``Dv % GGML_F32_EPR == 0`` (see
:data:`TILED_BUILDS`). What it computes, per 64-query tile of one head and per 64-key tile:

- K converted to F32 (F16 values exact), q *not* rounded; ``KQ = simd_gemm(q, K)``: every score is one
  sequential FMA chain over ``d = 0 .. Dk-1`` starting from 0 (the micro-kernel's lanes are keys);
- ``KQ *= scale`` (``scale / softcap`` with softcap), key slots past ``n_kv`` in the last tile set to
  -inf; softcap: ``tanhf`` then ``*= softcap`` (before the padding in ggml >= 0.25.3, after it before:
  there a padded slot becomes ``-softcap`` and, without a mask, takes part in the softmax);
  ``KQ += slope * mask`` (F16 mask, padded slots -inf);
- a key tile whose mask is -inf for every query of the query tile is skipped;
- per query: tile max; a row whose tile max is -inf is skipped (its probabilities zeroed); else
  ``Mnew = max(M, tile max)``; if it grew, the F32 accumulator and ``S`` are scaled by glibc
  ``expf(M - Mnew)``; ``S += ggml_vec_soft_max_f32(64, p, KQ, Mnew)`` (SIMD ``ggml_v_expf``, sum in
  double, added to the float ``S`` in double);
- ``VKQ = simd_gemm(p, V)``: every output element is one FMA chain over the 64 key slots of the tile,
  padded slots included (their V slots hold the previous packed tile's rows, zeros in the first);
- sinks after the last tile (``S = S*ms + vs``: whether that is one FMA is a build fact,
  :data:`SINKS_FUSED`), then ``VKQ *= (S == 0 ? 0 : 1/S)``.

Rows are independent except through the key-tile skip (which drops a tile's ``fma(v, 0, acc)`` terms:
only the sign of a zero or an inf/NaN in V can tell); that skip is modelled with ggml's query tiles,
which follow its thread chunking (:func:`query_tiles`). Padded V slots: exact whenever no key tile is
skipped; after a skipped tile ggml's slots may hold an older tile than modelled (they only ever meet a
zero probability there, so again only signed zeros / non-finite V can differ).

Read from ggml-org/ggml ``src/ggml-cpu/ops.cpp``, ``simd-gemm.h``, ``vec.cpp``, ``common.h`` at v0.20.2 and
v0.21.0 (identical tiled path) and llama.cpp's vendored ggml 0.25.3 (llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import formats
from jaxkv.ggml_cpu import kernels as _k
from jaxkv.ggml_cpu.dot import get_isa
from jaxkv.ggml_cpu.fp import F64, add32, div32, expf, fma32, mul32, r32, sub32, tanhf

__all__ = ["TiledBuild", "TILED_BUILDS", "SINKS_FUSED", "DEFAULT_VERSION", "tiled_build", "trace_version",
           "takes_tiled", "query_tiles", "regroup_tiles", "tiled_core"]


@dataclass(frozen=True)
class TiledBuild:
    """Facts of the tiled path in ggml versions from ``since`` on (until the next entry).

    q_tile / kv_tile: ``GGML_FA_TILE_Q`` / ``GGML_FA_TILE_KV``; dv_lanes_x86: the path needs
    ``Dv % GGML_F32_EPR == 0`` on x86 (else the per-row loop runs); softcap_after_pad: the padded key
    slots are set to -inf *before* tanh/softcap (so they become ``-softcap``)."""

    since: tuple[int, int, int]
    q_tile: int = 64
    kv_tile: int = 64
    dv_lanes_x86: bool = True
    softcap_after_pad: bool = True


#: known builds, oldest first; versions before the first have no tiled path (it came in ggml 0.9.6).
#: 0.20.2 / 0.21.0: read; 0.25.3: read (the Dv rule is gone on x86: a ``simd_gemm`` masked-FMA tail
#: covers the leftover columns, the same FMA chain per column; softcap moved before the padding).
#: Versions between 0.21.0 and 0.25.3 are not read: they are given the older facts.
TILED_BUILDS: tuple[TiledBuild, ...] = (
    TiledBuild(since=(0, 9, 6)),
    TiledBuild(since=(0, 25, 3), dv_lanes_x86=False, softcap_after_pad=False),
)
#: whether the compiler fused the sinks step ``S = S*ms + vs`` of the tiled path into one FMA, per
#: modelled build (a fact of the build, apart from ``Contract.sum_update`` of the per-row loop), measured:
#: the libggml-python 0.20.2 AVX2 wheel fuses it (tests/data/ggml020_tiled_f32_gqa_sinks_d40.gguf: 3.1 units
#: unfused, bit-exact fused) although it does not fuse the per-row loop's; a native AVX-512 GCC build of
#: ggml 0.25.3 fuses it too (tests/data/ggml025_tiled_f32_d60_sinks_t2.gguf).
SINKS_FUSED: dict[str, bool] = {"avx512": True, "avx512fp16": True, "avx2": True}  # avx512fp16: as avx512 (unmeasured)
#: the version assumed for a trace that does not say (the shared traces: ggml 0.21)
DEFAULT_VERSION = "0.21.0"

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def tiled_build(version=None) -> TiledBuild | None:
    """The :class:`TiledBuild` of ggml ``version`` ("0.20.2", "v0.25.3", a tuple; None = DEFAULT_VERSION),
    or None for versions without the tiled path. A string that is no version raises ValueError."""
    version = DEFAULT_VERSION if version is None else version
    if isinstance(version, str):
        m = _VERSION.match(version)
        if m is None:
            raise ValueError(f"version: expected a ggml version such as '0.20.2', got {version!r}")
        v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    else:
        v = tuple(int(x) for x in version)
    found = None
    for b in TILED_BUILDS:
        if v >= b.since:
            found = b
    return found


_PRODUCER_VERSION = re.compile(r"\bggml\s+v?(\d+\.\d+(?:\.\d+)?)\b")


def trace_version(metadata, producer) -> str | None:
    """The ggml release a trace names: metadata ``ggml.version`` (``python -m fuzz record`` writes it),
    else a version after "ggml" in the producer ("ggml 0.20.2 (8c63e70) CPU avx2 n_threads=2"), else
    None (the model's DEFAULT_VERSION applies)."""
    md = metadata or {}
    if md.get("ggml.version"):
        return str(md["ggml.version"])
    m = _PRODUCER_VERSION.search(str(producer or ""))
    return m.group(1) if m else None


def takes_tiled(n_q: int, B: int, k_type: str, v_type: str, dv: int, isa, version=None) -> bool:
    """Whether ggml's CPU flash_attn_ext (F32 q) takes the tiled path: not the split-KV path (n_q == 1),
    K and V both F16 or both F32, n_q >= q_tile, and (where the build has the rule) Dv a multiple of the
    ISA's F32 lanes."""
    b = tiled_build(version)
    if b is None or k_type != v_type or k_type not in formats.FLOAT_KV_TYPES or n_q < b.q_tile:
        return False
    return not (b.dv_lanes_x86 and dv % get_isa(isa).f32_epr)


def query_tiles(B: int, H: int, n_q: int, n_threads: int, q_tile: int = 64) -> tuple[np.ndarray, int]:
    """ggml's query tiles: int ids [B, H, n_q] (rows of one tile share an id) and their count.

    Rows ``ir = (b*H + h)*n_q + i`` are cut into ``nchunk`` chunks of ``dr`` rows (``4*n_threads``
    chunks, or ``n_threads`` when that gives fewer chunks than threads or n_threads == 1); a chunk into
    tiles of at most ``q_tile`` rows that never cross a head."""
    nr = B * H * n_q
    nth = int(n_threads)
    cs = -(-nr // (nth * 4))
    nchunk = -(-nr // cs)
    if nth == 1 or nchunk < nth:
        nchunk = nth
    dr = -(-nr // nchunk)
    ids = np.zeros(nr, np.int32)
    t = 0
    for c in range(nchunk):
        ir, ir1 = dr * c, min(dr * c + dr, nr)
        while ir < ir1:
            rows = min(q_tile, ir1 - ir, n_q - ir % n_q)
            ids[ir:ir + rows] = t
            t += 1
            ir += rows
    return ids.reshape(B, H, n_q), t


def _pad_keys(x, n_pad: int, axis: int, value):
    if not n_pad:
        return x
    shape = list(x.shape)
    shape[axis] = n_pad
    return jnp.concatenate([x, jnp.full(shape, value, x.dtype)], axis=axis)


@partial(jax.jit, static_argnames=("isa", "kv_tile", "softcap_on", "softcap_after_pad", "sinks_fused"))
def tiled_core(qg, k, v, scale, softcap, slopes_g, mask_g, sinks_g, tile_ids, *, isa, kv_tile, softcap_on,
               softcap_after_pad, sinks_fused):
    """qg [B, n_q, Hkv, G, Dk] f32 carriers (q unrounded); k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv] f32
    carriers (F16 or F32 values); slopes_g [Hkv, G]; mask_g [B|1, n_q, Hkv|1, G|1, n_kv] (F16 mask values)
    or None; sinks_g [Hkv, G] or None; tile_ids int [B, n_q, Hkv, G] (:func:`query_tiles`, regrouped)
    -> f32 carriers (float64) [B, n_q, Hkv, G, Dv]."""
    B, n_q, hkv, g, _ = qg.shape
    n_kv, dv = k.shape[1], v.shape[-1]
    lead = (B, n_q, hkv, g)
    n_t = -(-n_kv // kv_tile)
    pad = n_t * kv_tile - n_kv

    # KQ: one FMA chain over d per score (simd_gemm, C zeroed), then *scale
    kt = jnp.transpose(k, (3, 0, 2, 1))[:, :, None, :, None, :]   # [Dk, B, 1, Hkv, 1, n_kv]
    qt = jnp.moveaxis(qg, -1, 0)[..., None]                        # [Dk, B, n_q, Hkv, G, 1]

    def dot_step(acc, xs):
        kd, qd = xs
        return fma32(kd, qd, acc), None

    kq, _ = lax.scan(dot_step, jnp.zeros(lead + (n_kv,), F64), (kt, qt))
    sc = div32(scale, softcap) if softcap_on else r32(scale)
    s = mul32(kq, sc)
    if softcap_on and not softcap_after_pad:
        s = mul32(tanhf(s), softcap)
    s = _pad_keys(s, pad, -1, -jnp.inf)
    if softcap_on and softcap_after_pad:   # tanhf(-inf) = -1: padded slots become -softcap
        s = mul32(tanhf(s), softcap)
    if mask_g is None:
        live_tile = jnp.ones(lead + (n_t,), bool)
    else:
        mv = mul32(slopes_g[:, :, None], jnp.asarray(mask_g, F64))
        mv = _pad_keys(jnp.broadcast_to(mv, lead + (n_kv,)), pad, -1, -jnp.inf)
        s = add32(s, mv)
        live = (mv != -jnp.inf).reshape(lead + (n_t, kv_tile)).any(-1)   # [B, n_q, Hkv, G, n_t]
        # a key tile is skipped for a whole query tile when no row of it has a live key there
        ids = tile_ids.reshape(-1)
        tile_any = jax.ops.segment_max(live.reshape(-1, n_t).astype(jnp.int32), ids, num_segments=ids.size)
        live_tile = tile_any[ids].reshape(lead + (n_t,)) > 0

    # V slots per key tile; padded slots hold the previous tile's rows (zeros in the first)
    vp = jnp.zeros((B, n_t * kv_tile, hkv, dv), F64)
    vp = vp.at[:, :n_kv].set(v)
    if pad and n_t > 1:
        start = (n_t - 1) * kv_tile
        vp = vp.at[:, n_kv:].set(v[:, start - kv_tile + (kv_tile - pad):start])
    v_t = jnp.moveaxis(vp.reshape(B, n_t, kv_tile, hkv, dv), 1, 0)      # [n_t, B, 64, Hkv, Dv]
    s_t = jnp.moveaxis(s.reshape(lead + (n_t, kv_tile)), -2, 0)         # [n_t, B, n_q, Hkv, G, 64]
    proc_t = jnp.moveaxis(live_tile, -1, 0)                             # [n_t, B, n_q, Hkv, G]

    def tile_step(carry, xs):
        M, S, acc = carry
        st, vt, proc = xs
        tmax = jnp.max(st, axis=-1)
        row = proc & (tmax != -jnp.inf)
        mnew = jnp.where(row, jnp.maximum(M, tmax), M)
        up = row & (mnew > M)
        ms = expf(sub32(M, jnp.where(up, mnew, M)))
        acc = jnp.where(up[..., None], mul32(acc, ms[..., None]), acc)
        S = jnp.where(up, mul32(S, ms), S)
        y, tot = _k._row_exp_sum(st, jnp.where(row, mnew, 0.0), isa)
        S = jnp.where(row, r32(S + tot), S)
        y = jnp.where(row[..., None], y, 0.0)
        def slot(a, xs):  # simd_gemm(VKQ, p, V): one FMA per key slot, in slot order
            vj, yj = xs
            return fma32(vj[:, None, :, None, :], yj[..., None], a), None

        a, _ = lax.scan(slot, acc, (jnp.moveaxis(vt, 1, 0), jnp.moveaxis(y, -1, 0)))
        acc = jnp.where(proc[..., None], a, acc)
        return (mnew, S, acc), None

    init = (jnp.full(lead, -jnp.inf, F64), jnp.zeros(lead, F64), jnp.zeros(lead + (dv,), F64))
    (M, S, acc), _ = lax.scan(tile_step, init, (s_t, v_t, proc_t))

    if sinks_g is not None:
        sk = jnp.broadcast_to(jnp.asarray(sinks_g, F64), lead)
        upk = sk > M
        ms = jnp.where(upk, expf(sub32(M, jnp.where(upk, sk, M))), 1.0)
        vs = jnp.where(upk, 1.0, expf(sub32(sk, jnp.where(M == -jnp.inf, sk, M))))
        acc = jnp.where(upk[..., None], mul32(acc, ms[..., None]), acc)
        S = fma32(S, ms, vs) if sinks_fused else add32(mul32(S, ms), vs)
    inv = jnp.where(S == 0, 0.0, div32(1.0, jnp.where(S == 0, 1.0, S)))
    return mul32(acc, inv[..., None])


def regroup_tiles(ids: np.ndarray, hkv: int) -> np.ndarray:
    """query tile ids [B, H, n_q] -> [B, n_q, Hkv, G] (the layout of :func:`tiled_core`)."""
    B, H, n_q = ids.shape
    return np.transpose(ids, (0, 2, 1)).reshape(B, n_q, hkv, H // hkv)

"""The ggml CPU attention kernels, emulated: ``flash_attn_ext`` (per-row online softmax, split-KV
partials and their reduction) and the unfused ``mul_mat -> soft_max_ext -> mul_mat`` path.

Inputs here are already validated and grouped; see :mod:`jaxkv.ggml_cpu` for the public API.
Shapes: q [B, n_q, Hkv, G, Dk] f32 carriers; k / v per type (below); bias inputs [B, n_q, Hkv, G, n_kv].
Inputs and outputs are f32 carriers (float64): XLA on CPU flushes float32 subnormals to zero in every
float32 <-> float64 conversion, so the public functions convert on the host (numpy).

Compiler contractions: where the compiler fused ``a*b + c`` into one FMA depends on the build of
ggml, not on the source, so it is data (:class:`Contract`, one default per modelled build in
:data:`BUILD_CONTRACT`). Established against ground truth:

- the shared traces (ggml 0.21, GCC, ``-march=native`` on AVX-512): ``S = S*ms + vs`` fused on both
  paths; the partials' reduction ``acc*so + acc_c*sn`` computed as ``fma(acc, so, round(acc_c*sn))``
  (GCC fuses the first product of a sum of two products);
- the libggml-python AVX2 wheel (ggml 0.20.2, checked live through ``jaxkv.oracles.ggml``):
  ``S*ms + vs`` *not* fused, neither in the per-row loop nor on the split-KV path (64 of 64
  format x path cells bitwise equal with live ggml: ``benchmarks/bench_ggml_model.py --seeds 2``; fused
  on the split path broke 7 of 24 split-KV cases); the reduction fused as above; ``s*scale + mv`` not fused (checked with a non-power-of-two scale and a random mask).

- ggml 0.25.3 built natively by GCC 12.2 on AVX-512 (llama-cpp-python 0.3.36, checked live): the key
  loop's ``S*ms + vs`` fused on both paths, the sinks step's not (:attr:`Contract.sinks_update`).

F16 V on an AVX512-FP16 build (isa "avx512fp16", ggml >= 0.9.8): ``ggml_vec_mad_f16`` /
``ggml_vec_scale_f16`` compute the first ``DV - DV % 128`` elements in native FP16 (the factor rounded
to F16, one F16 rounding per FMA / product), the rest in F32 stored as F16 (:func:`_mad_f16`).

Not constrained by any available ground truth (powers of two make both roundings equal there):
``s*scale + mv`` for the AVX-512 build (assumed not fused: ``s`` passes the softcap branch in between)
and ``soft_max``'s ``wp[i] += slope*mask[i]`` (assumed fused).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv import formats
from jaxkv.ggml_cpu import dot as _dot
from jaxkv.ggml_cpu import sgemm as _sgemm
from jaxkv.ggml_cpu.fp import (F64, add32, div32, expf, fma16, fma32, mul16, mul32, r16, r32, sub32, tanhf,
                               v_expf)

__all__ = ["Contract", "BUILD_CONTRACT", "CONTRACT_KEY", "scores", "fa_core", "softmax_attn_core"]


@dataclass(frozen=True)
class Contract:
    """Where the compiler fused a multiply and an add into one FMA (True) or not (False)."""

    score_mask: bool = False        # s*scale + mv (no softcap)
    sum_update: bool = True         # S*ms + vs in the per-row loop over the keys
    sum_update_split: bool = True   # S*ms + vs in the key loop on the split-KV path
    sinks_update: bool = True       # S*ms + vs of the sinks step after the key loop (both paths)
    reduce_partials: bool = True    # acc*so + acc_c*sn -> fma(acc, so, acc_c*sn)
    softmax_mask: bool = True       # wp + slope*mask

    @classmethod
    def from_metadata(cls, md, base: "Contract") -> "Contract":
        """``base`` with the fields named by ``ggml.contract.<field>`` keys of a trace's metadata
        (values true/false, 1/0 or "true"/"false") replaced. Unknown fields or values raise ValueError
        naming the key."""
        names = {f.name for f in fields(cls)}
        over = {}
        for key, val in (md or {}).items():
            if not str(key).startswith(CONTRACT_KEY):
                continue
            name = str(key)[len(CONTRACT_KEY):]
            if name not in names:
                raise ValueError(f"{key}: unknown contraction fact (known: {', '.join(sorted(names))})")
            word = str(val).strip().lower()
            if word not in ("true", "false", "1", "0"):
                raise ValueError(f"{key}: expected true or false, got {val!r}")
            over[name] = word in ("true", "1")
        return replace(base, **over)

    def to_metadata(self) -> dict:
        """The ``ggml.contract.<field>`` metadata keys of this contract (values "true"/"false")."""
        return {CONTRACT_KEY + f.name: str(getattr(self, f.name)).lower() for f in fields(self)}


#: prefix of the trace metadata keys holding contraction facts (``ggml.contract.sinks_update``)
CONTRACT_KEY = "ggml.contract."


#: default contraction of each modelled build: "avx512" = the shared traces' build (ggml 0.21) and ggml
#: 0.25.3 (llama-cpp-python 0.3.36) built natively by GCC 12.2 on AVX-512, "avx512fp16" = that release
#: built natively on an AVX512-FP16 CPU (issue #13: the key loop fused, the sinks step not), "avx2" = the
#: libggml-python 0.20.2 AVX2 wheel. ``sinks_update``: the 0.25.3 AVX-512 build fuses the key loop's
#: ``S*ms + vs`` on both paths but not the sinks step's (live, 12 calls with sinks above the row maximum:
#: 0 of 4608 outputs differ with sinks_update=False, 251 with True); the AVX2 wheel does not fuse it either
#: (6 calls, per-row and split-KV: 0 of 2304 with False, 242 with True); the shared traces' sinks trace is
#: equal either way. (The tiled path's sinks step is a separate fact: ``tiled.SINKS_FUSED``.) A trace's ``ggml.contract.<field>`` metadata overrides these (:meth:`Contract.from_metadata`).
BUILD_CONTRACT: dict[str, Contract] = {
    "avx512": Contract(sinks_update=False),
    "avx512fp16": Contract(sinks_update=False),
    "avx2": Contract(sum_update=False, sum_update_split=False, sinks_update=False),
}


def _mad(a, b, c, fused: bool):
    return fma32(a, b, c) if fused else add32(mul32(a, b), c)


# ----------------------------------------------------------------------------------------------------
# K . q for every key


def _k_operand(k, k_type: str):
    """K as an f32-carrier array [B, n_kv, Hkv, Dk] (float types) or formats.Blocks (block types)."""
    if k_type in formats.FLOAT_KV_TYPES:
        return jnp.asarray(k).astype(F64)
    return formats.decode_blocks(k.raw, k.fmt)


def scores(qg, k, k_type: str, isa, q0_sgemm: bool = False):
    """Raw dots ``vec_dot(k_j, convert(q_i))`` -> f32 carriers [B, n_q, Hkv, G, n_kv].

    qg [B, n_q, Hkv, G, Dk] f32 carriers; k [B, n_kv, Hkv, Dk] float16/float32 array or QuantArray.
    ``q0_sgemm``: block K through llamafile's ``tinyBLAS_Q0_AVX`` (:func:`.sgemm.q0_dot`) instead."""
    dot_type = formats.get_format(k_type).dot_type
    qc = _dot.convert_q(qg, dot_type)
    kop = _k_operand(k, k_type)
    if k_type in formats.FLOAT_KV_TYPES:
        kk = jnp.transpose(kop, (0, 2, 1, 3))[:, None, :, None]  # [B, 1, Hkv, 1, n_kv, Dk]
        x = qc[:, :, :, :, None, :]
        return _dot.dot_f16(x, kk, isa) if k_type == "f16" else _dot.dot_f32(x, kk, isa)
    kb = formats.Blocks(
        q=jnp.transpose(kop.q, (0, 2, 1, 3, 4))[:, None, :, None],       # [B,1,Hkv,1,n_kv,nb,32]
        d=jnp.transpose(kop.d, (0, 2, 1, 3))[:, None, :, None],
        m=None if kop.m is None else jnp.transpose(kop.m, (0, 2, 1, 3))[:, None, :, None],
        s=None)
    qb = formats.Blocks(q=qc.q[:, :, :, :, None], d=qc.d[:, :, :, :, None], m=None,
                        s=None if qc.s is None else qc.s[:, :, :, :, None])
    return _sgemm.q0_dot(kb, qb) if q0_sgemm else _dot.dot_blocks(kb, k_type, qb)


def _v_rows(v, v_type: str):
    """V rows as f32 carriers [B, n_kv, Hkv, Dv] (what ggml accumulates: F16 values, or F32 values /
    ``dequantize_row_*`` output)."""
    if v_type in formats.FLOAT_KV_TYPES:
        return jnp.asarray(v).astype(F64)
    return formats.dequantize(v.raw, v.fmt).astype(F64)


# ----------------------------------------------------------------------------------------------------
# flash_attn_ext


def _scale_f16(acc, ms, n16: int):
    """``ggml_vec_scale_f16(DV, acc, ms)`` on F16 values [..., DV]: the first ``n16`` elements in native
    FP16 SIMD (``vmulph`` by ``(_Float16)ms``), the rest (all, where n16 = 0) in F32 math, stored as F16."""
    tail = r16(mul32(acc[..., n16:], ms))
    if not n16:
        return tail
    return jnp.concatenate([mul16(acc[..., :n16], r16(ms)), tail], axis=-1)


def _mad_f16(*, acc, v, s, n16: int):
    """``ggml_vec_mad_f16(DV, acc, v, s)``: acc + v*s on F16 values [..., DV]; the first ``n16`` elements
    in native FP16 SIMD (``vfmadd*ph`` with ``(_Float16)s``: one rounding to F16), the rest as an F32 FMA
    stored as F16 (the F32-converting SIMD and the contracted scalar leftovers)."""
    tail = r16(fma32(v[..., n16:], s, acc[..., n16:]))
    if not n16:
        return tail
    return jnp.concatenate([fma16(v[..., :n16], r16(s), acc[..., :n16]), tail], axis=-1)


@partial(jax.jit, static_argnames=("k_type", "v_type", "isa", "n_chunks", "softcap_on", "contract"))
def fa_core(qg, k, v, scale, softcap, slopes_g, mask_g, sinks_g, *, k_type, v_type, isa, n_chunks,
            softcap_on, contract):
    """qg [B, n_q, Hkv, G, Dk] f32 carriers; slopes_g [Hkv, G]; mask_g [B|1, n_q|1, Hkv|1, G|1, n_kv]
    or None; sinks_g [Hkv, G] or None -> out f32 carriers (float64) [B, n_q, Hkv, G, Dv]: converting
    them to float32 inside XLA would flush float32 subnormals to zero, so the caller does it on the host.

    n_chunks > 1: ggml's split-KV path (chunks of ceil(n_kv / n_chunks) keys, partials reduced in
    order); 1: the per-row loop over all keys."""
    B, n_q, hkv, g, _ = qg.shape
    n_kv = k.shape[1]
    dv = v.shape[-1]
    lead = (B, n_q, hkv, g)

    # logits: s = dot*scale; softcap*tanhf(s); s += slope*mask; key skipped where mv == -inf
    sc = div32(scale, softcap) if softcap_on else r32(scale)
    raw = scores(qg, k, k_type, isa)
    if mask_g is None:
        mv = jnp.zeros((1,) * 5, F64)
    else:
        mv = mul32(slopes_g[:, :, None], jnp.asarray(mask_g, F64))
    mv = jnp.broadcast_to(mv, lead + (n_kv,))
    if softcap_on:
        s = add32(mul32(softcap, tanhf(mul32(raw, sc))), mv)
    else:
        s = _mad(raw, sc, mv, contract.score_mask)
    live = mv != -jnp.inf

    # keys -> [L, P, ...] with P chunks of L keys (padding keys are dead)
    L = -(-n_kv // n_chunks)
    pad = L * n_chunks - n_kv
    vr = _v_rows(v, v_type)  # [B, n_kv, Hkv, Dv]
    s_t = jnp.moveaxis(s, -1, 0)
    live_t = jnp.moveaxis(live, -1, 0)
    v_t = jnp.moveaxis(vr, 1, 0)  # [n_kv, B, Hkv, Dv]
    if pad:
        s_t = jnp.concatenate([s_t, jnp.zeros((pad,) + s_t.shape[1:], F64)])
        live_t = jnp.concatenate([live_t, jnp.zeros((pad,) + live_t.shape[1:], bool)])
        v_t = jnp.concatenate([v_t, jnp.zeros((pad,) + v_t.shape[1:], F64)])

    def chunked(x):
        return jnp.swapaxes(x.reshape((n_chunks, L) + x.shape[1:]), 0, 1)

    s_t, live_t, v_t = chunked(s_t), chunked(live_t), chunked(v_t)
    f16_acc = v_type == "f16"
    st16 = _dot.get_isa(isa).f16_arith_step
    n16 = dv - dv % st16 if st16 else 0  # leading V elements the ISA's native FP16 SIMD handles
    fuse_sum = contract.sum_update_split if n_chunks > 1 else contract.sum_update

    def step(carry, xs):
        M, S, acc = carry
        sj, lj, vj = xs  # [P, B, n_q, Hkv, G], same, [P, B, Hkv, Dv]
        vj = vj[:, :, None, :, None, :]
        newmax = lj & (sj > M)
        ms = jnp.where(newmax, expf(sub32(M, sj)), 1.0)
        vs = jnp.where(newmax, 1.0, expf(sub32(sj, jnp.where(M == -jnp.inf, sj, M))))
        if f16_acc:  # ggml_vec_scale_f16 / ggml_vec_mad_f16 (F16 storage)
            scaled = jnp.where(newmax[..., None], _scale_f16(acc, ms[..., None], n16), acc)
            acc_n = _mad_f16(acc=scaled, v=vj, s=vs[..., None], n16=n16)
        else:        # ggml_vec_scale_f32 / ggml_vec_mad_f32
            scaled = jnp.where(newmax[..., None], mul32(acc, ms[..., None]), acc)
            acc_n = fma32(vj, vs[..., None], scaled)
        S_n = _mad(S, ms, vs, fuse_sum)
        M = jnp.where(newmax, sj, M)
        S = jnp.where(lj, S_n, S)
        acc = jnp.where(lj[..., None], acc_n, acc)
        return (M, S, acc), None

    P = n_chunks
    init = (jnp.full((P,) + lead, -jnp.inf, F64), jnp.zeros((P,) + lead, F64),
            jnp.zeros((P,) + lead + (dv,), F64))
    (M, S, acc), _ = lax.scan(step, init, (s_t, live_t, v_t))

    # sinks join chunk 0 only (ic_start == 0), after the F16 accumulator became F32
    if sinks_g is not None:
        sk = jnp.broadcast_to(jnp.asarray(sinks_g, F64), lead)
        M0, S0, a0 = M[0], S[0], acc[0]
        up = sk > M0
        ms = jnp.where(up, expf(sub32(M0, sk)), 1.0)
        vs = jnp.where(up, 1.0, expf(sub32(sk, jnp.where(M0 == -jnp.inf, sk, M0))))
        a0 = jnp.where(up[..., None], mul32(a0, ms[..., None]), a0)
        S0 = _mad(S0, ms, vs, contract.sinks_update)
        M0 = jnp.where(up, sk, M0)
        M, S, acc = M.at[0].set(M0), S.at[0].set(S0), acc.at[0].set(a0)

    if P == 1:
        S1, a1 = S[0], acc[0]
        inv = jnp.where(S1 == 0, 0.0, div32(1.0, jnp.where(S1 == 0, 1.0, S1)))
        return mul32(a1, inv[..., None])

    # ggml_flash_attn_ext_reduce_partials: chunks in order, skipping S == 0
    Mf = jnp.full(lead, -jnp.inf, F64)
    Sf = jnp.zeros(lead, F64)
    af = jnp.zeros(lead + (dv,), F64)
    for c in range(P):
        if c * L >= n_kv:
            continue
        Mc, Sc, ac = M[c], S[c], acc[c]
        use = Sc != 0
        Mn = jnp.maximum(Mf, Mc)
        so = expf(sub32(Mf, Mn))
        sn = expf(sub32(Mc, Mn))
        af_n = _mad(af, so[..., None], mul32(ac, sn[..., None]), contract.reduce_partials)
        Sf_n = _mad(Sf, so, mul32(Sc, sn), contract.reduce_partials)
        af = jnp.where(use[..., None], af_n, af)
        Sf = jnp.where(use, Sf_n, Sf)
        Mf = jnp.where(use, Mn, Mf)
    inv = div32(1.0, jnp.where(Sf == 0, 1.0, Sf))
    return jnp.where(Sf[..., None] != 0, mul32(af, inv[..., None]), af)


# ----------------------------------------------------------------------------------------------------
# mul_mat -> soft_max_ext -> mul_mat


def _row_exp_sum(x, mx, isa):
    """``ggml_vec_soft_max_f32(n, y, x, max)`` along the last axis -> (y f32 carriers, sum float64)."""
    isa = _dot.get_isa(isa)
    n = x.shape[-1]
    w = isa.vexp_width
    nv = n - n % w
    d = sub32(x, mx[..., None])
    parts = []
    total = jnp.zeros(x.shape[:-1], F64)
    if nv:
        yv = v_expf(d[..., :nv], isa.name)
        parts.append(yv)
        blocks = yv.reshape(yv.shape[:-1] + (nv // w, w))
        bsum = _dot._reduce_tree(blocks) if w == 16 else _dot.hsum_float_8(blocks)
        for i in range(nv // w):  # sum += (ggml_float) reduce(val), chunk by chunk
            total = total + bsum[..., i]
    if nv < n:
        ys = expf(d[..., nv:])
        parts.append(ys)
        for i in range(n - nv):
            total = total + ys[..., i]
    return jnp.concatenate(parts, axis=-1), total


@partial(jax.jit, static_argnames=("k_type", "v_type", "isa", "contract", "kq_path", "sgemm_kqv"))
def softmax_attn_core(qg, k, v, scale, slopes_g, mask_g, *, k_type, v_type, isa, contract, kq_path="vec_dot",
                      sgemm_kqv=False):
    """Unfused attention: kq = mul_mat(k, q); soft_max_ext(kq, mask, scale, max_bias);
    kqv = mul_mat(v^T, kq). qg [B, n_q, Hkv, G, Dk]; v [B, n_kv, Hkv, Dv] (F16 or F32) ->
    f32 carriers (float64) [B, n_q, Hkv, G, Dv] (see :func:`fa_core`). ``kq_path`` ("vec_dot", "sgemm",
    "sgemm_q0") / ``sgemm_kqv``: the mul_mat's path (:func:`jaxkv.ggml_cpu.sgemm.mul_mat_path`)."""
    if kq_path == "sgemm":  # F16 / F32 K: q converted to K's type, one FMA accumulator per dot
        kk = jnp.transpose(_k_operand(k, k_type), (0, 2, 1, 3))[:, None, :, None]  # [B,1,Hkv,1,n_kv,Dk]
        qc = _dot.convert_q(qg, formats.get_format(k_type).dot_type)[:, :, :, :, None, :]
        kq = _sgemm.sgemm_dot(kk, qc, isa)
    else:
        kq = scores(qg, k, k_type, isa, q0_sgemm=kq_path == "sgemm_q0")  # [B, n_q, Hkv, G, n_kv]
    w = mul32(kq, r32(scale))                             # ggml_vec_scale_f32
    if mask_g is not None:
        w = _mad(slopes_g[:, :, None], jnp.asarray(mask_g, F64), w, contract.softmax_mask)
    mx = jnp.max(w, axis=-1)
    y, total = _row_exp_sum(w, mx, isa)
    inv = r32(1.0 / total)                                # double 1/sum, passed as float
    p = mul32(y, inv[..., None])
    vt = jnp.transpose(jnp.asarray(v).astype(F64), (0, 2, 3, 1))[:, None, :, None]  # [B,1,Hkv,1,Dv,n_kv]
    pv = r16(p) if v_type == "f16" else p                # kq converted to V's vec_dot_type
    if sgemm_kqv:
        return _sgemm.sgemm_dot(vt, pv[..., None, :], isa)
    if v_type == "f16":
        out = _dot.dot_f16(vt, pv[..., None, :], isa)
    else:
        out = _dot.dot_f32(vt, pv[..., None, :], isa)
    return out

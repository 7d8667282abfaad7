"""Shared helpers of test_verify.py and test_diagnose.py: seeded random cases and an honest F16 kernel
written independently of jaxkv (numpy, ggml's per-key online-softmax order) to play the kernel."""

from __future__ import annotations

import numpy as np

from jaxkv.verify import mutations as mu


def random_case(seed: int, *, B=1, n_q=3, H=8, Hkv=2, n_kv=70, Dk=32, Dv=32, mask="perhead",
                sinks=False, softcap=0.0, max_bias=0.0, n_threads=1, regions=None,
                f16_kv=False) -> mu.Case:
    """A seeded Gaussian case. mask: None | "perhead" (30 % -inf, else uniform [-1, 1], one per head)
    | "causal" (shared by heads; query i of n_q sees keys <= n_kv - n_q + i). The mask is F16-exact.
    regions: (n_cold, n_hot) for a mixed cache (n_kv = n_cold + n_hot)."""
    rng = np.random.default_rng(seed)
    if regions is not None:
        n_kv = sum(regions)
    q = rng.standard_normal((B, n_q, H, Dk))
    k = rng.standard_normal((B, n_kv, Hkv, Dk))
    v = rng.standard_normal((B, n_kv, Hkv, Dv))
    if f16_kv or regions is not None:
        k = k.astype(np.float16).astype(np.float64)
        v = v.astype(np.float16).astype(np.float64)
    q = q.astype(np.float32).astype(np.float64)
    m = None
    if mask == "perhead":
        m = np.where(rng.random((1, H, n_q, n_kv)) < 0.3, -np.inf, rng.uniform(-1, 1, (1, H, n_q, n_kv)))
        m[..., -1] = 0.0  # at least one live key per row
    elif mask == "causal":
        j = np.arange(n_kv)[None, :]
        i = np.arange(n_q)[:, None]
        m = np.where(j <= n_kv - n_q + i, 0.0, -np.inf)[None, None]
    if m is not None:
        m = m.astype(np.float16).astype(np.float64)
    sk = rng.standard_normal(H).astype(np.float32).astype(np.float64) if sinks else None
    reg = ()
    if regions is not None:
        reg = (("cold", 0, regions[0]), ("hot", regions[0], n_kv))
    op = "mixed_flash_attn" if regions is not None else "flash_attn_ext"
    return mu.Case(op=op, q=q, k=k, v=v, mask=m, sinks=sk, scale=Dk ** -0.5, softcap=softcap,
                   max_bias=max_bias, n_threads=n_threads, regions=reg)


#: the random configurations of the mutation suites: together they make every hypothesis apply
CONFIGS = [
    dict(seed=1, n_q=3, H=8, Hkv=2, n_kv=70, mask="perhead", sinks=True, softcap=5.0, max_bias=4.0,
         n_threads=3),
    dict(seed=2, B=2, n_q=1, H=4, Hkv=4, n_kv=40, Dk=64, Dv=32, mask="causal", n_threads=1),
    dict(seed=3, n_q=2, H=4, Hkv=2, mask="causal", regions=(40, 24)),
    dict(seed=4, n_q=4, H=6, Hkv=1, n_kv=50, mask=None, n_threads=2),
]


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def honest_f16_kernel(case: mu.Case) -> np.ndarray:
    """An honest F16 kernel, ggml's order: q rounded to F16, per key (in order) ``s = scale q.k``
    (float32), soft cap, + slope * mask, online softmax with rescaling on a new maximum, the V
    accumulator rounded to F16 after every update, sinks after the loop, ``acc * (1/S)`` -> out
    [B, n_q, H, Dv] float32. F16 K/V assumed (values exact in F16)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    g = H // Hkv
    f32 = np.float32
    q = _f16(case.q)
    k = np.asarray(case.k, f32)
    v = np.asarray(case.v, f32)
    slopes = mu.alibi_slopes_np(H, case.max_bias).astype(f32)
    out = np.zeros((B, n_q, H, Dv), f32)
    M = np.full((B, n_q, H), -np.inf, f32)
    S = np.zeros((B, n_q, H), f32)
    acc = np.zeros((B, n_q, H, Dv), np.float16)
    kh = np.repeat(k, g, axis=2)
    vh = np.repeat(v, g, axis=2)
    with np.errstate(all="ignore"):
        for j in range(n_kv):
            s = np.einsum("bqhd,bhd->bqh", q, kh[:, j]).astype(f32)
            if case.softcap:
                c = f32(case.softcap)
                s = c * np.tanh(s * f32(case.scale / case.softcap))
            else:
                s = s * f32(case.scale)
            if case.mask is not None:
                mv = np.transpose(np.asarray(case.mask[..., j], f32), (0, 2, 1)) * slopes  # [Bm, n_q, H]
                mv = np.broadcast_to(mv, s.shape)
            else:
                mv = np.zeros_like(s)
            live = mv != -np.inf
            s = (s + mv).astype(f32)
            new = live & (s > M)
            ms = np.where(new, np.exp(M - s), f32(1)).astype(f32)
            vs = np.where(new, f32(1), np.exp(s - M)).astype(f32)
            vs = np.where(live, vs, f32(0))
            ms = np.where(live, ms, f32(1))
            M = np.where(new, s, M)
            upd = acc.astype(f32) * ms[..., None] + vh[:, j][:, None] * vs[..., None]
            acc = np.where(live[..., None], upd.astype(np.float16), acc)
            S = np.where(live, S * ms + vs, S).astype(f32)
        if case.sinks is not None:
            sk = np.broadcast_to(np.asarray(case.sinks, f32), M.shape)
            Mn = np.maximum(M, sk)
            ms = np.where(M == -np.inf, f32(0), np.exp(M - Mn)).astype(f32)
            S = (S * ms + np.exp(sk - Mn)).astype(f32)
            acc = (acc.astype(f32) * ms[..., None]).astype(np.float16)
        inv = np.where(S == 0, f32(0), f32(1) / S).astype(f32)
        out = acc.astype(f32) * inv[..., None]
    return out

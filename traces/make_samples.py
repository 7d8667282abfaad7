"""Write the sample traces jaxkv ships itself (traces/jaxkv_*.gguf), deterministically.

    python traces/make_samples.py [OUT_DIR]        (default: this directory)

Inputs are seeded Gaussians (numpy PCG64, seed below); ``out`` is `jaxkv.attention.attention` at precision
"f64", rounded to float32 (producer says so). The files exercise what the ggml-written samples do not:
views (a llama.cpp-style cache buffer and a permuted q), a hot-first mixed cache, and a transposed V.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

SEED = 20261126
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout


def _gauss(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _causal(n_q, n_kv):
    """Causal mask of the last n_q positions over n_kv keys: [1, 1, n_q, n_kv] (0 / -inf)."""
    i = np.arange(n_q)[:, None] + (n_kv - n_q)
    j = np.arange(n_kv)[None, :]
    return np.where(j <= i, 0.0, -np.inf).astype(np.float32)[None, None]


def _out(q, k, v, scale, mask=None):
    from jaxkv.attention import attention
    return np.asarray(attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64),
                                scale=scale, mask=mask, precision="f64"), dtype=np.float32)


def main(out_dir=None) -> list[pathlib.Path]:
    import jaxkv  # noqa: F401  (x64)
    from jaxkv import formats
    from jaxkv import layout as L
    from jaxkv import trace as T

    out_dir = pathlib.Path(out_dir or pathlib.Path(__file__).resolve().parent)
    rng = np.random.default_rng(SEED)
    written = []
    producer = "jaxkv.attention precision=f64 (reference, rounded to f32)"

    # 1. F16 K, Q8_0 V read from llama.cpp-style cache buffers [D*Hkv, kv_size]; q stored [D, H, n_q]
    B, n_q, H, Hkv, D, n_kv, kv_size = 1, 3, 4, 2, 64, 70, 128
    scale = float(np.float32(1) / np.sqrt(np.float32(D)))
    q = _gauss(rng, B, n_q, H, D)
    k = _gauss(rng, B, n_kv, Hkv, D).astype(np.float16)
    v = formats.QuantArray.from_float(_gauss(rng, B, n_kv, Hkv, D), "q8_0")
    mask = _causal(n_q, n_kv)
    out = _out(q, k, np.asarray(v.dequantize()), scale, mask)

    def cache_view(t):
        whole = L.View.contiguous(t, (D * Hkv, kv_size))
        return L.view_3d(whole, D, n_kv, Hkv, formats.row_bytes(t, D * Hkv), formats.row_bytes(t, D), 0), \
            (D * Hkv, kv_size)

    q_view = L.permute(L.View.contiguous("f32", (D, H, n_q)), 0, 2, 1, 3)
    p = T.save(out_dir / "jaxkv_kf16_vq8_0_cacheview.gguf", op="flash_attn_ext", producer=producer, scale=scale,
               n_threads=1, q=q, k=k, v=v, mask=mask, out=out, mask_pad=8,
               views={"k": cache_view("f16"), "v": cache_view("q8_0"), "q": (q_view, (D, H, n_q))},
               metadata={"jaxkv.sample.seed": SEED})
    written.append(p)

    # 2. mixed cache, hot window first on the KV axis, Q4_0 cold part, causal prefill of 2 queries
    n_q, n_cold, n_hot = 2, 64, 20
    q = _gauss(rng, B, n_q, H, D)
    kc = formats.QuantArray.from_float(_gauss(rng, B, n_cold, Hkv, D), "q4_0")
    vc = formats.QuantArray.from_float(_gauss(rng, B, n_cold, Hkv, D), "q4_0")
    kh = _gauss(rng, B, n_hot, Hkv, D).astype(np.float16)
    vh = _gauss(rng, B, n_hot, Hkv, D).astype(np.float16)
    mask = _causal(n_q, n_hot + n_cold)
    # mixed_flash_attn: concatenate in kv_order, round to F16 (docs/trace-format.md)
    kd = np.concatenate([kh.astype(np.float32), np.asarray(kc.dequantize())], axis=1).astype(np.float16)
    vd = np.concatenate([vh.astype(np.float32), np.asarray(vc.dequantize())], axis=1).astype(np.float16)
    out = _out(q, kd, vd, scale, mask)
    p = T.save(out_dir / "jaxkv_mixed_q4_0_hotfirst.gguf", op="mixed_flash_attn", producer=producer, scale=scale,
               n_threads=1, kv_order="hot,cold", q=q, k_cold=kc, v_cold=vc, k_hot=kh, v_hot=vh, mask=mask,
               out=out, metadata={"jaxkv.sample.seed": SEED})
    written.append(p)

    # 3. soft_max_attn with V stored transposed [n_kv, Dv, Hkv], F16
    n_q, n_kv = 2, 50
    q = _gauss(rng, B, n_q, H, D)
    k = _gauss(rng, B, n_kv, Hkv, D).astype(np.float16)
    v = _gauss(rng, B, n_kv, Hkv, D).astype(np.float16)
    mask = _causal(n_q, n_kv)
    out = _out(q, k, v, scale, mask)
    p = T.save(out_dir / "jaxkv_sm_f16_vt.gguf", op="soft_max_attn", producer=producer, scale=scale, n_threads=1,
               v_transposed=True, q=q, k=k, v=v, mask=mask, out=out, metadata={"jaxkv.sample.seed": SEED})
    written.append(p)
    return written


if __name__ == "__main__":
    for path in main(sys.argv[1] if len(sys.argv) > 1 else None):
        print(path)

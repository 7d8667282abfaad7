"""Re-run a trace v1 file's op through live ggml (:mod:`jaxkv.oracles.ggml`) on the trace's stored inputs.

    python -m jaxkv.oracles.ggml_replay FILE.gguf [--threads N]

prints, per file, whether live ggml reproduces the stored ``out`` bit for bit (NaN == NaN), the NMSE, and
the output rows that are NaN (ggml's unfused path gives NaN on rows with no live key). Exit 0 when every
file reproduces, 1 otherwise, 2 when a file cannot be read.

The reader is deliberately independent of :mod:`jaxkv.trace` (gguf's reader + :mod:`jaxkv.layout` only),
so comparing the oracle with traces does not go through the trace loader under test. Quantized tensors
stay raw blocks (uint8, bytes on the last axis) and reach ggml as stored.

Layout (canonical): q [B, n_q, H, Dk], k/v [B, n_kv, Hkv, D] (or raw blocks [B, n_kv, Hkv, row_bytes]),
mask [B|1, H|1, n_q(+padding), n_kv], sinks [H], out [B, n_q, H, Dv].
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["read_trace", "replay", "main"]

_ROLES = {"q": "q", "k": "k", "k_cold": "k", "v_cold": "v", "k_hot": "k", "v_hot": "v", "mask": "mask",
          "out": "out"}


def read_trace(path):
    """(metadata, tensors) of a trace v1 file: metadata = the ``trace.*`` keys; tensors = {name: (ggml
    type name, canonical array or raw blocks)} (``v`` is un-transposed when ``trace.v_transposed``)."""
    import gguf

    from jaxkv import layout

    r = gguf.GGUFReader(path)
    md = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("trace.")}
    roles = dict(_ROLES, v="v_t" if md.get("trace.v_transposed") else "v")
    ts = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape] + [1] * (4 - len(t.shape))
        d = np.array(t.data)
        if t.name == "sinks":
            ts[t.name] = (t.tensor_type.name, d.reshape(-1))
            continue
        d = d.reshape(ne[::-1]) if t.tensor_type.name in ("F32", "F16") else d.reshape(ne[3], ne[2], ne[1], -1)
        ts[t.name] = (t.tensor_type.name, np.asarray(layout.ggml_to_canonical(roles[t.name], d)))
    return md, ts


def replay(md, ts, n_threads=None) -> np.ndarray:
    """Live ggml's float32 output [B, n_q, H, Dv] for a trace read by :func:`read_trace` (the trace's
    ``n_threads`` unless given; mask padding rows dropped)."""
    from jaxkv.oracles import ggml as og

    q = ts["q"][1]
    mask = ts["mask"][1][:, :, : q.shape[1], :].astype(np.float32) if "mask" in ts else None
    kw = dict(scale=md["trace.scale"], n_threads=int(n_threads or md["trace.n_threads"]), mask=mask,
              max_bias=md["trace.max_bias"])

    def kv(name):
        tname, a = ts[name]
        return a, (None if tname == "F16" else tname)

    op = md["trace.op"]
    if op == "flash_attn_ext":
        (k, kf), (v, vf) = kv("k"), kv("v")
        return og.flash_attn_ext(q, k, v, k_format=kf, v_format=vf, softcap=md["trace.logit_softcap"],
                                 sinks=ts["sinks"][1] if "sinks" in ts else None, **kw)
    if op == "soft_max_attn":
        (k, kf), (v, _) = kv("k"), kv("v")
        return og.soft_max_attn(q, k, v, k_format=kf, **kw)
    if op != "mixed_flash_attn":
        raise ValueError(f"trace.op: expected flash_attn_ext, soft_max_attn or mixed_flash_attn, got {op!r}")
    (kc, kcf), (vc, vcf), (kh, _), (vh, _) = kv("k_cold"), kv("v_cold"), kv("k_hot"), kv("v_hot")
    return og.mixed_flash_attn(q, kc, vc, kh, vh, cold_format=(kcf, vcf), kv_order=md["trace.kv_order"],
                               softcap=md["trace.logit_softcap"], sinks=ts["sinks"][1] if "sinks" in ts else None,
                               **kw)


def main(argv=None) -> int:
    """CLI (module docstring)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxkv.oracles.ggml_replay")
    p.add_argument("files", nargs="+")
    p.add_argument("--threads", type=int, default=None, help="n_threads (default: the trace's)")
    a = p.parse_args(argv)
    rc = 0
    for f in a.files:
        try:
            md, ts = read_trace(f)
        except Exception as e:  # noqa: BLE001 - one line per unreadable file
            print(f"ERROR {f}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 2
            continue
        live = np.asarray(replay(md, ts, a.threads), np.float64)
        ref = np.asarray(ts["out"][1], np.float64)
        same = np.array_equal(live, ref, equal_nan=True)
        nan_rows = np.argwhere(np.isnan(live).any(axis=-1))
        ok = np.isfinite(live) & np.isfinite(ref)
        p_ref = float(np.sum(np.where(ok, ref, 0.0) ** 2))
        with np.errstate(invalid="ignore"):  # inf - inf where both overflowed: excluded by ok
            err = float(np.sum(np.where(ok, live - ref, 0.0) ** 2))
        nmse = err / p_ref if p_ref else (0.0 if err == 0 else float("inf"))
        print(f"{'SAME' if same else 'DIFF'} {f}: op {md['trace.op']}, bitwise "
              f"{'equal' if same else 'different'}, nmse {nmse:.3g} (finite elements), NaN rows "
              f"{len(nan_rows)} of {int(np.prod(live.shape[:-1]))}"
              + (f" (batch, query, head): {[tuple(int(x) for x in r) for r in nan_rows[:8]]}"
                 + (" ..." if len(nan_rows) > 8 else "") if len(nan_rows) else ""))
        rc = max(rc, 0 if same else 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Shape checks shared by the attention functions (jaxkv.attention, jaxkv.ggml_cpu).

Canonical layout: q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask
[B|1, H|1, n_q, n_kv], sinks [H]; Hkv divides H.
"""

from __future__ import annotations

__all__ = ["check_attention_shapes"]


def check_attention_shapes(q, k, v, mask=None, sinks=None) -> tuple[int, int, int, int, int]:
    """Validate the canonical shapes of q, k, v (arrays or QuantArrays: anything with ``.shape``) and of
    the optional mask and sinks -> (B, n_q, H, n_kv, Hkv). Raises ValueError naming the field."""
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    if len(qs) != 4:
        raise ValueError(f"q: expected [B, n_q, H, Dk], got shape {list(qs)}")
    if len(ks) != 4:
        raise ValueError(f"k: expected [B, n_kv, Hkv, Dk], got shape {list(ks)}")
    if len(vs) != 4:
        raise ValueError(f"v: expected [B, n_kv, Hkv, Dv], got shape {list(vs)}")
    B, n_q, H, Dk = qs
    if ks[0] != B or ks[3] != Dk:
        raise ValueError(f"k: shape {list(ks)} does not match q {list(qs)} (B, Dk)")
    if vs[:3] != ks[:3]:
        raise ValueError(f"v: shape {list(vs)} does not match k {list(ks)} (B, n_kv, Hkv)")
    n_kv, Hkv = ks[1], ks[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: Hkv={Hkv} (n_head_kv) must divide H={H} (n_head)")
    if mask is not None:
        ms = tuple(mask.shape)
        if len(ms) != 4 or ms[0] not in (1, B) or ms[1] not in (1, H) or ms[2] != n_q or ms[3] != n_kv:
            raise ValueError(f"mask: expected [B|1, H|1, n_q, n_kv] = [{B}|1, {H}|1, {n_q}, {n_kv}], "
                             f"got {list(ms)}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks: expected [H] = [{H}], got {list(sinks.shape)}")
    return B, n_q, H, n_kv, Hkv

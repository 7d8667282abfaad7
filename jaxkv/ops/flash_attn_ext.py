"""The ``flash_attn_ext`` op: ggml's fused attention GGML_OP_FLASH_ATTN_EXT: per-row online softmax, split-KV for decode, tiled for prefill."""

from __future__ import annotations

import numpy as np

from jaxkv import ggml_cpu
from jaxkv.oracles import ggml as og
from jaxkv.ops import family
from jaxkv.ops.golden import golden
from jaxkv.ops.op import Op, register
from jaxkv.ops.operands import kv_case


def ggml_cpu_model(trace, case, **config) -> np.ndarray:
    """``jaxkv.ggml_cpu.flash_attn_ext`` on the trace's stored operands (``config``: ``isa``, ``n_threads``)."""
    return np.asarray(ggml_cpu.flash_attn_ext(trace.q, trace.k, trace.v, **family.fused_kw(trace, case, config)),
                      np.float64)


def live(ts, params) -> np.ndarray:
    """Live ggml's ``flash_attn_ext`` on stored tensors ``{role: (ggml type, array)}`` (:class:`Op`)."""
    (k, kf), (v, vf) = family.live_kv(ts, "k"), family.live_kv(ts, "v")
    return og.flash_attn_ext(ts["q"][1], k, v, k_format=kf, v_format=vf, softcap=params["softcap"],
                             sinks=ts["sinks"][1] if "sinks" in ts else None, **family.live_kw(params))


_SPLIT = family.kv_split(False)

OP = register(Op(
    name="flash_attn_ext",
    doc="ggml's fused attention GGML_OP_FLASH_ATTN_EXT: per-row online softmax, split-KV for decode, tiled for prefill",
    roles={**family.COMMON_ROLES, "k": family.KV, "v": family.KV},
    required=("q", "out", "k", "v"),
    kv_roles=("k", "v"),
    params=("softcap", "max_bias"),
    case=kv_case,
    golden=golden,
    models=family.models(False, ggml_cpu_model),
    dense_models=family.dense_models(False),
    acc_unit=family.unit_of(False),
    fallback=family.fallback(False),
    config_tries=family.tries(family.split_tries(_SPLIT), family.isa_tries),
    live=live,
    target="ggml",
    file_tag="fa",
    kv_split=_SPLIT,
))

"""The ``mixed_flash_attn`` op: a mixed KV cache (block-quantized cold region, F16 hot window) concatenated in kv_order, rounded to F16, then flash_attn_ext."""

from __future__ import annotations

import numpy as np

from jaxkv import ggml_cpu
from jaxkv.oracles import ggml as og
from jaxkv.ops import family
from jaxkv.ops.golden import golden
from jaxkv.ops.op import Op, register
from jaxkv.ops.operands import regions_case


def ggml_cpu_model(trace, case, **config) -> np.ndarray:
    """``jaxkv.ggml_cpu.mixed_flash_attn`` on the trace's stored regions (``config``: ``isa``, ``n_threads``)."""
    return np.asarray(ggml_cpu.mixed_flash_attn(trace.q, trace.k_cold, trace.v_cold, trace.k_hot, trace.v_hot,
                                                kv_order=trace.kv_order, **family.fused_kw(trace, case, config)),
                      np.float64)


def live(ts, params) -> np.ndarray:
    """Live ggml's mixed cache (concat, F16 cast, flash_attn_ext) on stored tensors (:class:`Op`)."""
    (kc, kcf), (vc, vcf), (kh, _), (vh, _) = (family.live_kv(ts, r) for r in ("k_cold", "v_cold", "k_hot", "v_hot"))
    return og.mixed_flash_attn(ts["q"][1], kc, vc, kh, vh, cold_format=(kcf, vcf), kv_order=params["kv_order"],
                               softcap=params["softcap"], sinks=ts["sinks"][1] if "sinks" in ts else None,
                               **family.live_kw(params))


_SPLIT = family.kv_split(True, ("k_cold", "k_hot"))

OP = register(Op(
    name="mixed_flash_attn",
    doc="a mixed KV cache (block-quantized cold region, F16 hot window) concatenated in kv_order, rounded to F16, then flash_attn_ext",
    roles={**family.COMMON_ROLES, "k_cold": family.QUANT, "v_cold": family.QUANT, "k_hot": ("f16",), "v_hot": ("f16",)},
    required=("q", "out", "k_cold", "v_cold", "k_hot", "v_hot"),
    kv_roles=("k_cold", "v_cold", "k_hot", "v_hot"),
    params=("softcap", "max_bias"),
    case=regions_case,
    golden=golden,
    models=family.models(True, ggml_cpu_model),
    dense_models=family.dense_models(True),
    acc_unit=family.unit_of(True),
    fallback=family.fallback(True),
    config_tries=family.tries(family.kv_order_tries, family.split_tries(_SPLIT), family.isa_tries),
    live=live,
    target="ggml-mixed",
    file_tag="mixed",
    kv_f16=True,
    kv_regions=("cold", "hot"),
    kv_split=_SPLIT,
))

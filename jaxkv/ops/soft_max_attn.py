"""The ``soft_max_attn`` op: ggml's unfused attention: mul_mat(k, q), soft_max_ext(mask, scale, max_bias), mul_mat(v^T, kq); no softcap, no sinks."""

from __future__ import annotations

import numpy as np

from jaxkv import ggml_cpu
from jaxkv.oracles import ggml as og
from jaxkv.ops import family, ggml_build
from jaxkv.ops.golden import golden
from jaxkv.ops.op import Op, register
from jaxkv.ops.operands import kv_case


def ggml_cpu_model(trace, case, **config) -> np.ndarray:
    """``jaxkv.ggml_cpu.soft_max_attn`` on the trace's stored operands, its mul_mat paths from the trace
    (:func:`jaxkv.ops.ggml_build.mul_mat_facts`; ``config``: ``isa``)."""
    return np.asarray(ggml_cpu.soft_max_attn(trace.q, trace.k, trace.v, **family.ggml_kw(trace, case, config),
                                             **ggml_build.mul_mat_facts(trace)), np.float64)


def live(ts, params) -> np.ndarray:
    """Live ggml's unfused attention on stored tensors (:class:`Op`). V is F32 or F16: its format must
    reach ggml as for K (an F32 array is ambiguous without it)."""
    (k, kf), (v, vf) = family.live_kv(ts, "k"), family.live_kv(ts, "v")
    return og.soft_max_attn(ts["q"][1], k, v, k_format=kf, v_format=vf, **family.live_kw(params))


OP = register(Op(
    name="soft_max_attn",
    doc="ggml's unfused attention: mul_mat(k, q), soft_max_ext(mask, scale, max_bias), mul_mat(v^T, kq); no softcap, no sinks",
    roles={"q": ("f32",), "out": ("f32",), "mask": ("f16", "f32"), "k": family.KV, "v": ("f32", "f16")},
    required=("q", "out", "k", "v"),
    kv_roles=("k", "v"),
    params=("max_bias",),
    case=kv_case,
    golden=golden,
    reference=family.dead_rows_nan(("ggml-cpu",)),
    models=family.models(False, ggml_cpu_model),
    dense_models=family.dense_models(False),
    acc_unit=family.unit_of(False),
    fallback=family.fallback(False),
    config_tries=family.isa_tries,
    live=live,
    target="ggml-unfused",
    file_tag="sm",
    absent_why={"sinks": "no sinks on the unfused path"},
    ggml_path="unfused",
))

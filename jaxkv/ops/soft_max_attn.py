"""The ``soft_max_attn`` op: ggml's unfused attention: mul_mat(k, q), soft_max_ext(mask, scale, max_bias), mul_mat(v^T, kq); no softcap, no sinks."""

from __future__ import annotations

from jaxkv.ops import family
from jaxkv.ops.op import Op, register

OP = register(Op(
    name="soft_max_attn",
    doc="ggml's unfused attention: mul_mat(k, q), soft_max_ext(mask, scale, max_bias), mul_mat(v^T, kq); no softcap, no sinks",
    roles={"q": ("f32",), "out": ("f32",), "mask": ("f16", "f32"), "k": family.KV, "v": ("f32", "f16")},
    required=("q", "k", "v", "out"),
    kv_roles=("k", "v"),
    params=("max_bias",),
    case=family.case,
    golden=family.golden,
    reference=family.reference("soft_max_attn"),
    models=family.models(),
    acc_unit=family.acc_unit,
    fallback=family.fallback,
    target="ggml-unfused",
    file_tag="sm",
    kv_f16=False,
))

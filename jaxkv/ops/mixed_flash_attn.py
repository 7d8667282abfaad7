"""The ``mixed_flash_attn`` op: a mixed KV cache (block-quantized cold region, F16 hot window) concatenated in kv_order, rounded to F16, then flash_attn_ext."""

from __future__ import annotations

from jaxkv.ops import family
from jaxkv.ops.op import Op, register

OP = register(Op(
    name="mixed_flash_attn",
    doc="a mixed KV cache (block-quantized cold region, F16 hot window) concatenated in kv_order, rounded to F16, then flash_attn_ext",
    roles={**family.COMMON_ROLES, "k_cold": family.QUANT, "v_cold": family.QUANT, "k_hot": ("f16",), "v_hot": ("f16",)},
    required=("q", "k_cold", "v_cold", "k_hot", "v_hot", "out"),
    kv_roles=("k_cold", "v_cold", "k_hot", "v_hot"),
    params=("softcap", "max_bias"),
    case=family.case,
    golden=family.golden,
    reference=family.reference("mixed_flash_attn"),
    models=family.models(),
    acc_unit=family.acc_unit,
    fallback=family.fallback,
    target="ggml-mixed",
    file_tag="mixed",
    kv_f16=True,
))

"""The ``flash_attn_ext`` op: ggml's fused attention GGML_OP_FLASH_ATTN_EXT: per-row online softmax, split-KV for decode, tiled for prefill."""

from __future__ import annotations

from jaxkv.ops import family
from jaxkv.ops.op import Op, register

OP = register(Op(
    name="flash_attn_ext",
    doc="ggml's fused attention GGML_OP_FLASH_ATTN_EXT: per-row online softmax, split-KV for decode, tiled for prefill",
    roles={**family.COMMON_ROLES, "k": family.KV, "v": family.KV},
    required=("q", "k", "v", "out"),
    kv_roles=("k", "v"),
    params=("softcap", "max_bias"),
    case=family.case,
    golden=family.golden,
    reference=family.reference("flash_attn_ext"),
    models=family.models(),
    acc_unit=family.acc_unit,
    fallback=family.fallback,
    target="ggml",
    file_tag="fa",
    kv_f16=False,
))

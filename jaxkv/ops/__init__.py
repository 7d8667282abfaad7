"""The op registry: every attention op jaxkv verifies is one :class:`Op` entry in :data:`OPS`.

An op holds what the rest of the code looks up instead of comparing op names: its tensor roles and
their allowed ggml types, the scalar parameters it takes, its dense float64 case builder and golden,
its implementations keyed by precision model (:data:`PRECISIONS`), its live-ggml implementation and
fuzz-target name. ``verify``, ``replay``, ``record``, the fuzz targets, capture and diagnosis call
:func:`get` (or :func:`by_target`) and read fields; no module outside ``jaxkv.ops`` compares op names.

Modules: :mod:`jaxkv.ops.op` (the types and registries), :mod:`jaxkv.ops.golden` (the float64 golden
and its dense ``Case``, the dead-row rule), :mod:`jaxkv.ops.operands` (a trace's operands as dense
arrays and type names), :mod:`jaxkv.ops.ggml_build` (the ggml build facts of a trace),
:mod:`jaxkv.ops.family` (the attention family's shared models, fallback, references and build tries),
one module per op.

Adding an op: build an :class:`Op` and :func:`register` it (a test file can do so: ``tests/test_ops_registry.py``).
"""

from __future__ import annotations

from jaxkv.ops.op import OPS, PRECISIONS, Op, Precision, by_target, get, infer, precision, register, unregister

__all__ = ["Op", "Precision", "OPS", "PRECISIONS", "register", "unregister", "get", "by_target", "infer", "precision"]

# the built-in ops register themselves on import
from jaxkv.ops import flash_attn_ext as _fa  # noqa: E402,F401
from jaxkv.ops import soft_max_attn as _sm  # noqa: E402,F401
from jaxkv.ops import mixed_flash_attn as _mx  # noqa: E402,F401

"""Write a captured :class:`jaxkv.capture.collect.Call` as a trace v1 file (docs/trace-format.md).

Each operand is stored as the raw bytes of its root buffer (the whole K/V cache of the layer, the
whole Qcur, ...) under the root's ``ne``, with ``trace.view.<role>.ne/.nb/.offset`` giving the view the
kernel read; an operand that is its whole contiguous buffer is stored without view keys. Nothing is
converted, reordered or copied out "as it should be": jaxkv's loader resolves the views.
"""

from __future__ import annotations

import math
import pathlib

import gguf
import numpy as np

from jaxkv import formats as F
from jaxkv import layout as L
from jaxkv import ops
from jaxkv.trace import _add_meta

__all__ = ["write_call", "call_metadata", "file_name"]

_ROLES = ("q", "k", "v", "mask", "sinks", "out")


def file_name(call) -> str:
    """``s000_prefill_l05_fa.gguf`` / ``s003_decode_l17_sm.gguf``: step, phase, layer, op."""
    phase = "prefill" if call.step == 0 else "decode"
    return f"s{call.step:03d}_{phase}_l{call.layer:02d}_{ops.get(call.op, 'call.op').file_tag}.gguf"


def call_metadata(call) -> dict:
    """Per-call structured keys: layer, step, phase, op params, node and source names."""
    p = call.params
    md = {"capture.layer": int(call.layer), "capture.step": int(call.step),
          "capture.phase": "prefill" if call.step == 0 else "decode",
          "capture.op_prec": int(p["prec"]), "capture.n_kv_max": int(p["n_kv_max"])}
    for role, op in call.operands.items():
        md[f"capture.source.{role}"] = op.source
    for role, name in call.nodes.items():
        md[f"capture.node.{role}"] = name
    return md


def _is_whole(op) -> bool:
    v = op.view
    return (v.offset == 0 and tuple(v.ne) == tuple(op.buffer_ne)
            and tuple(v.nb) == tuple(L.contiguous_strides(v.type, v.ne)))


def write_call(path, call, *, producer: str, n_threads: int, metadata: dict) -> pathlib.Path:
    """Write ``call`` to ``path`` with the run's ``metadata`` (structured keys) and ``producer``."""
    p = call.params
    w = gguf.GGUFWriter(str(path), arch="trace")
    w.add_uint32("trace.version", 1)
    w.add_string("trace.op", call.op)
    w.add_string("trace.producer", producer)
    w.add_float32("trace.scale", float(p["scale"]))
    w.add_float32("trace.max_bias", float(p["max_bias"]))
    w.add_float32("trace.logit_softcap", float(p["softcap"]))
    w.add_uint32("trace.n_threads", int(n_threads))
    if call.v_transposed:
        w.add_bool("trace.v_transposed", True)
    T = gguf.GGUFValueType
    for role in _ROLES:
        op = call.operands.get(role)
        if op is None or _is_whole(op):
            continue
        w.add_key_value(f"trace.view.{role}.ne", [int(a) for a in op.view.ne], T.ARRAY, T.INT64)
        w.add_key_value(f"trace.view.{role}.nb", [int(a) for a in op.view.nb], T.ARRAY, T.INT64)
        w.add_uint64(f"trace.view.{role}.offset", int(op.view.offset))
    for k, v in {**metadata, **call_metadata(call)}.items():
        _add_meta(w, k, v)
    for role in _ROLES:
        op = call.operands.get(role)
        if op is not None:
            _add_tensor(w, gguf, role, op)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def _add_tensor(w, gguf, role, op):
    f = F.get_format(op.view.type)
    ne = list(op.buffer_ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    raw = np.frombuffer(op.buffer, np.uint8)
    want = math.prod(ne) // f.block_size * f.block_bytes
    if raw.size != want:
        raise ValueError(f"tensor {role!r} ({op.source}): buffer of {raw.size} bytes, ne {ne} needs {want}")
    if f.quantized:
        shape = tuple(ne[::-1][:-1]) + (ne[0] // f.block_size * f.block_bytes,)
        w.add_tensor(role, raw.reshape(shape), raw_dtype=gguf.GGMLQuantizationType(f.type_id))
    elif f.name in ("f16", "f32"):
        w.add_tensor(role, raw.view(np.float16 if f.name == "f16" else np.float32).reshape(ne[::-1]))
    else:
        raise ValueError(f"tensor {role!r} ({op.source}): type {f.name} is not a trace v1 type")

"""Generate a corpus of hostile inputs for every CLI entry point (issue 14).

    python tests/hostile_corpus.py DIR [--full]

writes under DIR and prints a summary. `build(dir, full)` returns a `Corpus`: lists of paths per kind

    traces   forged GGUF files (header counts, string and array lengths, value and tensor types,
             alignment, ne, offsets, view ne/nb/offset incl. broadcasts (nb = 0) and zeros, metadata
             values, truncations, hostile strings) plus a few honest ones
    records  failure records for ``python -m fuzz replay`` (every wrong shape, absurd params, a target
             naming a module that writes a marker file when imported)
    results  campaign directories whose results.jsonl holds a line of a wrong shape (``merge``, ``--resume``)
    special  special files (FIFO, /dev/zero link, symlink loop, directory named *.gguf, 300-char name)

The GGUF bytes are written by this file's own minimal writer (not by the code under test), so any field
can be forged. ``full=False`` is the representative subset the default (ci) test profile runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
import sys

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
# ggml tensor types
T_F32, T_F16, T_Q4_0, T_Q8_0 = 0, 1, 2, 8
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}

#: marker the evil module writes when imported (the test checks it never appears)
EVIL_MODULE = "jaxkv_hostile_evil_mod"


def _u32(x):
    return struct.pack("<I", x & 0xFFFFFFFF)


def _u64(x):
    return struct.pack("<Q", x & 0xFFFFFFFFFFFFFFFF)


def _str(s, length=None):
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return _u64(len(b) if length is None else length) + b


def _value(vtype, v, arr_type=None, arr_len=None):
    if vtype == STR:
        return _str(v)
    if vtype == ARR:
        out = _u32(arr_type) + _u64(len(v) if arr_len is None else arr_len)
        for x in v:
            out += _value(arr_type, x)
        return out
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], v)
    return struct.pack("<I", v)  # an unknown type: 4 bytes of junk value


@dataclasses.dataclass
class KV:
    key: str
    vtype: int
    value: object
    arr_type: int | None = None
    arr_len: int | None = None      # forged array length
    key_len: int | None = None      # forged key string length
    raw_type: int | None = None     # forged type id written instead of vtype


@dataclasses.dataclass
class Tensor:
    name: str
    ne: list
    ttype: int
    data: bytes
    offset: int | None = None       # forged offset (default: packed, aligned)
    n_dims: int | None = None       # forged n_dims
    name_len: int | None = None


def gguf_bytes(kvs, tensors, version=3, alignment=32, n_kv=None, n_tensors=None, magic=b"GGUF") -> bytes:
    """A GGUF v3 file from ``kvs`` and ``tensors`` with any field forgeable."""
    head = magic + _u32(version) + _u64(len(tensors) if n_tensors is None else n_tensors) + \
        _u64(len(kvs) if n_kv is None else n_kv)
    for kv in kvs:
        head += _str(kv.key, kv.key_len) + _u32(kv.vtype if kv.raw_type is None else kv.raw_type)
        head += _value(kv.vtype, kv.value, kv.arr_type, kv.arr_len)
    offs, pos = [], 0
    for t in tensors:
        offs.append(pos)
        pos += -(-len(t.data) // alignment) * alignment
    for t, off in zip(tensors, offs):
        nd = len(t.ne) if t.n_dims is None else t.n_dims
        head += _str(t.name, t.name_len) + _u32(nd) + b"".join(_u64(a) for a in t.ne) + _u32(t.ttype)
        head += _u64(off if t.offset is None else t.offset)
    pad = -len(head) % alignment
    body = b""
    for t in tensors:
        body += t.data + b"\0" * (-len(t.data) % alignment)
    return head + b"\0" * pad + body


# ----------------------------------------------------------------------------------------------------
# an honest small trace (numbers need not be a correct attention output: verdicts may be pass or fail)

def _base(op="flash_attn_ext", kv_type=T_F16, v_type=None, producer="hostile corpus", Dk=32, n_q=1, H=2,
          Hkv=1, n_kv=8, extra=(), v_transposed=False):
    rng = np.random.default_rng(0)
    v_type = kv_type if v_type is None else v_type
    q = rng.standard_normal((1, H, n_q, Dk)).astype(np.float32)

    def kv_bytes(t, ne):
        x = rng.standard_normal(ne[::-1]).astype(np.float32)
        if t == T_F32:
            return x.tobytes()
        if t == T_F16:
            return x.astype(np.float16).tobytes()
        # block types: q8_0 blocks (scale f16 + 32 int8) / q4_0 (scale + 16 bytes)
        nblk = int(np.prod(ne)) // 32
        blk = 34 if t == T_Q8_0 else 18
        b = bytearray(rng.integers(0, 256, nblk * blk, dtype=np.uint8).tobytes())
        for i in range(nblk):
            b[i * blk:i * blk + 2] = np.float16(0.01).tobytes()
        return bytes(b)

    k_ne = [Dk, n_kv, Hkv]
    v_ne = [n_kv, Dk, Hkv] if v_transposed else [Dk, n_kv, Hkv]
    mask = np.zeros((1, 1, n_q, n_kv), np.float16)
    out = rng.standard_normal((1, n_q, H, Dk)).astype(np.float32)
    kvs = [KV("general.architecture", STR, "trace"), KV("trace.version", U32, 1), KV("trace.op", STR, op),
           KV("trace.producer", STR, producer), KV("trace.scale", F32, 1 / np.sqrt(Dk)),
           KV("trace.max_bias", F32, 0.0), KV("trace.logit_softcap", F32, 0.0), KV("trace.n_threads", U32, 1)]
    if v_transposed:
        kvs.append(KV("trace.v_transposed", BOOL, True))
    kvs += list(extra)
    ts = [Tensor("q", [Dk, n_q, H], T_F32, q.tobytes()),
          Tensor("k", k_ne, kv_type, kv_bytes(kv_type, k_ne)),
          Tensor("v", v_ne, v_type, kv_bytes(v_type, v_ne)),
          Tensor("mask", [n_kv, n_q], T_F16, mask.tobytes()),
          Tensor("out", [Dk, H, n_q], T_F32, out.tobytes())]
    return kvs, ts


def _view_kvs(role, ne, nb, offset=0, ne_type=I64, nb_type=I64):
    return [KV(f"trace.view.{role}.ne", ARR, list(ne), arr_type=ne_type),
            KV(f"trace.view.{role}.nb", ARR, list(nb), arr_type=nb_type),
            KV(f"trace.view.{role}.offset", U64, offset)]


def _forged_traces(full: bool):
    """(name, bytes) of forged trace files."""
    out = []

    def add(name, kvs=None, ts=None, **kw):
        if kvs is None:
            kvs, ts = _base()
        out.append((name, gguf_bytes(kvs, ts, **kw)))

    big = [0, 1, 2, 7, 100, 1 << 20, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    big_ci = [0, 7, 1 << 32, (1 << 64) - 1]
    # honest
    add("honest_f16")
    for name, args in (("honest_sm_f32v", dict(op="soft_max_attn", kv_type=T_F16, v_type=T_F32,
                                              v_transposed=True)),
                       ("honest_sm_f16v", dict(op="soft_max_attn", v_transposed=True)),
                       ("honest_fa_f32", dict(kv_type=T_F32)), ("honest_fa_q8_0", dict(kv_type=T_Q8_0)),
                       ("honest_sm_f32v_nt", dict(op="soft_max_attn", kv_type=T_F32, v_type=T_F32))):
        kvs, ts = _base(**args)
        add(name, kvs, ts)
    # header
    for m in ((b"GGUF", 3), (b"GGUX", 3), (b"FUGG", 3)):
        add(f"magic_{m[0].decode()}", magic=m[0])
    for v in (0, 1, 2, 4, 0xFFFFFFFF) if full else (1, 0xFFFFFFFF):
        add(f"version_{v}", version=v)
    for n in big if full else big_ci:
        add(f"n_kv_{n}", n_kv=n)
        add(f"n_tensors_{n}", n_tensors=n)
    # key / string lengths
    for n in big if full else big_ci:
        kvs, ts = _base()
        kvs[1].key_len = n
        add(f"key_len_{n}", kvs, ts)
        kvs, ts = _base()
        ts[0].name_len = n
        add(f"tensor_name_len_{n}", kvs, ts)
    for i, s in enumerate(["\x1b[31mRED\x1b[0m\nFAKE: PASS", "a" * 5000, "\u202e\u0007bell\r", "\x00nul"]):
        add(f"producer_hostile_{i}", *_base(producer=s))
    kvs, ts = _base()
    kvs.append(KV("x." + "k" * 300, STR, "long key"))
    add("long_key", kvs, ts)
    kvs, ts = _base()
    kvs.append(KV("bad.utf8", STR, b"\xff\xfe\x1b[2J"))
    add("bad_utf8_value", kvs, ts)
    kvs, ts = _base()
    kvs[2] = KV("trace.op", STR, "\x1b]0;pwned\x07flash_attn_ext")
    add("op_escape", kvs, ts)
    # value types
    for t in (13, 255, 0xFFFFFFFF) if full else (13,):
        kvs, ts = _base()
        kvs[1].raw_type = t
        add(f"value_type_{t}", kvs, ts)
    for key, t, v in (("trace.version", STR, "1"), ("trace.scale", STR, "x"), ("trace.op", U32, 1),
                      ("trace.n_threads", I64, -1), ("trace.scale", F64, 0.1)):
        kvs, ts = _base()
        kvs = [k for k in kvs if k.key != key] + [KV(key, t, v)]
        add(f"meta_type_{key}_{t}", kvs, ts)
    for key, v in (("trace.scale", float("nan")), ("trace.scale", float("inf")), ("trace.max_bias", -1.0),
                   ("trace.logit_softcap", float("nan")), ("trace.n_threads", 0),
                   ("trace.n_threads", 0xFFFFFFFF), ("trace.version", 2), ("trace.op", "nope")):
        kvs, ts = _base()
        kvs = [k for k in kvs if k.key != key] + [KV(key, U32 if isinstance(v, int) else
                                                    STR if isinstance(v, str) else F32, v)]
        add(f"meta_value_{key}_{v}", kvs, ts)
    # arrays
    for n in big if full else big_ci:
        kvs, ts = _base()
        kvs.append(KV("arr", ARR, [1, 2, 3], arr_type=I64, arr_len=n))
        add(f"array_len_{n}", kvs, ts)
    for sub in (ARR, 13, 0xFFFFFFFF, STR):
        kvs, ts = _base()
        kvs.append(KV("arr_sub", ARR, [] if sub != STR else ["a", "b"], arr_type=sub))
        add(f"array_type_{sub}", kvs, ts)
    # alignment
    for a, t in ((0, U32), (3, U32), (1, U32), (1 << 31, U32), (64, U64), ("32", STR), (16, U32)):
        kvs, ts = _base()
        kvs.append(KV("general.alignment", t, a))
        add(f"alignment_{a}_{t}", kvs, ts, alignment=a if isinstance(a, int) and a and not a & (a - 1)
            and a < 4096 else 32)
    # tensor n_dims, ne, type, offset
    for nd in (0, 5, 0xFFFFFFFF) if full else (0, 5):
        kvs, ts = _base()
        ts[0].n_dims = nd
        add(f"n_dims_{nd}", kvs, ts)
    for role in (0, 1, 3) if full else (1,):
        for n in big if full else big_ci:
            for axis in (0, 1) if full else (1,):
                kvs, ts = _base()
                ts[role].ne = list(ts[role].ne)
                ts[role].ne[axis] = n
                add(f"ne_t{role}_a{axis}_{n}", kvs, ts)
    for tt in (2, 3, 6, 7, 8, 20, 30, 39, 40, 1000, 0xFFFFFFFF) if full else (8, 30, 1000):
        kvs, ts = _base()
        ts[1].ttype = tt
        add(f"tensor_type_{tt}", kvs, ts)
    for off in (1, 31, 32, 64, 1 << 20, 1 << 40, (1 << 64) - 32) if full else (1, 1 << 40, (1 << 64) - 32):
        kvs, ts = _base()
        ts[2].offset = off
        add(f"offset_{off}", kvs, ts)
    kvs, ts = _base()
    ts[1].name = "q"
    add("duplicate_tensor", kvs, ts)
    kvs, ts = _base()
    add("missing_q", kvs, ts[1:])
    kvs, ts = _base()
    ts[1].name = "\x1b[31mk" + "x" * 300
    add("tensor_name_hostile", kvs, ts)
    # views: k stored [32, 8, 1] f16 (512 bytes)
    el = 2
    views = [
        ("k_view_ok", [32, 8, 1, 1], [el, 64, 512, 512], 0),
        ("k_view_broadcast_n1", [32, 1 << 20, 1, 1], [el, 0, 0, 0], 0),
        ("k_view_broadcast_n30", [32, 1 << 30, 1, 1], [el, 0, 0, 0], 0),
        ("k_view_broadcast_n40", [32, 1 << 40, 1, 1], [el, 0, 0, 0], 0),
        ("k_view_broadcast_b", [32, 8, 1, 1 << 24], [el, 64, 512, 0], 0),
        ("k_view_broadcast_all", [1 << 16, 1 << 16, 1 << 8, 1], [0, 0, 0, 0], 0),
        ("k_view_zero_ne1", [32, 0, 1, 1], [el, 64, 512, 512], 0),
        ("k_view_zero_ne0", [0, 8, 1, 1], [el, 64, 512, 512], 0),
        ("k_view_zero_all", [0, 0, 0, 0], [0, 0, 0, 0], 0),
        ("k_view_nb_huge", [32, 8, 1, 1], [el, 1 << 62, 512, 512], 0),
        ("k_view_nb_neg", [32, 8, 1, 1], [el, -64, 512, 512], 0),
        ("k_view_ne_neg", [32, -8, 1, 1], [el, 64, 512, 512], 0),
        ("k_view_offset_huge", [32, 8, 1, 1], [el, 64, 512, 512], 1 << 63),
        ("k_view_offset_end", [32, 8, 1, 1], [el, 64, 512, 512], 512),
        ("k_view_overlap", [32, 8, 1, 1], [el, 2, 512, 512], 0),
        ("k_view_ne_max", [(1 << 63) - 1, 1, 1, 1], [el, 0, 0, 0], 0),
    ]
    if not full:
        views = [v for v in views if v[0] in ("k_view_ok", "k_view_broadcast_n30", "k_view_broadcast_all",
                                              "k_view_zero_ne1", "k_view_nb_neg", "k_view_offset_huge",
                                              "k_view_ne_max")]
    for name, ne, nb, off in views:
        kvs, ts = _base()
        kvs += _view_kvs("k", ne, nb, off)
        add(name, kvs, ts)
        if full:
            kvs, ts = _base()
            kvs += _view_kvs("v", ne, nb, off)
            add(name.replace("k_view", "v_view"), kvs, ts)
    for name, extra in (("view_ne_len3", [KV("trace.view.k.ne", ARR, [32, 8, 1], arr_type=I64),
                                          KV("trace.view.k.nb", ARR, [2, 64, 512, 512], arr_type=I64)]),
                        ("view_ne_f32", [KV("trace.view.k.ne", ARR, [32.0, 8.0, 1.0, 1.0], arr_type=F32),
                                         KV("trace.view.k.nb", ARR, [2, 64, 512, 512], arr_type=I64)]),
                        ("view_ne_str", [KV("trace.view.k.ne", STR, "32,8,1,1"),
                                         KV("trace.view.k.nb", ARR, [2, 64, 512, 512], arr_type=I64)]),
                        ("view_no_nb", [KV("trace.view.k.ne", ARR, [32, 8, 1, 1], arr_type=I64)]),
                        ("view_of_missing", _view_kvs("sinks", [2, 1, 1, 1], [4, 8, 8, 8])),
                        ("view_q_broadcast", _view_kvs("q", [32, 1 << 24, 2, 1], [4, 0, 128, 256])),
                        ("view_mask_broadcast", _view_kvs("mask", [8, 1 << 28, 1, 1], [2, 0, 0, 0])),
                        ("view_out_broadcast", _view_kvs("out", [32, 2, 1 << 24, 1], [4, 128, 0, 0]))):
        kvs, ts = _base()
        add(name, kvs + extra, ts)
    # the attack: K and V both broadcast along n_kv (nb[1] = 0), no mask: a consistent call whose
    # operands and logits are huge while the file is a few KB
    for n in ((1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 30, 1 << 40) if full else (1 << 20, 1 << 30)):
        kvs, ts = _base()
        kvs += _view_kvs("k", [32, n, 1, 1], [2, 0, 0, 0]) + _view_kvs("v", [32, n, 1, 1], [2, 0, 0, 0])
        add(f"kv_broadcast_{n}", kvs, [t for t in ts if t.name != "mask"])
    # big honest-looking shapes whose attention call is large (logits n_q * n_kv * H)
    kvs, ts = _base(n_q=1, n_kv=8)
    kvs += _view_kvs("q", [32, 1 << 16, 2, 1], [4, 0, 128, 256]) + _view_kvs("mask", [8, 1 << 16, 1, 1],
                                                                             [2, 0, 0, 0])
    ts[4].ne = [32, 2, 1 << 16]
    ts[4].data = b""
    add("out_claims_huge", kvs, ts)
    # monitor dialect
    kvs, ts = _base()
    kvs = [KV("kqv_trace.total_steps", U32, 99)]
    for t in ts:
        t.name = t.name + "_step_1"
    add("monitor_bad_total", kvs, ts)
    kvs, ts = _base()
    kvs = [KV("kqv_trace.description", STR, "\x1b[2J\x1b[Hmonitor")]
    for i, t in enumerate(ts):
        t.name = f"{t.name}_step_{i * 1000}"
    add("monitor_bad_steps", kvs, ts)
    kvs, ts = _base()
    kvs = [KV("kqv_trace.description", STR, "x")]
    for t in ts:
        t.name = t.name + "_step_1"
    ts[4].ne = [64, 0]
    add("monitor_out_zero", kvs, ts)
    # mixed op without kv_order, v_transposed on a block type
    kvs, ts = _base(op="mixed_flash_attn")
    add("mixed_missing_parts", kvs, ts)
    kvs, ts = _base(kv_type=T_Q8_0, v_transposed=False)
    kvs.append(KV("trace.v_transposed", BOOL, True))
    add("vt_on_block", kvs, ts)
    # truncations and byte flips of the honest file
    honest = gguf_bytes(*_base())
    cuts = range(0, len(honest), 7 if full else 97)
    for c in cuts:
        out.append((f"trunc_{c}", honest[:c]))
    rng = np.random.default_rng(14)
    for i in range(60 if full else 6):
        b = bytearray(honest)
        for p in rng.integers(0, 400, 3):
            b[p] = int(rng.integers(0, 256))
        out.append((f"flip_{i}", bytes(b)))
    return out


# ----------------------------------------------------------------------------------------------------
# failure records and results lines

def _records(full: bool):
    """(name, text) of failure records for replay."""
    good_params = {"seed": 1, "heads": [2, 1], "n_q": 1, "n_kv": 8, "dk": 32, "dv": 32}
    recs = [
        ("not_json", "{{{"), ("empty", ""), ("list", "[1]"), ("null", "null"), ("int", "7"),
        ("string", '"x"'), ("empty_obj", "{}"), ("no_params", '{"property": "online"}'),
        ("params_list", '{"property": "online", "params": [1, 2]}'),
        ("params_empty", '{"property": "online", "params": {}}'),
        ("property_int", '{"property": 3, "params": {}}'),
        ("property_unknown", '{"property": "\\u001b[31mnope", "params": {}}'),
        ("heads_huge", json.dumps({"property": "online", "params": dict(good_params, heads=[1 << 30, 1])})),
        ("n_kv_huge", json.dumps({"property": "online", "params": dict(good_params, n_kv=1 << 40)})),
        ("n_kv_neg", json.dumps({"property": "online", "params": dict(good_params, n_kv=-5)})),
        ("seed_str", json.dumps({"property": "online", "params": dict(good_params, seed="x")})),
        ("target_evil", json.dumps({"property": "target", "params": good_params,
                                     "target": f"{EVIL_MODULE}:f"})),
        ("target_stdlib", json.dumps({"property": "target", "params": good_params, "target": "this:x"})),
        ("target_os", json.dumps({"property": "target", "params": good_params, "target": "os:getcwd"})),
        ("target_escape", json.dumps({"property": "target", "params": good_params,
                                       "target": "\x1b[31mevil\n:f"})),
        ("threads_huge", json.dumps({"property": "target", "params": good_params, "target": "ggml",
                                      "threads": 1 << 40})),
        ("traces_path", json.dumps({"property": "traces", "params": {"path": "/dev/zero"},
                                     "traces": "/dev"})),
        ("deep", "[" * 100000 + "]" * 100000),
        ("nan", '{"property": "online", "params": {"seed": NaN}}'),
    ]
    if full:
        for k in ("seed", "heads", "n_q", "n_kv", "dk", "dv"):
            for v in (None, "x", -1, 1 << 62, [1], 1.5):
                p = dict(good_params)
                p[k] = v
                recs.append((f"param_{k}_{v}", json.dumps({"property": "online", "params": p})))
    return recs


def _results_lines(full: bool):
    """(name, line) of hostile results.jsonl lines."""
    case = {"type": "case", "id": "layout/0/0", "property": "layout", "ok": True, "checks": 1, "error": None,
            "params": {}}
    lines = [
        ("list", "[1]"), ("null", "null"), ("int", "3"), ("string", '"case"'),
        ("case_no_id", json.dumps({k: v for k, v in case.items() if k != "id"})),
        ("case_int_id", json.dumps(dict(case, id=5))),
        ("case_bad_id", json.dumps(dict(case, id="nope"))),
        ("case_checks_str", json.dumps(dict(case, checks="many"))),
        ("case_no_property", json.dumps({k: v for k, v in case.items() if k != "property"})),
        ("case_ok_str", json.dumps(dict(case, ok="yes"))),
        ("case_fail_no_seed", json.dumps(dict(case, ok=False, error="boom", params={"x": 1}))),
        ("case_fail_params_list", json.dumps(dict(case, ok=False, error="boom", params=[1]))),
        ("failure_no_error", json.dumps({"type": "failure", "property": "layout", "id": "layout/0/0",
                                         "file": "x", "replay": "r"})),
        ("failure_escape", json.dumps({"type": "failure", "property": "layout", "id": "layout/0/0",
                                       "file": "x", "error": "\x1b[2J\x1b[31mFAKE",
                                       "replay": "rm -rf ~\nPASS"})),
        ("property_seconds_str", json.dumps({"type": "property", "property": "layout", "seconds": "x"})),
        ("campaign_seed_str", json.dumps({"type": "campaign", "seed": "x"})),
        ("unknown_type", json.dumps({"type": "\x1b[31m"})),
        ("huge_number", '{"type": "case", "id": "layout/0/0", "property": "layout", "ok": true, '
                        '"checks": 1e999}'),
    ]
    return lines if full else [x for i, x in enumerate(lines) if i % 2 == 0 or "escape" in x[0]
                               or "seed" in x[0]]


# ----------------------------------------------------------------------------------------------------
# the corpus

@dataclasses.dataclass
class Corpus:
    root: pathlib.Path
    traces: list
    records: list
    results: list
    special: list
    fifo_results: list   # directories whose results.jsonl is a FIFO

    def count(self) -> int:
        return len(self.traces) + len(self.records) + len(self.results) + len(self.special) + \
            len(self.fifo_results)


def build(root, full: bool = False) -> Corpus:
    """Write the corpus under ``root`` (created); ``full``: every variant (>= 300 files)."""
    root = pathlib.Path(root)
    (root / "traces").mkdir(parents=True, exist_ok=True)
    traces = []
    for name, data in _forged_traces(full):
        p = root / "traces" / f"{name}.gguf"
        p.write_bytes(data)
        traces.append(p)
    (root / "records").mkdir(exist_ok=True)
    records = []
    for name, text in _records(full):
        p = root / "records" / f"{name}.json"
        p.write_text(text)
        records.append(p)
    results = []
    head = json.dumps({"type": "campaign", "seed": 0, "properties": ["layout"], "shard": [0, 1]})
    for name, line in _results_lines(full):
        d = root / "results" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.jsonl").write_text(head + "\n" + line + "\n")
        results.append(d)
    sp = root / "special"
    sp.mkdir(exist_ok=True)
    special = []
    fifo = sp / "fifo.gguf"
    if not fifo.exists():
        os.mkfifo(fifo)
    special.append(fifo)
    z = sp / "zero.gguf"
    if not z.exists() and os.path.exists("/dev/zero"):
        z.symlink_to("/dev/zero")
    special.append(z)
    loop = sp / "loop.gguf"
    if not loop.is_symlink():
        loop.symlink_to(loop.name)
    special.append(loop)
    d = sp / "dir.gguf"
    d.mkdir(exist_ok=True)
    special.append(d)
    special.append(sp / ("n" * 300 + ".gguf"))  # a name too long for the file system: never created
    special.append(sp / "missing" / "x.gguf")
    fifo_results = []
    fd = root / "fifo_results"
    fd.mkdir(exist_ok=True)
    f = fd / "results.jsonl"
    if not f.exists():
        os.mkfifo(f)
    fifo_results.append(fd)
    return Corpus(root, traces, records, results, special, fifo_results)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python tests/hostile_corpus.py DIR [--full]", file=sys.stderr)
        sys.exit(2)
    c = build(sys.argv[1], "--full" in sys.argv[2:])
    print(f"{c.count()} hostile inputs under {c.root}: {len(c.traces)} traces, {len(c.records)} records, "
          f"{len(c.results)} results dirs, {len(c.special)} special files, {len(c.fifo_results)} FIFO results")

"""``python -m fuzz record``: run one attention call through live ggml and save it as a trace v1 file.

    python -m fuzz record --op flash_attn_ext|soft_max_attn|mixed_flash_attn --out FILE
        [--k-format F] [--v-format F] [--batch B] [--n-q N] [--n-kv N] [--n-cold N] [--heads H]
        [--kv-heads HKV] [--head-dim DK] [--dv DV] [--mask none|causal|window|random|fullrow]
        [--softcap C] [--max-bias M] [--sinks] [--threads T] [--seed S]

Inputs are seeded standard normals (numpy PCG64 ``--seed``); K and V are stored by ggml's own
``ggml_quantize_chunk`` in ``--k-format`` / ``--v-format`` (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL;
for ``mixed_flash_attn`` the cold region's block types, the last ``n_kv - n_cold`` tokens being the F16
hot window). The mask is additive ([1, 1, n_q, n_kv], finite values in [-2, 0] rounded to F16, -inf where
the kind masks; see fuzz.cases.menu_mask). The output is what the loaded ggml computed
(jaxkv.oracles.ggml); the trace's producer is ``ggml <version> (<commit>) CPU <isa> n_threads=<n>``, so
``python -m fuzz verify FILE`` judges it under the ``ggml-cpu`` model. Metadata ``ggml.isa``,
``ggml.version``, ``ggml.commit``, ``ggml.wheel``, ``record.seed`` and ``record.args`` say how it was made;
``ggml.contract.<field>`` the build's compiler-contraction facts (``library_info()['contract']``), which
``verify`` reads.

Exit status: 0 written; 2 bad arguments, ggml unavailable or an input ggml refuses (one line on stderr).
"""

from __future__ import annotations

import shlex
import sys

import numpy as np

from jaxkv import cli
from fuzz import cases as C
from fuzz import strategies as S
from jaxkv import formats as F
from jaxkv import ops
from jaxkv import trace as TR
from jaxkv.cli import Parser, UsageError

__all__ = ["main", "record", "producer"]

#: the ops live ggml records (those of jaxkv.ops naming a live-ggml target), in registry order
OPS = tuple(o.name for o in ops.OPS.values() if o.target)
#: K/V storage types in ggml's spelling (jaxkv.formats.KV_TYPES); BLOCK: the block-quantized ones
FORMATS = tuple(F.ggml_name(t) for t in F.KV_TYPES)
BLOCK = tuple(F.ggml_name(t) for t in F.BLOCK_KV_TYPES)
MASKS = S.MENU_MASKS


_UsageError, _Parser = UsageError, Parser  # one line, exit 2, no usage dump


def _parser():
    p = _Parser(prog=cli.prog('record'), description=__doc__.splitlines()[0])
    p.add_argument("--op", required=True, choices=OPS)
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--k-format", default="F16", type=str.upper, choices=FORMATS)
    p.add_argument("--v-format", default="F16", type=str.upper, choices=FORMATS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-q", type=int, default=1)
    p.add_argument("--n-kv", type=int, default=256)
    p.add_argument("--n-cold", type=int, default=None, help="mixed_flash_attn: cold tokens (default n_kv - 16)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dv", type=int, default=None, help="V head size (default --head-dim)")
    p.add_argument("--mask", default="none", choices=MASKS)
    p.add_argument("--mask-param", type=int, default=16, help="window length / random -inf rate in 64ths")
    p.add_argument("--softcap", type=float, default=0.0)
    p.add_argument("--max-bias", type=float, default=0.0)
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--v-scale", type=float, default=1.0,
                   help="multiply the drawn V values (standard normal) by this factor")
    return p


def _validate(a):
    a.dv = a.head_dim if a.dv is None else a.dv
    for name in ("batch", "n_q", "n_kv", "heads", "kv_heads", "head_dim", "dv"):
        if getattr(a, name) < 1:
            raise _UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    if a.heads % a.kv_heads:
        raise _UsageError(f"--kv-heads: must divide --heads={a.heads}, got {a.kv_heads}")
    if not 1 <= a.threads <= 512:
        raise _UsageError(f"--threads: must be in [1, 512], got {a.threads}")
    if not 0 <= a.seed < 2**63:
        raise _UsageError(f"--seed: must be in [0, 2^63), got {a.seed}")
    if a.mask_param < 1:
        raise _UsageError(f"--mask-param: must be >= 1, got {a.mask_param}")
    for name in ("softcap", "max_bias"):
        x = getattr(a, name)
        if not np.isfinite(x) or x < 0 or x > 1e6:
            raise _UsageError(f"--{name.replace('_', '-')}: must be finite, >= 0 and <= 1e6, got {x}")
    if not np.isfinite(a.v_scale) or not 0 < a.v_scale <= 1e6:
        raise _UsageError(f"--v-scale: must be finite, > 0 and <= 1e6, got {a.v_scale}")
    if a.max_bias > 0 and a.mask == "none":
        raise _UsageError("--max-bias: ALiBi needs a mask (ggml aborts on max_bias > 0 without one)")
    for flag, fmt, d in (("--k-format", a.k_format, a.head_dim), ("--v-format", a.v_format, a.dv)):
        if fmt in BLOCK and d % 32:
            raise _UsageError(f"{flag}: {fmt} needs a head size multiple of 32, got {d}")
    op = ops.get(a.op, "--op")
    for name, given in (("softcap", a.softcap), ("sinks", a.sinks)):
        if given and not op.takes(name):
            raise _UsageError(f"--{name}: {op.name} ({op.doc}) has no {name}")
    if op.kv_f16:
        for flag, fmt in (("--k-format", a.k_format), ("--v-format", a.v_format)):
            if fmt not in BLOCK:
                raise _UsageError(f"{flag}: {op.name}'s cold region needs a block type {BLOCK}, got {fmt}")
        a.n_cold = max(a.n_kv - 16, 0) if a.n_cold is None else a.n_cold
        if not 0 <= a.n_cold <= a.n_kv:
            raise _UsageError(f"--n-cold: must be in [0, --n-kv={a.n_kv}], got {a.n_cold}")
    else:
        v_types = tuple(F.ggml_name(t) for t in op.roles["v"])
        if a.v_format not in v_types:
            raise _UsageError(f"--v-format: {op.name} reads V as {' or '.join(v_types)}, got {a.v_format}")
        if a.n_cold is not None:
            raise _UsageError(f"--n-cold: only for an op with a mixed cache "
                              f"({', '.join(o.name for o in ops.OPS.values() if o.kv_f16)})")
    if a.batch * a.n_kv * a.kv_heads * max(a.head_dim, a.dv) > 1 << 26 or a.batch * a.n_q * a.heads * a.n_kv > 1 << 26:
        raise _UsageError("--n-kv: the call is too large for a trace (over 2^26 elements in one tensor)")
    return a


def producer(info: dict, n_threads: int) -> str:
    """The trace producer string of a live-ggml call."""
    return f"ggml {info['version']} ({info['commit']}) CPU {info['isa']} n_threads={n_threads}"


def record(a) -> dict:
    """Run the call described by parsed, validated args ``a`` through live ggml; returns the keyword
    fields of jaxkv.trace.save."""
    from fuzz import ggml_targets as T
    from jaxkv.oracles import ggml as G

    info = G.library_info()
    rng = np.random.default_rng(a.seed)
    q = rng.standard_normal((a.batch, a.n_q, a.heads, a.head_dim)).astype(np.float32)
    k = rng.standard_normal((a.batch, a.n_kv, a.kv_heads, a.head_dim)).astype(np.float32)
    v = (rng.standard_normal((a.batch, a.n_kv, a.kv_heads, a.dv)) * a.v_scale).astype(np.float32)
    mask = C.menu_mask(rng, a.mask, a.mask_param, 1, 1, a.n_q, a.n_kv)
    sinks = (rng.standard_normal(a.heads) * 2).astype(np.float32) if a.sinks else None
    op = ops.get(a.op)
    name = op.target
    hot = a.n_kv - a.n_cold if op.kv_f16 else 0
    fn = T.make_target(name, a.threads, k_format=a.k_format, v_format=a.v_format, hot=hot)
    scale = float(np.float32(1.0 / np.sqrt(a.head_dim)))
    out = fn(q, k, v, scale=scale, mask=mask, softcap=a.softcap, max_bias=a.max_bias, sinks=sinks)
    st = T.prepare(name, k, v, k_format=a.k_format, v_format=a.v_format, hot=hot)
    meta = {"ggml.version": info["version"], "ggml.commit": info["commit"], "ggml.isa": info["isa"],
            "ggml.wheel": info["wheel"] or "", "record.seed": int(a.seed), "record.args": a.argv,
            "ggml.llamafile": bool(info["features"].get("llamafile", False)), **info.get("contract", {})}
    fields = dict(op=a.op, producer=producer(info, a.threads), scale=scale, max_bias=float(np.float32(a.max_bias)),
                  softcap=float(np.float32(a.softcap)), n_threads=a.threads, q=q, mask=mask, sinks=sinks,
                  out=np.asarray(out, np.float32), metadata=meta, **st)
    if op.kv_f16:
        fields["kv_order"] = "cold,hot"
    return fields


def main(argv=None) -> int:
    """CLI entry (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = _validate(_parser().parse_args(argv))
        a.argv = shlex.join(argv)
        from jaxkv.oracles import ggml as G

        if not G.available():
            raise _UsageError("ggml is not available here (pip install libggml-python on x86-64 Linux)")
        fields = record(a)
        path = TR.save(a.out, **fields)
    except _UsageError as e:
        print(f"{cli.prog('record')}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # OracleInputError / TraceError are ValueErrors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{cli.prog('record')}: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({fields['producer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A campaign against live ggml: random cases through :mod:`fuzz.ggml_targets`, judged against the
``ggml-cpu`` precision model (:mod:`jaxkv.ggml_cpu` at the wheel's ISA) with jaxkv.verify's budgets.

    python -m fuzz.ggml_campaign [--n N] [--seed S] [--menu ci|full|tiled] [--out DIR]

A case is a JSON-ready dict (:func:`draw_case` / :func:`case_strategy`): ``op`` ('ggml', 'ggml-unfused',
'ggml-mixed'), ``bucket`` (a fixed shape: :data:`BUCKETS`), ``k_fmt``/``v_fmt`` (ggml type names, K and V
independent), ``flags`` (which optional operands exist: mask, per-head mask, softcap, ALiBi, sinks),
``mask`` kind, ``softcap``, ``max_bias``, ``threads`` (1..4), ``scale``, value ``dist`` and ``seed``.
Shapes are bucketed so the JAX model compiles a few programs; values, masks and parameters vary freely.
The 'full' menu adds the tiled path (n_q >= 64), the split-KV path at a leftover head size, head sizes
60 / 40 / 112 with SIMD leftovers (F16/F32 K/V: 'ggml-float' cases) and GQA 32. Every run ends with a
path-coverage table (fuzz.ggml_targets.coverage_table: the ggml code paths and K/V types exercised).

Layout as everywhere: q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask
[B|1, H|1, n_q, n_kv], sinks [H], out [B, n_q, H, Dv].

Verdict per case (:func:`check`): the kernel (live ggml) passes when (1) jaxkv.verify's budget holds
against an independent float64 golden computed here in numpy on the operands ggml stores
(``error <= 3 * error(model) + 4 f32 units``) and (2) the sharp emulation check holds (within
``EMU_UNITS`` accumulator roundings of the emulation: ``verify.emu_check``). Bitwise equality with the
model is recorded (it is expected everywhere: the model is bit-faithful to the wheel).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import sys

import numpy as np

from fuzz import cases as C
from jaxkv import alibi
from fuzz import strategies as S

__all__ = ["BUCKETS", "FORMATS", "MENUS", "draw_case", "case_strategy", "arrays", "dense_operands", "golden",
           "check", "judge", "Result", "main"]

FORMATS = ("F16", "F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
_BLOCK = FORMATS[2:]
#: name -> (B, n_q, H, Hkv, Dk, Dv, n_kv); 'split' is ggml's split-KV path (n_q = B = 1, n_kv >= 512)
BUCKETS = {
    "row": (2, 3, 4, 2, 64, 64, 96),
    "gqa3": (1, 2, 6, 2, 64, 32, 64),     # G = 3, H = 6: ALiBi's second slope series, Dk != Dv
    "split": (1, 1, 4, 2, 64, 64, 640),
    "split_d80": (1, 1, 8, 1, 80, 80, 530),   # split-KV with a SIMD leftover head size, G = 8
    "tiled": (1, 64, 4, 2, 64, 64, 100),      # n_q >= 64: the tiled path for same-type F16/F32 K/V
    "tiled_d40": (1, 96, 4, 1, 40, 40, 70),   # tiled (or, where Dv % lanes != 0, per-row) with G = 4
    "d60": (1, 3, 4, 2, 60, 60, 33),          # leftover head sizes: F16/F32 only (blocks need 32s)
    "d112": (2, 2, 4, 4, 112, 112, 50),
    "gqa32": (1, 1, 32, 1, 128, 128, 72),     # G = 32
    "tiled_n256": (1, 256, 2, 1, 80, 80, 300),  # four query tiles, five key tiles (the last ragged)
}
#: buckets whose head sizes are no multiple of 32 (F16/F32 K/V only)
FLOAT_ONLY = ("split_d80", "tiled_d40", "d60", "d112")
MASKS = ("none", "causal", "window", "random", "fullrow")
#: flag sets: (mask present, per-head mask, softcap, alibi, sinks)
FLAGSETS = {
    "plain": (False, False, False, False, False),
    "mask": (True, False, False, False, False),
    "all": (True, True, True, True, True),
    "alibi_sinks": (True, True, False, True, True),
    "softcap_sinks": (True, False, True, False, True),
    "alibi": (True, True, False, True, False),
}
#: menus of what a case may draw: 'ci' keeps the number of distinct compiled model programs small
MENUS = {
    "ci": dict(
        pairs=(("F16", "F16"), ("F32", "F32"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_1", "Q5_0"),
               ("Q5_1", "IQ4_NL"), ("F16", "Q8_0"), ("IQ4_NL", "F32")),
        mixed_pairs=(("Q4_0", "Q4_0"), ("Q8_0", "Q5_1")),
        unfused_k=("F16", "Q8_0", "IQ4_NL"),
        flagsets=("plain", "all", "alibi_sinks"),
        split_flagsets=("all",),
        buckets=("row",),
        split_buckets=("split",),
        float_buckets=(),
    ),
    "full": dict(
        pairs=tuple((a, b) for a in FORMATS for b in FORMATS),
        mixed_pairs=tuple((a, b) for a in _BLOCK for b in _BLOCK),
        unfused_k=FORMATS,
        flagsets=tuple(FLAGSETS),
        split_flagsets=tuple(FLAGSETS),
        buckets=("row", "gqa3", "tiled", "gqa32"),
        split_buckets=("split", "split_d80"),
        float_buckets=("tiled", "tiled_d40", "d60", "d112", "gqa32"),
    ),
    # the tiled path only (F16/F32 K/V, n_q >= 64) and the mixed cache on it
    "tiled": dict(
        ops=("ggml-float", "ggml-float", "ggml-mixed"),
        pairs=(), mixed_pairs=tuple((a, b) for a in _BLOCK for b in _BLOCK), unfused_k=(),
        flagsets=tuple(FLAGSETS), split_flagsets=(), buckets=("tiled",), split_buckets=(),
        float_buckets=("tiled", "tiled_d40", "tiled_n256"),
    ),
}
_DISTS = ("normal", "outlier", "uniform", "big")
HOT = 16
FLT_MIN = 2.0 ** -126  # smallest normal float32


# ----------------------------------------------------------------------------------------------------
# cases


def draw_case(draw, menu="ci") -> dict:
    """One case; ``draw(choices)`` picks one element of a sequence, ``draw(('int', lo, hi))`` an int,
    ``draw(('float', lo, hi))`` a float (so the same code serves numpy RNGs and hypothesis)."""
    m = MENUS[menu]
    ops = ("ggml", "ggml", "ggml-split", "ggml-unfused", "ggml-mixed")
    op = draw(m.get("ops") or ops + (("ggml-float", "ggml-float") if m["float_buckets"] else ()))
    if op == "ggml-split":
        op, bucket = "ggml", draw(m["split_buckets"])
        kf = vf = draw(("F16", "F32"))
        flags = draw(m["split_flagsets"])
    elif op == "ggml-float":  # F16/F32 K/V: the tiled path, leftover head sizes, GQA 32
        op, bucket = "ggml", draw(m["float_buckets"])
        kf = draw(("F16", "F32"))
        vf = kf if draw((True, True, False)) else draw(("F16", "F32"))
        flags = draw(m["flagsets"])
    else:
        bucket = draw(m["buckets"])
        if op == "ggml-unfused":
            kf, vf = draw(m["unfused_k"]), draw(("F16", "F32"))
        elif op == "ggml-mixed":
            kf, vf = draw(m["mixed_pairs"])
        else:
            kf, vf = draw(m["pairs"])
        flags = draw(m["flagsets"])
    has_mask, _, softcap, alibi, sinks = FLAGSETS[flags]
    if op == "ggml-unfused" and (softcap or sinks):
        flags = "alibi" if alibi else "mask"  # soft_max_ext has no softcap and no sinks
    return dict(
        op=op, bucket=bucket, k_fmt=kf, v_fmt=vf, flags=flags,
        mask=draw(MASKS[1:]) if has_mask else "none", mask_param=draw(("int", 1, 48)),
        softcap=float(np.float32(draw(("float", 1.0, 50.0)))) if softcap and op != "ggml-unfused" else 0.0,
        max_bias=float(np.float32(draw(("float", 0.5, 12.0)))) if alibi else 0.0,
        threads=draw(("int", 1, 4)),
        scale=float(np.float32(draw(("float", 0.02, 0.5)))),
        dist=draw(_DISTS), seed=draw(("int", 0, 2**31 - 1)),
    )


def case_strategy(menu="ci"):
    """A hypothesis strategy of cases (:func:`draw_case`)."""
    return S.menu_strategy(lambda draw: draw_case(draw, menu))


def rng_drawer(rng):
    """A ``draw`` for :func:`draw_case` from a numpy Generator."""
    def draw(spec):
        if isinstance(spec, tuple) and spec and spec[0] == "int":
            return int(rng.integers(spec[1], spec[2] + 1))
        if isinstance(spec, tuple) and spec and spec[0] == "float":
            return float(rng.uniform(spec[1], spec[2]))
        return spec[int(rng.integers(len(spec)))]
    return draw


def arrays(c) -> dict:
    """Case -> dict(q, k, v (float32; stored by the target in k_fmt/v_fmt), mask, sinks, scale, softcap,
    max_bias) for the canonical target signature."""
    B, n_q, H, Hkv, Dk, Dv, n = BUCKETS[c["bucket"]]
    rng = np.random.default_rng(int(c["seed"]))
    has_mask, per_head, _, _, sinks = FLAGSETS[c["flags"]]
    q = C.menu_values(rng, (B, n_q, H, Dk), c["dist"])
    k = C.menu_values(rng, (B, n, Hkv, Dk), c["dist"])
    v = C.menu_values(rng, (B, n, Hkv, Dv), "normal")
    mask = C.menu_mask(rng, c["mask"], int(c["mask_param"]), B if per_head else 1, H if per_head else 1, n_q, n)
    s = (rng.standard_normal(H) * 2).astype(np.float32) if sinks and c["op"] != "ggml-unfused" else None
    return dict(q=q, k=k, v=v, mask=mask, sinks=s, scale=c["scale"], softcap=c["softcap"],
                max_bias=c["max_bias"])


# ----------------------------------------------------------------------------------------------------
# the golden reference (float64 numpy, independent of jaxkv's kernels)


def _slopes(H, max_bias):
    return alibi.slopes(H, max_bias, "exact")


def _dense(x):
    if hasattr(x, "raw"):
        from jaxkv import formats as F

        return np.asarray(F.dequantize(np.asarray(x.raw), x.fmt), np.float64)
    return np.asarray(x, np.float64)


def dense_operands(st):
    """(k, v) float64 [B, n_kv, Hkv, D]: the values ggml attends over for the storage ``st``
    (fuzz.ggml_targets.prepare): dequantized blocks, F16/F32 as stored; the mixed cache's cold and hot
    regions concatenated and rounded to F16 (ggml-mixed converts the concatenation to F16)."""
    if "k_cold" in st:
        return tuple(np.concatenate([_dense(st[f"{r}_cold"]), _dense(st[f"{r}_hot"])], 1)
                     .astype(np.float16).astype(np.float64) for r in ("k", "v"))
    return _dense(st["k"]), _dense(st["v"])


def golden(a, st) -> np.ndarray:
    """float64 [B, n_q, H, Dv]: exact attention of the call ``a`` (q, mask, sinks, scale, softcap,
    max_bias) over the operands as ggml stores them (``st`` from fuzz.ggml_targets.prepare: k, v or, for
    the mixed cache, k_cold, v_cold, k_hot, v_hot), the mask rounded to F16 (ggml's mask type), q
    unrounded. A row with no live key and no sink is 0."""
    k, v = dense_operands(st)
    q = np.asarray(a["q"], np.float64)
    H, Hkv = q.shape[2], k.shape[2]
    kvh = np.arange(H) // (H // Hkv)
    s = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kvh]) * a["scale"]
    if a["softcap"]:
        s = a["softcap"] * np.tanh(s / a["softcap"])
    if a["mask"] is not None:
        mk = np.asarray(a["mask"], np.float16).astype(np.float64)
        with np.errstate(invalid="ignore"):
            s = np.where(mk == -np.inf, -np.inf, s + _slopes(H, a["max_bias"])[None, :, None, None] * mk)
    m = s.max(-1)
    if a["sinks"] is not None:
        m = np.maximum(m, np.asarray(a["sinks"], np.float64)[None, :, None])
    ms = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - ms[..., None])
    den = p.sum(-1)
    if a["sinks"] is not None:
        den = den + np.exp(np.asarray(a["sinks"], np.float64)[None, :, None] - ms)
    num = np.einsum("bhqk,bkhd->bqhd", p, v[:, :, kvh])
    den = np.transpose(den, (0, 2, 1))[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------
# ALiBi slopes as ggml computes them (libm powf)


def libm_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """ggml's ALiBi slopes [H] float64 (float32 values), computed exactly as ggml-cpu does, with the C
    library's ``powf`` (:func:`jaxkv.alibi.slopes`, ``pow="libm"``)."""
    return alibi.slopes(n_head, max_bias, "libm")


def model_slopes_agree(n_head: int, max_bias: float) -> bool:
    """Whether jaxkv.ggml_cpu's slopes equal :func:`libm_slopes` (an independent computation here)."""
    from jaxkv import ggml_cpu as M

    return bool(np.array_equal(np.asarray(M._slopes(n_head, max_bias), np.float64), libm_slopes(n_head, max_bias)))


@contextlib.contextmanager
def slopes_in_model(slopes):
    """Run jaxkv.ggml_cpu with ``slopes(n_head, max_bias) -> [H]`` as its ALiBi slopes (to show what
    other slopes would change)."""
    from jaxkv import ggml_cpu as M

    old = M._slopes
    M._slopes = slopes
    try:
        yield
    finally:
        M._slopes = old


# ----------------------------------------------------------------------------------------------------
# the verdict


@dataclasses.dataclass(frozen=True)
class Result:
    """One case's outcome: ``ok``; ``bitwise`` (fraction of output elements equal to the model's);
    ``nmse_model`` (kernel vs model); ``emu_units`` (verify.emu_check); ``nmse``/``budget_nmse`` (vs the
    golden and its budget); ``why`` (the failed checks). Float32 subnormal outputs count like any other
    value (the model keeps them, as ggml does: docs/ggml-findings.md, finding 3)."""

    ok: bool
    bitwise: float
    nmse_model: float
    emu_units: float
    nmse: float
    budget_nmse: float
    why: str | None


def _nmse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    p = float(np.sum(b * b))
    e = float(np.sum((a - b) ** 2))
    return 0.0 if e == 0 else (e / p if p else math.inf)


def run(c):
    """Case -> (got (live ggml), model (ggml-cpu emulation), golden, acc unit)."""
    from fuzz import ggml_targets as T
    from jaxkv import verify as V

    a = arrays(c)
    fn = T.make_target(c["op"], int(c["threads"]), k_format=c["k_fmt"], v_format=c["v_fmt"], hot=HOT)
    kw = dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"], sinks=a["sinks"])
    got = fn(a["q"], a["k"], a["v"], **kw)
    COVERAGE.update(fn.coverage)
    model = fn.model(a["q"], a["k"], a["v"], **kw)
    st = T.prepare(c["op"], a["k"], a["v"], k_format=c["k_fmt"], v_format=c["v_fmt"], hot=HOT)
    g = golden(a, st)
    unit = V.acc_unit(c["op"] == "ggml-mixed", c["v_fmt"] == "F16")
    return got, model, g, unit


#: (op, ggml path, K type, V type, n_threads) -> live-ggml calls made by :func:`run` in this process
COVERAGE: "collections.Counter" = collections.Counter()


def dead_rows(a) -> np.ndarray:
    """bool [B, n_q, H]: output rows of case arrays ``a`` with no live key and no sink
    (jaxkv.verify.dead_rows)."""
    from jaxkv import verify as V

    return V.dead_rows(a["q"], a["mask"], a["sinks"])


def check(c) -> Result:
    """Run one case and judge it (module docstring). ggml's unfused path gives NaN on rows with no
    live key (soft_max_ext of an all -inf row: docs/ggml-findings.md); there the kernel and the model
    must both be NaN in exactly those rows, which are then judged as the golden's 0 (:func:`judge`)."""
    got, model, g, unit = run(c)
    return judge(got, model, g, unit, dead_rows(arrays(c)) if c["op"] == "ggml-unfused" else None)


def judge(got, model, g, unit, unfused_dead=None) -> Result:
    """The verdict of a live-ggml output ``got`` against the ``ggml-cpu`` emulation ``model`` and the
    float64 golden ``g`` (all [B, n_q, H, Dv]; ``unit``: the V accumulator's unit roundoff, verify.U16 or
    verify.U32): jaxkv.verify's budget vs the golden and its sharp check vs the emulation.
    ``unfused_dead`` (bool [B, n_q, H], the unfused path only): rows with no live key, where ggml's
    soft_max_ext gives NaN: kernel and model must both be NaN in exactly those rows, which are then
    judged as the golden's 0."""
    from jaxkv import verify as V

    why = []
    if unfused_dead is not None:
        dead = np.asarray(unfused_dead, bool)[..., None]
        for name, x in (("kernel", got), ("model", model)):
            nan = np.isnan(x)
            if not np.array_equal(nan, np.broadcast_to(dead, x.shape)):
                why.append(f"{name}: NaN in {int(nan.sum())} elements, expected exactly the "
                           f"{int(np.broadcast_to(dead, x.shape).sum())} of the rows with no live key")
        got, model = np.where(dead, 0.0, got), np.where(dead, 0.0, model)
    same = (got == model) | (np.isnan(got) & np.isnan(model))
    budget = V.derive_budget(g, model, "ggml-cpu emulation")
    e = V.errors(got, g)
    emu = V.emu_check(got, model, unit)
    if not budget.allows(e):
        why.append(f"vs golden: nmse {e.nmse:.3g} (budget {budget.nmse:.3g}), max_abs {e.max_abs:.3g} "
                   f"(budget {budget.max_abs:.3g}), NaN {e.nan_count}")
    if not emu.ok:
        why.append(f"vs emulation: {emu.units:.3g} units (budget {emu.budget_units:g}), {emu.n_differ} differ")
    with np.errstate(all="ignore"):
        nm = _nmse(np.nan_to_num(got), np.nan_to_num(model))
    return Result(ok=not why, bitwise=float(same.mean()), nmse_model=nm, emu_units=emu.units, nmse=e.nmse,
                  budget_nmse=budget.nmse, why="; ".join(why) or None)


def main(argv=None) -> int:
    """CLI (module docstring): prints one line per failing case and a summary; exit 1 on any failure."""
    import argparse
    import pathlib
    import time

    p = argparse.ArgumentParser(prog="python -m fuzz.ggml_campaign")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--menu", choices=tuple(MENUS), default="full")
    p.add_argument("--out", default=None, help="write failing cases as JSON lines here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    draw = rng_drawer(rng)
    t0 = time.time()
    fails, stats = [], collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
    for i in range(args.n):
        c = draw_case(draw, args.menu)
        r = check(c)
        key = f"{c['op']}/{c['bucket']}"
        s = stats[key]
        s[0] += 1
        s[1] += r.bitwise == 1.0
        s[2] = max(s[2], r.nmse_model)
        s[3] = max(s[3], r.emu_units)
        if not r.ok:
            fails.append(dict(case=c, why=r.why, bitwise=r.bitwise))
            print(f"FAIL {json.dumps(c)}: {r.why}", flush=True)
    for key, (n, eq, worst, units) in sorted(stats.items()):
        print(f"{key:22} cases {n:5}  bitwise-equal {eq:5}  worst nmse vs model {worst:.3g}  "
              f"max emu units {units:.3g}")
    from fuzz import ggml_targets as T

    print(T.coverage_table(COVERAGE))
    print(f"{args.n} cases, {len(fails)} failed, {time.time() - t0:.1f} s")
    if args.out and fails:
        pathlib.Path(args.out).write_text("".join(json.dumps(f) + "\n" for f in fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

"""The named fuzz properties: what each one checks, its case strategy and its batched evaluation.

A :class:`Property` has a hypothesis ``strategy(ctx)`` of case parameters (fuzz.strategies) and
``evaluate(cases, ctx) -> [outcome]``, an outcome being ``dict(ok, checks, error, metrics)``: ``checks``
is the number of independent assertions made on the case, ``error`` a one-line message when not ok.
``call(case, ctx)`` gives the arrays of the (padded) attention call a failing case made, for saving.
``batch`` / ``stream`` say when verdicts become known (per vmapped batch, per case, or streamed):
:func:`outcomes` yields them so, and the campaign records each as it comes.

Tolerances: a float32 kernel vs the float64 golden within the a-priori elementwise forward-error bound
of :mod:`fuzz.bounds` (derived from the case's own inputs, docs/tolerance.md "Fuzz budgets");
a ``--target`` declaring the ``ggml-cpu`` precision (fuzz.ggml_targets) vs its emulation and the golden
over its stored operands with jaxkv.verify's ggml-cpu budget and sharp check (fuzz.engine.judge);
a ``--target`` declaring another precision (``f32``, ``f16``, ``f64``) op-generically, on the case's own
call, by jaxkv.verify's judge: its op's judged golden and its op's model for that precision, the budget
derived from them (:func:`declared_verdict`; a failure is what ``jaxkv verify`` says of the saved trace);
algebraic laws that hold exactly in IEEE arithmetic (identity, commutativity of ``merge``, byte equality
of quantizers with the ``gguf`` package, cache bookkeeping) are checked exactly.
"""

from __future__ import annotations

import importlib
import math
import pathlib

import jax
import jax.numpy as jnp
import gguf
import numpy as np
from gguf import quants
from hypothesis import strategies as st

from fuzz import cases as C
from fuzz import strategies as S
from fuzz import bounds as Bd
from fuzz.engine import Batched, acc_unit, judge
from fuzz.target import dense_case
from jaxkv import attention as _att
from jaxkv import cache as K
from jaxkv import formats as F
from jaxkv import trace
from jaxkv import verify
from fuzz.registry import PROPERTIES, Context, Property, each_case, outcomes  # noqa: F401
from fuzz.registry import fixed as _s
from fuzz.registry import outcome as _outcome
from fuzz.registry import register as _register

__all__ = ["Property", "Context", "PROPERTIES", "get", "available", "outcomes", "each_case",
           "target_operands", "ggml_cpu_reference", "target_call", "sharp_case", "check_sharp", "not_taken",
           "declared_trace", "declared_verdict"]


def _fmt_metrics(m):
    return (f"{m['outside']} element(s) outside the error bound (worst {m['usage']:.3g}x its bound), "
            f"nmse {m['nmse']:.3g} (bound {m['budget_nmse']:.3g}), max_abs {m['max_abs']:.3g}, "
            f"NaN {m['nan_count']}")


def _judge(res: dict) -> dict:
    """Outcome from a program result: every key holds a kernel's :func:`fuzz.bounds.bound_stats`
    (judged by :func:`fuzz.bounds.verdict`), except keys starting with 'exact_': violation counts
    (must be 0)."""
    errs, checks, metrics = [], 0, {}
    for name, val in res.items():
        checks += 1
        if name.startswith("exact_"):
            n = int(np.asarray(val).sum())
            metrics[name] = n
            if n:
                errs.append(f"{name[6:]}: {n} violation(s)")
            continue
        ok, m = Bd.verdict(val)
        metrics[name] = m
        if not ok:
            errs.append(f"{name}: {_fmt_metrics(m)}")
    return _outcome(not errs, checks, "; ".join(errs) or None, **metrics)


# ----------------------------------------------------------------------------------------------------
# attention properties (batched over padded cases)



def _kw(a, sinks=True):
    return dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"],
                sinks=a["sinks"] if sinks else None)


def _ref(a, precision, k=None, v=None):
    return _att.attention(a["q"], a["k"] if k is None else k, a["v"] if v is None else v,
                          precision=precision, **_kw(a))


def _key(c):
    return (tuple(c["heads"]), int(c["bucket"]))


def _bitdiff(x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    return jnp.sum(~((x == y) | (jnp.isnan(x) & jnp.isnan(y))))


def _dead_rows(a, got):
    """Rows (batch, query, head) whose keys are all masked and that have no sink must be exactly 0."""
    dead = jnp.all(a["mask"] == -jnp.inf, axis=-1)  # [PB, H, PNQ]
    dead = jnp.transpose(dead, (0, 2, 1)) & (a["sinks"] == -jnp.inf)[None, None, :]
    row_valid = a["valid"][..., 0, 0][:, :, None] > 0  # [PB, PNQ, 1]
    nonzero = jnp.any(got != 0, axis=-1)  # NaN != 0 too
    return jnp.sum(dead & row_valid & nonzero)


def _merge_laws(a, cuts, g, bs):
    """Partial states of the keys [0, a), [a, b), [b, n) (cut by masking) and the laws of merge."""
    q, k, v, mask = a["q"], a["k"], a["v"], a["mask"]
    j = jnp.arange(k.shape[1])
    parts = [j < cuts[0], (j >= cuts[0]) & (j < cuts[1]), j >= cuts[1]]
    kw = dict(scale=a["scale"], softcap=a["softcap"], max_bias=a["max_bias"], precision="f32")
    s0, s1, s2 = (_att.partial_state(q, k, v, mask=jnp.where(p, mask, -jnp.inf), **kw) for p in parts)
    PB, PNQ, H = s0.m.shape
    e = _att.empty_state(PB, PNQ, H, v.shape[-1], jnp.float32)
    m = _att.merge

    def sd(x, y):
        return _bitdiff(x.m, y.m) + _bitdiff(x.l, y.l) + _bitdiff(x.acc, y.acc)
    ee = m(e, e)
    left = _att.finalize(m(m(s0, s1), s2), a["sinks"])
    right = _att.finalize(m(s0, m(s1, s2)), a["sinks"])
    return dict(exact_identity=sd(m(s0, e), s0) + sd(m(e, s1), s1),
                exact_commutative=sd(m(s0, s1), m(s1, s0)) + sd(m(s1, s2), m(s2, s1)),
                exact_empty=sd(ee, e) + jnp.sum(jnp.isnan(ee.acc)),
                merged_left=Bd.bound_stats(left, g, bs, a["valid"]),
                merged_right=Bd.bound_stats(right, g, bs, a["valid"]))


def _kernels_make(key):
    """The program of a bucket (heads, KV bucket, results needed): golden (f64), the elementwise error
    bounds of :mod:`fuzz.bounds` (``TWO_PASS`` for ``attention``, ``STREAMING`` for jaxkv's split-K,
    online and merged kernels) and the kernels under test on one padded case, each as ``bound_stats``. One
    program serves every attention property of a campaign (``needs`` is the union of what they judge,
    see :func:`_needs`); each property judges the results it names."""
    (H, Hkv), bucket, needs = key
    G = H // Hkv
    chunk = S.KV_BUCKETS[bucket]
    needs = set(needs)

    def fn(a, cuts):
        q, k, v, val = a["q"], a["k"], a["v"], a["valid"]
        g = _ref(a, "f64")
        at = _ref(a, "f32")
        t = Bd.terms(a, g)
        b2, bs = Bd.bound(t, Bd.TWO_PASS), Bd.bound(t, Bd.STREAMING)
        r = {}
        if needs & {"attention", "exact_dead_rows_zero"}:
            r["attention"] = Bd.bound_stats(at, g, b2, val)
        dead = []
        if needs & {"flash_decode", "exact_dead_rows_zero"}:
            fl = _att.flash_decode(q, k, v, chunk=chunk, precision="f32", **_kw(a))
            r["flash_decode"] = Bd.bound_stats(fl, g, bs, val)
            dead.append(fl)
        if needs & {"online_attention", "exact_dead_rows_zero"}:
            on = _att.online_attention(q, k, v, precision="f32", **_kw(a))
            r["online_attention"] = Bd.bound_stats(on, g, bs, val)
            dead.append(on)
        if "exact_dead_rows_zero" in needs:
            r["exact_dead_rows_zero"] = sum(_dead_rows(a, x) for x in [at] + dead)
        if G > 1 and needs & {"attention_gqa", "flash_decode_gqa"}:  # GQA vs MHA over repeated K/V
            kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
            gr = _ref(a, "f64", kr, vr)
            fl = _att.flash_decode(q, k, v, chunk=chunk, precision="f32", **_kw(a))
            r.update(attention_gqa=Bd.bound_stats(at, gr, b2, val),
                     flash_decode_gqa=Bd.bound_stats(fl, gr, bs, val))
        if needs & {"exact_identity", "merged_left"}:
            r.update(_merge_laws(a, cuts, g, bs))
        return r
    return fn


_KERNELS = Batched(_kernels_make)


def _attention_names() -> tuple:
    return tuple(n for n, p in PROPERTIES.items() if p.judges)


def _needs(name, judged, ctx) -> tuple:
    """What the shared attention program computes for property ``name`` in context ``ctx``: the union of
    what the context's active attention properties judge (all of them when none is active), or just
    ``judged`` when ``name`` is not among them."""
    names = [n for n in ctx.active if n in _attention_names()] or list(_attention_names())
    if name not in names:
        return tuple(sorted(judged))
    return tuple(sorted({x for n in names for x in PROPERTIES[n].judges}))


def _attention_property(name, doc, judged, strategy, kernel=None):
    """A property over the shared kernels program: ``judged`` names the results it checks; ``kernel``
    (canonical signature) recomputes the first judged output for a failure's trace file."""
    def evaluate(cases, ctx):
        groups = {}
        needs = _needs(name, judged, ctx)
        for i, c in enumerate(cases):
            groups.setdefault(_key(c) + (needs,), []).append(i)
        out = [None] * len(cases)
        for key, idx in groups.items():
            args = []
            for i in idx:
                c = cases[i]
                cuts = c.get("cuts", [0, c["n_kv"]])
                args.append((C.pad_attention(c), np.asarray(cuts, np.int32)))
            for i, r in zip(idx, _KERNELS.run(key, args)):
                out[i] = _judge({n: r[n] for n in judged})
        return out

    return Property(name, doc, strategy, evaluate, call=lambda c, ctx: C.pad_attention(c), kernel=kernel,
                    judges=tuple(judged))


def _flash_kernel(q, k, v, **kw):
    """jaxkv.attention.flash_decode (split-K, chunk = the KV bucket's, f32)"""
    return _att.flash_decode(q, k, v, chunk=S.KV_BUCKETS[64], precision="f32", **kw)


def _online_kernel(q, k, v, **kw):
    """jaxkv.attention.online_attention (f32)"""
    return _att.online_attention(q, k, v, precision="f32", **kw)



# ----------------------------------------------------------------------------------------------------
# formats vs the gguf package (exact)

def _gguf_type(fmt):
    return gguf.GGMLQuantizationType(F.get_format(fmt).type_id)


def _raw_blocks(c):
    """Random ggml blocks uint8 [rows, blocks * block_bytes]; ``sane``: F16/BF16/F32 fields finite."""
    f = F.get_format(c["fmt"])
    rng = np.random.default_rng(int(c["seed"]))
    raw = rng.integers(0, 256, (c["rows"], c["blocks"], f.block_bytes), dtype=np.uint8)
    if c["sane"]:
        for fld in f.fields:
            if fld.kind in ("f16", "bf16", "f32"):
                vals = rng.uniform(-2, 2, (c["rows"], c["blocks"]))
                dt = {"f16": np.float16, "f32": np.float32}.get(fld.kind)
                b = (vals.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8) \
                    if dt is None else vals.astype(dt).view(np.uint8)
                raw[:, :, fld.offset:fld.offset + fld.size] = b.reshape(c["rows"], c["blocks"], -1)
    return raw.reshape(c["rows"], -1)


def _same_floats(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    eq = (a == b) | (np.isnan(a) & np.isnan(b))
    return int(np.size(a) - np.count_nonzero(eq))


def _dequant_make(fmt):
    return lambda raw: F.dequantize(raw, fmt)


_dequant_batched = Batched(_dequant_make)


def _by_format(cases, batched, width, host, judge):
    """Evaluate format cases, grouped by ``fmt``, through ``batched`` (one program per format): ``host(c)``
    gives the case's input [rows, n] (rows, blocks <= 8), embedded in a fixed [8, 8 * width(format)]
    buffer of zeros; ``judge(c, format, got)`` turns the program's output into the outcome."""
    out = [None] * len(cases)
    groups = {}
    for i, c in enumerate(cases):
        groups.setdefault(c["fmt"], []).append(i)
    for fmt, idx in groups.items():
        f = F.get_format(fmt)
        args = []
        for i in idx:
            x = host(cases[i])
            buf = np.zeros((8, 8 * width(f)), x.dtype)
            buf[:x.shape[0], :x.shape[1]] = x
            args.append((buf,))
        for i, got in zip(idx, batched.run(fmt, args)):
            out[i] = judge(cases[i], f, got)
    return out


def _dequant_judge(c, f, got):
    ref = quants.dequantize(_raw_blocks(c), _gguf_type(c["fmt"]))
    n = _same_floats(got[:c["rows"], :c["blocks"] * f.block_size], ref)
    return _outcome(n == 0, 1, f"{n} value(s) differ from gguf.quants.dequantize" if n else None, differ=n)


def _dequant_eval(cases, ctx):
    return _by_format(cases, _dequant_batched, lambda f: f.block_bytes, _raw_blocks, _dequant_judge)


def _values(c):
    f = F.get_format(c["fmt"])
    rng = np.random.default_rng(int(c["seed"]))
    return C.draw_values(rng, (c["rows"], c["blocks"] * f.block_size), c["dist"])


def _quant_make(fmt):
    return lambda x: F.quantize(x, fmt)


_quant_batched = Batched(_quant_make)


def _quant_judge(c, f, got):
    ref = np.asarray(quants.quantize(_values(c), _gguf_type(c["fmt"]))).view(np.uint8).reshape(c["rows"], -1)
    mine = np.asarray(got)[:c["rows"], :c["blocks"] * f.block_bytes]
    n = int(np.count_nonzero(mine != ref))
    return _outcome(n == 0, 1, f"{n} byte(s) differ from gguf.quants.quantize" if n else None, differ=n)


def _quant_eval(cases, ctx):
    return _by_format(cases, _quant_batched, lambda f: f.block_size, _values, _quant_judge)


# ----------------------------------------------------------------------------------------------------
# mixed cache

CACHE_D, CACHE_CAP, CACHE_PRE, CACHE_STEPS = 32, 48, 12, 16


def cache_pairs(seed: int, n: int = 3) -> tuple:
    """The (K, V) cold-format pairs a campaign's cache cases draw from: ``n`` pairs picked from all
    (K, V) combinations by the campaign seed (each pair is one compiled program of several seconds;
    different seeds cover different pairs; formats within a pair are independent)."""
    fm = S.QUANT_FORMATS + ("f16",)
    allp = [(a, b) for a in fm for b in fm]
    rng = np.random.default_rng(int(seed) + 7919)
    return tuple(allp[i] for i in rng.choice(len(allp), size=n, replace=False))


def _cache_strategy(ctx):
    pairs = ctx.cache_pairs or cache_pairs(ctx.seed)

    @st.composite
    def s(draw):
        k_fmt, v_fmt = draw(st.sampled_from(pairs))
        H, Hkv = 4, 2  # one head layout (GQA, G = 2): one program per format pair
        return dict(k_fmt=k_fmt, v_fmt=v_fmt, heads=[H, Hkv], prefill=draw(st.integers(0, CACHE_PRE)),
                    steps=draw(st.integers(0, CACHE_STEPS)), W=8, k_dist=draw(S.dist()),
                    v_dist=draw(S.dist()), q_dist=draw(S.dist()),
                    mask=draw(st.sampled_from(("none", "random", "causal"))), mask_param=draw(st.integers(1, 64)),
                    sinks=draw(st.booleans()), softcap=draw(st.sampled_from((0.0, 20.0))),
                    seed=draw(st.integers(0, 2**31 - 1)))
    return s()


def _cache_arrays(c):
    """Tokens (prefill block padded to CACHE_PRE, decode tokens padded to CACHE_STEPS), flags, query,
    logical mask over all CACHE_PRE + CACHE_STEPS positions, sinks."""
    rng = np.random.default_rng(int(c["seed"]))
    H, Hkv = c["heads"]
    D = CACHE_D
    T = CACHE_PRE + CACHE_STEPS
    k = C.draw_values(rng, (1, T, Hkv, D), c["k_dist"])
    v = C.draw_values(rng, (1, T, Hkv, D), c["v_dist"])
    q = C.draw_values(rng, (1, 1, H, D), c["q_dist"])
    n = c["prefill"] + c["steps"]
    m = C.make_mask(rng, c["mask"], c["mask_param"], 1, 1, 1, max(n, 1))
    mask = np.zeros((1, 1, 1, T), np.float32)
    if m is not None:
        mask[..., :max(n, 1)] = m
    sinks = (rng.standard_normal(H) * 2).astype(np.float32) if c["sinks"] else np.full(H, -np.inf, np.float32)
    with np.errstate(over="ignore"):
        k, v = (np.clip(x, -6e4, 6e4) for x in (k, v))  # F16 hot window: keep finite
    return dict(k=k, v=v, q=q, mask=mask, sinks=sinks)


def _cache_make(key):
    k_fmt, v_fmt, (H, Hkv) = key
    D = CACHE_D

    def fn(a, prefill, steps, softcap):
        c0 = K.init(1, Hkv, D, cap_cold=CACHE_CAP, window=8, k_format=k_fmt, v_format=v_fmt)
        # prefill: one multi-token append of the first `prefill` tokens (positions past it stay unused)
        kp, vp = a["k"][:, :CACHE_PRE], a["v"][:, :CACHE_PRE]
        live = (jnp.arange(CACHE_PRE) < prefill)[None, :, None, None]
        # prefill: a full block (CACHE_PRE > W tokens) is one multi-token append (several evictions at
        # once); a partial one (static shapes) goes token by token. Then `steps` decode appends.
        full = K.append(c0, kp, vp)

        def step(c, x):
            kn, vn, act = x
            c2 = K.append(c, kn[:, None], vn[:, None])
            return jax.tree.map(lambda n_, o_: jnp.where(act, n_, o_), c2, c), None
        toks = (jnp.moveaxis(kp, 1, 0), jnp.moveaxis(vp, 1, 0), live[0, :, 0, 0])
        partial_, _ = jax.lax.scan(step, c0, toks)
        c = jax.tree.map(lambda f_, p_: jnp.where(prefill == CACHE_PRE, f_, p_), full, partial_)
        kd, vd = a["k"][:, CACHE_PRE:], a["v"][:, CACHE_PRE:]
        act = jnp.arange(CACHE_STEPS) < steps
        c, _ = jax.lax.scan(step, c, (jnp.moveaxis(kd, 1, 0), jnp.moveaxis(vd, 1, 0), act))
        smask = K.slot_mask(c, a["mask"])
        kw = dict(scale=jnp.float32(1 / math.sqrt(D)), mask=smask, softcap=softcap, sinks=a["sinks"])
        got = K.attend(c, a["q"], chunk=16, precision="f32", **kw)
        kc = jnp.concatenate([c.k_cold.dequantize(), c.k_hot.astype(jnp.float32)], axis=1)
        vc = jnp.concatenate([c.v_cold.dequantize(), c.v_hot.astype(jnp.float32)], axis=1)
        g = _att.attention(a["q"], kc, vc, precision="f64", **kw)
        b = Bd.bound(Bd.terms(dict(kw, q=a["q"], k=kc, v=vc, max_bias=jnp.float32(0)), g), Bd.GENERIC)
        valid = jnp.ones((1, 1, 1, 1), jnp.float32)
        return dict(attend=Bd.bound_stats(got, g, b, valid)), dict(
            k_raw=c.k_cold.raw, v_raw=c.v_cold.raw, k_hot=c.k_hot, v_hot=c.v_hot, n_cold=c.n_cold,
            n_hot=c.n_hot)
    return fn


_cache_batched = Batched(_cache_make)


def _cache_run(cases):
    groups = {}
    for i, c in enumerate(cases):
        groups.setdefault((c["k_fmt"], c["v_fmt"], tuple(c["heads"])), []).append(i)
    out = [None] * len(cases)
    for key, idx in groups.items():
        args = [(_cache_arrays(cases[i]), np.int32(cases[i]["prefill"]), np.int32(cases[i]["steps"]),
                 np.float32(cases[i]["softcap"])) for i in idx]
        for i, r in zip(idx, _cache_batched.run(key, args)):
            out[i] = r
    return out


def _mixed_eval(cases, ctx):
    return [_judge(r[0]) for r in _cache_run(cases)]


def _expected_rows(x, fmt):
    """Cold rows a cache must hold for tokens x [B, n, Hkv, D] float32 (already F16-rounded): raw
    bytes from gguf's quantizer when it has one, else None (then only values are compared)."""
    try:
        return np.asarray(quants.quantize(x, _gguf_type(fmt))).view(np.uint8).reshape(x.shape[:-1] + (-1,))
    except NotImplementedError:
        return None


def _append_eval(cases, ctx):
    out = []
    for c, r in zip(cases, _cache_run(cases)):
        st_ = r[1]
        a = _cache_arrays(c)
        n = c["prefill"] + c["steps"]
        toks_k = np.concatenate([a["k"][:, :c["prefill"]], a["k"][:, CACHE_PRE:CACHE_PRE + c["steps"]]], 1)
        toks_v = np.concatenate([a["v"][:, :c["prefill"]], a["v"][:, CACHE_PRE:CACHE_PRE + c["steps"]]], 1)
        toks_k, toks_v = (x.astype(np.float16).astype(np.float32) for x in (toks_k, toks_v))
        n_hot = min(n, 8)
        n_cold = n - n_hot
        errs = []
        if int(st_["n_cold"]) != n_cold or int(st_["n_hot"]) != n_hot:
            errs.append(f"lengths: n_cold={int(st_['n_cold'])}, n_hot={int(st_['n_hot'])}, expected "
                        f"{n_cold}, {n_hot}")
        else:
            for nm, toks, raw, hot, fmt in (("k", toks_k, st_["k_raw"], st_["k_hot"], c["k_fmt"]),
                                            ("v", toks_v, st_["v_raw"], st_["v_hot"], c["v_fmt"])):
                if _same_floats(np.asarray(hot[:, :n_hot], np.float32), toks[:, n_cold:]):
                    errs.append(f"{nm}_hot: differs from the F16 rounding of the last {n_hot} tokens")
                if n_cold:
                    exp = _expected_rows(toks[:, :n_cold], fmt)
                    got = np.asarray(raw[:, :n_cold])
                    if exp is not None and np.count_nonzero(exp != got):
                        errs.append(f"{nm}_cold: {int(np.count_nonzero(exp != got))} byte(s) differ from "
                                    f"gguf.quants.quantize of the F16 tokens")
                    elif exp is None:
                        deq = np.asarray(F.dequantize(got, fmt))
                        ref = np.asarray(F.dequantize(F.quantize(toks[:, :n_cold], fmt), fmt))
                        if _same_floats(deq, ref):
                            errs.append(f"{nm}_cold: values differ from quantize(F16 tokens)")
        out.append(_outcome(not errs, 5, "; ".join(errs) or None, n_cold=n_cold, n_hot=n_hot))
    return out


# ----------------------------------------------------------------------------------------------------
# traces in a directory, the --target kernel

def _trace_files(ctx):
    if not ctx.traces:
        return []
    p = pathlib.Path(ctx.traces)
    files = sorted(x for x in p.rglob("*.gguf") if x.is_file()) if p.is_dir() else [p]
    return [dict(file=str(f)) for f in files]


def _traces_eval(cases, ctx):
    """Each file is one case: every call in it (one for trace v1, one per step of a foreign multi-step
    dump, via trace.load_steps) verified by jaxkv.verify; checks = calls."""
    out = []
    for c in cases:
        try:
            steps = trace.load_steps(c["file"])
            errs, diags = [], []
            for i, t in enumerate(steps):
                name = c["file"] if len(steps) == 1 else f"{c['file']}[step {i + 1}]"
                v = verify.verify_trace(t, name=name)
                if v.status != "pass":
                    errs.append(v.error or v.line())
                    diags.append(v.to_json().get("diagnosis"))
        except Exception as e:  # one bad file is one failed case, not a crash
            out.append(_outcome(False, 1, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        out.append(_outcome(not errs, len(steps), "; ".join(errs) or None, diagnosis=diags or None))
    return out


def _target_key(c):
    return (tuple(c["heads"]), int(c["bucket"]), bool(c["sinks"]))


def _target_call_kw(a, has_sinks):
    kw = dict(scale=a["scale"], mask=a["mask"], softcap=a["softcap"], max_bias=a["max_bias"],
              sinks=a["sinks"] if has_sinks else None)
    if "n_threads" in a:  # a ggml target's own case (fuzz.ggml_targets.case_arrays) draws its threads
        kw["n_threads"] = a["n_threads"]
    return kw


def target_operands(t, c, a):
    """(k, v) as the target ``t`` receives them for case ``c`` with arrays ``a``: float32, except that a
    ``ggml-cpu`` target gets float16 arrays where the case draws F16 storage (ggml then stores F16)."""
    if not t.sharp:
        return a["k"], a["v"]
    return tuple(np.asarray(a[r], np.float16) if c[f"{r}_fmt"] == "f16" else a[r] for r in ("k", "v"))


def ggml_cpu_reference(t, a, k, v, kw):
    """(model, golden, unit, dead) for a ``ggml-cpu`` target ``t`` (a :class:`fuzz.target.Target`) on
    the call ``a`` with operands k, v and keywords ``kw``: the target's emulation ``t.model`` and its op's
    float64 golden over the operands as the target stores them (:func:`fuzz.target.dense_case`), both
    [B, n_q, H, Dv]; ``unit``: :func:`fuzz.engine.acc_unit`; ``dead`` bool [B, n_q, H]: the rows the op defines
    as NaN under ``ggml-cpu`` (``op.judged_golden``; ggml's unfused path on rows with no live key), or
    None when it defines none."""
    model = np.asarray(t.model(a["q"], k, v, **kw), np.float64)
    case = dense_case(t, a["q"], k, v, kw)
    op = t.kernel_op
    golden = np.asarray(op.golden(case), np.float64)
    judged = np.asarray(op.judged_golden(case, t.declared_precision), np.float64)
    dead = np.isnan(judged).all(-1) & ~np.isnan(golden).any(-1)
    defines_nan = not np.array_equal(np.isnan(judged), np.isnan(golden))
    unit = acc_unit(op.kv_f16, np.asarray(v).dtype == np.float16)
    return model, golden, unit, (dead if defines_nan else None)


class _TargetRunner:
    """Golden + model (+ the target itself when it traces under jax.vmap) in one batched program per
    bucket; a target that does not trace (numpy code) is called once per case on the padded arrays, its
    verdicts streamed case by case. A ``ggml-cpu`` target (``Target.sharp``) is judged per case against
    its own emulation and its op's golden over its stored operands (:func:`fuzz.engine.judge`:
    jaxkv.verify's budget and sharp emulation check) instead of the f32 error bound; a target declaring
    another precision is judged case by case on the case's own call by its op's golden and model for
    that precision (:func:`declared_verdict`); a target whose cases name their own op (``Target.resolve``: the ggml menus) runs each on the target it names.
    One runner per :class:`Context` (``ctx.runner``)."""

    def __init__(self, target):
        self.t = target
        self.traceable = None
        self.full = Batched(self._make_full)

    def _make_full(self, key):
        has_sinks = key[2]

        def f(a):
            g = _ref(a, "f64")
            got = self.t.fn(a["q"], a["k"], a["v"], **_target_call_kw(a, has_sinks))
            b = Bd.bound(Bd.terms(a, g), Bd.GENERIC)
            return dict(target=Bd.bound_stats(jnp.asarray(got), g, b, a["valid"]))
        return f

    def stream(self, cases):
        """Yield (index, outcome) per case, as soon as each verdict is known."""
        if self.t.resolve is not None:  # cases naming their own op, formats and threads
            for i, c in enumerate(cases):
                t, view = self.t.for_case(c)
                yield i, self._ggml_cpu(t, view, t.case_arrays(c))
            return
        if self.t.declared_precision is not None and not self.t.sharp:  # op-generic: verify's judge
            own = self.t.case_arrays or C.attention_arrays  # the case's own (unpadded) call
            for i, c in enumerate(cases):
                yield i, self._declared(self.t, c, own(c))
            return
        groups = {}
        for i, c in enumerate(cases):
            groups.setdefault(_target_key(c), []).append(i)
        own = self.t.case_arrays  # a ggml target's own unpadded cases
        for key, idx in groups.items():
            args = [(own(cases[i]) if own else C.pad_attention(cases[i]),) for i in idx]
            if self.t.sharp:
                for i, (a,) in zip(idx, args):
                    yield i, self._ggml_cpu(self.t, cases[i], a)
                continue
            if self.traceable is None:
                try:
                    jax.eval_shape(jax.vmap(self._make_full(key)), *_stack1(args[0]))
                    self.traceable = True
                except Exception:
                    self.traceable = False
            if self.traceable:
                for i, r in zip(idx, self.full.run(key, args)):
                    yield i, _judge(r)
                continue
            refs = _REF.run(key, args)
            for i, (g, b), (a,) in zip(idx, refs, args):
                yield i, self._numpy(key, a, g, b)

    @staticmethod
    def _call(t, a, k, v, kw):
        try:
            return np.asarray(t(a["q"], k, v, **kw)), None
        except Exception as e:
            return None, _outcome(False, 1, f"target raised {type(e).__name__}: {str(e)[:200]}")

    def _numpy(self, key, a, g, b):
        got, bad = self._call(self.t, a, a["k"], a["v"], _target_call_kw(a, key[2]))
        if bad:
            return bad
        if got.shape != g.shape:
            return _outcome(False, 1, f"target output shape {list(got.shape)} != {list(g.shape)}")
        ok, m = Bd.verdict(_np_stats(got, g, b, a["valid"]))
        return _outcome(ok, 1, None if ok else f"target: {_fmt_metrics(m)}", target=m)

    @staticmethod
    def _ggml_cpu(t, c, a):
        try:
            r = check_sharp(t, c, a)
        except _TargetRaised as e:
            return e.outcome
        except _ShapeMismatch as e:
            return _outcome(False, 1, str(e))
        return _outcome(r.ok, 2, None if r.ok else f"target (ggml-cpu model): {r.why}",
                        target=dict(bitwise=r.bitwise, emu_units=r.emu_units, nmse=r.nmse,
                                    budget_nmse=r.budget_nmse, nmse_model=r.nmse_model))

    @staticmethod
    def _declared(t, c, a):
        kw = _target_call_kw(a, c["sinks"])
        got, bad = _TargetRunner._call(t, a, a["k"], a["v"], kw)
        if bad:
            return bad
        want = tuple(np.shape(a["q"])[:3]) + (np.shape(a["v"])[-1],)
        if got.shape != want:
            return _outcome(False, 1, f"target output shape {list(got.shape)} != {list(want)}")
        v = declared_verdict(t, a, got, kw, diagnose=False)
        e, b = v.errors, v.budget
        m = dict(status=v.status, nmse=e.nmse, max_abs=e.max_abs, nan_count=e.nan_count, budget_nmse=b.nmse,
                 budget_max_abs=b.max_abs, model=b.model, vacuous=v.status == "undecided")
        ok = v.status != "fail"
        return _outcome(ok, 1, None if ok else f"target ({v.precision} model of {t.kernel_op.name}): "
                        f"nmse {e.nmse:.3g} (budget {b.nmse:.3g}), max_abs {e.max_abs:.3g} (budget {b.max_abs:.3g}), "
                        f"NaN {e.nan_count}", target=m)


def declared_trace(t, a, out, kw=None) -> trace.Trace:
    """The in-memory :class:`jaxkv.trace.Trace` of a call of target ``t`` (the arrays ``a``: q
    [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv], mask [B|1, H|1, n_q, n_kv] or None, sinks
    [H] or None; ``kw``: the keywords the kernel was called with, default :func:`_target_call_kw`'s) and
    its output ``out`` [B, n_q, H, Dv]: its op (``t.op``, default flash_attn_ext), K/V as the target
    stores them (``t.prepare``), ``n_threads`` of the target, no file."""
    kw = _target_call_kw(a, a.get("sinks") is not None) if kw is None else kw
    op = t.kernel_op
    st = t.prepare(a["k"], a["v"]) if t.prepare is not None else dict(k=a["k"], v=a["v"])
    return trace.Trace(path=None, op=op.name, producer=f"fuzz --target {t.name}", scale=float(kw["scale"]),
                       max_bias=float(kw["max_bias"]), softcap=float(kw["softcap"]), n_threads=int(t.n_threads),
                       kv_order="cold,hot" if op.kv_regions else None, metadata={}, q=np.asarray(a["q"]),
                       out=np.asarray(out), mask=None if kw["mask"] is None else np.asarray(kw["mask"]),
                       sinks=None if kw["sinks"] is None else np.asarray(kw["sinks"]), **st)


def declared_verdict(t, a, out, kw=None, *, diagnose: bool = True, name: str = "fuzz case"):
    """The :class:`jaxkv.verify.Verdict` of a target declaring a precision that is not bit-faithful
    (``f32``, ``f16``, ``f64``: op-generic judging): :func:`jaxkv.verify.verify_trace` of
    :func:`declared_trace` under ``t.declared_precision``, i.e. the op's judged golden
    (``op.judged_golden``), its model for that precision (``op.model``) and the budget derived from
    them (``jaxkv.budget.derive_budget``) -- exactly what ``jaxkv verify --precision P`` gives the
    saved trace. No sharp check (that needs the bit-faithful ``ggml-cpu`` model: ``Target.model``)."""
    return verify.verify_trace(declared_trace(t, a, out, kw), t.declared_precision, name=name, diagnose=diagnose)


class _TargetRaised(Exception):
    def __init__(self, outcome):
        self.outcome = outcome


class _ShapeMismatch(Exception):
    pass


def sharp_case(t, c, a):
    """Run a ``ggml-cpu`` target ``t`` on the call ``a`` of case ``c`` (target vocabulary: sinks, B, n_q,
    Dv, k_fmt, v_fmt) -> (got, model, golden, unit, dead) over the case's real region: the kernel's
    output, its emulation's, its op's float64 golden (all [B, n_q, H, Dv] float64), the V accumulator's
    unit roundoff and the rows the op defines as NaN (or None): :func:`ggml_cpu_reference`."""
    k, v = target_operands(t, c, a)
    kw = _target_call_kw(a, c["sinks"])
    got, bad = _TargetRunner._call(t, a, k, v, kw)
    if bad:
        raise _TargetRaised(bad)
    model, g, unit, dead = ggml_cpu_reference(t, a, k, v, kw)
    if got.shape != g.shape:
        raise _ShapeMismatch(f"target output shape {list(got.shape)} != {list(g.shape)}")
    real = (slice(0, c["B"]), slice(0, c["n_q"]), slice(None), slice(0, c["Dv"]))
    return (np.asarray(got, np.float64)[real], model[real], g[real], unit,
            None if dead is None else dead[real[:3]])


def check_sharp(t, c, a):
    """:func:`fuzz.engine.judge` of :func:`sharp_case`: the :class:`fuzz.engine.Result` of one case."""
    got, model, g, unit, dead = sharp_case(t, c, a)
    return judge(got, model, g, unit, dead)


def _make_ref(key):
    def f(a):
        g = _ref(a, "f64")
        return g, Bd.bound(Bd.terms(a, g), Bd.GENERIC)
    return f


#: the golden and error bound of a padded target case (one program per bucket, any target)
_REF = Batched(_make_ref)


def _stack1(args):
    return tuple(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], a) for a in args)


def _np_stats(got, ref, b, valid):
    return np.asarray(jax.device_get(_np_stats_jit(got, ref, b, valid)))


_np_stats_jit = jax.jit(Bd.bound_stats)


def _runner(ctx) -> _TargetRunner:
    return ctx.runner("target", lambda: _TargetRunner(ctx.target))


def _target_stream(cases, ctx):
    return _runner(ctx).stream(cases)


def _target_eval(cases, ctx):
    out = [None] * len(cases)
    for i, o in _target_stream(cases, ctx):
        out[i] = o
    return out


#: the case vocabulary's optional operands -> what an op must take (a role or parameter) to be given them
OPTIONAL_OPERANDS = (("softcap", "softcap"), ("sinks", "sinks"), ("alibi", "max_bias"), ("mask", "mask"))


def not_taken(op) -> tuple:
    """The optional operands of the case vocabulary (:data:`OPTIONAL_OPERANDS`) that ``op`` (a
    :class:`jaxkv.ops.Op`, or None: every operand taken) does not take (``op.takes``)."""
    return () if op is None else tuple(x for x, what in OPTIONAL_OPERANDS if not op.takes(what))


def _target_strategy(ctx):
    """Attention cases for the --target kernel, without the operands it declares unsupported
    (``unsupported``: e.g. ggml-unfused's ('softcap', 'sinks')) or, when it declares none, those its op
    does not take (:func:`not_taken`; ``mask`` not taken: only unmasked cases)."""
    if ctx.target.case_strategy is not None:  # fuzz.ggml_targets: its own wide cases
        return ctx.target.case_strategy()
    no = set(ctx.target.unsupported or not_taken(ctx.target.op))
    kw = dict(masks=("none",)) if "mask" in no else {}
    return S.attention_case(softcap="softcap" not in no, sinks="sinks" not in no, alibi="alibi" not in no, **kw)


def _need_target(ctx):
    return None if ctx.target is not None else "needs --target MODULE:FUNCTION"


def _need_traces(ctx):
    return None if ctx.traces else "needs --traces DIR"


def _need(mod):
    def f(ctx):
        try:
            importlib.import_module(mod)
            return None
        except ImportError as e:
            return f"{mod} is not available ({e})"
    return f


def target_call(c, ctx) -> dict:
    """The call a case of the ``target`` property makes: the target's own (unpadded) case arrays when
    it has them, else the padded call; sinks None when the case draws none."""
    t, view = ctx.target.for_case(c)
    a = t.case_arrays(c) if t.case_arrays is not None else C.pad_attention(c)
    if not view["sinks"]:
        a = dict(a, sinks=None)
    return a


# ----------------------------------------------------------------------------------------------------
# the registry

_ALL_B = tuple(S.KV_BUCKETS)


def _gguf_implements(fmt, what: str) -> bool:
    """Whether the installed gguf package implements ``quants.<what>`` ('quantize' or 'dequantize')
    for format ``fmt`` (probed once on one zero block: gguf raises NotImplementedError otherwise)."""
    f = F.get_format(fmt)
    x = np.zeros((1, f.block_size), np.float32) if what == "quantize" else np.zeros((1, f.block_bytes), np.uint8)
    try:
        getattr(quants, what)(x, _gguf_type(fmt))
    except NotImplementedError:
        return False
    return True


#: the formats gguf dequantizes / quantizes (jaxkv.formats' order; with gguf 0.17: all but q8_1 / also
#: not iq4_nl)
GGUF_DEQUANTIZES = tuple(f for f in S.ALL_FORMATS if _gguf_implements(f, "dequantize"))
GGUF_QUANTIZES = tuple(f for f in S.ALL_FORMATS if _gguf_implements(f, "quantize"))

_register(Property(
    "dequantize", "jaxkv.formats.dequantize == gguf.quants.dequantize on random blocks (every format "
    "gguf implements; NaN == NaN)", _s(S.raw_blocks_case(formats=GGUF_DEQUANTIZES)),
    _dequant_eval, requires=("gguf",)))
_register(Property(
    "quantize", "jaxkv.formats.quantize == gguf.quants.quantize byte for byte (formats gguf quantizes)",
    _s(S.values_case(formats=GGUF_QUANTIZES)),
    _quant_eval, requires=("gguf",)))
_register(_attention_property(
    "split_k", "flash_decode (split-K, ragged chunks, f32) vs the f64 reference within the f32 error bound",
    ("flash_decode",), _s(S.attention_case()), kernel=_flash_kernel))
_register(_attention_property(
    "online", "online_attention (ggml's one-key-at-a-time softmax, f32) vs the f64 reference",
    ("online_attention",), _s(S.attention_case()), kernel=_online_kernel))
_register(_attention_property(
    "merge_laws", "merge: exact identity, exact commutativity, empty+empty, associativity (both "
    "bracketings) and finalize(merge of 3 partial states) vs the f64 reference",
    ("exact_identity", "exact_commutative", "exact_empty", "merged_left", "merged_right"),
    _s(S.merge_case())))
_register(_attention_property(
    "gqa", "GQA/MQA attention and flash_decode vs MHA over K/V repeated per query head",
    ("attention_gqa", "flash_decode_gqa"), _s(S.attention_case(heads=((4, 1), (6, 2)))),
    kernel=_flash_kernel))
_register(_attention_property(
    "masked_rows", "fully masked rows give exact zeros, NaN in keys masked everywhere never leaks "
    "(attention, flash_decode, online_attention)", ("attention", "flash_decode", "online_attention",
                                                    "exact_dead_rows_zero"),
    _s(S.attention_case(masks=("full_rows", "padded", "random", "causal"), nan_unused=True))))
_register(_attention_property(
    "large_logits", "huge logits (values ~1e4, outlier channels, scale up to 4): flash_decode and "
    "online_attention stay finite and within the f32 error bound", ("flash_decode", "online_attention"),
    _s(S.attention_case(dists=("big", "outlier"))), kernel=_flash_kernel))
_register(Property(
    "mixed_cache", "jaxkv.cache.attend over a mixed cache (cold formats K/V independent, hot F16 "
    "window) vs attention over the concatenation", _cache_strategy, _mixed_eval))
_register(Property(
    "cache_append", "cache.append bookkeeping: lengths, hot window = F16 of the last W tokens, cold "
    "rows = gguf quantize of the F16 tokens (bytes)", _cache_strategy, _append_eval, requires=("gguf",)))
_register(Property(
    "traces", "every trace in --traces DIR verified against the reference (jaxkv.verify)",
    None, _traces_eval, enabled=_need_traces, files=_trace_files, batch=1))
_register(Property(
    "target", "the --target kernel vs the f64 reference within the f32 error bound (a target declaring the "
    "ggml-cpu precision: vs its emulation with jaxkv.verify's ggml-cpu budget; another precision: its op's "
    "golden and model for it, jaxkv.verify's budget)",
    _target_strategy, _target_eval, call=target_call, enabled=_need_target, stream=_target_stream))


from fuzz import properties_io  # noqa: E402,F401  (layout and trace properties, registered after these)

for _name in ("traces", "target"):  # keep the input-driven properties last
    PROPERTIES[_name] = PROPERTIES.pop(_name)


def get(name: str) -> Property:
    if name not in PROPERTIES:
        raise ValueError(f"--properties: unknown property {name!r}; known: {', '.join(PROPERTIES)}")
    return PROPERTIES[name]


def available(p: Property, ctx: Context) -> str | None:
    """None when the property can run in this context, else the reason it cannot."""
    for mod in p.requires:
        r = _need(mod)(ctx)
        if r:
            return r
    return p.enabled(ctx)

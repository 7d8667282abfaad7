"""Diagnosis of a failed trace: which named bug explains the kernel's output, or where the error is.

Layout: got, golden, emu [B, n_q, H, Dv]; ``case`` a `jaxkv.verify.mutations.Case`.

A hypothesis (a `jaxkv.verify.mutations.Variant`) explains the output when the reference with that
one bug applied matches the kernel:

- gross failures (the kernel is outside the golden budget): the float64 reference with the bug,
  ``golden'``, is within the same budget of the kernel (NMSE and max-abs, no NaN);
- sharp failures (within the golden budget but off the ``ggml-cpu`` emulation): to first order a bug
  moves the emulation as it moves the golden, so the bug explains the discrepancy ``D = got - emu``
  when ``Δ = golden' - golden`` accounts for it: ``|D - Δ|`` within the emulation budget, or
  ``||D - Δ||^2 <= RESIDUAL * ||D||^2`` (it explains at least 75 % of the discrepancy's energy).

Every explaining variant is reported, best explanation first (``score``: the share of the error
energy it leaves unexplained); bugs with identical outcomes, e.g. "scale applied twice" and
"scale 1/Dk" when scale = 1/sqrt(Dk), are both reported. A bug whose output is within the budget of
the correct output of its reading is not reported (it cannot be told from no bug).

Readings: a mixed cache (``mixed_flash_attn``) is defined over the F16-rounded concatenation of its
regions, but a kernel may dequantize the cold region inside its loop without that rounding (the seed
system's own ``jaxkv.cache`` does). Every hypothesis is judged on both readings
(:func:`jaxkv.verify.mutations.readings`); otherwise the rounding difference, far above an f64 or f32 budget,
hides every bug but "cold region ignored" (the only one that no longer reads the cold values).

Split-K: the chunk merged without rescaling is searched (:mod:`jaxkv.verify.chunk_search`: fixed chunk
sizes 16..1024 with a ragged last chunk, per region too, ggml's thread split for 2..16 threads, the
cold/hot boundary), the best-fitting key ranges judged like any variant.

When none explains, :func:`localize` says where the error concentrates: per head, per query, and per
KV chunk (the share of the error aligned with each chunk's contribution to the output), and the
best-fitting unrescaled chunk.
"""

from __future__ import annotations

import math

import numpy as np

from jaxkv.budget import EMU_UNITS, derive_budget, errors
from jaxkv.verify import chunk_search, mutations

__all__ = ["RESIDUAL", "RECHECK", "diagnose", "localize"]

#: sharp level: the residual after removing the bug's first-order effect may keep at most this
#: fraction of the discrepancy's energy (the bug explains >= 75 % of it)
RESIDUAL = 0.25
#: gross level: input bugs whose max-abs distance is within this many budgets get their own budget
RECHECK = 10.0
#: split-K search: how many best-fitting key ranges per reading are judged against the budget
TOP_CHUNKS = 3


def _finding(label_of, e, level: str, score: float, reading: str = "", **extra) -> dict:
    hyp, label = label_of
    score = float(score) if score == score and score < 1e300 else 1e300  # finite for JSON
    d = dict(hypothesis=hyp, label=f"{label}; {reading}" if reading else label, nmse=e.nmse,
             max_abs=e.max_abs, level=level, score=score, _bug=label)
    if reading:
        d["reading"] = reading
    d.update(extra)
    return d


def _rank(found: list[dict]) -> list[dict]:
    """One finding per bug (on the declared reading when that explains it, else on the best other
    reading), best explanation first (``score`` ascending; ties keep the report order of
    :data:`jaxkv.verify.mutations.HYPOTHESES`)."""
    best: dict[str, dict] = {}
    for f in found:
        b = best.get(f["_bug"])
        if b is None or ("reading" in b and ("reading" not in f or f["score"] < b["score"])):
            best[f["_bug"]] = f
    order = {id(f): i for i, f in enumerate(found)}
    out = sorted(best.values(), key=lambda f: (f["score"], order[id(f)]))
    return [{k: v for k, v in f.items() if k != "_bug"} for f in out]


def _searched(case, names) -> bool:
    return names is None or "chunk_unrescaled" in names


def diagnose(case: mutations.Case, got, budget, *, golden, emu=None, emu_check=None,
             names=None, outputs=None, model_fn=None) -> list[dict]:
    """Findings (dicts: hypothesis, label, nmse, max_abs, level, score[, reading, chunkings]) of the
    hypotheses that explain ``got``, best explanation first (``score``: the share of the error the
    finding leaves unexplained, lower is better). ``budget`` is the trace's
    :class:`jaxkv.budget.Budget`; ``emu``/``emu_check`` the emulation output and check under ggml-cpu
    (None otherwise); ``names`` restricts the hypotheses; ``outputs`` (dict, optional) caches the buggy
    outputs by variant label across calls on one case; ``model_fn(case) -> out`` (optional) is the
    honest model of the declared precision on dense inputs: an input bug close to the budget (within
    ``RECHECK`` times) is re-judged with the budget derived on its own inputs (a bug such as
    ``scale 1`` sharpens the softmax and so the honest error).

    Each hypothesis is judged on every reading of the case (:func:`jaxkv.verify.mutations.readings`: a mixed
    cache also at its dequantized values, not rounded to F16); a finding on such a reading carries it
    as ``reading``. "A split-K chunk merged without rescaling" is searched over candidate chunkings
    (:mod:`jaxkv.verify.chunk_search`), not taken from ggml's thread split: its findings name the key range
    and the chunkings that contain it."""
    got = np.asarray(got, np.float64)
    golden = np.asarray(golden, np.float64)
    variants = [v for v in mutations.hypotheses(case, names) if v.hypothesis != "chunk_unrescaled"]
    cache = {} if outputs is None else outputs
    reads = mutations.readings(case)
    goldens = {"": golden}

    def golden_of(note, c):
        if note not in goldens:
            goldens[note] = mutations.golden(c)
        return goldens[note]

    def out_of(v, note, c):
        key = v.label if not note else (v.label, note)
        if key not in cache:
            cache[key] = v.output(c, golden_of(note, c))
        return cache[key]


    gross = not budget.allows(errors(got, golden))
    if gross or emu is None:
        return _rank(_gross(case, got, budget, golden, variants, reads, out_of, golden_of, names,
                            model_fn))
    return _rank(_sharp(case, got, golden, np.asarray(emu, np.float64), emu_check, variants, reads,
                        out_of, golden_of, names))


def _gross(case, got, budget, golden, variants, reads, out_of, golden_of, names, model_fn):
    """Golden level: the buggy float64 reference is within the budget of the kernel."""

    found = []
    with np.errstate(all="ignore"):
        d2 = float(np.sum((got - golden) ** 2))

    def score(gv):
        with np.errstate(all="ignore"):
            r = float(np.sum((got - gv) ** 2))
        return r / d2 if d2 > 0 and np.isfinite(d2) else (0.0 if r == 0 else math.inf)

    def invisible(gv, note, c):
        # a bug whose output is within the budget of its reading's correct output cannot be told
        # from that reading alone (e.g. a chunk whose maximum is the row maximum up to rounding)
        return budget.for_reference(gv).allows(errors(golden_of(note, c), gv))

    for note, c in reads:
        for v in variants:
            if note and v.hypothesis == "cold_unrounded":
                continue  # that reading is this hypothesis
            gv = out_of(v, note, c)
            e = errors(got, gv)
            if invisible(gv, note, c):
                continue
            if budget.for_reference(gv).allows(e):
                found.append(_finding((v.hypothesis, v.label), e, "golden", score(gv), note))
            elif (model_fn is not None and v.transform is not None and e.nan_count == 0
                  and e.max_abs <= RECHECK * budget.max_abs):
                b2 = derive_budget(gv, model_fn(v.transform(c)), budget.model, budget.factor)
                if b2.allows(e):
                    found.append(_finding((v.hypothesis, v.label), e,
                                          "golden (budget of the buggy inputs)", score(gv), note))
        if _searched(case, names):
            g = golden_of(note, c)
            for r, gv, _ in chunk_search.best_ranges(c, got - g, g, top=TOP_CHUNKS):
                e = errors(got, gv)
                if not invisible(gv, note, c) and budget.for_reference(gv).allows(e):
                    found.append(_finding(("chunk_unrescaled", chunk_search.range_label(r.start, r.stop)),
                                          e, "golden", score(gv), note, chunkings=list(r.chunkings)))
    return found


def _sharp(case, got, golden, emu, emu_check, variants, reads, out_of, golden_of, names):
    """Emulation level, first order: the bug's effect on the golden accounts for ``got - emu``."""

    found = []
    with np.errstate(all="ignore"):
        D = got - emu
    if not np.all(np.isfinite(D)):
        return found
    d2 = float(np.sum(D ** 2))
    unit = emu_check.unit if emu_check is not None else 2.0 ** -24
    row = unit * np.maximum(np.max(np.abs(emu), axis=-1), 2.0 ** -126)

    def units_of(x):
        return float(np.max(np.abs(x).max(axis=-1) / row, initial=0.0))

    def judge(label_of, delta, note, c, **extra):
        with np.errstate(all="ignore"):
            r = D - delta
        if not np.all(np.isfinite(r)):
            return
        if units_of(golden_of(note, c) - golden - delta) <= EMU_UNITS:
            return  # the bug moves this reading's output by less than the emulation budget
        units = units_of(r)
        r2 = float(np.sum(r ** 2))
        if units <= EMU_UNITS or r2 <= RESIDUAL * d2:
            e = errors(got, emu + delta)
            found.append(_finding(label_of, e, "emulation (first order)",
                                  r2 / d2 if d2 > 0 else 0.0, note, **extra))

    for note, c in reads:
        for v in variants:
            if note and v.hypothesis == "cold_unrounded":
                continue
            judge((v.hypothesis, v.label), out_of(v, note, c) - golden, note, c)
        if _searched(case, names):
            # the reading's own effect (golden_of(note) - golden) is part of every candidate's delta
            for r, gv, _ in chunk_search.best_ranges(c, D + golden - golden_of(note, c),
                                                     golden_of(note, c), top=TOP_CHUNKS):
                judge(("chunk_unrescaled", chunk_search.range_label(r.start, r.stop)), gv - golden,
                      note, c, chunkings=list(r.chunkings))
    return found


def _chunks(case: mutations.Case) -> list[tuple[int, int]]:
    b = mutations.kv_chunks(case)
    if b:
        return b
    n = case.k.shape[1]
    c = max(1, -(-n // 8))
    return [(a, min(a + c, n)) for a in range(0, n, c)]


def localize(case: mutations.Case, got, golden) -> dict:
    """Where |got - golden| concentrates: ``per_head_max_abs`` [H], ``per_query_max_abs`` [n_q],
    ``per_batch_max_abs`` [B]; ``per_chunk``: for each KV chunk (ggml's split chunks or regions, else
    eighths of the KV axis), ``share`` = cos^2 between the error and the chunk's contribution
    ``sum_{j in chunk} p_j (v_j - out)`` (1: the error is that chunk's weight being off); and
    ``unrescaled_chunk``: the searched split-K chunk (:mod:`jaxkv.verify.chunk_search`) whose missing rescale
    best fits the error, ``keys`` [start, stop), ``explained`` (share of the error energy it accounts
    for, 1 - residual) and the candidate ``chunkings`` holding it (None when no candidate fits)."""
    got = np.asarray(got, np.float64)
    golden = np.asarray(golden, np.float64)
    with np.errstate(all="ignore"):
        d = np.abs(got - golden)
    d = np.where(np.isnan(d), np.inf, d)
    out = dict(per_head_max_abs=[float(x) for x in d.max(axis=(0, 1, 3))],
               per_query_max_abs=[float(x) for x in d.max(axis=(0, 2, 3))],
               per_batch_max_abs=[float(x) for x in d.max(axis=(1, 2, 3))])
    err = np.transpose(np.nan_to_num(got - golden, posinf=0.0, neginf=0.0), (0, 2, 1, 3))
    s = mutations.logits(case)
    m = s.max(axis=-1)
    if case.sinks is not None:
        m = np.maximum(m, np.asarray(case.sinks, np.float64)[None, :, None])
    ms = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(all="ignore"):
        p = np.where(s == -np.inf, 0.0, np.exp(s - ms[..., None]))
    den = p.sum(-1)
    if case.sinks is not None:
        den = den + np.exp(np.asarray(case.sinks, np.float64)[None, :, None] - ms)
    p = p / np.where(den > 0, den, 1.0)[..., None]
    o = np.transpose(golden, (0, 2, 1, 3))  # [B, H, n_q, Dv]
    e2 = float(np.sum(err ** 2))
    chunks = []
    for a, b in _chunks(case):
        pc = np.zeros_like(p)
        pc[..., a:b] = p[..., a:b]
        contrib = mutations.weighted_values(case, pc) - pc.sum(-1)[..., None] * o
        c2 = float(np.sum(contrib ** 2))
        share = float(np.sum(err * contrib) ** 2 / (e2 * c2)) if e2 > 0 and c2 > 0 else 0.0
        chunks.append(dict(keys=[a, b], share=share))
    out["per_chunk"] = chunks
    best = chunk_search.best_ranges(case, np.nan_to_num(got - golden, posinf=0.0, neginf=0.0), golden,
                                    top=1)
    out["unrescaled_chunk"] = None
    if best and best[0][2] < 1.0:
        r, _, res = best[0]
        out["unrescaled_chunk"] = dict(keys=[r.start, r.stop], explained=1.0 - res,
                                       chunkings=list(r.chunkings))
    return out

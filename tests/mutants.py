"""Mutants for the diagnosis suite (tests/test_mutants.py): a float64 split-K attention kernel written
here, independently of jaxkv.verify.mutations, with one injectable bug, over bases from the shared ggml traces
and synthetic cases of all three ops.

Layout (canonical): q [B, n_q, H, Dk], k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv],
mask [1, H|1, n_q, n_kv] (additive, -inf masks), sinks [H], out [B, n_q, H, Dv].

The kernel splits the KV axis into ``chunks`` (any list of (start, stop) covering it), computes each
chunk's partial state (max ``m``, sum ``l``, accumulator ``a``) and merges them with the factors
``exp(m - M)``; with the bug ``chunk_unrescaled`` one chunk is merged without its factor. A mixed base
is read either at its F16-rounded values (ggml's op) or at its dequantized cold values (the seed
system's cache), drawn per mutant: the reading is not the bug, the diagnosis must see through it.

Bug classes are the names of ``jaxkv.verify.mutations.HYPOTHESES``; :func:`applicable` says which apply to a
base, :func:`inject` draws one concrete bug of a class (its details drawn with ``rng``) and returns
(description, output).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from jaxkv.verify import mutations as mu

CLASSES = ("out_permuted", "gqa_modulo", "kv_swapped", "scale_wrong", "softcap_wrong", "mask_wrong",
           "alibi_missing", "sinks_missing", "kv_token_dropped", "regions_wrong", "chunk_unrescaled",
           "kv_token_head_swapped", "mask_f16_as_f32", "padding_unmasked", "cold_unrounded")
CHUNK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
#: a drawn bug is observable when it moves the output by more than this fraction of max|out|: twice
#: the f64 claim's max-abs floor (4 float32 unit roundoffs of max|golden|, docs/tolerance.md). Below
#: it no verdict of the f64 claim can see the bug (e.g. one dropped key of weight 1e-8); such draws
#: are not mutants of this case (run_suite counts them).
OBSERVABLE = 8 * 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the kernel reads (a bug changes these), float64; ``kv_head[h]``: the KV head of query head
    ``h``; ``slopes`` [H] ALiBi slopes (ones without ALiBi)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None
    sinks: np.ndarray | None
    scale: float
    softcap: float
    slopes: np.ndarray
    kv_head: np.ndarray
    softcap_twice: bool = False


def slopes_f32(n_head: int, max_bias: float) -> np.ndarray:
    """ALiBi slopes as ggml defines them (float32 arithmetic): heads below the largest power of two
    ``n`` <= H get ``m0^(h+1)``, ``m0 = 2^(-max_bias/n)``; the rest ``m1^(2(h-n)+1)``,
    ``m1 = 2^(-max_bias/(2n))``."""
    if not max_bias > 0:
        return np.ones(n_head)
    f = np.float32
    n = 2 ** int(math.floor(math.log2(n_head)))
    m0 = np.power(f(2), -f(max_bias) / f(n), dtype=f)
    m1 = np.power(f(2), -(f(max_bias) / f(2)) / f(n), dtype=f)
    out = []
    for h in range(n_head):
        out.append(np.power(m0, f(h + 1), dtype=f) if h < n else np.power(m1, f(2 * (h - n) + 1), dtype=f))
    return np.array(out, np.float64)


def inputs_of(case: mu.Case, exact: bool) -> Inputs:
    """The kernel's view of a base case (``exact``: a mixed cache at its dequantized values)."""
    k, v = case.kv_exact if exact and case.kv_exact is not None else (case.k, case.v)
    H, Hkv = case.q.shape[2], case.k.shape[2]
    return Inputs(case.q, np.asarray(k, np.float64), np.asarray(v, np.float64), case.mask, case.sinks,
                  case.scale, case.softcap, slopes_f32(H, case.max_bias),
                  np.arange(H) // (H // Hkv))


def kernel(x: Inputs, chunks, unrescaled: int | None = None) -> np.ndarray:
    """Split-K attention of ``x`` over ``chunks`` -> out [B, n_q, H, Dv] float64; ``unrescaled``: the
    index of the chunk merged without its factor."""
    kh = np.transpose(x.k[:, :, x.kv_head], (0, 2, 3, 1))  # [B, H, Dk, n_kv]
    vh = np.transpose(x.v[:, :, x.kv_head], (0, 2, 1, 3))  # [B, H, n_kv, Dv]
    with np.errstate(all="ignore"):
        s = np.matmul(np.transpose(x.q, (0, 2, 1, 3)), kh) * x.scale  # [B, H, n_q, n_kv]
        if x.softcap:
            s = x.softcap * np.tanh(s / x.softcap)
            if x.softcap_twice:
                s = x.softcap * np.tanh(s / x.softcap)
        if x.mask is not None:
            b = x.mask * x.slopes[None, :, None, None]
            s = np.where(b == -np.inf, -np.inf, s + b)
    B, H, n_q, _ = s.shape
    Dv = x.v.shape[3]
    parts = []
    for a, b in chunks:
        sc = s[..., a:b]
        m = sc.max(-1) if b > a else np.full((B, H, n_q), -np.inf)
        ms = np.where(m == -np.inf, 0.0, m)
        with np.errstate(all="ignore"):
            p = np.where(sc == -np.inf, 0.0, np.exp(sc - ms[..., None]))
        parts.append((m, p.sum(-1), np.matmul(p, vh[:, :, a:b])))
    M = np.max(np.stack([m for m, _, _ in parts]), axis=0)
    if x.sinks is not None:
        M = np.maximum(M, x.sinks[None, :, None])
    Ms = np.where(M == -np.inf, 0.0, M)
    L = np.zeros((B, H, n_q))
    A = np.zeros((B, H, n_q, Dv))
    for i, (m, l, a) in enumerate(parts):
        f = np.where(m == -np.inf, 0.0, np.exp(np.where(m == -np.inf, 0.0, m) - Ms))
        if i == unrescaled:
            f = np.where(m == -np.inf, 0.0, 1.0)
        L = L + f * l
        A = A + f[..., None] * a
    if x.sinks is not None:
        L = L + np.exp(x.sinks[None, :, None] - Ms)
    with np.errstate(all="ignore"):
        out = np.where(L[..., None] > 0, A / np.where(L > 0, L, 1.0)[..., None], 0.0)
    return np.transpose(out, (0, 2, 1, 3))


# ----------------------------------------------------------------------------------------------------
# bugs


def _whole(n):
    return [(0, n)]


def _dead_keys(case):
    if case.mask is None:
        return np.zeros(case.k.shape[1], bool)
    return np.all(case.mask == -np.inf, axis=(0, 1, 2))


def applicable(case: mu.Case) -> list[str]:
    """The bug classes that can show on ``case`` (and that its op has)."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    mixed = len(case.regions) == 2
    fused = case.op != "soft_max_attn"
    out = ["out_permuted", "scale_wrong", "kv_token_dropped", "padding_unmasked"]
    if 1 < Hkv < H:
        out.append("gqa_modulo")
    if Dk == Dv:
        out.append("kv_swapped")
    if fused and case.softcap:
        out.append("softcap_wrong")
    if case.mask is not None:
        out += ["mask_wrong", "mask_f16_as_f32"]
        if case.max_bias > 0:
            out.append("alibi_missing")
    if fused and case.sinks is not None:
        out.append("sinks_missing")
    if mixed:
        out += ["regions_wrong", "cold_unrounded"]
    if fused and n_kv >= 32:
        out.append("chunk_unrescaled")
    if Hkv >= 2:
        out.append("kv_token_head_swapped")
    return out


def _chunkings(case, rng):
    """Candidate chunkings a kernel may use: fixed sizes (16..1024, ragged last) from 0 or per region,
    ggml's thread split, the regions."""
    n = case.k.shape[1]
    regs = [(a, b) for _, a, b in case.regions if b > a]
    opts = []
    for size in CHUNK_SIZES:
        if size < n:
            opts.append([(a, min(a + size, n)) for a in range(0, n, size)])
            if len(regs) > 1:
                opts.append([(x, min(x + size, b)) for a, b in regs for x in range(a, b, size)])
    for nt in range(2, 9):
        c = -(-n // nt)
        opts.append([(a, min(a + c, n)) for a in range(0, n, c)])
    if len(regs) > 1:
        opts.append(regs)
    return opts


def _observable_chunk(x, chunks, rng, tries=4):
    """A chunk index whose missing rescale changes the output by more than 1e-4 of max|out| (drawn
    among ``tries`` random chunks), or None."""
    base = kernel(x, chunks)
    for i in rng.permutation(len(chunks))[:tries]:
        out = kernel(x, chunks, unrescaled=int(i))
        if np.max(np.abs(out - base), initial=0.0) > 1e-4 * max(np.max(np.abs(base), initial=0.0), 1e-30):
            return int(i), out
    return None


def _drop(x: Inputs, keep):
    return dataclasses.replace(x, k=x.k[:, keep], v=x.v[:, keep],
                               mask=None if x.mask is None else x.mask[..., keep])


def _f16_as_f32(mask):
    """A [1, Hm, n_q, n_kv] F16 mask buffer read as F32 words (rows start at their F16 offsets, the
    last rows run into -inf F16 padding)."""
    _, Hm, n_q, n = mask.shape
    raw = mask.astype(np.float16).tobytes() + np.full(2 * n, -np.inf, np.float16).tobytes()
    rows = [np.frombuffer(raw, np.float32, count=n, offset=2 * n * r) for r in range(Hm * n_q)]
    return np.array(rows, np.float64).reshape(1, Hm, n_q, n)


def inject(case: mu.Case, cls: str, rng) -> tuple[str, np.ndarray, bool] | None:
    """One bug of class ``cls`` on ``case`` -> (description, out [B, n_q, H, Dv] float64, exact
    reading used), or None when the drawn bug cannot show on this case."""
    B, n_q, H, Hkv, n_kv, Dk, Dv = case.dims
    exact = case.kv_exact is not None and bool(rng.integers(2))
    if cls == "cold_unrounded":
        exact = True
    x = inputs_of(case, exact)
    chunks = _whole(n_kv)
    opts = _chunkings(case, rng)
    if opts:
        chunks = opts[rng.integers(len(opts))]  # the kernel's own chunking (invisible without the bug)
    desc = cls
    dead = _dead_keys(case)
    if cls == "out_permuted":
        perms = [p for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)]
        base = kernel(x, chunks)
        for _ in range(24):
            p = perms[rng.integers(len(perms))]
            out = np.transpose(base, p).reshape(base.shape)
            if not np.array_equal(out, base):
                return f"out written in axis order {p}", out, exact
        return None
    if cls == "gqa_modulo":
        x = dataclasses.replace(x, kv_head=np.arange(H) % Hkv)
    elif cls == "kv_swapped":
        x = dataclasses.replace(x, k=x.v, v=x.k)
    elif cls == "scale_wrong":
        s = [1.0, 1.0 / Dk, case.scale ** 2][rng.integers(3)]
        desc = f"scale {s:g}"
        x = dataclasses.replace(x, scale=s)
    elif cls == "softcap_wrong":
        if rng.integers(2):
            desc, x = "softcap missing", dataclasses.replace(x, softcap=0.0)
        else:
            desc, x = "softcap twice", dataclasses.replace(x, softcap_twice=True)
    elif cls == "mask_wrong":
        Hm = x.mask.shape[1]
        kinds = ["ignored", "transposed"] + (["head0", "h//g", "h%Hkv"] if Hm > 1 else [])
        kind = kinds[rng.integers(len(kinds))]
        desc = f"mask {kind}"
        m = x.mask
        if kind == "ignored":
            m = None
        elif kind == "transposed":
            m = np.swapaxes(m.reshape(1, Hm, n_kv, n_q), -1, -2)
        else:
            idx = {"head0": np.zeros(H, int), "h//g": np.arange(H) // (H // Hkv),
                   "h%Hkv": np.arange(H) % Hkv}[kind]
            m = m[:, idx]
        x = dataclasses.replace(x, mask=m)
    elif cls == "alibi_missing":
        x = dataclasses.replace(x, slopes=np.ones(H))
    elif cls == "sinks_missing":
        x = dataclasses.replace(x, sinks=None)
    elif cls == "kv_token_dropped":
        pts = [0, n_kv - 1] + [j for _, a, b in case.regions if b > a for j in (a, b - 1)]
        pts = [j for j in pts if not dead[j]]
        if not pts:
            return None
        j = pts[rng.integers(len(pts))]
        desc = f"key {j} dropped"
        keep = np.ones(n_kv, bool)
        keep[j] = False
        x = _drop(x, keep)
        chunks = _whole(n_kv - 1)
    elif cls == "regions_wrong":
        (n0, a0, b0), (n1, a1, b1) = case.regions
        swap_ok = x.mask is not None and not np.array_equal(x.mask[..., np.r_[a1:b1, a0:b0]], x.mask)
        if swap_ok and rng.integers(2):
            order = np.r_[a1:b1, a0:b0]
            desc = "regions swapped"
            x = dataclasses.replace(x, k=x.k[:, order], v=x.v[:, order])
        else:
            cold = [(a, b) for name, a, b in case.regions if name == "cold"][0]
            keep = np.ones(n_kv, bool)
            keep[cold[0]:cold[1]] = False
            desc = "cold ignored"
            x = _drop(x, keep)
            chunks = _whole(int(keep.sum()))
    elif cls == "chunk_unrescaled":
        for _ in range(4):
            chunks = opts[rng.integers(len(opts))]
            obs = _observable_chunk(x, chunks, rng)
            if obs is not None:
                a, b = chunks[obs[0]]
                return f"chunk {a}..{b - 1} unrescaled", obs[1], exact
        return None
    elif cls == "kv_token_head_swapped":
        which = "kv"[rng.integers(2)]
        d = int(rng.integers(2))
        desc = f"{which.upper()} token/head swapped ({d})"
        arr = getattr(x, which)

        def swap(r):
            b_, n_, h_, e_ = r.shape
            if d == 0:
                return np.transpose(r, (0, 2, 1, 3)).reshape(b_, n_, h_, e_)
            return np.transpose(r.reshape(b_, h_, n_, e_), (0, 2, 1, 3))
        regs = [(a, b) for _, a, b in case.regions] or [(0, n_kv)]
        x = dataclasses.replace(x, **{which: np.concatenate([swap(arr[:, a:b]) for a, b in regs], 1)})
    elif cls == "mask_f16_as_f32":
        x = dataclasses.replace(x, mask=_f16_as_f32(x.mask))
    elif cls == "padding_unmasked":
        p = [16, 32, 64, 128, 256][rng.integers(5)]
        n_pad = -(-n_kv // p) * p - n_kv
        if n_pad == 0:
            return None
        desc = f"{n_pad} padding keys unmasked"
        zk = np.zeros((B, n_pad, Hkv, Dk))
        zv = np.zeros((B, n_pad, Hkv, Dv))
        m = x.mask
        if m is not None:
            m = np.concatenate([m, np.zeros(m.shape[:3] + (n_pad,))], -1)
        x = dataclasses.replace(x, k=np.concatenate([x.k, zk], 1), v=np.concatenate([x.v, zv], 1), mask=m)
        chunks = _whole(n_kv + n_pad)
    elif cls == "cold_unrounded":
        desc = "cold region not rounded to F16"
    else:
        raise ValueError(cls)
    out = kernel(x, chunks)
    honest = kernel(inputs_of(case, exact), _whole(n_kv))
    if cls != "cold_unrounded" and np.max(np.abs(out - honest)) <= OBSERVABLE * np.max(np.abs(honest)):
        return None  # this draw cannot show on this case (e.g. a causal mask with one query)
    return desc, out, exact


# ----------------------------------------------------------------------------------------------------
# bases


def _f16(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def synthetic(rng, op: str, large: bool = True, full: bool = False) -> mu.Case:
    """A random base of ``op``: GQA 1..8 groups, n_kv up to 2048, Dk 32..256 (``large=False``: n_kv
    <= 700, Dk <= 128, at most 8 KV heads of queries per batch row), masks (none, causal, per head
    with -inf holes), ALiBi, sinks, softcap (fused ops); a mixed cache has a cold region of
    block-quantized values (F16 scale x small integers, not F16-exact) and an F16 hot window.
    ``full``: every feature the op has (GQA, a per-head mask with ALiBi, sinks and softcap)."""
    Hkv = int(rng.choice([2, 4] if full else [1, 2, 4]))
    g = int(rng.choice([1, 2, 3, 4, 8] if large else [1, 2, 3, 4]) if not full else rng.choice([2, 4]))
    H = Hkv * g
    Dk = int(rng.choice([32, 64, 80, 128, 256] if large else [32, 64, 80, 128]))
    Dv = Dk if rng.random() < 0.7 else int(rng.choice([32, 64, 128]))
    n_kv = int(rng.choice([40, 100, 300, 700, 1500, 2048] if large else [40, 100, 300, 700]))
    n_q = int(rng.choice([1, 1, 2, 4]))
    B = int(rng.choice([1, 1, 2] if large else [1]))
    q = rng.standard_normal((B, n_q, H, Dk)).astype(np.float32).astype(np.float64) * 1.5
    k = _f16(rng.standard_normal((B, n_kv, Hkv, Dk)))
    v = _f16(rng.standard_normal((B, n_kv, Hkv, Dv)))
    regions, exact = (), None
    if op == "mixed_flash_attn":
        n_cold = int(rng.integers(n_kv // 4, n_kv - 8))
        regions = (("cold", 0, n_cold), ("hot", n_cold, n_kv))

        def quant(shape):
            d = _f16(rng.uniform(0.01, 0.03, shape[:-1] + (1,)))
            return d * rng.integers(-127, 128, shape)
        ke, ve = k.copy(), v.copy()
        ke[:, :n_cold] = quant((B, n_cold, Hkv, Dk))
        ve[:, :n_cold] = quant((B, n_cold, Hkv, Dv))
        exact = (ke, ve)
        k, v = _f16(ke), _f16(ve)
    kind = "perhead" if full else rng.choice(["none", "causal", "perhead"])
    mask = None
    if kind == "causal":
        j = np.arange(n_kv)[None, :]
        i = np.arange(n_q)[:, None]
        mask = np.where(j <= n_kv - n_q + i, 0.0, -np.inf)[None, None]
    elif kind == "perhead":
        mask = np.where(rng.random((1, H, n_q, n_kv)) < 0.2, -np.inf,
                        rng.uniform(-1, 1, (1, H, n_q, n_kv)))
        mask[..., -1] = 0.0
        mask = _f16(mask)
    fused = op != "soft_max_attn"
    max_bias = float(rng.choice([0.0, 8.0])) if mask is not None else 0.0
    sinks = _f16(rng.standard_normal(H)) if fused and (full or rng.random() < 0.4) else None
    softcap = float(rng.choice([0.0, 0.0, 20.0])) if fused else 0.0
    if full:
        max_bias, softcap = 8.0, (20.0 if fused else 0.0)
    return mu.Case(op=op, q=q, k=k, v=v, mask=mask, sinks=sinks, scale=Dk ** -0.5, softcap=softcap,
                   max_bias=max_bias, n_threads=1, regions=regions, kv_exact=exact)


def chunk_output(case: mu.Case, exact: bool, a: int, b: int) -> np.ndarray:
    """The kernel's output on ``case`` with the chunk of keys ``[a, b)`` merged without rescaling."""
    n = case.k.shape[1]
    chunks = [c for c in ((0, a), (a, b), (b, n)) if c[1] > c[0]]
    return kernel(inputs_of(case, exact), chunks, unrescaled=chunks.index((a, b)))


def is_correct(case: mu.Case, cls: str, desc: str, exact: bool, diagnosis, want) -> bool:
    """The top finding names the injected class; for a split-K chunk also its key range, or a range
    whose buggy output equals the injected ``want`` (float64) to 1e-9 of max|want| (the two bugs
    are indistinguishable on this case)."""
    if not diagnosis:
        return False
    top = diagnosis[0]
    if top["hypothesis"] != cls:
        return False
    if cls != "chunk_unrescaled":
        return True
    a, b = (int(t) for t in desc.split()[1].split(".."))
    if f"keys {a}..{b} " in top["label"]:
        return True
    a2, b2 = (int(t) for t in top["label"].split("keys ")[1].split()[0].split(".."))
    alt = chunk_output(case, exact, a2, b2 + 1)
    return float(np.max(np.abs(alt - want))) <= 1e-9 * float(np.max(np.abs(want)))

"""The ``ggml-cpu`` precision model: a bit-faithful emulation of ggml 0.21's CPU attention on x86.

Layout (every public function)::

    q     [B, n_q, H, Dk]        float32
    k     [B, n_kv, Hkv, Dk]     float32 array (F32 type), float16 array (F16) or formats.QuantArray
    v     [B, n_kv, Hkv, Dv]     as k
    mask  [B|1, H|1, n_q, n_kv]  additive, F16-representable values (ggml reads an F16 mask); -inf masks
    sinks [H]                    float32
    out   [B, n_q, H, Dv]        float32

Query head ``h`` uses KV head ``h // (H // Hkv)``. ``isa`` is the SIMD build of ggml-cpu being
modelled: ``"avx512"`` (the default: the shared traces come from an AVX-512 build), ``"avx512fp16"``
(AVX-512 with native FP16 arithmetic) or ``"avx2"``.

What is modelled (see ``shared/docs/ggml-cpu-rounding.md`` and the module docstrings of
:mod:`.fp`, :mod:`.dot`, :mod:`.kernels`): q converted to K's ``vec_dot_type`` (F16 rounding, x86
``quantize_row_q8_0/q8_1``); per-ISA SIMD lane order of every dot; the online softmax with glibc
``expf``; the F16 accumulator rounded after every scale and every add when V is F16 (F32 otherwise);
sinks; the ``1/S`` multiply; ALiBi slopes from the C library's ``powf`` (as ggml computes them);
float32 subnormal inputs and outputs kept (converted on the host: XLA on CPU flushes them; under an
outer ``jax.jit`` they flush); ggml's path selection: the split-KV path (``n_q == 1``, ``B == 1``, K and
V both F16 or both F32, ``n_kv >= 512``: ``n_threads`` chunks, partials merged in order) and the
the tiled path (F16/F32 K and V of one type, ``n_q >= 64``, and in ggml < 0.25.3 ``Dv`` a multiple of
the ISA's F32 lanes: :mod:`.tiled`; ``version`` names the ggml release, whose facts differ) and the
per-row loop otherwise; for the unfused op, the mul_mat paths of a build with llamafile
(``llamafile=True``: n_q >= 2 goes through llamafile's tinyBLAS, :mod:`.sgemm`; the libggml-python
0.20.2 wheel has no llamafile, llama-cpp-python's ggml 0.25.3 has it).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import alibi, formats
from jaxkv._checks import check_attention_shapes
from jaxkv.ggml_cpu import kernels as _k
from jaxkv.ggml_cpu import sgemm as _sgemm
from jaxkv.ggml_cpu import tiled as _tiled
from jaxkv.ggml_cpu.dot import ISA_TABLE, get_isa
from jaxkv.ggml_cpu.kernels import BUILD_CONTRACT, Contract
from jaxkv.ggml_cpu.fp import F64

__all__ = ["ISAS", "DEFAULT_ISA", "DEFAULT_VERSION", "Contract", "BUILD_CONTRACT", "SPLIT_KV_MIN", "TILE_Q",
           "flash_attn_ext", "soft_max_attn", "soft_max_attn_paths", "mixed_flash_attn", "kv_type", "split_chunks",
           "path"]

ISAS = tuple(ISA_TABLE)          # ("avx512", "avx512fp16", "avx2")
DEFAULT_ISA = "avx512"           # the shared traces' build (ggml-cpu-rounding.md)
SPLIT_KV_MIN = 512               # ggml_compute_forward_flash_attn_ext_f16: nek1 >= 512
TILE_Q = 64                      # GGML_FA_TILE_Q
DEFAULT_VERSION = _tiled.DEFAULT_VERSION  # the ggml release assumed when a caller does not name one
class Unmodelled(NotImplementedError): """A ggml path this model does not emulate (jaxkv.verify then judges under its fallback budget)."""  # noqa: E701,E302,E305


def kv_type(x, name: str) -> str:
    """ggml type name of a K/V operand: "f32" (float32 array), "f16" (float16 array) or the
    QuantArray's format."""
    if formats.is_quant(x):
        f = formats.get_format(x.fmt)
        if f.name not in formats.BLOCK_KV_TYPES:
            raise ValueError(f"{name}: unsupported block type {f.name!r}")
        return f.name
    dt = getattr(x, "dtype", None)
    if dt == jnp.float32:
        return "f32"
    if dt == jnp.float16:
        return "f16"
    raise ValueError(f"{name}: expected a float32 array (F32), float16 array (F16) or QuantArray, "
                     f"got dtype {dt}")


def split_chunks(n_q: int, B: int, k_type: str, v_type: str, n_kv: int, n_threads: int) -> int:
    """Number of KV chunks ggml's CPU flash_attn_ext uses: n_threads on the split-KV path, else 1."""
    if n_q == 1 and B == 1 and k_type == v_type and k_type in formats.FLOAT_KV_TYPES and n_kv >= SPLIT_KV_MIN:
        return int(n_threads)
    return 1


def path(n_q: int, B: int, k_type: str, v_type: str, n_kv: int, dv: int, isa=DEFAULT_ISA, version=None) -> str:
    """Which code path ggml's CPU flash_attn_ext (F32 q) takes: "split-kv", "tiled" or "per-row"."""
    if n_q == 1 and B == 1 and k_type == v_type and k_type in formats.FLOAT_KV_TYPES and n_kv >= SPLIT_KV_MIN:
        return "split-kv"
    if _tiled.takes_tiled(n_q, B, k_type, v_type, dv, isa, version):
        return "tiled"
    return "per-row"


def _concrete(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name}: must be a concrete number (a Python or numpy scalar), got {x!r}; "
                         "ggml's op parameters are constants of the graph") from None


def _slopes(n_head: int, max_bias: float) -> np.ndarray:
    """ggml's ALiBi slopes [H] as float64 holding float32 values, computed as ggml-cpu does with the C
    library's float ``powf``: ``m0 = powf(2, -max_bias/n_log2)``, ``m1 = powf(2, -(max_bias/2)/n_log2)``,
    slope ``powf(m0, h + 1)`` for ``h < n_log2`` else ``powf(m1, 2*(h - n_log2) + 1)``.

    ``max_bias`` must be concrete (it is a float32 op parameter of ggml's graph). numpy's float32
    ``power`` is *not* libm's powf (one ulp apart for some bases, docs/ggml-findings.md); it is used only
    where no C math library loads (then slopes may be an ulp off ggml's)."""
    return alibi.slopes(n_head, _concrete(max_bias, "max_bias"), "libm")


def _contract(isa, contract) -> Contract:
    if contract is None:
        return BUILD_CONTRACT[get_isa(isa).name]
    if not isinstance(contract, Contract):
        raise ValueError(f"contract: expected a ggml_cpu.Contract or None, got {contract!r}")
    return contract


def _carrier(x, dtype=np.float32):
    """x rounded to ``dtype`` as float64 f32 carriers, converted by numpy on the host: XLA on CPU flushes
    float32 subnormals to zero in float32 <-> float64 conversions (ggml keeps them). A traced x (the
    model called under an outer ``jax.jit``) is converted by XLA, and loses them."""
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x).astype(dtype).astype(F64)
    return jnp.asarray(np.asarray(x).astype(dtype).astype(np.float64))


def _out32(x, shape):
    """The cores' f32 carriers -> float32 [shape], converted on the host (subnormals kept, as ggml's)."""
    if isinstance(x, jax.core.Tracer):
        return x.astype(jnp.float32).reshape(shape)
    return jnp.asarray(np.asarray(x).astype(np.float32).reshape(shape))


def _kv_operand(x, t: str):
    """F32 K/V as f32 carriers converted on the host (:func:`_carrier`); F16 arrays and QuantArrays as
    given (their values are float32-normal, XLA converts them exactly)."""
    return _carrier(x) if t == "f32" else x


def _check(q, k, v, mask, sinks):
    check_attention_shapes(q, k, v, mask, sinks)
    if getattr(q, "dtype", None) != jnp.float32:
        raise ValueError(f"q: expected float32 (ggml's F32 q), got {getattr(q, 'dtype', None)}")


def _group(q, mask, sinks, slopes, hkv):
    """q [B, n_q, H, D] -> [B, n_q, Hkv, G, D] f64; mask [B|1, H|1, n_q, n_kv] -> [B|1, n_q, Hkv|1, G|1, n_kv]."""
    B, n_q, H, D = q.shape
    g = H // hkv
    qg = _carrier(q).reshape(B, n_q, hkv, g, D)
    mg = None
    if mask is not None:
        m = jnp.asarray(mask)
        if m.dtype != jnp.float16:
            m = m.astype(jnp.float32).astype(jnp.float16)  # ggml reads the mask as F16
        m = m.astype(F64)
        mb, mh = m.shape[:2]
        m = jnp.moveaxis(m, 2, 1)  # [B|1, n_q, H|1, n_kv]
        mg = m.reshape(mb, n_q, hkv, g, m.shape[-1]) if mh == H else m[:, :, :, None, :]
    sg = None if sinks is None else _carrier(sinks).reshape(hkv, g)
    return qg, mg, sg, jnp.asarray(slopes, F64).reshape(hkv, g)


def flash_attn_ext(q, k, v, *, scale, mask=None, softcap=0.0, max_bias=0.0, sinks=None, n_threads=1,
                   isa=DEFAULT_ISA, contract=None, version=None):
    """ggml's CPU ``ggml_flash_attn_ext`` (F32 q, default precision), emulated bit for bit.

    q [B, n_q, H, Dk] float32; k [B, n_kv, Hkv, Dk], v [B, n_kv, Hkv, Dv]: float32 / float16 arrays or
    formats.QuantArray; mask [B|1, H|1, n_q, n_kv] (rounded to F16 like ggml's mask tensor); sinks [H]
    -> float32 [B, n_q, H, Dv]. ``n_threads`` matters only on the split-KV path (ggml cuts the keys
    into that many chunks). ``scale``, ``softcap``, ``max_bias`` are float32 op parameters (concrete
    numbers: ggml's graph constants).
    ``contract``: which ``a*b + c`` the compiler fused (:class:`Contract`); None = the default of the
    build ``isa`` names (:data:`BUILD_CONTRACT`). ``version``: the ggml release modelled ("0.20.2";
    None = :data:`DEFAULT_VERSION`): it decides which calls take the tiled path and that path's
    details (:data:`jaxkv.ggml_cpu.tiled.TILED_BUILDS`); ``n_threads`` sets its query tiles."""
    ctr = _contract(isa, contract)
    k_type, v_type = kv_type(k, "k"), kv_type(v, "v")
    _check(q, k, v, mask, sinks)
    if int(n_threads) < 1:
        raise ValueError(f"n_threads: must be >= 1, got {n_threads}")
    B, n_q, H, _ = q.shape
    n_kv, hkv = k.shape[1], k.shape[2]
    if n_kv == 0:
        return jnp.zeros((B, n_q, H, v.shape[-1]), jnp.float32)
    if path(n_q, B, k_type, v_type, n_kv, v.shape[-1], isa, version) == "tiled":
        return _flash_tiled(q, k, v, scale, mask, softcap, max_bias, sinks, int(n_threads), isa, version)
    if k_type not in formats.FLOAT_KV_TYPES and q.shape[-1] % 32:
        raise ValueError(f"q: Dk={q.shape[-1]} must be a multiple of 32 for block-quantized K")
    nch = split_chunks(n_q, B, k_type, v_type, n_kv, n_threads)
    qg, mg, sg, slg = _group(q, mask, sinks, _slopes(H, max_bias), hkv)
    sc = float(np.float32(scale))
    cap = float(np.float32(softcap))
    out = _k.fa_core(qg, _kv_operand(k, k_type), _kv_operand(v, v_type), jnp.asarray(sc, F64),
                     jnp.asarray(cap if cap else 1.0, F64), slg, mg, sg, k_type=k_type, v_type=v_type,
                     isa=get_isa(isa).name, n_chunks=nch, softcap_on=cap != 0.0, contract=ctr)
    return _out32(out, (B, n_q, H, -1))


def soft_max_attn_paths(q_shape, k_type: str, v_type: str, n_kv: int, dv: int, *, isa=DEFAULT_ISA,
                        llamafile: bool = False, q_contiguous: bool = True) -> tuple[str, str]:
    """The paths of the two mul_mats of :func:`soft_max_attn` (:func:`.sgemm.mul_mat_path`): ("vec_dot" |
    "sgemm" | "sgemm_q0") for ``kq = mul_mat(k, q)`` and for ``kqv = mul_mat(v^T, kq)``. q_shape
    [B, n_q, H, Dk]; ``llamafile``: the build fact (trace metadata ``ggml.llamafile``); ``q_contiguous``:
    q's ggml tensor [Dk, n_q, H, B] is contiguous (llama.cpp's permuted q is not, for n_q, H > 1)."""
    n_q, dk = int(q_shape[1]), int(q_shape[3])
    kq = _sgemm.mul_mat_path(k_type, "f32", n_kv, n_q, dk, isa=isa, llamafile=llamafile,
                             src1_contiguous=q_contiguous)
    kqv = _sgemm.mul_mat_path(v_type, "f32", dv, n_q, n_kv, isa=isa, llamafile=llamafile)
    return kq, kqv


def _flash_tiled(q, k, v, scale, mask, softcap, max_bias, sinks, n_threads, isa, version):
    """flash_attn_ext on ggml's tiled path (:mod:`.tiled`), arguments checked by the caller. No
    ``Contract`` applies there: its only contractible step (sinks) is :data:`.tiled.SINKS_FUSED`."""
    B, n_q, H, _ = q.shape
    hkv = k.shape[2]
    build = _tiled.tiled_build(version)
    ids, _ = _tiled.query_tiles(B, H, n_q, n_threads, build.q_tile)
    qg, mg, sg, slg = _group(q, mask, sinks, _slopes(H, max_bias), hkv)
    cap = float(np.float32(softcap))
    out = _tiled.tiled_core(qg, _carrier(k), _carrier(v), jnp.asarray(float(np.float32(scale)), F64),
                            jnp.asarray(cap if cap else 1.0, F64), slg, mg, sg,
                            jnp.asarray(_tiled.regroup_tiles(ids, hkv)), isa=get_isa(isa).name,
                            kv_tile=build.kv_tile, softcap_on=cap != 0.0,
                            softcap_after_pad=build.softcap_after_pad,
                            sinks_fused=_tiled.SINKS_FUSED[get_isa(isa).name])
    return _out32(out, (B, n_q, H, -1))


def soft_max_attn(q, k, v, *, scale, mask=None, max_bias=0.0, n_threads=1, isa=DEFAULT_ISA, contract=None,
                  llamafile=False, q_contiguous=True):
    """ggml's unfused CPU attention, emulated bit for bit: ``kq = mul_mat(k, q)`` (q converted to K's
    vec_dot_type), ``soft_max_ext(kq, mask, scale, max_bias)`` (SIMD ``ggml_v_expf``, sum in double,
    times ``1/sum``), ``kqv = mul_mat(v^T, kq)`` (kq converted to F16 for F16 V), permuted.

    q [B, n_q, H, Dk] float32; k [B, n_kv, Hkv, Dk] float32 / float16 / QuantArray; v (canonical, not
    transposed) [B, n_kv, Hkv, Dv] float16 or float32; mask [B|1, H|1, n_q, n_kv] -> float32
    [B, n_q, H, Dv]. ``n_threads`` does not change ggml's results here. ``contract`` as in
    :func:`flash_attn_ext`. ``llamafile`` / ``q_contiguous``: see :func:`soft_max_attn_paths`; a mul_mat
    on llamafile's tinyBLAS (float, or ``tinyBLAS_Q0_AVX`` for block K) is emulated by :mod:`.sgemm`."""
    ctr = _contract(isa, contract)
    k_type, v_type = kv_type(k, "k"), kv_type(v, "v")
    if v_type not in formats.FLOAT_KV_TYPES:
        raise ValueError(f"v: soft_max_attn needs F16 or F32 V (ggml transposes it), got {v_type}")
    _check(q, k, v, mask, None)
    if int(n_threads) < 1:
        raise ValueError(f"n_threads: must be >= 1, got {n_threads}")
    B, n_q, H, _ = q.shape
    hkv = k.shape[2]
    if k_type not in formats.FLOAT_KV_TYPES and q.shape[-1] % 32:
        raise ValueError(f"q: Dk={q.shape[-1]} must be a multiple of 32 for block-quantized K")
    kq_path, kqv_path = soft_max_attn_paths(q.shape, k_type, v_type, k.shape[1], v.shape[-1], isa=isa,
                                            llamafile=bool(llamafile), q_contiguous=bool(q_contiguous))
    qg, mg, _, slg = _group(q, mask, None, _slopes(H, max_bias), hkv)
    out = _k.softmax_attn_core(qg, _kv_operand(k, k_type), _kv_operand(v, v_type),
                               jnp.asarray(float(np.float32(scale)), F64), slg, mg, k_type=k_type,
                               v_type=v_type, isa=get_isa(isa).name, contract=ctr,
                               kq_path=kq_path, sgemm_kqv=kqv_path == "sgemm")
    return _out32(out, (B, n_q, H, -1))


def _to_f32(x, name):
    t = kv_type(x, name)
    if t in formats.FLOAT_KV_TYPES:
        return jnp.asarray(x).astype(jnp.float32)
    return formats.dequantize(x.raw, x.fmt)


def mixed_flash_attn(q, k_cold, v_cold, k_hot, v_hot, *, kv_order="cold,hot", scale, mask=None,
                     softcap=0.0, max_bias=0.0, sinks=None, n_threads=1, isa=DEFAULT_ISA, contract=None,
                     version=None):
    """A mixed KV cache through ggml: cold K/V (QuantArray, or float arrays) dequantized to F32, hot
    K/V (float16) converted to F32, concatenated on the KV axis in ``kv_order`` ("cold,hot" or
    "hot,cold"), rounded to F16, then :func:`flash_attn_ext` with F16 K and V.

    q [B, n_q, H, Dk]; k_cold [B, n_cold, Hkv, Dk]; v_cold [B, n_cold, Hkv, Dv]; k_hot / v_hot
    [B, n_hot, Hkv, D]; mask [B|1, H|1, n_q, n_cold + n_hot] in kv_order -> float32 [B, n_q, H, Dv]."""
    if kv_order not in ("cold,hot", "hot,cold"):
        raise ValueError(f"kv_order: expected 'cold,hot' or 'hot,cold', got {kv_order!r}")
    parts_k = [_to_f32(k_cold, "k_cold"), _to_f32(k_hot, "k_hot")]
    parts_v = [_to_f32(v_cold, "v_cold"), _to_f32(v_hot, "v_hot")]
    if kv_order == "hot,cold":
        parts_k, parts_v = parts_k[::-1], parts_v[::-1]
    for name, a, b in (("k_hot", parts_k[0], parts_k[1]), ("v_hot", parts_v[0], parts_v[1])):
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            raise ValueError(f"{name}: shape {list(b.shape)} does not match the cold region {list(a.shape)}")
    k16 = jnp.concatenate(parts_k, axis=1).astype(jnp.float16)
    v16 = jnp.concatenate(parts_v, axis=1).astype(jnp.float16)
    return flash_attn_ext(q, k16, v16, scale=scale, mask=mask, softcap=softcap, max_bias=max_bias,
                          sinks=sinks, n_threads=n_threads, isa=isa, contract=contract, version=version)

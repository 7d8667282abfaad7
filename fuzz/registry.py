"""The property registry: what a fuzz property is (:class:`Property`), the campaign inputs it sees
(:class:`Context`), and ``PROPERTIES`` (name -> property, in campaign order), filled by
:mod:`fuzz.properties` and :mod:`fuzz.properties_io` through :func:`register`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fuzz.target import Target, as_target

__all__ = ["Context", "Property", "PROPERTIES", "register", "fixed", "outcome", "outcomes", "each_case"]


@dataclasses.dataclass
class Context:
    """Campaign-wide inputs of the properties, passed explicitly to each: ``seed``, the ``--target``
    (a :class:`fuzz.target.Target`; a plain callable is wrapped by :func:`fuzz.target.as_target` here, at
    the edge) and its spec, the ``--traces`` directory, the (K, V) cold-format pairs the cache
    properties draw from, ``active``: the properties the running campaign (or replay) evaluates (empty:
    all; the attention programs then compute exactly what those judge), and ``runners``: this
    context's per-property evaluation state (the target runner and its compiled programs)."""

    seed: int = 0
    target: Target | None = None
    target_spec: str | None = None
    traces: str | None = None
    cache_pairs: tuple = ()
    active: tuple = ()
    runners: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.target = as_target(self.target, self.target_spec)

    def runner(self, name: str, make: Callable[[], Any]):
        """This context's runner ``name`` (made by ``make()`` on first use)."""
        if name not in self.runners:
            self.runners[name] = make()
        return self.runners[name]


@dataclasses.dataclass(frozen=True)
class Property:
    name: str
    doc: str
    strategy: Callable[[Context], Any] | None
    evaluate: Callable[[list, Context], list]
    call: Callable[[dict, Context], dict] | None = None
    requires: tuple = ()
    enabled: Callable[[Context], str | None] = lambda ctx: None  # reason it cannot run, or None
    files: Callable[[Context], list] | None = None  # explicit case list instead of a strategy
    kernel: Callable | None = None  # fn(q, k, v, *, scale, mask, softcap, max_bias, sinks) of a failure's trace
    #: cases evaluated together (their verdicts become known together): None, a whole batch (one vmapped
    #: program call); 1, case by case (host-side checks: nothing to batch)
    batch: int | None = None
    #: stream(cases, ctx) yielding (index, outcome) as each verdict is known (instead of ``batch``)
    stream: Callable[[list, Context], Any] | None = None
    #: the results of the shared attention program this property judges (empty: not an attention property)
    judges: tuple = ()


def outcomes(prop: Property, cases: list, ctx: Context):
    """Yield (index, outcome) for ``cases`` as soon as each verdict is known: ``prop.stream`` when it
    has one, else ``prop.evaluate`` over groups of ``prop.batch`` cases (all of them when None)."""
    if prop.stream is not None:
        yield from prop.stream(cases, ctx)
        return
    step = prop.batch or max(len(cases), 1)
    for s in range(0, len(cases), step):
        for i, o in enumerate(prop.evaluate(cases[s:s + step], ctx)):
            yield s + i, o


def each_case(check: Callable[[dict], dict]) -> Callable[[list, Context], list]:
    """``evaluate`` of a host-side property from its per-case ``check(c) -> outcome``; an exception is a
    failed case (its one-line message), not a crash. Register such properties with ``batch=1``."""
    def evaluate(cases, ctx):
        out = []
        for c in cases:
            try:
                out.append(check(c))
            except Exception as e:
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                out.append(outcome(False, 1, f"{type(e).__name__}: {msg}"))
        return out
    return evaluate


def outcome(ok, checks, error=None, **metrics):
    """A case's outcome: dict(ok, checks, error, metrics)."""
    return dict(ok=bool(ok), checks=int(checks), error=error, metrics=metrics)


PROPERTIES: dict[str, Property] = {}


def register(p: Property) -> Property:
    """Add ``p`` to :data:`PROPERTIES` (campaign order = registration order)."""
    PROPERTIES[p.name] = p
    return p


def fixed(strategy):
    """A property's ``strategy(ctx)`` that ignores the context."""
    return lambda ctx: strategy

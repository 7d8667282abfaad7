"""Schemas of the files a campaign writes and later reads back as untrusted data: the lines of
``results.jsonl`` (one frozen dataclass per line kind) and the failure record replayed by
``python -m fuzz replay``. `parse_line` / `parse_record` validate a decoded JSON value and raise
`SchemaError` (a ValueError) naming the file, the line and the field; `read_lines` reads a whole
results file (regular files only, so a FIFO cannot hang the reader).

Line kinds (``type``):

| type | fields (required) | optional |
| --- | --- | --- |
| campaign | seed int | properties [str], shard [int, int], max_examples, time_budget, target, threads, resume, started |
| case | id "property/chunk/k", property str (= id's), ok bool, checks int >= 0 | error str, params object, elapsed, compiled |
| property | property str | seconds >= 0, compiles >= 0, skipped str, phase str, report_compiles |
| failure | property str, id (case id), file str, error str, replay str | |
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import stat
from dataclasses import dataclass
from typing import Any

from jaxkv.textsafe import escape

__all__ = ["SchemaError", "CampaignLine", "CaseLine", "PropertyLine", "FailureLine", "FailureRecord",
           "parse_line", "parse_record", "read_lines", "regular_file", "case_number"]

_CASE_ID = re.compile(r"^([A-Za-z0-9_.-]{1,64})/(\d{1,9})/(\d{1,9})$")
_MAX_DEPTH = 16


class SchemaError(ValueError):
    """A results line or failure record of the wrong shape (message: file:line: field: expected, found)."""


class _Where:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, found: Any):
        raise SchemaError(f"{self.where}: {field}: expected {expected}, found {escape(_short(found), 80)}")

    def int_(self, d, key, lo=None, hi=None, required=True):
        if key not in d:
            if required:
                self.fail(key, "an integer", "no such field")
            return None
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
            self.fail(key, f"an integer{rng}", v)
        return v

    def num(self, d, key, lo=0.0, required=False, default=None):
        if key not in d or (d[key] is None and not required):
            if required:
                self.fail(key, "a number", "no such field")
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            self.fail(key, f"a finite number >= {lo}", v)
        return float(v)

    def str_(self, d, key, required=True, none=False):
        if key not in d:
            if required:
                self.fail(key, "a string", "no such field")
            return None
        v = d[key]
        if v is None and none:
            return None
        if not isinstance(v, str):
            self.fail(key, "a string" + (" or null" if none else ""), v)
        return v

    def bool_(self, d, key, required=True, default=False):
        if key not in d:
            if required:
                self.fail(key, "true or false", "no such field")
            return default
        if not isinstance(d[key], bool):
            self.fail(key, "true or false", d[key])
        return d[key]

    def case_id(self, d, key="id", prop=None):
        v = self.str_(d, key)
        m = _CASE_ID.match(v)
        if not m:
            self.fail(key, "a case id property/chunk/k", v)
        if prop is not None and m.group(1) != prop:
            self.fail(key, f"a case id of property {prop!r}", v)
        return v


def _short(x) -> str:
    s = json.dumps(x, default=str) if not isinstance(x, str) else repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _depth(x, n=0) -> int:
    if n > _MAX_DEPTH:
        return n
    if isinstance(x, dict):
        return max([_depth(v, n + 1) for v in x.values()] or [n + 1])
    if isinstance(x, list):
        return max([_depth(v, n + 1) for v in x] or [n + 1])
    return n


@dataclass(frozen=True)
class CampaignLine:
    """A campaign's arguments (first line of each run)."""
    seed: int
    properties: tuple = ()
    shard: tuple = (0, 1)


@dataclass(frozen=True)
class CaseLine:
    """One case's verdict."""
    id: str
    property: str
    ok: bool
    checks: int
    error: str | None = None
    params: Any = None
    #: passed, but its bound reached the signal (fuzz.bounds: vacuous): the case decided nothing
    undecided: bool = False


@dataclass(frozen=True)
class PropertyLine:
    """Time and compiles spent on one property in one run (``phase`` 'shrink': its failure report)."""
    property: str
    seconds: float = 0.0
    compiles: int = 0
    skipped: str | None = None
    phase: str | None = None


@dataclass(frozen=True)
class FailureLine:
    """A saved (shrunk) failure: its record file and replay command."""
    property: str
    id: str
    file: str
    error: str
    replay: str


def _prop(w: _Where, d) -> str:
    p = w.str_(d, "property")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", p):
        w.fail("property", "a property name", p)
    return p


def parse_line(obj, where: str):
    """A decoded results.jsonl line -> its dataclass (SchemaError otherwise)."""
    w = _Where(where)
    if not isinstance(obj, dict):
        w.fail("line", "a JSON object", obj)
    if _depth(obj) > _MAX_DEPTH:
        w.fail("line", f"at most {_MAX_DEPTH} levels of nesting", "deeper")
    t = obj.get("type")
    if t == "campaign":
        props = obj.get("properties", [])
        if not isinstance(props, list) or not all(isinstance(x, str) for x in props):
            w.fail("properties", "a list of strings", props)
        shard = obj.get("shard", [0, 1])
        if (not isinstance(shard, list) or len(shard) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in shard)):
            w.fail("shard", "[I, N]", shard)
        return CampaignLine(w.int_(obj, "seed"), tuple(props), tuple(shard))
    if t == "case":
        prop = _prop(w, obj)
        cid = w.case_id(obj, "id", prop)
        ok = w.bool_(obj, "ok")
        checks = w.int_(obj, "checks", lo=0)
        err = w.str_(obj, "error", required=not ok, none=ok)
        params = obj.get("params")
        if params is not None and not isinstance(params, dict):
            w.fail("params", "a JSON object", params)
        w.num(obj, "elapsed")
        w.int_(obj, "compiled", lo=0, required=False)
        return CaseLine(cid, prop, ok, checks, err, params, w.bool_(obj, "undecided", required=False))
    if t == "property":
        prop = _prop(w, obj)
        return PropertyLine(prop, w.num(obj, "seconds", default=0.0), w.int_(obj, "compiles", lo=0, required=False)
                            or 0, w.str_(obj, "skipped", required=False, none=True),
                            w.str_(obj, "phase", required=False, none=True))
    if t == "failure":
        prop = _prop(w, obj)
        return FailureLine(prop, w.case_id(obj, "id", prop), w.str_(obj, "file"), w.str_(obj, "error"),
                           w.str_(obj, "replay"))
    w.fail("type", "campaign, case, property or failure", t)


def regular_file(path, what: str) -> pathlib.Path:
    """``path`` if it is a regular file (checked without opening it: a FIFO would block); ValueError with
    one line naming ``what`` otherwise. A missing file raises FileNotFoundError (callers decide)."""
    p = pathlib.Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{what}: {escape(p)}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what}: {escape(p)}: expected a regular file, found "
                         f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'a FIFO' if stat.S_ISFIFO(st.st_mode) else 'a special file'}")
    return p


def read_lines(path) -> list[dict]:
    """The validated lines of a results.jsonl as dicts, in order. A last line without its newline (a run
    killed mid-write) is ignored; any other bad line raises SchemaError naming file and line number."""
    p = regular_file(path, "results")
    data = p.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is a cut line (or empty)
    out = []
    for i, raw in enumerate(complete, 1):
        where = f"{escape(p)}:{i}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise SchemaError(f"{where}: line: expected JSON, found {escape(type(e).__name__)}") from None
        parse_line(obj, where)
        out.append(obj)
    return out


def case_number(case_id: str) -> tuple[int, int]:
    """(chunk, k) of a validated case id."""
    _, j, k = case_id.rsplit("/", 2)
    return int(j), int(k)


@dataclass(frozen=True)
class FailureRecord:
    """A saved failure (``OUT/failures/*.json``) as replay reads it."""
    property: str
    params: dict
    seed: int = 0
    case_id: str = ""
    target: str | None = None
    threads: int | None = None
    traces: str | None = None


def parse_record(obj, where: str) -> FailureRecord:
    """A decoded failure record -> FailureRecord (SchemaError otherwise)."""
    w = _Where(where)
    if not isinstance(obj, dict):
        w.fail("record", "a JSON object", obj)
    if _depth(obj) > _MAX_DEPTH:
        w.fail("record", f"at most {_MAX_DEPTH} levels of nesting", "deeper")
    prop = _prop(w, obj)
    params = obj.get("params")
    if not isinstance(params, dict):
        w.fail("params", "a JSON object", params if "params" in obj else "no such field")
    seed = w.int_(obj, "seed", lo=0, hi=2**63 - 1, required=False)
    cid = w.str_(obj, "case_id", required=False, none=True) or ""
    target = w.str_(obj, "target", required=False, none=True)
    threads = obj.get("threads")
    if threads is not None:
        threads = w.int_(obj, "threads", lo=1, hi=512)
    traces = w.str_(obj, "traces", required=False, none=True)
    return FailureRecord(prop, params, 0 if seed is None else seed, cid, target, threads, traces)


def to_dict(x) -> dict:
    """A parsed line or record as a plain dict."""
    return dataclasses.asdict(x)

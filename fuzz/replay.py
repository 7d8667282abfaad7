"""``python -m fuzz replay FILE [--target SPEC] [--threads N]`` and ``python -m fuzz merge DIR...``.

Replay re-evaluates a saved failure (the JSON record under ``OUT/failures/``, or its ``.gguf``/``.npz``
sibling) through the same property, bucket and program as the campaign: exit 1 when it still fails, 0
when it passes now, 2 when the file cannot be read. Merge combines the ``results.jsonl`` of several
campaign directories (shards, resumed runs; case ids deduplicated) into the summary the unsharded
campaign gives (`fuzz.campaign.partition_view`); exit 1 when any case failed.

Trust boundary: a record, like a results file, is data from elsewhere. It is validated against its
schema (fuzz.schema) and its parameters against its property's strategy (`check_params`) before anything
runs; nothing named in it is imported: a record of the ``target`` property replays only with the kernel
given on the command line (``--target``), and the record's own target name is shown escaped. Text from
either file reaches the terminal through `jaxkv.textsafe.escape`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxkv import cli
from fuzz import properties as P
from fuzz import schema
from fuzz.campaign import format_summary, generate, partition_view, read_records, summarize
from fuzz.target_spec import GGML_TARGETS, load_target
from jaxkv.textsafe import escape

__all__ = ["load_record", "check_params", "replay", "main", "merge_main"]

#: record files larger than this are not failure records (a saved record is a few KiB)
MAX_RECORD_BYTES = 1 << 20
#: an integer parameter may be at most this many times the largest value the property's strategy drew
#: for it in `_SAMPLES` cases (seeds: any value in [0, 2^63))
PARAM_FACTOR = 4
_SAMPLES = 64


def _regular(p, cmd: str, missing: str) -> None:
    """``p`` must be a regular file (fuzz.schema.regular_file): ValueError ``"<cmd>: <missing>"`` when
    there is none, one line naming ``p`` when it cannot be read."""
    try:
        schema.regular_file(p, cmd)
    except FileNotFoundError:
        raise ValueError(f"{cmd}: {missing}") from None
    except OSError as e:
        raise ValueError(f"{cmd}: {escape(p)}: cannot be read ({e.strerror or type(e).__name__})") from None


def load_record(path) -> dict:
    """The failure record at ``path`` (.json, or a saved array file next to its .json), validated
    (fuzz.schema.parse_record); ValueError with one line otherwise."""
    p = pathlib.Path(path)
    if p.suffix != ".json":
        p = p.with_suffix(".json")
    _regular(p, "replay", f"no failure record at {escape(p)}")
    try:
        if p.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"replay: {escape(p)}: expected a failure record of at most {MAX_RECORD_BYTES} bytes")
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"replay: {escape(p)} is not a failure record ({escape(type(e).__name__)})") from None
    schema.parse_record(rec, f"replay: {escape(p)}")
    return rec


def _ints(x, path=()):
    """(path, value) of every integer in a JSON value; list positions are ``*`` (one bound per list), and
    each list's length counts as an integer at ``path + ('len',)``."""
    if isinstance(x, bool):
        return
    if isinstance(x, int):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _ints(v, path + (k,))
    elif isinstance(x, list):
        yield path + ("len",), len(x)
        for v in x:
            yield from _ints(v, path + ("*",))


def _shape(x):
    """A JSON value's structure: dict keys, the set of element structures of a list, leaf kinds."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return ["list"] + sorted({json.dumps(_shape(v), sort_keys=True) for v in x})
    if isinstance(x, bool):
        return "bool"
    return "num" if isinstance(x, (int, float)) else type(x).__name__


def _fits(v, shapes: set) -> bool:
    """``v``'s structure is one drawn (a list: every element's structure among the drawn elements')."""
    sv = _shape(v)
    if json.dumps(sv, sort_keys=True) in shapes:
        return True
    if isinstance(v, list):
        drawn_elems = set()
        for s in shapes:
            d = json.loads(s)
            if isinstance(d, list) and d[:1] == ["list"]:
                drawn_elems |= set(d[1:])
        return set(sv[1:]) <= drawn_elems
    return False


def check_params(prop, params: dict, ctx) -> None:
    """``params`` must have the structure of the cases ``prop``'s strategy draws (same keys, leaf kinds,
    list elements of drawn kinds) and every integer -- list lengths included -- at most `PARAM_FACTOR` x the
    largest drawn at that position in `_SAMPLES` cases (keys ending in ``seed``: any value in [0, 2^63)), and not negative
    where no drawn one is; so a forged record cannot ask for an absurd allocation. ValueError otherwise."""
    if prop.files is not None or prop.strategy is None:
        return
    drawn = generate(prop, ctx, 0, 0, _SAMPLES)
    keys = {tuple(sorted(d)) for d in drawn}
    if tuple(sorted(params)) not in keys:
        want = sorted(set().union(*map(set, keys)))
        raise ValueError(f"replay: params: expected the keys of a {prop.name} case {want}, found "
                         f"{escape(sorted(params), 200)}")
    for k, v in params.items():
        shapes = {json.dumps(_shape(d[k]), sort_keys=True) for d in drawn if k in d}
        if not _fits(v, shapes):
            raise ValueError(f"replay: params[{escape(repr(k))}]: expected a value shaped like the strategy's "
                             f"({escape(sorted(shapes)[0], 80)}), found {escape(json.dumps(v)[:80])}")
    top, low = {}, {}
    for d in drawn:
        for path, x in _ints(d):
            top[path] = max(top.get(path, 0), abs(x))
            low[path] = min(low.get(path, 0), x)
    for path, x in _ints(params):
        where = escape("".join(f"[{p!r}]" for p in path))
        if any(isinstance(p, str) and p.endswith("seed") for p in path):  # seed, corrupt_seed, ...
            if not 0 <= x < 2**63:
                raise ValueError(f"replay: params{where}: expected a seed in [0, 2^63), found {x}")
            continue
        bound = PARAM_FACTOR * max(top.get(path, 1), 1)
        if abs(x) > bound:
            raise ValueError(f"replay: params{where}: expected |value| <= {bound} ({PARAM_FACTOR}x the largest "
                             f"the strategy drew), found {x}")
        if x < 0 <= low.get(path, 0):
            raise ValueError(f"replay: params{where}: expected a value >= 0, found {x}")


def replay(rec: dict, target: str | None = None, threads: int | None = None, menu: str | None = None) -> dict:
    """Re-evaluate a record's minimal case -> the outcome dict (ok, checks, error, metrics). A record of
    the ``target`` property needs ``target`` (the command line's --target): the record's own is never
    imported. ``threads`` / ``menu``: the live-ggml target's (default: the record's)."""
    prop = P.get(rec["property"])
    named = rec.get("target")
    if prop.name == "target" and target is None:
        raise ValueError(f"replay: the record's kernel is {escape(named)!s}; replay imports nothing a file "
                         f"names: pass it yourself with --target MODULE:FUNCTION|{'|'.join(GGML_TARGETS)}")
    menu = menu if menu is not None else rec.get("menu")
    if menu is not None and not isinstance(menu, str):
        raise ValueError(f"replay: menu: expected a menu name, found {escape(repr(menu), 40)}")
    if target:
        kernel = load_target(target, None if menu else threads if threads is not None else rec.get("threads"), menu)
    else:
        kernel = None
    ctx = P.Context(seed=rec.get("seed", 0), target=kernel, target_spec=target, traces=None, active=(prop.name,))
    if prop.files is not None:
        raise ValueError(f"replay: property {prop.name} replays input files: run python -m fuzz --traces DIR")
    why = P.available(prop, ctx)
    if why:
        raise ValueError(f"replay: property {prop.name} cannot run: {escape(why)}")
    check_params(prop, rec["params"], ctx)
    try:
        return prop.evaluate([rec["params"]], ctx)[0]
    except (KeyError, TypeError, IndexError, ValueError, ArithmeticError) as e:
        raise ValueError(f"replay: params: the {prop.name} case cannot be built from them "
                         f"({type(e).__name__}: {escape(str(e), 160)})") from None


def _parse(argv):
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # a ValueError: python -m fuzz prints it as one line, exit 2
            raise ValueError(f"replay: {message} (usage: python -m fuzz replay FILE [--target SPEC])")

    p = Parser(prog=cli.prog('replay'))
    p.add_argument("file")
    p.add_argument("--target", default=None, help="the kernel to replay a target record with (never taken "
                                                  "from the record)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--menu", default=None, help="the ggml case menu of the record (default: the record's)")
    return p.parse_args(argv)


def main(argv) -> int:
    a = _parse(argv)
    rec = load_record(a.file)
    o = replay(rec, a.target, a.threads, a.menu)
    name = f"{escape(rec['property'])} {escape(rec.get('case_id') or '')}"
    if o["ok"]:
        print(f"PASS {name}: the saved case passes now")
        return 0
    print(f"FAIL {name}: {escape(o['error'])}")
    return 1


def merge_main(argv) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m fuzz merge DIR...", file=sys.stderr)
        return 2
    records, seeds = [], {}
    for d in argv:
        p = pathlib.Path(d) / "results.jsonl"
        _regular(p, "merge", f"{escape(d)} has no results.jsonl")
        rs = read_records(p)
        for r in rs:
            if r.get("type") == "campaign":
                seeds.setdefault(r["seed"], escape(d))
        records += rs
    if len(seeds) > 1:
        (s1, d1), (s2, d2) = list(seeds.items())[:2]
        raise ValueError(f"merge: {d1} holds a campaign with seed {s1}, {d2} one with seed {s2}: not one campaign")
    records = partition_view(records)
    props = summarize(records)
    print(format_summary(props))
    fails = [r for r in records if r.get("type") == "failure"]
    for f in fails:
        print(f"FAIL {escape(f['property'])}: {escape(f['error'])}\n  replay: {escape(f['replay'])}")
    return 1 if any(s["failures"] for s in props.values()) else 0

"""The `eventhub` entry point: the core commands plus those that need the facets.

`serve` runs the app; `replay` rebuilds the facets' projections from the log in memory
(time travel, and `--check` against the running projections' snapshots). Both take the
facets' projections from `api.app.create_app`, exactly as a serving node gets them.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gc
import logging
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import msgspec
from aiohttp import web

from eventhub import cli
from eventhub.errors import EventhubError
from eventhub.events import datetime_to_micros, iso_millis
from eventhub.projection import Projection, fold
from eventhub.store import EventStore, Snapshot

MAX_DIFF_LINES = 20
YOUNG_GC_THRESHOLD = 50_000
"""Allocations between young-generation collections when serving (Python's default: 700).
A request's objects die by reference counting long before that many pile up, so the
collector runs ~70× less often for the same result: 2–4% of an insert's CPU (2026-11-25)."""
_encode = msgspec.json.Encoder().encode


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from api.app import create_app
    from eventhub.settings import load_settings

    try:
        settings = load_settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        web.run_app(
            app, host=settings.host, port=settings.port, loop=uvloop.new_event_loop(), print=None,
            access_log=None,
        )
    except EventhubError as exc:
        print(f"eventhub: {exc}", file=sys.stderr)
        return 2
    return 0


# -- replay ---------------------------------------------------------------------------


def facet_projections(database_url: str, facets: tuple[ModuleType, ...] | None = None) -> list[Projection]:
    """Fresh instances of the facets' projections, registered as a serving app does."""
    from api.app import create_app
    from api.keys import PROJECTIONS
    from eventhub.settings import load_settings

    app = create_app(load_settings(database_url=database_url), facets=facets)
    return list(app[PROJECTIONS])  # type: ignore[index]  # (aiohttp's AppKey typing, as in api/app.py)


async def rebuild(store: EventStore, projections: Sequence[Projection], until: int) -> int:
    """Fold the log into the projections up to `until`; return the last position read."""
    after = min((p.position for p in projections), default=until)
    async for events in cli.read_batches(store, after, until):
        fold(projections, events)
        after = events[-1].position
    return after


async def position_at(store: EventStore, micros: int, head: int) -> int:
    """The last position recorded at or before `micros` (0 if none): a binary search,
    since `recorded_at` never decreases along positions."""
    lo, hi = 0, head
    while lo < hi:
        mid = (lo + hi + 1) // 2
        event = await store.read_event(mid)
        if event is None:
            raise cli.CommandError(f"position {mid} is missing from the log (run `eventhub verify`)")
        if event.recorded_at <= micros:
            lo = mid
        else:
            hi = mid - 1
    return lo


def view_of(p: Projection) -> Any:
    """The projection's read model as plain JSON data: its `view()`; else its snapshot
    decoded as msgpack; else the snapshot in base64."""
    try:
        return msgspec.json.decode(_encode(p.view()))  # structs, sets, bytes… as plain JSON
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError):
        pass
    state = p.snapshot()
    try:
        return msgspec.json.decode(_encode(msgspec.msgpack.decode(state)))
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError):
        return {"snapshot_base64": base64.b64encode(state).decode()}


def parse_time(text: str) -> int:
    """An ISO 8601 time (`2024-05-01T14:03:00Z`; no zone means UTC) as UTC micros."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2024-05-01T14:03:00Z)") from None
    return datetime_to_micros(value)


def _select(projections: list[Projection], names: list[str] | None) -> list[Projection]:
    if not names:
        return projections
    known = {p.name: p for p in projections}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise cli.CommandError(f"no projection named {', '.join(unknown)} (known: {', '.join(known) or 'none'})")
    return [known[n] for n in names]


async def _replay(args: argparse.Namespace, facets: tuple[ModuleType, ...] | None) -> int:
    projections = _select(facet_projections(cli.database_url(args), facets), args.projection)
    if not projections:
        print("eventhub: no facet registers a projection; nothing to replay", file=sys.stderr)
    async with cli.opened(args) as store:
        if args.check:
            return await _check(store, projections)
        head = await store.head()
        if args.at is not None:
            position = await position_at(store, args.at, head)
        elif args.until is not None:
            if args.until < 0:
                raise cli.CommandError("--until must be a position (0 or more)")
            position = min(args.until, head)
        else:
            position = head
        await rebuild(store, projections, position)
        last = await store.read_event(position) if position else None
    doc = {
        "position": position,
        "head": head,
        "recorded_at": iso_millis(last.recorded_at) if last else None,
        "projections": {p.name: {"version": p.version, "model": view_of(p)} for p in projections},
    }
    print(msgspec.json.format(_encode(doc), indent=2).decode())
    return 0


async def _check(store: EventStore, projections: list[Projection]) -> int:
    """Rebuild each projection to exactly its snapshot's position and compare the models."""
    head = await store.head()
    differs = False
    targets: list[tuple[Projection, Snapshot]] = []
    for p in projections:
        snap = await store.load_snapshot(p.name)
        if snap is None:
            print(f"{p.name}: no snapshot to compare with")
        elif snap.version != p.version:
            print(f"{p.name}: snapshot written by version {snap.version}, this code is version {p.version}: not compared")
        elif snap.position > head:
            print(f"{p.name}: DIFFERS: snapshot at position {snap.position} is past the log's head {head}")
            differs = True
        else:
            targets.append((p, snap))
    targets.sort(key=lambda t: t[1].position)
    active = [p for p, _ in targets]
    for p, snap in targets:  # one pass over the log, dropping each projection at its position
        await rebuild(store, active, snap.position)
        active.remove(p)
        lines = list(_compare(p, snap))
        lag = f"(snapshot at position {snap.position}, head {head})"
        if not lines:
            print(f"{p.name}: same as its snapshot {lag}")
            continue
        differs = True
        print(f"{p.name}: DIFFERS from its snapshot {lag}:")
        for line in lines[:MAX_DIFF_LINES]:
            print(f"  {line}")
        if len(lines) > MAX_DIFF_LINES:
            print(f"  … and {len(lines) - MAX_DIFF_LINES} more")
    return 1 if differs else 0


def _compare(p: Projection, snap: Snapshot) -> Iterator[str]:
    """Differences between `p` (rebuilt) and its snapshot; none when only bytes differ
    in an order the model does not care about."""
    if p.snapshot() == snap.state:
        return
    rebuilt = view_of(p)
    p.restore(snap.state)
    stored = view_of(p)
    yield from _diff(rebuilt, stored, "")


def _diff(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}"
            if key not in b:
                yield f"{sub}: only in the rebuild: {_short(a[key])}"
            elif key not in a:
                yield f"{sub}: only in the snapshot: {_short(b[key])}"
            else:
                yield from _diff(a[key], b[key], sub)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path or '.'}: rebuild has {len(a)} items, snapshot {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path or '.'}: rebuild {_short(a)}, snapshot {_short(b)}"


def _short(value: Any, limit: int = 80) -> str:
    text = _encode(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the parser -----------------------------------------------------------------------


def _extra(facets: tuple[ModuleType, ...] | None) -> Any:
    def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        p = sub.add_parser("serve", help="serve every facet over HTTP (settings from the environment)")
        p.set_defaults(sync=_serve)

        p = sub.add_parser(
            "replay",
            help="rebuild the projections from the log in memory and print their read models (read only)",
            description="Rebuild the facets' projections from the log in memory, as of a position or a time, "
            "and print their read models as one JSON document. With --check, rebuild each projection to the "
            "position of its stored snapshot (what the running projections hold) and report differences; "
            "exit 1 on a difference.",
        )
        cli.add_database_option(p)
        point = p.add_mutually_exclusive_group()
        point.add_argument("--until", type=int, metavar="POSITION", help="fold the log up to POSITION (default: the head)")
        point.add_argument("--at", type=parse_time, metavar="TIME",
                           help="fold the events recorded at or before TIME (ISO 8601; no zone means UTC)")
        point.add_argument("--check", action="store_true", help="compare rebuilt projections with their snapshots")
        p.add_argument("--projection", action="append", metavar="NAME", help="only this projection (repeatable)")

        async def replay(args: argparse.Namespace) -> int:
            return await _replay(args, facets)

        p.set_defaults(func=replay)

        from api.app import FACETS

        for facet in FACETS:  # facet commands: `token` (specs), `macaroon` (exports)
            add_commands = getattr(facet, "add_commands", None)
            if add_commands is not None:
                add_commands(sub)

    return add


def main(argv: list[str] | None = None, *, facets: tuple[ModuleType, ...] | None = None) -> int:
    """Run one command; `facets` replaces `api.app.FACETS` (for tests)."""
    parser = cli.build_parser(_extra(facets))
    args = parser.parse_args(argv)
    if getattr(args, "sync", None) is not None:
        try:
            return int(args.sync(args))
        except EventhubError as exc:
            print(f"eventhub: {exc}", file=sys.stderr)
            return 2
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())

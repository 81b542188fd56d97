"""The core `eventhub` command line: commands over the log that need no facet.

`verify`, `tail`, `export` and `stats` only read; `import` writes (and says so). Each
works on SQLite and PostgreSQL alike (`--database-url`, else `$DATABASE_URL`).
`api/cli.py` adds the commands that need the facets (serve, replay) and is the entry
point; this module only builds on the store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from eventhub.chain import GENESIS, ChainVerifier, VerifyResult
from eventhub.errors import EventhubError, StoreCorrupt
from eventhub.events import Event, iso_millis
from eventhub.render import RecordError, event_summary, line_event, record_line
from eventhub.settings import load_settings, sqlite_path
from eventhub.store import EventStore, store_from_url

Command = Callable[[argparse.Namespace], Awaitable[int]]
BATCH = 5000
READ_BATCH = 1000
"""Rows per read of a full walk (verify, export, stats, replay). A batch of 1000 mixed
events (~1 MB) is still in the CPU cache when it is checked and freed; with 5000 the
same walk took 1.2–1.7x the CPU time per event (1M-event log, 2026-11-25)."""
FOLLOW_INTERVAL = 0.2
_encode = msgspec.json.Encoder().encode


class CommandError(EventhubError):
    """A command cannot run as asked; the message says why (exit status 2)."""


class ImportRefused(CommandError):
    """The file cannot be imported: not event records, a broken chain (exit status 1)."""


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url", help="the log to use: sqlite:///path or postgresql://… (default: $DATABASE_URL, else sqlite:///eventhub.db)"
    )


def database_url(args: argparse.Namespace) -> str:
    return str(args.database_url or load_settings().database_url)


def open_store_for(args: argparse.Namespace, *, must_exist: bool = True) -> EventStore:
    """A closed store for the command's log. A read-only command never creates a SQLite
    file: a wrong path is an error, not a new empty log."""
    url = database_url(args)
    if must_exist and not url.startswith(("postgresql://", "postgres://")):
        path = sqlite_path(url)
        if path != ":memory:" and not Path(path).exists():
            raise CommandError(f"no database at {path}")
    return store_from_url(url)


@contextlib.asynccontextmanager
async def opened(args: argparse.Namespace, *, must_exist: bool = True) -> AsyncIterator[EventStore]:
    store = open_store_for(args, must_exist=must_exist)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class Progress:
    """A one-line progress bar on a terminal; silent when output is piped."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.out: IO[str] = stream or sys.stderr
        self.enabled = bool(getattr(self.out, "isatty", lambda: False)())
        self._last = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        percent = min(100, done * 100 // self.total)
        if percent != self._last:
            self._last = percent
            bar = "#" * (percent // 4)
            self.out.write(f"\r{self.label} [{bar:<25}] {percent:3d}% {done}/{self.total}")
            self.out.flush()

    def done(self) -> None:
        if self.enabled:
            self.out.write("\n")


async def read_batches(
    store: EventStore, after: int, until: int, *, check: bool = True, size: int = READ_BATCH
) -> AsyncIterator[list[Event]]:
    """Events `after < position <= until` in batches, reading the next batch while the
    caller works on this one (the read runs in the driver, the caller's work here)."""
    if after >= until:
        return
    pending = asyncio.ensure_future(store.read_all(after, size, until=until, check=check))
    try:
        while True:
            events = await pending
            if not events:
                return
            last = events[-1].position
            if last < until:
                pending = asyncio.ensure_future(store.read_all(last, size, until=until, check=check))
            yield events
            if last >= until:
                return
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, EventhubError):
                await pending


# -- verify ---------------------------------------------------------------------------


async def verify_store(store: EventStore, from_position: int = 1, *, progress: bool = True) -> VerifyResult:
    """Walk the chain from `from_position` to the head; the first break, if any.

    From a position past 1 the walk is anchored at the stored hash of the event before
    it (itself checked against its own fields).
    """
    start = max(from_position - 1, 0)
    verifier = ChainVerifier()
    try:
        if start:
            prev = await store.read_event(start)
            if prev is None:
                return VerifyResult(0, start - 1, GENESIS, start, f"position {start} is missing")
            verifier = ChainVerifier(start, prev.hash)
        head = await store.head()
        bar = Progress(head - start, "verify") if progress else None
        async for events in read_batches(store, start, head, check=False):
            if not verifier.feed(events):
                break
            if bar:
                bar.update(events[-1].position - start)
        if bar:
            bar.done()
    except StoreCorrupt as exc:  # a row the store cannot even decode (e.g. its meta)
        if exc.position is None:
            raise
        # the rows before it in the failed batch were never walked: walk them first
        before = exc.position - 1 - verifier.result.head
        if before > 0:
            verifier.feed(await store.read_all(verifier.result.head, before, until=exc.position - 1, check=False))
        r = verifier.result
        if r.ok:
            r.broken_at, r.reason = exc.position, str(exc)
        return r
    result = verifier.result
    if result.ok and result.head < head:
        result.broken_at, result.reason = result.head + 1, f"position {result.head + 1} is missing"
    return result


async def cmd_verify(args: argparse.Namespace) -> int:
    async with opened(args) as store:
        result = await verify_store(store, args.from_position)
    if result.ok:
        print(f"ok: {result.events} events, head {result.head}, chain {result.chain.hex()}")
        return 0
    print(f"broken at position {result.broken_at}: {result.reason}")
    return 1


# -- tail -----------------------------------------------------------------------------


async def cmd_tail(args: argparse.Namespace) -> int:
    async with opened(args) as store:
        wake = asyncio.Event()

        async def woken(_head: int) -> None:  # shared backends announce other nodes' commits
            wake.set()

        store.head_listeners.append(woken)
        head = await store.head()
        after = _start_after(args.from_position, head)
        types = args.types or None
        while True:
            while after < head:
                events = await store.read_all(after, BATCH, until=head, stream_prefix=args.stream, types=types)
                if events:
                    sys.stdout.write("".join(_encode(event_summary(e)).decode() + "\n" for e in events))
                    sys.stdout.flush()
                # a short (filtered) page means nothing else matches up to `head`
                after = events[-1].position if len(events) == BATCH else head
            if not args.follow:
                return 0
            # SQLite tells no other process about a commit: poll. PostgreSQL's LISTEN
            # wakes us through the head listener at once; the poll is its safety net.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), args.interval)
            wake.clear()
            head = await store.head()


def _start_after(from_position: int, head: int) -> int:
    """`--from P`: start at P; a negative P counts back from the head (-10: the last 10)."""
    if from_position < 0:
        return max(head + from_position, 0)
    return max(from_position - 1, 0)


# -- export / import ------------------------------------------------------------------


async def cmd_export(args: argparse.Namespace) -> int:
    to_stdout = args.file == "-"
    target = Path(args.file)
    if not to_stdout and target.exists() and not args.force:
        raise CommandError(f"{target} exists (use --force to overwrite it)")
    async with opened(args) as store:
        head = await store.head()
        until = head if args.until is None else min(args.until, head)
        start = max(args.from_position - 1, 0)
        verifier = ChainVerifier()
        if start:
            prev = await store.read_event(start)
            if prev is None:
                raise CommandError(f"position {start} is missing: cannot anchor the export")
            verifier = ChainVerifier(start, prev.hash)
        part = target.with_name(target.name + ".part")
        out: IO[bytes] = sys.stdout.buffer if to_stdout else part.open("wb")
        try:
            bar = Progress(until - start, "export")
            # the export walks the chain as it goes: a broken log is not exported
            async for events in read_batches(store, start, until, check=False):
                if not verifier.feed(events):
                    break
                out.write(b"".join(record_line(e) for e in events))
                bar.update(events[-1].position - start)
            bar.done()
            out.flush()
        except BaseException:
            if not to_stdout:
                out.close()
                part.unlink(missing_ok=True)
            raise
        if not to_stdout:
            out.close()
        result = verifier.result
        if result.ok and result.head < until:
            result.broken_at, result.reason = result.head + 1, f"position {result.head + 1} is missing"
        if not result.ok:
            if not to_stdout:
                part.unlink(missing_ok=True)
            what = "the output is incomplete" if to_stdout else "nothing exported"
            print(f"broken at position {result.broken_at}: {result.reason}; {what}", file=sys.stderr)
            return 1
        if not to_stdout:
            os.replace(part, target)
    span = f"positions {start + 1}..{result.head}" if result.events else "no events"
    print(f"exported {result.events} events ({span}) to {args.file}", file=sys.stderr)
    return 0


def _read_records(path: Path) -> Iterator[tuple[int, Event]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, line_event(line)
            except RecordError as exc:
                raise ImportRefused(f"{path}:{number}: not an event record: {exc}") from None


class _FileSpan(msgspec.Struct):
    first: int = 0
    last: int = 0
    first_prev: bytes = GENESIS
    hash_at_head: bytes | None = None  # the file's hash at the target log's head
    last_hash: bytes = GENESIS


def _check_file(path: Path, head: int) -> _FileSpan:
    """Walk the file's own chain (nothing is written yet); where it starts and ends."""
    verifier: ChainVerifier | None = None
    span = _FileSpan()
    for number, event in _read_records(path):
        if verifier is None:
            span.first, span.first_prev = event.position, event.prev_hash
            verifier = ChainVerifier(event.position - 1, event.prev_hash)
        if not verifier.feed((event,)):
            r = verifier.result
            raise ImportRefused(f"{path}:{number}: the file's chain is broken at position {r.broken_at}: {r.reason}")
        if event.position == head:
            span.hash_at_head = event.hash
    if verifier is not None:
        span.last, span.last_hash = verifier.result.head, verifier.result.chain
    return span


async def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"no file at {path}")
    async with opened(args, must_exist=False) as store:
        head = await store.head()
        try:
            span = await asyncio.to_thread(_check_file, path, head)  # keep the loop (and its connections) live
        except ImportRefused as exc:
            print(f"refused: {exc}; nothing imported", file=sys.stderr)
            return 1
        first, last = span.first, span.last
        if not first:
            print(f"{path}: no events, nothing imported", file=sys.stderr)
            return 0
        refusal = await _continues(store, head, span)
        if refusal:
            print(f"refused: {path} does not continue this log: {refusal}; nothing imported", file=sys.stderr)
            return 1
        if last <= head:
            print(f"{path}: every event (positions {first}..{last}) is already in the log, nothing imported", file=sys.stderr)
            return 0
        head_event = await store.read_event(head) if head else None
        verifier = ChainVerifier(head, head_event.hash if head_event else GENESIS)
        bar = Progress(last - head, "import")
        batch: list[Event] = []
        for _, event in _read_records(path):
            if event.position <= head:
                continue
            batch.append(event)
            if len(batch) == BATCH:
                await _import_batch(store, verifier, batch, path)
                bar.update(batch[-1].position - head)
                batch = []
        if batch:
            await _import_batch(store, verifier, batch, path)
        bar.done()
    print(f"imported {last - head} events (positions {head + 1}..{last}) from {path}", file=sys.stderr)
    return 0


async def _continues(store: EventStore, head: int, span: _FileSpan) -> str | None:
    """Why the file cannot be imported into a log at `head`, or None.

    The file must start at or before the head + 1, its first event must chain to the
    log's event before it, and where it overlaps the log the hashes must agree (equal
    hashes at one position mean equal logs up to it). The overlap is skipped, so an
    interrupted import can be run again.
    """
    if span.first > head + 1:
        return f"it starts at position {span.first}, the log's head is {head}"
    if span.first > 1:
        anchor = await store.read_event(span.first - 1)
        if anchor is None or anchor.hash != span.first_prev:
            return f"its event {span.first} does not chain to the log's event {span.first - 1}"
    elif span.first_prev != GENESIS:
        return "its first event does not start a log"
    if span.first <= head:
        at, mine = (head, span.hash_at_head) if span.last >= head else (span.last, span.last_hash)
        stored = await store.read_event(at)
        if stored is None or stored.hash != mine:
            return f"at position {at} its event differs from the log's"
    return None


async def _import_batch(store: EventStore, verifier: ChainVerifier, batch: list[Event], path: Path) -> None:
    # The file was walked once already; walk again what is written, in case it changed.
    if not verifier.feed(batch):
        r = verifier.result
        raise CommandError(f"{path} changed while importing: broken at position {r.broken_at}: {r.reason}")
    try:
        await store.import_events(batch)
    except NotImplementedError:
        raise CommandError(f"the {store.backend} store cannot import events") from None


# -- stats ----------------------------------------------------------------------------


class LogStats(msgspec.Struct):
    """What `eventhub stats` reports."""

    backend: str
    head: int
    events: int = 0
    streams: int = 0
    bytes: int = 0
    purged: int = 0
    oldest: str | None = None
    newest: str | None = None
    types: dict[str, int] = {}
    facets: dict[str, int] = {}


async def log_stats(store: EventStore) -> LogStats:
    """Counts over the whole log, read once in position order (unchecked: not an audit)."""
    head = await store.head()
    stats = LogStats(store.backend, head)
    streams: set[str] = set()
    types: Counter[str] = Counter()
    facets: Counter[str] = Counter()
    oldest = newest = None
    async for events in read_batches(store, 0, head, check=False):
        for e in events:
            streams.add(e.stream)
            types[e.type] += 1
            facets[e.stream.split(":", 1)[0]] += 1
            if e.data is None:
                stats.purged += 1
            else:
                stats.bytes += len(e.data)
        oldest = events[0].recorded_at if oldest is None else oldest
        newest = events[-1].recorded_at
        stats.events += len(events)
    stats.streams = len(streams)
    stats.types = dict(types.most_common())
    stats.facets = dict(facets.most_common())
    stats.oldest = iso_millis(oldest) if oldest is not None else None
    stats.newest = iso_millis(newest) if newest is not None else None
    return stats


async def cmd_stats(args: argparse.Namespace) -> int:
    async with opened(args) as store:
        stats = await log_stats(store)
    if args.json:
        print(_encode(stats).decode())
        return 0
    rows = [
        ("backend", stats.backend),
        ("head", stats.head),
        ("events", stats.events),
        ("streams", stats.streams),
        ("payload bytes", stats.bytes),
        ("purged payloads", stats.purged),
        ("oldest", stats.oldest or "-"),
        ("newest", stats.newest or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for title, counts in (("events by stream prefix", stats.facets), ("events by type", stats.types)):
        print(f"\n{title}:")
        w = max((len(k) for k in counts), default=0)
        for key, count in counts.items():
            print(f"  {key:<{w}}  {count}")
    return 0


# -- copy -----------------------------------------------------------------------------


async def cmd_copy(args: argparse.Namespace) -> int:
    from eventhub.copy import CopyRefused, copy_log, text_progress

    if args.source == args.target:
        raise CommandError("source and target are the same log")
    src = open_store_for(argparse.Namespace(database_url=args.source))
    dst = open_store_for(argparse.Namespace(database_url=args.target), must_exist=False)
    await src.open()
    try:
        await dst.open()
        try:
            progress = text_progress() if sys.stderr.isatty() else None
            result = await copy_log(src, dst, progress=progress)
        except CopyRefused as exc:
            print(f"refused: {exc}; nothing copied", file=sys.stderr)
            return 1
        except StoreCorrupt as exc:
            print(f"broken at position {exc.position}: {exc}", file=sys.stderr)
            return 1
        finally:
            await dst.close()
    finally:
        await src.close()
    print(f"copied {result.copied} events ({result.skipped} already there), head {result.head}, chain {result.chain.hex()}")
    return 0


# -- the parser -----------------------------------------------------------------------


def build_parser(extra: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser = argparse.ArgumentParser(prog="eventhub", description="eventhub: one append-only event log, five APIs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="walk the hash chain and report the first broken position (read only)",
                       description="Walk the hash chain; print `ok: N events, head H, chain HEX` and exit 0, "
                       "or `broken at position P: reason` and exit 1. Record the chain hex: it pins the whole log.")
    add_database_option(p)
    p.add_argument("--from", dest="from_position", type=int, default=1, metavar="P",
                   help="start at position P, anchored at the stored hash of P-1 (default 1)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("tail", help="print events as JSON lines, optionally following new commits (read only)",
                       description="Print events as JSON lines: facet events' data decoded, raw content as digest "
                       "and size. With --follow keep printing new commits (polled every --interval seconds; on "
                       "PostgreSQL LISTEN/NOTIFY wakes it at once).")
    add_database_option(p)
    p.add_argument("--from", dest="from_position", type=int, default=1, metavar="P",
                   help="start at position P; negative counts back from the head (-10: the last ten)")
    p.add_argument("--stream", metavar="PREFIX", help="only streams starting with PREFIX (e.g. channel: or build:abc)")
    p.add_argument("--type", dest="types", action="append", metavar="T", help="only events of type T (repeatable)")
    p.add_argument("--follow", "-f", action="store_true", help="keep following new commits until interrupted")
    p.add_argument("--interval", type=float, default=FOLLOW_INTERVAL, metavar="SECONDS",
                   help=f"how often --follow polls the store (default {FOLLOW_INTERVAL})")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("export", help="write events to a JSON lines file that imports back exactly (read only)",
                       description="Write events as JSON lines: every field, data in base64, hashes in hex; purged "
                       "payloads stay purged. The chain is checked as it is read; a broken log is not exported.")
    add_database_option(p)
    p.add_argument("file", metavar="FILE", help="the file to write (- for standard output)")
    p.add_argument("--from", dest="from_position", type=int, default=1, metavar="P", help="first position (default 1)")
    p.add_argument("--until", type=int, metavar="P", help="last position (default: the head)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="append an exported file's events verbatim (WRITES to the log)",
                       description="Append the events of an export file with their positions, hashes and bytes "
                       "unchanged. The file's chain is checked first and it must continue the target log (events "
                       "the log already holds are skipped when identical); otherwise nothing is written.")
    add_database_option(p)
    p.add_argument("file", metavar="FILE", help="an `eventhub export` file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("copy", help="copy a whole log to another database, verbatim (WRITES to DST)",
                       description="Copy every event of SRC into DST with positions, hashes and bytes unchanged, "
                       "checking the chain as it goes. DST must be empty or hold a prefix of SRC (then only the rest "
                       "is copied, so an interrupted copy resumes); otherwise nothing is copied. Snapshots and "
                       "idempotency keys are not copied.")
    p.add_argument("source", metavar="SRC", help="the log to read: sqlite:///path or postgresql://…")
    p.add_argument("target", metavar="DST", help="the log to write (created when it is a new SQLite file)")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser("stats", help="events, streams, bytes, counts per type, oldest and newest (read only)")
    add_database_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)

    if extra is not None:
        extra(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(asyncio.run(args.func(args)))
    except EventhubError as exc:
        print(f"eventhub: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `eventhub tail | head`: the reader is gone, stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"eventhub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

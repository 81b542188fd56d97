"""The core `eventhub` command line: commands over the log that need no facet.

`api/cli.py` adds the commands that need the facets (serve, replay) and is the entry
point; this module only builds on the store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from eventhub.chain import ChainVerifier
from eventhub.errors import EventhubError
from eventhub.settings import load_settings
from eventhub.store import EventStore, store_from_url

Command = Callable[[argparse.Namespace], Awaitable[int]]


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="the log to use (default: $DATABASE_URL, else sqlite:///eventhub.db)")


def open_store_for(args: argparse.Namespace) -> EventStore:
    url = args.database_url or load_settings().database_url
    return store_from_url(url)


class Progress:
    """A one-line progress bar on a terminal; silent when output is piped."""

    def __init__(self, total: int, label: str, stream: object = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.out = stream or sys.stderr
        self.enabled = bool(getattr(self.out, "isatty", lambda: False)())
        self._last = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        percent = min(100, done * 100 // self.total)
        if percent != self._last:
            self._last = percent
            bar = "#" * (percent // 4)
            self.out.write(f"\r{self.label} [{bar:<25}] {percent:3d}% {done}/{self.total}")  # type: ignore[attr-defined]
            self.out.flush()  # type: ignore[attr-defined]

    def done(self) -> None:
        if self.enabled:
            self.out.write("\n")  # type: ignore[attr-defined]


async def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store_for(args)
    await store.open()
    try:
        start = max(args.from_position - 1, 0)
        prev = await store.read_event(start) if start else None
        verifier = ChainVerifier(start, prev.hash) if prev else ChainVerifier()
        head = await store.head()
        progress = Progress(head - start, "verify")
        after = start
        while after < head:
            events = await store.read_all(after, 5000, until=head, check=False)
            if not events or not verifier.feed(events):
                break
            after = events[-1].position
            progress.update(after - start)
        progress.done()
        result = verifier.result
        if result.ok and result.head < head:
            result.broken_at, result.reason = result.head + 1, f"position {result.head + 1} is missing"
    finally:
        await store.close()
    if result.ok:
        print(f"ok: {result.events} events, head {result.head}, chain {result.chain.hex()}")
        return 0
    print(f"broken at position {result.broken_at}: {result.reason}")
    return 1


def build_parser(extra: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser = argparse.ArgumentParser(prog="eventhub", description="eventhub: one append-only event log, five APIs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="walk the hash chain and report the first broken position")
    add_database_option(p)
    p.add_argument("--from", dest="from_position", type=int, default=1, help="start at this position")
    p.set_defaults(func=cmd_verify)
    if extra is not None:
        extra(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return asyncio.run(args.func(args))
    except EventhubError as exc:
        print(f"eventhub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""Child process of the crash test: append forever, report every acknowledged event.

    python tests/store/crash_writer.py PATH TAG

64 concurrent appenders write to a real SQLite store at PATH until the process is
killed. Each appender owns a stream (`crash:<n>`, continued across runs, with exact
expected versions) and now and then also appends to a shared stream in the same call,
sometimes with an idempotency key. Once `append` returns, each of its events is written
to stdout as one line, `position stream version hash-hex`, flushed at once: a line on
stdout is a promise that the event is durable.
"""

from __future__ import annotations

import asyncio
import sys

from eventhub.events import ANY, Event, NewEvent, StreamAppend
from eventhub.store.sqlite import SQLiteStore

APPENDERS = 64


def _acknowledge(events: list[Event]) -> None:
    sys.stdout.write("".join(f"{e.position} {e.stream} {e.version} {e.hash.hex()}\n" for e in events))
    sys.stdout.flush()


async def _appender(store: SQLiteStore, n: int, tag: str) -> None:
    stream = f"crash:{n}"
    version = await store.stream_version(stream)
    call = 0
    while True:
        call += 1
        events = [NewEvent("Appended", f"{tag}/{n}/{call}/{i}".encode(), {"run": tag}) for i in range(1 + call % 3)]
        appends = [StreamAppend(stream, events, version)]
        if call % 5 == 0:
            appends.append(StreamAppend("crash:shared", [NewEvent("Shared", f"{tag}/{n}/{call}".encode())], ANY))
        key = f"{tag}/{n}/{call}" if call % 7 == 0 else None
        written = await store.append(*appends, idempotency_key=key)
        version += len(events)
        _acknowledge(written)


async def main(path: str, tag: str) -> None:
    store = SQLiteStore(path)
    await store.open()
    await asyncio.gather(*(_appender(store, n, tag) for n in range(APPENDERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

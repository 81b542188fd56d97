"""Copy a whole log from one store to another, verbatim, verifying the chain as it goes.

The copy keeps positions, versions, `recorded_at`, digests and hashes, so the target is
the same log, not a replay of it; purged payloads stay purged. Running it again resumes:
a target that already holds a prefix of the source (same hash at the target's head)
receives only the rest, and a target that holds anything else is refused. Projection
snapshots and idempotency keys are not copied: snapshots are rebuilt from the log, and
keys only guard retries against the store that answered them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from eventhub.chain import ChainVerifier
from eventhub.errors import EventhubError, StoreCorrupt
from eventhub.store.base import EventStore

Progress = Callable[[int, int], None]
"""Called with (position copied up to, source head) after each batch."""


class CopyRefused(EventhubError):
    """The target is not a prefix of the source; nothing was copied."""


@dataclass(frozen=True)
class CopyResult:
    """What `copy_log` did: `skipped` events were already in the target, `copied` were added."""

    head: int
    copied: int
    skipped: int
    chain: bytes


async def copy_log(
    src: EventStore, dst: EventStore, *, progress: Progress | None = None, batch: int = 1000
) -> CopyResult:
    """Copy every event of `src` (up to its head when the copy starts) into `dst`.

    Both stores must be open. Raises `CopyRefused` when `dst` diverges from `src` (more
    events, or a different hash at its head) and `StoreCorrupt` at the first position
    where the source's chain breaks; what was copied before that stays and verifies.
    """
    src_head = await src.head()
    dst_head = await dst.head()
    if dst_head > src_head:
        raise CopyRefused(f"target holds {dst_head} events, more than the source's {src_head}")
    verifier = ChainVerifier()
    if dst_head:
        ours = await dst.read_event(dst_head)
        theirs = await src.read_event(dst_head)
        if ours is None or theirs is None or ours.hash != theirs.hash:
            raise CopyRefused(f"target diverges from the source at or before position {dst_head}")
        verifier = ChainVerifier(dst_head, ours.hash)
    if progress is not None:
        progress(dst_head, src_head)
    after = dst_head
    while after < src_head:
        # Unchecked reads: the verifier checks each event itself and names the break.
        events = await src.read_all(after, batch, until=src_head, check=False)
        if not events:
            raise StoreCorrupt(f"source ends at {after}, before its head {src_head}", after + 1)
        if not verifier.feed(events):
            r = verifier.result
            raise StoreCorrupt(f"source chain is broken at position {r.broken_at}: {r.reason}", r.broken_at)
        await dst.import_events(events)
        after = events[-1].position
        if progress is not None:
            progress(after, src_head)
    return CopyResult(head=after, copied=after - dst_head, skipped=dst_head, chain=verifier.result.chain)


def text_progress(out: TextIO | None = None, width: int = 30, every: float = 0.2) -> Progress:
    """A progress callback drawing `[#####.....] 1234/5000 (24%)` on one terminal line."""
    stream = out if out is not None else sys.stderr
    last = 0.0

    def show(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        final = done >= total
        if not final and now - last < every:
            return
        last = now
        share = done / total if total else 1.0
        filled = int(width * share)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({share:.0%})")
        if final:
            stream.write("\n")
        stream.flush()

    return show

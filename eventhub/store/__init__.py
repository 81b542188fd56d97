"""Stores: the contract in `base`, one module per backend, chosen by `DATABASE_URL`."""

from __future__ import annotations

from eventhub.clock import Clock, SystemClock
from eventhub.settings import Settings, sqlite_path
from eventhub.store.base import EventStore, Snapshot

__all__ = ["EventStore", "Snapshot", "create_store", "store_from_url"]


def store_from_url(url: str, *, clock: Clock | None = None, synchronous: str = "FULL") -> EventStore:
    """A closed store for `url` (`sqlite:///path` or `postgresql://…`)."""
    clock = clock or SystemClock()
    if url.startswith(("postgresql://", "postgres://")):
        from eventhub.store.postgres import PostgresStore

        return PostgresStore(url, clock=clock)
    from eventhub.store.sqlite import SQLiteStore

    return SQLiteStore(sqlite_path(url), clock=clock, synchronous=synchronous)


def create_store(settings: Settings, *, clock: Clock | None = None) -> EventStore:
    return store_from_url(settings.database_url, clock=clock, synchronous=settings.sqlite_synchronous)

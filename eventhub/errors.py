"""One error hierarchy for the log. Backends translate driver errors into these."""

from __future__ import annotations


class EventhubError(Exception):
    """Base of every error the log raises on purpose."""


class WrongExpectedVersion(EventhubError):
    """An append's expected version did not match the stream; nothing was written."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r}: expected version {_describe(expected)}, actual {actual}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class IdempotencyConflict(EventhubError):
    """An idempotency key was reused with different events."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for different events")
        self.key = key


class StoreUnavailable(EventhubError):
    """The store cannot serve now: locked, read-only, unreachable, disk full or I/O error."""


class StoreFull(StoreUnavailable):
    """The disk (or the database) is full; the append was not written."""


class StoreCorrupt(EventhubError):
    """Stored data fails its own check: a bad database file or an event whose hash is wrong."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class StoreClosed(StoreUnavailable):
    """The store was closed while the call was waiting."""


class SettingsError(EventhubError):
    """A setting from the environment is missing or invalid; the message names it."""


def _describe(expected: int) -> str:
    from eventhub.events import ANY, NO_STREAM, STREAM_EXISTS

    return {ANY: "any", NO_STREAM: "no stream", STREAM_EXISTS: "stream exists"}.get(expected, str(expected))

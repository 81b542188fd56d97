"""Exports (the Databox export service): its events, its read model, its decisions.

Each export request is one stream, `export:<id>`:

    ExportRequested        the client asked for `data` to be POSTed to `uri`
    ExportClaimed          a node took it for attempt n, holding a lease until a deadline
    ExportAttemptFailed    attempt n failed; the holder retries at `retry_at`
    ExportFinished         the outcome: the receiver's status and body, or why there is none

The read model keeps, per request, what the API and the worker need (state, client,
order, lease, attempts, where the outcome is) and, per client, the FIFO of its
unfinished requests. Request payloads and receiver bodies stay in the log and are read
by stream and version. The decision functions are pure: a request or a delivery outcome
in, events (or an `ExportError`) out.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Final, Literal

import msgspec

from eventhub.claims import Lease, claimable, lease_until
from eventhub.events import Event, FactCodec
from eventhub.projection import Projection

PREFIX: Final = "export:"
PENDING: Final = "Pending"
PROCESSING: Final = "Processing"
FINISHED: Final = "Finished"
State = Literal["Pending", "Processing", "Finished"]

# Status codes recorded when no receiver answered (the body says which case it was).
STATUS_UNREACHABLE: Final = 502
STATUS_TIMED_OUT: Final = 504

class ExportError(Exception):
    """The one error of the facet: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- events ---------------------------------------------------------------------------


class ExportRequested(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    client: str
    uri: str
    data: str


class ExportClaimed(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    attempt: int
    lease_until: int


class ExportAttemptFailed(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    reason: str
    retry_at: int
    lease_until: int
    status: int | None = None


class ExportFinished(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    body: str
    attempts: int
    error: str = ""
    """Empty when the receiver answered; otherwise why eventhub made the status up."""


ExportEvent = ExportRequested | ExportClaimed | ExportAttemptFailed | ExportFinished
_encode = msgspec.json.Encoder().encode
FACTS: Final = FactCodec(ExportRequested, ExportClaimed, ExportAttemptFailed, ExportFinished)


def from_event(event: Event) -> ExportEvent:
    """Decode one of the facet's events (raises KeyError for a type it does not know)."""
    fact = FACTS.decode(event)
    if fact is None:
        raise KeyError(event.type)
    return fact  # type: ignore[return-value]


def stream_of(export_id: str) -> str:
    return PREFIX + export_id


# -- requests -------------------------------------------------------------------------


class ExportBody(msgspec.Struct, forbid_unknown_fields=False):
    """The body of `POST /export` and `POST /lp/export`."""

    id: str
    uri: str
    data: str | None = None


def decode_body(raw: bytes) -> ExportBody:
    try:
        return msgspec.json.decode(raw, type=ExportBody)
    except msgspec.ValidationError as exc:
        raise ExportError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ExportError(400, f"the body is not valid JSON: {exc}") from None


def new_request(client: str, body: ExportBody, export_id: str | None = None) -> ExportRequested:
    """Decide a new export request (`id` is empty): validate it and name it."""
    if body.data is None:
        raise ExportError(400, "invalid request: a new export needs `data`, a string holding JSON")
    try:
        msgspec.json.decode(body.data)
    except msgspec.DecodeError as exc:
        raise ExportError(400, f"invalid request: `data` must be a string holding JSON ({exc})") from None
    if not body.uri:
        raise ExportError(400, "invalid request: `uri` is empty")
    return ExportRequested(id=export_id or str(uuid.uuid4()), client=client, uri=body.uri, data=body.data)


# -- the read model -------------------------------------------------------------------


class Entry(msgspec.Struct, kw_only=True):
    """One request as the read model knows it."""

    id: str
    client: str
    seq: int  # position of ExportRequested: the client's FIFO order
    state: str = PENDING
    version: int = 0  # the stream version folded in: the expected version of the next append
    attempt: int = 0  # number of the latest claim
    lease: Lease | None = None
    retry_at: int = 0
    last_reason: str = ""
    last_status: int | None = None
    status: int | None = None  # when Finished
    finished_version: int | None = None  # where ExportFinished (and the body) is

    @property
    def stream(self) -> str:
        return stream_of(self.id)


class ExportsProjection(Projection):
    """Requests by id, and each client's unfinished requests in the order they came."""

    name = "exports"
    version = 1
    prefixes = (PREFIX,)

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, deque[str]] = {}

    def get(self, export_id: str) -> Entry | None:
        return self.entries.get(export_id)

    def head_of(self, client: str) -> Entry | None:
        """The client's oldest unfinished request: the only one that may be sent now."""
        queue = self.queues.get(client)
        return self.entries[queue[0]] if queue else None

    def clients_with_work(self) -> list[str]:
        return list(self.queues)

    def apply(self, event: Event) -> None:
        fact = from_event(event)
        if isinstance(fact, ExportRequested):
            self.entries[fact.id] = Entry(id=fact.id, client=fact.client, seq=event.position, version=event.version)
            self.queues.setdefault(fact.client, deque()).append(fact.id)
            return
        entry = self.entries.get(event.stream[len(PREFIX) :])
        if entry is None:
            return
        entry.version = event.version
        if isinstance(fact, ExportClaimed):
            entry.state = PROCESSING
            entry.attempt = fact.attempt
            entry.lease = Lease(fact.node, fact.lease_until)
            entry.retry_at = 0
        elif isinstance(fact, ExportAttemptFailed):
            node = entry.lease.node if entry.lease else ""
            entry.lease = Lease(node, fact.lease_until)
            entry.retry_at = fact.retry_at
            entry.last_reason = fact.reason
            entry.last_status = fact.status
        elif isinstance(fact, ExportFinished):
            entry.state = FINISHED
            entry.status = fact.status
            entry.finished_version = event.version
            entry.lease = None
            self._dequeue(entry)

    def _dequeue(self, entry: Entry) -> None:
        queue = self.queues.get(entry.client)
        if queue is None:
            return
        if queue and queue[0] == entry.id:
            queue.popleft()
        elif entry.id in queue:
            queue.remove(entry.id)
        if not queue:
            del self.queues[entry.client]

    def snapshot(self) -> bytes:
        return _encode(list(self.entries.values()))

    def restore(self, state: bytes) -> None:
        entries = msgspec.json.decode(state, type=list[Entry])
        self.entries = {e.id: e for e in entries}
        self.queues = {}
        for e in sorted((e for e in entries if e.state != FINISHED), key=lambda e: e.seq):
            self.queues.setdefault(e.client, deque()).append(e.id)


def find(model: ExportsProjection, client: str, export_id: str) -> Entry:
    """The client's own request; anyone else's is as unknown as a missing one."""
    entry = model.get(export_id)
    if entry is None or entry.client != client:
        raise ExportError(404, f"Can't find request with the id of {export_id}")
    return entry


# -- the worker's decisions -----------------------------------------------------------


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    retries: int = 5
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    timeout_seconds: float = 10.0
    lease_grace_seconds: float = 10.0

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based): doubling, capped."""
        return min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** (attempt - 1))

    def lease_seconds(self) -> float:
        return self.timeout_seconds + self.lease_grace_seconds


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one delivery attempt came to.

    `status` and `body` when the receiver answered; otherwise `failure` is `connect`,
    `timeout` or `refused` and `detail` says more.
    """

    status: int | None = None
    body: str = ""
    failure: str = ""
    detail: str = ""

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status >= 500
        return self.failure in ("connect", "timeout")

    def describe(self) -> str:
        if self.status is not None:
            return f"the receiver answered {self.status}"
        return self.detail or self.failure


def decide_claim(entry: Entry, node: str, now: int, policy: RetryPolicy) -> ExportClaimed | ExportFinished | None:
    """The next step for a request this node wants to send now.

    None while another node's lease runs or this node's retry time has not come;
    `ExportFinished` when the attempts are used up (a crashed holder's attempt counts);
    otherwise the claim for the next attempt.
    """
    if entry.state == FINISHED or not claimable(entry.lease, node, now):
        return None
    if entry.lease is not None and entry.lease.node == node and now < entry.retry_at:
        return None
    if entry.attempt >= policy.max_attempts:
        return _give_up(entry, now)
    return ExportClaimed(node=node, attempt=entry.attempt + 1, lease_until=lease_until(now, policy.lease_seconds()))


def _give_up(entry: Entry, now: int) -> ExportFinished:
    if entry.retry_at and entry.last_reason:  # the last attempt failed and was recorded
        reason = entry.last_reason
        status = entry.last_status or STATUS_UNREACHABLE
    else:  # the holder of the last attempt vanished while sending
        node = entry.lease.node if entry.lease else "?"
        reason = f"node {node} stopped during attempt {entry.attempt} and its lease expired"
        status = STATUS_TIMED_OUT
    body = f"export failed after {entry.attempt} attempts: {reason}"
    return ExportFinished(status=status, body=body, attempts=entry.attempt, error=reason)


def decide_outcome(
    attempt: int, outcome: Outcome, now: int, policy: RetryPolicy, uri: str = ""
) -> ExportAttemptFailed | ExportFinished:
    """Record attempt `attempt`: finished, or failed and to be retried after a backoff."""
    if outcome.retryable and attempt < policy.max_attempts:
        retry_at = now + int(policy.backoff(attempt) * 1_000_000)
        return ExportAttemptFailed(
            attempt=attempt,
            reason=outcome.describe(),
            retry_at=retry_at,
            lease_until=lease_until(retry_at, policy.lease_grace_seconds),
            status=outcome.status,
        )
    if outcome.status is not None:
        return ExportFinished(status=outcome.status, body=outcome.body, attempts=attempt)
    if outcome.failure == "timeout":
        status = STATUS_TIMED_OUT
        reason = f"{uri or 'the receiver'} did not answer within {policy.timeout_seconds:g}s"
    elif outcome.failure == "refused":
        status = STATUS_UNREACHABLE
        reason = f"destination refused: {outcome.detail}"
    else:
        status = STATUS_UNREACHABLE
        reason = f"cannot reach {uri or 'the receiver'}: {outcome.detail or outcome.failure}"
    times = "1 attempt" if attempt == 1 else f"{attempt} attempts"
    return ExportFinished(status=status, body=f"export failed after {times}: {reason}", attempts=attempt, error=reason)


def interrupted(attempt: int, node: str, now: int) -> ExportAttemptFailed:
    """A node shutting down mid-send gives its claim back at once (the attempt counts)."""
    return ExportAttemptFailed(
        attempt=attempt, reason=f"node {node} shut down during the attempt", retry_at=now, lease_until=now
    )


# -- rendering ------------------------------------------------------------------------


def render(entry: Entry, finished: ExportFinished | None = None) -> dict[str, object]:
    """`{id, state, ext_response}`: `ext_response` is `{status, body}` once Finished, else `{}`."""
    ext: dict[str, object] = {}
    if entry.state == FINISHED:
        ext = {"status": entry.status, "body": finished.body if finished is not None else ""}
    return {"id": entry.id, "state": entry.state, "ext_response": ext}

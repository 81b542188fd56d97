"""The exports facet's pure parts: request decisions, the fold, retries and claims."""

from __future__ import annotations

import msgspec
import pytest

from eventhub.claims import Lease
from eventhub.events import Event, fact_event
from projections import exports as model
from projections.exports import (
    ExportAttemptFailed,
    ExportBody,
    ExportClaimed,
    ExportError,
    ExportFinished,
    ExportRequested,
    ExportsProjection,
    Outcome,
    RetryPolicy,
)

NOW = 1_700_000_000_000_000
POLICY = RetryPolicy(retries=2, backoff_seconds=1.0, backoff_max_seconds=3.0, timeout_seconds=5.0, lease_grace_seconds=2.0)


class _Log:
    """Committed events for the fold, numbered like the store would number them."""

    def __init__(self) -> None:
        self.position = 0
        self.versions: dict[str, int] = {}

    def event(self, export_id: str, fact: model.ExportEvent) -> Event:
        stream = model.stream_of(export_id)
        self.position += 1
        version = self.versions[stream] = self.versions.get(stream, -1) + 1
        new = fact_event(fact)
        return Event(self.position, stream, version, new.type, new.data, new.meta, NOW, b"", b"", b"")


def _requested(export_id: str, client: str = "alice") -> ExportRequested:
    return ExportRequested(id=export_id, client=client, uri="http://127.0.0.1:9/", data='{"a": 1}')


def _head(projection: ExportsProjection, client: str) -> str | None:
    entry = projection.head_of(client)
    return entry.id if entry is not None else None


def _fold(projection: ExportsProjection, events: list[Event]) -> None:
    for e in events:
        projection.apply(e)


# -- requests -------------------------------------------------------------------------


def test_decode_body_reports_malformed_json_and_wrong_types() -> None:
    with pytest.raises(ExportError) as bad_json:
        model.decode_body(b"{not json")
    assert bad_json.value.status == 400 and "not valid JSON" in bad_json.value.message
    with pytest.raises(ExportError) as wrong_type:
        model.decode_body(b'{"id": 5, "uri": "http://x/", "data": "{}"}')
    assert wrong_type.value.status == 400 and "id" in wrong_type.value.message
    with pytest.raises(ExportError) as missing:
        model.decode_body(b'{"id": ""}')
    assert "uri" in missing.value.message


def test_new_request_needs_data_holding_json() -> None:
    ok = model.new_request("alice", ExportBody(id="", uri="http://x/", data='[1, {"b": null}]'))
    assert ok.client == "alice" and ok.data == '[1, {"b": null}]' and len(ok.id) == 36
    for data in (None, "", "{oops", "not json"):
        with pytest.raises(ExportError) as exc:
            model.new_request("alice", ExportBody(id="", uri="http://x/", data=data))
        assert exc.value.status == 400 and "data" in exc.value.message
    with pytest.raises(ExportError):
        model.new_request("alice", ExportBody(id="", uri="", data="{}"))


def test_find_hides_other_clients_requests() -> None:
    p = ExportsProjection()
    log = _Log()
    _fold(p, [log.event("r1", _requested("r1", "alice"))])
    assert model.find(p, "alice", "r1").id == "r1"
    with pytest.raises(ExportError) as theirs:
        model.find(p, "bob", "r1")
    with pytest.raises(ExportError) as unknown:
        model.find(p, "bob", "r2")
    assert theirs.value.status == unknown.value.status == 404
    assert theirs.value.message == "Can't find request with the id of r1"


# -- the fold -------------------------------------------------------------------------


def test_fold_tracks_states_and_per_client_fifo() -> None:
    p = ExportsProjection()
    log = _Log()
    _fold(p, [log.event(i, _requested(i, c)) for i, c in (("a1", "alice"), ("b1", "bob"), ("a2", "alice"))])
    assert [_head(p, "alice"), _head(p, "bob")] == ["a1", "b1"]
    assert list(p.queues["alice"]) == ["a1", "a2"]

    _fold(p, [log.event("a1", ExportClaimed(node="n1", attempt=1, lease_until=NOW + 10))])
    a1 = p.get("a1")
    assert a1 is not None and a1.state == model.PROCESSING and a1.lease == Lease("n1", NOW + 10) and a1.version == 1

    _fold(p, [log.event("a1", ExportAttemptFailed(attempt=1, reason="503", retry_at=NOW + 5, lease_until=NOW + 7, status=503))])
    assert a1.state == model.PROCESSING and a1.retry_at == NOW + 5 and a1.lease == Lease("n1", NOW + 7)

    _fold(p, [log.event("a1", ExportFinished(status=200, body="ok", attempts=2))])
    assert a1.state == model.FINISHED and a1.status == 200 and a1.finished_version == 3 and a1.lease is None
    assert _head(p, "alice") == "a2"
    assert model.render(a1, ExportFinished(status=200, body="ok", attempts=2)) == {
        "id": "a1", "state": "Finished", "ext_response": {"status": 200, "body": "ok"},
    }
    assert model.render(model.find(p, "alice", "a2")) == {"id": "a2", "state": "Pending", "ext_response": {}}

    _fold(p, [log.event("b1", ExportFinished(status=500, body="", attempts=1))])
    assert p.head_of("bob") is None and "bob" not in p.queues


def test_snapshot_restores_entries_and_queues() -> None:
    p = ExportsProjection()
    log = _Log()
    _fold(p, [log.event(i, _requested(i, c)) for i, c in (("a1", "alice"), ("a2", "alice"), ("b1", "bob"))])
    _fold(p, [log.event("a1", ExportClaimed(node="n1", attempt=1, lease_until=NOW)),
              log.event("a1", ExportFinished(status=204, body="", attempts=1))])
    q = ExportsProjection()
    q.restore(p.snapshot())
    assert q.entries == p.entries
    assert {c: list(v) for c, v in q.queues.items()} == {"alice": ["a2"], "bob": ["b1"]}


# -- retries and claims ---------------------------------------------------------------


def _entry(**fields: object) -> model.Entry:
    return msgspec.structs.replace(model.Entry(id="x", client="alice", seq=1), **fields)


def test_backoff_doubles_and_is_capped() -> None:
    assert [POLICY.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]


def test_decide_claim_free_own_foreign_and_expired() -> None:
    claim = model.decide_claim(_entry(), "n1", NOW, POLICY)
    assert claim == ExportClaimed(node="n1", attempt=1, lease_until=NOW + 7_000_000)
    held = _entry(state=model.PROCESSING, attempt=1, lease=Lease("n2", NOW + 1))
    assert model.decide_claim(held, "n1", NOW, POLICY) is None
    taken = model.decide_claim(held, "n1", NOW + 1, POLICY)
    assert isinstance(taken, ExportClaimed) and taken.attempt == 2
    waiting = _entry(state=model.PROCESSING, attempt=1, lease=Lease("n1", NOW + 9), retry_at=NOW + 5)
    assert model.decide_claim(waiting, "n1", NOW + 4, POLICY) is None
    assert model.decide_claim(waiting, "n1", NOW + 5, POLICY) is not None
    assert model.decide_claim(_entry(state=model.FINISHED), "n1", NOW, POLICY) is None


def test_decide_claim_gives_up_when_a_crashed_holder_used_the_last_attempt() -> None:
    crashed = _entry(state=model.PROCESSING, attempt=3, lease=Lease("dead", NOW))
    done = model.decide_claim(crashed, "n1", NOW, POLICY)
    assert isinstance(done, ExportFinished) and done.status == 504 and done.attempts == 3
    assert "dead" in done.body and "lease expired" in done.body


def test_decide_outcome_retries_then_records_why() -> None:
    fail = model.decide_outcome(1, Outcome(status=503, body="busy"), NOW, POLICY)
    assert fail == ExportAttemptFailed(
        attempt=1, reason="the receiver answered 503", retry_at=NOW + 1_000_000, lease_until=NOW + 3_000_000, status=503
    )
    last = model.decide_outcome(3, Outcome(status=503, body="busy"), NOW, POLICY)
    assert last == ExportFinished(status=503, body="busy", attempts=3)
    timeout = model.decide_outcome(3, Outcome(failure="timeout"), NOW, POLICY, "http://r/")
    assert isinstance(timeout, ExportFinished) and timeout.status == 504 and "did not answer within 5s" in timeout.body
    refused = model.decide_outcome(1, Outcome(failure="connect", detail="connection refused"), NOW, POLICY)
    assert isinstance(refused, ExportAttemptFailed)
    down = model.decide_outcome(3, Outcome(failure="connect", detail="connection refused"), NOW, POLICY, "http://r/")
    assert isinstance(down, ExportFinished) and down.status == 502 and "after 3 attempts" in down.body
    guard = model.decide_outcome(1, Outcome(failure="refused", detail="169.254.169.254 is a cloud metadata address"), NOW, POLICY)
    assert isinstance(guard, ExportFinished) and guard.status == 502 and "metadata" in guard.body
    for status in (200, 302, 404):
        assert model.decide_outcome(1, Outcome(status=status, body="b"), NOW, POLICY) == ExportFinished(
            status=status, body="b", attempts=1
        )

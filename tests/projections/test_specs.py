"""Specs decisions and read model: validation, planning, the state rules, schedules, claims."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from eventhub.claims import Lease
from eventhub.events import Event, fact_event
from projections.specs import (
    FAILED,
    INPROGRESS,
    QUEUED,
    SUCCEEDED,
    DatasetState,
    Fact,
    PipelineDispatchAttempted,
    PipelineEventRecorded,
    PipelineState,
    PipelineUpdate,
    RevisionState,
    RevisionUploaded,
    SpecError,
    SpecsProjection,
    dataset_of_pipeline,
    decide_claim,
    decide_dispatch_attempt,
    decide_pipeline_event,
    decide_scheduled_run,
    decide_upload,
    flow_state,
    next_due,
    parse_schedule,
    validate_spec,
)

S = 1_000_000
NOW = 1_700_000_000 * S


def spec(**extra: Any) -> dict[str, Any]:
    return {
        "meta": {"ownerid": "me", "owner": "Me", "dataset": "id", "findability": "published"},
        "inputs": [{"kind": "datapackage", "url": "http://example.com/datapackage.json", "parameters": {}}],
        "outputs": [{"kind": "csv"}, {"kind": "json"}],
        **extra,
    }


class Folder:
    """A projection fed committed-looking events, one stream version after another."""

    def __init__(self) -> None:
        self.p = SpecsProjection()
        self.position = 0
        self.versions: dict[str, int] = {}

    def feed(self, facts: list[Fact], at: int = NOW) -> None:
        for fact in facts:
            dataset_id = fact.dataset_id if isinstance(fact, RevisionUploaded) else fact.flow_id.rsplit("/", 1)[0]
            stream = f"spec:{dataset_id}"
            self.position += 1
            self.versions[stream] = self.versions.get(stream, -1) + 1
            ne = fact_event(fact)
            self.p.apply(Event(self.position, stream, self.versions[stream], ne.type, ne.data, ne.meta, at, b"", b"", b""))

    def ds(self, dataset_id: str = "me/id") -> DatasetState:
        return self.p.datasets[dataset_id]

    def upload(self, raw: dict[str, Any] | None = None, at: int = NOW) -> RevisionUploaded:
        raw = raw or spec()
        valid, errors = validate_spec(raw)
        assert valid is not None, errors
        facts = decide_upload(self.p.datasets.get(valid.dataset_id), valid, raw, "me", at)
        self.feed(facts, at)
        assert isinstance(facts[0], RevisionUploaded)
        return facts[0]

    def event(self, pipeline: str, event: str, success: bool | None = None, **kw: Any) -> list[Fact]:
        update = PipelineUpdate(event=event, pipeline=pipeline, success=success, **kw)  # type: ignore[arg-type]
        facts = decide_pipeline_event(self.p.datasets.get(dataset_of_pipeline(update.pipeline_name) or ""), update)
        self.feed(facts)
        return facts


# -- validation -----------------------------------------------------------------------------


def test_a_valid_spec_gives_its_facts() -> None:
    valid, errors = validate_spec(spec(schedule="every 2h"))
    assert errors == [] and valid is not None
    assert (valid.dataset_id, valid.schedule_seconds, [o.kind for o in valid.outputs]) == ("me/id", 7200, ["csv", "json"])


def test_every_problem_is_listed() -> None:
    raw = {"meta": {"ownerid": 7, "dataset": "a/b", "owner": []}, "inputs": [{"url": 1}], "outputs": "csv", "schedule": "every 30s"}
    valid, errors = validate_spec(raw)
    assert valid is None
    assert errors == [
        "meta.ownerid: must be a string",
        "meta.dataset: must be 1-200 characters without '/', spaces or control characters",
        "meta.owner: must be a string",
        "inputs[0]: Expected `str | null`, got `int` - at `inputs[0].url`",
        "outputs: must be a list of objects",
        "schedule: can't schedule tasks for less than one minute",
    ]


@pytest.mark.parametrize(
    "raw, error",
    [
        ([], "the spec must be a JSON object"),
        ({"inputs": [{"kind": "x"}]}, "meta: required, an object with ownerid and dataset"),
        ({"meta": "x", "inputs": [{"kind": "x"}]}, "meta: must be an object"),
        ({"meta": {"ownerid": "me"}, "inputs": [{"kind": "x"}]}, "meta.dataset: required"),
        ({"meta": {"ownerid": "me", "dataset": "d"}}, "inputs: required, a non-empty list"),
        ({"meta": {"ownerid": "me", "dataset": "d"}, "inputs": []}, "inputs: must be a non-empty list of objects"),
        ({"meta": {"ownerid": "me", "dataset": ".."}, "inputs": [{"kind": "x"}]}, "meta.dataset: must be 1-200 characters without '/', spaces or control characters"),
        ({"meta": {"ownerid": "me", "dataset": "d"}, "inputs": [{"kind": 1}]}, "inputs[0]: Expected `str`, got `int` - at `inputs[0].kind`"),
    ],
)
def test_single_problems(raw: Any, error: str) -> None:
    assert validate_spec(raw) == (None, [error])


@pytest.mark.parametrize(
    "value, result",
    [
        (None, (None, [])),
        ("every 60s", (60, [])),
        ("every 1m", (60, [])),
        ("  every 3d ", (3 * 86400, [])),
        ("every 1w", (7 * 86400, [])),
        ("every 59s", (None, ["schedule: can't schedule tasks for less than one minute"])),
        ("every 0m", (None, ["schedule: can't schedule tasks for less than one minute"])),
        ("every 5x", (None, ["schedule: bad time unit, only s/m/h/d/w are allowed"])),
        ("every -5m", (None, ["schedule: '-5' is not a whole number"])),
        ("daily", (None, ["schedule: must start with 'every' (like 'every 1d')"])),
        (5, (None, ["schedule: must be a string like 'every 1d'"])),
    ],
)
def test_parse_schedule(value: Any, result: tuple[int | None, list[str]]) -> None:
    assert parse_schedule(value) == result


# -- planning and the state rules -----------------------------------------------------------


def test_upload_plans_the_original_and_one_pipeline_per_output() -> None:
    f = Folder()
    first = f.upload()
    assert first.flow_id == "me/id/1" and first.revision == 1
    assert [(p.id, p.kind, p.dependencies) for p in first.pipelines] == [
        ("me/id/1/0", "original", []),
        ("me/id/1/1", "csv", ["me/id/1/0"]),
        ("me/id/1/2", "json", ["me/id/1/0"]),
    ]
    assert f.upload().flow_id == "me/id/2"
    assert [r.state for r in f.ds().revisions] == [QUEUED, QUEUED]


@pytest.mark.parametrize(
    "statuses, state",
    [
        ([QUEUED, QUEUED], QUEUED),
        ([INPROGRESS, QUEUED], INPROGRESS),
        ([INPROGRESS, SUCCEEDED], INPROGRESS),
        ([INPROGRESS, FAILED], INPROGRESS),
        ([SUCCEEDED, QUEUED], INPROGRESS),
        ([FAILED, QUEUED], INPROGRESS),
        ([SUCCEEDED, SUCCEEDED], SUCCEEDED),
        ([SUCCEEDED, FAILED], FAILED),
        ([FAILED, FAILED], FAILED),
    ],
)
def test_flow_state_rules(statuses: list[str], state: str) -> None:
    assert flow_state(statuses) == state


def test_a_failure_fails_queued_dependants_transitively() -> None:
    rev = RevisionState(1, "me/id/1", NOW, NOW, 0, "upload", {
        "me/id/1/0": PipelineState("me/id/1/0", "a", "original", []),
        "me/id/1/1": PipelineState("me/id/1/1", "b", "csv", ["me/id/1/0"]),
        "me/id/1/2": PipelineState("me/id/1/2", "c", "zip", ["me/id/1/1"]),
        "me/id/1/3": PipelineState("me/id/1/3", "d", "json", ["me/id/1/0"], status=INPROGRESS),
    })
    ds = DatasetState("me/id", "me", "id", NOW, 0, [rev])
    facts = decide_pipeline_event(ds, PipelineUpdate(event="finish", pipeline="me/id/1/0", success=False, errors=["boom"]))
    assert [(f.pipeline, f.status, f.cause) for f in facts if isinstance(f, PipelineEventRecorded)] == [
        ("me/id/1/0", FAILED, None),
        ("me/id/1/1", FAILED, "me/id/1/0"),
        ("me/id/1/2", FAILED, "me/id/1/1"),
    ]  # the running one is left to finish on its own


def test_events_fold_into_pipeline_and_revision_state() -> None:
    f = Folder()
    f.upload()
    f.event("me/id/1/0", "start")
    assert f.ds().revisions[0].state == INPROGRESS
    f.event("./me/id/1/0", "finish", True, stats={"count_of_rows": 3})
    rev = f.ds().revisions[0]
    assert (rev.state, rev.stats, rev.pipelines["me/id/1/0"].status) == (INPROGRESS, {"count_of_rows": 3}, SUCCEEDED)
    f.event("me/id/1/1", "finish", False, errors=["bad csv"])
    f.event("me/id/1/2", "finish", True)
    assert f.ds().revisions[0].state == FAILED
    assert f.ds().revision("successful") is None


@pytest.mark.parametrize(
    "pipeline, event, success, status, message",
    [
        ("me/id/9/0", "start", None, 404, "pipeline not found: me/id/9/0"),
        ("me/id/1/7", "start", None, 404, "pipeline not found: me/id/1/7"),
        ("me/id/1/0", "finish", None, 400, "success: required (true or false) with a finish event"),
        ("", "start", None, 400, "pipeline: required (the pipeline id)"),
    ],
)
def test_refused_events(pipeline: str, event: str, success: bool | None, status: int, message: str) -> None:
    f = Folder()
    f.upload()
    with pytest.raises(SpecError) as err:
        f.event(pipeline, event, success)
    assert (err.value.status, err.value.errors) == (status, [message])


def test_events_after_the_pipeline_or_revision_finished_are_refused() -> None:
    f = Folder()
    f.upload()
    f.event("me/id/1/1", "finish", True)
    with pytest.raises(SpecError) as err:
        f.event("me/id/1/1", "progress")
    assert err.value.status == 409 and "pipeline me/id/1/1 already finished (SUCCEEDED)" in err.value.errors[0]
    f.event("me/id/1/0", "finish", False)  # fails /2 too: the revision is done
    with pytest.raises(SpecError) as err:
        f.event("me/id/1/2", "start")
    assert err.value.errors == ["revision me/id/1 already finished (FAILED); event refused"] and err.value.flow_id == "me/id/1"


# -- schedules ------------------------------------------------------------------------------


def test_next_due_keeps_alignment_and_skips_missed_runs() -> None:
    assert next_due(None, 60, None, NOW) == NOW + 60 * S
    assert next_due(NOW + 10 * S, 60, 60, NOW) == NOW + 10 * S
    assert next_due(NOW - 10 * S, 60, 60, NOW) == NOW + 50 * S
    assert next_due(NOW - 600 * S, 60, 60, NOW) == NOW + 60 * S
    assert next_due(NOW + 10 * S, 120, 60, NOW) == NOW + 120 * S  # a new period starts afresh
    assert next_due(NOW + 10 * S, None, 60, NOW) is None


def test_scheduled_run_re_runs_the_latest_spec_when_due() -> None:
    f = Folder()
    raw = spec(schedule="every 1m")
    f.upload(raw)
    ds = f.ds()
    assert ds.next_due == NOW + 60 * S
    assert decide_scheduled_run(ds, 0, raw, NOW + 59 * S) == []
    assert decide_scheduled_run(ds, 5, raw, NOW + 60 * S) == []  # not the latest spec's version
    (run,) = decide_scheduled_run(ds, 0, raw, NOW + 60 * S)
    assert isinstance(run, RevisionUploaded)
    assert (run.flow_id, run.trigger, run.actor, run.next_due) == ("me/id/2", "schedule", None, NOW + 120 * S)
    f.upload(spec())  # no schedule any more
    assert f.ds().next_due is None and f.p.due(NOW + 10**9) == []


# -- dispatch claims ------------------------------------------------------------------------


def test_claims_and_dispatch_attempts() -> None:
    f = Folder()
    f.upload()
    assert f.p.dispatch_todo(NOW) == [("me/id", 1)]
    (claim,) = decide_claim(f.ds(), 1, "node-a", NOW, 10)
    f.feed([claim])
    assert f.p.dispatch_todo(NOW) == [] and f.p.next_claim_expiry(NOW) == NOW + 10 * S
    assert decide_claim(f.ds(), 1, "node-b", NOW + 9 * S, 10) == []
    assert decide_claim(f.ds(), 1, "node-b", NOW + 10 * S, 10) != []  # the lease ran out: taken over
    ok = PipelineDispatchAttempted(flow_id="me/id/1", pipeline="me/id/1/1", attempt=1, ok=True)
    f.feed(decide_dispatch_attempt(f.ds(), ok))
    retry = PipelineDispatchAttempted(flow_id="me/id/1", pipeline="me/id/1/0", attempt=1, ok=False, error="HTTP 500", retry_at=NOW)
    assert decide_dispatch_attempt(f.ds(), retry) == [retry]
    last = PipelineDispatchAttempted(flow_id="me/id/1", pipeline="me/id/1/0", attempt=2, ok=False, error="HTTP 500")
    facts = decide_dispatch_attempt(f.ds(), last)
    f.feed(facts)
    rev = f.ds().revisions[0]
    assert {p: s.status for p, s in rev.pipelines.items()} == {"me/id/1/0": FAILED, "me/id/1/1": FAILED, "me/id/1/2": FAILED}
    assert rev.pipelines["me/id/1/0"].dispatch == "failed" and rev.pipelines["me/id/1/1"].dispatch == "ok"
    assert rev.claim == Lease("node-a", NOW + 10 * S)


def test_snapshot_round_trip() -> None:
    f = Folder()
    f.upload(spec(schedule="every 1h"))
    f.event("me/id/1/0", "start", log=["line"])
    restored = SpecsProjection()
    restored.restore(f.p.snapshot())
    assert msgspec.to_builtins(restored.datasets) == msgspec.to_builtins(f.p.datasets)
    assert restored.datasets["me/id"].revisions[0].detail_versions == [1]
    assert restored.scheduled == {"me/id": NOW + 3600 * S} and restored.dispatch_todo(NOW) == [("me/id", 1)]

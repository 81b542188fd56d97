"""Specs: the DataHQ spec store's facts, its read model, and the pure decisions over them.

One stream per dataset, `spec:<ownerid>/<dataset>`. Each upload (or scheduled re-run)
appends `RevisionUploaded` with revision n = last + 1 and the pipelines planned for it;
`/source/update` calls and the DPP dispatcher append `PipelineEventRecorded`. A revision's
state is derived from its pipelines' states by the original service's rules
(`flow_state`). Spec contents, logs and error lines stay in the log; the read model keeps
states, stats, schedules and the stream versions where the details are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import msgspec

from eventhub.claims import Lease, claimable, lease_until
from eventhub.events import Event, FactCodec
from eventhub.projection import Projection

QUEUED: Final = "QUEUED"
INPROGRESS: Final = "INPROGRESS"
SUCCEEDED: Final = "SUCCEEDED"
FAILED: Final = "FAILED"
FINISHED: Final = frozenset({SUCCEEDED, FAILED})
STREAM_PREFIX: Final = "spec:"
MIN_SCHEDULE_SECONDS: Final = 60
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# ids go into URLs and pipeline ids: no slash, no whitespace, no control characters
_ID = re.compile(r"[^/\s\x00-\x1f\x7f]{1,200}")

PipelineEvent = Literal["queue", "start", "progress", "finish"]


class SpecError(Exception):
    """The facet's one error: an HTTP status and every problem, in words."""

    def __init__(self, status: int, errors: list[str], flow_id: str | None = None) -> None:
        super().__init__("; ".join(errors))
        self.status = status
        self.errors = errors
        self.flow_id = flow_id


# -- the flow spec ------------------------------------------------------------------------


class FlowInput(msgspec.Struct):
    kind: str
    url: str | None = None
    parameters: dict[str, Any] = {}


class FlowOutput(msgspec.Struct):
    kind: str
    parameters: dict[str, Any] = {}


class FlowSpec(msgspec.Struct):
    """What eventhub needs from a valid spec; the spec itself is kept as uploaded."""

    ownerid: str
    dataset: str
    inputs: list[FlowInput]
    outputs: list[FlowOutput]
    schedule_seconds: int | None

    @property
    def dataset_id(self) -> str:
        return f"{self.ownerid}/{self.dataset}"


def owner_of(raw: Any) -> str | None:
    """`meta.ownerid` when the spec has a usable one."""
    meta = raw.get("meta") if isinstance(raw, dict) else None
    owner = meta.get("ownerid") if isinstance(meta, dict) else None
    return owner if isinstance(owner, str) and _ID.fullmatch(owner) else None


def validate_spec(raw: Any) -> tuple[FlowSpec | None, list[str]]:
    """The spec's facts, or every problem with it (then the spec is None)."""
    if not isinstance(raw, dict):
        return None, ["the spec must be a JSON object"]
    errors: list[str] = []
    meta = raw.get("meta")
    ids: dict[str, str] = {}
    if not isinstance(meta, dict):
        errors.append("meta: required, an object with ownerid and dataset" if meta is None else "meta: must be an object")
    else:
        for field in ("ownerid", "dataset"):
            value = meta.get(field)
            if value is None:
                errors.append(f"meta.{field}: required")
            elif not isinstance(value, str):
                errors.append(f"meta.{field}: must be a string")
            elif not _ID.fullmatch(value) or value in (".", ".."):
                errors.append(f"meta.{field}: must be 1-200 characters without '/', spaces or control characters")
            else:
                ids[field] = value
        for field in ("owner", "findability"):
            if field in meta and not isinstance(meta[field], str):
                errors.append(f"meta.{field}: must be a string")
    inputs = _items(raw, "inputs", FlowInput, errors, required=True)
    outputs = _items(raw, "outputs", FlowOutput, errors, required=False)
    seconds, schedule_errors = parse_schedule(raw.get("schedule"))
    errors.extend(schedule_errors)
    if errors:
        return None, errors
    return FlowSpec(ids["ownerid"], ids["dataset"], inputs, outputs, seconds), []


def _items(raw: dict[str, Any], field: str, kind: type[Any], errors: list[str], *, required: bool) -> list[Any]:
    value = raw.get(field)
    if value is None:
        if required:
            errors.append(f"{field}: required, a non-empty list")
        return []
    if not isinstance(value, list) or (required and not value):
        errors.append(f"{field}: must be a {'non-empty ' if required else ''}list of objects")
        return []
    out = []
    for i, item in enumerate(value):
        try:
            out.append(msgspec.convert(item, kind))
        except msgspec.ValidationError as exc:
            errors.append(f"{field}[{i}]: " + str(exc).replace("`$", f"`{field}[{i}]"))
    return out


def parse_schedule(value: Any) -> tuple[int | None, list[str]]:
    """`every N{s,m,h,d,w}` as seconds; None when there is no schedule."""
    if value is None:
        return None, []
    if not isinstance(value, str):
        return None, ["schedule: must be a string like 'every 1d'"]
    text = value.strip()
    if not text.startswith("every "):
        return None, ["schedule: must start with 'every' (like 'every 1d')"]
    text = text[len("every ") :].strip()
    multiplier = _UNITS.get(text[-1:])
    if multiplier is None:
        return None, ["schedule: bad time unit, only s/m/h/d/w are allowed"]
    if not text[:-1].isdigit():
        return None, [f"schedule: {text[:-1]!r} is not a whole number"]
    seconds = int(text[:-1]) * multiplier
    if seconds < MIN_SCHEDULE_SECONDS:
        return None, ["schedule: can't schedule tasks for less than one minute"]
    return seconds, []


# -- facts ----------------------------------------------------------------------------------


class PlannedPipeline(msgspec.Struct, frozen=True):
    id: str
    title: str
    kind: str
    dependencies: list[str] = []
    output: dict[str, Any] | None = None


class RevisionUploaded(msgspec.Struct, frozen=True, kw_only=True):
    """Revision `revision` of a dataset, with its spec and planned pipelines."""

    dataset_id: str
    ownerid: str
    dataset: str
    revision: int
    flow_id: str
    spec: dict[str, Any]
    pipelines: list[PlannedPipeline]
    trigger: Literal["upload", "schedule"] = "upload"
    actor: str | None = None
    schedule_seconds: int | None = None
    next_due: int | None = None


class PipelineEventRecorded(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's event, and the status it left the pipeline in.

    `cause` names the failed dependency when this event is a dependant failed by it.
    """

    flow_id: str
    pipeline: str
    event: PipelineEvent
    status: str
    success: bool | None = None
    errors: list[Any] = []
    log: list[Any] = []
    stats: dict[str, Any] = {}
    cause: str | None = None


class DispatchClaimed(msgspec.Struct, frozen=True):
    """Node `node` took the revision's pipelines to hand them to DPP, until `until` (micros)."""

    flow_id: str
    node: str
    until: int


class PipelineDispatchAttempted(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt to hand a pipeline to DPP; `retry_at` None on a failure means it gave up."""

    flow_id: str
    pipeline: str
    attempt: int
    ok: bool
    error: str | None = None
    retry_at: int | None = None


Fact = RevisionUploaded | PipelineEventRecorded | DispatchClaimed | PipelineDispatchAttempted
FACTS: Final = FactCodec(RevisionUploaded, PipelineEventRecorded, DispatchClaimed, PipelineDispatchAttempted)


def decode_fact(event: Event) -> Fact | None:
    return FACTS.decode(event)  # type: ignore[return-value]


def stream_of(dataset_id: str) -> str:
    return STREAM_PREFIX + dataset_id


# -- the read model -------------------------------------------------------------------------


class PipelineState(msgspec.Struct):
    id: str
    title: str
    kind: str
    dependencies: list[str]
    status: str = QUEUED
    stats: dict[str, Any] = {}
    dispatch: str = ""  # "" not yet handed to DPP, "ok", "failed"


class RevisionState(msgspec.Struct):
    revision: int
    flow_id: str
    created_at: int
    modified: int
    upload_version: int
    trigger: str
    pipelines: dict[str, PipelineState]
    state: str = QUEUED
    stats: dict[str, Any] = {}
    detail_versions: list[int] = []  # stream versions of this revision's logs and errors
    claim: Lease | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def needs_dispatch(self) -> bool:
        return not self.finished and any(p.dispatch == "" and p.status not in FINISHED for p in self.pipelines.values())


class DatasetState(msgspec.Struct):
    dataset_id: str
    ownerid: str
    dataset: str
    created_at: int
    version: int = -1
    revisions: list[RevisionState] = []
    schedule_seconds: int | None = None
    next_due: int | None = None

    def revision(self, selector: str) -> RevisionState | None:
        """By number, `latest`, or `successful` (the latest that succeeded)."""
        if selector == "latest":
            return self.revisions[-1] if self.revisions else None
        if selector == "successful":
            return next((r for r in reversed(self.revisions) if r.state == SUCCEEDED), None)
        if not selector.isascii() or not selector.isdigit():
            return None
        n = int(selector)
        return self.revisions[n - 1] if 1 <= n <= len(self.revisions) else None


def flow_state(statuses: Iterable[str]) -> str:
    """The original rules: running → INPROGRESS; pending with some done → INPROGRESS;
    all pending → QUEUED; all done → FAILED if any failed, else SUCCEEDED."""
    seen = set(statuses)
    if INPROGRESS in seen:
        return INPROGRESS
    if QUEUED in seen:
        return INPROGRESS if seen & FINISHED else QUEUED
    return FAILED if FAILED in seen else SUCCEEDED


class SpecsProjection(Projection):
    """Datasets, their revisions and pipeline states, schedules and DPP dispatch state.

    Two indexes keep the workers' questions cheap: `scheduled` (dataset → next due) and
    the revisions that still need handing to DPP.
    """

    name = "specs"
    version = 1
    prefixes = (STREAM_PREFIX,)

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, DatasetState] = {}
        self.scheduled: dict[str, int] = {}
        self._undispatched: set[tuple[str, int]] = set()
        self.listeners: list[Callable[[str], None]] = []

    def apply(self, event: Event) -> None:
        dataset_id = event.stream[len(STREAM_PREFIX) :]
        ds = self.datasets.get(dataset_id)
        if ds is not None:
            ds.version = event.version  # first: the stream version must track even a bad event
        fact = decode_fact(event)
        if isinstance(fact, RevisionUploaded):
            if ds is None:
                ds = self.datasets[dataset_id] = DatasetState(dataset_id, fact.ownerid, fact.dataset, event.recorded_at)
                ds.version = event.version
            pipelines = {p.id: PipelineState(p.id, p.title, p.kind, list(p.dependencies)) for p in fact.pipelines}
            rev = RevisionState(
                fact.revision, fact.flow_id, event.recorded_at, event.recorded_at, event.version, fact.trigger, pipelines
            )
            ds.revisions.append(rev)
            ds.schedule_seconds, ds.next_due = fact.schedule_seconds, fact.next_due
            self._index(ds, rev)
        elif ds is not None and fact is not None:
            found = _revision_of(ds, fact.flow_id)
            if found is None:
                return
            rev = found
            pipeline = rev.pipelines.get(getattr(fact, "pipeline", ""))
            if isinstance(fact, PipelineEventRecorded) and pipeline is not None:
                pipeline.status = fact.status
                if fact.stats:
                    pipeline.stats = rev.stats = fact.stats
                if fact.errors or fact.log:
                    rev.detail_versions.append(event.version)
                rev.state = flow_state(p.status for p in rev.pipelines.values())
                rev.modified = event.recorded_at
            elif isinstance(fact, DispatchClaimed):
                rev.claim = Lease(fact.node, fact.until)
            elif isinstance(fact, PipelineDispatchAttempted) and pipeline is not None:
                if fact.ok or fact.retry_at is None:
                    pipeline.dispatch = "ok" if fact.ok else "failed"
                if fact.error:
                    rev.detail_versions.append(event.version)
            self._index(ds, rev)
        else:
            return
        for listener in self.listeners:
            listener(dataset_id)

    def _index(self, ds: DatasetState, rev: RevisionState) -> None:
        if ds.next_due is None:
            self.scheduled.pop(ds.dataset_id, None)
        else:
            self.scheduled[ds.dataset_id] = ds.next_due
        key = (ds.dataset_id, rev.revision)
        if rev.needs_dispatch:
            self._undispatched.add(key)
        else:
            self._undispatched.discard(key)

    def snapshot(self) -> bytes:
        return msgspec.json.encode(list(self.datasets.values()))

    def restore(self, state: bytes) -> None:
        datasets = msgspec.json.decode(state, type=list[DatasetState])
        self.datasets = {d.dataset_id: d for d in datasets}
        self.scheduled.clear()
        self._undispatched.clear()
        for ds in datasets:
            for rev in ds.revisions:
                self._index(ds, rev)

    # -- queries for the workers ------------------------------------------------------------

    def due(self, now: int) -> list[str]:
        return [dataset_id for dataset_id, due in self.scheduled.items() if due <= now]

    def next_due(self) -> int | None:
        return min(self.scheduled.values(), default=None)

    def dispatch_todo(self, now: int) -> list[tuple[str, int]]:
        """(dataset id, revision) whose pipelines still need handing to DPP, unclaimed now."""
        return sorted(key for key in self._undispatched if not self._claimed(key, now))

    def next_claim_expiry(self, now: int) -> int | None:
        """When the earliest live claim on undispatched work runs out."""
        leases = (self._lease(key) for key in self._undispatched)
        return min((lease.until for lease in leases if lease is not None and lease.active(now)), default=None)

    def _lease(self, key: tuple[str, int]) -> Lease | None:
        return self.datasets[key[0]].revisions[key[1] - 1].claim

    def _claimed(self, key: tuple[str, int], now: int) -> bool:
        lease = self._lease(key)
        return lease is not None and lease.active(now)


def _revision_of(ds: DatasetState, flow_id: str) -> RevisionState | None:
    prefix, _, number = flow_id.rpartition("/")
    if prefix != ds.dataset_id or not number.isdigit():
        return None
    n = int(number)
    return ds.revisions[n - 1] if 1 <= n <= len(ds.revisions) else None


# -- decisions ------------------------------------------------------------------------------


def plan_pipelines(flow_id: str, spec: FlowSpec) -> list[PlannedPipeline]:
    """`{flow_id}/0` processes the original datapackage; `{flow_id}/k` makes output k-1 from it."""
    original = PlannedPipeline(f"{flow_id}/0", "Original datapackage", "original")
    outputs = [
        PlannedPipeline(f"{flow_id}/{k}", f"Creating {o.kind}", o.kind, [original.id], msgspec.to_builtins(o))
        for k, o in enumerate(spec.outputs, start=1)
    ]
    return [original, *outputs]


def next_due(previous: int | None, period: int | None, previous_period: int | None, now: int) -> int | None:
    """When a schedule next comes due after `now` (micros): keeps the old alignment when
    the period is unchanged, skips runs missed while nobody was watching."""
    if period is None:
        return None
    step = period * 1_000_000
    if previous is None or previous_period != period:
        return now + step
    if previous > now:
        return previous
    return previous + ((now - previous) // step + 1) * step


def decide_upload(ds: DatasetState | None, spec: FlowSpec, raw: dict[str, Any], actor: str, now: int) -> list[Fact]:
    """A new revision: latest + 1, its pipelines planned, its schedule set (or cleared)."""
    n = len(ds.revisions) + 1 if ds is not None else 1
    flow_id = f"{spec.dataset_id}/{n}"
    due = next_due(
        ds.next_due if ds else None, spec.schedule_seconds, ds.schedule_seconds if ds else None, now
    )
    return [
        RevisionUploaded(
            dataset_id=spec.dataset_id, ownerid=spec.ownerid, dataset=spec.dataset, revision=n, flow_id=flow_id,
            spec=raw, pipelines=plan_pipelines(flow_id, spec), trigger="upload", actor=actor,
            schedule_seconds=spec.schedule_seconds, next_due=due,
        )
    ]


def decide_scheduled_run(ds: DatasetState | None, upload_version: int, raw: dict[str, Any], now: int) -> list[Fact]:
    """Re-run the latest spec when its schedule is due; nothing when it is not (any more),
    or when the latest revision is no longer the one whose spec (`raw`) was read."""
    if ds is None or ds.next_due is None or ds.next_due > now or not ds.revisions:
        return []
    if ds.revisions[-1].upload_version != upload_version:
        return []
    spec, errors = validate_spec(raw)
    if spec is None:  # cannot happen for a spec that was accepted; never re-run garbage
        return []
    n = len(ds.revisions) + 1
    flow_id = f"{ds.dataset_id}/{n}"
    return [
        RevisionUploaded(
            dataset_id=ds.dataset_id, ownerid=ds.ownerid, dataset=ds.dataset, revision=n, flow_id=flow_id,
            spec=raw, pipelines=plan_pipelines(flow_id, spec), trigger="schedule", actor=None,
            schedule_seconds=ds.schedule_seconds, next_due=next_due(ds.next_due, ds.schedule_seconds, ds.schedule_seconds, now),
        )
    ]


class PipelineUpdate(msgspec.Struct):
    """The body of `/source/update`; `pipeline_id` is the original's name for `pipeline`."""

    event: PipelineEvent
    pipeline: str | None = None
    pipeline_id: str | None = None
    success: bool | None = None
    errors: list[Any] = []
    log: list[Any] | str = []
    stats: dict[str, Any] = {}

    @property
    def pipeline_name(self) -> str:
        name = self.pipeline or self.pipeline_id or ""
        return name[2:] if name.startswith("./") else name


def dataset_of_pipeline(pipeline: str) -> str | None:
    """`owner/dataset` from a pipeline id `owner/dataset/n/k`."""
    parts = pipeline.split("/")
    return f"{parts[0]}/{parts[1]}" if len(parts) == 4 else None


def decide_pipeline_event(ds: DatasetState | None, update: PipelineUpdate) -> list[Fact]:
    """Record a pipeline's event; a failure also fails the queued pipelines depending on it."""
    name = update.pipeline_name
    if not name:
        raise SpecError(400, ["pipeline: required (the pipeline id)"])
    flow_id = name.rpartition("/")[0]
    rev = _revision_of(ds, flow_id) if ds is not None else None
    if rev is None or name not in rev.pipelines:
        raise SpecError(404, [f"pipeline not found: {name}"])
    if rev.finished:
        raise SpecError(409, [f"revision {rev.flow_id} already finished ({rev.state}); event refused"], rev.flow_id)
    current = rev.pipelines[name].status
    if current in FINISHED:
        raise SpecError(409, [f"pipeline {name} already finished ({current}); event refused"], rev.flow_id)
    if update.event == "finish":
        if update.success is None:
            raise SpecError(400, ["success: required (true or false) with a finish event"], rev.flow_id)
        status = SUCCEEDED if update.success else FAILED
    else:
        status = QUEUED if update.event == "queue" else INPROGRESS
    log = update.log.splitlines() if isinstance(update.log, str) else update.log
    facts: list[Fact] = [
        PipelineEventRecorded(
            flow_id=rev.flow_id, pipeline=name, event=update.event, status=status, success=update.success,
            errors=update.errors, log=log, stats=update.stats,
        )
    ]
    if status == FAILED:
        facts.extend(_fail_dependants(rev, name))
    return facts


def _fail_dependants(rev: RevisionState, failed: str) -> list[Fact]:
    """Queued pipelines depending (transitively) on `failed`, each failed with the reason."""
    out: list[Fact] = []
    statuses = {pid: p.status for pid, p in rev.pipelines.items()}
    statuses[failed] = FAILED
    todo = [failed]
    while todo:
        dep = todo.pop(0)
        for pid, p in rev.pipelines.items():
            if dep in p.dependencies and statuses[pid] == QUEUED:
                statuses[pid] = FAILED
                todo.append(pid)
                out.append(
                    PipelineEventRecorded(
                        flow_id=rev.flow_id, pipeline=pid, event="finish", status=FAILED, success=False,
                        errors=[f'Dependency unsuccessful. Cannot run until dependency "{dep}" is successfully executed'],
                        cause=dep,
                    )
                )
    return out


def decide_claim(ds: DatasetState | None, revision: int, node: str, now: int, lease_seconds: float) -> list[Fact]:
    """Claim a revision's DPP dispatch for `node`, unless it needs none or another node's
    lease still holds (an expired lease is taken over)."""
    rev = ds.revisions[revision - 1] if ds is not None and 1 <= revision <= len(ds.revisions) else None
    if rev is None or not rev.needs_dispatch or not claimable(rev.claim, node, now):
        return []
    return [DispatchClaimed(rev.flow_id, node, lease_until(now, lease_seconds))]


def decide_dispatch_attempt(ds: DatasetState | None, attempt: PipelineDispatchAttempted) -> list[Fact]:
    """Record an attempt; when it was the last and failed, the pipeline fails (and its
    dependants) unless the pipeline or its revision finished meanwhile."""
    facts: list[Fact] = [attempt]
    if attempt.ok or attempt.retry_at is not None or ds is None:
        return facts
    rev = _revision_of(ds, attempt.flow_id)
    if rev is None or rev.finished or rev.pipelines[attempt.pipeline].status in FINISHED:
        return facts
    update = PipelineUpdate(
        event="finish", pipeline=attempt.pipeline, success=False,
        errors=[f"could not hand the pipeline to DPP after {attempt.attempt} attempts: {attempt.error}"],
    )
    return facts + decide_pipeline_event(ds, update)

"""Specs reactors: the scheduler that re-runs scheduled datasets, and the DPP dispatcher.

Both wake on the specs projection's changes and on the app clock (a `ManualClock` in
tests), and record what they do as events through `append_decided`, so two nodes never
make the same revision or claim the same dispatch: the expected stream version decides.

The dispatcher runs only with `DPP_URL` set. It claims a revision (`DispatchClaimed`,
a lease), POSTs each of its planned pipelines to `DPP_URL`, records every attempt
(`PipelineDispatchAttempted`) and retries with exponential backoff; when the attempts
run out the pipeline is recorded as failed, and its dependants with it. A claim whose
lease ran out (a crashed node) is taken over.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from api.keys import CLOCK, HTTP, LOG, SETTINGS
from api.specs import SPECS, append_decided
from eventhub.claims import new_node_id
from eventhub.clock import Clock
from eventhub.errors import EventhubError
from eventhub.settings import Settings
from projections.specs import (
    FINISHED,
    PipelineDispatchAttempted,
    PlannedPipeline,
    RevisionUploaded,
    SpecError,
    decide_claim,
    decide_dispatch_attempt,
    decide_scheduled_run,
    decode_fact,
    stream_of,
)

log = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 300.0
_ERROR_PAUSE_SECONDS = 5.0
_MAX_PARALLEL = 16  # revisions handed to DPP at once
_encode = msgspec.json.Encoder().encode


async def sleep_until(clock: Clock, deadline: int) -> None:
    """Sleep on `clock` until `deadline` (micros); at once when it has passed. The remaining
    time is computed when this runs, so a clock moved meanwhile is not slept past."""
    remaining = deadline - clock.now()
    if remaining > 0:
        # + 0.5 µs: a clock that counts whole micros wakes exactly at the deadline
        await clock.sleep((remaining + 0.5) / 1_000_000)


async def _wait(clock: Clock, deadline: int | None, wake: asyncio.Event) -> None:
    """Until `wake` is set or the clock reaches `deadline`, whichever is first."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(wake.wait())]
    if deadline is not None:
        waits.append(asyncio.ensure_future(sleep_until(clock, deadline)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


# -- the scheduler --------------------------------------------------------------------------


async def scheduler(app: web.Application) -> None:
    """A dataset whose schedule is due gets a new revision of its latest spec."""
    projection, clock = app[SPECS], app[CLOCK]
    wake = asyncio.Event()

    def listener(_: str) -> None:
        wake.set()

    projection.listeners.append(listener)
    stuck: dict[str, int | None] = {}  # due datasets that could not be re-run, at that due time
    try:
        while True:
            wake.clear()
            due = [d for d in projection.due(clock.now()) if stuck.get(d, -1) != projection.datasets[d].next_due]
            for dataset_id in due:
                try:
                    ran = await _run_schedule(app, dataset_id)
                except Exception as exc:  # a reactor outlives one bad item; it retries after a pause
                    log.warning("specs scheduler: %s: %r", dataset_id, exc)
                    await sleep_until(clock, clock.now() + int(_ERROR_PAUSE_SECONDS * 1_000_000))
                    continue
                if not ran:
                    stuck[dataset_id] = projection.datasets[dataset_id].next_due
            if due:
                continue
            upcoming = [due for d, due in projection.scheduled.items() if stuck.get(d, -1) != due]
            await _wait(clock, min(upcoming, default=None), wake)
    finally:
        projection.listeners.remove(listener)


async def _run_schedule(app: web.Application, dataset_id: str) -> bool:
    """Append the scheduled revision; False when there was nothing to re-run."""
    ds = app[SPECS].datasets[dataset_id]
    version = ds.revisions[-1].upload_version
    uploaded = await _uploaded(app, dataset_id, version)
    if uploaded is None:
        return False
    clock = app[CLOCK]
    events = await append_decided(app, dataset_id, lambda d: decide_scheduled_run(d, version, uploaded.spec, clock.now()))
    if events:
        return True
    latest = app[SPECS].datasets[dataset_id]
    return latest.revisions[-1].upload_version != version  # the spec changed: try again with it


async def _uploaded(app: web.Application, dataset_id: str, version: int) -> RevisionUploaded | None:
    events = await app[LOG].store.read_stream(stream_of(dataset_id), version, 1)
    fact = decode_fact(events[0]) if events else None
    return fact if isinstance(fact, RevisionUploaded) else None


# -- the DPP dispatcher ---------------------------------------------------------------------


def lease_seconds(settings: Settings) -> float:
    """Long enough for every attempt of one pipeline, with their backoffs, and a margin."""
    backoffs = sum(_backoff(settings, attempt) for attempt in range(1, settings.dpp_retries + 1))
    return 60.0 + (settings.dpp_retries + 1) * settings.export_timeout_seconds + backoffs


def _backoff(settings: Settings, attempt: int) -> float:
    return min(settings.dpp_backoff_seconds * float(2 ** (attempt - 1)), _MAX_BACKOFF_SECONDS)


async def dispatcher(app: web.Application) -> None:
    """Hand each new revision's pipelines to DPP_URL, one claim per revision."""
    settings, projection, clock = app[SETTINGS], app[SPECS], app[CLOCK]
    lease = lease_seconds(settings)
    node = new_node_id()
    wake = asyncio.Event()

    def listener(_: str) -> None:
        wake.set()

    projection.listeners.append(listener)
    running: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            wake.clear()
            for dataset_id, n in projection.dispatch_todo(clock.now()):
                flow_id = f"{dataset_id}/{n}"
                if flow_id in running:
                    continue
                if len(running) >= _MAX_PARALLEL:
                    break  # a finishing dispatch wakes this loop again
                try:
                    claimed = await append_decided(app, dataset_id, lambda ds, n=n: decide_claim(ds, n, node, clock.now(), lease))  # type: ignore[misc]
                except (SpecError, EventhubError) as exc:
                    log.warning("specs dispatcher: cannot claim %s: %s", flow_id, exc)
                    continue
                if claimed:
                    task = asyncio.create_task(_dispatch_revision(app, dataset_id, n), name=f"dpp {flow_id}")
                    running[flow_id] = task
                    task.add_done_callback(lambda t, f=flow_id: _finished(running, f, t, wake))  # type: ignore[misc]
            await _wait(clock, projection.next_claim_expiry(clock.now()), wake)
    finally:
        projection.listeners.remove(listener)
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)


def _finished(running: dict[str, asyncio.Task[None]], flow_id: str, task: asyncio.Task[None], wake: asyncio.Event) -> None:
    running.pop(flow_id, None)
    if not task.cancelled() and task.exception() is not None:
        log.error("specs dispatcher: %s ended with %r (retried when its claim runs out)", flow_id, task.exception())
    wake.set()


async def _dispatch_revision(app: web.Application, dataset_id: str, n: int) -> None:
    rev = app[SPECS].datasets[dataset_id].revisions[n - 1]
    uploaded = await _uploaded(app, dataset_id, rev.upload_version)
    if uploaded is None:
        return
    todo = [p for p in uploaded.pipelines if rev.pipelines[p.id].dispatch == "" and rev.pipelines[p.id].status not in FINISHED]
    await asyncio.gather(*(_dispatch_pipeline(app, uploaded, p) for p in todo))


async def _dispatch_pipeline(app: web.Application, uploaded: RevisionUploaded, pipeline: PlannedPipeline) -> None:
    settings, clock = app[SETTINGS], app[CLOCK]
    body = _encode(
        {
            "pipeline_id": pipeline.id,
            "flow_id": uploaded.flow_id,
            "dataset_id": uploaded.dataset_id,
            "revision": uploaded.revision,
            "title": pipeline.title,
            "kind": pipeline.kind,
            "dependencies": pipeline.dependencies,
            "output": pipeline.output,
            "spec": uploaded.spec,
        }
    )
    attempts = settings.dpp_retries + 1
    for attempt in range(1, attempts + 1):
        if not _still_wanted(app, uploaded, pipeline.id):
            return
        error = await _post(app, settings.dpp_url, body)
        retry_at = None
        if error is not None and attempt < attempts:
            retry_at = clock.now() + int(_backoff(settings, attempt) * 1_000_000)
        fact = PipelineDispatchAttempted(
            flow_id=uploaded.flow_id, pipeline=pipeline.id, attempt=attempt, ok=error is None, error=error, retry_at=retry_at
        )
        await append_decided(app, uploaded.dataset_id, lambda ds: decide_dispatch_attempt(ds, fact))
        if retry_at is None:
            return
        log.info("specs dispatcher: %s attempt %d failed (%s), retrying", pipeline.id, attempt, error)
        await sleep_until(clock, retry_at)


def _still_wanted(app: web.Application, uploaded: RevisionUploaded, pipeline_id: str) -> bool:
    ds = app[SPECS].datasets.get(uploaded.dataset_id)
    rev = ds.revisions[uploaded.revision - 1] if ds is not None else None
    return rev is not None and not rev.finished and rev.pipelines[pipeline_id].status not in FINISHED


async def _post(app: web.Application, url: str, body: bytes) -> str | None:
    """None when DPP took the pipeline (2xx), else what went wrong."""
    try:
        async with app[HTTP].post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            await resp.content.read(64 * 1024)
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

"""The export worker: sends each queued export to its destination and records the outcome.

One task per client with unfinished requests works through that client's FIFO, one
request at a time, so a client's exports go out in the order they came; different
clients run in parallel, at most `EVENTHUB_EXPORT_PARALLEL` sends at once per node.

For each request the task claims the next attempt (`eventhub.claims`: an append with
the version it saw, carrying a lease), POSTs `data` to `uri` through the app's one
client session, and records `ExportFinished` or, for connection errors, timeouts and
5xx answers, `ExportAttemptFailed` with a retry time (doubling backoff, capped). When
the attempts are used up the request is Finished with a status saying why, so nothing
stays in Processing. Another node's request is left alone until its lease expires.

On start the worker picks up every unfinished request in the projection: Pending ones
are claimed at once; Processing ones whose holder is gone once its lease has run out (a
node that shuts down cleanly gives its claims back immediately). A crash between the
send and the record means the send is repeated: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from api.exports import EXPORTS, GUARD
from api.keys import CLOCK, HTTP, LOG, SETTINGS, WORKERS
from eventhub import claims
from eventhub.errors import StoreUnavailable, WrongExpectedVersion
from eventhub.events import StreamAppend, fact_event
from eventhub.hub import EventFilter
from eventhub.netguard import RefusedDestination
from eventhub.settings import Settings
from projections import exports as model

log = logging.getLogger(__name__)

# after an unexpected error (the store unavailable…): first pause, doubling up to the last
ERROR_PAUSE_SECONDS = (0.05, 2.0)


def setup(app: web.Application) -> None:
    app[WORKERS].append(run)


async def run(app: web.Application) -> None:
    """The worker coroutine the app starts after the log is open and cancels at shutdown."""
    await ExportWorker(app).run()


def policy_from(settings: Settings) -> model.RetryPolicy:
    return model.RetryPolicy(
        retries=settings.export_retries,
        backoff_seconds=settings.export_backoff_seconds,
        backoff_max_seconds=settings.export_backoff_max_seconds,
        timeout_seconds=settings.export_timeout_seconds,
        lease_grace_seconds=settings.export_lease_grace_seconds,
    )


class ExportWorker:
    def __init__(self, app: web.Application, node: str | None = None) -> None:
        settings = app[SETTINGS]
        self.log = app[LOG]
        self.model = app[EXPORTS]
        self.http = app[HTTP]
        self.clock = app[CLOCK]
        self.guard = app[GUARD]
        self.node = node or claims.new_node_id()
        self.policy = policy_from(settings)
        self.response_limit = settings.export_response_max_bytes
        self.slots = asyncio.Semaphore(settings.export_parallel)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.requests: dict[str, model.ExportRequested] = {}  # payloads of requests in hand

    async def run(self) -> None:
        after = self.log.head  # the projection has folded everything up to here
        for client in self.model.clients_with_work():
            self._ensure(client)
        try:
            # cancelled at shutdown inside the generator's own wait, which ends it too
            wanted = EventFilter(prefix=model.PREFIX, types=["ExportRequested"])
            async for batch in self.log.hub.subscribe(after, wanted):
                for event in batch:
                    entry = self.model.get(event.stream[len(model.PREFIX) :])
                    if entry is not None and entry.state != model.FINISHED:
                        self._ensure(entry.client)
        finally:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _ensure(self, client: str) -> None:
        if client not in self.tasks:
            self.tasks[client] = asyncio.create_task(self._serve(client), name=f"export-client:{client}")

    async def _serve(self, client: str) -> None:
        """Work through one client's requests in order until none is left."""
        pause = ERROR_PAUSE_SECONDS[0]
        try:
            while (entry := self.model.head_of(client)) is not None:
                try:
                    await self._step(entry)
                    pause = ERROR_PAUSE_SECONDS[0]
                    if entry.state == model.FINISHED:
                        self.requests.pop(entry.id, None)
                except Exception as exc:
                    log.warning("export %s: %s; trying again in %gs", entry.id, _describe(exc), pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, ERROR_PAUSE_SECONDS[1])
        finally:
            # no await between the empty queue above and this: a new request either
            # sees this task still running or finds no task and starts one
            self.tasks.pop(client, None)

    async def _step(self, entry: model.Entry) -> None:
        """Take the request one step on: an attempt, giving up, or waiting for its turn."""
        async with self.slots:
            if model.decide_claim(entry, self.node, self.clock.now(), self.policy) is not None:
                request = await self._request(entry)
                # decide again and take the expected version with no await in between:
                # the read above may have let another node's claim be folded in
                step = model.decide_claim(entry, self.node, self.clock.now(), self.policy)
                if step is not None:
                    await self._attempt(entry, entry.version, step, request)
                return
        await self._wait(entry)

    async def _attempt(
        self,
        entry: model.Entry,
        expected: int,
        step: model.ExportClaimed | model.ExportFinished,
        request: model.ExportRequested,
    ) -> None:
        claimed = await claims.claim(self.log, entry.stream, expected, [fact_event(step)])
        if claimed is None or isinstance(step, model.ExportFinished):
            return  # another node got there first (the loop looks again), or we gave up
        version = claimed[-1].version
        try:
            outcome = await self._deliver(entry.id, request, step.attempt)
        except asyncio.CancelledError:
            await self._release(entry, step.attempt, version)
            raise
        fact = model.decide_outcome(step.attempt, outcome, self.clock.now(), self.policy, request.uri)
        if isinstance(fact, model.ExportFinished) and fact.error:
            # no uri in the log line: destinations may carry credentials in their query
            log.warning("export %s finished with %d after %d attempts", entry.id, fact.status, fact.attempts)
        await self._record(entry, fact, version)

    async def _record(self, entry: model.Entry, fact: model.ExportEvent, version: int) -> None:
        """Append the outcome of a send; a store that is briefly unavailable is waited
        for, since giving up here would mean sending the export again."""
        pause = ERROR_PAUSE_SECONDS[0]
        while True:
            try:
                await self.log.append(StreamAppend(entry.stream, [fact_event(fact)], version))
                return
            except WrongExpectedVersion:
                # our lease ran out mid-send and another node took the request over: its
                # record stands, ours is dropped (the receiver may have had it twice)
                await self.log.hub.advance(await self.log.store.head())
                return
            except StoreUnavailable as exc:
                log.warning("export %s: cannot record the outcome (%s); trying again in %gs", entry.id, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, ERROR_PAUSE_SECONDS[1])

    async def _request(self, entry: model.Entry) -> model.ExportRequested:
        """The request's payload, from the log (kept while the request is unfinished)."""
        cached = self.requests.get(entry.id)
        if cached is None:
            events = await self.log.store.read_stream(entry.stream, 0, 1)
            fact = model.from_event(events[0])
            assert isinstance(fact, model.ExportRequested)
            cached = self.requests[entry.id] = fact
        return cached

    async def _release(self, entry: model.Entry, attempt: int, version: int) -> None:
        """Shutting down mid-send: hand the claim back so the next node need not wait."""
        fact = model.interrupted(attempt, self.node, self.clock.now())
        try:
            await asyncio.shield(self.log.append(StreamAppend(entry.stream, [fact_event(fact)], version)))
        except Exception:
            log.warning("export %s: could not release the claim; it frees itself when the lease ends", entry.id)

    async def _wait(self, entry: model.Entry) -> None:
        """Wait for this node's retry time, or for another node's lease to end or change."""
        now = self.clock.now()
        lease = entry.lease
        if lease is None:
            await asyncio.sleep(0)
            return
        if lease.node == self.node:
            if entry.retry_at > now:
                await self.clock.sleep((entry.retry_at - now) / 1_000_000)
            return
        if lease.until <= now or not await self._change_or_time(entry.stream, (lease.until - now) / 1_000_000):
            # the lease has run out: learn what other nodes wrote before deciding
            await self.log.hub.advance(await self.log.store.head())

    async def _change_or_time(self, stream: str, seconds: float) -> bool:
        """True when `stream` changed, False when `seconds` of the clock passed first."""
        change = asyncio.ensure_future(self.log.hub.wait_change(stream, None))
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            done, _ = await asyncio.wait({change, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (change, timer):
                task.cancel()
            await asyncio.gather(change, timer, return_exceptions=True)
        return change in done

    # -- delivery ---------------------------------------------------------------------

    async def _deliver(self, export_id: str, request: model.ExportRequested, attempt: int) -> model.Outcome:
        try:
            await self.guard.check_resolved(request.uri)
        except RefusedDestination as exc:
            return model.Outcome(failure="refused", detail=str(exc))
        headers = {"Content-Type": "application/json", "X-Export-Id": export_id, "X-Export-Attempt": str(attempt)}
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_seconds)
        try:
            async with self.http.post(
                request.uri, data=request.data.encode(), headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                body = await _read_capped(response, self.response_limit)
                return model.Outcome(status=response.status, body=body)
        except TimeoutError:
            return model.Outcome(failure="timeout", detail=f"no answer within {self.policy.timeout_seconds:g}s")
        except aiohttp.InvalidURL:
            return model.Outcome(failure="refused", detail="not a valid URL")
        except (aiohttp.ClientError, OSError) as exc:
            return model.Outcome(failure="connect", detail=_describe(exc))


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> str:
    """The response body as text, cut at `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    raw = b"".join(chunks)
    try:
        return raw.decode(response.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", errors="replace")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

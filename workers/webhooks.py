"""The webhook worker: follows each webhook's channel and POSTs every new item's URL to its callback.

One task per live webhook. It sleeps while the webhook is paused, its channel is missing
or the cursor is at the channel's latest item, and wakes on any commit to the webhook's
stream or its channel's streams (the worker subscribes to both prefixes once and wakes
only the webhooks concerned; while no webhook exists it does not follow the channels at
all, so a node without webhooks pays nothing per insert).

With work to do, the task claims the webhook (`eventhub.claims`: `WebhookClaimed` with
the stream version it saw and a lease), so two nodes never deliver the same webhook; a
crashed node's webhook is taken over once its lease has run out, and a node that shuts
down cleanly releases it at once. Then a delivery *round* runs: up to `parallelCalls`
items at once, each POSTed as `{"name", "uris": [url], "type": "item"}`; a 2xx answer is
success, anything else (other statuses, redirects, timeouts, refused or unreachable
destinations) is `WebhookDeliveryFailed` and a retry after a doubling backoff capped at
`maxWaitMinutes` (the app clock's time, so tests drive it); after `maxAttempts` (when not
0) the item is given up and counts as done. The cursor (`WebhookCursorMoved`) moves over
the contiguous prefix of done items only, so with one call at a time delivery is in
order, and a restart resumes after the last item recorded done. A crash between a
delivery and its record means the item is sent again: delivery is at least once.

Every record the round makes is appended with the expected stream version and checked
against the round's view (configuration, cursor epoch, pause, lease): a PUT, an
`updateCursor`, a pause or a delete ends the round and cancels its calls in flight.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from api.channels import CHANNELS
from api.keys import CLOCK, HTTP, LOG, SETTINGS
from api.webhooks import GUARD, WEBHOOKS
from eventhub import claims
from eventhub.claims import Lease
from eventhub.errors import WrongExpectedVersion
from eventhub.events import StreamAppend
from eventhub.hub import EventFilter
from eventhub.netguard import RefusedDestination
from projections.channels import PREFIX as CHANNEL_PREFIX
from projections.channels import Channel
from projections.webhooks import (
    PREFIX,
    Model,
    Webhook,
    WebhookClaimed,
    WebhookConfigured,
    WebhookCursorMoved,
    WebhookEvent,
    WebhookReleased,
    decide_failure,
    payload,
    to_event,
)

log = logging.getLogger(__name__)

# after an unexpected error (the store unavailable…): first pause, doubling up to the last
ERROR_PAUSE_SECONDS = (0.05, 2.0)
_HEADERS = {"Content-Type": "application/json"}


async def run(app: web.Application) -> None:
    """The worker coroutine the app starts after the log is open and cancels at shutdown."""
    await WebhookWorker(app).run()


class _RoundOver(Exception):
    """The webhook changed under a round (configuration, cursor, pause, delete or lease)."""


class _Round:
    """What a delivery round was started with; its records are valid only while this holds."""

    def __init__(self, hook: Webhook, generation: int) -> None:
        self.config: WebhookConfigured = hook.config
        self.config_version = hook.config_version
        self.epoch = hook.epoch
        self.generation = generation
        self.lock = asyncio.Lock()
        """One record at a time, each with the version the one before it left."""


class WebhookWorker:
    def __init__(self, app: web.Application, node: str | None = None) -> None:
        settings = app[SETTINGS]
        self.log = app[LOG]
        self.clock = app[CLOCK]
        self.http = app[HTTP]
        self.guard = app[GUARD]
        self.webhooks = app[WEBHOOKS]
        self.channels = app[CHANNELS]
        self.node = node or claims.new_node_id()
        self.backoff_seconds = settings.webhook_backoff_seconds
        self.grace_seconds = settings.webhook_lease_grace_seconds
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakes: dict[str, asyncio.Event] = {}
        self.hooks_appeared = asyncio.Event()
        self.channels_after = 0  # where following the channels starts when it (re)starts

    @property
    def model(self) -> Model:
        return self.webhooks.model

    async def run(self) -> None:
        after = self.channels_after = self.log.head  # the projections have folded everything up to here
        for name in list(self.model.webhooks):
            self._ensure(name)
        watchers = [asyncio.create_task(self._watch(after, PREFIX)), asyncio.create_task(self._watch_channels())]
        try:
            await asyncio.gather(*watchers)
        finally:
            tasks = watchers + list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, after: int, prefix: str) -> None:
        """Wake the webhooks a commit concerns: their own stream, or their channel's."""
        while True:
            try:
                async for batch in self.log.hub.subscribe(after, EventFilter(prefix=prefix)):
                    after = batch[-1].position
                    if prefix == PREFIX:
                        for name in {e.stream[len(PREFIX) :] for e in batch}:
                            self._ensure(name)
                            self._wake(name)
                        continue
                    touched = {e.stream[len(CHANNEL_PREFIX) :].partition(":")[0] for e in batch}
                    for hook in self.model.webhooks.values():
                        if hook.config.channel in touched:
                            self._wake(hook.name)
                    if not self.model.webhooks:
                        return
            except Exception as exc:  # a store hiccup must not end the worker
                log.warning("webhooks: following the log failed (%s); resuming", _describe(exc))
                await asyncio.sleep(ERROR_PAUSE_SECONDS[1])

    async def _watch_channels(self) -> None:
        """Follow the channels while any webhook exists. A new webhook's task looks at its
        channel when it starts, and this follows from the head at that moment, so no
        insert falls between the two."""
        while True:
            if not self.model.webhooks:
                self.hooks_appeared.clear()
                await self.hooks_appeared.wait()
            await self._watch(self.channels_after, CHANNEL_PREFIX)

    def _ensure(self, name: str) -> None:
        if name in self.model.webhooks and name not in self.tasks:
            if not self.hooks_appeared.is_set():
                self.channels_after = self.log.head
                self.hooks_appeared.set()
            self.wakes[name] = asyncio.Event()
            self.tasks[name] = asyncio.create_task(self._follow(name), name=f"webhook:{name}")

    def _wake(self, name: str) -> None:
        wake = self.wakes.get(name)
        if wake is not None:
            wake.set()

    # -- one webhook ------------------------------------------------------------------

    async def _follow(self, name: str) -> None:
        """Serve one webhook until it is deleted."""
        wake = self.wakes[name]
        pause = ERROR_PAUSE_SECONDS[0]
        try:
            while True:
                wake.clear()  # before looking: a commit from here on sets it again
                hook = self.model.webhooks.get(name)
                if hook is None:
                    return  # no await from the look to the `finally`: a re-creation starts a new task
                try:
                    await self._step(hook, wake)
                    pause = ERROR_PAUSE_SECONDS[0]
                except Exception as exc:
                    log.warning("webhook %s: %s; trying again in %gs", name, _describe(exc), pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, ERROR_PAUSE_SECONDS[1])
        except asyncio.CancelledError:
            await self._release(name)
            raise
        finally:
            if self.tasks.get(name) is asyncio.current_task():
                del self.tasks[name]
                self.wakes.pop(name, None)

    async def _step(self, hook: Webhook, wake: asyncio.Event) -> None:
        """Wait for work, or claim the webhook and run a delivery round."""
        channel = self.channels.model.channels.get(hook.config.channel)
        if hook.config.paused or channel is None or hook.cursor_in(channel.generation) >= channel.items - 1:
            await wake.wait()
            return
        now = self.clock.now()
        lease = hook.lease
        if not claims.claimable(lease, self.node, now):
            assert lease is not None
            if not await self._wait(wake, (lease.until - now) / 1_000_000):
                # the holder's lease has run out: learn what it wrote before deciding
                await self.log.hub.advance(await self.log.store.head())
            return
        if not self._holds_lease(hook, now):
            fact = WebhookClaimed(lease=self._lease(hook.config, now))
            # the version goes with the hook looked at above: no await in between
            if await claims.claim(self.log, hook.stream, self.model.versions[hook.name], [to_event(fact)]) is None:
                return  # another node has it; the projection shows its claim now
        try:
            await self._round(hook.name, wake, channel)
        except _RoundOver:
            pass

    async def _round(self, name: str, wake: asyncio.Event, channel: Channel) -> None:
        """Deliver items until none is left, up to `parallelCalls` at once."""
        hook = self.model.webhooks[name]
        rnd = _Round(hook, channel.generation)
        cursor = hook.cursor_in(rnd.generation)
        upcoming = cursor + 1
        done: set[int] = set()
        in_flight: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                wake.clear()
                live = self.model.webhooks.get(name)
                channel_now = self.channels.model.channels.get(rnd.config.channel)
                if not self._current(live, rnd) or channel_now is None or channel_now.generation != rnd.generation:
                    return
                assert live is not None
                last = channel_now.items - 1
                if not in_flight and upcoming <= last:
                    first = await self._first_visible(live, channel_now)
                    if first > upcoming:  # expired or purged: skipped in one record, never sent
                        cursor, upcoming = first - 1, first
                        await self._record(name, rnd, self._moved(rnd, cursor))
                        continue
                while len(in_flight) < rnd.config.parallel_calls and upcoming <= last:
                    in_flight[upcoming] = asyncio.create_task(self._item(name, rnd, upcoming))
                    upcoming += 1
                if not in_flight:
                    return
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({waiter, *in_flight.values()}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                for version, task in list(in_flight.items()):
                    if task.done():
                        del in_flight[version]
                        task.result()  # raises _RoundOver, or what went wrong
                        done.add(version)
                moved = cursor
                while moved + 1 in done:
                    moved += 1
                    done.discard(moved)
                if moved > cursor:
                    cursor = moved
                    await self._record(name, rnd, self._moved(rnd, cursor))
        finally:
            for task in in_flight.values():
                task.cancel()
            await asyncio.gather(*in_flight.values(), return_exceptions=True)

    async def _item(self, name: str, rnd: _Round, version: int) -> None:
        """Deliver one item, retrying as configured; returns once it is done."""
        generation = rnd.generation
        while True:
            hook = self.model.webhooks.get(name)
            channel = self.channels.model.channels.get(rnd.config.channel)
            if not self._current(hook, rnd) or channel is None or channel.generation != generation:
                raise _RoundOver
            assert hook is not None
            retry = hook.retry_of(generation, version)
            if retry is not None and retry.gave_up:
                return
            now = self.clock.now()
            if retry is not None and retry.retry_at > now:
                await self.clock.sleep((retry.retry_at - now) / 1_000_000)
                continue
            if version < await self._first_visible(hook, channel):
                return  # expired or purged while waiting: skipped, never sent
            await self._hold_lease(name, rnd)
            if not self._current(self.model.webhooks.get(name), rnd):
                raise _RoundOver  # paused, moved or deleted while this item waited
            attempt = retry.attempts + 1 if retry is not None else 1
            url = hook.item_url(generation, version)
            reason = await self._post(rnd.config, url)
            if reason is None:
                return
            now = self.clock.now()
            fact = decide_failure(
                rnd.config, generation, version, attempt, reason, now, self.backoff_seconds, self._lease(rnd.config, now)
            )
            await self._record(name, rnd, fact)
            if fact.retry_at is None:
                log.warning("webhook %s: gave up on %s after %d attempts: %s", name, url, attempt, reason)
                return
            log.info("webhook %s: attempt %d at %s failed (%s)", name, attempt, url, reason)

    # -- records ------------------------------------------------------------------------

    async def _record(self, name: str, rnd: _Round, fact: WebhookEvent) -> None:
        async with rnd.lock:
            await self._append(name, rnd, fact)

    async def _hold_lease(self, name: str, rnd: _Round) -> None:
        """Renew the lease before a call when what is left of it might not outlast the call."""
        async with rnd.lock:
            hook = self.model.webhooks.get(name)
            now = self.clock.now()
            if hook is not None and self._holds_lease(hook, now):
                return
            await self._append(name, rnd, WebhookClaimed(lease=self._lease(rnd.config, now)))

    async def _append(self, name: str, rnd: _Round, fact: WebhookEvent) -> None:
        """Append at the stream's current version while the round is still current; after a
        conflict, catch up with the log and look again (a claim by another node ends it)."""
        for _ in range(5):
            hook = self.model.webhooks.get(name)
            if not self._current(hook, rnd):
                raise _RoundOver
            assert hook is not None
            try:
                await self.log.append(StreamAppend(hook.stream, [to_event(fact)], self.model.versions[name]))
                return
            except WrongExpectedVersion:
                await self.log.hub.advance(await self.log.store.head())
        raise _RoundOver

    async def _release(self, name: str) -> None:
        """Shutting down: hand the webhook back so that another node need not wait for the lease."""
        hook = self.model.webhooks.get(name)
        if hook is None or hook.lease is None or hook.lease.node != self.node:
            return
        release = StreamAppend(hook.stream, [to_event(WebhookReleased(node=self.node))], self.model.versions[name])
        try:
            await asyncio.shield(self.log.append(release))
        except Exception as exc:
            log.info("webhook %s: not released (%s); its lease ends by itself", name, _describe(exc))

    # -- helpers -----------------------------------------------------------------------

    def _current(self, hook: Webhook | None, rnd: _Round) -> bool:
        """Is the round still what the webhook asks for, and this node its holder?"""
        return (
            hook is not None
            and hook.config_version == rnd.config_version
            and hook.epoch == rnd.epoch
            and not hook.config.paused
            and hook.lease is not None
            and hook.lease.node == self.node
        )

    def _lease_seconds(self, config: WebhookConfigured) -> float:
        return config.callback_timeout_seconds + self.grace_seconds

    def _lease(self, config: WebhookConfigured, now: int) -> Lease:
        return Lease(self.node, claims.lease_until(now, self._lease_seconds(config)))

    def _holds_lease(self, hook: Webhook, now: int) -> bool:
        """This node's lease, with at least a call's timeout (and half the grace) left."""
        lease = hook.lease
        margin = hook.config.callback_timeout_seconds + self.grace_seconds / 2
        return lease is not None and lease.node == self.node and lease.until - now >= margin * 1_000_000

    def _moved(self, rnd: _Round, cursor: int) -> WebhookCursorMoved:
        lease = self._lease(rnd.config, self.clock.now())
        return WebhookCursorMoved(generation=rnd.generation, version=cursor, reason="delivered", lease=lease)

    async def _first_visible(self, hook: Webhook, channel: Channel) -> int:
        """The first item still to be sent: not purged, within the channel's TTL and the webhook's."""
        now = self.clock.now()
        first = channel.purged_through + 1
        cutoffs = [channel.cutoff(now)]
        if hook.config.ttl_minutes:
            cutoffs.append(now - hook.config.ttl_minutes * 60_000_000)
        cutoff = max((c for c in cutoffs if c is not None), default=None)
        if cutoff is None or channel.created_at >= cutoff:
            return first
        if channel.latest_at < cutoff:
            return channel.items
        event = await self.log.store.first_at_or_after(channel.items_stream, cutoff)
        return max(first, event.version if event is not None else channel.items)

    async def _wait(self, wake: asyncio.Event, seconds: float) -> bool:
        """True when woken by a commit, False when `seconds` of the clock passed first."""
        waiter = asyncio.ensure_future(wake.wait())
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            finished, _ = await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, timer):
                task.cancel()
            await asyncio.gather(waiter, timer, return_exceptions=True)
        return waiter in finished

    async def _post(self, config: WebhookConfigured, url: str) -> str | None:
        """POST one item's URL to the callback: None on a 2xx answer, else why not."""
        try:
            await self.guard.check_resolved(config.callback_url)
        except RefusedDestination as exc:
            return f"refused: {exc}"
        timeout = aiohttp.ClientTimeout(total=config.callback_timeout_seconds)
        try:
            async with self.http.post(
                config.callback_url, data=payload(config, url), headers=_HEADERS, timeout=timeout, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"{response.status} {response.reason or ''}".strip()
        except TimeoutError:
            return f"no answer within {config.callback_timeout_seconds}s"
        except aiohttp.InvalidURL:
            return "refused: not a valid URL"
        except (aiohttp.ClientError, OSError) as exc:
            return f"cannot reach the callback: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

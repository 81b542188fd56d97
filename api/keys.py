"""Typed app keys for what every facet shares: settings, the log, the clock, one HTTP session."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from eventhub.clock import Clock
from eventhub.log import EventLog
from eventhub.projection import Projection
from eventhub.settings import Settings

WorkerFactory = Callable[[web.Application], Coroutine[Any, Any, None]]

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
LOG = web.AppKey("log", EventLog)
HTTP = web.AppKey("http", aiohttp.ClientSession)
PROJECTIONS = web.AppKey("projections", list[Projection])
WORKERS = web.AppKey("workers", list[WorkerFactory])

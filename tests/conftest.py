"""Fixtures every test package shares: settings on a temporary database, a manual clock,
and an aiohttp test client over the whole app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from eventhub.clock import ManualClock
from eventhub.settings import Settings, load_settings

AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, database_url=f"sqlite:///{tmp_path / 'eventhub.db'}", admin_token="admin-secret")


@pytest.fixture
def make_client(aiohttp_client: Any, settings: Settings, clock: ManualClock) -> AppClient:
    """`await make_client(facets=(channels,), **setting_overrides)` → a client over a fresh app."""

    async def make(facets: tuple[ModuleType, ...] | None = None, **overrides: Any) -> TestClient[web.Request, web.Application]:
        s = load_settings({}, **{**{f: getattr(settings, f) for f in settings.__struct_fields__}, **overrides})
        return await aiohttp_client(create_app(s, clock=clock, facets=facets))  # type: ignore[no-any-return]

    return make

"""PostgreSQL for tests: throwaway databases, a fresh empty one wherever a test asks.

`EVENTHUB_TEST_PG` names a database the tests may connect to in order to create others
(default `postgresql://postgres@127.0.0.1:5432/test`; the `postgres` database on the same
server is tried next). Without a reachable server the tests skip, except under CI (`CI`
set), where they fail loudly.

Every database a run makes is called `eventhub_test_<random>` and is dropped when the
run ends, so runs never see each other's data. CREATE DATABASE costs a few hundred
milliseconds, so within one run a database a test is done with is wiped (its sessions
killed, its schema dropped and made again, its settings reset) and handed to the next
test that asks: each test still starts from an empty database.

Test modules import both fixtures: `from tests.store.pg import pg, pg_run`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

ADMIN_DSN = os.environ.get("EVENTHUB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def dsn_for(database: str, base: str = ADMIN_DSN) -> str:
    """`base` with its database replaced."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + database))


def unavailable(reason: str) -> NoReturn:
    message = f"PostgreSQL is not reachable at {ADMIN_DSN}: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(message)


async def admin_connect() -> Any:
    """A connection that may CREATE and DROP databases; skips or fails when there is none."""
    errors: list[str] = []
    for dsn in (ADMIN_DSN, dsn_for("postgres")):
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except _DRIVER_ERRORS as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    unavailable("; ".join(errors))


class PgRun:
    """The databases of this test run: all of them, and the wiped ones ready for reuse."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.free: list[str] = []
        self.admin_dsn: str | None = None

    async def drop_all(self) -> None:
        if not self.made or self.admin_dsn is None:
            return
        admin = await asyncpg.connect(self.admin_dsn, timeout=5)
        try:
            for name in self.made:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        self.made.clear()
        self.free.clear()


class PgDatabases:
    """Hands out empty databases to one test and takes them back when it ends.

    Without a `run` (outside the fixtures) every database is new, and `drop_all` drops
    them; with one, `release` wipes them for the next test of the run.
    """

    def __init__(self, admin: Any, run: PgRun | None = None) -> None:
        self.admin = admin
        self.run = run or PgRun()
        self.names: list[str] = []

    async def create(self) -> str:
        """An empty database of this test's own; returns its DSN."""
        if self.run.free:
            name = self.run.free.pop()
        else:
            name = f"eventhub_test_{uuid.uuid4().hex[:16]}"
            await self.admin.execute(f'CREATE DATABASE "{name}"')
            self.run.made.append(name)
        self.names.append(name)
        return dsn_for(name)

    async def drop_all(self) -> None:
        """Drop this object's databases now."""
        while self.names:
            name = self.names.pop()
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if name in self.run.made:
                self.run.made.remove(name)

    async def execute(self, dsn: str, sql: str, *args: Any) -> Any:
        """Run one statement on a database (for tests that tamper with the rows)."""
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def terminate(self, pid: int) -> bool:
        """Kill one server backend, as an operator or a network fault would."""
        return bool(await self.admin.fetchval("SELECT pg_terminate_backend($1)", pid))

    async def release(self) -> None:
        """Wipe this test's databases and give them back to the run."""
        while self.names:
            name = self.names.pop()
            try:
                await self._wipe(name)
            except _DRIVER_ERRORS:
                await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                self.run.made.remove(name)
            else:
                self.run.free.append(name)

    async def _wipe(self, name: str) -> None:
        await self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await self.admin.execute(f'ALTER DATABASE "{name}" RESET ALL')
        for _ in range(50):  # terminated sessions take a moment to go, with their locks
            left = await self.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name)
            if not left:
                break
            await asyncio.sleep(0.01)
        conn = await asyncpg.connect(dsn_for(name), timeout=5)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def pg_run() -> Iterator[PgRun]:
    run = PgRun()
    yield run
    asyncio.run(run.drop_all())


@pytest.fixture
async def pg(pg_run: PgRun) -> AsyncIterator[PgDatabases]:
    admin = await admin_connect()
    pg_run.admin_dsn = pg_run.admin_dsn or dsn_for(await admin.fetchval("SELECT current_database()"))
    databases = PgDatabases(admin, pg_run)
    try:
        yield databases
    finally:
        try:
            await databases.release()
        finally:
            await admin.close()

"""Several eventhub nodes on one PostgreSQL log: a read on node B follows a write on node A."""

from __future__ import annotations

from typing import Any

from api import channels
from api.keys import LOG
from tests.conftest import AppClient
from tests.store.pg import PgDatabases, pg, pg_run  # noqa: F401  (fixtures)


async def test_a_read_on_node_b_follows_a_write_on_node_a(make_client: AppClient, pg: PgDatabases) -> None:  # noqa: F811
    url = await pg.create()
    node_a = await make_client(facets=(channels,), database_url=url)
    node_b = await make_client(facets=(channels,), database_url=url)
    assert node_a.app[LOG].store.backend == "postgres"

    created = await node_a.post("/channel", json={"name": "shared"})
    position = created.headers["Hub-Position"]
    meta = await node_b.get("/channel/shared", headers={"Hub-Position": position})
    assert meta.status == 200 and (await meta.json())["name"] == "shared"

    inserted = await node_a.post("/channel/shared", data=b"from node a", headers={"Content-Type": "text/plain"})
    location: str = inserted.headers["Location"]
    item = await node_b.get(location[location.index("/channel") :], headers={"Hub-Position": inserted.headers["Hub-Position"]})
    assert item.status == 200 and await item.read() == b"from node a"
    latest: Any = await node_b.get("/channel/shared/latest", allow_redirects=False)
    assert latest.status == 303 and latest.headers["Location"].endswith(location.rsplit("/", 1)[1])

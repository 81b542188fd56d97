"""The spec store over HTTP, as a client written against the DataHQ README calls it."""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import hmac
import itertools
import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from api import specs
from api.keys import LOG
from eventhub.clock import ManualClock
from eventhub.errors import WrongExpectedVersion
from eventhub.settings import Settings
from tests.conftest import AppClient

Client = TestClient[web.Request, web.Application]
STATUS_KEYS = {"id", "spec_contents", "modified", "state", "logs", "error_log", "stats", "pipelines"}


@functools.cache
def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def token(clock: ManualClock, userid: str = "me", key: rsa.RSAPrivateKey | None = None, ttl: int = 3600) -> str:
    now = clock.now() // 1_000_000
    return jwt.encode({"userid": userid, "iat": now, "exp": now + ttl}, key or rsa_key(), algorithm="RS256")


def spec(dataset: str = "id", owner: str = "me", **extra: Any) -> dict[str, Any]:
    return {
        "meta": {"ownerid": owner, "owner": owner.title(), "dataset": dataset, "findability": "published"},
        "inputs": [{"kind": "datapackage", "url": "http://example.com/datapackage.json"}],
        "outputs": [{"kind": "csv"}, {"kind": "json"}],
        **extra,
    }


async def client_with_key(make_client: AppClient, **overrides: Any) -> Client:
    return await make_client(facets=(specs,), auth_public_key=public_pem(rsa_key()), **overrides)


async def upload(client: Client, clock: ManualClock, body: Any = None, tok: str | None = None) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/source/upload", json=spec() if body is None else body, headers={"Auth-Token": tok or token(clock)})
    return resp.status, await resp.json()


async def event(client: Client, pipeline: str, name: str, success: bool | None = None, **kw: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/source/update", json={"pipeline": pipeline, "event": name, "success": success, **kw})
    return resp.status, await resp.json()


async def get(client: Client, path: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get(f"/source/{path}")
    return resp.status, await resp.json()


# -- upload and status ----------------------------------------------------------------------


async def test_upload_then_status_in_the_contract_shape(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    status, body = await upload(client, clock)
    assert (status, body) == (200, {"success": True, "dataset_id": "me/id", "flow_id": "me/id/1", "errors": []})
    status, info = await get(client, "me/id/latest")
    assert status == 200 and set(info) == STATUS_KEYS
    assert info["id"] == "me/id/1" and info["state"] == "QUEUED"
    assert info["modified"] == "2023-11-14T22:13:20.000Z"
    assert (info["logs"], info["error_log"], info["stats"]) == ([], [], {})
    meta = info["spec_contents"]["meta"]
    assert meta["update_time"] == meta["create_time"] == "2023-11-14T22:13:20.000Z"
    assert {k: v for k, v in info["spec_contents"].items() if k != "meta"} == {k: v for k, v in spec().items() if k != "meta"}
    assert info["pipelines"] == {
        "me/id/1/0": {"title": "Original datapackage", "status": "QUEUED", "stats": {}, "error_log": []},
        "me/id/1/1": {"title": "Creating csv", "status": "QUEUED", "stats": {}, "error_log": []},
        "me/id/1/2": {"title": "Creating json", "status": "QUEUED", "stats": {}, "error_log": []},
    }
    assert (await get(client, "me/id/1"))[1] == info


@pytest.mark.parametrize("path", ["me/nope/latest", "you/id/1", "me/id/2", "me/id/0", "me/id/x", "me/id/1.0", "me/id/-1", "me/id/successful"])
async def test_unknown_dataset_or_revision_is_404(make_client: AppClient, clock: ManualClock, path: str) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    status, body = await get(client, path)
    assert status == 404 and set(body) == {"errors"}
    expected = f"dataset not found: {path.rsplit('/', 1)[0]}" if path.startswith(("me/nope", "you")) else f"revision not found: {path}"
    assert body["errors"] == [expected]


async def test_validation_failure_lists_every_problem_and_records_nothing(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    bad = spec(schedule="every 10s")
    del bad["inputs"]
    bad["outputs"] = [{"kind": 3}]
    status, body = await upload(client, clock, bad)
    assert status == 400 and body["success"] is False and body["dataset_id"] is None and body["flow_id"] is None
    assert body["errors"] == [
        "inputs: required, a non-empty list",
        "outputs[0]: Expected `str`, got `int` - at `outputs[0].kind`",
        "schedule: can't schedule tasks for less than one minute",
    ]
    assert client.app[LOG].head == 0
    assert (await get(client, "me/id/latest"))[0] == 404


@pytest.mark.parametrize(
    "data, error",
    [(b"", "Received empty contents (make sure your content-type is correct)"), (b"{nope", "the body is not valid JSON")],
)
async def test_empty_or_malformed_body_is_400(make_client: AppClient, clock: ManualClock, data: bytes, error: str) -> None:
    client = await client_with_key(make_client)
    resp = await client.post("/source/upload", data=data, headers={"Auth-Token": token(clock), "Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400 and body["errors"][0].startswith(error)


async def test_oversize_body_is_413(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client, max_body_bytes=1000)
    status, body = await upload(client, clock, spec(padding="x" * 2000))
    assert status == 413 and body["success"] is False and "larger than 1000 bytes" in body["errors"][0]


async def test_uploads_racing_for_a_dataset_get_distinct_revisions(
    make_client: AppClient, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await client_with_key(make_client)
    event_log = client.app[LOG]
    append, conflicts = event_log.append, []

    async def counting(*appends: Any, **kw: Any) -> Any:
        try:
            return await append(*appends, **kw)
        except WrongExpectedVersion as exc:
            conflicts.append(exc)
            raise

    monkeypatch.setattr(event_log, "append", counting)
    results = await asyncio.gather(*(upload(client, clock) for _ in range(10)))
    assert conflicts  # they did race, and the losers decided again
    assert sorted(int(body["flow_id"].rsplit("/", 1)[1]) for _, body in results) == list(range(1, 11))
    assert (await get(client, "me/id/latest"))[1]["id"] == "me/id/10"


# -- tokens ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _bad_tokens(clock: ManualClock) -> dict[str, tuple[str, str]]:
    now = clock.now() // 1_000_000
    claims = {"userid": "me", "exp": now + 3600}
    signing = _unsigned({"alg": "HS256", "typ": "JWT"}, claims)
    hs256 = signing + "." + _b64(hmac.new(public_pem(rsa_key()).encode(), signing.encode(), hashlib.sha256).digest())
    return {
        "malformed": ("not-a-token", "token refused: malformed token"),
        "wrong key": (token(clock, key=rsa_key(1)), "token refused: the signature does not verify"),
        "expired": (token(clock, ttl=-60), "token refused: expired"),
        "alg none": (_unsigned({"alg": "none", "typ": "JWT"}, claims) + ".", "token refused: only RS256 tokens are accepted"),
        "hs256 with the public key": (hs256, "token refused: only RS256 tokens are accepted"),
        "no userid": (jwt.encode({"exp": now + 60}, rsa_key(), algorithm="RS256"), "token refused: no userid"),
    }


@pytest.mark.parametrize("case", ["malformed", "wrong key", "expired", "alg none", "hs256 with the public key", "no userid"])
async def test_bad_tokens_are_401(make_client: AppClient, clock: ManualClock, case: str) -> None:
    client = await client_with_key(make_client)
    tok, error = _bad_tokens(clock)[case]
    status, body = await upload(client, clock, tok=tok)
    assert (status, body) == (401, {"success": False, "dataset_id": None, "flow_id": None, "errors": [error]})
    assert client.app[LOG].head == 0


async def test_missing_token_is_401(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    resp = await client.post("/source/upload", json=spec())
    assert resp.status == 401 and "No token" in (await resp.json())["errors"][0]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_token_for_another_user_is_403(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    status, body = await upload(client, clock, tok=token(clock, userid="you"))
    assert (status, body["errors"]) == (403, ["token not authorised for owner 'me'"])
    assert client.app[LOG].head == 0


async def test_token_in_the_jwt_query_parameter(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    resp = await client.post("/source/upload", params={"jwt": token(clock)}, json=spec())
    assert resp.status == 200 and (await resp.json())["flow_id"] == "me/id/1"


async def test_public_key_fetched_once_from_the_auth_server(
    make_client: AppClient, clock: ManualClock, aiohttp_server: Any
) -> None:
    fetches: list[str] = []
    failing = [True]

    async def key(request: web.Request) -> web.Response:
        fetches.append(request.path)
        if failing[0]:
            return web.Response(status=500)
        return web.Response(text=public_pem(rsa_key()))

    auth = web.Application()
    auth.router.add_get("/auth/public-key", key)
    server = await aiohttp_server(auth, host="127.0.0.1")
    client = await make_client(facets=(specs,), auth_server=f"127.0.0.1:{server.port}")
    status, body = await upload(client, clock)
    assert status == 503 and "cannot get the public key" in body["errors"][0]
    failing[0] = False
    assert (await upload(client, clock))[0] == 200
    assert (await upload(client, clock))[0] == 200
    assert fetches == ["/auth/public-key", "/auth/public-key"]  # the failure, then once
    assert (await client.get("/auth/public-key")).status == 404  # AUTH_SERVER serves it, not us


async def test_local_development_key_pair(make_client: AppClient, clock: ManualClock, settings: Settings) -> None:
    client = await make_client(facets=(specs,))
    resp = await client.get("/auth/public-key")
    assert resp.status == 200
    pem = await resp.read()
    path = Path(settings.sqlite_path).parent / "eventhub-auth-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = specs.load_or_create_private_key(path)
    assert serialization.load_pem_public_key(pem).public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert (await upload(client, clock, tok=token(clock, key=key)))[0] == 200


def test_token_command_mints_with_the_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("AUTH_SERVER", "EVENTHUB_AUTH_PUBLIC_KEY", "EVENTHUB_AUTH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'db' / 'eventhub.db'}")
    parser = argparse.ArgumentParser()
    specs.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["token", "--userid", "me", "--ttl", "600"])
    assert args.sync(args) == 0
    minted = capsys.readouterr().out.strip()
    key = specs.load_or_create_private_key(tmp_path / "db" / "eventhub-auth-key.pem")
    claims = jwt.decode(minted, key.public_key(), algorithms=["RS256"])
    assert claims["userid"] == "me" and claims["exp"] - claims["iat"] == 600
    bad = parser.parse_args(["token", "--userid", "me", "--ttl", "0"])
    assert bad.sync(bad) == 2


# -- pipeline events and the revision state -------------------------------------------------


async def test_update_events_drive_the_revision_state(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    assert await event(client, "me/id/1/0", "queue") == (200, {"success": "pending", "id": "me/id/1", "errors": []})
    assert (await get(client, "me/id/1"))[1]["state"] == "QUEUED"
    await event(client, "me/id/1/0", "start", log=["starting"])
    assert (await get(client, "me/id/1"))[1]["state"] == "INPROGRESS"
    stats = {"bytes": 10, "count_of_rows": 2, "dataset_name": "id", "hash": "abc"}
    assert (await event(client, "me/id/1/0", "finish", True, stats=stats, log=["done"]))[1]["success"] == "pending"
    assert (await get(client, "me/id/1"))[1]["state"] == "INPROGRESS"  # some done, some pending
    await event(client, "me/id/1/1", "progress")
    await event(client, "me/id/1/1", "finish", True)
    assert (await event(client, "me/id/1/2", "finish", True))[1]["success"] == "success"
    status, info = await get(client, "me/id/successful")
    assert status == 200 and info["id"] == "me/id/1" and info["state"] == "SUCCEEDED"
    assert info["stats"] == stats and info["logs"] == ["starting", "done"]
    assert info["pipelines"]["me/id/1/0"]["status"] == "SUCCEEDED" and info["pipelines"]["me/id/1/0"]["stats"] == stats


@pytest.mark.parametrize("order", list(itertools.permutations(["me/id/1/0", "me/id/1/1", "me/id/1/2"])))
async def test_every_finishing_order_succeeds(make_client: AppClient, clock: ManualClock, order: tuple[str, ...]) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    answers = [(await event(client, p, "finish", True))[1]["success"] for p in order]
    assert answers == ["pending", "pending", "success"]
    assert (await get(client, "me/id/latest"))[1]["state"] == "SUCCEEDED"


async def test_a_failed_pipeline_fails_its_dependants_and_the_revision(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    assert await event(client, "me/id/1/0", "finish", False, errors=["cannot load"]) == (
        200, {"success": "fail", "id": "me/id/1", "errors": []}
    )
    info = (await get(client, "me/id/1"))[1]
    dep = 'Dependency unsuccessful. Cannot run until dependency "me/id/1/0" is successfully executed'
    assert info["state"] == "FAILED"
    assert info["error_log"] == ["cannot load", dep, dep]
    assert {p: (v["status"], v["error_log"]) for p, v in info["pipelines"].items()} == {
        "me/id/1/0": ("FAILED", ["cannot load"]), "me/id/1/1": ("FAILED", [dep]), "me/id/1/2": ("FAILED", [dep]),
    }
    status, body = await event(client, "me/id/1/1", "start")
    assert (status, body) == (409, {"success": False, "id": "me/id/1", "errors": ["revision me/id/1 already finished (FAILED); event refused"]})
    assert (await get(client, "me/id/successful"))[0] == 404


async def test_one_output_failing_fails_the_revision_when_all_are_done(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    await event(client, "me/id/1/0", "finish", True)
    assert (await event(client, "me/id/1/1", "finish", False, errors=["bad"]))[1]["success"] == "pending"
    assert (await get(client, "me/id/1"))[1]["state"] == "INPROGRESS"
    assert (await event(client, "me/id/1/2", "finish", True))[1]["success"] == "fail"


async def test_latest_and_successful_follow_revisions(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    for p in ("me/id/1/0", "me/id/1/1", "me/id/1/2"):
        await event(client, p, "finish", True)
    await upload(client, clock)
    await event(client, "me/id/2/0", "finish", False)
    await upload(client, clock)
    assert (await get(client, "me/id/latest"))[1]["id"] == "me/id/3"
    assert (await get(client, "me/id/successful"))[1]["id"] == "me/id/1"
    assert [(await get(client, f"me/id/{n}"))[1]["state"] for n in (1, 2, 3)] == ["SUCCEEDED", "FAILED", "QUEUED"]


@pytest.mark.parametrize(
    "body, status, error",
    [
        ({"pipeline": "me/id/1/9", "event": "start"}, 404, "pipeline not found: me/id/1/9"),
        ({"pipeline": "nope", "event": "start"}, 404, "pipeline not found: nope"),
        ({"pipeline": "me/id/1/0", "event": "explode"}, 400, "bad update: Invalid enum value 'explode' - at `$.event`"),
        ({"event": "start"}, 400, "pipeline: required (the pipeline id)"),
        ({"pipeline": "me/id/1/0"}, 400, "bad update: Object missing required field `event`"),
        ({"pipeline": "me/id/1/0", "event": "finish"}, 400, "success: required (true or false) with a finish event"),
        ([1], 400, "bad update: Expected `object`, got `array`"),
    ],
)
async def test_bad_updates(make_client: AppClient, clock: ManualClock, body: Any, status: int, error: str) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    head = client.app[LOG].head
    resp = await client.post("/source/update", json=body)
    answer = await resp.json()
    assert resp.status == status and answer["success"] is False and answer["errors"][0].startswith(error)
    assert client.app[LOG].head == head


async def test_update_accepts_pipeline_id_and_dot_slash(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock)
    resp = await client.post("/source/update", json={"pipeline_id": "./me/id/1/0", "event": "start", "log": "a\nb"})
    assert resp.status == 200 and (await resp.json())["id"] == "me/id/1"
    assert (await get(client, "me/id/1"))[1]["logs"] == ["a", "b"]


async def test_malformed_update_json_is_400(make_client: AppClient) -> None:
    client = await client_with_key(make_client)
    resp = await client.post("/source/update", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["success"] is False


async def test_restart_keeps_everything(make_client: AppClient, clock: ManualClock) -> None:
    client = await client_with_key(make_client)
    await upload(client, clock, spec(schedule="every 1h"))
    await event(client, "me/id/1/0", "finish", True, log=["x"])
    before = (await get(client, "me/id/1"))[1]
    await client.close()
    again = await client_with_key(make_client)
    assert (await get(again, "me/id/1"))[1] == before
    assert again.app[specs.SPECS].datasets["me/id"].schedule_seconds == 3600
    assert (await upload(again, clock))[1]["flow_id"] == "me/id/2"

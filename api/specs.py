"""The DataHQ spec store's HTTP API: upload flow specs, record pipeline events, read revisions.

`POST /source/upload` (RS256 JWT in `Auth-Token` or `?jwt=`), `POST /source/update`,
`GET /source/{owner}/{dataset}/{revision|latest|successful}`, and `GET /auth/public-key`
when eventhub is its own (development) auth server. Handlers decode, call a decision in
`projections.specs`, append with the stream version they decided from (re-deciding on a
conflict), and answer in the original service's JSON shapes. `SpecError` is mapped to
HTTP in `_error_response`, the one place.

Also here: the auth keys (configured PEM, fetched once from `AUTH_SERVER`, or a local
development key pair) and the `eventhub token` command.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import msgspec
from aiohttp import ClientError, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from api.common import BodyTooLarge, Handler, json_response, read_body, route
from api.keys import CLOCK, HTTP, LOG, PROJECTIONS, SETTINGS, WORKERS
from eventhub.errors import SettingsError, WrongExpectedVersion
from eventhub.events import Event, NO_STREAM, StreamAppend, fact_event, iso_millis
from eventhub.settings import Settings, load_settings
from projections.specs import (
    FAILED,
    INPROGRESS,
    QUEUED,
    SUCCEEDED,
    DatasetState,
    Fact,
    PipelineDispatchAttempted,
    PipelineEventRecorded,
    PipelineUpdate,
    RevisionState,
    RevisionUploaded,
    SpecError,
    SpecsProjection,
    dataset_of_pipeline,
    decide_pipeline_event,
    decide_upload,
    decode_fact,
    owner_of,
    stream_of,
    validate_spec,
)

log = logging.getLogger(__name__)

SPECS = web.AppKey("specs", SpecsProjection)
_APPEND_ATTEMPTS = 20
_LEEWAY_SECONDS = 30
_KEY_FILE_NAME = "eventhub-auth-key.pem"
# `/source/update` answers the revision's state in the README's words: success/pending/fail
_UPDATE_STATUS = {QUEUED: "pending", INPROGRESS: "pending", SUCCEEDED: "success", FAILED: "fail"}


def setup(app: web.Application) -> None:
    from workers import specs as specs_workers  # the workers import this module's keys

    settings = app[SETTINGS]
    projection = SpecsProjection()
    app[SPECS] = projection
    app[PROJECTIONS].append(projection)
    app[AUTH] = AuthKeys(settings)
    app.router.add_post("/source/upload", upload)
    app.router.add_post("/source/update", update)
    app.router.add_get("/source/{owner}/{dataset}/{revision}", status)
    if not settings.auth_server:
        app.router.add_get("/auth/public-key", public_key)
    app[WORKERS].append(specs_workers.scheduler)
    if settings.dpp_url:
        app[WORKERS].append(specs_workers.dispatcher)


# -- errors: the one place SpecError becomes HTTP ------------------------------------------



def _error_response(shape: str, err: SpecError) -> web.Response:
    if shape == "upload":
        body: dict[str, Any] = {"success": False, "dataset_id": None, "flow_id": None, "errors": err.errors}
    elif shape == "update":
        body = {"success": False, "id": err.flow_id, "errors": err.errors}
    else:
        body = {"errors": err.errors}
    headers = {"WWW-Authenticate": 'Bearer realm="eventhub"'} if err.status == 401 else None
    return json_response(body, status=err.status, headers=headers)


def _answers(shape: str) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        return route(handler, SpecError, functools.partial(_error_response, shape))

    return wrap


# -- appending ------------------------------------------------------------------------------


async def append_decided(
    app: web.Application, dataset_id: str, decide: Callable[[DatasetState | None], list[Fact]], actor: str | None = None
) -> list[Event]:
    """Decide from the read model, append expecting the stream version decided from; on a
    conflict catch up and decide again (bounded). An empty decision appends nothing."""
    event_log = app[LOG]
    projection = app[SPECS]
    for _ in range(_APPEND_ATTEMPTS):
        ds = projection.datasets.get(dataset_id)
        facts = decide(ds)
        if not facts:
            return []
        expected = ds.version if ds is not None else NO_STREAM
        try:
            return await event_log.append(StreamAppend(stream_of(dataset_id), [fact_event(f, actor) for f in facts], expected))
        except WrongExpectedVersion:
            await event_log.hub.advance(await event_log.store.head())  # another node's commit
    raise SpecError(503, [f"too many concurrent changes to {dataset_id}; try again"])


async def _body(request: web.Request) -> bytes:
    try:
        return await read_body(request, request.app[SETTINGS].max_body_bytes)
    except BodyTooLarge as exc:
        raise SpecError(413, [str(exc)]) from None


# -- handlers -------------------------------------------------------------------------------


@_answers("upload")
async def upload(request: web.Request) -> web.Response:
    """A new revision of the spec's dataset: `{"success", "dataset_id", "flow_id", "errors"}`."""
    app = request.app
    userid = await authenticate(request)
    body = await _body(request)
    if not body.strip():
        raise SpecError(400, ["Received empty contents (make sure your content-type is correct)"])
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise SpecError(400, [f"the body is not valid JSON: {exc}"]) from None
    owner = owner_of(raw)
    if owner is not None and owner != userid:
        raise SpecError(403, [f"token not authorised for owner {owner!r}"])
    spec, errors = validate_spec(raw)
    if spec is None:
        raise SpecError(400, errors)
    clock = app[CLOCK]
    events = await append_decided(app, spec.dataset_id, lambda ds: decide_upload(ds, spec, raw, userid, clock.now()), userid)
    fact = decode_fact(events[0])
    assert isinstance(fact, RevisionUploaded)
    return json_response({"success": True, "dataset_id": spec.dataset_id, "flow_id": fact.flow_id, "errors": []})


@_answers("update")
async def update(request: web.Request) -> web.Response:
    """Record a pipeline event: `{"success": "pending"|"success"|"fail", "id", "errors"}`."""
    body = await _body(request)
    try:
        change = msgspec.json.decode(body, type=PipelineUpdate)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SpecError(400, [f"bad update: {exc}"]) from None
    name = change.pipeline_name
    if not name:
        raise SpecError(400, ["pipeline: required (the pipeline id)"])
    dataset_id = dataset_of_pipeline(name)
    if dataset_id is None:
        raise SpecError(404, [f"pipeline not found: {name}"])
    events = await append_decided(request.app, dataset_id, lambda ds: decide_pipeline_event(ds, change))
    fact = decode_fact(events[0])
    assert isinstance(fact, PipelineEventRecorded)
    ds = request.app[SPECS].datasets[dataset_id]
    rev = ds.revision(fact.flow_id.rpartition("/")[2])
    assert rev is not None
    return json_response({"success": _UPDATE_STATUS[rev.state], "id": rev.flow_id, "errors": []})


@_answers("status")
async def status(request: web.Request) -> web.Response:
    """A revision by number, `latest` or `successful`, in the contract's shape."""
    owner, dataset, selector = (request.match_info[k] for k in ("owner", "dataset", "revision"))
    ds = request.app[SPECS].datasets.get(f"{owner}/{dataset}")
    if ds is None:
        raise SpecError(404, [f"dataset not found: {owner}/{dataset}"])
    rev = ds.revision(selector)
    if rev is None:
        raise SpecError(404, [f"revision not found: {owner}/{dataset}/{selector}"])
    return json_response(await render_revision(request.app, ds, rev))


async def render_revision(app: web.Application, ds: DatasetState, rev: RevisionState) -> dict[str, Any]:
    events = await _read_versions(app, stream_of(ds.dataset_id), [rev.upload_version, *rev.detail_versions])
    uploaded = decode_fact(events[0]) if events else None
    spec: dict[str, Any] = {}
    if isinstance(uploaded, RevisionUploaded):
        spec = dict(uploaded.spec)
        meta = dict(spec.get("meta") or {})
        meta["update_time"] = iso_millis(rev.created_at)
        meta["create_time"] = iso_millis(ds.created_at)
        spec["meta"] = meta
    logs: list[Any] = []
    error_log: list[Any] = []
    pipeline_errors: dict[str, list[Any]] = {pid: [] for pid in rev.pipelines}
    for event in events[1:]:
        fact = decode_fact(event)
        if isinstance(fact, PipelineEventRecorded):
            logs.extend(fact.log)
            error_log.extend(fact.errors)
            pipeline_errors[fact.pipeline].extend(fact.errors)
        elif isinstance(fact, PipelineDispatchAttempted) and fact.error:
            logs.append(f"handing {fact.pipeline} to DPP, attempt {fact.attempt}: {fact.error}")
    return {
        "id": rev.flow_id,
        "spec_contents": spec,
        "modified": iso_millis(rev.modified),
        "state": rev.state,
        "logs": logs,
        "error_log": error_log,
        "stats": rev.stats,
        "pipelines": {
            pid: {"title": p.title, "status": p.status, "stats": p.stats, "error_log": pipeline_errors[pid]}
            for pid, p in rev.pipelines.items()
        },
    }


async def _read_versions(app: web.Application, stream: str, versions: list[int]) -> list[Event]:
    """These versions of one stream, in order (read as ranges, not one by one)."""
    wanted = set(versions)
    out: list[Event] = []
    version, last = min(versions), max(versions)
    store = app[LOG].store
    while version <= last:
        batch = await store.read_stream(stream, version, min(1000, last - version + 1))
        if not batch:
            break
        out.extend(e for e in batch if e.version in wanted and e.data is not None)
        version = batch[-1].version + 1
    return out


@_answers("status")
async def public_key(request: web.Request) -> web.Response:
    """The PEM public key tokens are checked with (only when there is no AUTH_SERVER)."""
    key = await request.app[AUTH].public_key(request.app)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return web.Response(body=pem, content_type="text/plain")


# -- auth ----------------------------------------------------------------------------------


class AuthKeys:
    """The RSA public key tokens are verified with: `EVENTHUB_AUTH_PUBLIC_KEY`, else fetched
    once from `http://$AUTH_SERVER/auth/public-key` (a failed fetch is retried on the next
    request), else the local development key pair in `key_file(settings)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key: rsa.RSAPublicKey | None = None
        self._lock = asyncio.Lock()
        if settings.auth_public_key:
            try:
                self._key = load_public_key(settings.auth_public_key.replace("\\n", "\n").encode())
            except ValueError as exc:
                raise SettingsError(f"EVENTHUB_AUTH_PUBLIC_KEY: {exc}") from None

    async def public_key(self, app: web.Application) -> rsa.RSAPublicKey:
        if self._key is not None:
            return self._key
        async with self._lock:
            if self._key is None:
                if self.settings.auth_server:
                    self._key = await self._fetch(app)
                else:
                    path = key_file(self.settings)
                    try:
                        private = await asyncio.to_thread(load_or_create_private_key, path)
                    except (OSError, ValueError) as exc:
                        log.error("specs: cannot use the development key file %s: %s", path, exc)
                        raise SpecError(503, [f"cannot use the development key file: {exc}"]) from None
                    self._key = private.public_key()
        return self._key

    async def _fetch(self, app: web.Application) -> rsa.RSAPublicKey:
        server = self.settings.auth_server.rstrip("/")
        url = f"{server if '://' in server else 'http://' + server}/auth/public-key"
        try:
            async with app[HTTP].get(url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                return load_public_key(await resp.content.read(64 * 1024))
        except (ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("specs: cannot get the public key from %s: %s", url, exc)
            raise SpecError(503, [f"cannot get the public key from the auth server: {exc or type(exc).__name__}"]) from None


AUTH = web.AppKey("specs_auth", AuthKeys)


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key (tokens are RS256)")
    return key


async def authenticate(request: web.Request) -> str:
    """The `userid` of a valid RS256 token from `Auth-Token` (or `?jwt=`); 401 otherwise."""
    token = request.headers.get("Auth-Token") or request.query.get("jwt") or ""
    if token.lower().startswith("bearer "):
        token = token[7:]
    token = token.strip()
    if not token:
        raise SpecError(401, ["No token: send it in the Auth-Token header (or the jwt query parameter)"])
    app = request.app
    key = await app[AUTH].public_key(app)
    return verify_token(token, key, app[CLOCK].now() / 1_000_000)


def verify_token(token: str, key: rsa.RSAPublicKey, now: float) -> str:
    """The token's `userid`; RS256 only, `exp`/`nbf` checked against `now` (seconds)."""
    try:
        claims = jwt.decode(
            token, key, algorithms=["RS256"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except jwt.InvalidAlgorithmError:
        raise SpecError(401, ["token refused: only RS256 tokens are accepted"]) from None
    except jwt.InvalidSignatureError:
        raise SpecError(401, ["token refused: the signature does not verify"]) from None
    except jwt.PyJWTError:
        raise SpecError(401, ["token refused: malformed token"]) from None
    exp, nbf = claims.get("exp"), claims.get("nbf")
    for name, value in (("exp", exp), ("nbf", nbf)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SpecError(401, [f"token refused: {name} is not a number"])
    if exp is not None and now > exp + _LEEWAY_SECONDS:
        raise SpecError(401, ["token refused: expired"])
    if nbf is not None and now < nbf - _LEEWAY_SECONDS:
        raise SpecError(401, ["token refused: not valid yet"])
    userid = claims.get("userid")
    if not isinstance(userid, str) or not userid:
        raise SpecError(401, ["token refused: no userid"])
    return userid


def key_file(settings: Settings) -> Path:
    """`EVENTHUB_AUTH_KEY_FILE`, else beside the sqlite database (or in the working directory)."""
    if settings.auth_key_file:
        return Path(settings.auth_key_file)
    if settings.backend == "sqlite":
        return Path(settings.sqlite_path).parent / _KEY_FILE_NAME
    return Path(_KEY_FILE_NAME)


def load_or_create_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The development key pair at `path`, created (mode 0600, atomically) when missing."""
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".eventhub-key-")  # mkstemp creates 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made one first: use theirs
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return loaded


def mint_token(key: rsa.RSAPrivateKey, userid: str, now: float, ttl: float) -> str:
    return jwt.encode({"userid": userid, "iat": int(now), "exp": int(now + ttl)}, key, algorithm="RS256")


# -- command line -----------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`eventhub token --userid U`: a development token signed with the local key pair."""
    p = sub.add_parser("token", help="mint an RS256 token with the local development key pair (for /source/upload)")
    p.add_argument("--userid", required=True, help="the userid claim; must equal the spec's meta.ownerid")
    p.add_argument("--ttl", type=int, default=86400, help="seconds the token stays valid (default: 86400)")
    p.add_argument("--key-file", help="private key file (default: $EVENTHUB_AUTH_KEY_FILE, else beside the sqlite database)")
    p.set_defaults(sync=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    if not args.userid or args.ttl <= 0:
        print("eventhub token: --userid must be non-empty and --ttl positive", file=sys.stderr)
        return 2
    settings = load_settings()
    if settings.auth_server or settings.auth_public_key:
        print(
            "eventhub token: note: this eventhub checks tokens against "
            + ("AUTH_SERVER" if settings.auth_server else "EVENTHUB_AUTH_PUBLIC_KEY")
            + ", which will refuse a locally minted token",
            file=sys.stderr,
        )
    path = Path(args.key_file) if args.key_file else key_file(settings)
    try:
        key = load_or_create_private_key(path)
    except (OSError, ValueError) as exc:
        print(f"eventhub token: cannot use the key file {path}: {exc}", file=sys.stderr)
        return 2
    print(mint_token(key, args.userid, time.time(), args.ttl))
    return 0


"""The one settings object, read from the environment once at start.

Names follow the contracts where they name one (`DATABASE_URL`, `AUTH_SERVER`,
`DPP_URL`); everything else is prefixed `EVENTHUB_`. A bad value raises
`SettingsError` with a message that names the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from eventhub.errors import SettingsError


class Settings(msgspec.Struct, kw_only=True):
    database_url: str = "sqlite:///eventhub.db"
    host: str = "127.0.0.1"
    port: int = 8080
    sqlite_synchronous: str = "FULL"
    snapshot_every: int = 10_000
    window_events: int = 10_000
    window_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 40 * 1024 * 1024
    long_poll_max_seconds: float = 60.0
    log_level: str = "INFO"
    admin_token: str = ""
    # facets
    channel_default_ttl_millis: int = 120 * 24 * 3600 * 1000
    ttl_sweep_seconds: float = 60.0
    channel_ws_buffer: int = 10_000
    channel_ws_heartbeat_seconds: float = 30.0  # a ping to every channel websocket; no pong by the next: dropped
    export_macaroon_key: str = ""
    export_target: str = "eventhub"
    export_allow: list[str] = []
    export_parallel: int = 16
    export_timeout_seconds: float = 10.0
    export_retries: int = 5
    export_max_body_bytes: int = 1024 * 1024
    export_response_max_bytes: int = 1024 * 1024
    export_backoff_seconds: float = 0.5
    export_backoff_max_seconds: float = 30.0
    export_lease_grace_seconds: float = 10.0
    auth_server: str = ""
    auth_public_key: str = ""
    dpp_url: str = ""
    auth_key_file: str = ""  # specs: local development key pair (default: beside the sqlite file)
    dpp_retries: int = 5
    dpp_backoff_seconds: float = 1.0
    webhook_allow: list[str] = []  # empty: EVENTHUB_EXPORT_ALLOW applies to callbacks too
    webhook_backoff_seconds: float = 1.0
    webhook_timeout_seconds: int = 30
    webhook_lease_grace_seconds: float = 10.0

    @property
    def backend(self) -> str:
        return "postgres" if self.database_url.startswith(("postgresql://", "postgres://")) else "sqlite"

    @property
    def sqlite_path(self) -> str:
        return sqlite_path(self.database_url)


# environment variable -> field; types come from the struct
_NAMES: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "AUTH_SERVER": "auth_server",
    "DPP_URL": "dpp_url",
}
for _field in Settings.__struct_fields__:
    if _field not in _NAMES.values():
        _NAMES["EVENTHUB_" + _field.upper()] = _field


def env_name(field: str) -> str:
    return next(name for name, f in _NAMES.items() if f == field)


def sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
    elif url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
    else:
        raise SettingsError(f"DATABASE_URL: {url!r} is not a sqlite:/// or postgresql:// URL")
    if not path:
        raise SettingsError("DATABASE_URL: sqlite URL has no file path (use sqlite:///path/to/file.db)")
    return path


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment (and keyword overrides), validated."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    types = dict(zip(Settings.__struct_fields__, _field_types()))
    for name, field in _NAMES.items():
        value = environ.get(name)
        if value is None or value == "":
            continue
        kind = types[field]
        try:
            if kind is int:
                raw[field] = int(value)
            elif kind is float:
                raw[field] = float(value)
            elif kind == list[str]:
                raw[field] = [part.strip() for part in value.split(",") if part.strip()]
            else:
                raw[field] = value
        except ValueError:
            raise SettingsError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
    raw.update(overrides)
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise SettingsError(str(exc)) from None
    _validate(settings)
    return settings


def _field_types() -> list[Any]:
    hints = msgspec.structs.fields(Settings)
    return [f.type for f in hints]


def _validate(s: Settings) -> None:
    def bad(field: str, why: str) -> SettingsError:
        return SettingsError(f"{env_name(field)}: {why}")

    if s.backend == "sqlite":
        sqlite_path(s.database_url)
    if s.sqlite_synchronous.upper() not in ("FULL", "EXTRA"):
        raise bad("sqlite_synchronous", "must be FULL or EXTRA (durability is not negotiable)")
    if not 0 <= s.port <= 65535:
        raise bad("port", f"{s.port} is not a TCP port")
    for field in ("snapshot_every", "window_events", "window_bytes", "max_body_bytes", "export_parallel", "channel_ws_buffer"):
        if getattr(s, field) <= 0:
            raise bad(field, "must be positive")
    if s.ttl_sweep_seconds <= 0:
        raise bad("ttl_sweep_seconds", "must be positive")
    if s.channel_ws_heartbeat_seconds <= 0:
        raise bad("channel_ws_heartbeat_seconds", "must be positive")
    if s.long_poll_max_seconds <= 0:
        raise bad("long_poll_max_seconds", "must be positive")
    for field in ("export_max_body_bytes", "export_response_max_bytes", "export_timeout_seconds"):
        if getattr(s, field) <= 0:
            raise bad(field, "must be positive")
    for field in ("export_retries", "export_backoff_seconds", "export_backoff_max_seconds", "export_lease_grace_seconds"):
        if getattr(s, field) < 0:
            raise bad(field, "must not be negative")
    for field in ("dpp_retries", "dpp_backoff_seconds"):
        if getattr(s, field) < 0:
            raise bad(field, "must not be negative")
    if s.webhook_backoff_seconds < 0:
        raise bad("webhook_backoff_seconds", "must not be negative")
    if not 1 <= s.webhook_timeout_seconds <= 1800:
        raise bad("webhook_timeout_seconds", "must be from 1 to 1800")
    if s.webhook_lease_grace_seconds <= 0:
        raise bad("webhook_lease_grace_seconds", "must be positive")
    if s.dpp_url and not s.dpp_url.startswith(("http://", "https://")):
        raise bad("dpp_url", f"{s.dpp_url!r} is not an http(s) URL")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise bad("log_level", "must be DEBUG, INFO, WARNING or ERROR")

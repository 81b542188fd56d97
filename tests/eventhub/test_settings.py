"""Settings: read once from the environment, every bad value named."""

from __future__ import annotations

import pytest

from eventhub.errors import SettingsError
from eventhub.settings import load_settings


def test_defaults_are_the_embedded_sqlite_log() -> None:
    s = load_settings({})
    assert s.backend == "sqlite" and s.sqlite_path == "eventhub.db" and s.port == 8080
    assert s.sqlite_synchronous == "FULL"


def test_environment_names() -> None:
    s = load_settings(
        {
            "DATABASE_URL": "postgresql://127.0.0.1/test",
            "EVENTHUB_PORT": "9000",
            "AUTH_SERVER": "auth:8000",
            "DPP_URL": "http://dpp",
            "EVENTHUB_EXPORT_ALLOW": "*.example.com, 10.0.0.0/8",
        }
    )
    assert (s.backend, s.port, s.auth_server, s.dpp_url) == ("postgres", 9000, "auth:8000", "http://dpp")
    assert s.export_allow == ["*.example.com", "10.0.0.0/8"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"EVENTHUB_PORT": "eighty"}, "EVENTHUB_PORT"),
        ({"EVENTHUB_PORT": "70000"}, "EVENTHUB_PORT"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///"}, "DATABASE_URL"),
        ({"EVENTHUB_SQLITE_SYNCHRONOUS": "OFF"}, "EVENTHUB_SQLITE_SYNCHRONOUS"),
        ({"EVENTHUB_SNAPSHOT_EVERY": "0"}, "EVENTHUB_SNAPSHOT_EVERY"),
        ({"EVENTHUB_LONG_POLL_MAX_SECONDS": "soon"}, "EVENTHUB_LONG_POLL_MAX_SECONDS"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(env)

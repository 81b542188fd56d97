"""bench/replay.py on a tiny log: it generates, verifies, rebuilds and prints its table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import replay


def test_a_smoke_run_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "bench.db"
    code = replay.main(["--events", "3000", "--path", str(db)])
    out = capsys.readouterr().out
    assert code in (0, 1)  # a ratio below target on a busy machine is a result, not a crash
    assert "log: 3,000 mixed events" in out and "MB on disk" in out
    assert "verify: events/s (chain walk)" in out and "replay: events/s (full rebuild)" in out
    assert "sqlite3 SELECT every row (ceiling)" in out
    # --reuse measures the same file again without generating
    assert replay.main(["--events", "3000", "--path", str(db), "--reuse"]) in (0, 1)
    assert "generated" not in capsys.readouterr().out

"""What every benchmark shares: timing loops bounded in time and count, and the table."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

OUT = Path(__file__).parent / "out"


@dataclass
class Row:
    question: str
    measured: float
    reference_name: str
    reference: float
    unit: str
    target: float  # ratio target; `higher` says which side passes (0 with higher: no target)
    higher: bool = True
    margin: float | None = None  # when set, the target is `measured - reference <= margin` (unit's own)

    @property
    def ratio(self) -> float:
        return self.measured / self.reference if self.reference else float("inf")

    @property
    def holds(self) -> bool:
        if self.margin is not None:
            return self.measured - self.reference <= self.margin
        return self.ratio >= self.target if self.higher else self.ratio <= self.target

    @property
    def target_text(self) -> str:
        """The target as the table prints it: `>= 0.50`, `<= 1.50`, `+<= 1 s`, or `-`."""
        if self.margin is not None:
            return f"+<={_number(self.margin)} {self.unit.split('/')[0]}"
        if self.higher and not self.target:
            return "-"
        return f"{'>=' if self.higher else '<='}{self.target:>5.2f}"


def _number(value: float) -> str:
    """Big values with thousands separators, small ones with three significant digits."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(title: str, rows: Sequence[Row]) -> None:
    print(f"\n{title} — {time.strftime('%Y-%m-%d')} — {machine()}")
    header = f"| {'question':<38} | {'measured':>12} | {'reference':<34} | {'ref value':>12} | {'ratio':>6} | {'target':>9} | holds |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if not r.reference:  # a figure with nothing to compare it with in this run
            print(f"| {r.question:<38} | {_number(r.measured):>12} | {'-':<34} | {'-':>12} | {'-':>6} | {'-':>9} | {'-':>5} |")
            continue
        print(
            f"| {r.question:<38} | {_number(r.measured):>12} | {r.reference_name:<34} | {_number(r.reference):>12} | "
            f"{r.ratio:>6.2f} | {r.target_text:>9} | {'yes' if r.holds else 'NO':>5} |"
        )
    print(f"(units: {', '.join(sorted({r.unit for r in rows}))})")


def save(name: str, rows: Sequence[Row]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "rows": [row_dict(r) for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def row_dict(r: Row) -> dict[str, object]:
    """A row as JSON: its fields plus `ratio` and `holds`."""
    return {**asdict(r), "ratio": r.ratio, "holds": r.holds}

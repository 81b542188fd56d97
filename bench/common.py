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
    target: float  # ratio target; `higher` says which side passes
    higher: bool = True

    @property
    def ratio(self) -> float:
        return self.measured / self.reference if self.reference else float("inf")

    @property
    def holds(self) -> bool:
        return self.ratio >= self.target if self.higher else self.ratio <= self.target


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(title: str, rows: Sequence[Row]) -> None:
    print(f"\n{title} — {time.strftime('%Y-%m-%d')} — {machine()}")
    header = f"| {'question':<38} | {'measured':>12} | {'reference':<34} | {'ref value':>12} | {'ratio':>6} | {'target':>7} | ok |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        sign = ">=" if r.higher else "<="
        print(
            f"| {r.question:<38} | {r.measured:>12,.0f} | {r.reference_name:<34} | {r.reference:>12,.0f} | "
            f"{r.ratio:>6.2f} | {sign}{r.target:>5.2f} | {'yes' if r.holds else 'NO':>2} |"
        )
    print(f"(units: {', '.join(sorted({r.unit for r in rows}))})")


def save(name: str, rows: Sequence[Row]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "rows": [{**asdict(r), "ratio": r.ratio, "holds": r.holds} for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path

"""Every benchmark in one run (`make bench`): one table, bench/results.json, bench/results.png.

    python -m bench.all                 # the full run (about 6 minutes on 2 cores)
    python -m bench.all --quick         # every script end to end on tiny sizes
    python -m bench.all --only insert,fanout

Each figure is measured beside its ceiling or peer in the same run and judged as a ratio
(or, for cold start and memory, as a difference), since absolute numbers drift from run
to run on a shared machine. The rows, in the issue's order:

1-2 `bench.insert`     durable HTTP inserts vs the aiohttp ceiling, and vs NATS JetStream
3-4 `bench.append`     library appends vs `eventsourcing` and plain sqlite3
5-6 `bench.fanout`     1,000 websocket subscribers vs a bare aiohttp broadcast server
7   `bench.replay`     verify and a full rebuild of a 1,000,000-event log vs sqlite3 reads
8   `bench.coldstart`  start on that log with snapshots vs on an empty log
9   `bench.memory`     RSS with 10,000 idle websocket subscribers vs none
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import Row, machine, print_table, row_dict

HERE = Path(__file__).parent
STEPS = ("insert", "append", "fanout", "replay", "coldstart", "memory")
REPLAY_TARGET = 0.3  # the target (bench/replay.py run alone judges by its own)


@dataclass
class Sizes:
    seconds: float  # per HTTP measurement
    append_seconds: float  # per library append measurement
    subscribers: int  # fan-out
    rate: float  # fan-out inserts/s in the latency run
    fan_seconds: float
    burst: int
    events: int  # the replay and cold start log
    repeats: int  # cold starts per log
    idle: int  # memory: idle subscribers


FULL = Sizes(seconds=10.0, append_seconds=3.0, subscribers=1000, rate=100.0, fan_seconds=10.0, burst=1000, events=1_000_000, repeats=3,
             idle=10_000)
QUICK = Sizes(seconds=1.0, append_seconds=0.2, subscribers=20, rate=50.0, fan_seconds=0.4, burst=20, events=2000, repeats=1, idle=40)


def _append_rows(seconds: float) -> list[Row]:
    from bench import append

    rows = {r.question: r for r in append.main(["--seconds", str(seconds)])}
    return [
        replace(rows["sqlite: 64 appenders x 1 event"], question="library append, concurrent (64 x 1 event)"),
        replace(rows["sqlite: 1 appender x 100 events"], question="library append, batched (1 x 100 events)"),
    ]


def replay_rows(log: Path, rounds: int) -> list[Row]:
    """bench.replay's measurements on an existing log (its `measure`, medians of `rounds`),
    with the issue's target."""
    from bench import replay

    read, read_s, verify_s, rebuild_s = replay.measure(log, rounds)
    print(f"bench.replay: {read:,} events: SELECT {read_s:.2f} s, verify {verify_s:.2f} s, rebuild {rebuild_s:.2f} s")
    ceiling = read / read_s
    label = f"{read / 1e6:g}M" if read >= 100_000 else f"{read:,}"
    reference = "sqlite3 SELECT every row (ceiling)"
    return [
        Row(f"replay: verify, {label} events", read / verify_s, reference, ceiling, "events/s", REPLAY_TARGET),
        Row(f"replay: full rebuild, {label} events", read / rebuild_s, reference, ceiling, "events/s", REPLAY_TARGET),
    ]


def run(sizes: Sizes, only: tuple[str, ...], log_dir: Path) -> tuple[dict[str, list[Row]], dict[str, str], dict[str, float]]:
    from bench import coldstart, fanout, insert, memory, replay
    from bench.load import tool

    rows: dict[str, list[Row]] = {}
    errors: dict[str, str] = {}
    took: dict[str, float] = {}
    log = log_dir / "log.db"

    def step(name: str, fn: Callable[[], list[Row]]) -> None:
        if name not in only:
            return
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            rows[name] = fn()
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
        took[name] = time.monotonic() - started
        print(f"--- {name}: {took[name]:.0f} s", flush=True)

    def shared_log() -> Path:
        if not log.exists():
            seconds = asyncio.run(replay.generate(log, sizes.events))
            print(f"generated a {sizes.events:,}-event log in {seconds:.1f} s")
        return log

    step("insert", lambda: insert.run(sizes.seconds, 64, tool(), start_nats=sizes is FULL))
    step("append", lambda: _append_rows(sizes.append_seconds))
    step("fanout", lambda: fanout.run(sizes.subscribers, 2, sizes.rate, sizes.fan_seconds, sizes.burst))
    step("replay", lambda: replay_rows(shared_log(), 1 if sizes is QUICK else replay.ROUNDS))
    step("coldstart", lambda: coldstart.run(sizes.events, shared_log(), reuse=True, repeats=sizes.repeats))
    step("memory", lambda: memory.run(sizes.idle, 2, compare=sizes is FULL))
    return rows, errors, took


def chart(rows: list[Row], path: Path, title: str) -> None:
    """Horizontal bars: each row's ratio to its reference (log scale), the target as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.6))
    labels, ratios, colors = [], [], []
    for r in rows:
        labels.append(r.question)
        ratios.append(max(r.ratio, 1e-3) if r.reference else 1.0)
        no_target = r.margin is None and r.higher and not r.target
        colors.append("#9e9e9e" if no_target else "#2e7d32" if r.holds else "#c62828")
    targets: list[float | None] = []
    for r in rows:
        if r.margin is not None and r.reference:
            targets.append((r.reference + r.margin) / r.reference)
        elif r.higher and not r.target:
            targets.append(None)
        else:
            targets.append(r.target)
    known = ratios + [t for t in targets if t]
    lo, hi = min(min(known) / 2, 0.5), max(max(known) * 2, 2.0)
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [v - lo for v in ratios], left=lo, color=colors, height=0.6)
    for yi, r, ratio, target in zip(y, rows, ratios, targets):
        if target:
            ax.plot([target, target], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
        ax.text(max(ratio, target or 0.0) * 1.06, yi, f"{r.ratio:.2f}x", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 30, 100, 300) if lo <= t <= hi]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("measured / reference (log scale); black tick: target; green holds, red does not, grey: no target")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict[str, Any]) -> str:
    """The table of a results.json as README markdown, with its date, machine and load generator."""
    from bench.common import _number

    lines = [
        f"{payload['date']} — {payload['machine']} — load generator: {payload['load_generator']} — "
        f"{payload['seconds']['total']:.0f} s in all",
        "",
        "| question | measured | reference | ratio | target | holds |",
        "| --- | ---: | --- | ---: | ---: | :---: |",
    ]
    for r in payload["rows"]:
        row = Row(**{k: v for k, v in r.items() if k not in ("ratio", "holds")})
        holds = "—" if row.target_text == "-" else ("yes" if row.holds else "**no**")
        target = " ".join(row.target_text.replace(">=", "≥ ").replace("<=", "≤ ").split())
        lines.append(
            f"| {row.question} | {_number(row.measured)} {row.unit} | {row.reference_name}: {_number(row.reference)} | "
            f"{row.ratio:.2f} | {target} | {holds} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs, measures nothing")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.png go (default bench/)")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON", help="print that run's table as markdown, run nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(STEPS)})")
    sizes = QUICK if args.quick else FULL
    from bench.load import tool

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        rows_by_step, errors, took = run(sizes, only, Path(tmp))
    total = time.monotonic() - started
    rows = [r for name in STEPS for r in rows_by_step.get(name, [])]
    date = time.strftime("%Y-%m-%d %H:%M")
    title = f"eventhub benchmarks{' (quick: not measurements)' if args.quick else ''}"
    print_table(title, rows)
    print(f"load generator: {tool()}; {total:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in took.items())})")
    for name, error in errors.items():
        print(f"FAILED {name}: {error}")

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": date,
        "machine": machine(),
        "quick": args.quick,
        "load_generator": tool(),
        "seconds": {"total": round(total, 1), **{k: round(v, 1) for k, v in took.items()}},
        "errors": errors,
        "rows": [row_dict(r) for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if rows:
        chart(rows, args.out / "results.png", f"{title} — {date} — {machine()}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

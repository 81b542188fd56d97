"""py-spy around a benchmark's measured window, and a summary of where the time went.

    python -m bench.insert --profile bench/out/profile      # records eventhub under load
    python -m bench.profile bench/out/profile/insert-round1.txt    # the summary

`recorder(pid, path)` samples the server process (py-spy `--format raw`: one collapsed
stack per line with its sample count) until the block ends. The summary shows the share
of samples by leaf function (self time), by frame anywhere on the stack (inclusive time),
and by package.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.servers import ROOT, spawn

RATE = 250  # samples per second


def py_spy() -> str | None:
    venv = ROOT / ".venv" / "bin" / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


@contextmanager
def recorder(pid: int, path: Path, idle: bool = False) -> Iterator[None]:
    """Sample `pid` while the block runs; collapsed stacks to `path` (nothing if no py-spy)."""
    exe = py_spy()
    if exe is None:
        print("py-spy is not installed: no profile recorded")
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw", "--output", str(path),
           "--nonblocking", "--duration", "600"]
    if idle:
        cmd.append("--idle")
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not path.exists():
            print(f"py-spy wrote no profile: {err.decode()[-300:]}")
        else:
            print(f"profile: {path}")


def _frames(stack: str) -> list[str]:
    # py-spy raw: "process;thread;func (file:line);func (file:line) count"
    return [f for f in stack.split(";") if " (" in f]


def _short(frame: str) -> str:
    func, _, where = frame.partition(" (")
    file = where.split(":")[0]
    for marker in ("site-packages/", str(ROOT) + os.sep, "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file})"


def _package(frame: str) -> str:
    where = frame.partition(" (")[2]
    if "site-packages/" in where:
        return where.split("site-packages/", 1)[1].split("/")[0]
    if str(ROOT) in where:
        return where.split(str(ROOT) + os.sep, 1)[1].split("/")[0] + "/"
    if "/lib/python3" in where:
        return "stdlib:" + where.split("/lib/python3", 1)[1].split("/")[1].split(":")[0]
    return where.split(":")[0] or "?"


def summarize(path: Path, top: int = 25) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        total += count
        if not frames:
            idle += count
            continue
        leaf = _short(frames[-1])
        self_time[leaf] += count
        packages[_package(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total:,} samples at {RATE}/s ({total / RATE:.1f} s of CPU sampled)"]
    for title, counter in (("self (leaf frame)", self_time), ("inclusive", inclusive), ("by package (leaf)", packages)):
        out.append(f"\n{title}:")
        for name, count in counter.most_common(top):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.paths:
        print(summarize(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

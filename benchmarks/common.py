"""What every benchmark section shares: timing, process runs, the machine report.

A section module (``bench_matrix``, ``bench_peers``, ``bench_growth``) exposes
``run(*, quick: bool, workdir: Path) -> Section``; ``run.py`` calls each one
and writes ``benchmarks/RESULTS.md`` from the sections it gets back.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import platform
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import creditmeter

now_ns = time.perf_counter_ns
REDIS_URL = os.environ.get("CREDITMETER_BENCH_REDIS", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CREDITMETER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


# --- what a section hands back ----------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One line of the targets table: what was asked, what was measured, whether it holds.

    ``met`` is ``None`` where the line is a figure with no target.
    """

    name: str
    measured: str
    met: bool | None


@dataclass
class Section:
    """A benchmark section: its Markdown, its target lines and raw data for plots."""

    title: str
    markdown: str
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# --- timing -------------------------------------------------------------------------


def percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def timed_batch(fn: Callable[[], object], ops: int) -> float:
    """Run ``fn`` ``ops`` times; return µs per call."""
    start = now_ns()
    for _ in range(ops):
        fn()
    return (now_ns() - start) / ops / 1000


@dataclass
class Series:
    """µs/op of repeated batches of one operation."""

    name: str
    per_op_us: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_op_us)

    @property
    def ops_per_s(self) -> float:
        return 1e6 / self.median


def interleaved(
    series: dict[str, Callable[[], object]], *, ops: int, repeats: int, warmup: int = 1
) -> dict[str, Series]:
    """Time each callable in batches of ``ops``, one batch of each per round, order rotated.

    Rotating the order and interleaving the rounds keeps a slow minute of a
    shared machine from landing on one series only. The GC stays on: users
    run with it on.
    """
    names = list(series)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            timed_batch(series[name], max(1, ops // 10))
    results = {name: Series(name) for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].per_op_us.append(timed_batch(series[name], ops))
    gc.collect()
    return results


# --- several processes --------------------------------------------------------------


def run_processes(
    target: Callable[..., None],
    count: int,
    args: tuple[Any, ...],
    *,
    timeout: float = 300.0,
    context: Any = None,
) -> list[dict[str, Any]]:
    """Start ``count`` processes of ``target(index, barrier, queue, *args)``.

    Each process must call ``barrier.wait()`` once it is ready to start the
    timed part, then put exactly one dict on ``queue`` (``{"fatal": ...}`` if
    it failed). Returns the dicts sorted by ``"index"``; raises if a process
    failed or did not report in time. ``context`` is a multiprocessing
    context (default: spawn; a forkserver with preloaded modules starts
    workers that import slow packages faster).
    """
    if context is None:
        context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    queue = context.Queue()
    procs = [
        context.Process(target=target, args=(index, barrier, queue, *args))
        for index in range(count)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [queue.get(timeout=timeout) for _ in procs]
        for proc in procs:
            proc.join(timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    fatal = [report["fatal"] for report in reports if "fatal" in report]
    if fatal:
        raise RuntimeError(f"a benchmark process failed: {fatal[0]}")
    return sorted(reports, key=lambda report: report["index"])


# --- the report -----------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def source_state() -> str:
    """The commit of the checkout creditmeter is imported from, and uncommitted src changes."""
    root = Path(creditmeter.__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"{root} (not a git checkout)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    if not changed:
        return f"commit {head}, src/ unchanged"
    return f"commit {head} with uncommitted changes in: {', '.join(changed)}"


def versions(names: list[str]) -> str:
    """``name version`` for each distribution, or ``name (not installed)``."""
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def load_average() -> str:
    """The 1/5/15-minute load averages, where the OS tells them."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_lines(packages: list[str]) -> list[str]:
    """Markdown bullet lines: date, CPUs, OS, Python, SQLite, package versions, source."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Date: {stamp}",
        f"- CPUs (usable): {cpus}; CPU: {cpu_model()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        (
            f"- Python {platform.python_version()} ({platform.python_implementation()}), "
            f"SQLite {sqlite3.sqlite_version}"
        ),
        f"- Packages: {versions(['creditmeter', 'attrs', 'cattrs', 'tenacity', *packages])}",
        f"- creditmeter source: {source_state()}",
        f"- Load average at the start (1/5/15 min): {load_average()}",
    ]


def fmt(value: float, digits: int = 1) -> str:
    """A number with thousands separators and ``digits`` decimals."""
    return f"{value:,.{digits}f}"


def verdict(met: bool | None) -> str:
    """How a target line reads in the table."""
    return "-" if met is None else ("met" if met else "not met")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)

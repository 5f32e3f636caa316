"""The report: number formats, Markdown tables, the machine block, RESULTS.md and the plot."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import creditmeter

if TYPE_CHECKING:
    from harness.section import Section


def fmt(value: float, digits: int = 1) -> str:
    """A number with thousands separators and ``digits`` decimals."""
    return f"{value:,.{digits}f}"


def verdict(met: bool | None) -> str:
    """How a target's verdict reads in the table."""
    return "-" if met is None else ("met" if met else "not met")


def yes(ok: bool) -> str:
    """A check's outcome as the tables write it."""
    return "yes" if ok else "NO"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def version(name: str) -> str:
    """The installed version of a distribution, or ``""``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def versions(names: Sequence[str]) -> str:
    """``name version`` for each distribution, or ``name (not installed)``."""
    return ", ".join(f"{name} {version(name) or '(not installed)'}" for name in names)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise OSError(done.stderr)
    return done.stdout


def source_state() -> str:
    """The commit of the checkout creditmeter is imported from, and uncommitted src changes."""
    root = Path(creditmeter.__file__).resolve().parents[2]
    try:
        head = _git(root, "rev-parse", "--short", "HEAD").strip()
        dirty = _git(root, "status", "--porcelain", "--", "src").splitlines()
    except OSError:
        return f"{root} (not a git checkout)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    if not changed:
        return f"commit {head}, src/ unchanged"
    return f"commit {head} with uncommitted changes in: {', '.join(changed)}"


def machine_lines(packages: Sequence[str]) -> list[str]:
    """Markdown bullets: date, CPUs, OS, Python, SQLite, package versions, source, load."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return [
        f"- Date: {stamp}",
        f"- CPUs (usable): {cpus}; CPU: {_cpu_model()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        (
            f"- Python {platform.python_version()} ({platform.python_implementation()}), "
            f"SQLite {sqlite3.sqlite_version}"
        ),
        f"- Packages: {versions(['creditmeter', 'attrs', 'cattrs', 'tenacity', *packages])}",
        f"- creditmeter source: {source_state()}",
        f"- Load average at the start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load)}",
    ]


def page(
    outcomes: Sequence[tuple[str, float, Section | None, str]],
    *,
    head: list[str],
    plot_name: str | None,
    plot_error: str,
) -> str:
    """RESULTS.md: the head block, every target, the plot, then each section.

    An outcome is ``(name, seconds, section or None, error)``.
    """
    rows = []
    for name, _, section, error in outcomes:
        if section is None:
            rows.append([name, "the section ran", f"failed: {error}", "not met"])
        else:
            rows += [[name, t.name, t.measured, verdict(t.met)] for t in section.targets]
    lines = [
        "# creditmeter benchmarks",
        "",
        *head,
        "",
        "## Targets",
        "",
        table(["section", "target", "measured", "verdict"], rows),
        "",
    ]
    if plot_name or plot_error:
        picture = f"![throughput against processes, per store]({plot_name})"
        shown = picture if plot_name else f"No plot: {plot_error}"
        lines += ["## Throughput against processes", "", shown, ""]
    for name, _, section, error in outcomes:
        if section is not None:
            lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
        else:
            lines += [f"## {name}: failed", "", f"`{error}`", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Throughput against writers, a line per store; one panel per mode (hot user, a user each)."""
    import matplotlib as mpl  # noqa: PLC0415 - only the plot needs it, and it is slow to import

    mpl.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    counts, modes, threads = data["processes"], data["modes"], set(data["threads"])
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True)
    for axis, (mode, label) in zip(figure.axes, modes.items(), strict=True):
        for store, values in data["throughput"][mode].items():
            name = f"{store} (threads)" if store in threads else store
            axis.plot(counts[: len(values)], values, marker="o", label=name)
        axis.set_title(label)
        axis.set_xlabel("writers at once (processes; MemoryStore: threads)")
        axis.set_xticks(counts)
        axis.set_yscale("log")
        axis.grid(visible=True, which="both", alpha=0.3)
    axes[0].set_ylabel("charges per second (all processes, log scale)")
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize="small")
    figure.suptitle("creditmeter: throughput against processes, per store")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)

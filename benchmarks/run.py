"""The one benchmark command (issue 9): every section, one report, one plot.

Usage, from the repository root::

    benchmarks/.venv/bin/python benchmarks/run.py [--quick] [--only matrix,peers,growth]
                                                   [--output PATH] [--dir DIR]

Runs the sections in order (``bench_matrix``, ``bench_peers``, ``bench_growth``;
each exposes ``run(*, quick, workdir) -> common.Section``) and writes
``benchmarks/RESULTS.md`` (the machine, a table of every target, each section)
and ``benchmarks/throughput.png`` (throughput against processes, per store).
``--quick`` writes ``RESULTS-quick.md`` and ``throughput-quick.png`` instead, so
a quick run never overwrites the full results. A section that cannot be
imported or raises is reported as failed, the others still run, and the
command exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent
SECTIONS = ("matrix", "peers", "growth")
PACKAGES = ["redis", "psycopg", "openai", "pydantic", "litellm", "pyrate-limiter", "matplotlib"]


@dataclass
class Outcome:
    """What one section gave: its Section, or the error that stopped it."""

    name: str
    seconds: float
    section: common.Section | None = None
    error: str = ""


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--only`` checked against the known sections."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the report (default: benchmarks/RESULTS.md, with --quick RESULTS-quick.md)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="where the sections put their files: a temporary folder made inside DIR "
        "(default: the system's temporary folder), removed afterwards",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        parser.error(f"--only takes some of {','.join(SECTIONS)}; got {args.only!r}")
    args.sections = [name for name in SECTIONS if name in chosen]
    return args


def run_section(name: str, *, quick: bool, workdir: Path) -> Outcome:
    """Import ``bench_<name>`` and run it; a failure is recorded, not raised."""
    started = time.monotonic()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        module = importlib.import_module(f"bench_{name}")
        section = module.run(quick=quick, workdir=workdir)
        if not isinstance(section, common.Section):
            raise TypeError(f"bench_{name}.run returned {type(section).__name__}, not a Section")
    except Exception as exc:
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}".strip()
        return Outcome(name, time.monotonic() - started, error=error)
    seconds = time.monotonic() - started
    print(f"== {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return Outcome(name, seconds, section=section)


def plot(data: dict[str, Any], path: Path) -> None:
    """Throughput against processes, a line per store; hot user and distinct users side by side."""
    import matplotlib as mpl  # noqa: PLC0415 - only the plot needs it, and it is slow to import

    mpl.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    processes = data["processes"]
    modes = data.get("modes", {mode: mode for mode in data["throughput"]})
    threads = set(data.get("threads", []))
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True)
    for axis, (mode, label) in zip(figure.axes, modes.items(), strict=True):
        for store, values in data["throughput"][mode].items():
            name = f"{store} (threads)" if store in threads else store
            axis.plot(processes[: len(values)], values, marker="o", label=name)
        axis.set_title(label)
        axis.set_xlabel("writers at once (processes; MemoryStore: threads)")
        axis.set_xticks(processes)
        axis.set_yscale("log")
        axis.grid(visible=True, which="both", alpha=0.3)
    axes[0].set_ylabel("charges per second (all processes, log scale)")
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize="small")
    figure.suptitle("creditmeter: throughput against processes, per store")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(
    outcomes: list[Outcome],
    *,
    command: str,
    machine: list[str],
    seconds: float,
    quick: bool,
    plot_name: str | None,
    plot_error: str,
) -> str:
    """The whole report: command, machine, every target, the plot, then each section."""
    rows = []
    for outcome in outcomes:
        if outcome.section is None:
            rows.append([outcome.name, "the section ran", f"failed: {outcome.error}", "not met"])
            continue
        rows += [
            [outcome.name, target.name, target.measured, common.verdict(target.met)]
            for target in outcome.section.targets
        ]
    timings = ", ".join(f"{outcome.name} {outcome.seconds:.0f} s" for outcome in outcomes)
    lines = [
        "# creditmeter benchmarks",
        "",
        f"- Command: `{command}` ({'quick' if quick else 'full'} run, {seconds:.0f} s: {timings})",
        *machine,
        "",
        "## Targets",
        "",
        common.table(["section", "target", "measured", "verdict"], rows),
        "",
    ]
    if plot_name is not None:
        lines += [
            "## Throughput against processes",
            "",
            f"![throughput against processes, per store]({plot_name})",
            "",
        ]
    elif plot_error:
        lines += ["## Throughput against processes", "", f"No plot: {plot_error}", ""]
    for outcome in outcomes:
        if outcome.section is not None:
            lines += [f"## {outcome.section.title}", "", outcome.section.markdown.rstrip(), ""]
        else:
            lines += [f"## {outcome.name}: failed", "", f"`{outcome.error}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, write the report and the plot; 1 if any section failed."""
    args = parse(argv)
    if args.output is not None:
        output = args.output.resolve()
        plot_path = output.with_name(f"{output.stem}-throughput.png")
    else:
        suffix = "-quick" if args.quick else ""
        output = HERE / f"RESULTS{suffix}.md"
        plot_path = HERE / f"throughput{suffix}.png"
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["benchmarks/.venv/bin/python benchmarks/run.py", *words])
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = common.machine_lines(PACKAGES)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="creditmeter-bench-", dir=args.dir))
    outcomes = []
    try:
        for name in args.sections:
            outcomes.append(run_section(name, quick=args.quick, workdir=workdir / name))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - started
    machine.append(f"- Files of the run in a temporary folder inside: `{workdir.parent}`")
    plotted = [o.section.data for o in outcomes if o.section and "throughput" in o.section.data]
    plot_name: str | None = None
    plot_error = ""
    if plotted:
        try:
            plot(plotted[0], plot_path)
            plot_name = plot_path.name
        except Exception as exc:
            traceback.print_exc()
            plot_error = f"{type(exc).__name__}: {exc}"
    report = render(
        outcomes,
        command=command,
        machine=machine,
        seconds=seconds,
        quick=args.quick,
        plot_name=plot_name,
        plot_error=plot_error,
    )
    output.write_text(report, encoding="utf-8")
    print(f"wrote {output}" + (f" and {plot_path}" if plot_name else ""), file=sys.stderr)
    failed = [o.name for o in outcomes if o.section is None] + (["plot"] if plot_error else [])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

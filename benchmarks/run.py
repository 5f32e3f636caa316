"""The one benchmark command: every scenario, one report, one plot.

``benchmarks/.venv/bin/python benchmarks/run.py [--quick] [--only matrix,peers,...]
[--output PATH] [--dir DIR]`` runs the scenarios (``scenarios/<name>.py``, each a
``run(*, quick, workdir) -> Section``) and writes ``RESULTS.md`` and
``throughput.png`` (``--quick``: tiny counts, ``RESULTS-quick.md`` and
``throughput-quick.png``). A scenario that fails is reported as failed, the
others still run, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from harness import Section, procs
from harness.report import machine_lines, page, plot

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "matrix",
    "peers",
    "growth",
    "contention",
    "metering",
    "holds",
    "asgi",
    "batches",
    "usage",
    "cluster",
    "api",
)
PACKAGES = ["redis", "psycopg", "openai", "pydantic", "litellm", "pyrate-limiter", "fastapi"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--only`` checked against the known sections."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (well under a minute)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)}",
    )
    parser.add_argument("--output", type=Path, help="the report (default: RESULTS[-quick].md)")
    parser.add_argument("--dir", help="make the run's temporary folder inside DIR")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    if not chosen or set(chosen) - set(SECTIONS):
        parser.error(f"--only takes some of {','.join(SECTIONS)}; got {args.only!r}")
    args.sections = [name for name in SECTIONS if name in chosen]
    return args


def run_section(name: str, *, quick: bool, workdir: Path) -> tuple[str, float, Section | None, str]:
    """Import ``scenarios.<name>`` and run it: (name, seconds, section or None, error)."""
    started = time.monotonic()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        section = importlib.import_module(f"scenarios.{name}").run(quick=quick, workdir=workdir)
        if not isinstance(section, Section):
            raise TypeError(f"scenarios.{name}.run returned {type(section).__name__}")
    except Exception as exc:
        traceback.print_exc()
        return name, time.monotonic() - started, None, f"{type(exc).__name__}: {exc}".strip()
    seconds = time.monotonic() - started
    print(f"== {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return name, seconds, section, ""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, write the report and the plot; 1 if any section failed."""
    args = parse(argv)
    if args.output is not None:
        output = args.output.resolve()
        plot_path = output.with_name(f"{output.stem}-throughput.png")
    else:
        suffix = "-quick" if args.quick else ""
        output, plot_path = HERE / f"RESULTS{suffix}.md", HERE / f"throughput{suffix}.png"
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["benchmarks/.venv/bin/python benchmarks/run.py", *words])
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(PACKAGES)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="creditmeter-bench-", dir=args.dir))
    try:
        outcomes = [run_section(n, quick=args.quick, workdir=workdir / n) for n in args.sections]
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds, _, _ in outcomes)
    mode = "quick" if args.quick else "full"
    head = [
        f"- Command: `{command}` ({mode} run, {time.monotonic() - started:.0f} s: {timings})",
        *machine,
        f"- Files of the run in a temporary folder inside: `{workdir.parent}`",
    ]
    plotted = [s.data for _, _, s, _ in outcomes if s is not None and "throughput" in s.data]
    plot_name, plot_error = None, ""
    if plotted:
        try:
            plot(plotted[0], plot_path)
            plot_name = plot_path.name
        except Exception as exc:
            traceback.print_exc()
            plot_error = f"{type(exc).__name__}: {exc}"
    output.write_text(page(outcomes, head=head, plot_name=plot_name, plot_error=plot_error))
    print(f"wrote {output}" + (f" and {plot_path}" if plot_name else ""), file=sys.stderr)
    failed = [name for name, _, s, _ in outcomes if s is None] + (["plot"] if plot_error else [])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

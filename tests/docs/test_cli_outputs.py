"""The CLI outputs and figures the docs show are what the commands print today."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_shown_cli_outputs_and_figures_are_current():
    """tools/docs_outputs.py --check reruns every shown command; rerun it without --check to fix."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "docs_outputs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_benchmark_plot_is_the_benchmarks_own():
    """The site's copy of the plot is the last run's (copy it after a run)."""
    copy = ROOT / "docs" / "benchmarks" / "throughput.png"
    plot = ROOT / "benchmarks" / "throughput.png"
    # Digests, not bytes: pytest's diff of two large byte strings takes minutes.
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(plot.read_bytes()).digest()


def test_the_benchmark_and_changelog_pages_include_their_sources():
    """The pages include the files (pymdownx.snippets), so they cannot drift from them."""
    docs = ROOT / "docs"
    assert (docs / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'
    assert (
        docs / "benchmarks" / "index.md"
    ).read_text().strip() == '--8<-- "benchmarks/RESULTS.md"'
    assert (docs / "benchmarks" / "reliability.md").read_text().strip() == (
        '--8<-- "benchmarks/RELIABILITY.md"'
    )

"""What a scenario hands back: its Markdown, its targets, and raw data for the plot.

A target is one line of the report's table: a named figure, a threshold and
the verdict. ``Section.ratio`` declares the common one in one call: series A
over series B of the same interleaved rounds, at most (or at least) x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.report import fmt, table
from harness.timing import Rounds


@dataclass(frozen=True)
class Target:
    """One line of the targets table; ``met`` is ``None`` for a figure with no threshold."""

    name: str
    measured: str
    met: bool | None


@dataclass
class Section:
    """A scenario's report: Markdown lines, target lines, and data (``throughput`` is plotted)."""

    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def markdown(self) -> str:
        """The section's body, without its heading."""
        return "\n".join(self.lines).rstrip() + "\n"

    def text(self, *paragraphs: str) -> None:
        """Paragraphs written across source lines, each one Markdown line with a blank after."""
        for paragraph in paragraphs:
            self.lines += [" ".join(paragraph.split()), ""]

    def bullets(self, *items: str) -> None:
        """A bulleted list, each item one Markdown line."""
        self.lines += [f"- {' '.join(item.split())}" for item in items] + [""]

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """A Markdown table."""
        self.lines += [table(header, rows), ""]

    def series_table(
        self, rounds: Rounds, names: list[str] | None = None, **extra: dict[str, str]
    ) -> None:
        """µs/op (median over the batches), its range, ops/s and CPU µs/op of each series.

        Each keyword adds a column: its name, and a cell per series (``-`` if none).
        """
        rows = []
        for name in names or list(rounds.series):
            s = rounds[name]
            digits = 2 if s.median < 100 else 1
            span = f"{fmt(min(s.wall), digits)}-{fmt(max(s.wall), digits)}"
            cells = [fmt(s.median, digits), span, fmt(s.ops_per_s, 0), fmt(s.cpu_median, digits)]
            rows.append([name, *cells, *(column.get(name, "-") for column in extra.values())])
        self.table(["series", "µs/op", "min-max", "ops/s", "CPU µs/op", *extra], rows)

    def check(self, name: str, met: bool | None, measured: str) -> bool:
        """Add a target line whose verdict the caller decided (``None``: a figure)."""
        self.targets.append(Target(name, measured, met))
        return bool(met)

    def bound(
        self,
        name: str,
        value: float,
        *,
        at_most: float | None = None,
        at_least: float | None = None,
        unit: str = "x",
        detail: str = "",
    ) -> bool:
        """A target on one number: met when it is within ``at_most`` / ``at_least``."""
        met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
        judged = at_most is not None or at_least is not None
        measured = f"{value:,.2f}{unit}" + (f" ({detail})" if detail else "")
        return self.check(name, met if judged else None, measured)

    def ratio(
        self,
        name: str,
        rounds: Rounds,
        a: str,
        b: str,
        *,
        at_most: float | None = None,
        at_least: float | None = None,
    ) -> bool:
        """A target on series ``a``'s µs/op over ``b``'s, paired round by round.

        ``at_most=1.5``: a costs at most 1.5 times b. ``at_least=2``: a costs at
        least twice b, i.e. b is at least twice as fast.
        """
        detail = f"{fmt(rounds[a].median, 2)} µs vs {fmt(rounds[b].median, 2)} µs"
        value = rounds.ratio(a, b)
        return self.bound(name, value, at_most=at_most, at_least=at_least, detail=detail)

    def faster(
        self, name: str, rounds: Rounds, a: str, b: str, *, at_least: float | None = 1.0
    ) -> bool:
        """A target on how many times faster ``a`` runs than ``b``, paired (``None``: a figure)."""
        value = rounds.ratio(b, a)
        measured = (
            f"{fmt(rounds[a].ops_per_s, 0)} vs {fmt(rounds[b].ops_per_s, 0)} ops/s ({value:.2f}x)"
        )
        return self.check(name, None if at_least is None else value >= at_least, measured)

    def difference(
        self, name: str, rounds: Rounds, a: str, b: str, *, at_most: float | None
    ) -> bool:
        """A target on what series ``a`` adds over ``b`` (µs/op), paired (``None``: a figure)."""
        spread = sorted(rounds.differences(a, b))
        middle = f"{fmt(spread[len(spread) // 4], 2)} to {fmt(spread[3 * len(spread) // 4], 2)}"
        detail = (
            f"middle half of the rounds {middle}; CPU {fmt(rounds.difference(a, b, cpu=True), 2)}"
            f" µs; medians {fmt(rounds[a].median, 2)} vs {fmt(rounds[b].median, 2)} µs"
        )
        return self.bound(name, rounds.difference(a, b), at_most=at_most, unit=" µs", detail=detail)

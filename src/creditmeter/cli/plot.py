"""``creditmeter usage --plot``: credits charged per period, as stacked bars, in a PNG.

``spend_series`` is the pure part: from a usage report's rows it works out
what is drawn, exactly (Decimal sums): every period from the first charged to
the last (periods without charges drawn as zero), and one stack per model, or
per user when the report is grouped by user and not by model. ``figure``
draws it and ``save`` writes the PNG. Only the drawing turns credits into
floats, as a chart must; the sums stay exact.

matplotlib is imported only here, lazily, and drawn with its Agg canvas
directly (never ``pyplot``, so no global backend is set and no window opens).
Without it, ``require`` says what to install.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import click

from creditmeter import rules
from creditmeter._exact import EXACT
from creditmeter.cli import format as fmt
from creditmeter.queries import GroupKey, Period, UsageRow

if TYPE_CHECKING:
    from collections.abc import Iterable

    from matplotlib.figure import Figure

__all__ = [
    "MAX_PERIODS",
    "MAX_STACKS",
    "MISSING",
    "SpendSeries",
    "figure",
    "require",
    "save",
    "spend_series",
]

MISSING = "the plot needs matplotlib: pip install 'creditmeter[plot]'"
MAX_PERIODS = 2000
"""The most bars a plot draws; more is unreadable (a longer ``--period`` says the same)."""
MAX_STACKS = 10
"""The most stacks a bar has: the largest spenders, then the rest summed as one."""

_ZERO = Decimal(0)
_STEPS: dict[str, timedelta] = {
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}


class SpendSeries(NamedTuple):
    """What a plot draws: credits charged per period, split into stacks."""

    period: Period
    periods: list[datetime]
    """The start of every period from the first with charges to the last, gaps included."""
    stacks: list[tuple[str, list[Decimal]]]
    """(label, credits charged in each of ``periods``), the largest stack first."""
    stacked_by: Literal["model", "user"] | None
    """What the stacks are; ``None``: one stack of every charge."""

    def totals(self) -> list[Decimal]:
        """Credits charged in each period, every stack summed."""
        totals = [_ZERO] * len(self.periods)
        for _, values in self.stacks:
            totals = [EXACT.add(total, value) for total, value in zip(totals, values, strict=True)]
        return totals


def _count(first: datetime, last: datetime, period: Period) -> int:
    if period == "month":
        return (last.year - first.year) * 12 + last.month - first.month + 1
    return (last - first) // _STEPS[period] + 1


def _periods(first: datetime, last: datetime, period: Period) -> list[datetime]:
    count = _count(first, last, period)
    if count > MAX_PERIODS:
        raise click.ClickException(
            f"the plot would have {count:,} bars (at most {MAX_PERIODS:,}): "
            "give a longer --period or a shorter --since/--until"
        )
    if period == "month":
        return [rules.add_interval(first, step, "months") for step in range(count)]
    return [first + _STEPS[period] * step for step in range(count)]


def spend_series(
    rows: Iterable[UsageRow],
    by: Iterable[GroupKey],
    period: Period,
    *,
    max_stacks: int = MAX_STACKS,
) -> SpendSeries:
    """The charged credits of a report grouped by period, per period and per stack.

    Stacks are models when ``by`` has ``"model"`` (summed over users), else users
    when it has ``"user"``, else one stack. Past ``max_stacks``, the smallest
    stacks are summed into one labelled ``(N others)``.
    """
    keys = set(by)
    stacked_by: Literal["model", "user"] | None = (
        "model" if "model" in keys else "user" if "user" in keys else None
    )
    sums: dict[str, dict[datetime, Decimal]] = {}
    for row in rows:
        if row.period_start is None:
            raise ValueError("a plot needs the rows of a report grouped by period")
        if stacked_by == "model":
            label = fmt.NO_MODEL if row.model is None else row.model
        elif stacked_by == "user":
            label = row.user_id or ""
        else:
            label = "charged"
        per_period = sums.setdefault(label, {})
        per_period[row.period_start] = EXACT.add(
            per_period.get(row.period_start, _ZERO), row.charged
        )
    starts = {start for per_period in sums.values() for start in per_period}
    periods = _periods(min(starts), max(starts), period) if starts else []

    def total(label: str) -> Decimal:
        values = _ZERO
        for value in sums[label].values():
            values = EXACT.add(values, value)
        return values

    order = sorted(sums, key=lambda label: (-total(label), label))
    stacks = [(label, [sums[label].get(start, _ZERO) for start in periods]) for label in order]
    if len(stacks) > max_stacks:
        kept, rest = stacks[: max_stacks - 1], stacks[max_stacks - 1 :]
        merged = [_ZERO] * len(periods)
        for _, values in rest:
            merged = [EXACT.add(a, b) for a, b in zip(merged, values, strict=True)]
        stacks = [*kept, (f"({len(rest)} others)", merged)]
    return SpendSeries(period, periods, stacks, stacked_by)


def require() -> None:
    """Fail with what to install when matplotlib cannot be imported."""
    try:
        import matplotlib as mpl  # noqa: F401, PLC0415 - lazily: only the plot needs it
    except ImportError:
        raise click.ClickException(MISSING) from None


def figure(series: SpendSeries, *, title: str) -> Figure:
    """Draw ``series`` as stacked bars on a new figure with an Agg canvas."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - lazily
    from matplotlib.figure import Figure  # noqa: PLC0415 - lazily

    count = len(series.periods)
    width = min(max(6.0, 2.5 + 0.3 * count), 30.0)
    drawing = Figure(figsize=(width, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(drawing)
    axes = drawing.add_subplot()
    axes.set_title(title, loc="left", fontsize="medium")
    axes.set_ylabel("credits charged")
    if not count:
        axes.text(0.5, 0.5, "no charges", transform=axes.transAxes, ha="center", va="center")
        axes.set_xticks([])
        return drawing
    places = list(range(count))
    bottom = [0.0] * count
    for label, values in series.stacks:
        heights = [float(value) for value in values]  # drawing only: the sums stay exact
        axes.bar(places, heights, 0.8, bottom=bottom, label=label)
        bottom = [base + height for base, height in zip(bottom, heights, strict=True)]
    step = max(1, math.ceil(count / 30))
    ticks = places[::step]
    labels = [fmt.period_label(series.periods[place], series.period) for place in ticks]
    axes.set_xticks(ticks, labels, rotation=45, ha="right", fontsize="small")
    axes.set_xlim(-0.6, count - 0.4)
    axes.ticklabel_format(axis="y", style="plain", useOffset=False)
    if series.stacked_by is not None:
        handles, labels = axes.get_legend_handles_labels()
        axes.legend(
            handles[::-1],  # listed top to bottom, as the stacks are
            labels[::-1],
            title=series.stacked_by,
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
    return drawing


def save(series: SpendSeries, path: Path, *, title: str) -> None:
    """Write the plot of ``series`` to ``path`` as a PNG, put in place only once complete."""
    drawing = figure(series, title=title)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            drawing.savefig(handle, format="png")
        partial.replace(path)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)

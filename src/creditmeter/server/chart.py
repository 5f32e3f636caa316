"""Spend per period by model, drawn on the server as an SVG of stacked bars.

The input is what ``meter.usage(by=("model", "period"), period=...)``
returns; the output is SVG text with no script and no style attribute (the
page's CSP allows neither), a ``<title>`` and ``<desc>`` for screen readers,
and a ``<title>`` on each bar segment (its model, period and credits). The
eight most costly models get a colour each (Okabe and Ito's palette, told
apart without colour vision); the rest are drawn together as "other".
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from html import escape

import attrs

from creditmeter import rules
from creditmeter.queries import Period, UsageRow
from creditmeter.server.present import dec

__all__ = ["Chart", "periods_between", "pick_period", "spend_chart"]

WIDTH = 720
HEIGHT = 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 16, 64
_PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#8a7a00",
    "#000000",
)
_OTHER_COLOUR = "#767676"
_MAX_MODELS = len(_PALETTE)
MAX_PERIODS = 400
"""The most bars one chart draws; a longer range is drawn in weeks or months."""
_ZERO = Decimal(0)


@attrs.frozen(kw_only=True)
class Chart:
    """A drawn chart: the SVG, its legend, and the same numbers as a table."""

    svg: str
    legend: list[tuple[str, str]]
    """(model, colour) in the order drawn."""
    table: list[tuple[str, str, str]]
    """(period, model, credits) for every non-zero segment."""
    period: Period


def pick_period(since: datetime, until: datetime) -> Period:
    """The finest period that draws ``[since, until)`` in at most ``MAX_PERIODS`` bars."""
    span = until - since
    if span <= timedelta(days=MAX_PERIODS):
        return "day"
    if span <= timedelta(weeks=MAX_PERIODS):
        return "week"
    return "month"


def periods_between(since: datetime, until: datetime, period: Period) -> list[datetime]:
    """The starts of every period that overlaps ``[since, until)``, at most ``MAX_PERIODS``."""
    start = rules.period_start(since, period)
    found: list[datetime] = []
    while start < until and len(found) < MAX_PERIODS:
        found.append(start)
        if period == "day":
            start += timedelta(days=1)
        elif period == "week":
            start += timedelta(weeks=1)
        elif period == "hour":
            start += timedelta(hours=1)
        else:
            start = rules.add_interval(start, 1, "months")
    return found


def _label(start: datetime, period: Period) -> str:
    if period == "month":
        return start.strftime("%Y-%m")
    if period == "hour":
        return start.strftime("%m-%d %H:00")
    return start.strftime("%m-%d")


def _short(value: Decimal) -> str:
    """Credits on an axis: 950, 1.2k, 3.4M, 5.6G."""
    for size, suffix in ((Decimal(10) ** 9, "G"), (Decimal(10) ** 6, "M"), (Decimal(1000), "k")):
        if abs(value) >= size:
            return f"{(value / size).quantize(Decimal('0.1')).normalize():f}{suffix}"
    return f"{value.quantize(Decimal(1)) if value >= 1 else value.normalize():f}"


def _nice_top(value: Decimal) -> Decimal:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value``."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for step in (1, 2, 5, 10):
        top = Decimal(step).scaleb(exponent)
        if top >= value:
            return top
    return Decimal(10).scaleb(exponent)  # pragma: no cover - 10 is always enough


_Cells = dict[tuple[datetime, str], Decimal]


def _series(rows: list[UsageRow]) -> tuple[list[str], dict[str, str], _Cells]:
    """The series drawn (the costliest models, then "other"), their colours, and the cells."""
    totals: dict[str | None, Decimal] = defaultdict(Decimal)
    for row in rows:
        totals[row.model] += row.cost
    ranked = sorted(totals, key=lambda model: (-totals[model], model or ""))
    named = ranked if len(ranked) <= _MAX_MODELS else ranked[: _MAX_MODELS - 1]
    series = [_name(model) for model in named]
    colours = dict(zip(series, _PALETTE, strict=False))
    if len(ranked) > len(named):
        series.append("other")
        colours["other"] = _OTHER_COLOUR
    kept = set(named)
    cells: _Cells = defaultdict(Decimal)
    for row in rows:
        if row.period_start is not None:
            cells[row.period_start, _name(row.model) if row.model in kept else "other"] += row.cost
    return series, colours, cells


def _name(model: str | None) -> str:
    return "(no model)" if model is None else model


def _axis(top: Decimal) -> list[str]:
    parts: list[str] = []
    plot_h = HEIGHT - _TOP - _BOTTOM
    for tick in range(5):
        y = _TOP + plot_h - plot_h * tick / 4
        parts.append(
            f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#d0d0d0" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12" '
            f'fill="#333333">{escape(_short(top * tick / 4))}</text>'
        )
    return parts


def spend_chart(
    rows: list[UsageRow],
    periods: list[datetime],
    period: Period,
    *,
    title: str,
    chart_id: str = "spend-chart",
) -> Chart:
    """Draw ``rows`` (grouped by model and period) as stacked bars over ``periods``."""
    series, colours, cells = _series(rows)
    stacked = [sum((cells.get((start, s), _ZERO) for s in series), _ZERO) for start in periods]
    top = _nice_top(max(stacked, default=_ZERO))
    models = f", by model: {', '.join(series)}" if series else ", no spend"
    desc = f"{len(periods)} {period}s, {dec(sum(stacked, _ZERO))} credits in all{models}."
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'class="chart" role="img" aria-labelledby="{chart_id}-title {chart_id}-desc">'
        ),
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(desc)}</desc>',
        *_axis(top),
    ]
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(periods), 1)
    bar = max(slot * 0.8, 1.0)
    every = max(1, round(len(periods) / 12))
    table: list[tuple[str, str, str]] = []
    for index, start in enumerate(periods):
        x = _LEFT + index * slot + (slot - bar) / 2
        base = float(_TOP + plot_h)
        label = _label(start, period)
        for name in series:
            value = cells.get((start, name), _ZERO)
            if value <= 0:
                continue
            shown = dec(value) or "0"
            table.append((label, name, shown))
            height = float(value / top) * plot_h
            base -= height
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{height:.1f}" '
                f'fill="{colours[name]}"><title>{escape(name)}, {escape(label)}: '
                f"{escape(shown)} credits</title></rect>"
            )
        if index % every == 0:
            tx, ty = x + bar / 2, _TOP + plot_h + 14
            parts.append(
                f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="11" fill="#333333" '
                f'text-anchor="end" transform="rotate(-45 {tx:.1f} {ty:.1f})">'
                f"{escape(label)}</text>"
            )
    if not series:
        parts.append(
            f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT / 2:.0f}" text-anchor="middle" '
            'font-size="14" fill="#333333">No spend in this range</text>'
        )
    parts.append("</svg>")
    legend = [(name, colours[name]) for name in series]
    return Chart(svg="".join(parts), legend=legend, table=table, period=period)

"""Charts as inline SVG, drawn on the server: no chart library, nothing loaded from elsewhere.

Each function returns safe markup: every text that came from data is escaped. Each chart has a
role="img", a title and a description for screen readers; the pages also show the numbers in a table.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from engine.units import size_text
from frontend.presentation import MetricRow, metric_text


def _svg(width: int, height: int, title: str, desc: str, body: list[str], css_class: str) -> SafeString:
    """The chart in a box that scrolls sideways on a phone: the SVG keeps its natural width there (via
    --natural-width in the CSS), so its text stays readable instead of shrinking with the screen."""
    ident = hashlib.sha1(f"{title}{desc}{len(body)}".encode()).hexdigest()[:8]
    return mark_safe(  # noqa: S308 - every data-derived string below is escaped
        f'<div class="chart-scroll" tabindex="0" role="group" aria-label="{escape(title)}">'
        f'<svg class="chart {css_class}" viewBox="0 0 {width} {height}" role="img" style="--natural-width: {width}px" '
        f'aria-labelledby="chart-{ident}-t chart-{ident}-d" preserveAspectRatio="xMinYMin meet">'
        f'<title id="chart-{ident}-t">{escape(title)}</title><desc id="chart-{ident}-d">{escape(desc)}</desc>'
        + "".join(body)
        + "</svg></div>"
        # Shown on a phone only (app.css), where the chart keeps its natural width in a box narrower than it
        + '<p class="scroll-hint" aria-hidden="true">Wider than the screen: scroll the chart sideways.</p>'
    )


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
LAYER_ERROR_UNIT = "squared error of the layer's output, no unit"
KIND_COLOURS = 8  # app.css colours .kind-0 to .kind-7
LEGEND_LINE_H = 18


def _log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten from low to high (both already powers of ten)."""
    ticks, value = [], low
    while value <= high * 1.0001:
        ticks.append(value)
        value *= 10
    return ticks


def _power_of_ten(value: float) -> str:
    """0.001, 1, 1000 as written; beyond that 1e-05, 1e+06."""
    exponent = round(math.log10(value))
    if -4 <= exponent < 0:
        return f"{value:.{-exponent}f}"
    if 0 <= exponent < 6:
        return f"{value:.0f}"
    return f"1e{exponent:+03d}"


def _module_kinds(errors: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Each kind of module (the last part of its name: q_proj, down_proj) with its colour's index, in the order
    the network first has them; empty where there is one kind only, or more kinds than colours."""
    kinds: dict[str, int] = {}
    for name, _value in errors:
        kinds.setdefault(name.rsplit(".", 1)[-1], len(kinds))
    return kinds if 1 < len(kinds) <= KIND_COLOURS else {}


def _legend(kinds: dict[str, int], left: int, right_edge: int) -> tuple[list[str], int]:
    """A swatch and a name per kind, in rows that wrap at right_edge; returns the markup and its height."""
    body, x, y = [], left, 4
    for kind, colour in kinds.items():
        entry_w = 18 + len(kind) * LABEL_CHAR_W + 14
        if x + entry_w > right_edge and x > left:
            x, y = left, y + LEGEND_LINE_H
        body.append(
            f'<rect class="kind-{colour}" x="{x:.0f}" y="{y + 2}" width="12" height="10"/>'
            f'<text class="tick" x="{x + 16:.0f}" y="{y + 11}">{escape(kind)}</text>'
        )
        x += entry_w
    return body, (y + LEGEND_LINE_H if kinds else 0)


def layer_error_chart(errors: Sequence[tuple[str, float]]) -> SafeString:
    """One bar per quantized module, in network order, on a log scale: a few outliers (often 1000x the
    rest) would flatten every other bar on a linear one. Each bar is coloured by its module's kind, named in a
    legend above the plot, so that the layer (x axis) and the kind (colour) say which module it is without a
    mouse; hover also shows the module's full name and its error."""
    if not errors:
        return mark_safe("")
    kinds = _module_kinds(errors)
    legend, legend_h = _legend(kinds, 64, 750)
    width, height, left, bottom, top, right = 760, 250 + legend_h, 64, 52, 12 + legend_h, 10
    plot_w, plot_h = width - left - right, height - bottom - top
    positive = [value for _name, value in errors if value > 0]
    floor = 10 ** math.floor(math.log10(min(positive))) if positive else 1.0
    ceiling = 10 ** math.ceil(math.log10(max(positive))) if positive else 10.0
    if ceiling <= floor:
        ceiling = floor * 10
    decades = math.log10(ceiling) - math.log10(floor)

    def bar_height(value: float) -> float:
        # Values at or below the floor (zero included) get a sliver so that every module stays visible.
        return max(plot_h * (math.log10(max(value, floor)) - math.log10(floor)) / decades, 1.0)

    step = plot_w / len(errors)
    body = list(legend)
    for tick in _log_ticks(floor, ceiling):
        y = top + plot_h - plot_h * (math.log10(tick) - math.log10(floor)) / decades
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_power_of_ten(tick)}</text>')
    body += [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
    ]
    labelled_layers: set[str] = set()
    layer_count = len({m.group(1) for name, _v in errors if (m := _LAYER_INDEX.search(name))})
    every = max(1, math.ceil(layer_count / 8))
    for index, (name, value) in enumerate(errors):
        bar_h = bar_height(value)
        x = left + index * step
        css = f"bar kind-{kinds[name.rsplit('.', 1)[-1]]}" if kinds else "bar"
        body.append(
            f'<rect class="{css}" x="{x + step * 0.1:.2f}" y="{top + plot_h - bar_h:.2f}" '
            f'width="{max(step * 0.8, 0.5):.2f}" height="{bar_h:.2f}">'
            f"<title>{escape(name)}: {metric_text(value)}</title></rect>"
        )
        match = _LAYER_INDEX.search(name)
        if match and match.group(1) not in labelled_layers:
            labelled_layers.add(match.group(1))
            if int(match.group(1)) % every == 0:
                body.append(
                    f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="start">'
                    f"{match.group(1)}</text>"
                )
    x_label = (
        "layer (each bar is one module of it, in network order)"
        if labelled_layers
        else (f"{len(errors)} quantized modules, in network order")
    )
    body.append(
        f'<text class="label axis-label" x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    mid = top + plot_h / 2
    body.append(
        f'<text class="label axis-label" x="14" y="{mid:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {mid:.0f})">error, no unit (log scale)</text>'
    )
    worst = max(errors, key=lambda item: item[1])
    return _svg(
        width,
        height,
        "Quantization error per module, log scale",
        f"{len(errors)} modules; error is the {LAYER_ERROR_UNIT}; "
        f"the largest is {metric_text(worst[1])} in {worst[0]}."
        + (f" Each bar is coloured by its kind of module: {', '.join(kinds)}." if kinds else ""),
        body,
        "chart-layers",
    )


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k at or above value: an axis end that reads well."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for factor in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if factor * magnitude >= value * 0.9999:
            return factor * magnitude
    return 10 * magnitude


def metric_chart(rows: Sequence[MetricRow]) -> SafeString:
    """One panel per metric, each with its own labelled axis starting at 0 and the direction that is better.

    Metrics have different units and scales (perplexity ~15, KL divergence ~0.03, agreement 0..1), so they
    never share an axis; a metric whose baseline is 0 by definition (a divergence from the baseline itself)
    gets no baseline bar, and its compressed bar is read against its own axis, not against an empty bar.
    """
    rows = [r for r in rows if r.compressed is not None]
    if not rows:
        return mark_safe("")
    # Each bar's value is written in the column of names before it ("compressed 13.10"), not at its end: on a
    # phone, where the chart scrolls sideways in its box, the numbers are on screen before any scrolling.
    label_w, bar_w, panel_h = 190, 480, 78
    width, height = label_w + bar_w + 30, 26 + panel_h * len(rows)
    body = [
        '<rect class="bar-baseline" x="8" y="6" width="12" height="10"/>'
        '<text class="tick" x="24" y="15">baseline</text>'
        '<rect class="bar-compressed" x="96" y="6" width="12" height="10"/>'
        '<text class="tick" x="112" y="15">compressed</text>'
    ]
    for index, row in enumerate(rows):
        y = 26 + index * panel_h
        has_baseline = row.baseline is not None and row.baseline != 0 and not row.against_baseline
        peak = _nice_ceiling(max(abs(row.compressed), abs(row.baseline or 0)))
        direction = "higher is better ↑" if row.higher_is_better else "lower is better ↓"
        label = row.label if len(row.label) <= 70 else row.label[:69] + "…"
        body.append(
            f'<text class="label axis-label metric-name" x="8" y="{y + 14}">{escape(label)} '
            f'<tspan class="direction">({direction})</tspan></text>'
        )
        bars = [(22, "bar-baseline", row.baseline)] if has_baseline else []
        bars.append((40, "bar-compressed", row.compressed))
        if not has_baseline:
            note = (
                "baseline: none"
                if row.baseline is None
                else f"baseline: {metric_text(row.baseline)}{escape(row.unit)} by definition, no bar"
            )
            # In the empty baseline row, from the left edge: end-anchored beside the bars it ran off the SVG
            body.append(f'<text class="tick note" x="8" y="{y + 33}">{note}</text>')
        for offset, css, value in bars:
            length = bar_w * abs(value) / peak
            body.append(
                f'<text class="tick" x="{label_w - 8}" y="{y + offset + 11}" text-anchor="end">'
                f"{css.removeprefix('bar-')} "
                f'<tspan class="value">{metric_text(value)}{escape(row.unit)}</tspan></text>'
                f'<rect class="{css}" x="{label_w}" y="{y + offset}" width="{length:.1f}" height="14">'
                f"<title>{escape(row.label)} {css.removeprefix('bar-')}: "
                f"{metric_text(value)}{escape(row.unit)}</title></rect>"
            )
        axis_y = y + 58
        body.append(f'<line class="axis" x1="{label_w}" y1="{axis_y}" x2="{label_w + bar_w}" y2="{axis_y}"/>')
        for fraction in (0.0, 0.5, 1.0):
            x = label_w + bar_w * fraction
            body.append(
                f'<line class="axis" x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}"/>'
                f'<text class="tick axis-tick" x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle">'
                f"{peak * fraction:g}{escape(row.unit)}</text>"
            )
    return _svg(
        width,
        height,
        "Offline metrics, baseline and compressed",
        "One panel per metric, each on its own axis from 0, with the direction that is better.",
        body,
        "chart-metrics",
    )


# An 11 px label's average character width, a little generous: enough to keep labels apart, not to measure them.
LABEL_CHAR_W = 6.6
LABEL_LINE_H = 13


def _nice_step(span: float) -> float:
    """An axis step of 1, 2, 2.5 or 5 x 10^k giving 3 to 6 ticks over span: 50 MB, not 74 MB."""
    if span <= 0:
        return 1.0
    raw = span / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(f * magnitude for f in (1, 2, 2.5, 5, 10) if f * magnitude >= raw)


def _label_place(
    x: float, y: float, text_w: float, width: float, placed: list[tuple[float, float, float]]
) -> tuple[float, float, str]:
    """Where a point's label goes: right of it, or left of it where it would leave the SVG; moved down a line
    while it would overlap a label already placed (two jobs of about the same size and quality)."""
    left, anchor = (x + 9, "start") if x + 9 + text_w <= width else (x - 9, "end")
    start = left if anchor == "start" else left - text_w
    while any(start < end and start + text_w > begin and abs(y - at) < LABEL_LINE_H for begin, end, at in placed):
        y += LABEL_LINE_H
    placed.append((start, start + text_w, y))
    return left, y, anchor


@dataclass
class Point:
    label: str
    size_bytes: int
    quality: float | None  # recovery in percent; None: the job ran no evaluation
    baseline: bool = False
    recommended: bool = False  # the smallest point that keeps the stated floor


def size_quality_chart(
    points: Sequence[Point], *, frontier: Sequence[Point] = (), floor: float | None = None
) -> SafeString:
    """Checkpoint size (x) against recovery (y): down and to the left loses, up and to the left wins. Jobs
    without an evaluation sit on a "not evaluated" strip under the plot, at their size, instead of vanishing.
    frontier: the points no other beats on both (a line joins them); floor: a recovery drawn as a dashed line."""
    if not points:
        return mark_safe("")
    unevaluated = [p for p in points if p.quality is None]
    strip = 34 if unevaluated else 0
    width, height, left, bottom, top, right = 640, 300 + strip, 64, 44 + strip, 16, 150
    plot_w, plot_h = width - left - right, height - top - bottom
    top_mb = max(p.size_bytes for p in points) * 1.05 / 1e6
    step_mb = _nice_step(top_mb)
    max_x = step_mb * max(1, math.ceil(top_mb / step_mb)) * 1e6
    qualities = [p.quality for p in points if p.quality is not None] or [100.0]
    low = math.floor(min(min(qualities), floor or 90, 90) / 5) * 5
    high = math.ceil(max(max(qualities), 100) / 5) * 5
    span = (high - low) or 1

    def px(size: float) -> float:
        return left + plot_w * size / max_x

    def py(quality: float | None) -> float:
        if quality is None:
            return top + plot_h + 28
        return top + plot_h * (1 - (quality - low) / span)

    body = [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        f'<text class="label axis-label" x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        "checkpoint size (MB)</text>",
        f'<text class="label axis-label" x="14" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">recovery (%)</text>',
    ]
    placed: list[tuple[float, float, float]] = []  # the labels drawn so far: left, right, baseline y
    if unevaluated:
        y = py(None)
        placed.append((left + plot_w + 6, left + plot_w + 6 + 13 * LABEL_CHAR_W, y + 4))
        body.append(
            f'<rect class="strip" x="{left}" y="{y - 12}" width="{plot_w}" height="24"/>'
            # In the right margin: the left one is narrower than the words (it read "evaluated")
            f'<text class="tick" x="{left + plot_w + 6}" y="{y + 4}">not evaluated</text>'
        )
    for tick in range(int(low), int(high) + 1, 5 if span <= 40 else 10):
        y = py(tick)
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    for index in range(round(max_x / (step_mb * 1e6)) + 1):
        x = px(index * step_mb * 1e6)
        body.append(
            f'<text class="tick" x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{index * step_mb:g}</text>'
        )
    if len(frontier) > 1:
        line = " ".join(f"{px(p.size_bytes):.1f},{py(p.quality):.1f}" for p in frontier)
        body.append(f'<polyline class="frontier" points="{line}" fill="none"/>')
    if floor is not None:
        y = py(floor)
        body.append(
            f'<line class="floor" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke-dasharray="6 4"/>'
            f'<text class="tick" x="{left + plot_w + 4}" y="{y + 4:.1f}">floor {floor:g} %</text>'
        )
    for point in points:
        x, y = px(point.size_bytes), py(point.quality)
        css = "point-baseline" if point.baseline else "point-none" if point.quality is None else "point"
        css += " point-recommended" if point.recommended else ""
        quality = "not evaluated" if point.quality is None else f"{point.quality:.1f} %"
        label_x, label_y, anchor = _label_place(x, y + 4, len(point.label) * LABEL_CHAR_W, width, placed)
        body.append(
            f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="6"><title>{escape(point.label)}: '
            f"{size_text(point.size_bytes)}, {quality}</title></circle>"
            f'<text class="tick" x="{label_x:.1f}" y="{label_y:.1f}" text-anchor="{anchor}">'
            f"{escape(point.label)}</text>"
        )
    return _svg(
        width,
        height,
        "Size against quality",
        "Each job is a point: its checkpoint size and its recovery; the baseline model is at 100 %"
        + ("; jobs without an evaluation are on the strip below." if unevaluated else "."),
        body,
        "chart-scatter",
    )

"""Charts as inline SVG, drawn on the server: no chart library, nothing loaded from elsewhere.

Each function returns safe markup: every text that came from data is escaped. Each chart has a
role="img", a title and a description for screen readers; the pages also show the numbers in a table.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from frontend.presentation import MetricRow


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _svg(width: int, height: int, title: str, desc: str, body: list[str], css_class: str) -> SafeString:
    ident = hashlib.sha1(f"{title}{desc}{len(body)}".encode()).hexdigest()[:8]
    return mark_safe(  # noqa: S308 - every data-derived string below is escaped
        f'<svg class="chart {css_class}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="chart-{ident}-t chart-{ident}-d" preserveAspectRatio="xMinYMin meet">'
        f'<title id="chart-{ident}-t">{escape(title)}</title><desc id="chart-{ident}-d">{escape(desc)}</desc>'
        + "".join(body)
        + "</svg>"
    )


def layer_error_chart(errors: Sequence[tuple[str, float]]) -> SafeString:
    """One vertical bar per quantized module, in network order; hover shows the module and its error."""
    if not errors:
        return mark_safe("")
    width, height, left, bottom, top = 760, 220, 56, 28, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(value for _name, value in errors) or 1.0
    step = plot_w / len(errors)
    body = [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - 8}" y2="{y:.1f}"/>')
        body.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(peak * fraction)}</text>'
        )
    for index, (name, value) in enumerate(errors):
        bar_h = plot_h * (value / peak) if peak else 0
        x = left + index * step
        body.append(
            f'<rect class="bar" x="{x + step * 0.1:.2f}" y="{top + plot_h - bar_h:.2f}" '
            f'width="{max(step * 0.8, 0.5):.2f}" height="{bar_h:.2f}">'
            f"<title>{escape(name)}: {_fmt(value)}</title></rect>"
        )
    body.append(
        f'<text class="label" x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        f"{len(errors)} quantized modules, first layer on the left</text>"
    )
    worst = max(errors, key=lambda item: item[1])
    return _svg(
        width,
        height,
        "Quantization error per layer",
        f"{len(errors)} modules; the largest error is {_fmt(worst[1])} in {worst[0]}.",
        body,
        "chart-layers",
    )


def metric_chart(rows: Sequence[MetricRow]) -> SafeString:
    """Baseline and compressed side by side for each metric, each pair scaled to its larger value."""
    rows = [r for r in rows if r.baseline is not None and r.compressed is not None]
    if not rows:
        return mark_safe("")
    label_w, bar_w, row_h = 280, 380, 44
    width, height = label_w + bar_w + 90, 24 + row_h * len(rows)
    body = [
        '<rect class="bar-baseline" x="8" y="4" width="12" height="10"/>'
        '<text class="tick" x="24" y="13">baseline</text>'
        '<rect class="bar-compressed" x="96" y="4" width="12" height="10"/>'
        '<text class="tick" x="112" y="13">compressed</text>'
    ]
    for index, row in enumerate(rows):
        y = 24 + index * row_h
        peak = max(abs(row.baseline), abs(row.compressed)) or 1.0
        label = row.label if len(row.label) <= 40 else row.label[:39] + "…"
        body.append(f'<text class="label" x="{label_w - 8}" y="{y + 22}" text-anchor="end">{escape(label)}</text>')
        for offset, css, value in ((2, "bar-baseline", row.baseline), (20, "bar-compressed", row.compressed)):
            length = bar_w * abs(value) / peak
            body.append(
                f'<rect class="{css}" x="{label_w}" y="{y + offset}" width="{length:.1f}" height="15">'
                f"<title>{escape(row.label)} {css.removeprefix('bar-')}: {_fmt(value)}</title></rect>"
                f'<text class="tick" x="{label_w + length + 4:.1f}" y="{y + offset + 12}">{_fmt(value)}</text>'
            )
    return _svg(
        width, height, "Offline metrics, baseline and compressed", "One pair of bars per metric.", body, "chart-metrics"
    )


@dataclass
class Point:
    label: str
    size_bytes: int
    quality: float  # recovery in percent
    baseline: bool = False


def size_quality_chart(points: Sequence[Point]) -> SafeString:
    """Checkpoint size (x) against recovery (y): down and to the left loses, up and to the left wins."""
    if not points:
        return mark_safe("")
    width, height, left, bottom, top, right = 640, 300, 64, 44, 16, 150
    plot_w, plot_h = width - left - right, height - top - bottom
    max_x = max(p.size_bytes for p in points) * 1.1 or 1
    qualities = [p.quality for p in points]
    low = math.floor(min(min(qualities), 90) / 5) * 5
    high = math.ceil(max(max(qualities), 100) / 5) * 5
    span = (high - low) or 1

    def px(size: float) -> float:
        return left + plot_w * size / max_x

    def py(quality: float) -> float:
        return top + plot_h * (1 - (quality - low) / span)

    body = [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        f'<text class="label" x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        "checkpoint size (MB)</text>",
        f'<text class="label" x="14" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">recovery (%)</text>',
    ]
    for tick in range(int(low), int(high) + 1, 5 if span <= 40 else 10):
        y = py(tick)
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + plot_w * fraction
        body.append(
            f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{max_x * fraction / 1e6:.0f}</text>"
        )
    for point in points:
        x, y = px(point.size_bytes), py(point.quality)
        css = "point-baseline" if point.baseline else "point"
        body.append(
            f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="6"><title>{escape(point.label)}: '
            f"{point.size_bytes / 1e6:.1f} MB, {point.quality:.1f} %</title></circle>"
            f'<text class="tick" x="{x + 9:.1f}" y="{y + 4:.1f}">{escape(point.label)}</text>'
        )
    return _svg(
        width,
        height,
        "Size against quality",
        "Each job is a point: its checkpoint size and its recovery; the baseline model is at 100 %.",
        body,
        "chart-scatter",
    )

"""Small formatting helpers for the dashboard's templates."""

from __future__ import annotations

import re

from django import template
from django.utils.html import escape, json_script
from django.utils.safestring import SafeString, mark_safe

from engine.card import LINK_HOSTS
from engine.units import duration_text, percent_text, size_text
from frontend.presentation import metric_text
from jobs.models import Job

register = template.Library()

_FRONT_MATTER = re.compile(r"\A---\s*\n.*?\n---\s*\n", re.DOTALL)


def render_markdown(text: str) -> SafeString:
    """Markdown to HTML with markdown-it-py. Raw HTML in the source is shown as text, never rendered;
    images are not loaded, and a link becomes a link only when it points at one of the hosts the model
    card itself links to (engine.card.LINK_HOSTS), so text that slipped into a card cannot phish."""
    text = _FRONT_MATTER.sub("", text, count=1)
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # the page still shows the card, preformatted
        return mark_safe(f'<pre class="model-card-raw">{escape(text)}</pre>')
    renderer = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    renderer.enable("table").disable("image")
    renderer.validateLink = _card_link
    return mark_safe(renderer.render(text))  # noqa: S308 - html is off: the source cannot inject markup


def _card_link(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme == "https" and parts.hostname in LINK_HOSTS


@register.filter
def markdown(text: str) -> SafeString:
    return render_markdown(text or "")


@register.filter
def pct(value, digits: int = 1) -> str:
    """99.234 -> "99.2 %"; None -> "—" (engine.units.percent_text)."""
    try:
        return percent_text(float(value), int(digits))
    except (TypeError, ValueError):
        return percent_text(None)


@register.filter
def metric(value) -> str:
    """A metric value (frontend.presentation.metric_text): 0.02683 -> "0.02683", 17.9 -> "17.90", 1814.2 -> "1814"."""
    return metric_text(value)


@register.filter
def duration(seconds) -> str:
    try:
        return duration_text(float(seconds)) if seconds is not None else ""
    except (TypeError, ValueError):
        return ""


@register.filter
def mb(value) -> str:
    """Bytes in decimal units, as everywhere (engine.units.size_text): 269060096 -> "269.1 MB", 1200 -> "1.2 kB"."""
    try:
        return size_text(float(value))
    except (TypeError, ValueError):
        return size_text(None)


# A text symbol beside each status word (the colour is never the only signal); app.js reads the same map.
STATUS_ICONS = {
    Job.Status.QUEUED: "◷",
    Job.Status.RUNNING: "▶",
    Job.Status.SUCCEEDED: "✓",
    Job.Status.FAILED: "✕",
    Job.Status.CANCELLED: "⊘",
}


@register.filter
def status_icon(status: str) -> str:
    return STATUS_ICONS.get(status, "•")


@register.simple_tag
def job_statuses_json() -> SafeString:
    """The statuses for app.js, from Job itself: which are active (keep polling) and each one's icon."""
    return json_script(
        {
            "active": sorted(Job.ACTIVE),
            "terminal": sorted(Job.TERMINAL),
            "icons": {str(status): icon for status, icon in STATUS_ICONS.items()},
        },
        "job-statuses",
    )

"""Server paths out of what users see: job logs, errors and messages name files, not the server's folders."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from django.conf import settings

# An absolute path's folders: a "/" that does not continue a word, URL, label or regex, then name/ parts.
_ABSOLUTE_FOLDERS = re.compile(r"(?<![\w.:/>~*+?$^\\\])\-])/(?:[^\s/'\"`()\[\]{}<>,;:|]+/)+")


def _roots() -> list[tuple[str, str]]:
    """(folder, label) for the folders users may know by name, longest first (symlinks resolved too)."""
    labelled = [
        (settings.MEDIA_ROOT, "<media>"),
        (settings.MODEL_STORE_DIR, "<models>"),
        (settings.DATA_DIR, "<data>"),
        (settings.BASE_DIR, "<app>"),
        (sys.prefix, "<python>"),
    ]
    roots = {}
    for folder, label in labelled:
        for form in (Path(folder), Path(folder).resolve()):
            roots.setdefault(str(form).rstrip("/"), label)
    return sorted(roots.items(), key=lambda item: -len(item[0]))


def redact_paths(text: str) -> str:
    """Known roots become labels (<media>/jobs/7/...); the folders of any other absolute path become '…/'."""
    for root, label in _roots():
        if len(root) > 1:
            text = text.replace(root + "/", label + "/").replace(root, label)
    return _ABSOLUTE_FOLDERS.sub("…/", text)

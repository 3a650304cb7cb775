"""Server paths and secrets out of what users see: job logs, errors and messages name files, not the server's
folders, and show a hub token only as its hint ("hf_…abcd")."""

from __future__ import annotations

import functools
import re
import sys
import sysconfig
from pathlib import Path

from django.conf import settings

# An absolute path's folders: a "/" that does not continue a word, URL, label or regex, then name/ parts.
# A Hugging Face token as the hub issues them (hf_ and 30+ letters and digits), wherever it turns up.
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9_-]{16,}")
_ABSOLUTE_FOLDERS = re.compile(r"(?<![\w.:/>~*+?$^\\\])\-])/(?:[^\s/'\"`()\[\]{}<>,;:|]+/)+")

# This interpreter's installed packages (sysconfig works them out anew at each call: once here).
_PACKAGE_FOLDERS = tuple(dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])))


def _roots() -> list[tuple[str, str]]:
    """(folder, label) for the folders users may know by name, longest first (symlinks resolved too)."""
    return _labelled_roots(
        (
            (str(settings.MEDIA_ROOT), "<media>"),
            (str(settings.MODEL_STORE_DIR), "<models>"),
            (str(settings.DATA_DIR), "<data>"),
            (str(settings.BASE_DIR), "<app>"),
            *((folder, "<packages>") for folder in _PACKAGE_FOLDERS),
            (sys.prefix, "<python>"),
        )
    )


@functools.lru_cache(maxsize=8)
def _labelled_roots(labelled: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    # Resolving the folders reads the disk: once per set of settings, not for each line redacted.
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


def token_hint(token: str) -> str:
    """What may be shown of a token: "hf_…abcd" (its last four characters)."""
    return f"{'hf_' if token.startswith('hf_') else ''}…{token[-4:]}"


def redact_tokens(text: str, *secrets: str) -> str:
    """Each of secrets, and anything shaped like a hub token, becomes its hint."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, token_hint(secret))
    return _HUB_TOKEN.sub(lambda match: token_hint(match[0]), text)


def redact(text: str) -> str:
    """What a job's log, message or error may say: no server folders, no tokens."""
    return redact_tokens(redact_paths(text))

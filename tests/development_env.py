"""Loaded with `-p` (pyproject's addopts) before Django reads its settings: the tests run in development mode,
set explicitly as production refuses to start without a secret key; and their own corner of the shared cache."""

import os
import uuid

os.environ.setdefault("DJANGO_ENV", "development")
os.environ.setdefault("COMPRESSOR_CACHE_PREFIX", f"compressor-test-{uuid.uuid4().hex[:10]}")

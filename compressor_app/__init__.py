"""Project package: settings, urls and the Celery app (exported here so `celery -A compressor_app` finds it)."""

from compressor_app.celery import app as celery_app

__all__ = ("celery_app",)

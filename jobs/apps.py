import logging

from django.apps import AppConfig

logger = logging.getLogger(__name__)


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"

    def ready(self) -> None:
        from engine.lm_tasks import warm_indexes

        # A Celery worker announces itself to the registry through these signals (they never fire elsewhere).
        from jobs import node_worker  # noqa: F401

        # The submission check's name indexes, before the first request (built once per machine, read in ms
        # after). A broken library must not stop Django from starting: the submission then says what is wrong.
        try:
            warm_indexes()
        except Exception:
            logger.warning("The lm-eval task index or llm-compressor's facts could not be read", exc_info=True)

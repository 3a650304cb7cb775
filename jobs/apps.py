import logging

from django.apps import AppConfig

logger = logging.getLogger(__name__)


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"

    def ready(self) -> None:
        from engine.lm_tasks import known_task_names, tasks_dir
        from engine.presets import library_facts

        # A Celery worker announces itself to the registry through these signals (they never fire elsewhere).
        from jobs import node_worker  # noqa: F401

        # The submission check's name indexes, before the first request (built once per machine, read in ms
        # after): lm-eval's task index and llm-compressor's modifiers (a child process of a few seconds). A broken
        # library must not stop Django from starting: the submission then says what is wrong.
        try:
            known_task_names(tasks_dir())
            library_facts()
        except Exception:
            logger.warning("The lm-eval task index or llm-compressor's facts could not be read", exc_info=True)

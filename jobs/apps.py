from django.apps import AppConfig


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"

    def ready(self) -> None:
        # A Celery worker announces itself to the registry through these signals (they never fire elsewhere).
        from jobs import node_worker  # noqa: F401

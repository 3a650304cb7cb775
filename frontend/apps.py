from django.apps import AppConfig


class FrontendConfig(AppConfig):
    """The HTML pages: server-rendered templates with a little JavaScript for live updates."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "frontend"
    verbose_name = "Dashboard"

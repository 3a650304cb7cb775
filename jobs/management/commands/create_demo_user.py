"""`manage.py create_demo_user`: a user with an API token for the demo and local use (not for production)."""

from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create (or update) a demo user with a password and an API token; print or save the token."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default="demo-password", help="set on every run (default demo-password)")
        parser.add_argument("--staff", action="store_true", help="also let the user into the admin")
        parser.add_argument("--token-file", type=Path, help="write the token here instead of printing it")

    def handle(self, *args, username: str, password: str, staff: bool, token_file: Path | None, **options) -> None:
        if settings.ENVIRONMENT == "production":
            raise CommandError("Refusing to create a demo user with a known password in production.")
        user, created = get_user_model().objects.get_or_create(username=username)
        user.set_password(password)
        if staff:
            user.is_staff = user.is_superuser = True
        user.save()
        token, _ = Token.objects.get_or_create(user=user)
        if token_file:
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(token.key)
            token_file.chmod(0o600)
        verb = "Created" if created else "Updated"
        self.stderr.write(f"{verb} user '{username}' (password '{password}'{', staff' if staff else ''}).")
        if not token_file:
            self.stdout.write(token.key)

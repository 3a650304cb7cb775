"""`python manage.py compress ...`: the engine's command line, run from the project."""

from django.core.management.base import BaseCommand, CommandError

from engine.cli import run


class Command(BaseCommand):
    help = "Compress a model end to end (see --help); --list-presets prints the presets."

    def run_from_argv(self, argv: list[str]) -> None:
        # The engine owns its arguments; Django's own options (settings, verbosity) are not needed here.
        status = run(argv[2:], prog=f"{argv[0]} compress")
        if status:
            raise SystemExit(status)

    def handle(self, *args, **options) -> None:
        raise CommandError("Run this command from the command line.")

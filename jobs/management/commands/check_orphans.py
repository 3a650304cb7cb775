"""`manage.py check_orphans [--delete]`: files under MEDIA_ROOT without a row, and rows whose files are gone."""

from django.core.management.base import BaseCommand, CommandError

from jobs.services import retention


class Command(BaseCommand):
    help = "List checkpoint and upload files no row accounts for, and rows whose files are gone; exit 1 if any."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--delete", action="store_true", help="delete the files without rows")

    def handle(self, *args, delete: bool, **options) -> None:
        orphans = retention.orphans_find()
        for name in orphans.files_without_rows:
            self.stdout.write(f"file without a row: {name}")
        for row in orphans.rows_without_files:
            self.stdout.write(f"row without its files: {row}")
        if delete and orphans.files_without_rows:
            retention.orphans_remove(orphans)
            self.stdout.write(f"Deleted {len(orphans.files_without_rows)} files or folders without rows.")
            orphans = retention.orphans_find()
        if orphans:
            raise CommandError(
                f"{len(orphans.files_without_rows)} files without rows, {len(orphans.rows_without_files)} rows "
                "without files."
            )
        self.stdout.write("No orphans: every file has its row and every row its files.")

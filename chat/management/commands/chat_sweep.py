from datetime import timedelta

from django.core.management.base import BaseCommand

from chat import services


class Command(BaseCommand):
    help = "Mark replies left at 'streaming' by a stopped server process as 'interrupted'."

    def add_arguments(self, parser):
        parser.add_argument(
            "--all",
            action="store_true",
            help="Sweep every streaming row (only when no server process is running).",
        )

    def handle(self, *args, all: bool = False, **options):
        older_than = timedelta(0) if all else None
        swept = services.replies_sweep(older_than=older_than)
        self.stdout.write(f"{swept} interrupted repl{'y' if swept == 1 else 'ies'} marked.")

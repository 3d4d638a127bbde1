from datetime import timedelta

from django.core.management.base import BaseCommand

from chat import services


class Command(BaseCommand):
    help = (
        "Store the journalled text of replies whose server process died, and mark "
        "'streaming' rows that no process runs any more 'interrupted'."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--all",
            action="store_true",
            help=(
                "Also rows younger than CHAT_STALE_SECONDS (only when no server process "
                "is running: a reply in its first second is in no journal yet)."
            ),
        )

    def handle(self, *args, all: bool = False, **options):
        older_than = timedelta(0) if all else None
        swept = services.replies_sweep(older_than=older_than)
        self.stdout.write(f"{swept} interrupted repl{'y' if swept == 1 else 'ies'} marked.")

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat import services


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it (it is shown only this once)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label to recognise the key by")

    def handle(self, *args, username: str, name: str, **options):
        User = get_user_model()
        try:
            owner = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"No user named {username!r}.") from None
        _, raw_key = services.api_key_create(owner=owner, name=name)
        self.stdout.write(raw_key)

"""Create an API token for a client and print only its key, so that scripts can capture it."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create an API client NAME with a token and print the token's key (and nothing else)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the client's name (a user is created for it if needed)")
        parser.add_argument("--rotate", action="store_true", help="replace the client's existing token")

    @transaction.atomic
    def handle(self, *args, name: str, rotate: bool, **options):
        User = get_user_model()
        field = User._meta.get_field(User.USERNAME_FIELD)
        try:
            field.run_validators(name)
        except Exception as exc:
            raise CommandError(f"{name!r} is not a valid client name: {'; '.join(exc.messages)}") from None
        user, created = User.objects.get_or_create(**{User.USERNAME_FIELD: name})
        if created:
            user.set_unusable_password()
            user.save()
        existing = Token.objects.filter(user=user).first()
        if existing is not None:
            if not rotate:
                raise CommandError(f"client {name!r} already has a token; pass --rotate to replace it")
            existing.delete()
        self.stdout.write(Token.objects.create(user=user).key)

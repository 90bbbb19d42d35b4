"""Create a development admin user and API token when none exist, and print how to use them."""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

DEV_ADMIN = "admin"
DEV_CLIENT = "dev"


class Command(BaseCommand):
    help = "For development (DEBUG on): create an 'admin' superuser and a 'dev' API token if missing; print them."

    def handle(self, *args, **options):
        if not settings.DEBUG:
            raise CommandError("bootstrap_dev creates well-known accounts and runs only with DEBUG=1")
        User = get_user_model()
        if not User.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser(DEV_ADMIN, "", password)
            self.stdout.write(f"Admin user created: {DEV_ADMIN} / {password}  (shown once; change it in the admin)")
        else:
            self.stdout.write("Admin user: exists (manage.py changepassword admin to reset it)")
        user, created = User.objects.get_or_create(username=DEV_CLIENT)
        if created:
            user.set_unusable_password()
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"API token ({DEV_CLIENT}): {token.key}")

"""Create the superuser named by DJANGO_SUPERUSER_USERNAME / _PASSWORD / _EMAIL if it does not
exist yet. Does nothing when the variables are not set, so `make run` can always call it."""

import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the superuser from DJANGO_SUPERUSER_* variables when they are set."

    def handle(self, *args, **options):
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        if not username or not password:
            return
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            return
        User.objects.create_superuser(
            username=username, email=os.environ.get("DJANGO_SUPERUSER_EMAIL", ""), password=password
        )
        self.stdout.write(f"created superuser {username}")

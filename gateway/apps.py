from django.apps import AppConfig
from django.db.models.signals import post_migrate


def create_roles(sender, using="default", **kwargs):
    """The three roles exist after every migrate (and every test-database flush)."""
    from django.contrib.auth.models import Group

    from .web import ROLES

    for name in ROLES:
        Group.objects.using(using).get_or_create(name=name)


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self):
        from . import accounts

        post_migrate.connect(create_roles, sender=self)
        accounts.connect_signals()

"""Django app configuration of the balancer: the models through which the admin edits configuration.json."""

from django.apps import AppConfig


class BalancerConfig(AppConfig):
    name = "balancer"
    verbose_name = "Configuration"
    default_auto_field = "django.db.models.BigAutoField"

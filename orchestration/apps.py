"""Django app configuration of the orchestration layer."""

from django.apps import AppConfig
from django.conf import settings


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save
        from rest_framework.authtoken.models import Token

        from orchestration import checks  # noqa: F401  (registers the system checks)

        # A token deleted or a user changed (made inactive) in this process is not let in from the
        # cache; other processes let it in for at most API_TOKEN_CACHE_SECONDS.
        post_delete.connect(_forget_tokens, sender=Token, dispatch_uid="forget-tokens-on-delete")
        post_save.connect(_forget_tokens, sender=settings.AUTH_USER_MODEL, dispatch_uid="forget-tokens-on-user")


def _forget_tokens(**kwargs) -> None:
    # Imported when called: the authentication module loads DRF, which a worker process does not need.
    from orchestration.authentication import forget_tokens

    forget_tokens(**kwargs)

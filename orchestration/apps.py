"""Django app configuration of the orchestration layer."""

from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from orchestration import checks  # noqa: F401  (registers the system checks)

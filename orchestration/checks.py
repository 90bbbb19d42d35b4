"""System checks: settings and configuration that would break the task guarantees."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

from balancer.configuration import ConfigurationError
from orchestration.runtime import configuration

# Celery's hard limit follows the role's time limit by this much (services._publish).
HARD_LIMIT_MARGIN_S = 30


@register()
def visibility_timeout_outlives_every_step(app_configs, **kwargs) -> list[Error]:
    """A job comes back from Redis when its visibility timeout passes unacknowledged; the
    orchestration treats a returned job as one whose worker died, so no step may outlive it."""
    try:
        config = configuration()
    except ConfigurationError as exc:
        return [Error(str(exc), id="orchestration.E002")]
    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    errors = []
    for profile in config.profiles.values():
        for role in profile.roles.values():
            if role.time_limit_s + HARD_LIMIT_MARGIN_S >= timeout:
                errors.append(
                    Error(
                        f"role {role.queue} has time_limit_s={role.time_limit_s:g}, which with the hard-limit margin "
                        f"of {HARD_LIMIT_MARGIN_S}s reaches CELERY_VISIBILITY_TIMEOUT={timeout}",
                        hint="raise CELERY_VISIBILITY_TIMEOUT or lower the role's time_limit_s",
                        id="orchestration.E001",
                    )
                )
    return errors

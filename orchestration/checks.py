"""System checks: settings and configuration that would break the task guarantees."""

from __future__ import annotations

from django.core.checks import Error, register

from balancer.configuration import ConfigurationError
from orchestration.runtime import configuration


@register()
def configuration_loads(app_configs, **kwargs) -> list[Error]:
    """The configuration validates, against the settings too: a role's time limit must end before its job's
    visibility timeout (``runtime.validation``)."""
    try:
        configuration()
    except ConfigurationError as exc:
        return [Error(str(exc), id="orchestration.E002")]
    return []

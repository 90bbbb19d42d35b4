"""The Django project of the AI agent server: settings, URLs, the Celery app."""

from aiagentserver.celery import app as celery_app

__all__ = ["celery_app"]

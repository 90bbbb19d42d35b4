"""The Celery application: Redis broker, django-db results, one queue per role.

Jobs are routed by the caller to the queue ``<profile>.<role>``; a worker
consumes the queues it is given with ``-Q`` (``manage.py role_queues`` lists
them all).
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")

app = Celery("aiagentserver")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

"""The Celery application: Redis broker, django-db results, one queue per role.

Jobs are routed by the caller to the queue ``<profile>.<role>``; a worker
consumes the queues it is given with ``-Q`` (``manage.py role_queues`` lists
them all).
"""

import os

from celery import Celery

from aiagentserver import broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")
broker.install()  # the Redis transport with one client per channel (aiagentserver/broker.py)

app = Celery("aiagentserver")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

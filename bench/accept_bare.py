"""The baseline of bench/accept.py: a bare DRF view on the same Django stack that writes the posted body
atomically to a file (the state store's own helper, fsync included) and enqueues a Celery job.

Served by gunicorn as ``bench.accept_bare:application``, with the server's settings and this module
as the URLconf. No authentication, no throttling, no validation, no database: the floor.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")
django.setup()
settings.ROOT_URLCONF = __name__

from aiagentserver.celery import app  # noqa: E402
from balancer.files import atomic_write  # noqa: E402

DIRECTORY = Path(os.environ["BENCH_BARE_DIR"])
DIRECTORY.mkdir(parents=True, exist_ok=True)
QUEUE = os.environ["BENCH_BARE_QUEUE"]


class BareAccept(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []

    def post(self, request: Request) -> Response:
        task_id = str(uuid.uuid4())
        packet = {"task_id": task_id, "payload": request.data}
        atomic_write(DIRECTORY / f"{task_id}.json", json.dumps(packet).encode())
        app.send_task("bench.bare_echo", args=[task_id], queue=QUEUE, task_id=str(uuid.uuid4()))
        return Response(packet, status=202)


urlpatterns = [path("bare", BareAccept.as_view())]
application = get_wsgi_application()

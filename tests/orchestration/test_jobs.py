"""The Celery jobs' hooks (orchestration/tasks.py) that run in the worker around every job."""

import types

import pytest
from django.db import connection, transaction

from orchestration.models import Task
from orchestration.tasks import close_stale_connections


@pytest.mark.django_db(transaction=True)
def test_connections_are_kept_between_jobs_until_they_are_older_than_the_max_age():
    job = types.SimpleNamespace(request=types.SimpleNamespace(is_eager=False))
    Task.objects.count()
    kept = connection.connection
    close_stale_connections(sender=job)
    assert connection.connection is kept  # younger than DB_CONN_MAX_AGE: kept for the next job
    connection.close_at = 0  # as if it were older than DB_CONN_MAX_AGE
    close_stale_connections(sender=job)
    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_job_run_eagerly_inside_a_transaction_leaves_its_connection_open():
    job = types.SimpleNamespace(request=types.SimpleNamespace(is_eager=True))
    with transaction.atomic():
        Task.objects.count()
        close_stale_connections(sender=job)
        assert Task.objects.count() == 0

"""The task list at scale: each filter's page is read in order from an index, pages never overlap,
and the list leaves the packets in the database (the admin's changelist: test_admin.py)."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration.models import Task
from orchestration.selectors import task_list

pytestmark = pytest.mark.django_db

START = datetime(2026, 11, 1, tzinfo=UTC)


def make_tasks(spec: list[tuple[str, str, str]], *, same_time: bool = False) -> list[Task]:
    """Rows for (profile, role, status) triples, each a second newer than the one before (or all at once)."""
    rows = []
    for n, (profile, role, status) in enumerate(spec):
        task_id = uuid.uuid4()
        created = START if same_time else START + timedelta(seconds=n)
        packet = {"task_id": str(task_id), "profile": profile, "role": role, "status": status, "history": []}
        rows.append(
            Task(
                task_id=task_id,
                profile=profile,
                role=role,
                status=status,
                version=1,
                packet=packet,
                created_at=created,
                updated_at=created,
            )
        )
    return Task.objects.bulk_create(rows)


FILTERS = [
    {},
    {"status": "failed"},
    {"profile": "developer"},
    {"role": "qa"},
    {"profile": "developer", "role": "qa", "status": "failed"},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "+".join(f) or "none")
def test_each_filter_reads_its_page_in_order_from_an_index(filters):
    make_tasks([("developer", "qa", "failed"), ("productivity", "writer", "succeeded")] * 20)
    ids = task_list(**filters).values("pk")[100:150]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # On so few rows the planner would rather sort a scan; forbid both to see what the indexes allow.
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("SET LOCAL enable_sort = off")
            cursor.execute("SET LOCAL enable_bitmapscan = off")
    plan = ids.explain()
    assert "_idx" in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


def test_pages_never_overlap_when_tasks_share_a_creation_time(api):
    tasks = make_tasks([("developer", "qa", "queued")] * 7, same_time=True)
    seen = []
    for page in range(1, 5):
        body = api.get("/api/v1/tasks/", {"page": page, "page_size": 2}).json()
        assert body["count"] == 7
        seen += [task["task_id"] for task in body["results"]]
    # Newest first; the task id (descending) breaks ties.
    assert seen == [str(t.task_id) for t in sorted(tasks, key=lambda t: t.task_id, reverse=True)]


def test_a_deep_page_is_the_same_as_an_offset_into_the_ordered_tasks(api):
    make_tasks([("developer", "planner", "succeeded"), ("developer", "qa", "failed")] * 30)
    expected = [str(pk) for pk in Task.objects.filter(status="failed").values_list("pk", flat=True)]
    body = api.get("/api/v1/tasks/", {"status": "failed", "page": 3, "page_size": 7}).json()
    assert [task["task_id"] for task in body["results"]] == expected[14:21]
    last = api.get("/api/v1/tasks/", {"status": "failed", "page": 5, "page_size": 7}).json()
    assert [task["task_id"] for task in last["results"]] == expected[28:]
    assert api.get("/api/v1/tasks/", {"status": "failed", "page": 6, "page_size": 7}).status_code == 404


def test_a_page_reads_its_ids_from_the_index_then_its_rows_by_primary_key_alone(api):
    make_tasks([("developer", "qa", "failed"), ("productivity", "writer", "succeeded")] * 10)
    with CaptureQueriesContext(connection) as queries:
        body = api.get("/api/v1/tasks/", {"profile": "developer", "page": 2, "page_size": 3}).json()
    assert body["count"] == 10 and len(body["results"]) == 3
    count, ids, rows = [q["sql"] for q in queries if "orchestration_task" in q["sql"]]
    assert "COUNT(" in count.upper()
    assert "OFFSET 3" in ids.upper() and '"packet"' not in ids
    # The filter is not repeated on the rows: SQLite would then read every match through its index.
    assert '"profile"' not in rows.split("WHERE", 1)[1] and "ORDER BY" not in rows.upper()
    assert '"packet"' not in rows


@pytest.mark.parametrize("name", ["status", "profile", "role"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_filter_is_400_naming_it_rather_than_listing_every_task(api, name, value):
    """DRF took an empty value for a parameter not sent: `?status=` listed every task."""
    make_tasks([("developer", "qa", "failed")])
    response = api.get("/api/v1/tasks/", {name: value})
    assert response.status_code == 400, response.content
    assert response.json()["field"] == name and "empty" in response.json()["detail"]


@pytest.mark.parametrize("name", ["page", "page_size"])
@pytest.mark.parametrize("value", ["1.0", "", " 1", "+1", "01", "1e1", "1_0", "0", "-1", "\u0661", "last"])
def test_a_page_or_page_size_not_written_as_a_whole_number_from_1_is_400_naming_it(api, name, value):
    """DRF's IntegerField took "1.0" (and "" for not sent), which the paginator, reading the query itself,
    then answered with a 404 "Invalid page." (`page`) or ignored for the default 50 (`page_size`)."""
    make_tasks([("developer", "qa", "failed")])
    response = api.get("/api/v1/tasks/", {name: value})
    assert response.status_code == 400, response.content
    assert response.json()["field"] == name


@pytest.mark.parametrize("digits", [18, 19, 5000])
def test_a_long_page_or_page_size_is_after_the_last_page_or_the_largest_size(api, digits):
    """Python's int() refuses a number of over 4,300 digits: the paginator took such a page size for none
    given (50 tasks a page)."""
    make_tasks([("developer", "qa", "failed")] * 60)
    body = api.get("/api/v1/tasks/", {"page_size": "9" * digits}).json()
    assert body["count"] == 60 and len(body["results"]) == 60  # taken as the largest page size, 500
    assert api.get("/api/v1/tasks/", {"page": "9" * digits}).status_code == 404  # after the last page
    body = api.get("/api/v1/tasks/", {"page": "3", "page_size": "25"}).json()
    assert len(body["results"]) == 10 and body["previous"].endswith("page=2&page_size=25")

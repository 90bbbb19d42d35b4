"""The admin's task pages: they render for staff, refuse anonymous users, and act through the services."""

import json

import pytest
from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration.models import Task
from tests.orchestration.test_task_list import make_tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def task(api):
    body = {"payload": {"input": "<script>alert('x')</script> plan"}}
    response = api.post("/api/v1/developer/planner", data=json.dumps(body), content_type="application/json")
    return response.json()


@pytest.fixture
def staff_client(client, django_user_model):
    """A staff user who may view tasks (not a superuser)."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(username="operator", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)
    return client


def test_task_list_and_detail_render_for_a_staff_user(staff_client, task):
    listing = staff_client.get("/admin/orchestration/task/")
    assert listing.status_code == 200
    assert task["task_id"] in listing.content.decode()
    detail = staff_client.get(f"/admin/orchestration/task/{task['task_id']}/change/")
    assert detail.status_code == 200
    assert "submitted" in detail.content.decode()
    # Viewing is not operating: the cancel and retry actions need the change permission.
    assert "cancel_tasks" not in listing.content.decode()


def test_task_list_and_detail_render_for_a_superuser(admin_client, task):
    listing = admin_client.get("/admin/orchestration/task/")
    assert listing.status_code == 200
    assert task["task_id"] in listing.content.decode()
    filtered = admin_client.get("/admin/orchestration/task/", {"status__exact": "queued", "role": "planner"})
    assert filtered.status_code == 200
    found = admin_client.get("/admin/orchestration/task/", {"q": task["task_id"]})
    assert task["task_id"] in found.content.decode()
    nothing = admin_client.get("/admin/orchestration/task/", {"q": "not-a-uuid"})
    assert nothing.status_code == 200 and task["task_id"] not in nothing.content.decode()
    detail = admin_client.get(f"/admin/orchestration/task/{task['task_id']}/change/")
    assert detail.status_code == 200
    page = detail.content.decode()
    assert "submitted" in page and "developer.planner" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page


def test_the_changelist_reads_no_column_of_every_row(admin_client):
    make_tasks([("developer", "qa", "failed"), ("productivity", "writer", "succeeded")] * 5)
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/orchestration/task/", {"status__exact": "failed"})
    assert page.status_code == 200
    task_queries = [q["sql"] for q in queries if "orchestration_task" in q["sql"]]
    # No SELECT DISTINCT for the filters' choices or the dates, no total beside the filtered count.
    assert not any("DISTINCT" in sql.upper() for sql in task_queries), task_queries
    assert sum("COUNT(" in sql.upper() for sql in task_queries) == 1, task_queries
    assert not any('"packet"' in sql for sql in task_queries)
    # The profile and role filters still offer every value stored, found through their indexes.
    html = page.content.decode().replace("&amp;", "&")
    for link in ("?profile=developer", "?profile=productivity", "?role=qa", "?role=writer"):
        assert link in html, link
    assert "2026-11-01 00:00:00" in html  # the creation time, to the second


def test_the_changelist_filters_by_creation_date(admin_client):
    old, new = make_tasks([("developer", "qa", "failed")] * 2)
    Task.objects.filter(pk=old.pk).update(created_at="2020-01-01T00:00:00Z")
    since = {"created_at__gte": "2026-01-01 00:00:00+00:00"}
    page = admin_client.get("/admin/orchestration/task/", since).content.decode()
    assert str(new.task_id) in page and str(old.task_id) not in page


def test_the_changelist_checkbox_is_djangos_own(task):
    task_admin = admin.site._registry[Task]
    row = Task.objects.get(pk=task["task_id"])
    assert task_admin.action_checkbox(row) == admin.ModelAdmin.action_checkbox(task_admin, row)


def test_admin_pages_refuse_an_anonymous_user(client, task):
    for url in ("/admin/orchestration/task/", f"/admin/orchestration/task/{task['task_id']}/change/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")


def test_cancel_action_goes_through_the_service(admin_client, task, state_dir):
    response = admin_client.post(
        "/admin/orchestration/task/", {"action": "cancel_tasks", "_selected_action": [task["task_id"]]}, follow=True
    )
    assert response.status_code == 200
    stored = json.loads((state_dir / f"{task['task_id']}.json").read_text())
    assert stored["status"] == "cancelled"
    assert stored["history"][-1]["event"] == "cancelled"
    assert Task.objects.get(task_id=task["task_id"]).status == "cancelled"


def test_retry_action_requeues_a_cancelled_task(admin_client, task, state_dir):
    from orchestration.services import task_cancel

    task_cancel(task_id=task["task_id"])
    admin_client.post("/admin/orchestration/task/", {"action": "retry_tasks", "_selected_action": [task["task_id"]]})
    stored = json.loads((state_dir / f"{task['task_id']}.json").read_text())
    assert stored["status"] == "queued"
    assert [event["event"] for event in stored["history"]] == ["submitted", "cancelled", "retried"]


def test_an_action_that_does_not_apply_says_why(admin_client, task):
    response = admin_client.post(
        "/admin/orchestration/task/", {"action": "retry_tasks", "_selected_action": [task["task_id"]]}, follow=True
    )
    assert "only failed or cancelled tasks can be retried" in response.content.decode()


def test_the_metrics_page_shows_llms_queues_and_throughput_to_staff_only(staff_client, client, task):
    index = staff_client.get("/admin/")
    assert "/admin/metrics/" in index.content.decode()
    page = staff_client.get("/admin/metrics/")
    assert page.status_code == 200
    html = page.content.decode()
    for expected in (
        "smollm2-135m",
        "developer.planner",
        "Recent throughput",
        "ai-agent-server.metrics",
        "tasks stored",
    ):
        assert expected in html, expected
    client.logout()
    assert client.get("/admin/metrics/").status_code == 302  # to the login page


def test_the_metrics_page_says_on_which_workers_qas_tests_cannot_run(staff_client, sandbox_reports):
    html = staff_client.get("/admin/metrics/").content.decode()
    lines = {name: next(line for line in html.split("<br>") if name in line) for name in sandbox_reports}
    assert "QA's tests cannot run here</strong>: bubblewrap is not installed" in lines["nobwrap@test"]
    assert "QA's tests run unsandboxed</strong>: SANDBOX_ALLOW_UNSANDBOXED=1" in lines["unsandboxed@test"]
    assert 'title="under bubblewrap">QA\'s tests run sandboxed' in lines["sandboxed@test"].replace("&#x27;", "'")
    assert "QA" not in lines["planner@test"]


def test_the_metrics_page_needs_the_permission_to_view_tasks(client, django_user_model):
    """Any staff user saw the LLMs' health errors, the workers' hosts and the counts (and each view ran the
    LLMs' health checks)."""
    user = django_user_model.objects.create_user(username="config-only", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get("/admin/metrics/").status_code == 403
    assert "/admin/metrics/" not in client.get("/admin/").content.decode()
    from django.contrib.auth.models import Permission

    user.user_permissions.add(Permission.objects.get(codename="change_task"))  # an operator
    assert client.get("/admin/metrics/").status_code == 200


def test_an_action_goes_on_past_a_task_it_fails_on(admin_client, api, monkeypatch):
    """A task whose parent's file was broken made the whole action a 500, half done, saying nothing."""
    from orchestration import admin as task_admin
    from orchestration.services import task_cancel

    body = json.dumps({"payload": {"input": "plan"}})
    ids = [
        api.post("/api/v1/developer/planner", data=body, content_type="application/json").json()["task_id"]
        for _ in range(3)
    ]

    def cancel(*, task_id):
        if task_id == ids[1]:
            raise RuntimeError("the parent's state file is corrupt")
        return task_cancel(task_id=task_id)

    monkeypatch.setattr(task_admin, "task_cancel", cancel)
    response = admin_client.post(
        "/admin/orchestration/task/", {"action": "cancel_tasks", "_selected_action": ids}, follow=True
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "Cancelled 2 task(s)." in page
    # (The admin capitalises a message's first letter: the id's is left out.)
    assert f"{ids[1][1:]}: failed: RuntimeError: the parent&#x27;s state file is corrupt" in page
    assert {Task.objects.get(task_id=i).status for i in (ids[0], ids[2])} == {"cancelled"}


def test_a_task_whose_state_file_cannot_be_read_is_shown_with_a_warning(admin_client, task, state_dir):
    """Its page showed the row's copy as the task, with nothing to say that its file (the truth) was broken."""
    path = state_dir / f"{task['task_id']}.json"
    whole = path.read_bytes()
    path.write_text('{"task_id": "cut off')
    try:
        page = admin_client.get(f"/admin/orchestration/task/{task['task_id']}/change/").content.decode()
    finally:
        path.write_bytes(whole)  # the session's state directory: other tests read every file in it
    assert "is not valid JSON" in page and "sync_tasks --restore-unreadable" in page
    assert "submitted" in page  # the row's copy is still shown

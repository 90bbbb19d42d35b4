"""The admin's view of tasks: read-only, filtered and searchable; cancel and retry go through the services."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext as _

from orchestration.exceptions import ApplicationError
from orchestration.metrics import metrics_get
from orchestration.models import Task
from orchestration.runtime import task_store
from orchestration.selectors import RESTORE_ADVICE
from orchestration.services import task_cancel, task_retry
from orchestration.state_store import CorruptState, TaskNotFound

logger = logging.getLogger(__name__)


def _pretty(value: Any) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


def _timestamp(value: datetime) -> str:
    """To the second, in the current time zone (Django's localized format shows minutes)."""
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def _distinct_values(queryset: QuerySet[Task], field: str) -> list[Any]:
    """The field's distinct values, in order, found by stepping through an index that begins with
    the field: one short query per value, where SELECT DISTINCT reads every row."""
    ordered = queryset.order_by(field).values_list(field, flat=True)
    values = []
    value = ordered.first()
    while value is not None:
        values.append(value)
        value = ordered.filter(**{f"{field}__gt": value}).first()
    return values


class IndexedValuesListFilter(admin.AllValuesFieldListFilter):
    """The admin's filter by every value of a field (profile, role), its choices found through the
    field's index: with 100,000 tasks, SELECT DISTINCT took 5 to 10 ms a filter on every page."""

    def __init__(self, field, request, params, model, model_admin, field_path):
        super().__init__(field, request, params, model, model_admin, field_path)
        self.lookup_choices = _distinct_values(model_admin.get_queryset(request), field.name)


class TaskChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters=None) -> QuerySet[Task]:
        # The list shows no part of the packet: decoding 100 of them cost more than the query.
        return super().get_queryset(request, exclude_parameters).defer("packet")


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ("task_id", "profile", "role", "status", "iteration", "version", "created", "updated")
    # No date_hierarchy: its links come from SELECT DISTINCT over the truncated date of every
    # matching row, 450 ms on each page with 100,000 tasks on SQLite; the date filter's choices
    # (today, past 7 days, this month, this year) cost nothing and their ranges use the indexes.
    list_filter = (
        "status",
        ("profile", IndexedValuesListFilter),
        ("role", IndexedValuesListFilter),
        "created_at",
    )
    # The total beside a filtered count ("5 results (100,000 total)") is one more COUNT(*) of the table.
    show_full_result_count = False
    # Rendering a row costs about 0.5 ms (its links, dates and checkbox): 100 rows were most of the page's time.
    list_per_page = 50
    search_fields = ("task_id",)
    actions = ("cancel_tasks", "retry_tasks")
    fields = (
        "task_id", "profile", "role", "status", "iteration", "version", "parent_id", "created_at", "updated_at",
        "payload_view", "result_view", "history_view",
    )  # fmt: skip
    readonly_fields = fields

    def get_changelist(self, request: HttpRequest, **kwargs) -> type[ChangeList]:
        return TaskChangeList

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Task], search_term: str):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(task_id=uuid.UUID(term)), False
        except ValueError:
            return queryset.none(), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None) -> HttpResponse:
        """The task as its row has it, with a warning when its state file (the truth) cannot be read."""
        try:
            task_store().read(object_id)
        except CorruptState as exc:
            self.message_user(
                request,
                f"{exc}. What this page shows is the database mirror's copy: {RESTORE_ADVICE}.",
                messages.WARNING,
            )
        except TaskNotFound:
            self.message_user(request, "This task has no state file: its row is an orphan.", messages.WARNING)
        except (OSError, ValueError):  # the disk away; an id that is no task's (the page says it does not exist)
            pass
        return super().change_view(request, object_id, form_url, extra_context)

    def has_change_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False  # the state file is the truth: tasks change only through the services

    def has_delete_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("orchestration.change_task")

    # The list's columns are rendered for every row: the two below cost 0.2 ms each a row done Django's way.
    def action_checkbox(self, obj: Task) -> str:
        """Django's markup, without rendering a form widget's template."""
        return format_html(
            '<input type="checkbox" name="{}" value="{}" class="action-select" aria-label="{}">',
            helpers.ACTION_CHECKBOX_NAME,
            str(obj.pk),
            format_html(_("Select this object for an action - {}"), str(obj)),
        )

    @admin.display(description="created at", ordering="created_at")
    def created(self, obj: Task) -> str:
        return _timestamp(obj.created_at)

    @admin.display(description="updated at", ordering="updated_at")
    def updated(self, obj: Task) -> str:
        return _timestamp(obj.updated_at)

    @admin.display(description="payload")
    def payload_view(self, obj: Task) -> str:
        return _pretty(obj.packet.get("payload"))

    @admin.display(description="result")
    def result_view(self, obj: Task) -> str:
        return _pretty(obj.packet.get("result"))

    @admin.display(description="history")
    def history_view(self, obj: Task) -> str:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    event.get("at"),
                    event.get("event"),
                    event.get("status"),
                    event.get("agent") or "",
                    event.get("llm") or "",
                    _pretty(event.get("detail")) if event.get("detail") else "",
                )
                for event in obj.packet.get("history", [])
            ),
        )
        return format_html(
            "<table><thead><tr><th>at</th><th>event</th><th>status</th><th>agent</th><th>LLM</th><th>detail</th>"
            "</tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def _apply(self, request: HttpRequest, queryset: QuerySet[Task], service, verb: str) -> None:
        done = 0
        for task in queryset:
            try:
                service(task_id=str(task.task_id))
                done += 1
            except ApplicationError as exc:
                self.message_user(request, f"{task.task_id}: {exc.detail}", messages.WARNING)
            except Exception as exc:  # a broken file of the task or its parent, Redis away: the others go on
                logger.exception("admin: %s of task %s failed", verb.lower(), task.task_id)
                self.message_user(request, f"{task.task_id}: failed: {type(exc).__name__}: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"{verb} {done} task(s).", messages.SUCCESS)

    @admin.action(description="Cancel the selected tasks", permissions=["operate"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        self._apply(request, queryset, task_cancel, "Cancelled")

    @admin.action(description="Retry the selected tasks", permissions=["operate"])
    def retry_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        self._apply(request, queryset, task_retry, "Retried")


admin.site.index_template = "admin/orchestration/index.html"  # adds the link to the metrics page


METRICS_PERMISSIONS = ("orchestration.view_task", "orchestration.change_task")  # either: who may see tasks


def metrics_page(request: HttpRequest) -> HttpResponse:
    """The metrics at a glance (the same as GET /api/v1/metrics): LLM states, queues, recent throughput.
    For the staff who may view tasks: it shows the LLMs' health errors, the workers' hosts and the counts."""
    if not any(request.user.has_perm(permission) for permission in METRICS_PERMISSIONS):
        raise PermissionDenied
    metrics = metrics_get()
    performance = metrics["performance"]["llms"]
    llm_rows = [
        {
            "id": llm_id,
            "status": state,
            "recent": performance.get(llm_id, {}).get("last_5_minutes", {}),
            "total": performance.get(llm_id, {}).get("since_start", {}),
        }
        for llm_id, state in metrics["status"]["llms"].items()
    ]
    context = {
        **admin.site.each_context(request),
        "title": "Metrics",
        "metrics": metrics,
        "status": metrics["status"],
        "usage": metrics["usage"],
        "llm_rows": llm_rows,
        "recent_calls": sum(row["recent"].get("requests", 0) for row in llm_rows),
    }
    return TemplateResponse(request, "admin/orchestration/metrics.html", context)


# The configuration's pages live beside the tasks' (they need the agent names, which the
# balancer does not know).
from orchestration import config_admin  # noqa: E402, F401

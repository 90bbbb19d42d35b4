"""The database mirror of the task state files, for the admin and for queries.

The JSON file of a task is the truth; this row is rewritten from it on every
store write, and ``manage.py sync_tasks`` rebuilds all rows from the files.
"""

from django.db import models

from orchestration.packets import STATUSES


class Task(models.Model):
    task_id = models.UUIDField(primary_key=True)
    profile = models.CharField(max_length=64)
    role = models.CharField(max_length=64)
    status = models.CharField(max_length=32, choices=[(s, s) for s in STATUSES])
    version = models.PositiveIntegerField()
    iteration = models.PositiveIntegerField(default=0)
    parent_id = models.UUIDField(null=True, blank=True)  # not indexed: no query filters by it
    packet = models.JSONField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        # Newest first; the task id breaks ties, so that pages never overlap or skip a task.
        ordering = ["-created_at", "-task_id"]
        # One index per filter of the task list (the API's and the admin's), each ending in the order,
        # so that a page is read in order from its index and never sorted: a page costs the same with
        # 1,000 tasks as with 100,000 (the count of the matching tasks still grows with them).
        # task_filter_idx serves all three filters together, and the metrics' count per role and status.
        # The last two serve the metrics' other reads, which every scrape and every reload of the admin's
        # metrics page makes: without them both read every row (the packets too, on SQLite).
        indexes = [
            models.Index(fields=["-created_at", "-task_id"], name="task_created_idx"),
            models.Index(fields=["status", "-created_at", "-task_id"], name="task_status_idx"),
            models.Index(fields=["profile", "-created_at", "-task_id"], name="task_profile_idx"),
            models.Index(fields=["role", "-created_at", "-task_id"], name="task_role_idx"),
            models.Index(fields=["profile", "role", "status", "-created_at", "-task_id"], name="task_filter_idx"),
            # The tasks finished in the last 5 minutes: a range of updated_at within each finished status.
            models.Index(fields=["status", "updated_at"], name="task_status_updated_idx"),
            # The feedback loop's rounds per role. Partial: only the tasks that ran a round are in it.
            models.Index(
                fields=["profile", "role", "iteration"], condition=models.Q(iteration__gt=0), name="task_loop_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.profile}/{self.role} {self.task_id} ({self.status})"

"""The database mirror of the task state files, for the admin and for queries.

The JSON file of a task is the truth; this row is rewritten from it on every
store write, and ``manage.py sync_tasks`` rebuilds all rows from the files.
"""

from django.db import models

from orchestration.packets import STATUSES


class Task(models.Model):
    task_id = models.UUIDField(primary_key=True)
    profile = models.CharField(max_length=64, db_index=True)
    role = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=32, choices=[(s, s) for s in STATUSES], db_index=True)
    version = models.PositiveIntegerField()
    iteration = models.PositiveIntegerField(default=0)
    parent_id = models.UUIDField(null=True, blank=True, db_index=True)
    packet = models.JSONField()
    created_at = models.DateTimeField(db_index=True)
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["profile", "role", "status", "-created_at"], name="task_filter_idx")]

    def __str__(self) -> str:
        return f"{self.profile}/{self.role} {self.task_id} ({self.status})"

# Indexes for the task list: one per filter, each ending in the list's order (newest first, the
# task id breaking ties), in place of the single-column indexes on profile, role, status and
# created_at, which are now prefixes of them. The single-column indexes are dropped by name, not
# through AlterField: on SQLite that would copy the whole table (the packets too) once per field.

from django.db import migrations, models

STATUS_CHOICES = [
    ("queued", "queued"),
    ("running", "running"),
    ("awaiting_feedback", "awaiting_feedback"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
]

# The names Django gave the db_index indexes of 0001 (the same on every backend); the "_like"
# ones (varchar_pattern_ops, for LIKE) exist on PostgreSQL only.
SINGLE_INDEXES = {
    "orchestration_task_profile_54716dbf": "profile",
    "orchestration_task_role_d601501b": "role",
    "orchestration_task_status_c2f6e5f8": "status",
    "orchestration_task_created_at_7289739a": "created_at",
}
LIKE_INDEXES = [f"{name}_like" for name in list(SINGLE_INDEXES)[:3]]


class Migration(migrations.Migration):

    dependencies = [
        ("orchestration", "0001_initial"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="task",
            options={"ordering": ["-created_at", "-task_id"]},
        ),
        migrations.RemoveIndex(
            model_name="task",
            name="task_filter_idx",
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(model_name="task", name="created_at", field=models.DateTimeField()),
                migrations.AlterField(model_name="task", name="profile", field=models.CharField(max_length=64)),
                migrations.AlterField(model_name="task", name="role", field=models.CharField(max_length=64)),
                migrations.AlterField(
                    model_name="task",
                    name="status",
                    field=models.CharField(choices=STATUS_CHOICES, max_length=32),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    [f'DROP INDEX IF EXISTS "{name}"' for name in [*SINGLE_INDEXES, *LIKE_INDEXES]],
                    # Going back makes the plain indexes again (not the "_like" ones: nothing here uses LIKE).
                    reverse_sql=[
                        f'CREATE INDEX "{name}" ON "orchestration_task" ("{column}")'
                        for name, column in SINGLE_INDEXES.items()
                    ],
                ),
            ],
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["-created_at", "-task_id"], name="task_created_idx"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["status", "-created_at", "-task_id"], name="task_status_idx"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["profile", "-created_at", "-task_id"], name="task_profile_idx"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["role", "-created_at", "-task_id"], name="task_role_idx"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["profile", "role", "status", "-created_at", "-task_id"], name="task_filter_idx"),
        ),
    ]

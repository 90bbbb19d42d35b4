# Indexes for the metrics' reads of the task mirror, which every GET /metrics scrape, GET /api/v1/metrics
# and reload of the admin's metrics page makes. Without them the count of the tasks finished in the last
# 5 minutes walked task_status_idx over every finished task and read each row for its updated_at, and the
# feedback loop's rounds per role read every row; both grew with the history kept. With them each is
# answered from its index alone. task_loop_idx is partial (iteration > 0), on SQLite and PostgreSQL alike.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0003_drop_parent_index"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["status", "updated_at"], name="task_status_updated_idx"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("iteration__gt", 0)), fields=["profile", "role", "iteration"], name="task_loop_idx"
            ),
        ),
    ]

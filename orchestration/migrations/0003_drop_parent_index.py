# The index on parent_id served no query: the API's and the admin's lists filter by status, profile and
# role, and a plan finds its children in the parent's packet. Every INSERT of a task wrote it (one
# b-tree page more in every new task's transaction). Dropped by name, not through AlterField: on
# SQLite that would copy the whole table, the packets too.

from django.db import migrations, models

PARENT_INDEX = "orchestration_task_parent_id_9ac1e678"  # the name Django gave 0001's db_index, on every backend


class Migration(migrations.Migration):

    dependencies = [
        ("orchestration", "0002_task_list_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="task", name="parent_id", field=models.UUIDField(blank=True, null=True)
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{PARENT_INDEX}"',
                    reverse_sql=f'CREATE INDEX "{PARENT_INDEX}" ON "orchestration_task" ("parent_id")',
                ),
            ],
        ),
    ]

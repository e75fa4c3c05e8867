"""Indexes for the administrator's pages: the dashboard counts deliveries by delivered_at (per
hour, and each node's last one); the studies list filters on a patient-name prefix."""

from django.db import migrations, models

from gateway.schema import AddIndexWithoutLocking

# PostgreSQL only: the expression the ORM's istartswith compares (UPPER(name::text) LIKE 'X%'),
# with text_pattern_ops because the database collation is not C. SQLite scans; it is the small
# embedded set-up.
NAME_PREFIX_INDEX = "receivedstudy_name_prefix_idx"


def create_name_prefix_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {NAME_PREFIX_INDEX} ON routing_receivedstudy "
            "(UPPER(patient_name::text) text_pattern_ops)"
        )


def drop_name_prefix_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME_PREFIX_INDEX}")


class Migration(migrations.Migration):
    # Indexes on tables that may be large and busy are built without locking writes.
    atomic = False

    dependencies = [
        ("routing", "0002_delivery_claimed_by_delivery_retried_at"),
    ]

    operations = [
        AddIndexWithoutLocking(
            model_name="delivery",
            index=models.Index(fields=["delivered_at"], name="delivery_delivered_at_idx"),
        ),
        AddIndexWithoutLocking(
            model_name="delivery",
            index=models.Index(fields=["node", "delivered_at"], name="delivery_node_delivered_idx"),
        ),
        migrations.RunPython(create_name_prefix_index, drop_name_prefix_index),
    ]

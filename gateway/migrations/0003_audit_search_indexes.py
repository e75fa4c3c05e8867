"""Indexes for the audit trail's free-text search (PostgreSQL): without them every search reads
the whole trail, which only grows. Trigram GIN indexes serve ``icontains`` on the upper-cased
columns Django compares."""

from django.db import migrations


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS gateway_audit_search_trgm ON gateway_auditevent USING gin "
        "(upper(object_repr) gin_trgm_ops, upper(actor) gin_trgm_ops, "
        "upper(action) gin_trgm_ops)"
    )
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS gateway_audit_object_id ON gateway_auditevent (object_id)"
    )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS gateway_audit_search_trgm")
    schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS gateway_audit_object_id")


class Migration(migrations.Migration):
    atomic = False  # CONCURRENTLY: the trail keeps being written while its indexes build
    dependencies = [("gateway", "0002_audit_chain")]
    operations = [migrations.RunPython(create, drop)]

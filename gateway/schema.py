"""Migration operations for upgrading a gateway that is running on large tables."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db.migrations.operations import AddIndex, RunPython


class AddIndexWithoutLocking(AddIndexConcurrently):
    """An AddIndex that on PostgreSQL builds the index CONCURRENTLY, so that HL7 messages,
    instances and deliveries keep being written to a table of millions of rows while an upgrade
    indexes it; elsewhere (the embedded SQLite) a plain AddIndex. Its migration must be
    ``atomic = False``."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


def drop_indexes(indexes: list[tuple[str, str, str, str]]) -> RunPython:
    """An operation that drops indexes ``(name, table, column, opclass)`` (on PostgreSQL
    CONCURRENTLY, so that writes go on) and, reversed, builds them again the same way.

    For a ``db_index`` flag taken off a field: put the AlterField in the state operations of
    a ``SeparateDatabaseAndState`` and this in its database operations. Django's own
    AlterField would rebuild the table on SQLite, and on PostgreSQL drop and re-validate a
    foreign key while holding locks. Its migration must be ``atomic = False``."""

    def forwards(apps, schema_editor):
        quote = schema_editor.quote_name
        concurrently = " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
        for name, _table, _column, _opclass in indexes:
            schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {quote(name)}")

    def backwards(apps, schema_editor):
        quote = schema_editor.quote_name
        postgresql = schema_editor.connection.vendor == "postgresql"
        for name, table, column, opclass in indexes:
            if opclass and not postgresql:  # operator classes exist on PostgreSQL only
                continue
            how = " CONCURRENTLY" if postgresql else ""
            schema_editor.execute(f"CREATE INDEX{how} IF NOT EXISTS {quote(name)} ON "
                                  f"{quote(table)} ({quote(column)} {opclass})")

    return RunPython(forwards, backwards)

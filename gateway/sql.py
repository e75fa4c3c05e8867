"""Plain-SQL inserts for the per-message hot path.

Creating a new order from one message takes five inserts. Through the ORM each costs far
more CPU in query compilation than the database spends on it, which is what limits the
listener's throughput, so these few statements are written directly. Columns and defaults
come from the models' ``_meta``, so a field added to a model (with a default) needs no
change here.
"""

from __future__ import annotations

import json
import re
from functools import cache

from django.db import connection, models
from django.utils import timezone


def cursor():
    """A cursor for the statements every HL7 message or received instance runs.

    On PostgreSQL it binds parameters on the server (psycopg sends them beside the statement
    instead of quoting them into its text, as Django's default cursor does): measured about
    0.25 ms less listener CPU per HL7 message, and statements run often enough are prepared
    (DATABASE_PREPARE_THRESHOLD). Django's wrapper stays around it, so errors, query logging
    and execute wrappers behave as with ``connection.cursor()``, which is what other
    databases get."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    from django.db.backends.postgresql.base import ServerBindingCursor

    connection.ensure_connection()
    with connection.wrap_database_errors:
        if connection.queries_logged:
            # A statement run prepared leaves psycopg without its text, which the log needs.
            return connection.make_debug_cursor(_unprepared(ServerBindingCursor)(
                connection.connection))
        return connection.make_cursor(ServerBindingCursor(connection.connection))


@cache
def _unprepared(cursor_class: type) -> type:
    class Unprepared(cursor_class):
        def execute(self, query, params=None, *, prepare=None, binary=None):
            return super().execute(query, params, prepare=False, binary=binary)

    return Unprepared


@cache
def _columns(model: type[models.Model]) -> list[tuple[str, str, object]]:
    """(attname, column, field) for every concrete column except the primary key."""
    return [(f.attname, f.column, f) for f in model._meta.concrete_fields if not f.primary_key]


@cache
def _kinds(model: type[models.Model]) -> list[tuple[str, object, str]]:
    """(attname, field, kind) where kind says how a value is prepared: "now" for
    auto_now(_add) timestamps, "datetime" and "json" for those fields, "" for as-is."""
    kinds = []
    for attname, _column, field in _columns(model):
        kind = ""
        if isinstance(field, models.DateTimeField) and (field.auto_now or field.auto_now_add):
            kind = "now"
        elif isinstance(field, models.DateTimeField):
            kind = "datetime"
        elif isinstance(field, models.JSONField):
            kind = "json"
        kinds.append((attname, field, kind))
    return kinds


@cache
def _insert_sql(model: type[models.Model], rows: int, vendor: str, unique: str = "") -> str:
    quote = connection.ops.quote_name
    json_cast = "::jsonb" if vendor == "postgresql" else ""
    placeholder = "(" + ", ".join(
        f"%s{json_cast}" if isinstance(f, models.JSONField) else "%s"
        for _, _, f in _columns(model)
    ) + ")"
    names = ", ".join(quote(c) for _, c, _ in _columns(model))
    skip = f" ON CONFLICT ({quote(unique)}) DO NOTHING" if unique else ""
    return (f"INSERT INTO {quote(model._meta.db_table)} ({names}) VALUES "
            f"{', '.join([placeholder] * rows)}{skip} RETURNING {quote(model._meta.pk.column)}")


_VARCHAR_LENGTH = re.compile(r"^varchar\(\d+\)$")


@cache
def select_items(model: type[models.Model], expressions: tuple[tuple[str, str], ...] = ()
                 ) -> tuple[str, str]:
    """For ``INSERT INTO <table> (<columns>) SELECT <items> FROM ...`` on PostgreSQL: the
    quoted column list and one item per column, a parameter cast to the column's type, or the
    SQL expression given for its attname (which takes the row's value if it holds a ``%s``).
    :func:`select_params` gives the matching parameters."""
    quote = connection.ops.quote_name
    given = dict(expressions)
    # varchar(n) without its length: a cast to it would cut a longer value short silently,
    # where storing into the column refuses it.
    items = [given.get(attname, f"%s::{_VARCHAR_LENGTH.sub('varchar', field.db_type(connection))}")
             for attname, _column, field in _columns(model)]
    return ", ".join(quote(c) for _, c, _ in _columns(model)), ", ".join(items)


def select_params(model: type[models.Model], row: dict,
                  expressions: tuple[tuple[str, str], ...] = ()) -> list:
    """The parameters of :func:`select_items` for ``row`` (read as :func:`insert` reads it)."""
    given = dict(expressions)
    return [value for (attname, _c, _f), value in zip(_columns(model), _params(model, [row]),
                                                      strict=True)
            if "%s" in given.get(attname, "%s")]


def insert(model: type[models.Model], rows: list[dict]) -> list[int]:
    """Insert ``rows`` (attname → value; missing values take the field's default) and return
    their primary keys in order."""
    if not rows:
        return []
    vendor = connection.vendor
    if len(rows) > 1 and vendor != "postgresql":
        # SQLite returns RETURNING rows of a multi-row insert in no promised order.
        return [insert(model, [row])[0] for row in rows]
    with cursor() as cur:
        cur.execute(_insert_sql(model, len(rows), vendor), _params(model, rows))
        return [row[0] for row in cur.fetchall()]


def insert_new(model: type[models.Model], row: dict, unique: str) -> int | None:
    """Insert one row (as :func:`insert`) unless a row with the same value in the
    ``unique`` column exists already; return its primary key, or None when nothing was
    inserted. No savepoint: the transaction stays usable either way."""
    with cursor() as cur:
        cur.execute(_insert_sql(model, 1, connection.vendor, unique), _params(model, [row]))
        found = cur.fetchone()
    return found[0] if found else None


def _params(model: type[models.Model], rows: list[dict]) -> list:
    adapt = connection.ops.adapt_datetimefield_value  # SQLite stores naive UTC text
    now = adapt(timezone.now())
    params: list = []
    for row in rows:
        for attname, field, kind in _kinds(model):
            if kind == "now":
                params.append(now)
                continue
            value = row[attname] if attname in row else field.get_default()
            if kind == "json":
                value = json.dumps(value)
            elif kind == "datetime" and value is not None:
                value = adapt(value)
            params.append(value)
    return params


def locked_ids(model: type[models.Model], equal: dict[str, str],
               any_of: dict[str, set[str]]) -> list[int]:
    """Primary keys of rows where every ``equal`` column matches and any ``any_of`` column
    is in its set, locked FOR UPDATE (on PostgreSQL) until the transaction ends."""
    quote = connection.ops.quote_name
    where = [f"{quote(column)} = %s" for column in equal]
    params: list = list(equal.values())
    alternatives = []
    for column, values in any_of.items():
        if values:
            alternatives.append(f"{quote(column)} IN ({', '.join(['%s'] * len(values))})")
            params.extend(sorted(values))
    if not alternatives:
        return []
    where.append("(" + " OR ".join(alternatives) + ")")
    lock = " FOR UPDATE" if connection.vendor == "postgresql" else ""
    sql = (f"SELECT {quote(model._meta.pk.column)} FROM {quote(model._meta.db_table)} "
           f"WHERE {' AND '.join(where)} ORDER BY 1{lock}")
    with cursor() as cur:
        cur.execute(sql, params)
        return [row[0] for row in cur.fetchall()]

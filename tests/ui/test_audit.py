"""The audit trail: chained hashes, append-only on PostgreSQL, the page, CSV export and
`manage.py verify_audit`."""

from __future__ import annotations

import csv
import io
import threading
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from gateway import audit
from gateway.models import AuditEvent
from tests.fixtures_storage import make_node

pytestmark = pytest.mark.django_db


def _events(n: int, action: str = "test.thing") -> None:
    for i in range(n):
        audit.record(action, None, {"i": i, "text": "Müller^Jürgen"}, actor="system")


def _verify_output() -> str:
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    return out.getvalue()


def test_each_event_hash_follows_from_the_one_before():
    _events(3)
    first, second, third = AuditEvent.objects.order_by("id")
    assert first.hash == audit.chain_hash(audit.GENESIS, first.__dict__)
    assert third.hash == audit.chain_hash(second.hash, third.__dict__)
    output = _verify_output()
    assert "intact: 3 events" in output
    assert f"Last event {third.id} " in output and third.hash in output


def test_postgresql_refuses_to_update_or_delete_an_event():
    _events(1)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.update(actor="someone else")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get().actor == "system"


def _bypassing_the_trigger(sql: str, params=()) -> None:
    """What a database owner could still do by hand; the chain is what catches it."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE gateway_auditevent DISABLE TRIGGER "
                       "gateway_auditevent_append_only")
        cursor.execute(sql, params)
        cursor.execute("ALTER TABLE gateway_auditevent ENABLE TRIGGER "
                       "gateway_auditevent_append_only")


def test_verify_audit_reports_the_first_changed_event():
    _events(5)
    ids = list(AuditEvent.objects.order_by("id").values_list("id", flat=True))
    _bypassing_the_trigger("UPDATE gateway_auditevent SET actor = 'user:mallory' WHERE id = %s",
                           [ids[2]])
    with pytest.raises(CommandError) as failure:
        call_command("verify_audit")
    assert f"broken at event {ids[2]}" in str(failure.value)
    assert f"does not follow from event {ids[1]}" in str(failure.value)
    assert "2 events before it are intact" in str(failure.value)


def test_verify_audit_reports_a_removed_event_at_the_one_after_it():
    _events(4)
    ids = list(AuditEvent.objects.order_by("id").values_list("id", flat=True))
    _bypassing_the_trigger("DELETE FROM gateway_auditevent WHERE id = %s", [ids[1]])
    with pytest.raises(CommandError, match=f"broken at event {ids[2]} "):
        call_command("verify_audit")


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_keep_one_unbroken_chain():
    errors = []

    def writer(n):
        try:
            for i in range(15):
                with transaction.atomic():
                    audit.record("test.concurrent", None, {"writer": n, "i": i}, actor="system")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert audit.verify() == (60, None)


def test_the_page_lists_events_newest_first_for_every_role(client_as):
    _events(2, "routing.node.updated")
    audit.record("routing.rule.moved", None, {}, actor="user:ada")
    for role in ("admin", "operator", "auditor"):
        page = client_as(role).get(reverse("audit-list"))
        assert page.status_code == 200
        ids = [e.id for e in page.context["pager"].items]
        assert ids == sorted(ids, reverse=True)
        text = page.content.decode().split("<tbody>")[1]
        assert text.index("routing.rule.moved") < text.index("routing.node.updated")


def test_filters_narrow_the_list(client_as):
    audit.record("routing.rule.updated", None, {}, actor="user:ada")
    audit.record("routing.node.created", None, {}, actor="user:otto")
    audit.record("hl7.message.received", None, {}, actor="hl7:RIS")
    client = client_as("auditor")

    def actions(**params):
        page = client.get(reverse("audit-list"), params)
        return sorted(e.action for e in page.context["pager"].items)

    assert actions(action="routing") == ["routing.node.created", "routing.rule.updated"]
    assert actions(action="routing.rule.updated") == ["routing.rule.updated"]
    assert actions(actor="hl7") == ["hl7.message.received"]
    assert actions(actor="user:otto") == ["routing.node.created"]
    assert actions(q="node") == ["routing.node.created"]
    tomorrow = (timezone.localdate() + timedelta(days=1)).isoformat()
    assert actions(since=tomorrow) == []
    page = client.get(reverse("audit-list"), {"since": "last tuesday"})
    assert "Use a date" in page.content.decode()


def test_the_list_pages_with_a_constant_number_of_queries(client_as,
                                                          django_assert_max_num_queries):
    client = client_as("auditor")
    client.get(reverse("dashboard"))  # the session notes its first activity once
    _events(1)
    with django_assert_max_num_queries(6):
        client.get(reverse("audit-list"))
    _events(80)
    with django_assert_max_num_queries(6):
        page = client.get(reverse("audit-list"))
    assert len(page.context["pager"].items) == 50 and page.context["pager"].has_next
    second = client.get(reverse("audit-list"), {"page": 2})
    assert 'rel="prev"' in second.content.decode()


def test_a_configuration_change_shows_before_and_after(client_as):
    node = make_node("pacs1")
    audit.record_change("routing.node.updated", node, {"port": 104, "host": "a"},
                        {"port": 4242, "host": "a"})
    event = AuditEvent.objects.get(action="routing.node.updated")
    assert event.detail["before"] == {"port": 104} and event.detail["after"] == {"port": 4242}
    page = client_as("auditor").get(reverse("audit-detail", args=[event.pk])).content.decode()
    assert "<td>port</td>" in page and "104" in page and "4242" in page
    assert "intact" in page


def test_csv_export_holds_the_filtered_events_and_is_itself_audited(client_as):
    audit.record("routing.rule.updated", None, {"x": 1}, actor="user:ada")
    audit.record("hl7.message.received", None, {}, actor="hl7:RIS")
    response = client_as("auditor").get(reverse("audit-export"), {"action": "routing"})
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:4] == ["id", "at", "actor", "action"]
    assert [r[3] for r in rows[1:]] == ["routing.rule.updated"]
    assert rows[1][7] == '{"x": 1}'
    exported = AuditEvent.objects.get(action="audit.exported")
    assert exported.actor == "user:audrey" and exported.detail["filters"] == {"action": "routing"}


def test_csv_cells_a_spreadsheet_would_run_are_exported_as_text(client_as):
    audit.record("hl7.message.received", None, {}, actor="hl7:=HYPERLINK(\"http://x\")")
    audit.record("test.formula", None, {}, actor="=1+1")
    response = client_as("auditor").get(reverse("audit-export"), {"action": "test.formula"})
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[1][2] == "'=1+1"


@pytest.mark.parametrize("page", ["999999999999999999999", "abc", "-4"])
def test_any_page_number_gives_a_page(client_as, page):
    _events(3)
    response = client_as("auditor").get(reverse("audit-list"), {"page": page})
    assert response.status_code == 200
    if page.startswith("9"):
        assert "Pages stop at 2000" in response.content.decode()

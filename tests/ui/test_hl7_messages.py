"""The HL7 message pages: the list with its filters, one message with its segments, fields and
ACK, and reprocessing a refused message."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from gateway.models import AuditEvent
from tests.fixtures_hl7 import message, msh, obr, orc, orm, pid, pv1, seg
from worklist.hl7 import service
from worklist.hl7.service import clear_caches, handle_oversize
from worklist.models import (
    HL7Message,
    ImagingOrder,
    MessageStatus,
    OrderStatusMapping,
    ScheduledStep,
    StepStatus,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("status_mappings")]

LIST = reverse("hl7-list")


def detail(pk: int) -> str:
    return reverse("hl7-detail", args=[pk])


def reprocess(pk: int) -> str:
    return reverse("hl7-reprocess", args=[pk])


def control_ids(response) -> list[str]:
    return [m.control_id for m in response.context["pager"].items]


def adt(control_id: str, app: str = "RIS", facility: str = "RADIOLOGY") -> bytes:
    return message(msh("ADT^A08", control_id, app=app, facility=facility), pid(), pv1())


def unmapped_order(control_id: str = "MSG-103") -> bytes:
    """An ORM whose ORC-1/ORC-5 pair (NW / ZZ) the status table does not have: AE 103."""
    return orm(control_id, status="ZZ", accession="ACC-103")


def filter_errors(page: str, field: str) -> str:
    """The error text shown beside the filter ``field``, in its own box of the filter row."""
    box = re.search(rf'<label for="id_{field}">.*?</div>', page, re.DOTALL)
    errors = re.search(r'class="field-errors">(.*?)</span>', box.group(0)) if box else None
    assert errors, f"no error beside the {field} filter"
    return errors.group(1).strip()


# --- the list -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_the_messages(client_as, hl7, role):
    hl7(orm("MSG-1"))
    hl7(unmapped_order())

    page = client_as(role).get(LIST).content.decode()

    for text in ("ORM^O01", "MSG-1", "MSG-103", "RIS", "RADIOLOGY", "127.0.0.1:5000", "PAT001",
                 "badge ACCEPTED", "badge ERROR", "103", "has no step status"):
        assert text in page
    assert page.index("MSG-103") < page.index("MSG-1<")  # newest first


@pytest.fixture
def mixed(hl7):
    """Messages that differ in type, status, sender, control id and patient."""
    assert hl7(orm("O-1")).code == "AA"
    assert hl7(unmapped_order("O-ERR")).code == "AE"
    assert hl7(adt("A-1", app="HIS", facility="WARD")).code == "AA"
    assert hl7(message(msh("ORU^R01", "R-1"), pid())).code == "AR"
    assert hl7(orm("O-1")).code == "AA"  # a resend: duplicate
    assert hl7(message(msh("ORM^O01", "O-P2"), pid("PAT002"), pv1(),
                       orc(placer="P2", filler="F2"), obr(placer="P2", filler="F2",
                                                          accession="A2"))).code == "AA"


@pytest.mark.parametrize("query,expected", [
    ("", ["O-P2", "O-1", "R-1", "A-1", "O-ERR", "O-1"]),
    ("?type=ORM%5EO01", ["O-P2", "O-1", "O-ERR", "O-1"]),
    ("?type=ORM", ["O-P2", "O-1", "O-ERR", "O-1"]),
    ("?type=orm+o01", ["O-P2", "O-1", "O-ERR", "O-1"]),
    ("?type=ADT", ["A-1"]),
    ("?type=OR", []),  # a type is matched whole
    ("?status=refused", ["R-1", "O-ERR"]),
    ("?status=ERROR", ["O-ERR"]),
    ("?status=REJECTED", ["R-1"]),
    ("?status=DUPLICATE", ["O-1"]),
    ("?status=ACCEPTED", ["O-P2", "A-1", "O-1"]),
    ("?sender=HIS", ["A-1"]),
    ("?sender=HIS%5EWARD", ["A-1"]),
    ("?sender=HIS%5ERADIOLOGY", []),
    ("?control_id=O-1", ["O-1", "O-1"]),
    ("?patient=PAT002", ["O-P2"]),
    ("?status=refused&type=ORM", ["O-ERR"]),
])
def test_each_filter_narrows_the_list(client_as, mixed, query, expected):
    response = client_as("auditor").get(LIST + query)
    assert response.status_code == 200
    assert control_ids(response) == expected


def test_since_and_until_filter_on_the_time_received(client_as, hl7):
    for control_id, day in (("D15", 15), ("D16", 16), ("D17", 17)):
        hl7(orm(control_id, placer=control_id, filler=control_id))
        HL7Message.objects.filter(control_id=control_id).update(
            received_at=datetime(2026, 3, day, 12, 0, tzinfo=UTC))
    client = client_as("auditor")

    assert control_ids(client.get(LIST + "?since=2026-03-16")) == ["D17", "D16"]
    assert control_ids(client.get(LIST + "?until=2026-03-16")) == ["D16", "D15"]
    assert control_ids(client.get(LIST + "?since=2026-03-16&until=2026-03-16")) == ["D16"]
    assert control_ids(client.get(LIST + "?since=2026-03-16T12:30:00%2B00:00")) == ["D17"]
    bad = client.get(LIST + "?since=yesterday")
    assert control_ids(bad) == []
    assert "Use a date (2026-11-27)" in bad.content.decode()


def test_an_offset_postgresql_does_not_take_is_read_in_utc(client_as, hl7):
    # Python reads offsets up to ±23:59; PostgreSQL refuses those beyond ±15:59.
    for control_id, day in (("D15", 15), ("D16", 16)):
        hl7(orm(control_id, placer=control_id, filler=control_id))
        HL7Message.objects.filter(control_id=control_id).update(
            received_at=datetime(2026, 3, day, 12, 0, tzinfo=UTC))

    response = client_as("auditor").get(LIST + "?since=2026-03-16T23:00%2B23:00")

    assert response.status_code == 200
    assert control_ids(response) == ["D16"]  # since 2026-03-16 00:00 UTC


@pytest.mark.parametrize("field,value", [("since", "0001-01-01T00:00%2B14:00"),
                                         ("until", "9999-12-31T23:00-14:00")])
def test_a_time_past_either_end_of_the_calendar_is_shown_next_to_its_field(client_as, hl7,
                                                                            field, value):
    hl7(orm("MSG-1"))

    response = client_as("auditor").get(LIST + f"?{field}={value}")

    assert response.status_code == 200
    assert filter_errors(response.content.decode(), field) == (
        "Use a date between the years 1 and 9999.")
    assert control_ids(response) == []


def test_the_list_pages(client_as, hl7):
    HL7Message.objects.bulk_create(
        HL7Message(control_id=f"BULK{i:03d}", message_type="ORM^O01", raw=b"MSH|",
                   status=MessageStatus.ERROR) for i in range(51))
    client = client_as("auditor")

    first = client.get(LIST + "?status=refused")
    assert control_ids(first)[0] == "BULK050" and len(control_ids(first)) == 50
    assert 'href="?status=refused&amp;page=2"' in first.content.decode()
    assert control_ids(client.get(LIST + "?status=refused&page=2")) == ["BULK000"]


def test_the_number_of_queries_does_not_grow_with_the_rows(client_as, hl7,
                                                           django_assert_max_num_queries):
    client = client_as("operator")
    hl7(orm("FIRST"))
    client.get(LIST)
    with CaptureQueriesContext(connection) as one_row:
        client.get(LIST)
    for n in range(29):
        hl7(unmapped_order(f"MORE{n}"))
    with django_assert_max_num_queries(len(one_row)):
        response = client.get(LIST)
    assert len(control_ids(response)) == 30


# --- one message ----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_a_message_with_its_ack(client_as, hl7, role):
    hl7(orm("MSG-V"))
    record = HL7Message.objects.get()

    response = client_as(role).get(detail(record.pk))

    page = response.content.decode()
    assert response.status_code == 200
    for text in ("HL7 message", "MSG-V", "RIS", "RADIOLOGY", "GATEWAY", "127.0.0.1:5000",
                 "PAT001", "ORM^O01", "Segments and fields", "Raw message", "ACK sent"):
        assert text in page
    # the ACK as segments: MSA-1 with its name, and MSA-2 the message's control id
    assert "MSA-1" in page and "Acknowledgment Code" in page
    assert response.context["ack_code"] == "AA"
    # raw segments one per line
    assert "\nPID|1||PAT001^^^HOSP^MR||Doe^John" in page
    assert "Reprocess" not in page  # accepted: nothing to reprocess


def field_of(response, segment: str, label: str):
    for seg_view in response.context["segments"]:
        if seg_view.name == segment:
            for field in seg_view.fields:
                if field.label == label:
                    return field
    raise AssertionError(f"no {label}")


def test_the_viewer_decodes_escapes_and_the_character_set_and_names_fields(client_as, hl7):
    name = "M\xfcller\\T\\Sohn^J\\S\\rgen\\XE9\\"  # ü in ISO 8859-1, \T\ = &, \S\ = ^, é
    raw = message(msh(charset="8859/1", version="2.5"), pid(name=name), pv1(), orc(),
                  obr()).decode("utf-8").encode("latin-1")
    hl7(raw)
    record = HL7Message.objects.get()

    response = client_as("auditor").get(detail(record.pk))

    pid5 = field_of(response, "PID", "PID-5")
    assert pid5.name == "Patient Name"
    family, given = pid5.repetitions[0]
    assert (family.label, family.name, family.value) == ("PID-5.1", "Family Name",
                                                         "Müller&Sohn")
    assert (given.label, given.name, given.value) == ("PID-5.2", "Given Name", "J^rgené")
    page = response.content.decode()
    assert "PID-5" in page and "Patient Name" in page and "Müller&amp;Sohn" in page
    assert "J^rgené" in page
    assert field_of(response, "MSH", "MSH-9").name == "Message Type"
    assert field_of(response, "MSH", "MSH-18").value == "8859/1"
    assert response.context["codec"] == "latin-1"
    # the raw message keeps the escapes
    assert "M\xfcller\\T\\Sohn^J\\S\\rgen\\XE9\\" in page


def test_a_z_segment_shows_numbered_fields_without_names(client_as, hl7):
    hl7(message(msh(), pid(), pv1(), orc(), obr(), seg("ZDS", {1: "1.2.3.4^100^Application^DICOM"}),
                seg("ZXX", {2: "local"})))
    record = HL7Message.objects.get()

    response = client_as("auditor").get(detail(record.pk))

    zxx = field_of(response, "ZXX", "ZXX-2")
    assert (zxx.name, zxx.value) == ("", "local")
    zds = field_of(response, "ZDS", "ZDS-1")
    assert [p.value for p in zds.repetitions[0]] == ["1.2.3.4", "100", "Application", "DICOM"]


def test_a_message_without_msh_shows_its_raw_text(client_as, hl7):
    hl7(b"HELLO WORLD")
    record = HL7Message.objects.get()

    response = client_as("operator").get(detail(record.pk))

    assert response.status_code == 200
    assert response.context["segments"] == []
    assert "HELLO WORLD" in response.content.decode()
    assert "Reprocess</button>" in response.content.decode()


def test_the_message_links_the_orders_it_created_and_its_audit_events(client_as, hl7):
    hl7(orm("MSG-O", accession="ACC-O"))
    record = HL7Message.objects.get()
    step = ScheduledStep.objects.get()

    page = client_as("auditor").get(detail(record.pk)).content.decode()

    assert "ACC-O" in page
    assert reverse("worklist-detail", args=[step.pk]) in page
    assert "hl7.message.received" in page and "hl7.order.created" in page
    assert f"/audit/?object_type=worklist.HL7Message&amp;object_id={record.pk}" in page


def test_an_unknown_message_is_not_found(client_as):
    assert client_as("auditor").get(detail(999999)).status_code == 404


# --- reprocessing ---------------------------------------------------------------------------


def test_a_refused_message_reprocessed_after_the_fix_creates_the_order(client_as, hl7):
    ack = hl7(unmapped_order())
    assert (ack.code, ack.error_code) == ("AE", "103")
    original = HL7Message.objects.get()
    assert not ImagingOrder.objects.exists()
    OrderStatusMapping.objects.create(order_control="NW", order_status="ZZ",
                                      step_status=StepStatus.SCHEDULED)

    response = client_as("operator").post(reprocess(original.pk), follow=True)

    attempt = HL7Message.objects.exclude(pk=original.pk).get()
    assert response.redirect_chain == [(detail(attempt.pk), 302)]
    page = response.content.decode()
    assert f"Message {original.pk} reprocessed as message {attempt.pk}: AA, accepted." in page
    assert f"Reprocess of <a href=\"{detail(original.pk)}\">#{original.pk}</a>" in page
    assert attempt.status == MessageStatus.ACCEPTED
    assert attempt.reprocessed_from_id == original.pk
    assert (attempt.raw, attempt.peer) == (original.raw, original.peer)
    order = ImagingOrder.objects.get()
    assert order.accession_number == "ACC-103" and order.last_message_id == attempt.pk
    assert ScheduledStep.objects.get().status == StepStatus.SCHEDULED
    original.refresh_from_db()
    assert original.status == MessageStatus.ERROR  # the record of what happened stays
    event = AuditEvent.objects.get(action="hl7.message.reprocessed")
    assert event.actor == "user:otto"
    assert (event.object_type, event.object_id) == ("worklist.HL7Message", str(original.pk))
    assert event.detail == {"original": original.pk, "new": attempt.pk, "status": "ACCEPTED",
                            "error_code": ""}
    received = AuditEvent.objects.get(action="hl7.message.received",
                                      object_id=str(attempt.pk))
    assert received.actor == "user:otto"
    assert AuditEvent.objects.get(action="hl7.order.created").actor == "user:otto"
    original_page = client_as("auditor").get(detail(original.pk)).content.decode()
    assert f"Reprocessed as <a href=\"{detail(attempt.pk)}\">#{attempt.pk}</a>" in original_page


def test_the_listener_path_still_names_the_sender(hl7):
    hl7(orm("MSG-S"))
    assert set(AuditEvent.objects.values_list("actor", flat=True)) == {"hl7:RIS"}
    assert HL7Message.objects.get().reprocessed_from is None


def test_reprocessing_without_the_fix_stores_another_error(client_as, hl7):
    hl7(unmapped_order())
    original = HL7Message.objects.get()

    response = client_as("admin").post(reprocess(original.pk), follow=True)

    attempt = HL7Message.objects.exclude(pk=original.pk).get()
    assert attempt.status == MessageStatus.ERROR and attempt.error_code == "103"
    page = response.content.decode()
    assert f"reprocessed as message {attempt.pk}: AE, error 103: ORC-1" in page
    assert AuditEvent.objects.get(action="hl7.message.reprocessed").actor == "user:ada"
    assert not ImagingOrder.objects.exists()


def test_reprocessing_a_message_accepted_meanwhile_is_a_duplicate_without_effect(client_as,
                                                                                 hl7):
    hl7(unmapped_order("MSG-D"))
    original = HL7Message.objects.get()
    # The RIS sends the same control id again after the fix, and it is accepted.
    OrderStatusMapping.objects.create(order_control="NW", order_status="ZZ",
                                      step_status=StepStatus.SCHEDULED)
    clear_caches()  # as a listener does within seconds
    assert hl7(unmapped_order("MSG-D")).code == "AA"

    response = client_as("operator").post(reprocess(original.pk), follow=True)

    attempt = HL7Message.objects.filter(reprocessed_from=original).get()
    assert attempt.status == MessageStatus.DUPLICATE
    assert "AA (duplicate)" in response.content.decode()
    assert "changed nothing" in response.content.decode()
    assert ImagingOrder.objects.count() == 1


@pytest.mark.parametrize("status", ["ACCEPTED", "DUPLICATE"])
def test_a_message_that_was_not_refused_cannot_be_reprocessed(client_as, hl7, status):
    hl7(orm("MSG-A"))
    hl7(orm("MSG-A"))
    original = HL7Message.objects.get(status=status)

    response = client_as("operator").post(reprocess(original.pk), follow=True)

    assert response.redirect_chain == [(detail(original.pk), 302)]
    assert "Only a refused message (error or rejected) can be reprocessed" in (
        response.content.decode())
    assert HL7Message.objects.count() == 2
    assert not AuditEvent.objects.filter(action="hl7.message.reprocessed").exists()


def test_a_message_cut_at_the_size_limit_cannot_be_reprocessed(client_as):
    handle_oversize(orm("BIG"), "127.0.0.1:5000", 100)
    original = HL7Message.objects.get()

    response = client_as("operator").post(reprocess(original.pk), follow=True)

    assert "only its beginning is stored" in response.content.decode()
    assert HL7Message.objects.count() == 1
    assert not ImagingOrder.objects.exists()


def test_a_reprocess_whose_attempt_cannot_be_stored_says_so_and_changes_nothing(
        client_as, hl7, monkeypatch):
    hl7(unmapped_order())
    original = HL7Message.objects.get()

    def database_full(**fields):
        raise DatabaseError("could not extend file: No space left on device")

    # The attempt is refused again (no mapping) and storing it fails: the service has no
    # attempt to return.
    monkeypatch.setattr(HL7Message.objects, "create", database_full)
    response = client_as("operator").post(reprocess(original.pk), follow=True)

    assert response.redirect_chain == [(detail(original.pk), 302)]
    assert (f"Message {original.pk} could not be reprocessed: the new attempt could not be "
            "stored") in response.content.decode()
    assert HL7Message.objects.count() == 1
    assert not AuditEvent.objects.filter(action="hl7.message.reprocessed").exists()


def test_reprocessing_a_message_deleted_meanwhile_says_so(client_as, hl7, monkeypatch):
    hl7(unmapped_order())
    original = HL7Message.objects.get()

    def deleted_meanwhile(message_id, actor=None):
        raise HL7Message.DoesNotExist

    monkeypatch.setattr(service, "reprocess", deleted_meanwhile)
    response = client_as("operator").post(reprocess(original.pk), follow=True)

    assert response.redirect_chain == [(LIST, 302)]
    assert f"Message {original.pk} no longer exists" in response.content.decode()


def test_an_auditor_cannot_reprocess(client_as, hl7):
    hl7(unmapped_order())
    original = HL7Message.objects.get()

    response = client_as("auditor").post(reprocess(original.pk))

    assert response.status_code == 403
    assert HL7Message.objects.count() == 1
    for role, shown in (("auditor", False), ("operator", True), ("admin", True)):
        page = client_as(role).get(detail(original.pk)).content.decode()
        assert ("Reprocess</button>" in page) is shown


def test_reprocessing_needs_a_post(client_as, hl7):
    hl7(unmapped_order())
    original = HL7Message.objects.get()
    assert client_as("operator").get(reprocess(original.pk)).status_code == 405
    assert HL7Message.objects.count() == 1

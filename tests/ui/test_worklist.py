"""The worklist pages: the list with its filters, one step with what a modality receives, and
cancelling or completing a step by hand."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from pydicom.dataset import Dataset

from gateway.models import AuditEvent
from tests.factories import DAY, at, bulk_steps, make_item, make_step
from tests.fixtures_hl7 import orm
from worklist.models import OrderStatus, ScheduledStep, StepStatus
from worklist.mwl import find_worklist

pytestmark = pytest.mark.django_db

LIST = reverse("worklist-list")


def detail(step) -> str:
    return reverse("worklist-detail", args=[step.pk])


def set_status(step) -> str:
    return reverse("worklist-set-status", args=[step.pk])


def accessions(response) -> list[str]:
    """The accession numbers in the list, in page order."""
    return [step.order.accession_number for step in response.context["pager"].items]


def worklist_accessions(**keys) -> list[str]:
    """What a modality's C-FIND (through the real MWL code) returns, as accession numbers."""
    query = Dataset()
    query.AccessionNumber = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return [str(answer.AccessionNumber) for answer in find_worklist(query)]


def filter_errors(page: str, field: str) -> str:
    """The error text shown beside the filter ``field``, in its own box of the filter row."""
    box = re.search(rf'<label for="id_{field}">.*?</div>', page, re.DOTALL)
    errors = re.search(r'class="field-errors">(.*?)</span>', box.group(0)) if box else None
    assert errors, f"no error beside the {field} filter"
    return errors.group(1).strip()


# --- the list -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_the_worklist(client_as, role):
    make_item(patient={"name": "SMITH^ANNA", "patient_id": "P42"},
              order={"accession_number": "A42", "requested_procedure_description": "MR KNEE"},
              description="MR KNEE LEFT", station_ae_title="MR7", modality="MR")

    page = client_as(role).get(LIST).content.decode()

    for text in ("SMITH^ANNA", "P42", "A42", "MR KNEE", "MR KNEE LEFT", "MR7",
                 "2026-03-16 09:00", "badge SCHEDULED", "ROUTINE"):
        assert text in page


def test_by_default_it_lists_open_steps_by_scheduled_start(client_as):
    make_item(order={"accession_number": "LATE"}, start=at("1100"))
    make_item(order={"accession_number": "EARLY"}, start=at("0800"),
              status=StepStatus.ARRIVED)
    make_item(order={"accession_number": "READY"}, start=at("0900"), status=StepStatus.READY)
    make_item(order={"accession_number": "UNSCHEDULED"}, start=None)
    make_item(order={"accession_number": "DONE"}, start=at("0700"),
              status=StepStatus.COMPLETED)
    make_item(order={"accession_number": "BUSY"}, start=at("0700"), status=StepStatus.STARTED)

    response = client_as("auditor").get(LIST)

    assert accessions(response) == ["EARLY", "READY", "LATE", "UNSCHEDULED"]
    assert '<option value="open" selected>' in response.content.decode()


@pytest.fixture
def two_items():
    """Two worklist items that differ in every filtered value."""
    make_item(patient={"patient_id": "PX1", "name": "Doe^Jane"},
              order={"accession_number": "ACC-A"},
              modality="CT", station_ae_title="CT1", start=at("0900"))
    make_item(patient={"patient_id": "PX2", "name": "Roe^Richard"},
              order={"accession_number": "ACC-B"},
              modality="MR", station_ae_title="MR1", start=at("0900", DAY + timedelta(days=2)),
              status=StepStatus.READY)


@pytest.mark.parametrize("query,expected", [
    ("", ["ACC-A", "ACC-B"]),
    ("?modality=mr", ["ACC-B"]),
    ("?station=CT1", ["ACC-A"]),
    ("?patient=PX2", ["ACC-B"]),
    ("?patient=doe", ["ACC-A"]),  # a name prefix, case-insensitive
    ("?patient=ROE%5ERICH", ["ACC-B"]),
    ("?patient=PX", []),  # an ID matches whole, not as a prefix
    ("?accession=ACC-A", ["ACC-A"]),
    ("?date_from=2026-03-17", ["ACC-B"]),
    ("?date_to=2026-03-16", ["ACC-A"]),
    ("?date_from=2026-03-16&date_to=2026-03-16", ["ACC-A"]),
    ("?status=READY", ["ACC-B"]),
    ("?status=SCHEDULED", ["ACC-A"]),
    ("?status=COMPLETED", []),
    ("?status=open&modality=CT&station=CT1&accession=ACC-A&patient=PX1", ["ACC-A"]),
])
def test_each_filter_narrows_the_list(client_as, two_items, query, expected):
    response = client_as("operator").get(LIST + query)
    assert response.status_code == 200
    assert accessions(response) == expected


def test_status_any_includes_ended_steps_and_open_excludes_them(client_as):
    make_item(order={"accession_number": "OPEN"}, start=at("0900"))
    make_item(order={"accession_number": "GONE"}, start=at("0800"),
              status=StepStatus.CANCELLED)
    client = client_as("auditor")

    assert accessions(client.get(LIST + "?status=all")) == ["GONE", "OPEN"]
    assert accessions(client.get(LIST + "?status=open")) == ["OPEN"]
    assert accessions(client.get(LIST + "?status=CANCELLED")) == ["GONE"]


def test_a_bad_filter_value_is_shown_next_to_its_field(client_as, two_items):
    response = client_as("auditor").get(LIST + "?date_from=16.03.2026&status=nonsense")
    page = response.content.decode()
    assert response.status_code == 200
    assert accessions(response) == []
    assert "Enter a valid date." in page
    assert "Select a valid choice." in page


def test_an_end_date_before_the_start_date_is_refused(client_as, two_items):
    response = client_as("auditor").get(LIST + "?date_from=2026-03-18&date_to=2026-03-16")
    assert "The end date is before the start date." in response.content.decode()
    assert accessions(response) == []


def test_an_end_date_the_calendar_cannot_go_past_is_shown_next_to_its_field(client_as,
                                                                           two_items):
    response = client_as("auditor").get(LIST + "?date_to=9999-12-31")

    assert response.status_code == 200
    assert filter_errors(response.content.decode(), "date_to") == "Enter a date up to 9999-12-30."
    assert accessions(response) == []


def test_dates_at_either_end_of_the_calendar_still_filter(client_as, two_items):
    response = client_as("auditor").get(LIST + "?date_from=0001-01-01&date_to=9999-12-30")

    assert accessions(response) == ["ACC-A", "ACC-B"]


def test_the_list_pages_and_keeps_the_filters(client_as):
    bulk_steps(51, start=at("0600"), modality="US")
    make_item(modality="CT")
    client = client_as("auditor")

    first = client.get(LIST + "?modality=US")
    assert len(first.context["pager"].items) == 50
    assert 'href="?modality=US&amp;page=2"' in first.content.decode()

    second = client.get(LIST + "?modality=US&page=2")
    assert len(second.context["pager"].items) == 1
    assert second.context["pager"].items[0].start == at("0600") + timedelta(minutes=50)
    assert "Next" not in second.content.decode().split('class="pager"')[1]


def count_queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_the_number_of_queries_does_not_grow_with_the_rows(client_as,
                                                           django_assert_max_num_queries):
    client = client_as("operator")
    make_item()
    client.get(LIST)  # the session is warm
    with_one = count_queries(client, LIST)
    bulk_steps(29)
    with django_assert_max_num_queries(with_one):
        response = client.get(LIST)
    assert len(response.context["pager"].items) == 30


# --- one step -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_a_step(client_as, role):
    step = make_item(patient={"name": "SMITH^ANNA", "patient_id": "P42", "issuer": "HOSP"},
                     order={"accession_number": "A42", "placer_order_number": "PL42"})

    response = client_as(role).get(detail(step))

    page = response.content.decode()
    assert response.status_code == 200
    for text in ("SMITH^ANNA", "P42", "A42", "PL42", step.sps_id, "What a modality receives"):
        assert text in page
    assert ("Cancel step" in page) is (role != "auditor")
    assert ("Mark completed" in page) is (role != "auditor")


def element_value(page: str, keyword: str) -> str:
    """The Value cell of the row for ``keyword`` in the page's DICOM table."""
    match = re.search(rf"<td>{keyword}</td><td class=\"mono\">\w\w</td><td class=\"mono\">"
                      r"(.*?)</td>", page)
    assert match, f"no row for {keyword}"
    return match.group(1)


def test_the_detail_shows_exactly_what_find_worklist_answers(client_as):
    step = make_item(
        patient={"name": "MÜLLER^JÜRGEN", "patient_id": "P-77", "birth_date": "19610203"},
        order={"accession_number": "A-77", "requested_procedure_description": "CT THORAX",
               "requested_procedure_codes": [{"value": "CTT", "scheme": "LOCAL",
                                              "meaning": "CT Thorax"}]},
        station_ae_title="CT9", sps_id="SPS-77", start=at("1415"))
    make_item()  # another item the query must not mix in
    query = Dataset()
    query.AccessionNumber = "A-77"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                    "RequestedProcedureDescription"):
        setattr(query, keyword, "")
    query.ScheduledProcedureStepSequence = [Dataset()]
    (answer,) = find_worklist(query)
    sps = answer.ScheduledProcedureStepSequence[0]

    response = client_as("auditor").get(detail(step))

    page = response.content.decode()
    assert element_value(page, "PatientName") == str(answer.PatientName) == "MÜLLER^JÜRGEN"
    assert element_value(page, "AccessionNumber") == answer.AccessionNumber
    for keyword in ("PatientID", "PatientBirthDate", "StudyInstanceUID",
                    "RequestedProcedureDescription"):
        assert element_value(page, keyword) == str(answer[keyword].value)
    for keyword in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID", "Modality",
                    "ScheduledProcedureStepStatus"):
        assert element_value(page, keyword) == str(sps[keyword].value)
    assert element_value(page, "ScheduledStationAETitle") == "CT9"
    assert element_value(page, "ScheduledProcedureStepStartTime") == "141500"
    assert element_value(page, "SpecificCharacterSet") == "ISO_IR 192"
    # Sequences are nested, with their items' attributes below them.
    assert element_value(page, "RequestedProcedureCodeSequence") == "1 item"
    assert element_value(page, "CodeMeaning") == "CT Thorax"
    # Keys the gateway has no value for come back empty, as in a C-FIND answer.
    assert element_value(page, "ReferencedStudySequence") == "0 items"
    assert "On the worklist: a modality's C-FIND returns this item." in page


def test_the_detail_links_the_hl7_messages_and_audit_events_of_the_order(client_as, hl7,
                                                                          status_mappings):
    assert hl7(orm("MSG-A", accession="ACC-H")).code == "AA"
    assert hl7(orm("MSG-B", control="XO", accession="ACC-H")).code == "AA"
    step = ScheduledStep.objects.get()

    page = client_as("auditor").get(detail(step)).content.decode()

    for message in step.order.last_message.__class__.objects.all():
        assert reverse("hl7-detail", args=[message.pk]) in page
        assert message.control_id in page
    assert "hl7.order.created" in page and "hl7.order.updated" in page
    assert (f"/audit/?object_type=worklist.ScheduledStep&amp;object_id={step.pk}") in page
    assert (f"/audit/?object_type=worklist.ImagingOrder&amp;object_id={step.order_id}") in page


def test_an_unknown_step_is_not_found(client_as):
    assert client_as("auditor").get(reverse("worklist-detail", args=[999999])).status_code == 404


# --- cancel and complete by hand ------------------------------------------------------------


@pytest.mark.parametrize("role,user", [("operator", "otto"), ("admin", "ada")])
def test_cancelling_a_step_takes_it_off_the_worklist_and_audits_it(client_as, role, user):
    step = make_item(order={"accession_number": "ACC-C"})
    make_item(order={"accession_number": "ACC-KEEP"})
    assert worklist_accessions() == ["ACC-C", "ACC-KEEP"]

    response = client_as(role).post(set_status(step), {"action": "cancel"}, follow=True)

    assert response.redirect_chain == [(detail(step), 302)]
    assert f"Step {step.sps_id} cancelled: modalities no longer receive it." in (
        response.content.decode())
    step.refresh_from_db()
    assert step.status == StepStatus.CANCELLED
    assert step.order.status == OrderStatus.CANCELLED
    assert worklist_accessions() == ["ACC-KEEP"]
    event = AuditEvent.objects.get(action="worklist.step.cancelled")
    assert event.actor == f"user:{user}"
    assert (event.object_type, event.object_id) == ("worklist.ScheduledStep", str(step.pk))
    assert event.detail["before"] == {"status": "SCHEDULED", "order_status": "OPEN"}
    assert event.detail["after"] == {"status": "CANCELLED", "order_status": "CANCELLED"}
    assert client_as(role).get(LIST).context["pager"].items[0].order.accession_number == (
        "ACC-KEEP")


def test_completing_a_step_by_hand(client_as):
    step = make_item(status=StepStatus.STARTED)

    response = client_as("operator").post(set_status(step), {"action": "complete"},
                                          follow=True)

    assert "marked completed" in response.content.decode()
    step.refresh_from_db()
    assert step.status == StepStatus.COMPLETED
    assert step.order.status == OrderStatus.COMPLETED
    event = AuditEvent.objects.get(action="worklist.step.completed")
    assert event.detail["before"]["status"] == "STARTED"
    assert event.detail["after"]["status"] == "COMPLETED"


def test_the_order_stays_open_while_another_step_is_open(client_as):
    first = make_step()
    second = make_step(first.order, start=at("1000"))

    client_as("operator").post(set_status(first), {"action": "cancel"})

    first.order.refresh_from_db()
    assert first.order.status == OrderStatus.OPEN
    assert ScheduledStep.objects.get(pk=second.pk).status == StepStatus.SCHEDULED
    event = AuditEvent.objects.get(action="worklist.step.cancelled")
    assert event.detail["after"] == {"status": "CANCELLED"}  # the order did not change


@pytest.mark.parametrize("ended", [StepStatus.COMPLETED, StepStatus.CANCELLED,
                                   StepStatus.DISCONTINUED])
def test_an_ended_step_cannot_be_cancelled_or_completed(client_as, ended):
    step = make_item(status=ended)

    for action in ("cancel", "complete"):
        response = client_as("operator").post(set_status(step), {"action": action},
                                              follow=True)
        assert "has already ended" in response.content.decode()
    step.refresh_from_db()
    assert step.status == ended
    assert not AuditEvent.objects.filter(action__startswith="worklist.step").exists()
    assert "Cancel step" not in client_as("operator").get(detail(step)).content.decode()


def test_an_auditor_cannot_cancel_a_step(client_as):
    step = make_item()

    response = client_as("auditor").post(set_status(step), {"action": "cancel"})

    assert response.status_code == 403
    assert "needs the Administrators or Operators role" in response.content.decode()
    step.refresh_from_db()
    assert step.status == StepStatus.SCHEDULED
    assert worklist_accessions() == [step.order.accession_number]


def test_an_auditor_cannot_complete_a_step(client_as):
    step = make_item()
    assert client_as("auditor").post(set_status(step), {"action": "complete"}).status_code == 403
    step.refresh_from_db()
    assert step.status == StepStatus.SCHEDULED


def test_changing_a_step_needs_a_post(client_as):
    step = make_item()
    assert client_as("operator").get(set_status(step) + "?action=cancel").status_code == 405
    step.refresh_from_db()
    assert step.status == StepStatus.SCHEDULED


def test_an_unknown_action_changes_nothing(client_as):
    step = make_item()
    response = client_as("operator").post(set_status(step), {"action": "delete"}, follow=True)
    assert "Choose Cancel step or Mark completed." in response.content.decode()
    step.refresh_from_db()
    assert step.status == StepStatus.SCHEDULED

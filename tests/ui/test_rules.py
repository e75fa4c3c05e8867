"""The Rules pages: the ordered list, moving and switching rules, the editor with its
condition and coercion rows (checked like an import), and Test on recent instances and on an
uploaded DICOM file."""

from __future__ import annotations

import html
import io
import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from pydicom.data import get_testdata_file

from gateway.models import AuditEvent
from routing.models import Rule
from routing.routing import enabled_rules
from routing.rules import ORDER_MAX, Facts, matching_rules
from routing.views import rules as rule_views
from tests.fixtures_storage import make_node, make_rule, received_instance

pytestmark = pytest.mark.django_db

CT = {"attribute": "Modality", "op": "equals", "value": "CT"}
GENERAL = {"attribute": "InstitutionName", "action": "set", "value": "General"}


def rule_form(name: str = "CT to pacs1", conditions=(), coerce=(), destinations=(),
              initial: tuple[int, int] = (0, 0), **fields) -> dict:
    """The POST a browser sends from the editor: the rule's fields (False leaves a checkbox
    unticked), its destination names, and its rows with the formsets' management forms."""
    data = {"name": name, "order": "10", "enabled": "on", "match": "all", "mode": "instance",
            "study_quiet_seconds": "60", **fields}
    data = {key: value for key, value in data.items() if value is not False}
    data["destinations"] = list(destinations)
    for prefix, rows, count in (("conditions", conditions, initial[0]),
                                ("coerce", coerce, initial[1])):
        data.update({f"{prefix}-TOTAL_FORMS": str(len(rows)),
                     f"{prefix}-INITIAL_FORMS": str(count),
                     f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"})
        for i, row in enumerate(rows):
            data.update({f"{prefix}-{i}-{key}": value for key, value in row.items()})
    return data


def row_errors(page: str, prefix: str, index: int) -> str:
    """The text shown in the editor row that holds ``<prefix>-<index>-...`` fields."""
    for row in re.findall(r"<tr>.*?</tr>", page, re.DOTALL):
        if f'name="{prefix}-{index}-attribute"' in row:
            errors = re.findall(r'<div class="field-errors"[^>]*>(.*?)</div>', row, re.DOTALL)
            return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", e) for e in errors)).strip()
    raise AssertionError(f"no row {prefix}-{index}")


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def exported_rules() -> list[dict]:
    out = io.StringIO()
    call_command("export_config", stdout=out)
    return json.loads(out.getvalue())["rules"]


# --- The list ------------------------------------------------------------------------------


def test_the_list_shows_rules_in_order_with_readable_conditions(client_as):
    pacs1 = make_node("pacs1")
    make_rule("everything", [], [pacs1], order=90, mode="study", study_quiet_seconds=120)
    make_rule("CT from CT1", [CT, {"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2"]}],
              [pacs1], order=10, stop=True, coerce=[GENERAL])

    page = client_as("auditor").get(reverse("rule-list")).content.decode()

    assert page.index("CT from CT1") < page.index("everything")
    assert "Modality equals CT" in page and "calling_ae is one of CT1, CT2" in page
    assert "InstitutionName set to General" in page
    assert "Per study, after 120 s quiet" in page and "Everything (no conditions)" in page


@pytest.mark.parametrize("role, visible, hidden", [
    ("admin", ["Add rule", "Move up", "Move down", ">Disable<", ">Delete<", ">Edit<"], []),
    ("operator", [">View<"], ["Add rule", "Move up", ">Disable<", ">Delete<", ">Edit<"]),
    ("auditor", [">View<"], ["Add rule", "Move up", ">Disable<", ">Delete<", ">Edit<"]),
])
def test_each_role_sees_the_buttons_it_may_use(client_as, role, visible, hidden):
    make_rule("first", order=1)
    make_rule("second", order=2)

    page = client_as(role).get(reverse("rule-list")).content.decode()

    assert all(b in page for b in visible), [b for b in visible if b not in page]
    assert not any(b in page for b in hidden), [b for b in hidden if b in page]


def test_the_list_costs_the_same_queries_for_thirty_rules(client_as, django_assert_num_queries):
    client = client_as("auditor")
    pacs = make_node("pacs1")
    make_rule("rule0", [CT], [pacs])
    client.get(reverse("rule-list"))
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as one:
        client.get(reverse("rule-list"))
    for n in range(1, 30):
        make_rule(f"rule{n}", [CT], [pacs, make_node(f"node{n}")], coerce=[GENERAL])

    with django_assert_num_queries(len(one)):
        client.get(reverse("rule-list"))


# --- Moving and switching ------------------------------------------------------------------


def test_moving_a_rule_up_changes_the_order_rules_are_evaluated_in(client_as):
    pacs1, pacs2 = make_node("pacs1"), make_node("pacs2")
    first = make_rule("first", [CT], [pacs1], order=10, stop=True)
    second = make_rule("second", [CT], [pacs2], order=20, stop=True)
    facts = Facts({"Modality": "CT"})
    assert [r.name for r in matching_rules(enabled_rules(), facts)] == ["first"]

    response = client_as("admin").post(reverse("rule-move", args=[second.pk]),
                                       {"direction": "up"}, follow=True)

    assert "Rule second now comes before first" in response.content.decode()
    assert [r.name for r in matching_rules(enabled_rules(), facts)] == ["second"]
    first.refresh_from_db()
    second.refresh_from_db()
    assert (second.order, first.order) == (10, 20)
    [event] = events("routing.rule.moved")
    assert event.object_id == str(second.pk) and event.detail["direction"] == "up"
    assert event.detail["before"] == {"order": 20} and event.detail["after"] == {"order": 10}
    assert event.detail["swapped_with"] == "first"


def test_moving_down_among_rules_with_the_same_order_renumbers_them(client_as):
    for name in ("a", "b", "c"):
        make_rule(name, order=100)

    client_as("admin").post(reverse("rule-move", args=[Rule.objects.get(name="a").pk]),
                            {"direction": "down"})

    assert [(r.name, r.order) for r in Rule.objects.order_by("order", "name")] == [
        ("b", 10), ("a", 20), ("c", 30)]
    [event] = events("routing.rule.moved")
    assert event.detail["orders"] == {"a": [100, 20], "b": [100, 10], "c": [100, 30]}


def test_a_rule_cannot_move_above_its_own_order_number_by_name_alone(client_as):
    # "x" swapped with "b" would take order 20, and sort after "c" (also 20) by name.
    make_rule("x", order=10)
    make_rule("b", order=20)
    make_rule("c", order=20)

    client_as("admin").post(reverse("rule-move", args=[Rule.objects.get(name="x").pk]),
                            {"direction": "down"})

    assert [r.name for r in Rule.objects.order_by("order", "name")] == ["b", "x", "c"]


def test_the_first_rule_does_not_move_up(client_as):
    rule = make_rule("first", order=10)
    make_rule("second", order=20)

    response = client_as("admin").post(reverse("rule-move", args=[rule.pk]),
                                       {"direction": "up"}, follow=True)

    assert "Rule first is already first" in response.content.decode()
    assert not events("routing.rule.moved")


def test_an_administrator_disables_a_rule_and_it_is_audited(client_as):
    rule = make_rule("CT", [CT])

    client_as("admin").post(reverse("rule-toggle", args=[rule.pk]), {"enabled": "0"})

    rule.refresh_from_db()
    assert not rule.enabled and enabled_rules() == []
    [event] = events("routing.rule.updated")
    assert event.detail == {"before": {"enabled": True}, "after": {"enabled": False}}


def test_an_administrator_deletes_a_rule_and_the_audit_keeps_what_it_said(client_as):
    pacs1 = make_node("pacs1")
    rule = make_rule("CT", [CT], [pacs1])

    response = client_as("admin").post(reverse("rule-delete", args=[rule.pk]), follow=True)

    assert "Rule CT deleted" in response.content.decode()
    assert not Rule.objects.exists()
    [event] = events("routing.rule.deleted")
    assert event.detail["after"] is None
    assert event.detail["before"]["conditions"] == [CT]
    assert event.detail["before"]["destinations"] == ["pacs1"]


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_others_may_not_change_rules(client_as, role):
    pacs1 = make_node("pacs1")
    rule = make_rule("CT", [CT], [pacs1], order=10)
    make_rule("other", order=20)
    client = client_as(role)

    responses = [
        client.get(reverse("rule-create")),
        client.post(reverse("rule-create"), rule_form("new", destinations=["pacs1"])),
        client.post(reverse("rule-edit", args=[rule.pk]), rule_form("CT", order="5")),
        client.post(reverse("rule-move", args=[rule.pk]), {"direction": "down"}),
        client.post(reverse("rule-toggle", args=[rule.pk]), {"enabled": "0"}),
        client.post(reverse("rule-delete", args=[rule.pk])),
        client.post(reverse("rule-test"), rule_form("CT", conditions=[CT])),
    ]

    assert [r.status_code for r in responses] == [403] * 7
    rule.refresh_from_db()
    assert (rule.order, rule.enabled, Rule.objects.count()) == (10, True, 2)
    assert not AuditEvent.objects.filter(action__startswith="routing.").exists()


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_others_see_a_rule_read_only(client_as, role):
    make_node("pacs1")
    rule = make_rule("CT", [CT], list(make_node("pacs2") for _ in range(1)), coerce=[GENERAL])

    page = client_as(role).get(reverse("rule-edit", args=[rule.pk])).content.decode()

    assert "Read-only" in page
    assert "Save rule" not in page and "Test rule" not in page and "Delete rule" not in page
    assert re.search(r'name="conditions-0-attribute" value="Modality"[^>]*disabled', page)
    assert re.search(r'name="coerce-0-value" value="General"[^>]*disabled', page)
    assert 'name="conditions-1-attribute"' not in page


def test_actions_that_change_something_refuse_a_get(client_as):
    rule = make_rule("CT")
    client = client_as("admin")

    for name in ("rule-toggle", "rule-delete", "rule-move"):
        assert client.get(reverse(name, args=[rule.pk])).status_code == 405
    assert client.get(reverse("rule-test")).status_code == 405


# --- The editor ----------------------------------------------------------------------------


def test_the_add_page_offers_empty_rows_and_labels_each_one(client_as):
    make_rule("existing", order=40)

    page = client_as("admin").get(reverse("rule-create")).content.decode()

    for label in ("Condition 1 attribute", "Condition 3 value", "Coercion 2 action",
                  "Quiet seconds", "DICOM file"):
        assert f">{label}</label>" in page
    assert 'name="order" value="50"' in page
    assert 'data-add-row="conditions"' in page and 'formaction="/rules/test"' in page
    assert '<option value="regex">matches regular expression</option>' in page


def test_a_new_rule_round_trips_to_the_row_and_the_export(client_as):
    make_node("pacs1")
    make_node("archive")

    response = client_as("admin").post(reverse("rule-create"), rule_form(
        "CT from the scanners",
        conditions=[
            {"attribute": "Modality", "op": "equals", "value": "CT"},
            {"attribute": "", "op": "", "value": ""},
            {"attribute": "calling_ae", "op": "in", "value": "CT1, CT2\nCT3"},
            {"attribute": "StudyDate", "op": "range", "value": "20260101-20261231"},
            {"attribute": "PatientID", "op": "exists", "value": ""},
        ],
        coerce=[
            GENERAL,
            {"attribute": "PatientComments", "action": "remove", "value": ""},
            {"attribute": "AccessionNumber", "action": "prefix", "value": "EXT-"},
            {"attribute": "", "action": "", "value": ""},
        ],
        destinations=["pacs1", "archive"], stop="on", match="any", order="15",
    ))

    assert response.status_code == 302 and response["Location"] == reverse("rule-list")
    expected = {
        "name": "CT from the scanners", "order": 15, "enabled": True, "match": "any",
        "conditions": [
            {"attribute": "Modality", "op": "equals", "value": "CT"},
            {"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2", "CT3"]},
            {"attribute": "StudyDate", "op": "range", "value": "20260101-20261231"},
            {"attribute": "PatientID", "op": "exists"},
        ],
        "coerce": [
            GENERAL,
            {"attribute": "PatientComments", "action": "remove"},
            {"attribute": "AccessionNumber", "action": "prefix", "value": "EXT-"},
        ],
        "stop": True, "mode": "instance", "study_quiet_seconds": 60,
        "destinations": ["archive", "pacs1"],
    }
    assert exported_rules() == [expected]
    [event] = events("routing.rule.created")
    assert event.actor == "user:ada" and event.detail["before"] is None
    assert event.detail["after"] == expected


def test_editing_a_rule_shows_its_rows_and_saves_before_and_after(client_as):
    pacs1, archive = make_node("pacs1"), make_node("archive")
    rule = make_rule("CT", [CT, {"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2"]}],
                     [pacs1], order=10)
    client = client_as("admin")
    page = client.get(reverse("rule-edit", args=[rule.pk])).content.decode()
    assert re.search(r'name="conditions-1-value"[^>]*>\s*CT1, CT2</textarea>', page)
    assert re.search(r'<input type="checkbox" name="destinations" value="pacs1"[^>]*checked', page)

    response = client.post(reverse("rule-edit", args=[rule.pk]), rule_form(
        "CT",
        conditions=[{**CT, "DELETE": "on"},
                    {"attribute": "calling_ae", "op": "in", "value": "CT1, CT2"},
                    {"attribute": "Modality", "op": "wildcard", "value": "C?"}],
        coerce=[GENERAL], destinations=["archive"], initial=(2, 0),
    ))

    assert response.status_code == 302
    rule.refresh_from_db()
    assert rule.conditions == [{"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2"]},
                               {"attribute": "Modality", "op": "wildcard", "value": "C?"}]
    assert [n.name for n in rule.destinations.all()] == [archive.name]
    [event] = events("routing.rule.updated")
    assert event.detail["before"] == {"coerce": [], "destinations": ["pacs1"],
                                      "conditions": [CT, {"attribute": "calling_ae", "op": "in",
                                                          "value": ["CT1", "CT2"]}]}
    assert event.detail["after"]["destinations"] == ["archive"]
    assert event.detail["after"]["coerce"] == [GENERAL]


def test_saving_a_rule_unchanged_records_nothing(client_as):
    pacs1 = make_node("pacs1")
    rule = make_rule("CT", [CT], [pacs1], order=10)

    response = client_as("admin").post(
        reverse("rule-edit", args=[rule.pk]),
        rule_form("CT", conditions=[CT], destinations=["pacs1"], initial=(1, 0)), follow=True)

    assert "Nothing changed in rule CT" in response.content.decode()
    assert not events("routing.rule.updated")


def test_an_invalid_regex_is_shown_next_to_its_row(client_as):
    make_node("pacs1")

    response = client_as("admin").post(reverse("rule-create"), rule_form(
        conditions=[{"attribute": "", "op": "", "value": ""}, CT,
                    {"attribute": "StudyDescription", "op": "regex", "value": "CT("}],
        destinations=["pacs1"],
    ))

    assert response.status_code == 200
    page = response.content.decode()
    assert "Invalid regex 'CT('" in row_errors(page, "conditions", 2)
    assert row_errors(page, "conditions", 1) == ""
    assert not Rule.objects.exists() and not events("routing.rule.created")


def field_errors(page: str, field: str) -> str:
    """The error text shown next to the form field named ``field``."""
    errors = re.search(rf'id="id_{field}_errors"[^>]*>(.*?)</div>', page, re.DOTALL)
    assert errors, f"no errors next to {field}"
    return html.unescape(re.sub(r"<[^>]+>", " ", errors.group(1))).strip()


@pytest.mark.parametrize("order", ["3000000000", "-3000000000", str(ORDER_MAX + 1)])
def test_an_order_out_of_bounds_is_shown_next_to_the_field(client_as, order):
    rule = make_rule("CT", [CT], order=10)
    client = client_as("admin")

    created = client.post(reverse("rule-create"), rule_form("new", order=order))
    edited = client.post(reverse("rule-edit", args=[rule.pk]), rule_form("CT", order=order))

    for response in (created, edited):
        assert response.status_code == 200
        assert field_errors(response.content.decode(), "order") == (
            "Must be an integer from -1000000 to 1000000")
    assert list(Rule.objects.values_list("name", "order")) == [("CT", 10)]
    assert not events("routing.rule.created") and not events("routing.rule.updated")


def test_a_new_rule_is_offered_an_order_within_the_bounds(client_as):
    make_rule("last", order=ORDER_MAX)

    page = client_as("admin").get(reverse("rule-create")).content.decode()

    assert f'name="order" value="{ORDER_MAX}"' in page


def test_each_problem_is_shown_where_it_is(client_as):
    make_rule("taken")

    response = client_as("admin").post(reverse("rule-create"), rule_form(
        "taken",
        conditions=[{"attribute": "NoSuchKeyword", "op": "equals", "value": "x"},
                    {"attribute": "Modality", "op": "", "value": "CT"},
                    {"attribute": "StudyDate", "op": "range", "value": "20261231-20260101"},
                    {"attribute": "Modality", "op": "exists", "value": "CT"}],
        coerce=[{"attribute": "SOPInstanceUID", "action": "set", "value": "1.2.3"}],
        study_quiet_seconds="-5",
    ))

    page = response.content.decode()
    assert "Unknown attribute keyword 'NoSuchKeyword'" in row_errors(page, "conditions", 0)
    assert "Choose an operator." in row_errors(page, "conditions", 1)
    assert "is empty (min > max)" in row_errors(page, "conditions", 2)
    assert "Exists takes no value" in row_errors(page, "conditions", 3)
    assert "SOPInstanceUID cannot be coerced" in row_errors(page, "coerce", 0)
    assert "A rule named &#x27;taken&#x27; already exists" in page
    assert "Must be an integer from 0 to 604800" in page
    assert Rule.objects.count() == 1


# --- Test ----------------------------------------------------------------------------------


def test_test_runs_the_unsaved_rule_on_the_last_received_instances(client_as):
    make_node("pacs1")
    ct = received_instance({"Modality": "CT"}, calling_ae="CT1")
    mr = received_instance({"Modality": "MR"}, calling_ae="MR1")
    from_elsewhere = received_instance({"Modality": "CT"}, calling_ae="OTHER")

    response = client_as("admin").post(reverse("rule-test"), rule_form(
        conditions=[CT, {"attribute": "calling_ae", "op": "wildcard", "value": "CT*"}],
        destinations=["pacs1"], enabled=False))

    assert response.status_code == 200
    page = response.content.decode()
    results = page[page.index("Test results"):]
    rows = re.findall(r"<tr>.*?</tr>", results[results.index("Last received"):], re.DOTALL)
    matches = {i.calling_ae: ">Yes<" in row for row in rows for i in (ct, mr, from_elsewhere)
               if f'<td class="mono">{i.calling_ae}</td>' in row}
    assert matches == {"CT1": True, "MR1": False, "OTHER": False}
    assert "The rule is disabled" in results and "would be sent to pacs1" in results
    assert 'name="conditions-1-value" value="CT*"' in page or "CT*</textarea>" in page
    assert not Rule.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="routing.").exists()


def test_test_on_an_uploaded_file_shows_the_match_and_the_coerced_copy(client_as):
    rule = make_rule("CT", [{"attribute": "Modality", "op": "equals", "value": "MR"}], order=10)
    data = rule_form("CT", conditions=[CT, {"attribute": "calling_ae", "op": "equals",
                                            "value": "CT1"}],
                     coerce=[GENERAL, {"attribute": "PatientID", "action": "prefix",
                                       "value": "EXT-"}], rule=str(rule.pk))
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        data["dicom_file"] = SimpleUploadedFile("CT_small.dcm", f.read())
    data["calling_ae"] = "CT1"

    response = client_as("admin").post(reverse("rule-test"), data)

    page = html.unescape(response.content.decode())
    results = page[page.index("Test results"):]
    assert re.search(r"<dt>Matches</dt><dd><span class=\"badge ok\">Yes", results)
    assert re.search(r"InstitutionName</td><td>[^<]+</td><td><b>General</b>", results)
    assert re.search(r"PatientID</td><td>1CT1</td><td><b>EXT-1CT1</b>", results)
    # The editor still shows the unsaved rule, and saving goes to the rule being edited.
    assert f'action="{reverse("rule-edit", args=[rule.pk])}"' in page
    rule.refresh_from_db()
    assert rule.conditions == [{"attribute": "Modality", "op": "equals", "value": "MR"}]
    assert not AuditEvent.objects.filter(action__startswith="routing.").exists()


def test_test_on_a_file_without_the_association_it_needs_does_not_match(client_as):
    data = rule_form(conditions=[CT, {"attribute": "calling_ae", "op": "equals",
                                      "value": "CT1"}])
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        data["dicom_file"] = SimpleUploadedFile("CT_small.dcm", f.read())

    page = client_as("admin").post(reverse("rule-test"), data).content.decode()

    assert re.search(r"<dt>Matches</dt><dd><span class=\"badge off\">No", page)
    assert "The rule has no coercions" in page


def test_a_file_that_is_not_dicom_is_refused_next_to_the_file_input(client_as):
    data = rule_form(conditions=[CT])
    data["dicom_file"] = SimpleUploadedFile("notes.txt", b"this is not a DICOM file\n" * 20)

    page = client_as("admin").post(reverse("rule-test"), data).content.decode()

    errors = re.search(r'id="id_dicom_file_errors"[^>]*>(.*?)</div>', page, re.DOTALL)
    assert errors and "This is not a DICOM file" in errors.group(1)
    assert "<h3>File notes.txt" not in page


def with_unknown_vr(raw: bytes, tag: bytes) -> bytes:
    """Explicit VR Part 10 ``raw`` with the VR of element ``tag`` (its four bytes, little
    endian) overwritten by "ZZ": the file reads, the element does not decode."""
    at = raw.index(tag) + 4
    return raw[:at] + b"ZZ" + raw[at + 2:]


def test_a_dicom_file_with_an_element_that_does_not_decode_is_refused_next_to_the_file_input(
        client_as):
    data = rule_form(conditions=[CT])
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        broken = with_unknown_vr(f.read(), b"\x08\x00\x60\x00")  # Modality
    data["dicom_file"] = SimpleUploadedFile("broken.dcm", broken)

    response = client_as("admin").post(reverse("rule-test"), data)

    assert response.status_code == 200
    page = response.content.decode()
    assert "This DICOM file could not be read: Unknown Value Representation 'ZZ' in tag " \
        "(0008,0060)" in field_errors(page, "dicom_file")
    assert "<h3>File broken.dcm" not in page


def test_a_file_over_the_size_limit_is_refused_next_to_the_file_input(client_as, monkeypatch):
    monkeypatch.setattr(rule_views, "MAX_TEST_FILE_BYTES", 2 * 1024 * 1024)
    data = rule_form(conditions=[CT])
    data["dicom_file"] = SimpleUploadedFile("huge.dcm", b"\0" * (3 * 1024 * 1024))

    page = client_as("admin").post(reverse("rule-test"), data).content.decode()

    assert field_errors(page, "dicom_file") == (
        "This file is 3 MB; Test takes files of at most 2 MB.")
    assert "<h3>File huge.dcm" not in page


def test_a_rule_field_that_is_not_a_plain_number_tests_the_editor_as_a_new_rule(client_as):
    make_rule("CT", [CT], order=10)

    response = client_as("admin").post(reverse("rule-test"),
                                       rule_form(conditions=[CT], rule="²"))

    assert response.status_code == 200
    page = response.content.decode()
    assert "Test results" in page
    assert f'action="{reverse("rule-create")}"' in page


def test_a_rule_with_problems_is_not_tested(client_as):
    received_instance({"Modality": "CT"})

    response = client_as("admin").post(reverse("rule-test"), rule_form(
        conditions=[{"attribute": "StudyDescription", "op": "regex", "value": "CT("}]))

    page = response.content.decode()
    assert "Invalid regex" in row_errors(page, "conditions", 0)
    assert "fix them to test it" in page
    assert "Test results" not in page

"""The Nodes pages: the list with each node's echo, backlog and last delivery; adding, changing,
enabling, disabling and deleting a node (administrators); Verify (a real C-ECHO, operators
too)."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from gateway.models import AuditEvent
from routing.models import Delivery, DeliveryStatus, Node
from tests.fixtures_storage import make_node, make_rule, received_instance
from tests.servers import free_port

pytestmark = pytest.mark.django_db

NODE = {"name": "PACS1", "ae_title": "PACS1", "host": "10.0.0.5", "port": "104",
        "enabled": "on", "max_associations": "2"}


def deliveries(node: Node, *statuses: str, delivered_at=None) -> None:
    """One delivery per status to ``node``, each for an instance of its own."""
    now = timezone.now()
    Delivery.objects.bulk_create(
        Delivery(instance=received_instance(), node=node, status=status, next_attempt_at=now,
                 delivered_at=delivered_at if status == DeliveryStatus.DELIVERED else None)
        for status in statuses
    )


def field_errors(page: str, field: str) -> str:
    """The text of the errors shown next to ``field`` (empty when there are none)."""
    match = re.search(rf'<div class="field-errors" id="id_{field}_errors"[^>]*>(.*?)</div>',
                      page, re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", " ", match.group(1)).strip()) if match else ""


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


# --- The list ------------------------------------------------------------------------------


def test_the_list_shows_each_node_with_its_last_echo_backlog_and_last_delivery(client_as):
    pacs = make_node("pacs1", ae_title="PACS1", host="10.0.0.5", port=104,
                     last_echo_at=timezone.now(), last_echo_error="connection refused to "
                     "10.0.0.5:104")
    make_node("archive", enabled=False)
    delivered = timezone.now() - timedelta(hours=1)
    deliveries(pacs, DeliveryStatus.PENDING, DeliveryStatus.PENDING, DeliveryStatus.FAILED,
               DeliveryStatus.SENDING, DeliveryStatus.DEAD, DeliveryStatus.DELIVERED,
               delivered_at=delivered)

    page = client_as("auditor").get(reverse("node-list")).content.decode()

    row = re.search(r"<tr>\s*<td><a [^>]*>pacs1</a>.*?</tr>", page, re.DOTALL).group(0)
    assert "10.0.0.5:104" in row and "PACS1" in row
    assert "Failed" in row and "connection refused to 10.0.0.5:104" in row
    assert re.search(rf'\?node={pacs.pk}&amp;status=open"[^>]*>4</a>', row)
    assert delivered.astimezone(timezone.get_current_timezone()).strftime("%Y-%m-%d %H:%M") in row
    archive = re.search(r"<tr>\s*<td><a [^>]*>archive</a>.*?</tr>", page, re.DOTALL).group(0)
    assert "Disabled" in archive and "Never" in archive


@pytest.mark.parametrize("echo, state, shown", [
    ({}, "never", "Never"),
    ({"last_echo_error": ""}, "ok", "OK"),
    ({"last_echo_error": "connection refused to 10.0.0.5:104"}, "failed", "Failed"),
])
def test_a_nodes_echo_state_is_what_its_last_echo_said(client_as, echo, state, shown):
    now = timezone.now()
    if echo:  # every echo sets when it ran; a success sets last_echo_ok_at too
        echo = {"last_echo_at": now, **echo,
                "last_echo_ok_at": None if echo["last_echo_error"] else now}
    node = make_node("pacs1", **echo)

    page = client_as("auditor").get(reverse("node-edit", args=[node.pk])).content.decode()

    assert node.echo_state == state
    echo_cell = page[page.index("<dt>Last C-ECHO</dt>"):]
    echo_cell = echo_cell[:echo_cell.index("</dd>")]
    assert shown in echo_cell
    assert not any(other in echo_cell for other in {"Never", "OK", "Failed"} - {shown})


def test_a_failed_echo_after_a_success_is_failed_and_names_the_last_success(client_as):
    now = timezone.now()
    node = make_node("pacs1", last_echo_at=now, last_echo_ok_at=now - timedelta(days=1),
                     last_echo_error="association rejected")

    page = client_as("auditor").get(reverse("node-list")).content.decode()

    assert node.echo_state == "failed"
    assert '<span class="badge bad">Failed</span>' in page and "association rejected" in page
    assert "Last success" in page


def test_with_activity_counts_backlog_and_dead_of_any_age_per_node():
    pacs, other = make_node("pacs1"), make_node("archive")
    delivered = timezone.now() - timedelta(days=3)
    deliveries(pacs, DeliveryStatus.PENDING, DeliveryStatus.SENDING, DeliveryStatus.FAILED,
               DeliveryStatus.DEAD, DeliveryStatus.DEAD, DeliveryStatus.ABANDONED,
               DeliveryStatus.DELIVERED, delivered_at=delivered)
    Delivery.objects.update(created_at=timezone.now() - timedelta(days=3))

    nodes = list(Node.objects.with_activity())

    assert [n.name for n in nodes] == ["archive", "pacs1"]  # the default order, by name
    by_name = {n.name: n for n in nodes}
    assert (by_name["pacs1"].backlog, by_name["pacs1"].dead) == (3, 2)
    assert by_name["pacs1"].last_delivered_at == delivered
    assert (by_name["archive"].backlog, by_name["archive"].dead,
            by_name["archive"].last_delivered_at) == (0, 0, None)
    assert other.pk == by_name["archive"].pk


@pytest.mark.parametrize("role, buttons, absent", [
    ("admin", ["Add node", ">Edit<", ">Verify<", ">Disable<", ">Delete<"], [">View<"]),
    ("operator", [">View<", ">Verify<"], ["Add node", ">Disable<", ">Delete<", ">Edit<"]),
    ("auditor", [">View<"], ["Add node", ">Verify<", ">Disable<", ">Delete<", ">Edit<"]),
])
def test_each_role_sees_the_buttons_it_may_use(client_as, role, buttons, absent):
    make_node("pacs1")

    page = client_as(role).get(reverse("node-list")).content.decode()

    assert all(b in page for b in buttons), [b for b in buttons if b not in page]
    assert not any(b in page for b in absent), [b for b in absent if b in page]


def test_the_list_costs_the_same_queries_for_thirty_nodes_with_deliveries(client_as):
    client = client_as("admin")
    first = make_node("node0")
    deliveries(first, DeliveryStatus.PENDING, DeliveryStatus.DELIVERED,
               delivered_at=timezone.now())
    client.get(reverse("node-list"))  # the session and user are warm from here on
    with CaptureQueriesContext(connection) as one:
        assert client.get(reverse("node-list")).status_code == 200
    for n in range(1, 30):
        node = make_node(f"node{n}", last_echo_at=timezone.now())
        deliveries(node, DeliveryStatus.PENDING, DeliveryStatus.FAILED,
                   DeliveryStatus.DELIVERED, delivered_at=timezone.now())

    with CaptureQueriesContext(connection) as thirty:
        page = client.get(reverse("node-list")).content.decode()

    assert page.count(">Verify<") == 30
    assert len(thirty) == len(one), [q["sql"] for q in thirty.captured_queries]


# --- Adding and changing -------------------------------------------------------------------


def test_an_administrator_adds_a_node_and_the_audit_has_its_values(client_as):
    client = client_as("admin")
    page = client.get(reverse("node-create")).content.decode()
    assert 'for="id_ae_title">AE title</label>' in page

    response = client.post(reverse("node-create"), NODE)

    assert response.status_code == 302 and response["Location"] == reverse("node-list")
    node = Node.objects.get(name="PACS1")
    assert (node.ae_title, node.host, node.port, node.enabled, node.max_associations) == (
        "PACS1", "10.0.0.5", 104, True, 2)
    [event] = events("routing.node.created")
    assert event.actor == "user:ada" and event.object_id == str(node.pk)
    assert event.detail["before"] is None
    assert event.detail["after"] == {"name": "PACS1", "ae_title": "PACS1", "host": "10.0.0.5",
                                     "port": 104, "enabled": True, "max_associations": 2}
    assert "Node PACS1 added" in client.get(response["Location"]).content.decode()


@pytest.mark.parametrize("ae_title, problem", [
    ("PACS\\1", "may only hold printable ASCII without backslash"),
    ("A_VERY_LONG_AE_TITLE", "is longer than 16 characters"),
])
def test_a_bad_ae_title_is_shown_next_to_the_field(client_as, ae_title, problem):
    response = client_as("admin").post(reverse("node-create"), {**NODE, "ae_title": ae_title})

    assert response.status_code == 200
    assert problem in field_errors(response.content.decode(), "ae_title")
    assert not Node.objects.exists()
    assert not events("routing.node.created")


def test_a_port_out_of_range_a_taken_name_and_a_bad_maximum_are_shown_next_to_their_fields(
    client_as
):
    make_node("PACS1")

    response = client_as("admin").post(reverse("node-create"), {
        **NODE, "port": "70000", "max_associations": "0", "host": "two words"})

    page = response.content.decode()
    assert "Must be 1-65535, got 70000" in field_errors(page, "port")
    assert "A node named 'PACS1' already exists" in field_errors(page, "name")
    assert "Must be 1-64" in field_errors(page, "max_associations")
    assert "host name or address is required" in field_errors(page, "host")
    assert field_errors(page, "ae_title") == ""
    assert Node.objects.count() == 1


def test_a_port_that_is_not_a_number_is_refused_once(client_as):
    response = client_as("admin").post(reverse("node-create"), {**NODE, "port": "abc"})

    assert field_errors(response.content.decode(), "port") == "Enter a whole number."


def test_an_administrator_changes_a_node_and_the_audit_has_before_and_after(client_as):
    node = make_node("PACS1", ae_title="PACS1", host="10.0.0.5", port=104)
    client = client_as("admin")
    page = client.get(reverse("node-edit", args=[node.pk])).content.decode()
    assert 'value="10.0.0.5"' in page and "Save node" in page

    response = client.post(reverse("node-edit", args=[node.pk]),
                           {**NODE, "name": "PACS-main", "port": "11112"})

    assert response.status_code == 302
    node.refresh_from_db()
    assert (node.name, node.port) == ("PACS-main", 11112)
    [event] = events("routing.node.updated")
    assert event.detail == {"before": {"name": "PACS1", "port": 104},
                            "after": {"name": "PACS-main", "port": 11112}}


def test_saving_a_node_unchanged_records_nothing(client_as):
    node = make_node("PACS1", ae_title="PACS1", host="10.0.0.5", port=104)

    response = client_as("admin").post(reverse("node-edit", args=[node.pk]), NODE, follow=True)

    assert "Nothing changed on node PACS1" in response.content.decode()
    assert not events("routing.node.updated")


def test_a_node_keeps_its_own_name_when_edited(client_as):
    node = make_node("PACS1", ae_title="PACS1", host="10.0.0.5", port=104)

    response = client_as("admin").post(reverse("node-edit", args=[node.pk]),
                                       {**NODE, "ae_title": "PACS2"})

    assert response.status_code == 302
    assert Node.objects.get().ae_title == "PACS2"


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_only_an_administrator_may_open_the_add_page(client_as, role):
    response = client_as(role).get(reverse("node-create"))

    assert response.status_code == 403
    assert "needs the Administrators role" in response.content.decode()


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_others_see_a_node_read_only(client_as, role):
    node = make_node("PACS1")

    page = client_as(role).get(reverse("node-edit", args=[node.pk])).content.decode()

    assert "Read-only" in page and "Save node" not in page
    assert re.search(r'<input type="text" name="ae_title" value="PACS1"[^>]* disabled', page)
    assert ">Delete<" not in page and ">Disable<" not in page
    assert (">Verify<" in page) == (role == "operator")


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_others_may_not_add_change_switch_or_delete_a_node(client_as, role):
    node = make_node("PACS1", port=104)
    client = client_as(role)

    responses = [
        client.post(reverse("node-create"), {**NODE, "name": "PACS2"}),
        client.post(reverse("node-edit", args=[node.pk]), {**NODE, "port": "105"}),
        client.post(reverse("node-toggle", args=[node.pk]), {"enabled": "0"}),
        client.post(reverse("node-delete", args=[node.pk])),
    ]

    assert [r.status_code for r in responses] == [403] * 4
    node.refresh_from_db()
    assert Node.objects.count() == 1 and node.port == 104 and node.enabled
    assert not AuditEvent.objects.filter(action__startswith="routing.").exists()


def test_actions_that_change_something_refuse_a_get(client_as):
    node = make_node("PACS1")
    client = client_as("admin")

    for name in ("node-toggle", "node-delete", "node-verify"):
        assert client.get(reverse(name, args=[node.pk])).status_code == 405
    assert Node.objects.get().enabled


# --- Enable, disable, delete ---------------------------------------------------------------


def test_an_administrator_disables_and_enables_a_node_and_each_is_audited(client_as):
    node = make_node("PACS1")
    client = client_as("admin")

    response = client.post(reverse("node-toggle", args=[node.pk]), {"enabled": "0"},
                           follow=True)
    assert "Node PACS1 disabled" in response.content.decode()
    node.refresh_from_db()
    assert not node.enabled
    client.post(reverse("node-toggle", args=[node.pk]), {"enabled": "1"})
    node.refresh_from_db()
    assert node.enabled

    assert [e.detail for e in events("routing.node.updated")] == [
        {"before": {"enabled": True}, "after": {"enabled": False}},
        {"before": {"enabled": False}, "after": {"enabled": True}},
    ]


def test_a_node_with_deliveries_still_to_send_is_not_deleted(client_as):
    node = make_node("PACS1")
    deliveries(node, DeliveryStatus.PENDING, DeliveryStatus.FAILED, DeliveryStatus.DELIVERED)

    response = client_as("admin").post(reverse("node-delete", args=[node.pk]), follow=True)

    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == reverse("node-edit", args=[node.pk])
    text = response.content.decode()
    assert "PACS1 cannot be deleted: 2 deliveries to it still have to be sent" in text
    assert "disable it" in text
    assert Node.objects.filter(pk=node.pk).exists()
    assert not events("routing.node.deleted")


def test_a_node_with_delivery_history_is_kept_and_disabling_is_suggested(client_as):
    node = make_node("PACS1")
    deliveries(node, DeliveryStatus.DELIVERED, DeliveryStatus.DELIVERED, DeliveryStatus.DEAD)

    response = client_as("admin").post(reverse("node-delete", args=[node.pk]), follow=True)

    text = response.content.decode()
    assert "PACS1 cannot be deleted: 3 deliveries (2 delivered, 1 dead) refer to it" in text
    assert "take it out of its rules and disable it" in text
    assert Node.objects.filter(pk=node.pk).exists()


def test_an_unused_node_is_deleted_taken_out_of_its_rules_and_audited(client_as):
    node, other = make_node("PACS1"), make_node("archive")
    make_rule("CT", destinations=[node, other])

    response = client_as("admin").post(reverse("node-delete", args=[node.pk]), follow=True)

    assert "Node PACS1 deleted. It was taken out of the rules CT." in response.content.decode()
    assert not Node.objects.filter(pk=node.pk).exists()
    [deleted] = events("routing.node.deleted")
    assert deleted.object_id == str(node.pk) and deleted.detail["after"] is None
    assert deleted.detail["before"]["ae_title"] == "PACS1"
    [rule_event] = events("routing.rule.updated")
    assert rule_event.detail["before"] == {"destinations": ["PACS1", "archive"]}
    assert rule_event.detail["after"] == {"destinations": ["archive"]}


# --- Verify --------------------------------------------------------------------------------


def test_verify_echoes_a_running_pacs_and_says_how_long_it_took(client_as, orthanc):
    node = make_node("PACS1", ae_title=orthanc.ae_title, port=orthanc.dicom_port)

    response = client_as("operator").post(reverse("node-verify", args=[node.pk]), follow=True)

    assert re.search(r"C-ECHO to PACS1 succeeded in \d+ ms", response.content.decode())
    node.refresh_from_db()
    assert node.last_echo_ok_at and node.last_echo_at == node.last_echo_ok_at
    assert node.last_echo_error == ""
    [event] = events("routing.node.verified")
    assert event.actor == "user:otto" and event.detail["ok"] is True


def test_verify_shows_why_a_closed_port_does_not_answer(client_as):
    port = free_port()
    node = make_node("PACS1", port=port, last_echo_ok_at=timezone.now() - timedelta(days=1))

    response = client_as("admin").post(reverse("node-verify", args=[node.pk]),
                                       {"next": reverse("node-edit", args=[node.pk])},
                                       follow=True)

    assert response.redirect_chain[-1][0] == reverse("node-edit", args=[node.pk])
    text = response.content.decode()
    assert f"C-ECHO to PACS1 failed: connection refused to 127.0.0.1:{port}" in text
    node.refresh_from_db()
    assert node.last_echo_at > node.last_echo_ok_at
    assert node.last_echo_error == f"connection refused to 127.0.0.1:{port}"
    [event] = events("routing.node.verified")
    assert event.detail["ok"] is False and "connection refused" in event.detail["error"]


def test_verify_does_not_follow_a_next_address_elsewhere(client_as):
    node = make_node("PACS1", port=free_port())

    response = client_as("admin").post(reverse("node-verify", args=[node.pk]),
                                       {"next": "https://evil.example.org/"})

    assert response["Location"] == reverse("node-list")


def test_an_auditor_may_not_verify(client_as):
    node = make_node("PACS1", port=free_port())

    response = client_as("auditor").post(reverse("node-verify", args=[node.pk]))

    assert response.status_code == 403
    node.refresh_from_db()
    assert node.last_echo_at is None and not events("routing.node.verified")

"""The dashboard: the last 24 hours' numbers and the work still to do, each a link into the list
of exactly what it counts, the same numbers as JSON for the page's self-update, node health, and
the hourly chart."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from django.contrib.staticfiles import finders
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from routing.models import Delivery, DeliveryStatus, ReceivedInstance, ReceivedStudy
from tests.factories import (
    make_delivery_row,
    make_received_instance,
    make_received_study,
    make_step,
)
from tests.fixtures_pacs import make_node
from worklist.models import HL7Message, MessageStatus, StepStatus

pytestmark = pytest.mark.django_db

PAGE = reverse("dashboard")
DATA = reverse("dashboard-data")
LONG_AGO = timedelta(hours=25)


def hl7(status: str, age: timedelta | None = None) -> HL7Message:
    message = HL7Message.objects.create(status=status, message_type="ORM^O01", raw=b"MSH|^~\\&|",
                                        sending_application="RIS",
                                        control_id=f"MSG{HL7Message.objects.count() + 1}")
    if age:
        HL7Message.objects.filter(pk=message.pk).update(received_at=timezone.now() - age)
    return message


@pytest.fixture
def activity():
    """A day's worth of rows, with one of each kind older than 24 hours that must not count."""
    now = timezone.now()
    pacs1 = make_node(name="PACS1", port=10401, last_echo_at=now, last_echo_ok_at=now)
    pacs2 = make_node(name="PACS2", port=10402, enabled=False,
                      last_echo_at=now, last_echo_ok_at=now - timedelta(days=2),
                      last_echo_error="connection refused to 127.0.0.1:10402")
    for status in (MessageStatus.ACCEPTED, MessageStatus.ACCEPTED, MessageStatus.DUPLICATE,
                   MessageStatus.ERROR, MessageStatus.REJECTED):
        hl7(status)
    hl7(MessageStatus.ERROR, LONG_AGO)
    for status in (StepStatus.SCHEDULED, StepStatus.ARRIVED, StepStatus.READY,
                   StepStatus.STARTED, StepStatus.COMPLETED, StepStatus.CANCELLED):
        make_step(status=status)
    make_step(status=StepStatus.SCHEDULED, start=now - timedelta(days=30))  # any date counts

    study = make_received_study()
    recent = [make_received_instance(study) for _ in range(3)]
    old_study = make_received_study(last_received_at=now - LONG_AGO)
    old = make_received_instance(old_study, received_at=now - LONG_AGO)

    make_delivery_row(pacs1, recent[0], status=DeliveryStatus.DELIVERED, delivered_at=now)
    make_delivery_row(pacs1, recent[1], status=DeliveryStatus.DELIVERED, delivered_at=now)
    make_delivery_row(pacs1, recent[2], status=DeliveryStatus.PENDING)
    make_delivery_row(pacs2, recent[0], status=DeliveryStatus.SENDING, claimed_by="w")
    make_delivery_row(pacs2, recent[1], status=DeliveryStatus.FAILED, last_error="refused")
    make_delivery_row(pacs2, recent[2], status=DeliveryStatus.DEAD, last_error="refused")
    make_delivery_row(pacs1, recent[2], status=DeliveryStatus.ABANDONED)
    # Older than the window: still work to do (dead two days ago, yesterday's failed one),
    # delivered long ago, and yesterday's backlog delivered just now.
    make_delivery_row(pacs2, old, status=DeliveryStatus.DEAD, created_at=now - 2 * LONG_AGO)
    make_delivery_row(pacs2, old, status=DeliveryStatus.FAILED, created_at=now - LONG_AGO)
    make_delivery_row(pacs1, old, status=DeliveryStatus.DELIVERED, created_at=now - LONG_AGO,
                      delivered_at=now - LONG_AGO)
    make_delivery_row(pacs1, old, status=DeliveryStatus.DELIVERED, created_at=now - LONG_AGO,
                      delivered_at=now)
    return {"pacs1": pacs1, "pacs2": pacs2, "study": study}


EXPECTED = {
    "hl7_received": 5,
    "hl7_refused": 2,
    "worklist_open": 4,
    "instances_received": 3,
    "studies_received": 1,
    "deliveries_delivered": 3,  # delivered in the window, yesterday's backlog sent just now too
    "deliveries_open": 4,  # PENDING, SENDING, FAILED and yesterday's FAILED
    "deliveries_failed": 2,
    "deliveries_dead": 2,  # today's and the one from two days ago
}


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_the_dashboard_and_its_data(client_as, role):
    client = client_as(role)

    page = client.get(PAGE)
    data = client.get(DATA)

    assert page.status_code == 200 and "Last 24 hours" in page.content.decode()
    assert data.status_code == 200 and data["Content-Type"] == "application/json"


def test_the_numbers_count_the_last_24_hours_and_all_the_work_still_to_do(client_as, activity):
    data = client_as("auditor").get(DATA).json()

    assert data["counts"] == EXPECTED


def test_the_page_shows_the_same_numbers_as_the_data(client_as, activity):
    client = client_as("operator")

    page = client.get(PAGE).content.decode()
    data = client.get(DATA).json()

    for key, value in data["counts"].items():
        assert f'data-count="{key}">{value}</span>' in page
    assert data["counts"] == EXPECTED


def test_each_number_links_to_the_list_of_what_it_counts(client_as, activity):
    data = client_as("auditor").get(DATA).json()
    since = data["since"]

    def query(key):
        url = urlsplit(data["links"][key])
        return url.path, {k: v[0] for k, v in parse_qs(url.query).items()}

    assert query("hl7_received") == ("/hl7/", {"since": since})
    assert query("hl7_refused") == ("/hl7/", {"status": "refused", "since": since})
    assert query("worklist_open") == ("/worklist/", {"status": "open"})
    assert query("instances_received") == ("/studies/", {"since": since})
    assert query("deliveries_delivered") == ("/deliveries/", {"delivered_since": since})
    assert query("deliveries_open") == ("/deliveries/", {"status": "open"})
    assert query("deliveries_failed") == ("/deliveries/", {"status": "FAILED"})
    assert query("deliveries_dead") == ("/deliveries/", {"status": "DEAD"})
    ago = timezone.now() - timezone.datetime.fromisoformat(since)
    assert timedelta(hours=24) <= ago < timedelta(hours=24, seconds=30)


def test_the_page_carries_the_links(client_as, activity):
    client = client_as("auditor")
    # The window starts at a whole second: read the data before and after the page until both
    # fall in the same second, so that the page was rendered with that same start too.
    for _ in range(5):
        before = client.get(DATA).json()
        page = client.get(PAGE).content.decode()
        links = client.get(DATA).json()["links"]
        if links == before["links"]:
            break

    for key in EXPECTED:
        href = links[key].replace("&", "&amp;")
        assert f'href="{href}" data-link="{key}"' in page


@pytest.mark.parametrize("key,status", [
    ("deliveries_delivered", DeliveryStatus.DELIVERED),
    ("deliveries_open", "open"),
    ("deliveries_failed", DeliveryStatus.FAILED),
    ("deliveries_dead", DeliveryStatus.DEAD),
])
def test_a_delivery_number_opens_a_list_of_exactly_that_many_rows(client_as, activity, key,
                                                                  status):
    client = client_as("auditor")
    data = client.get(DATA).json()

    listed = client.get(data["links"][key]).content.decode()

    assert listed.count('<tr id="delivery-') == data["counts"][key] == EXPECTED[key]


def test_the_studies_link_lists_the_studies_received_in_the_window(client_as, activity):
    client = client_as("auditor")
    data = client.get(DATA).json()

    listed = client.get(data["links"]["studies_received"]).content.decode()

    assert listed.count('<tr id="study-') == data["counts"]["studies_received"] == 1
    assert f'<tr id="study-{activity["study"].pk}"' in listed


def test_dead_and_failed_deliveries_count_however_old_they_are(client_as):
    """Yesterday's outage backlog and a delivery that went dead two days ago are still work to
    do: the cards count them and their links list them."""
    now = timezone.now()
    node = make_node(name="PACS1", port=10401)
    for _ in range(3):
        make_delivery_row(node, status=DeliveryStatus.FAILED, created_at=now - LONG_AGO)
    make_delivery_row(node, status=DeliveryStatus.DEAD, created_at=now - 2 * LONG_AGO)
    client = client_as("operator")

    data = client.get(DATA).json()
    page = client.get(PAGE).content.decode()

    counts = data["counts"]
    assert (counts["deliveries_open"], counts["deliveries_failed"],
            counts["deliveries_dead"]) == (3, 3, 1)
    assert counts["deliveries_delivered"] == 0
    for key in ("deliveries_open", "deliveries_failed", "deliveries_dead"):
        listed = client.get(data["links"][key]).content.decode()
        assert listed.count('<tr id="delivery-') == counts[key]
    assert 'class="card alert" data-alert="deliveries_dead"' in page
    assert 'class="card alert" data-alert="deliveries_failed"' in page


def test_the_delivered_card_counts_what_reached_its_node_in_the_window(client_as, activity):
    page = client_as("auditor").get(PAGE).content.decode()

    card = page[page.index('data-link="deliveries_delivered"'):]
    card = card[:card.index("</div>")]
    assert f">{EXPECTED['deliveries_delivered']}</span> deliveries delivered" in card
    assert "Open, failed and dead count every delivery now in that state" in page
    assert "Delivered counts what reached its node in the last 24 hours" in page


def test_a_node_never_echoed_says_so(client_as):
    make_node(name="PACS1", port=10401)
    client = client_as("auditor")

    [node] = client.get(DATA).json()["nodes"]
    page = client.get(PAGE).content.decode()

    assert (node["echo_state"], node["last_echo"], node["last_echo_error"]) == ("never", "", "")
    assert '<span class="muted">never checked</span>' in page


def test_node_health_shows_echo_last_delivery_backlog_and_dead(client_as, activity):
    pacs1, pacs2 = activity["pacs1"], activity["pacs2"]
    nodes = {n["name"]: n for n in client_as("auditor").get(DATA).json()["nodes"]}

    one, two = nodes["PACS1"], nodes["PACS2"]
    assert (one["enabled"], one["echo_state"]) == (True, "ok")
    assert (two["enabled"], two["echo_state"]) == (False, "failed")
    assert two["last_echo_error"] == "connection refused to 127.0.0.1:10402"
    assert one["last_delivered"] and not two["last_delivered"]
    assert (one["backlog"], one["dead"]) == (1, 0)  # PENDING
    assert (two["backlog"], two["dead"]) == (3, 2)  # SENDING, FAILED, the old FAILED; any age
    assert two["last_echo_ok"] and two["last_echo"] != two["last_echo_ok"]
    base = reverse("delivery-list")
    assert two["backlog_url"] == f"{base}?{urlencode({'node': pacs2.pk, 'status': 'open'})}"
    assert two["dead_url"] == f"{base}?{urlencode({'node': pacs2.pk, 'status': 'DEAD'})}"
    listed = client_as("auditor").get(two["backlog_url"]).content.decode()
    assert listed.count('<tr id="delivery-') == 3
    assert one["delivered_url"] == f"{base}?{urlencode({'node': pacs1.pk, 'status': 'DELIVERED'})}"


def test_the_page_shows_node_health(client_as, activity):
    page = client_as("auditor").get(PAGE).content.decode()

    table = page[page.index('id="node-health"'):page.index("</table>", page.index("node-health"))]
    assert "PACS1" in table and "PACS2" in table
    assert '<span class="badge off">Disabled</span>' in table
    assert "connection refused to 127.0.0.1:10402" in table
    assert '<span class="badge ok">OK</span>' in table


def test_the_hourly_chart_counts_instances_deliveries_and_messages_per_hour(client_as, activity):
    data = client_as("auditor").get(DATA).json()
    hours = data["hours"]

    assert 24 <= len(hours) <= 25
    assert hours[-1]["instances"] == 3 and hours[-1]["delivered"] == 3
    assert hours[-1]["hl7"] == 5 and hours[-1]["hl7_refused"] == 2
    assert sum(h["instances"] for h in hours) == 3  # the old one is outside the window
    # By when they were delivered: yesterday's backlog delivered just now too.
    assert sum(h["delivered"] for h in hours) == 3
    starts = [timezone.datetime.fromisoformat(h["start"]) for h in hours]
    assert all(b - a == timedelta(hours=1) for a, b in zip(starts, starts[1:], strict=False))


def test_the_chart_is_drawn_on_the_server_as_svg(client_as, activity):
    page = client_as("auditor").get(PAGE).content.decode()
    hours = client_as("auditor").get(DATA).json()["hours"]

    label = hours[-1]["label"]
    assert '<svg class="chart" id="chart-images"' in page
    assert '<svg class="chart" id="chart-hl7"' in page
    assert f"<title>{label}: 3 instances received</title>" in page
    assert f"<title>{label}: 3 deliveries delivered</title>" in page
    assert f"<title>{label}: 2 HL7 messages refused</title>" in page
    assert page.count("<rect ") == len(hours) * 4


def test_the_bars_are_placed_once_on_the_server_and_sent_with_the_data(client_as, activity):
    client = client_as("auditor")
    page = client.get(PAGE).content.decode()
    charts = {c["id"]: c for c in client.get(DATA).json()["charts"]}

    images = charts["images"]
    tallest = max(images["bars"], key=lambda b: b["height"])
    assert tallest["title"].endswith(": 3 instances received") and images["peak"] == 3
    assert tallest["y"] + tallest["height"] == images["baseline"]
    for chart in charts.values():
        for bar in chart["bars"]:  # the page draws exactly the bars the script is sent
            assert (f'<rect class="s{bar["series"]}" x="{bar["x"]}%" y="{bar["y"]}" '
                    f'width="{bar["width"]}%" height="{bar["height"]}"><title>{bar["title"]}'
                    "</title></rect>") in page
        for tick in chart["ticks"]:
            assert (f'<text x="{tick["x"]}%" y="{tick["y"]}" text-anchor="{tick["anchor"]}">'
                    f'{tick["label"]}</text>') in page


def test_the_page_updates_itself_from_its_own_script(client_as):
    page = client_as("auditor").get(PAGE).content.decode()

    assert 'src="/static/gateway/dashboard.js"' in page
    assert f'data-url="{DATA}"' in page
    script = open(finders.find("gateway/dashboard.js")).read()
    assert "fetch(" in script and "setInterval" in script and "innerHTML" not in script
    assert "Math.max" not in script and "slot" not in script  # it places, it does not compute


def test_the_data_is_never_cached(client_as):
    assert client_as("auditor").get(DATA)["Cache-Control"] == "no-store"


def test_the_dashboard_costs_the_same_queries_for_2_or_30_nodes(client_as, activity):
    client = client_as("auditor")
    client.get(PAGE)
    with CaptureQueriesContext(connection) as two:
        client.get(DATA)
    with CaptureQueriesContext(connection) as two_page:
        client.get(PAGE)
    for i in range(28):
        node = make_node(name=f"N{i:02d}", port=20000 + i)
        make_delivery_row(node, status=DeliveryStatus.FAILED if i % 2 else DeliveryStatus.DEAD)

    with CaptureQueriesContext(connection) as thirty:
        data = client.get(DATA).json()
    with CaptureQueriesContext(connection) as thirty_page:
        page = client.get(PAGE).content.decode()

    assert len(data["nodes"]) == 30 and page.count('<small class="muted mono">') == 30
    assert len(thirty) == len(two) <= 12
    assert len(thirty_page) == len(two_page), [q["sql"] for q in thirty_page.captured_queries]


def test_with_nothing_received_everything_is_zero(client_as):
    data = client_as("auditor").get(DATA).json()

    assert set(data["counts"].values()) == {0}
    assert data["nodes"] == []
    assert "No nodes yet." in client_as("auditor").get(PAGE).content.decode()


def test_rows_just_inside_the_window_count_and_just_outside_do_not(client_as):
    now = timezone.now()
    inside = make_received_instance(received_at=now - timedelta(hours=23, minutes=59))
    outside = make_received_instance(received_at=now - timedelta(hours=24, minutes=1))
    ReceivedStudy.objects.filter(pk=outside.study_id).update(
        last_received_at=now - timedelta(hours=24, minutes=1)
    )

    data = client_as("auditor").get(DATA).json()

    assert data["counts"]["instances_received"] == 1
    assert data["counts"]["studies_received"] == 1
    assert ReceivedInstance.objects.count() == 2 and inside.pk != outside.pk
    assert Delivery.objects.count() == 0

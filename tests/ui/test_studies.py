"""The received studies list and a study's page: filters, per-node delivery summaries computed
per page (not per row), instances with their routing status."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from routing.models import DeliveryStatus, ReceivedInstance, RoutingStatus
from tests.factories import make_delivery_row, make_received_instance, make_received_study
from tests.fixtures_pacs import make_node

pytestmark = pytest.mark.django_db

LIST = reverse("study-list")


def detail(study) -> str:
    return reverse("study-detail", args=[study.pk])


def studies_shown(response) -> list[int]:
    """The study ids the list shows, top to bottom."""
    html = response.content.decode()
    ids, start = [], 0
    while (start := html.find('<tr id="study-', start)) != -1:
        start += len('<tr id="study-')
        ids.append(int(html[start:html.index('"', start)]))
    return ids


@pytest.fixture
def pacs1():
    return make_node(name="PACS1", port=10401)


@pytest.fixture
def pacs2():
    return make_node(name="PACS2", port=10402)


# --- The list ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_the_studies_with_their_delivery_summary(client_as, role, pacs1, pacs2):
    study = make_received_study(patient_name="DOE^JANE", patient_id="PID7",
                                accession_number="ACC7", study_description="CT CHEST",
                                modalities="CT\\SR", study_date="20260316")
    instances = [make_received_instance(study) for _ in range(4)]
    for i in instances[:3]:
        make_delivery_row(pacs1, i, status=DeliveryStatus.DELIVERED)
    make_delivery_row(pacs1, instances[3], status=DeliveryStatus.FAILED)
    make_delivery_row(pacs2, instances[0], status=DeliveryStatus.DEAD)

    response = client_as(role).get(LIST)

    page = response.content.decode()
    assert response.status_code == 200
    for text in ("DOE^JANE", "PID7", "ACC7", "CT CHEST", "CT\\SR", "20260316",
                 '<td class="num">4</td>', "PACS1: 3 delivered, 1 failed", "PACS2: 1 dead"):
        assert text in page
    assert f"/deliveries/?study={study.pk}&amp;node={pacs1.pk}" in page


def test_a_study_without_deliveries_says_none(client_as):
    make_received_instance(routing_status=RoutingStatus.UNMATCHED)

    page = client_as("auditor").get(LIST).content.decode()

    assert '<span class="muted">none</span>' in page


def test_it_lists_the_last_received_first(client_as):
    now = timezone.now()
    old = make_received_study(last_received_at=now - timedelta(hours=2))
    new = make_received_study(last_received_at=now)
    middle = make_received_study(last_received_at=now - timedelta(hours=1))

    assert studies_shown(client_as("auditor").get(LIST)) == [new.pk, middle.pk, old.pk]


def test_it_filters_by_patient_id_or_name_prefix_accession_and_time(client_as):
    now = timezone.now()
    jane = make_received_study(patient_id="PID1", patient_name="DOE^JANE", accession_number="A1",
                               last_received_at=now - timedelta(days=2))
    john = make_received_study(patient_id="PID12", patient_name="DOE^JOHN", accession_number="A2",
                               last_received_at=now - timedelta(hours=1))
    mary = make_received_study(patient_id="X9", patient_name="ROE^MARY", accession_number="A3",
                               last_received_at=now)
    client = client_as("operator")

    def shown(**params):
        response = client.get(LIST + "?" + urlencode(params))
        assert response.status_code == 200
        return studies_shown(response)

    assert shown(patient="PID1") == [jane.pk]  # an ID matches exactly, not as a prefix
    assert shown(patient="doe^jo") == [john.pk]
    assert shown(patient="DOE") == [john.pk, jane.pk]
    assert shown(patient="X9") == [mary.pk]
    assert shown(accession="A3") == [mary.pk]
    assert shown(since=(now - timedelta(hours=2)).isoformat()) == [mary.pk, john.pk]
    assert shown(until=(now - timedelta(days=1)).isoformat()) == [jane.pk]
    assert shown(until=(now - timedelta(days=2)).date().isoformat()) == [jane.pk]  # whole day
    assert shown(since=(now - timedelta(hours=2)).isoformat(), patient="DOE") == [john.pk]


def test_a_bad_date_is_shown_next_to_its_field(client_as):
    make_received_study()

    response = client_as("auditor").get(LIST + "?since=last+week")

    assert studies_shown(response) == []
    assert "Use a date (2026-11-27) or a date and time" in response.content.decode()


def test_the_filters_have_labels(client_as):
    page = client_as("auditor").get(LIST).content.decode()

    for field, label in (("patient", "Patient"), ("accession", "Accession"),
                         ("since", "Received since"), ("until", "Received until")):
        assert f'<label for="id_{field}">{label}</label>' in page


def test_a_page_costs_the_same_queries_for_1_or_30_studies(client_as, pacs1, pacs2):
    client = client_as("auditor")
    study = make_received_study()
    make_delivery_row(pacs1, make_received_instance(study))
    client.get(LIST)
    with CaptureQueriesContext(connection) as one:
        assert len(studies_shown(client.get(LIST))) == 1
    for i in range(29):
        study = make_received_study()
        for node in (pacs1, pacs2) if i % 2 else (pacs1,):
            make_delivery_row(node, make_received_instance(study),
                              status=DeliveryStatus.DELIVERED if i % 3 else DeliveryStatus.DEAD)

    with CaptureQueriesContext(connection) as thirty:
        assert len(studies_shown(client.get(LIST))) == 30

    assert len(thirty) == len(one)


def test_it_pages_fifty_studies_at_a_time(client_as):
    for _ in range(51):
        make_received_study()
    client = client_as("auditor")

    first = client.get(LIST)
    second = client.get(LIST + "?page=2")

    assert len(studies_shown(first)) == 50 and 'rel="next"' in first.content.decode()
    assert len(studies_shown(second)) == 1


# --- A study's page ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_a_study_with_its_instances(client_as, role, pacs1):
    study = make_received_study(patient_name="DOE^JANE", accession_number="ACC9")
    routed = make_received_instance(study, calling_ae="MODALITY7", size=2048)
    unmatched = make_received_instance(study, routing_status=RoutingStatus.UNMATCHED)
    make_delivery_row(pacs1, routed, status=DeliveryStatus.DELIVERED)

    response = client_as(role).get(detail(study))

    page = response.content.decode()
    assert response.status_code == 200
    for text in ("Study ACC9", "DOE^JANE", study.study_instance_uid, routed.sop_instance_uid,
                 unmatched.sop_instance_uid, "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)",
                 "1.2.840.10008.1.2.1", "MODALITY7", "2.0\xa0KB",
                 '<span class="badge UNMATCHED">No rule matched</span>',
                 '<span class="badge ROUTED">Routed</span>', "2 in 1 series"):
        assert text in page


def test_a_study_shows_each_nodes_delivery_state_and_last_error(client_as, pacs1, pacs2):
    study = make_received_study()
    a, b, c = (make_received_instance(study) for _ in range(3))
    make_delivery_row(pacs1, a, status=DeliveryStatus.DELIVERED)
    make_delivery_row(pacs1, b, status=DeliveryStatus.FAILED, last_error="old error")
    make_delivery_row(pacs1, c, status=DeliveryStatus.DEAD,
                      last_error="connection refused to 127.0.0.1:10401")
    make_delivery_row(pacs2, a, status=DeliveryStatus.PENDING)

    page = client_as("auditor").get(detail(study)).content.decode()

    deliveries = reverse("delivery-list")
    assert f'href="{deliveries}?study={study.pk}"' in page
    assert f'href="{deliveries}?study={study.pk}&amp;node={pacs1.pk}&amp;status=DEAD"' in page
    assert '<span class="badge DELIVERED">1 delivered</span>' in page
    assert '<span class="badge FAILED">1 failed</span>' in page
    assert '<span class="badge DEAD">1 dead</span>' in page
    assert '<span class="badge PENDING">1 pending</span>' in page
    node_table = page[page.index("Delivery by node"):page.index("<h2>Instances</h2>")]
    assert "connection refused to 127.0.0.1:10401" in node_table  # the latest error
    assert "old error" not in node_table


def test_a_study_page_costs_the_same_queries_for_1_or_30_instances(client_as, pacs1, pacs2):
    client = client_as("auditor")
    study = make_received_study()
    make_delivery_row(pacs1, make_received_instance(study), last_error="x")
    client.get(detail(study))
    with CaptureQueriesContext(connection) as one:
        client.get(detail(study))
    for i in range(29):
        instance = make_received_instance(study)
        make_delivery_row(pacs1, instance, status=DeliveryStatus.FAILED, last_error="x")
        if i % 2:
            make_delivery_row(pacs2, instance, status=DeliveryStatus.DEAD, last_error="y")

    with CaptureQueriesContext(connection) as thirty:
        page = client.get(detail(study)).content.decode()

    assert page.count('<span class="badge ROUTED">') == 30
    assert len(thirty) == len(one)


def test_a_large_study_pages_its_instances(client_as):
    study = make_received_study()
    now = timezone.now()
    ReceivedInstance.objects.bulk_create(
        ReceivedInstance(study=study, sop_instance_uid=f"{study.study_instance_uid}.{i}",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         series_instance_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2",
                         calling_ae="CT1", size=1, path="/x", received_at=now)
        for i in range(101)
    )
    client = client_as("auditor")

    first = client.get(detail(study)).content.decode()
    last = client.get(detail(study) + "?page=3").content.decode()

    assert first.count("<tr>") - 1 == 50 and 'rel="next"' in first
    assert "101 in 1 series" in first
    assert last.count('class="badge PENDING">Waiting for rules') == 1
    assert 'rel="next"' not in last


def test_an_unknown_study_is_a_404(client_as):
    assert client_as("auditor").get(reverse("study-detail", args=[999999])).status_code == 404

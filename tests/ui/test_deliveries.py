"""The deliveries page: filters, paging cost, and the hand actions (retry, abandon, retry all
failed for a node) with who may do them, what they audit, and that a retry is sent at once."""

from __future__ import annotations

import functools
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from gateway.models import AuditEvent
from routing import delivery, tasks
from routing.models import Delivery, DeliveryStatus
from tests.factories import make_delivery_row, make_received_instance, make_received_study
from tests.fixtures_pacs import make_delivery, make_instance, make_node, wait_until

pytestmark = pytest.mark.django_db

LIST = reverse("delivery-list")


@pytest.fixture
def pacs1():
    return make_node(name="PACS1", port=10401)


@pytest.fixture
def pacs2():
    return make_node(name="PACS2", port=10402)


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    """The node ids the delivery task was asked for (instead of the broker)."""
    calls: list[int] = []
    monkeypatch.setattr(tasks.deliver_node, "delay", calls.append)
    return calls


def delivery_task(node_id: int) -> None:
    tasks.deliver_node.delay(node_id)


def rows_shown(response) -> list[int]:
    """The delivery ids the list shows, top to bottom."""
    html = response.content.decode()
    ids, start = [], 0
    while (start := html.find('id="delivery-', start)) != -1:
        start += len('id="delivery-')
        ids.append(int(html[start:html.index('"', start)]))
    return ids


def post(client, name: str, pk: int, **data):
    return client.post(reverse(name, args=[pk]), data)


# --- The list ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor"])
def test_every_role_sees_the_deliveries(client_as, role, pacs1):
    study = make_received_study(accession_number="ACC42")
    d = make_delivery_row(pacs1, make_received_instance(study), status=DeliveryStatus.FAILED,
                          attempts=3, last_error="connection refused to 127.0.0.1:10401",
                          rule_name="CT to archive")

    response = client_as(role).get(LIST)

    page = response.content.decode()
    assert response.status_code == 200
    assert rows_shown(response) == [d.pk]
    for text in ("ACC42", "PACS1", "CT to archive", "Failed (will retry)",
                 "connection refused to 127.0.0.1:10401", d.instance.sop_instance_uid[-20:]):
        assert text in page


def test_the_actions_are_offered_to_operators_only(client_as, pacs1):
    make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    operator = client_as("operator").get(LIST + f"?node={pacs1.pk}").content.decode()
    auditor = client_as("auditor").get(LIST + f"?node={pacs1.pk}").content.decode()

    for text in (">Retry</button>", ">Abandon</button>", "Retry all failed for PACS1"):
        assert text in operator
        assert text not in auditor


def test_a_delivered_delivery_offers_neither_retry_nor_abandon(client_as, pacs1):
    make_delivery_row(pacs1, status=DeliveryStatus.DELIVERED, delivered_at=timezone.now())

    page = client_as("operator").get(LIST).content.decode()

    assert ">Retry</button>" not in page and ">Abandon</button>" not in page


def test_a_pending_delivery_can_be_abandoned_but_not_retried(client_as, pacs1):
    make_delivery_row(pacs1)

    page = client_as("operator").get(LIST).content.decode()

    assert ">Retry</button>" not in page and ">Abandon</button>" in page


def test_it_filters_by_node_status_since_and_study(client_as, pacs1, pacs2):
    study = make_received_study()
    old = timezone.now() - timedelta(days=3)
    a = make_delivery_row(pacs1, make_received_instance(study), status=DeliveryStatus.DEAD)
    b = make_delivery_row(pacs1, status=DeliveryStatus.FAILED)
    c = make_delivery_row(pacs2, make_received_instance(study), status=DeliveryStatus.PENDING)
    d = make_delivery_row(pacs2, status=DeliveryStatus.DELIVERED, created_at=old)
    e = make_delivery_row(pacs2, status=DeliveryStatus.SENDING)
    client = client_as("auditor")

    def shown(**params):
        response = client.get(LIST + "?" + urlencode(params))
        assert response.status_code == 200
        return rows_shown(response)

    assert shown() == [e.pk, d.pk, c.pk, b.pk, a.pk]
    assert shown(node=pacs1.pk) == [b.pk, a.pk]
    assert shown(status="DEAD") == [a.pk]
    assert shown(status="open") == [e.pk, c.pk, b.pk]
    assert shown(status="open", node=pacs2.pk) == [e.pk, c.pk]
    assert shown(since=(old + timedelta(hours=1)).isoformat()) == [e.pk, c.pk, b.pk, a.pk]
    assert shown(since=(old - timedelta(days=1)).date().isoformat()) == [e.pk, d.pk, c.pk, b.pk,
                                                                      a.pk]
    assert shown(study=study.pk) == [c.pk, a.pk]


def test_a_bad_filter_value_is_shown_next_to_the_field_and_selects_nothing(client_as, pacs1):
    make_delivery_row(pacs1)

    response = client_as("auditor").get(LIST + "?since=yesterday")

    assert rows_shown(response) == []
    assert "Use a date (2026-11-27) or a date and time" in response.content.decode()


def test_the_study_filter_names_the_study(client_as, pacs1):
    study = make_received_study(accession_number="ACC77", patient_name="DOE^JANE")
    make_delivery_row(pacs1, make_received_instance(study))

    page = client_as("auditor").get(LIST + f"?study={study.pk}").content.decode()

    assert "Deliveries of study" in page and "ACC77" in page and "DOE^JANE" in page
    assert reverse("study-detail", args=[study.pk]) in page


def test_a_page_costs_the_same_queries_for_1_or_30_deliveries(client_as, pacs1):
    client = client_as("operator")
    make_delivery_row(pacs1, status=DeliveryStatus.DEAD)
    url = LIST + f"?node={pacs1.pk}"
    client.get(url)  # sessions, content types: warmed up
    with CaptureQueriesContext(connection) as one:
        assert len(rows_shown(client.get(url))) == 1
    for i in range(29):
        node = make_node(name=f"N{i}", port=20000 + i) if i % 2 else pacs1
        make_delivery_row(node, status=DeliveryStatus.FAILED, last_error="x")
    with CaptureQueriesContext(connection) as thirty:
        response = client.get(LIST)
    assert len(rows_shown(response)) == 30
    with CaptureQueriesContext(connection) as filtered:
        client.get(url)
    assert len(thirty) <= len(one)
    assert len(filtered) == len(one)


def test_it_pages_fifty_rows_at_a_time(client_as, pacs1):
    instance = make_received_instance()
    Delivery.objects.bulk_create(
        Delivery(instance=instance, node=pacs1, next_attempt_at=timezone.now()) for _ in range(51)
    )
    client = client_as("auditor")

    first = client.get(LIST)
    second = client.get(LIST + "?page=2")

    assert len(rows_shown(first)) == 50 and 'rel="next"' in first.content.decode()
    assert len(rows_shown(second)) == 1 and 'rel="next"' not in second.content.decode()


# --- Retry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role,user", [("operator", "otto"), ("admin", "ada")])
def test_retrying_a_dead_delivery_makes_it_due_now_and_audits_who(
    client_as, role, user, pacs1, enqueued, django_capture_on_commit_callbacks
):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD, attempts=7,
                          last_error="connection refused",
                          next_attempt_at=timezone.now() - timedelta(days=1))
    before = timezone.now()

    with django_capture_on_commit_callbacks(execute=True):
        response = post(client_as(role), "delivery-retry", d.pk)

    d.refresh_from_db()
    assert response.status_code == 302 and response["Location"] == LIST
    assert (d.status, d.attempts) == (DeliveryStatus.PENDING, 0)
    assert before <= d.next_attempt_at <= timezone.now()
    assert before <= d.retried_at <= timezone.now()
    event = AuditEvent.objects.get(action="delivery.retry", object_id=str(d.pk))
    assert event.actor == f"user:{user}"
    assert event.detail["previous_status"] == DeliveryStatus.DEAD
    assert enqueued == [pacs1.pk]  # the worker is asked now, not at the next sweep


def test_the_retry_message_is_shown_on_the_page_it_came_from(client_as, pacs1, enqueued):
    d = make_delivery_row(pacs1, status=DeliveryStatus.FAILED)
    client = client_as("operator")
    here = LIST + f"?node={pacs1.pk}&status=FAILED"

    response = client.post(reverse("delivery-retry", args=[d.pk]), {"next": here}, follow=True)

    assert response.redirect_chain == [(here, 302)]
    assert f"Delivery {d.pk} to PACS1 queued again." in response.content.decode()


def test_it_never_redirects_to_another_site(client_as, pacs1, enqueued):
    d = make_delivery_row(pacs1, status=DeliveryStatus.FAILED)

    response = post(client_as("operator"), "delivery-retry", d.pk, next="https://evil.example/")

    assert response["Location"] == LIST


def test_the_retry_is_enqueued_only_once_the_change_commits(client_as, pacs1, enqueued,
                                                            django_capture_on_commit_callbacks):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        post(client_as("operator"), "delivery-retry", d.pk)

    assert enqueued == []
    assert len(callbacks) == 1
    callbacks[0]()
    assert enqueued == [pacs1.pk]


def test_an_auditor_cannot_retry(client_as, pacs1, enqueued):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    response = post(client_as("auditor"), "delivery-retry", d.pk)

    d.refresh_from_db()
    assert response.status_code == 403
    assert "This needs the Administrators or Operators role" in response.content.decode()
    assert d.status == DeliveryStatus.DEAD
    assert not AuditEvent.objects.filter(action="delivery.retry").exists()
    assert enqueued == []


def test_a_retry_is_a_post(client_as, pacs1):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    response = client_as("operator").get(reverse("delivery-retry", args=[d.pk]))

    d.refresh_from_db()
    assert response.status_code == 405 and d.status == DeliveryStatus.DEAD


def test_a_delivered_delivery_is_not_retried(client_as, pacs1, enqueued):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DELIVERED, delivered_at=timezone.now())

    response = client_as("operator").post(reverse("delivery-retry", args=[d.pk]), follow=True)

    d.refresh_from_db()
    assert d.status == DeliveryStatus.DELIVERED
    assert f"Delivery {d.pk} was not retried: it is delivered." in response.content.decode()
    assert enqueued == []


def test_a_delivery_whose_file_was_purged_is_not_retried(client_as, pacs1, enqueued):
    instance = make_received_instance(file_deleted_at=timezone.now())
    d = make_delivery_row(pacs1, instance, status=DeliveryStatus.DEAD)

    response = client_as("operator").post(reverse("delivery-retry", args=[d.pk]), follow=True)

    d.refresh_from_db()
    assert d.status == DeliveryStatus.DEAD
    assert "its file has already been deleted by retention" in response.content.decode()


def test_retrying_an_unknown_delivery_is_a_404(client_as):
    assert post(client_as("operator"), "delivery-retry", 999999).status_code == 404


# --- Abandon -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [DeliveryStatus.PENDING, DeliveryStatus.FAILED,
                                    DeliveryStatus.DEAD])
def test_an_operator_abandons_an_open_or_dead_delivery(client_as, pacs1, status):
    d = make_delivery_row(pacs1, status=status)

    response = client_as("operator").post(reverse("delivery-abandon", args=[d.pk]), follow=True)

    d.refresh_from_db()
    assert d.status == DeliveryStatus.ABANDONED
    assert f"Delivery {d.pk} to PACS1 abandoned" in response.content.decode()
    event = AuditEvent.objects.get(action="delivery.abandon", object_id=str(d.pk))
    assert (event.actor, event.detail["previous_status"]) == ("user:otto", status)


def test_the_abandon_button_asks_first(client_as, pacs1):
    d = make_delivery_row(pacs1)

    page = client_as("operator").get(LIST).content.decode()

    assert f'data-confirm="Abandon delivery {d.pk} to PACS1? It will never be sent."' in page


def test_an_auditor_cannot_abandon(client_as, pacs1):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    response = post(client_as("auditor"), "delivery-abandon", d.pk)

    d.refresh_from_db()
    assert response.status_code == 403 and d.status == DeliveryStatus.DEAD
    assert not AuditEvent.objects.filter(action="delivery.abandon").exists()


def test_a_delivered_delivery_is_not_abandoned(client_as, pacs1):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DELIVERED, delivered_at=timezone.now())

    response = client_as("admin").post(reverse("delivery-abandon", args=[d.pk]), follow=True)

    d.refresh_from_db()
    assert d.status == DeliveryStatus.DELIVERED
    assert f"Delivery {d.pk} was not abandoned: it is delivered." in response.content.decode()


# --- Retry all failed for a node -----------------------------------------------------------


def test_retry_all_failed_touches_only_that_nodes_failed_and_dead(
    client_as, pacs1, pacs2, enqueued, django_capture_on_commit_callbacks
):
    failed = make_delivery_row(pacs1, status=DeliveryStatus.FAILED, attempts=2)
    dead = make_delivery_row(pacs1, status=DeliveryStatus.DEAD, attempts=9)
    delivered = make_delivery_row(pacs1, status=DeliveryStatus.DELIVERED)
    abandoned = make_delivery_row(pacs1, status=DeliveryStatus.ABANDONED)
    sending = make_delivery_row(pacs1, status=DeliveryStatus.SENDING, claimed_by="w1")
    elsewhere = make_delivery_row(pacs2, status=DeliveryStatus.DEAD)
    here = LIST + f"?node={pacs1.pk}"

    with django_capture_on_commit_callbacks(execute=True):
        response = client_as("operator").post(
            reverse("node-retry-failed", args=[pacs1.pk]), {"next": here}, follow=True
        )

    statuses = dict(Delivery.objects.values_list("pk", "status"))
    assert statuses == {
        failed.pk: DeliveryStatus.PENDING,
        dead.pk: DeliveryStatus.PENDING,
        delivered.pk: DeliveryStatus.DELIVERED,
        abandoned.pk: DeliveryStatus.ABANDONED,
        sending.pk: DeliveryStatus.SENDING,
        elsewhere.pk: DeliveryStatus.DEAD,
    }
    assert response.redirect_chain == [(here, 302)]
    assert "2 deliveries to PACS1 queued again." in response.content.decode()
    assert set(
        AuditEvent.objects.filter(action="delivery.retry").values_list("object_id", "actor")
    ) == {(str(failed.pk), "user:otto"), (str(dead.pk), "user:otto")}
    assert enqueued == [pacs1.pk]


def test_retry_all_failed_says_when_there_is_nothing_to_retry(client_as, pacs1, enqueued):
    make_delivery_row(pacs1, status=DeliveryStatus.DELIVERED)

    response = client_as("admin").post(reverse("node-retry-failed", args=[pacs1.pk]),
                                       follow=True)

    assert response.redirect_chain == [(LIST + f"?node={pacs1.pk}", 302)]
    assert "No failed or dead deliveries to PACS1 to retry." in response.content.decode()
    assert enqueued == []


def test_the_retry_all_button_counts_what_it_would_retry(client_as, pacs1, pacs2):
    make_delivery_row(pacs1, status=DeliveryStatus.FAILED)
    make_delivery_row(pacs1, status=DeliveryStatus.DEAD)
    make_delivery_row(pacs1, status=DeliveryStatus.DEAD)
    make_delivery_row(pacs2, status=DeliveryStatus.DEAD)

    page = client_as("operator").get(LIST + f"?node={pacs1.pk}").content.decode()

    assert "1 failed, 2 dead" in page
    assert 'data-confirm="Retry every failed and dead delivery to PACS1 now?"' in page


def test_retry_all_failed_works_in_batches_and_says_what_is_left(
    client_as, pacs1, enqueued, monkeypatch, django_capture_on_commit_callbacks
):
    rows = [make_delivery_row(pacs1, status=DeliveryStatus.DEAD) for _ in range(5)]
    monkeypatch.setattr(delivery, "retry_node",
                        functools.partial(delivery.retry_node, batch=2, seconds=0))

    with django_capture_on_commit_callbacks(execute=True):
        response = client_as("operator").post(reverse("node-retry-failed", args=[pacs1.pk]),
                                              follow=True)

    page = response.content.decode()
    statuses = [Delivery.objects.get(pk=r.pk).status for r in rows]
    assert statuses == [DeliveryStatus.PENDING] * 2 + [DeliveryStatus.DEAD] * 3  # oldest first
    assert "2 deliveries to PACS1 queued again." in page
    assert "3 deliveries to PACS1 are still failed or dead: press “Retry all failed” again" in page


def test_retry_node_commits_and_enqueues_each_batch(pacs1, enqueued,
                                                    django_capture_on_commit_callbacks):
    rows = [make_delivery_row(pacs1, status=DeliveryStatus.FAILED) for _ in range(5)]
    purged = make_delivery_row(pacs1, make_received_instance(file_deleted_at=timezone.now()),
                               status=DeliveryStatus.DEAD)

    with django_capture_on_commit_callbacks(execute=True):
        retried = delivery.retry_node(pacs1.pk, delivery_task, "user:otto", batch=2)

    assert retried == [r.pk for r in rows]
    assert enqueued == [pacs1.pk] * 3
    assert Delivery.objects.get(pk=purged.pk).status == DeliveryStatus.DEAD


def test_an_auditor_cannot_retry_all_failed(client_as, pacs1, enqueued):
    d = make_delivery_row(pacs1, status=DeliveryStatus.DEAD)

    response = post(client_as("auditor"), "node-retry-failed", pacs1.pk)

    d.refresh_from_db()
    assert response.status_code == 403 and d.status == DeliveryStatus.DEAD
    assert enqueued == []


# --- End to end: a retry from the page reaches the PACS ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_dead_delivery_retried_on_the_page_is_sent_at_once(
    tmp_path, orthanc, start_worker, client_as
):
    start_worker(DELIVERY_SWEEP_SECONDS="3600")  # only the task enqueued by the retry can send
    node = make_node(orthanc)
    d = make_delivery(make_instance(tmp_path), node, status=DeliveryStatus.DEAD, attempts=12,
                      last_error="connection refused")

    response = post(client_as("operator"), "delivery-retry", d.pk)

    assert response.status_code == 302
    wait_until(
        lambda: Delivery.objects.get(pk=d.pk).status == DeliveryStatus.DELIVERED, 60,
        "the retried delivery to be DELIVERED",
    )
    assert set(orthanc.instances()) == {d.instance.sop_instance_uid}

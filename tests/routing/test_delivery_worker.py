"""Delivery through real Celery workers (with beat) and the tests' own Redis, to Orthanc, under the
faults a gateway meets: the PACS down, a worker killed mid-send, Redis losing its queue, a
delivery given up on and retried by hand, and several workers competing for one node."""

from __future__ import annotations

import threading
from datetime import timedelta
from io import BytesIO

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone
from pydicom import dcmread

from gateway.models import AuditEvent
from routing.models import Delivery, DeliveryStatus
from routing.tasks import deliver_node
from tests.fixtures_pacs import make_delivery, make_instance, make_node, wait_until
from tests.fixtures_storage import dcmsend, make_rule, sample_file

pytestmark = pytest.mark.django_db(transaction=True)


def route(tmp_path, node, count: int, **fields) -> list[Delivery]:
    """What the rules stage does: write the rows, and enqueue the node once they commit."""
    with transaction.atomic():
        rows = [make_delivery(make_instance(tmp_path), node, **fields) for _ in range(count)]
        deliver_node.delay_on_commit(node.pk)
    return rows


def statuses(node) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Delivery.objects.filter(node=node).values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def all_delivered(node, count: int):
    return statuses(node) == {DeliveryStatus.DELIVERED: count}


def sop_uids(rows) -> set[str]:
    return {d.instance.sop_instance_uid for d in rows}


def test_deliveries_enqueued_on_commit_reach_the_pacs(tmp_path, orthanc, start_worker):
    start_worker(DELIVERY_SWEEP_SECONDS="3600")  # only the task enqueued on commit can do it
    node = make_node(orthanc)

    rows = route(tmp_path, node, 5)

    wait_until(lambda: all_delivered(node, 5), 60, "the deliveries to be DELIVERED")
    assert set(orthanc.instances()) == sop_uids(rows)


def test_a_pacs_that_is_down_gets_everything_once_it_is_up(tmp_path, start_orthanc, start_worker):
    pacs = start_orthanc(start=False)
    node = make_node(pacs)
    start_worker()

    rows = route(tmp_path, node, 4)

    wait_until(lambda: statuses(node) == {DeliveryStatus.FAILED: 4}, 60, "failed attempts")
    for row in Delivery.objects.filter(node=node):
        assert row.attempts >= 1
        assert row.last_error == f"connection refused to 127.0.0.1:{pacs.dicom_port}"
        if row.status == DeliveryStatus.FAILED:  # not claimed again meanwhile
            wait = row.next_attempt_at - row.updated_at
            assert timedelta(seconds=1) <= wait <= timedelta(seconds=2)  # the worker's backoff

    pacs.start()

    wait_until(lambda: all_delivered(node, 4), 60, "delivery once the PACS is up")
    assert set(pacs.instances()) == sop_uids(rows)
    assert sorted(pacs.receptions()) == sorted(sop_uids(rows))


def test_a_worker_killed_mid_send_loses_nothing_and_resends_nothing_delivered(
    tmp_path, orthanc, start_worker
):
    node = make_node(orthanc, max_associations=1)
    first = start_worker(concurrency=1)
    rows = route(tmp_path, node, 200)

    def mid_send():
        counts = statuses(node)
        return (
            counts.get(DeliveryStatus.DELIVERED, 0) >= 10
            and counts.get(DeliveryStatus.SENDING, 0) > 0
        )

    wait_until(mid_send, 60, "the worker to be sending", interval=0.02)
    first.kill()
    delivered_before = set(
        Delivery.objects.filter(node=node, status=DeliveryStatus.DELIVERED).values_list(
            "instance__sop_instance_uid", flat=True
        )
    )
    assert Delivery.objects.filter(node=node, status=DeliveryStatus.SENDING).exists()

    start_worker(concurrency=1)

    wait_until(lambda: all_delivered(node, 200), 90, "the sweep to take the claims back")
    assert set(orthanc.instances()) == sop_uids(rows)
    receptions = orthanc.receptions()
    assert all(receptions.count(uid) == 1 for uid in delivered_before)


@pytest.mark.parametrize("loss", ["restart", "flushall"])
def test_deliveries_survive_redis_losing_its_queue(
    tmp_path, orthanc, start_worker, celery_broker, loss
):
    node = make_node(orthanc)
    rows = route(tmp_path, node, 3)
    assert celery_broker.queued() == 1
    if loss == "restart":
        celery_broker.restart()
    else:
        celery_broker.client().flushall()
    assert celery_broker.queued() == 0

    start_worker()

    wait_until(lambda: all_delivered(node, 3), 60, "the sweep to find the deliveries")
    assert set(orthanc.instances()) == sop_uids(rows)


def test_a_dead_delivery_retried_by_hand_is_delivered(tmp_path, start_orthanc, start_worker):
    pacs = start_orthanc(start=False)
    node = make_node(pacs)
    start_worker(DELIVERY_GIVE_UP_HOURS="1")
    with transaction.atomic():
        (row,) = route(tmp_path, node, 1)
        Delivery.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(hours=2))
    wait_until(lambda: statuses(node) == {DeliveryStatus.DEAD: 1}, 60, "the delivery to die")
    pacs.start()

    call_command("retry_deliveries", "--node", node.name, "--actor", "user:alice")

    wait_until(lambda: all_delivered(node, 1), 60, "the retried delivery")
    row.refresh_from_db()
    assert row.attempts == 1  # reset by the retry, then one successful attempt
    assert set(pacs.instances()) == {row.instance.sop_instance_uid}
    event = AuditEvent.objects.get(action="delivery.retry")
    assert (event.actor, event.object_id, event.detail["previous_status"]) == (
        "user:alice",
        str(row.pk),
        DeliveryStatus.DEAD,
    )


class HolderSampler:
    """Counts, every few milliseconds, the distinct holders of a node's SENDING rows: its
    open associations."""

    def __init__(self, node) -> None:
        self.node, self.seen = node, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        try:
            while not self._done.is_set():
                self.seen.append(
                    Delivery.objects.filter(node=self.node, status=DeliveryStatus.SENDING)
                    .values("claimed_by").distinct().count())
                self._done.wait(0.005)
        finally:
            connection.close()

    def __enter__(self) -> HolderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def test_a_node_gets_no_more_associations_than_it_allows(tmp_path, orthanc, start_worker):
    node = make_node(orthanc, max_associations=1)
    start_worker(concurrency=2)
    start_worker(concurrency=2)

    with HolderSampler(node) as holders:
        rows = route(tmp_path, node, 150)
        for _ in range(7):
            deliver_node.delay(node.pk)
        wait_until(lambda: all_delivered(node, 150), 90, "the deliveries")

    assert max(holders.seen) == 1
    assert set(orthanc.instances()) == sop_uids(rows)


def test_a_backlog_goes_out_over_as_many_associations_as_the_node_allows(
    tmp_path, orthanc, start_worker
):
    node = make_node(orthanc, max_associations=2)
    start_worker(concurrency=3, DELIVERY_SWEEP_SECONDS="3600")  # no task but the first

    with HolderSampler(node) as holders:
        rows = route(tmp_path, node, 300)  # one task, enqueued on commit
        wait_until(lambda: all_delivered(node, 300), 90, "the deliveries")

    assert max(holders.seen) == 2
    assert set(orthanc.instances()) == sop_uids(rows)


def test_a_study_sent_to_the_gateway_is_forwarded_by_its_rule(
    tmp_path, orthanc, start_worker, storage_server
):
    """End to end: dcmsend -> the gateway's storage SCP -> rules -> a worker -> Orthanc."""
    node = make_node(orthanc)
    make_rule(
        "to PACS1",
        destinations=[node],
        coerce=[{"attribute": "InstitutionName", "action": "set", "value": "Forwarded"}],
    )
    start_worker()
    files = [sample_file(kind, tmp_path / "modality") for kind in ("explicit", "jpeg_baseline")]

    sent = dcmsend(storage_server.port, *files)

    assert sent.returncode == 0, sent.output
    wait_until(lambda: all_delivered(node, 2), 60, "the forwarded study")
    stored = orthanc.instances()
    for path in files:
        ours = dcmread(path)
        orthanc_id = stored[ours.SOPInstanceUID]
        arrived = dcmread(BytesIO(orthanc.file(orthanc_id)))
        assert arrived.InstitutionName == "Forwarded"
        assert arrived.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
        assert arrived.PixelData == ours.PixelData


def test_commits_while_a_run_is_to_come_queue_one_task_and_lose_nothing(
    tmp_path, orthanc, celery_broker, start_worker
):
    from routing.routing import enqueue_nodes

    node = make_node(orthanc)
    rows = []
    for _ in range(5):  # five instances stored one after another, as a modality sends them
        with transaction.atomic():
            rows.append(make_delivery(make_instance(tmp_path), node))
            transaction.on_commit(lambda: enqueue_nodes([node.pk]))
    assert celery_broker.queued() == 1  # the first commit's task will claim them all

    start_worker(DELIVERY_SWEEP_SECONDS="3600")  # only the tasks can deliver them
    wait_until(lambda: all_delivered(node, 5), 60, "the five deliveries to be DELIVERED")

    # The run has ended or is about to: a later commit is delivered either by its last
    # look or by a task of its own.
    with transaction.atomic():
        rows.append(make_delivery(make_instance(tmp_path), node))
        transaction.on_commit(lambda: enqueue_nodes([node.pk]))
    wait_until(lambda: all_delivered(node, 6), 60, "the sixth delivery to be DELIVERED")
    assert set(orthanc.instances()) == sop_uids(rows)

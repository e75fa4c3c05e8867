"""The delivery rows' life without a network: claims, the association limit, backoff and giving
up, the sweep, retention, and retrying or abandoning by hand."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from gateway.models import AuditEvent
from routing import delivery, scu
from routing.models import Delivery, DeliveryStatus, ReceivedInstance
from routing.routing import enqueue_nodes
from tests.fixtures_pacs import make_delivery, make_instance, make_node

pytestmark = pytest.mark.django_db


@pytest.fixture
def node():
    return make_node(name="PACS1", port=1, max_associations=2)


def pending(tmp_path, node, count: int = 1, **fields) -> list[Delivery]:
    return [make_delivery(make_instance(tmp_path), node, **fields) for _ in range(count)]


def refresh(rows):
    return [Delivery.objects.get(pk=row.pk) for row in rows]


class TestClaim:
    def test_it_claims_due_deliveries_once(self, tmp_path, node):
        rows = pending(tmp_path, node, 3)

        first = delivery.claim(node.pk, "holder-a")
        second = delivery.claim(node.pk, "holder-b")

        assert [c.delivery.pk for c in first] == [r.pk for r in rows]
        assert second == []
        assert {(d.status, d.claimed_by) for d in refresh(rows)} == {
            (DeliveryStatus.SENDING, "holder-a")
        }

    def test_a_claimed_delivery_reads_its_other_fields_as_they_are_stored(self, tmp_path, node):
        (row,) = pending(tmp_path, node, 1, status=DeliveryStatus.FAILED, attempts=3,
                         last_error="connection refused",
                         coerce=[{"attribute": "InstitutionName", "action": "remove"}])

        (claimed,) = delivery.claim(node.pk, "holder-a")

        d = claimed.delivery
        assert (claimed.previous_status, d.status, d.coerce) == (
            DeliveryStatus.FAILED, DeliveryStatus.SENDING,
            [{"attribute": "InstitutionName", "action": "remove"}])
        assert (d.attempts, d.last_error, d.claimed_by) == (3, "connection refused", "holder-a")
        assert (d.instance.path, d.instance.sop_instance_uid) == (
            row.instance.path, row.instance.sop_instance_uid)

    def test_it_claims_nothing_that_is_not_due_yet(self, tmp_path, node):
        pending(tmp_path, node, 1, next_attempt_at=timezone.now() + timedelta(minutes=5))
        pending(tmp_path, node, 1, status=DeliveryStatus.DEAD)
        pending(tmp_path, node, 1, status=DeliveryStatus.DELIVERED)

        assert delivery.claim(node.pk, "holder-a") == []

    def test_it_claims_nothing_for_a_disabled_node(self, tmp_path, node):
        rows = pending(tmp_path, node, 2)
        node.enabled = False
        node.save()

        assert delivery.claim(node.pk, "holder-a") == []
        assert {(d.status, d.attempts) for d in refresh(rows)} == {(DeliveryStatus.PENDING, 0)}

    def test_it_gives_no_slot_beyond_max_associations(self, tmp_path, node):
        pending(tmp_path, node, 5)

        a = delivery.claim(node.pk, "holder-a", limit=1)
        b = delivery.claim(node.pk, "holder-b", limit=1)
        c = delivery.claim(node.pk, "holder-c", limit=1)
        a_again = delivery.claim(node.pk, "holder-a", limit=1)

        assert (len(a), len(b), c, len(a_again)) == (1, 1, [], 1)

    @pytest.mark.parametrize("max_associations, held_by_others, asks", [
        (2, 0, True), (1, 0, False), (3, 2, False), (3, 1, True)])
    def test_a_full_claim_asks_for_another_run_while_the_node_allows_one(
        self, tmp_path, max_associations, held_by_others, asks
    ):
        node = make_node(port=1, max_associations=max_associations)  # nobody answers
        pending(tmp_path, node, held_by_others + delivery.BATCH_SIZE + 3)
        for other in range(held_by_others):
            delivery.claim(node.pk, f"other-{other}", limit=1)
        asked = []

        run = delivery.deliver_to_node(node.pk, asked.append)

        assert run.failed == delivery.BATCH_SIZE
        assert asked == ([node.pk] if asks else [])

    def test_a_run_asks_again_only_once_the_run_it_asked_for_has_started(self, tmp_path):
        node = make_node(port=1, max_associations=3)
        pending(tmp_path, node, 3 * delivery.BATCH_SIZE)
        asked = []
        run = delivery.DeliveryRun(enqueue=asked.append)
        delivery.claim(node.pk, run.holder)

        delivery._ask_for_help(node, run)
        delivery._ask_for_help(node, run)  # the task asked for has not started: no other
        assert asked == [node.pk]

        delivery.claim(node.pk, "the-run-asked-for")
        delivery._ask_for_help(node, run)
        delivery._ask_for_help(node, run)
        assert asked == [node.pk, node.pk]

        delivery.claim(node.pk, "a-third-run")  # three holders: as many as the node allows
        delivery._ask_for_help(node, run)
        assert asked == [node.pk, node.pk]

    def test_a_claim_short_of_a_batch_asks_for_no_other_run(self, tmp_path, node):
        pending(tmp_path, node, delivery.BATCH_SIZE - 1)
        asked = []

        run = delivery.deliver_to_node(node.pk, asked.append)

        assert (run.failed, asked) == (delivery.BATCH_SIZE - 1, [])

    def test_a_holder_whose_lease_expired_holds_no_slot(self, tmp_path, node, settings):
        long_ago = timezone.now() - timedelta(seconds=settings.DELIVERY_LEASE_SECONDS + 1)
        pending(tmp_path, node, 3, next_attempt_at=long_ago)
        assert len(delivery.claim(node.pk, "dead-worker-1", limit=1, now=long_ago)) == 1
        assert len(delivery.claim(node.pk, "dead-worker-2", limit=1, now=long_ago)) == 1

        assert len(delivery.claim(node.pk, "holder-a", limit=1)) == 1

    def test_release_puts_rows_back_as_they_were(self, tmp_path, node):
        failed = pending(tmp_path, node, 1, status=DeliveryStatus.FAILED, attempts=2)
        fresh = pending(tmp_path, node, 1)
        claims = delivery.claim(node.pk, "holder-a")

        delivery.release(claims, "holder-a")

        assert [(d.status, d.attempts, d.claimed_by) for d in refresh(failed + fresh)] == [
            (DeliveryStatus.FAILED, 2, ""),
            (DeliveryStatus.PENDING, 0, ""),
        ]


class TestOutcome:
    def test_retry_delay_doubles_up_to_the_maximum(self, settings):
        settings.DELIVERY_RETRY_BASE_SECONDS = 30
        settings.DELIVERY_RETRY_MAX_SECONDS = 3600

        delays = [delivery.retry_delay(n).total_seconds() for n in (1, 2, 3, 7, 8, 500)]

        assert delays == [30, 60, 120, 1920, 3600, 3600]

    def test_a_failure_is_retried_after_the_backoff(self, tmp_path, node, settings):
        settings.DELIVERY_RETRY_BASE_SECONDS = 30
        (row,) = pending(tmp_path, node, 1, attempts=2, status=DeliveryStatus.FAILED)
        delivery.claim(node.pk, "holder-a")
        now = timezone.now()

        status = delivery.record_failure(row.pk, "holder-a", "connection refused to x:1", now)

        row.refresh_from_db()
        assert (status, row.status, row.attempts, row.last_error, row.claimed_by) == (
            DeliveryStatus.FAILED,
            DeliveryStatus.FAILED,
            3,
            "connection refused to x:1",
            "",
        )
        assert row.next_attempt_at == now + timedelta(seconds=120)

    def test_it_gives_up_after_the_give_up_time(self, tmp_path, node, settings):
        settings.DELIVERY_GIVE_UP_HOURS = 24
        (row,) = pending(tmp_path, node, 1)
        Delivery.objects.filter(pk=row.pk).update(
            created_at=timezone.now() - timedelta(hours=24, minutes=1)
        )
        delivery.claim(node.pk, "holder-a")

        delivery.record_failure(row.pk, "holder-a", "connection refused to x:1")

        row.refresh_from_db()
        assert (row.status, row.attempts) == (DeliveryStatus.DEAD, 1)
        assert AuditEvent.objects.filter(action="delivery.dead", object_id=str(row.pk)).exists()

    def test_an_outcome_from_a_holder_that_lost_its_claim_changes_nothing(self, tmp_path, node):
        (row,) = pending(tmp_path, node, 1)
        delivery.claim(node.pk, "holder-a")

        assert delivery.record_failure(row.pk, "holder-b", "late") == ""
        row.refresh_from_db()
        assert (row.status, row.claimed_by, row.attempts) == (DeliveryStatus.SENDING, "holder-a", 0)

    def test_a_delivered_group_is_recorded_with_one_audit_event(self, tmp_path, node):
        rows = pending(tmp_path, node, 3, attempts=1)
        delivery.claim(node.pk, "holder-a")
        now = timezone.now()

        changed = delivery.record_delivered([r.pk for r in reversed(rows)], "holder-a", now,
                                            node=node)

        assert changed == 3
        assert {(d.status, d.attempts, d.delivered_at, d.claimed_by, d.claimed_at)
                for d in refresh(rows)} == {(DeliveryStatus.DELIVERED, 2, now, "", None)}
        (event,) = AuditEvent.objects.filter(action="delivery.delivered")
        assert (event.object_id, event.detail) == (
            str(node.pk), {"count": 3, "deliveries": [r.pk for r in rows]})

    def test_a_delivery_the_sweep_took_back_meanwhile_is_still_recorded(self, tmp_path, node):
        rows = pending(tmp_path, node, 2)
        delivery.claim(node.pk, "holder-a")
        Delivery.objects.filter(pk=rows[0].pk).update(
            status=DeliveryStatus.PENDING, claimed_by="", claimed_at=None)

        assert delivery.record_delivered([r.pk for r in rows], "holder-a") == 2
        assert {d.status for d in refresh(rows)} == {DeliveryStatus.DELIVERED}

    def test_a_delivery_another_holder_claimed_since_is_left_to_it(self, tmp_path, node):
        rows = pending(tmp_path, node, 2)
        delivery.claim(node.pk, "holder-a")
        Delivery.objects.filter(pk=rows[0].pk).update(claimed_by="holder-b")
        Delivery.objects.filter(pk=rows[1].pk).update(status=DeliveryStatus.DEAD)

        assert delivery.record_delivered([r.pk for r in rows], "holder-a") == 0
        assert [(d.status, d.claimed_by, d.attempts) for d in refresh(rows)] == [
            (DeliveryStatus.SENDING, "holder-b", 0), (DeliveryStatus.DEAD, "holder-a", 0)]
        assert not AuditEvent.objects.filter(action="delivery.delivered").exists()

    def test_a_delivery_for_an_older_version_is_superseded(self, tmp_path, node):
        (row,) = pending(tmp_path, node, 1)
        ReceivedInstance.objects.filter(pk=row.instance_id).update(version=2)
        claims = delivery.claim(node.pk, "holder-a")

        assert delivery.supersede(claims, "holder-a") == []
        row.refresh_from_db()
        assert row.status == DeliveryStatus.ABANDONED
        assert "received again (version 2" in row.last_error


class TestSweep:
    def test_it_takes_back_expired_claims_and_enqueues_their_node(self, tmp_path, node, settings):
        long_ago = timezone.now() - timedelta(seconds=settings.DELIVERY_LEASE_SECONDS + 5)
        rows = pending(tmp_path, node, 2, next_attempt_at=long_ago)
        assert len(delivery.claim(node.pk, "dead-worker", now=long_ago)) == 2
        enqueued: list[int] = []

        result = delivery.sweep(enqueued.append)

        assert result.taken_back == 2
        assert enqueued == [node.pk]
        assert {(d.status, d.claimed_by, d.attempts) for d in refresh(rows)} == {
            (DeliveryStatus.PENDING, "", 0)
        }

    def test_it_leaves_live_claims_and_finished_rows_alone(self, tmp_path, node):
        live = pending(tmp_path, node, 1)
        delivery.claim(node.pk, "live-worker")
        done = pending(
            tmp_path,
            node,
            1,
            status=DeliveryStatus.DELIVERED,
            next_attempt_at=timezone.now() - timedelta(hours=1),
        )
        dead = pending(tmp_path, node, 1, status=DeliveryStatus.DEAD)
        enqueued: list[int] = []

        result = delivery.sweep(enqueued.append)

        assert (result.taken_back, enqueued) == (0, [])
        assert [d.status for d in refresh(live + done + dead)] == [
            DeliveryStatus.SENDING,
            DeliveryStatus.DELIVERED,
            DeliveryStatus.DEAD,
        ]

    def test_it_enqueues_as_many_tasks_as_the_node_can_use(self, tmp_path, node):
        other = make_node(name="PACS2", port=2, max_associations=4)
        disabled = make_node(name="OFF", port=3, enabled=False)
        pending(tmp_path, node, delivery.BATCH_SIZE * 3)
        pending(tmp_path, other, 1)
        pending(tmp_path, disabled, 1)
        enqueued: list[int] = []

        delivery.sweep(enqueued.append)

        assert sorted(enqueued) == sorted([node.pk, node.pk, other.pk])


class TestRetention:
    def old(self, instance, settings):
        ReceivedInstance.objects.filter(pk=instance.pk).update(
            received_at=timezone.now() - timedelta(hours=settings.GATEWAY_RETENTION_HOURS + 1)
        )
        return instance

    def test_it_deletes_a_file_every_node_has(self, tmp_path, node, settings):
        instance = self.old(make_instance(tmp_path), settings)
        make_delivery(instance, node, status=DeliveryStatus.DELIVERED)
        make_delivery(instance, make_node(name="PACS2", port=2), status=DeliveryStatus.ABANDONED)

        assert delivery.purge_delivered_files() == 1

        instance.refresh_from_db()
        assert instance.file_deleted_at is not None
        assert not delivery.instance_path(instance).exists()
        assert AuditEvent.objects.filter(action="retention.purge", actor="system").exists()

    @pytest.mark.parametrize(
        "status",
        [
            DeliveryStatus.PENDING,
            DeliveryStatus.FAILED,
            DeliveryStatus.SENDING,
            DeliveryStatus.DEAD,
        ],
    )
    def test_it_keeps_a_file_a_node_still_needs(self, tmp_path, node, settings, status):
        instance = self.old(make_instance(tmp_path), settings)
        make_delivery(instance, node, status=DeliveryStatus.DELIVERED)
        make_delivery(instance, make_node(name="PACS2", port=2), status=status)

        assert delivery.purge_delivered_files() == 0
        assert delivery.instance_path(instance).exists()

    def test_it_keeps_unrouted_and_unmatched_instances_and_recent_files(
        self, tmp_path, node, settings
    ):
        unmatched = self.old(make_instance(tmp_path), settings)
        ReceivedInstance.objects.filter(pk=unmatched.pk).update(routing_status="UNMATCHED")
        recent = make_instance(tmp_path)
        make_delivery(recent, node, status=DeliveryStatus.DELIVERED)

        assert delivery.purge_delivered_files() == 0
        assert delivery.instance_path(unmatched).exists()
        assert delivery.instance_path(recent).exists()


class TestRetryByHand:
    def dead(self, tmp_path, node, count=1):
        return pending(
            tmp_path,
            node,
            count,
            status=DeliveryStatus.DEAD,
            attempts=9,
            last_error="connection refused to 127.0.0.1:1",
        )

    def test_it_retries_the_dead_deliveries_of_a_node_now(
        self, tmp_path, node, celery_broker, django_capture_on_commit_callbacks
    ):
        rows = self.dead(tmp_path, node, 2)
        other = self.dead(tmp_path, make_node(name="PACS2", port=2))

        with django_capture_on_commit_callbacks(execute=True):
            call_command("retry_deliveries", "--node", "PACS1", "--actor", "user:alice")

        assert {(d.status, d.attempts) for d in refresh(rows)} == {(DeliveryStatus.PENDING, 0)}
        assert all(d.retried_at and d.next_attempt_at <= timezone.now() for d in refresh(rows))
        assert refresh(other)[0].status == DeliveryStatus.DEAD
        events = AuditEvent.objects.filter(action="delivery.retry")
        assert {(e.actor, e.object_id, e.detail["attempts"]) for e in events} == {
            ("user:alice", str(r.pk), 9) for r in rows
        }
        assert celery_broker.queued() == 1  # one deliver_node task for the node, on commit

    def test_it_retries_by_id_and_all_dead(
        self, tmp_path, node, celery_broker, django_capture_on_commit_callbacks
    ):
        first, second = self.dead(tmp_path, node, 2)
        delivered = pending(tmp_path, node, 1, status=DeliveryStatus.DELIVERED)[0]

        with django_capture_on_commit_callbacks(execute=True):
            call_command("retry_deliveries", "--id", str(first.pk), str(delivered.pk))
        assert [d.status for d in refresh([first, second, delivered])] == [
            DeliveryStatus.PENDING,
            DeliveryStatus.DEAD,
            DeliveryStatus.DELIVERED,
        ]
        assert AuditEvent.objects.get(action="delivery.retry").actor == "system"

        with django_capture_on_commit_callbacks(execute=True):
            call_command("retry_deliveries", "--all-dead")
        assert refresh([second])[0].status == DeliveryStatus.PENDING

    def test_it_abandons_deliveries(self, tmp_path, node):
        dead = self.dead(tmp_path, node)
        waiting = pending(tmp_path, node, 1)
        delivered = pending(tmp_path, node, 1, status=DeliveryStatus.DELIVERED)

        call_command("retry_deliveries", "--node", "PACS1", "--abandon")

        assert [d.status for d in refresh(dead + waiting + delivered)] == [
            DeliveryStatus.ABANDONED,
            DeliveryStatus.ABANDONED,
            DeliveryStatus.DELIVERED,
        ]
        assert AuditEvent.objects.filter(action="delivery.abandon").count() == 2

    def test_it_does_not_retry_a_delivery_whose_file_is_gone(self, tmp_path, node):
        (row,) = self.dead(tmp_path, node)
        ReceivedInstance.objects.filter(pk=row.instance_id).update(file_deleted_at=timezone.now())

        call_command("retry_deliveries", "--all-dead")

        assert refresh([row])[0].status == DeliveryStatus.DEAD

    def test_it_asks_which_deliveries(self):
        with pytest.raises(CommandError, match="say which"):
            call_command("retry_deliveries")
        with pytest.raises(CommandError, match="no such node: NOPE"):
            call_command("retry_deliveries", "--node", "NOPE")


def test_the_sweep_task_routes_instances_whose_routing_was_lost(
    tmp_path, node, celery_broker, django_capture_on_commit_callbacks
):
    from routing.tasks import sweep_deliveries
    from tests.fixtures_storage import make_rule

    make_rule("everything to PACS1", destinations=[node])
    instance = make_instance(tmp_path)
    ReceivedInstance.objects.filter(pk=instance.pk).update(
        received_at=timezone.now() - timedelta(minutes=5)
    )

    with django_capture_on_commit_callbacks(execute=True):
        sweep_deliveries()

    (row,) = Delivery.objects.filter(instance=instance)
    assert (row.node, row.status, row.rule_name) == (
        node,
        DeliveryStatus.PENDING,
        "everything to PACS1",
    )


class TestPresentationContexts:
    CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"

    def test_each_sop_class_gets_its_own_syntaxes_and_the_uncompressed_fallbacks(self):
        plan = scu.plan_contexts(
            [
                (self.CT, self.JPEG),
                (self.CT, self.EXPLICIT),
                (self.MR, self.IMPLICIT),
                (self.CT, self.JPEG),
            ]
        )

        assert plan == {
            self.CT: [self.EXPLICIT, self.JPEG, self.IMPLICIT],
            self.MR: [self.IMPLICIT, self.EXPLICIT],
        }

    def test_it_never_proposes_more_than_128_contexts(self):
        pairs = [(f"1.2.3.{n}", self.JPEG) for n in range(100)]

        plan = scu.plan_contexts(pairs)

        assert sum(len(syntaxes) for syntaxes in plan.values()) == 126  # 42 classes x 3
        assert list(plan) == [f"1.2.3.{n}" for n in range(42)]


class TestQueuedMark:
    """A node that a run will still look at gets no new task per commit; every run that had
    a slot clears the mark as it ends and gives what is due by then a task."""

    def test_commits_while_a_task_waits_enqueue_no_second_one(self, node, celery_broker):
        enqueue_nodes([node.pk])
        enqueue_nodes([node.pk])
        assert celery_broker.queued() == 1

    def test_a_run_with_nothing_to_send_clears_the_mark(self, node, celery_broker):
        enqueue_nodes([node.pk])
        delivery.deliver_to_node(node.pk)
        enqueue_nodes([node.pk])
        assert celery_broker.queued() == 2

    def test_a_run_without_a_slot_leaves_the_mark_to_the_run_that_has_it(
        self, tmp_path, celery_broker
    ):
        node = make_node(max_associations=1)
        pending(tmp_path, node, 2)
        assert len(delivery.claim(node.pk, "sending-holder", limit=1)) == 1
        enqueue_nodes([node.pk])
        run = delivery.deliver_to_node(node.pk)
        enqueue_nodes([node.pk])
        assert (run.associations, celery_broker.queued()) == (0, 1)

    def test_a_run_that_ends_with_deliveries_due_enqueues_a_task_for_them(
        self, tmp_path, node, celery_broker
    ):
        pending(tmp_path, node, delivery.BATCH_SIZE + 3)  # the node's port answers nobody
        enqueue_nodes([node.pk])
        run = delivery.deliver_to_node(node.pk)
        assert run.failed == delivery.BATCH_SIZE
        assert celery_broker.queued() == 2  # a task for the three it never claimed

    def test_marks_go_on_after_redis_restarts(self, node, celery_broker):
        enqueue_nodes([node.pk])
        celery_broker.restart()  # empty, and every connection made before is closed

        enqueue_nodes([node.pk])
        enqueue_nodes([node.pk])

        # One task and one mark again: marks were not paused, as for a Redis that fails.
        assert celery_broker.queued() == 1
        assert celery_broker.client().exists(f"gateway:delivery-queued:{node.pk}")

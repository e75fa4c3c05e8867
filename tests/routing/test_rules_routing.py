"""Routing decisions: received instances become Delivery rows by the rules, the nodes
concerned are handed to the delivery tasks after commit, per-study rules wait for quiet."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from routing.models import (
    Delivery,
    DeliveryStatus,
    ReceivedInstance,
    ReceivedStudy,
    RoutingMode,
    RoutingStatus,
)
from routing.routing import route_instance, route_pending_instances, route_quiet_studies
from tests.fixtures_storage import make_node, make_rule, received_instance

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("enqueued")]

CT = {"attribute": "Modality", "op": "equals", "value": "CT"}
MR = {"attribute": "Modality", "op": "equals", "value": "MR"}


def deliveries(instance) -> list[tuple[str, str, list, int]]:
    return sorted(
        (d.node.name, d.rule_name, d.coerce, d.instance_version)
        for d in Delivery.objects.filter(instance=instance).select_related("node")
    )


def test_a_matching_rule_creates_a_pending_delivery_due_now_per_destination(
    enqueued, django_capture_on_commit_callbacks
):
    pacs1, pacs2 = make_node("pacs1"), make_node("pacs2")
    coerce = [{"attribute": "InstitutionName", "action": "set", "value": "General"}]
    make_rule("CT to both", [CT], [pacs1, pacs2], coerce=coerce)
    instance = received_instance({"Modality": "CT"})

    with django_capture_on_commit_callbacks(execute=True):
        status = route_instance(instance.pk)

    assert status == RoutingStatus.ROUTED
    assert deliveries(instance) == [("pacs1", "CT to both", coerce, 1),
                                    ("pacs2", "CT to both", coerce, 1)]
    assert set(Delivery.objects.values_list("status", flat=True)) == {DeliveryStatus.PENDING}
    assert all(d.next_attempt_at <= timezone.now() for d in Delivery.objects.all())
    assert sorted(enqueued) == sorted([pacs1.pk, pacs2.pk])
    instance.refresh_from_db()
    assert instance.routed_at is not None


def test_nothing_is_enqueued_when_the_decision_rolls_back(enqueued,
                                                          django_capture_on_commit_callbacks):
    make_rule("CT", [CT], [make_node("pacs1")])
    instance = received_instance()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        route_instance(instance.pk)

    assert enqueued == []  # only once the transaction commits
    assert len(callbacks) == 1


def test_an_instance_no_rule_matches_is_unmatched():
    make_rule("MR only", [MR], [make_node("pacs1")])
    instance = received_instance({"Modality": "CT"})

    assert route_instance(instance.pk) == RoutingStatus.UNMATCHED
    assert not Delivery.objects.exists()


def test_one_delivery_per_node_with_the_first_matching_rules_coercions():
    pacs1 = make_node("pacs1")
    make_rule("second", [CT], [pacs1], order=20,
              coerce=[{"attribute": "InstitutionName", "action": "set", "value": "B"}])
    make_rule("first", [CT], [pacs1], order=10,
              coerce=[{"attribute": "InstitutionName", "action": "set", "value": "A"}])
    instance = received_instance()

    route_instance(instance.pk)

    assert deliveries(instance) == [
        ("pacs1", "first", [{"attribute": "InstitutionName", "action": "set", "value": "A"}], 1)
    ]


def test_stop_ends_the_evaluation_and_disabled_rules_are_ignored():
    pacs1, pacs2, pacs3 = make_node("pacs1"), make_node("pacs2"), make_node("pacs3")
    make_rule("off", [CT], [pacs3], order=5, enabled=False)
    make_rule("stopper", [CT], [pacs1], order=10, stop=True)
    make_rule("after", [CT], [pacs2], order=20)
    instance = received_instance()

    route_instance(instance.pk)

    assert [d[0] for d in deliveries(instance)] == ["pacs1"]


def test_a_disabled_node_still_gets_its_delivery_to_hold():
    make_rule("CT", [CT], [make_node("pacs1", enabled=False)])
    instance = received_instance()

    assert route_instance(instance.pk) == RoutingStatus.ROUTED
    assert [d[0] for d in deliveries(instance)] == ["pacs1"]


def test_routing_twice_creates_nothing_new():
    make_rule("CT", [CT], [make_node("pacs1")])
    instance = received_instance()
    route_instance(instance.pk)
    ReceivedInstance.objects.filter(pk=instance.pk).update(routing_status=RoutingStatus.PENDING)

    route_instance(instance.pk)

    assert Delivery.objects.count() == 1


def test_rules_see_the_association_attributes():
    make_rule("from CT2", [{"attribute": "calling_ae", "op": "in", "value": ["CT2", "CT3"]}],
              [make_node("pacs1")])

    assert route_instance(received_instance(calling_ae="CT1").pk) == RoutingStatus.UNMATCHED
    assert route_instance(received_instance(calling_ae="CT2").pk) == RoutingStatus.ROUTED


def test_a_per_study_rule_waits_until_the_study_is_quiet():
    pacs1 = make_node("pacs1")
    make_rule("whole study", [CT], [pacs1], mode=RoutingMode.STUDY, study_quiet_seconds=60)
    now = timezone.now()
    first = received_instance(received_at=now - timedelta(seconds=30))
    second = received_instance(study_uid=first.study.study_instance_uid, received_at=now)

    assert route_instance(first.pk, now) == RoutingStatus.PENDING
    assert route_quiet_studies(now + timedelta(seconds=30)) == 0  # 30 s quiet: not yet
    assert not Delivery.objects.exists()

    assert route_quiet_studies(now + timedelta(seconds=61)) == 1

    assert [d[0] for d in deliveries(first)] == ["pacs1"]
    assert [d[0] for d in deliveries(second)] == ["pacs1"]
    assert set(ReceivedInstance.objects.values_list("routing_status", flat=True)) == {
        RoutingStatus.ROUTED
    }
    assert ReceivedStudy.objects.get().study_routed_at is not None
    assert route_quiet_studies(now + timedelta(seconds=120)) == 0


def test_instance_rules_go_at_once_while_study_rules_of_the_same_instance_wait():
    make_rule("now", [CT], [make_node("fast")], order=10)
    make_rule("later", [CT], [make_node("slow")], order=20, mode=RoutingMode.STUDY,
              study_quiet_seconds=60)
    now = timezone.now()
    instance = received_instance(received_at=now)

    assert route_instance(instance.pk, now) == RoutingStatus.PENDING
    assert [d[0] for d in deliveries(instance)] == ["fast"]

    route_quiet_studies(now + timedelta(seconds=60))

    assert [d[0] for d in deliveries(instance)] == ["fast", "slow"]
    instance.refresh_from_db()
    assert instance.routing_status == RoutingStatus.ROUTED


def test_the_sweep_routes_instances_left_pending():
    make_rule("CT", [CT], [make_node("pacs1")])
    old = received_instance(received_at=timezone.now() - timedelta(minutes=5))
    fresh = received_instance()

    assert route_pending_instances(older_than_seconds=30) == 1

    old.refresh_from_db()
    fresh.refresh_from_db()
    assert (old.routing_status, fresh.routing_status) == (RoutingStatus.ROUTED,
                                                          RoutingStatus.PENDING)
    assert route_pending_instances(older_than_seconds=0) == 1
    assert route_pending_instances(older_than_seconds=0) == 0
    assert Delivery.objects.count() == 2


def test_the_periodic_tasks_route_quiet_studies_and_pending_instances():
    from routing.tasks import route_pending_instances_task, route_quiet_studies_task

    make_rule("whole study", [CT], [make_node("pacs1")], mode=RoutingMode.STUDY,
              study_quiet_seconds=60)
    instance = received_instance(received_at=timezone.now() - timedelta(minutes=2))

    assert route_quiet_studies_task() == 1
    assert route_pending_instances_task() == 0

    instance.refresh_from_db()
    assert instance.routing_status == RoutingStatus.ROUTED
    assert [d[0] for d in deliveries(instance)] == ["pacs1"]

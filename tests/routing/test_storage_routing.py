"""From the modality to the routing decision: what a C-STORE leaves behind once DCMTK has
heard Success."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from routing.models import (
    Delivery,
    DeliveryStatus,
    ReceivedInstance,
    ReceivedStudy,
    RoutingStatus,
)
from routing.routing import enabled_rules, route_pending_instances
from routing.storage import Origin, StorageConfig, StoreStatus, store_instance
from tests.fixtures_storage import dcmsend, make_node, make_rule, sample_file

pytestmark = pytest.mark.django_db(transaction=True)

CT_FROM_CT1 = [
    {"attribute": "Modality", "op": "equals", "value": "CT"},
    {"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2"]},
]


def test_a_received_instance_is_routed_by_the_time_the_modality_hears_success(
    storage_server, tmp_path, enqueued
):
    pacs1 = make_node("pacs1")
    make_rule("CT to pacs1", CT_FROM_CT1, [pacs1])
    ct, mr = sample_file("explicit", tmp_path), sample_file("rle", tmp_path)  # CT and MR

    result = dcmsend(storage_server.port, ct, mr, calling_ae="CT1")

    assert result.statuses == ["0x0000", "0x0000"], result.output
    routed = ReceivedInstance.objects.get(sop_instance_uid=dcmread(ct).SOPInstanceUID)
    unmatched = ReceivedInstance.objects.get(sop_instance_uid=dcmread(mr).SOPInstanceUID)
    assert (routed.routing_status, unmatched.routing_status) == (RoutingStatus.ROUTED,
                                                                 RoutingStatus.UNMATCHED)
    delivery = Delivery.objects.get()
    assert (delivery.instance, delivery.node, delivery.status, delivery.rule_name) == (
        routed, pacs1, DeliveryStatus.PENDING, "CT to pacs1"
    )
    assert enqueued == [pacs1.pk]


def test_an_instance_whose_routing_failed_is_stored_and_routed_by_the_sweep(
    storage_server, tmp_path, enqueued, monkeypatch
):
    make_rule("CT to pacs1", CT_FROM_CT1, [make_node("pacs1")])

    def broken(*args, **kwargs):
        raise RuntimeError("rules unavailable")

    # Both ways in: deciding while storing, and routing the committed row afterwards.
    monkeypatch.setattr("routing.storage.decide", broken)
    monkeypatch.setattr("routing.dicom_handlers.route_instance", broken)

    result = dcmsend(storage_server.port, sample_file("explicit", tmp_path), calling_ae="CT2")

    assert result.statuses == ["0x0000"], result.output
    assert ReceivedInstance.objects.get().routing_status == RoutingStatus.PENDING
    assert not Delivery.objects.exists()

    route_pending_instances(older_than_seconds=0)

    assert ReceivedInstance.objects.get().routing_status == RoutingStatus.ROUTED
    assert Delivery.objects.count() == 1


def test_a_replaced_instance_is_routed_again_and_its_waiting_delivery_superseded(
    storage_server, tmp_path, enqueued
):
    make_rule("CT to pacs1", CT_FROM_CT1, [make_node("pacs1")])
    path = sample_file("explicit", tmp_path)

    assert dcmsend(storage_server.port, path).statuses == ["0x0000"]
    assert dcmsend(storage_server.port, path).statuses == ["0x0000"]

    assert sorted(Delivery.objects.values_list("instance_version", "status")) == [
        (1, DeliveryStatus.ABANDONED), (2, DeliveryStatus.PENDING)
    ]
    assert ReceivedInstance.objects.get().version == 2


def test_an_instance_stored_with_rules_naming_a_deleted_node_is_left_for_routing_after(
    tmp_path, enqueued
):
    node = make_node("pacs1")
    make_rule("everything to pacs1", [], [node])
    rules = enabled_rules()  # as an association loaded them before the node went
    node.delete()
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)

    result = store_instance(sample_file("explicit", tmp_path).read_bytes(), Origin("CT1"),
                            config, rules)

    assert (result.ok, result.route) == (True, True)
    assert ReceivedInstance.objects.get().routing_status == RoutingStatus.PENDING
    assert not Delivery.objects.exists() and enqueued == []


def test_an_instance_stored_with_rules_is_routed_in_the_same_transaction(tmp_path, enqueued):
    node = make_node("pacs1")
    make_rule("CT to pacs1", CT_FROM_CT1, [node])
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)

    result = store_instance(sample_file("explicit", tmp_path).read_bytes(), Origin("CT1"),
                            config, enabled_rules())

    assert (result.ok, result.route) == (True, False)
    instance = ReceivedInstance.objects.get()
    assert (instance.routing_status, instance.routed_at) == (RoutingStatus.ROUTED,
                                                             instance.received_at)
    delivery = Delivery.objects.get()
    assert (delivery.instance, delivery.node, delivery.instance_version, delivery.coerce) == (
        instance, node, 1, []
    )
    assert enqueued == [node.pk]


def test_a_new_instance_is_recorded_by_one_statement_and_its_commit(tmp_path, enqueued):
    """On PostgreSQL, which the tests run on (SQLite takes a statement per row)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    node = make_node("pacs1")
    make_rule("CT to pacs1", CT_FROM_CT1, [node])
    rules = enabled_rules()
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)
    encoded = sample_file("explicit", tmp_path).read_bytes()

    with CaptureQueriesContext(connection) as queries:
        result = store_instance(encoded, Origin("CT1"), config, rules)

    assert (result.ok, result.route) == (True, False)
    statements = [q["sql"].split(None, 1)[0].upper() for q in queries.captured_queries]
    assert statements == ["BEGIN", "WITH", "COMMIT"], [q["sql"][:80] for q in queries]
    instance = ReceivedInstance.objects.get()
    assert instance.routing_status == RoutingStatus.ROUTED
    assert Delivery.objects.get().node == node and enqueued == [node.pk]
    with open(instance.path, "rb") as f:
        assert f.read() == encoded
    assert not any(config.incoming_dir.iterdir())  # the temporary name is gone


def test_a_study_collects_its_modalities_instance_by_instance(tmp_path, enqueued):
    study = "1.2.826.0.1.3680043.8.498.2"
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)
    ct = sample_file("explicit", tmp_path / "in", StudyInstanceUID=study)
    mr = sample_file("rle", tmp_path / "in", StudyInstanceUID=study)
    us = sample_file("explicit", tmp_path / "in", StudyInstanceUID=study, Modality="US",
                     PatientID="")

    for path in (ct, mr, ct, us):
        assert store_instance(path.read_bytes(), Origin("CT1"), config).ok

    received = ReceivedStudy.objects.get()
    assert received.modalities == "CT\\MR\\US"
    assert received.patient_id == dcmread(ct).PatientID  # an empty value keeps the study's
    assert sorted(received.instances.values_list("version", flat=True)) == [1, 1, 2]


def test_an_instance_whose_file_retention_removed_is_stored_again(tmp_path, enqueued):
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)
    path = sample_file("explicit", tmp_path)
    assert store_instance(path.read_bytes(), Origin("CT1"), config).ok
    stored = ReceivedInstance.objects.get()
    Path(stored.path).unlink()  # as retention does, once every delivery is done

    assert store_instance(path.read_bytes(), Origin("CT1"), config).ok

    again = ReceivedInstance.objects.get()
    assert (again.version, again.path) == (2, stored.path.replace(".dcm", ".v2.dcm"))
    assert Path(again.path).read_bytes() == path.read_bytes()


def test_a_path_too_long_for_its_column_is_refused_not_cut_short(tmp_path, enqueued):
    deep = tmp_path / ("d" * 200) / ("e" * 200)  # the stored path is then over 512 characters
    config = StorageConfig(data_dir=deep, min_free_mb=0)

    result = store_instance(sample_file("explicit", tmp_path).read_bytes(), Origin("CT1"),
                            config)

    assert result.status == StoreStatus.CANNOT_WRITE
    assert not ReceivedInstance.objects.exists()
    assert [p for p in deep.rglob("*") if p.is_file()] == []

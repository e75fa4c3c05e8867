"""Sending to a real PACS (Orthanc) from this process: what arrives is what was received, one
association carries many instances, a node that refuses a compressed syntax gets a decompressed
copy, and every kind of failure leaves a row a person can read."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from django.db import connection
from django.utils import timezone
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage

from gateway import dimse
from routing import delivery, scu
from routing.models import Delivery, DeliveryStatus, Node, ReceivedInstance
from routing.storage import Origin, StorageConfig, store_instance
from tests.fixtures_pacs import (
    UNCOMPRESSED_ONLY,
    free_port,
    make_delivery,
    make_instance,
    make_node,
    wait_until,
    write_copy,
)

pytestmark = pytest.mark.django_db

# One file per transfer syntax: explicit, implicit and big endian VR, deflated, JPEG baseline,
# JPEG 2000 (lossless and not), RLE.
PIXEL_DATA = 0x7FE00010
SOURCES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "1.2.840.10008.1.2.4.50",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
}


def dataset_bytes(data: bytes | Path, tmp_path: Path) -> bytes:
    """The encoded dataset after the file meta information (which each side writes itself)."""
    if isinstance(data, bytes):
        path = tmp_path / "from-orthanc.dcm"
        path.write_bytes(data)
        data = path
    _, offset = split_dataset(data)
    return data.read_bytes()[offset:]


def assert_same_instance(arrived: bytes, original: Path, tmp_path: Path) -> None:
    """What Orthanc stores is what was received: the dataset bytes, or where Orthanc normalises
    its copy (it deflates again with its own settings, and writes OB for encapsulated pixel
    data that a file gave as OW), every attribute's value and the pixel data bytes."""
    if dataset_bytes(arrived, tmp_path) == dataset_bytes(original, tmp_path):
        return
    ours, theirs = dcmread(original), dcmread(BytesIO(arrived))
    assert theirs.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
    assert theirs.PixelData == ours.PixelData
    assert [(e.tag, e.value) for e in theirs if e.tag != PIXEL_DATA] == [
        (e.tag, e.value) for e in ours if e.tag != PIXEL_DATA
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows(node) -> list[Delivery]:
    return list(Delivery.objects.filter(node=node).order_by("id"))


def test_it_sends_each_instance_as_it_was_received(tmp_path, orthanc):
    node = make_node(orthanc)
    instances = [make_instance(tmp_path / "in", source) for source in SOURCES]
    for instance in instances:
        make_delivery(instance, node)

    run = delivery.deliver_to_node(node.pk)

    assert run.errors == []
    assert [d.status for d in rows(node)] == [DeliveryStatus.DELIVERED] * len(SOURCES)
    stored = orthanc.instances()
    assert set(stored) == {i.sop_instance_uid for i in instances}
    for instance, syntax in zip(instances, SOURCES.values(), strict=True):
        orthanc_id = stored[instance.sop_instance_uid]
        assert orthanc.transfer_syntax(orthanc_id) == syntax
        assert_same_instance(orthanc.file(orthanc_id), Path(instance.path), tmp_path)


def test_it_sends_many_instances_on_one_association(tmp_path, orthanc):
    node = make_node(orthanc)
    count = delivery.BATCH_SIZE * 2 + 5
    for _ in range(count):
        make_delivery(make_instance(tmp_path, "CT_small.dcm"), node)
    make_delivery(make_instance(tmp_path, "JPEG2000.dcm"), node)

    run = delivery.deliver_to_node(node.pk)

    assert (run.associations, run.delivered) == (1, count + 1)
    assert len(orthanc.instances()) == count + 1
    assert sorted(orthanc.receptions()) == sorted(d.instance.sop_instance_uid for d in rows(node))


def big_instance(directory: Path, rows: int = 1000, columns: int = 1301):
    """A CT image of 2.6 MB: several of the SCU's writes, its last PDU a short one."""
    pixels = np.arange(rows * columns, dtype="<u2") % 4096
    return make_instance(directory, "CT_small.dcm", Rows=rows, Columns=columns,
                         PixelData=pixels.tobytes())


def test_an_instance_larger_than_a_write_arrives_whole(tmp_path, orthanc):
    node = make_node(orthanc)
    instances = [big_instance(tmp_path), make_instance(tmp_path, "CT_small.dcm")]
    for instance in instances:
        make_delivery(instance, node)

    run = delivery.deliver_to_node(node.pk)

    assert (run.errors, run.delivered) == ([], 2)
    stored = orthanc.instances()
    for instance in instances:
        arrived = orthanc.file(stored[instance.sop_instance_uid])
        assert dataset_bytes(arrived, tmp_path) == dataset_bytes(Path(instance.path), tmp_path)


def small_pdu_pacs(max_pdu: int, on_data=None):
    """A pynetdicom storage SCP that takes PDUs of at most ``max_pdu`` bytes and keeps the size
    of each PDU and the data set of each C-STORE it receives."""
    seen: dict = {"pdus": [], "data_sets": {}, "message_ids": []}

    def on_store(event):
        seen["data_sets"][str(event.request.AffectedSOPInstanceUID)] = (
            event.request.DataSet.getvalue())
        seen["message_ids"].append(event.request.MessageID)
        return 0x0000

    def on_recv(event):
        seen["pdus"].append((event.data[0], len(event.data)))
        if on_data:
            on_data(event, seen)

    ae = AE(ae_title="SMALLPDU")
    ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(CTImageStorage, scu.UNCOMPRESSED)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_DATA_RECV, on_recv)])
    return server, port, seen


def test_no_pdu_is_longer_than_the_pacs_accepts(tmp_path, monkeypatch):
    written = []
    write = dimse.write_file_message
    monkeypatch.setattr(dimse, "write_file_message",
                        lambda *args: written.append(args[-2]) or write(*args))
    server, port, seen = small_pdu_pacs(4096)
    try:
        node = make_node(ae_title="SMALLPDU", port=port)
        instances = [make_instance(tmp_path, "CT_small.dcm"), big_instance(tmp_path)]
        for instance in instances:
            make_delivery(instance, node)

        run = delivery.deliver_to_node(node.pk)
    finally:
        server.shutdown()

    assert (run.errors, run.delivered) == ([], 2)
    data_pdus = [length for kind, length in seen["pdus"] if kind == 0x04]
    assert len(data_pdus) > 2 * 1024 * 1024 / 4096
    # PS3.8 9.3.5: the PDU length (the 6-byte header excluded) never exceeds the maximum.
    assert max(data_pdus) - 6 == 4096
    assert seen["message_ids"] == [1, 2]
    # Written by the gateway's own PDU writer, not pynetdicom's (which keeps the limit too).
    assert written == [Path(i.path) for i in instances]
    for instance in instances:
        assert (seen["data_sets"][instance.sop_instance_uid]
                == dataset_bytes(Path(instance.path), tmp_path))


def recording_pacs(on_store=None):
    """A pynetdicom storage SCP that keeps what identifies each C-STORE request it receives
    (message ID, priority, SOP class and instance, move originator, data set) and whether an
    association was aborted; ``on_store`` may delay the answer."""
    seen: dict = {"requests": [], "aborted": []}

    def store(event):
        r = event.request
        seen["requests"].append((r.MessageID, r.Priority, str(r.AffectedSOPClassUID),
                                 str(r.AffectedSOPInstanceUID),
                                 r.MoveOriginatorApplicationEntityTitle,
                                 r.DataSet.getvalue()))
        if on_store:
            on_store(event)
        return 0x0000

    ae = AE(ae_title="RECORDING")
    ae.add_supported_context(CTImageStorage, scu.UNCOMPRESSED)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, store), (evt.EVT_ABORTED, lambda e: seen["aborted"].append(True))])
    return server, port, seen


def deliver_to_recording_pacs(instance, on_store=None, then=None):
    """Deliver ``instance`` to a :func:`recording_pacs` node; ``then(seen)`` runs before the
    PACS stops. Returns the run, what the PACS saw and the node."""
    server, port, seen = recording_pacs(on_store)
    try:
        node = make_node(ae_title="RECORDING", port=port)
        make_delivery(instance, node)
        run = delivery.deliver_to_node(node.pk)
        if then:
            then(seen)
    finally:
        server.shutdown()
    return run, seen, node


def sent_by_store_file(monkeypatch) -> list[Path]:
    """The files the gateway sent with its own C-STORE request (not pynetdicom's)."""
    sent: list[Path] = []
    store_file = scu.store_file
    monkeypatch.setattr(scu, "store_file",
                        lambda *args: sent.append(args[5]) or store_file(*args))
    return sent


def test_a_file_goes_with_the_request_pynetdicom_would_send(tmp_path, monkeypatch):
    sent_directly = sent_by_store_file(monkeypatch)
    server, port, seen = recording_pacs()
    instance = make_instance(tmp_path)
    path = Path(instance.path)
    try:
        dest = scu.Destination("RECORDING", "RECORDING", "127.0.0.1", port)
        with scu.StoreAssociation(dest, "GATEWAY", {CTImageStorage: list(scu.UNCOMPRESSED)}
                                  ) as assoc:
            result = assoc.store(path, instance.sop_class_uid, instance.transfer_syntax_uid, [])
        ae = AE(ae_title="GATEWAY")
        ae.add_requested_context(CTImageStorage, instance.transfer_syntax_uid)
        reference = ae.associate("127.0.0.1", port, ae_title="RECORDING")
        status = reference.send_c_store(path, msg_id=1).Status
        reference.release()
    finally:
        server.shutdown()

    assert (result.stored, status, sent_directly) == (True, 0x0000, [path])
    ours, pynetdicoms = seen["requests"]
    assert ours == pynetdicoms
    assert ours[5] == dataset_bytes(path, tmp_path)


def test_a_file_with_a_long_file_meta_is_sent_whole(tmp_path):
    """Its meta does not fit in what is read ahead of sending: pynetdicom reads it."""
    instance = make_instance(tmp_path)
    ds = dcmread(instance.path)
    ds.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.10.1"
    ds.file_meta.PrivateInformation = b"\x01" * (2 * scu.FILE_HEAD)
    ds.save_as(instance.path, enforce_file_format=True)

    run, seen, _node = deliver_to_recording_pacs(instance)

    assert (run.errors, run.delivered) == ([], 1)
    ((_, _, _, sop_instance, _, data_set),) = seen["requests"]
    assert (sop_instance, data_set) == (
        instance.sop_instance_uid, dataset_bytes(Path(instance.path), tmp_path))


def test_a_pacs_that_does_not_answer_in_time_gets_the_instance_again_later(
        tmp_path, monkeypatch):
    monkeypatch.setattr(scu, "DIMSE_TIMEOUT", 0.5)
    sent = sent_by_store_file(monkeypatch)
    answer = threading.Event()
    instance = make_instance(tmp_path)

    def aborted(seen) -> None:
        answer.set()
        wait_until(lambda: seen["aborted"], 10, "the association to be aborted")

    try:
        run, _seen, node = deliver_to_recording_pacs(
            instance, lambda event: answer.wait(10), then=aborted)
    finally:
        answer.set()

    assert (run.delivered, sent) == (0, [Path(instance.path)])
    (row,) = rows(node)
    assert (row.status, row.attempts, row.last_error) == (
        DeliveryStatus.FAILED, 1, "no C-STORE response from PACS1 (association aborted "
        "or timed out after 0.5 s)")
    assert row.next_attempt_at > timezone.now()


def test_a_pacs_slower_to_answer_than_the_network_timeout_still_gets_the_instance(
        tmp_path, monkeypatch):
    """The network timeout (no PDU received for that long) ends an idle association, not one
    waiting for its C-STORE response: the DIMSE timeout bounds that."""
    monkeypatch.setattr(scu, "NETWORK_TIMEOUT", 0.3)
    sent = sent_by_store_file(monkeypatch)
    instance = make_instance(tmp_path)

    run, seen, _node = deliver_to_recording_pacs(instance, lambda event: time.sleep(1.0))

    assert (run.errors, run.delivered, sent, seen["aborted"]) == (
        [], 1, [Path(instance.path)], [])


@pytest.mark.django_db(transaction=True)  # the rows are read by the sending thread
def test_a_sending_association_pauses_at_once_for_pynetdicom(tmp_path, monkeypatch):
    """A coerced copy goes through pynetdicom's send_c_store, which (as release() does)
    waits for the association's reactor to pause: asking wakes the reactor's wait, else
    the send would wait out the test."""
    monkeypatch.setattr(dimse, "SENDER_REACTOR_WAIT", 60.0)
    server, port, seen = recording_pacs()
    try:
        node = make_node(ae_title="RECORDING", port=port)
        make_delivery(make_instance(tmp_path), node,
                      coerce=[{"attribute": "InstitutionName", "action": "set", "value": "X"}])
        runs: list = []

        def send() -> None:
            try:
                runs.append(delivery.deliver_to_node(node.pk))
            finally:
                connection.close()

        sending = threading.Thread(target=send, daemon=True)
        sending.start()
        sending.join(timeout=20)
    finally:
        server.shutdown()

    assert [(r.errors, r.delivered) for r in runs] == [([], 1)]
    assert dcmread(BytesIO(seen["requests"][0][5]), force=True).InstitutionName == "X"


def test_a_pacs_that_drops_the_connection_mid_instance_gets_it_again_later(tmp_path):
    def stall_then_drop(event, seen):
        # Stop reading once the data set has begun, so that the sender's writes block with
        # megabytes still to go, then close: those writes fail.
        if len(seen["pdus"]) == 3:
            time.sleep(0.3)
            event.assoc.dul.socket.close()

    server, port, seen = small_pdu_pacs(16384, stall_then_drop)
    try:
        node = make_node(ae_title="SMALLPDU", port=port)
        # 12 MB: more than a loopback connection's buffers take in while nobody reads.
        first = big_instance(tmp_path, rows=2000, columns=3001)
        second = make_instance(tmp_path, "CT_small.dcm")
        for instance in (first, second):
            make_delivery(instance, node)

        run = delivery.deliver_to_node(node.pk)
    finally:
        server.shutdown()

    assert (run.delivered, run.failed) == (0, 1)
    assert seen["data_sets"] == {}
    failed, given_back = rows(node)
    assert failed.status == DeliveryStatus.FAILED
    assert failed.last_error.startswith("connection to PACS1 lost")
    assert (given_back.status, given_back.attempts) == (DeliveryStatus.PENDING, 0)


def test_a_delivery_whose_instance_was_replaced_after_its_claim_is_superseded_not_failed(
        tmp_path, orthanc):
    node = make_node(orthanc)
    config = StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)
    first = write_copy(tmp_path / "in", "CT_small.dcm", InstitutionName="First")
    assert store_instance(first.read_bytes(), Origin("CT1"), config).ok
    make_delivery(ReceivedInstance.objects.get(), node)
    run = delivery.DeliveryRun()
    batch = delivery.claim(node.pk, run.holder)
    # Received again while the batch waits: the first version's file is removed on commit.
    again = write_copy(tmp_path / "again", "CT_small.dcm", InstitutionName="Second",
                       SOPInstanceUID=dcmread(first).SOPInstanceUID)
    assert store_instance(again.read_bytes(), Origin("CT1"), config).ok

    dest = scu.Destination(node.name, node.ae_title, node.host, node.port)
    with scu.StoreAssociation(dest, "GATEWAY", scu.plan_contexts(delivery._pairs(batch))) as assoc:
        delivery._send_batch(assoc, batch, node, run)

    (row,) = rows(node)
    assert (row.status, run.failed) == (DeliveryStatus.ABANDONED, 0)
    assert row.last_error.startswith("superseded")
    assert orthanc.instances() == {}


@pytest.mark.parametrize(
    "source", ["SC_rgb_dcmtk_+eb+cy+np.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"]
)
def test_it_sends_a_decompressed_copy_to_a_node_that_refuses_the_compressed_syntax(
    tmp_path, start_orthanc, source
):
    orthanc = start_orthanc(AcceptedTransferSyntaxes=UNCOMPRESSED_ONLY)
    node = make_node(orthanc)
    instance = make_instance(tmp_path, source)
    original = sha256(instance.path)
    make_delivery(instance, node)

    run = delivery.deliver_to_node(node.pk)

    assert run.errors == []
    assert rows(node)[0].status == DeliveryStatus.DELIVERED
    orthanc_id = orthanc.instances()[instance.sop_instance_uid]
    assert orthanc.transfer_syntax(orthanc_id) in UNCOMPRESSED_ONLY
    arrived = dcmread(BytesIO(orthanc.file(orthanc_id)))
    assert np.array_equal(arrived.pixel_array, dcmread(instance.path).pixel_array)
    assert sha256(instance.path) == original


def test_it_fails_clearly_when_the_refused_copy_cannot_be_decompressed(tmp_path, start_orthanc):
    orthanc = start_orthanc(AcceptedTransferSyntaxes=UNCOMPRESSED_ONLY)
    node = make_node(orthanc)
    broken = make_instance(tmp_path, "SC_rgb_dcmtk_+eb+cy+np.dcm")
    ds = dcmread(broken.path)
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    ds.save_as(broken.path)
    make_delivery(broken, node)
    before = timezone.now()

    delivery.deliver_to_node(node.pk)

    (row,) = rows(node)
    assert row.status == DeliveryStatus.FAILED
    assert row.attempts == 1
    assert row.last_error.startswith(
        "PACS1 accepts no transfer syntax for SOP class Secondary Capture Image Storage "
        "(1.2.840.10008.5.1.4.1.1.7) in 1.2.840.10008.1.2.4.50 and the copy could not be "
        "decompressed: "
    )
    assert row.next_attempt_at >= before + delivery.retry_delay(1)
    assert orthanc.instances() == {}


def test_a_node_that_is_down_delays_delivery(tmp_path, start_orthanc, settings):
    settings.DELIVERY_RETRY_BASE_SECONDS = 30
    down = start_orthanc(start=False)
    node = make_node(down)
    make_delivery(make_instance(tmp_path), node)
    make_delivery(make_instance(tmp_path), node)
    before = timezone.now()

    run = delivery.deliver_to_node(node.pk)

    assert (run.associations, run.failed) == (0, 2)
    for row in rows(node):
        assert (row.status, row.attempts) == (DeliveryStatus.FAILED, 1)
        assert row.last_error == f"connection refused to 127.0.0.1:{down.dicom_port}"
        assert before + timedelta(seconds=30) <= row.next_attempt_at
        assert row.next_attempt_at <= timezone.now() + timedelta(seconds=30)


def test_an_association_rejected_by_the_node_is_a_failure_with_its_reason(tmp_path, orthanc):
    node = make_node(orthanc, ae_title="NOT-ORTHANC")
    make_delivery(make_instance(tmp_path), node)

    delivery.deliver_to_node(node.pk)

    (row,) = rows(node)
    assert row.status == DeliveryStatus.FAILED
    assert row.last_error.startswith("association rejected by PACS1: Called AE title not recog")


def test_a_failure_status_from_the_pacs_is_recorded(tmp_path):
    """A PACS that is out of disk answers 0xA700 (a pynetdicom SCP plays it: Orthanc 1.10 has no
    way to answer a failure status)."""
    ae = AE(ae_title="FULLPACS")
    ae.add_supported_context(CTImageStorage, scu.UNCOMPRESSED)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    try:
        node = make_node(ae_title="FULLPACS", port=port)
        make_delivery(make_instance(tmp_path), node)

        delivery.deliver_to_node(node.pk)
    finally:
        server.shutdown()

    (row,) = rows(node)
    assert (row.status, row.last_error) == (
        DeliveryStatus.FAILED,
        "C-STORE status 0xA700 (out of resources)",
    )


def test_a_disabled_node_is_not_attempted(tmp_path, orthanc):
    node = make_node(orthanc, enabled=False)
    make_delivery(make_instance(tmp_path), node)

    run = delivery.deliver_to_node(node.pk)

    assert run.associations == 0
    (row,) = rows(node)
    assert (row.status, row.attempts, row.last_error) == (DeliveryStatus.PENDING, 0, "")
    assert orthanc.instances() == {}


def test_a_second_run_sends_nothing_again(tmp_path, orthanc):
    node = make_node(orthanc)
    for _ in range(3):
        make_delivery(make_instance(tmp_path), node)

    delivery.deliver_to_node(node.pk)
    again = delivery.deliver_to_node(node.pk)

    assert (again.associations, again.delivered) == (0, 0)
    assert len(orthanc.receptions()) == 3


def test_the_echo_check_records_the_answer(orthanc, start_orthanc):
    up = make_node(orthanc)
    down_pacs = start_orthanc(start=False)
    down = make_node(down_pacs, name="PACS2")

    assert delivery.echo_node(up.pk) == ""
    assert delivery.echo_node(down.pk) == f"connection refused to 127.0.0.1:{down_pacs.dicom_port}"

    up, down = Node.objects.get(pk=up.pk), Node.objects.get(pk=down.pk)
    assert up.last_echo_at and up.last_echo_ok_at == up.last_echo_at
    assert up.last_echo_error == ""
    assert down.last_echo_at and down.last_echo_ok_at is None
    assert down.last_echo_error.startswith("connection refused")


@pytest.mark.parametrize("source", ["CT_small.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_coercions_change_the_copy_sent_and_nothing_else(tmp_path, orthanc, source):
    node = make_node(orthanc)
    instance = make_instance(tmp_path, source, PatientID="ID1", StudyDescription="CT HEAD")
    original = sha256(instance.path)
    make_delivery(
        instance,
        node,
        coerce=[
            {"attribute": "InstitutionName", "action": "set", "value": "General Hospital"},
            {"attribute": "PatientID", "action": "prefix", "value": "EXT-"},
            {"attribute": "StudyDescription", "action": "remove"},
        ],
    )

    run = delivery.deliver_to_node(node.pk)

    assert run.errors == []
    orthanc_id = orthanc.instances()[instance.sop_instance_uid]
    tags = orthanc.tags(orthanc_id)
    assert (tags["InstitutionName"], tags["PatientID"]) == ("General Hospital", "EXT-ID1")
    assert "StudyDescription" not in tags
    arrived, ours = dcmread(BytesIO(orthanc.file(orthanc_id))), dcmread(instance.path)
    assert orthanc.transfer_syntax(orthanc_id) == instance.transfer_syntax_uid
    assert arrived.PixelData == ours.PixelData
    assert sha256(instance.path) == original
    assert (ours.PatientID, ours.StudyDescription) == ("ID1", "CT HEAD")

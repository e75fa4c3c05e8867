"""The storage SCP as a modality meets it: DCMTK dcmsend / storescu (and a pynetdicom SCU
where DCMTK cannot send what we need) against the gateway AE on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from django.db import connection
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.models import AuditEvent
from routing.models import (
    AssociationResult,
    DicomAssociation,
    ReceivedInstance,
    ReceivedStudy,
    RoutingStatus,
)
from tests.fixtures_storage import (
    SAMPLES,
    dataset_bytes,
    dcmsend,
    sample_file,
    send_raw,
    storescu,
)
from tests.servers import gateway_command, process_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("enqueued")]

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.9999.1"
UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


def stored_files(data_dir: Path) -> list[Path]:
    """Every file under the store, temporary ones included."""
    return sorted(p for p in (data_dir / "store").rglob("*") if p.is_file())


def wait_for(predicate, timeout: float = 10.0):
    """The association thread records the end of an association just after the peer has
    gone; wait until it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()


def test_it_stores_every_transfer_syntax_byte_for_byte_as_received(storage_server, tmp_path):
    sent = [sample_file(kind, tmp_path / "out") for kind in SAMPLES]

    statuses = send_raw(storage_server.port, *sent)

    assert statuses == [0x0000] * len(sent)
    for path in sent:
        original = dcmread(path, stop_before_pixels=True)
        row = ReceivedInstance.objects.get(sop_instance_uid=original.SOPInstanceUID)
        stored = Path(row.path)
        assert stored == (
            storage_server.data_dir / "store" / original.StudyInstanceUID
            / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm"
        )
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            original.file_meta.TransferSyntaxUID
        ), path.name
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
        assert row.size == stored.stat().st_size


def test_dcmsend_instances_keep_their_compression_and_pixel_data(storage_server, tmp_path):
    sent = [sample_file(kind, tmp_path / "out") for kind in SAMPLES]

    result = dcmsend(storage_server.port, *sent)

    assert result.statuses == ["0x0000"] * len(sent), result.output
    for path in sent:
        original = dcmread(path)
        row = ReceivedInstance.objects.get(sop_instance_uid=original.SOPInstanceUID)
        stored = dcmread(row.path)
        syntax = original.file_meta.TransferSyntaxUID
        if syntax in UNCOMPRESSED:
            # dcmsend offers every uncompressed syntax; the gateway picks Explicit VR LE.
            assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, path.name
        else:
            assert stored.file_meta.TransferSyntaxUID == syntax, path.name
        pixels = original.PixelData
        if syntax == ExplicitVRBigEndian and original.BitsAllocated == 16:
            pixels = b"".join(pixels[i + 1 : i + 2] + pixels[i : i + 1]
                              for i in range(0, len(pixels), 2))
        assert stored.PixelData == pixels, path.name


def test_it_records_what_the_modality_sent(storage_server, tmp_path):
    path = sample_file("explicit", tmp_path, Modality="CT", PatientID="P42",
                       AccessionNumber="ACC1", InstitutionName="General")

    result = dcmsend(storage_server.port, path, calling_ae="CT7")

    assert result.statuses == ["0x0000"], result.output
    ds = dcmread(path, stop_before_pixels=True)
    row = ReceivedInstance.objects.get()
    assert (row.sop_instance_uid, row.series_instance_uid, row.sop_class_uid) == (
        ds.SOPInstanceUID, ds.SeriesInstanceUID, CTImageStorage
    )
    assert (row.calling_ae, row.called_ae, row.source_ip) == ("CT7", "GATEWAY", "127.0.0.1")
    assert dcmread(row.path).file_meta.SourceApplicationEntityTitle == "CT7"
    assert row.header["Modality"] == "CT"
    assert row.header["InstitutionName"] == "General"
    assert row.header["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "PixelData" not in row.header
    assert row.routing_status == RoutingStatus.UNMATCHED  # no rules configured
    study = ReceivedStudy.objects.get()
    assert (study.study_instance_uid, study.patient_id, study.accession_number,
            study.modalities) == (ds.StudyInstanceUID, "P42", "ACC1", "CT")
    assert row.study == study


def test_it_records_each_storage_association(storage_server, tmp_path):
    files = [sample_file("explicit", tmp_path), sample_file("rle", tmp_path)]

    result = dcmsend(storage_server.port, *files, calling_ae="MR3")

    assert result.statuses == ["0x0000", "0x0000"], result.output
    assoc = wait_for(lambda: DicomAssociation.objects.filter(
        result=AssociationResult.RELEASED).first())
    assert assoc is not None
    assert (assoc.calling_ae, assoc.called_ae, assoc.instances, assoc.failures) == (
        "MR3", "GATEWAY", 2, 0
    )
    assert assoc.peer.startswith("127.0.0.1:")
    assert assoc.ended_at is not None
    assert set(ReceivedInstance.objects.values_list("association_id", flat=True)) == {assoc.pk}
    event = AuditEvent.objects.filter(action="dicom.association").first()  # newest
    assert (event.actor, event.object_id) == ("dicom:MR3", str(assoc.pk))
    assert event.detail["result"] == "RELEASED" and event.detail["instances"] == 2


def test_it_records_an_aborted_association_with_what_it_stored(storage_server, tmp_path):
    statuses = send_raw(storage_server.port, sample_file("explicit", tmp_path), abort=True)

    assert statuses == [0x0000]
    assoc = wait_for(lambda: DicomAssociation.objects.exclude(
        result=AssociationResult.OPEN).first())
    assert (assoc.result, assoc.instances) == (AssociationResult.ABORTED, 1)
    assert ReceivedInstance.objects.count() == 1


def test_it_does_not_record_associations_without_storage(storage_server):
    ae = AE(ae_title="MONITOR")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", storage_server.port, ae_title="GATEWAY")
    assert assoc.is_established
    # The SCP answers the echo after its EVT_ACCEPTED handlers have run.
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    assert not DicomAssociation.objects.exists()


def test_it_refuses_with_out_of_resources_when_disk_space_is_short(start_storage_server,
                                                                   tmp_path):
    server = start_storage_server(min_free_mb=10**9)

    result = dcmsend(server.port, sample_file("explicit", tmp_path))

    assert result.statuses == ["0xa700"], result.output
    assert not ReceivedInstance.objects.exists()
    assert stored_files(server.data_dir) == []
    assoc = wait_for(lambda: DicomAssociation.objects.filter(
        result=AssociationResult.RELEASED).first())
    assert (assoc.instances, assoc.failures) == (0, 1)


def test_it_stores_an_unknown_private_storage_sop_class(storage_server, tmp_path):
    path = sample_file("explicit", tmp_path, SOPClassUID=PRIVATE_SOP_CLASS)

    # -nuc: dcmsend (unlike storescu) then sends SOP classes it does not know itself.
    result = dcmsend(storage_server.port, path, extra=["-nuc"])

    assert result.statuses == ["0x0000"], result.output
    row = ReceivedInstance.objects.get()
    assert row.sop_class_uid == PRIVATE_SOP_CLASS
    assert dcmread(row.path).file_meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS


def test_it_stores_a_public_storage_sop_class_pynetdicom_does_not_know(storage_server, tmp_path):
    unknown = "1.2.840.10008.5.1.4.1.1.999.1"
    path = sample_file("explicit", tmp_path, SOPClassUID=unknown)

    statuses = send_raw(storage_server.port, path)

    assert statuses == [0x0000]
    assert ReceivedInstance.objects.get().sop_class_uid == unknown


def test_it_still_rejects_unknown_non_storage_services(storage_server):
    ae = AE(ae_title="QR")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.99.1")  # a made-up Q/R class

    assoc = ae.associate("127.0.0.1", storage_server.port, ae_title="GATEWAY")

    assert not assoc.is_established


@pytest.mark.parametrize(
    "proposed, accepted",
    [
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit], JPEGBaseline8Bit),
    ],
)
def test_it_prefers_explicit_vr_and_never_asks_for_lossy(storage_server, proposed, accepted):
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, proposed)

    assoc = ae.associate("127.0.0.1", storage_server.port, ae_title="GATEWAY")

    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax == [accepted]
    assoc.release()


def test_it_answers_a_data_set_it_cannot_parse_with_a_failure_and_keeps_nothing(
    storage_server, tmp_path
):
    good = sample_file("explicit", tmp_path)
    broken = tmp_path / "broken.dcm"
    data = good.read_bytes()
    offset = len(data) - len(dataset_bytes(good))
    # A first element that claims 64 KB more than the data set holds.
    broken.write_bytes(data[:offset] + b"\x08\x00\x05\x00CS\xff\xffISO_IR 100")
    later = sample_file("explicit", tmp_path)

    statuses = send_raw(storage_server.port, broken, later)

    assert statuses[0] == 0xC210
    assert statuses[1] == 0x0000  # the association goes on
    assert list(ReceivedInstance.objects.values_list("sop_instance_uid", flat=True)) == [
        dcmread(later).SOPInstanceUID
    ]
    assert [p.name for p in stored_files(storage_server.data_dir)] == [
        f"{dcmread(later).SOPInstanceUID}.dcm"
    ]


def test_it_refuses_a_data_set_that_contradicts_the_request(storage_server, tmp_path):
    path = sample_file("explicit", tmp_path)
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # what the SCU will announce
    ds.save_as(path)

    statuses = send_raw(storage_server.port, path)

    assert statuses == [0xA900]
    assert not ReceivedInstance.objects.exists()
    assert stored_files(storage_server.data_dir) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n",
        # An A-ASSOCIATE-RQ header announcing 1000 bytes, then the connection ends.
        b"\x01\x00\x00\x00\x03\xe8\x00\x01\x00\x00GATEWAY",
    ],
    ids=["not-dicom", "truncated-pdu"],
)
def test_it_drops_a_broken_connection_and_keeps_serving(storage_server, tmp_path, garbage):
    with socket.create_connection(("127.0.0.1", storage_server.port), timeout=10) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):  # the gateway closes its end
            received += chunk
    assert not received or received[0] in (0x03, 0x07)  # nothing, A-ASSOCIATE-RJ or A-ABORT

    result = storescu(storage_server.port, sample_file("explicit", tmp_path))

    assert result.statuses == ["0x0000"], result.output
    assert ReceivedInstance.objects.count() == 1


def _resend_changed(path: Path, institution: str) -> Path:
    ds = dcmread(path)
    ds.InstitutionName = institution
    again = path.with_name("again.dcm")
    ds.save_as(again)
    return again


def test_a_duplicate_replaces_the_stored_instance_by_default(storage_server, tmp_path):
    first = sample_file("explicit", tmp_path, InstitutionName="First")
    second = _resend_changed(first, "Second")

    assert dcmsend(storage_server.port, first).statuses == ["0x0000"]
    assert dcmsend(storage_server.port, second).statuses == ["0x0000"]

    row = ReceivedInstance.objects.get()
    assert row.version == 2
    assert row.header["InstitutionName"] == "Second"
    assert dcmread(row.path).InstitutionName == "Second"
    assert len(stored_files(storage_server.data_dir)) == 1


def test_a_duplicate_is_answered_success_and_ignored_under_keep(start_storage_server, tmp_path):
    server = start_storage_server(duplicate_policy="keep")
    first = sample_file("explicit", tmp_path, InstitutionName="First")
    second = _resend_changed(first, "Second")

    assert dcmsend(server.port, first).statuses == ["0x0000"]
    assert dcmsend(server.port, second).statuses == ["0x0000"]

    row = ReceivedInstance.objects.get()
    assert (row.version, row.header["InstitutionName"]) == (1, "First")
    assert dcmread(row.path).InstitutionName == "First"
    assert len(stored_files(server.data_dir)) == 1


def test_a_duplicate_is_refused_under_reject(start_storage_server, tmp_path):
    server = start_storage_server(duplicate_policy="reject")
    first = sample_file("explicit", tmp_path, InstitutionName="First")
    second = _resend_changed(first, "Second")

    assert dcmsend(server.port, first).statuses == ["0x0000"]
    result = dcmsend(server.port, second)

    assert result.statuses == ["0xc230"], result.output
    row = ReceivedInstance.objects.get()
    assert (row.version, dcmread(row.path).InstitutionName) == (1, "First")
    assert len(stored_files(server.data_dir)) == 1


def test_the_dicomserver_command_stores_under_gateway_data_dir(tmp_path):
    data_dir = tmp_path / "gateway-data"
    env = process_env(connection.settings_dict["NAME"], GATEWAY_DATA_DIR=str(data_dir),
                      GATEWAY_MIN_FREE_MB="0", GATEWAY_DUPLICATE_POLICY="reject")
    path = sample_file("jpeg_ls_lossless", tmp_path)

    with gateway_command(["dicomserver", "--host", "127.0.0.1", "--port", "0"], env) as port:
        first = dcmsend(port, path)
        again = dcmsend(port, path)

    assert (first.statuses, again.statuses) == (["0x0000"], ["0xc230"]), again.output
    row = ReceivedInstance.objects.get()
    assert Path(row.path).is_relative_to(data_dir / "store")
    stored, sent = dcmread(row.path), dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored.PixelData == sent.PixelData


def test_it_records_a_storage_association_it_had_to_reject(start_storage_server, settings,
                                                            tmp_path):
    settings.DICOM_MAX_ASSOCIATIONS = 1
    server = start_storage_server()
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    holding = ae.associate("127.0.0.1", server.port, ae_title="GATEWAY")
    assert holding.is_established
    try:
        result = dcmsend(server.port, sample_file("explicit", tmp_path), calling_ae="CT9")
    finally:
        holding.release()

    assert result.statuses == [], result.output
    rejected = wait_for(lambda: DicomAssociation.objects.filter(
        result=AssociationResult.REJECTED).first())
    assert (rejected.calling_ae, rejected.instances) == ("CT9", 0)
    assert not ReceivedInstance.objects.exists()


def test_an_instance_sent_in_the_smallest_pdus_is_stored_whole(storage_server, tmp_path):
    path = sample_file("explicit", tmp_path)

    result = storescu(storage_server.port, path, extra=["--max-send-pdu", "4096"])

    assert result.statuses == ["0x0000"], result.output
    stored = dcmread(ReceivedInstance.objects.get().path)
    original = dcmread(path)
    assert len(original.PixelData) > 4096 * 4  # sent in several PDUs

    def elements(ds):  # storescu leaves out group lengths and trailing padding
        return [e for e in ds if e.tag.element and e.tag.group != 0xFFFC]

    assert elements(stored) == elements(original)


def _established(port: int, path: Path):
    """A pynetdicom association to the gateway with a context for ``path``'s SOP class and
    transfer syntax, and that context's ID."""
    from pynetdicom.dsutils import split_dataset

    from gateway.dimse import leave_responses_to_the_sender

    meta, _ = split_dataset(path)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    leave_responses_to_the_sender(assoc)  # the test thread reads the response, not the reactor
    return assoc, assoc.accepted_contexts[0].context_id, meta


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def _p_data_tf(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BxL", 0x04, len(body)) + body


def test_a_command_and_its_data_set_in_one_pdu_are_stored(storage_server, tmp_path,
                                                         monkeypatch):
    from gateway import dimse
    from gateway.dimse import c_store_rq  # the request pynetdicom would send

    handled = []  # PDUs the gateway read itself rather than through pynetdicom's decoder
    read_directly = dimse._read_data_directly
    monkeypatch.setattr(dimse, "_read_data_directly",
                        lambda assoc: handled.append(read_directly(assoc)) or handled[-1])
    requests = []  # ... and the C-STORE request among them
    receive = dimse._receive_store_request
    monkeypatch.setattr(dimse, "_receive_store_request",
                        lambda assoc, values: requests.append(receive(assoc, values))
                        or requests[-1])

    path = sample_file("explicit", tmp_path)
    assoc, context_id, meta = _established(storage_server.port, path)
    command = c_store_rq(7, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 0)
    data = dataset_bytes(path)
    half = len(data) // 2

    assoc.dul.socket.socket.sendall(_p_data_tf(
        _pdv(context_id, 0x03, command), _pdv(context_id, 0x00, data[:half]),
        _pdv(context_id, 0x02, data[half:])))
    _, response = assoc.dimse.get_msg(block=True)  # DIMSE timeout: 30 s
    assoc.release()

    assert (response.MessageIDBeingRespondedTo, response.Status) == (7, 0x0000)
    stored = Path(ReceivedInstance.objects.get().path).read_bytes()
    assert stored.endswith(data)
    assert True in handled
    assert requests == [True]


def test_a_data_set_whose_pdu_header_comes_in_pieces_is_stored_whole(storage_server, tmp_path):
    from gateway.dimse import c_store_rq

    path = sample_file("explicit", tmp_path)
    assoc, context_id, meta = _established(storage_server.port, path)
    command = c_store_rq(7, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 0)
    data = dataset_bytes(path)
    third = len(data) // 3
    sock = assoc.dul.socket.socket

    # An empty P-DATA-TF first (nothing to read in it), then the request; the header of its
    # second data PDU arrives in two pieces, so the gateway hands that PDU, in the middle of
    # the data set, to pynetdicom's reader.
    sock.sendall(_p_data_tf() + _p_data_tf(_pdv(context_id, 0x03, command))
                 + _p_data_tf(_pdv(context_id, 0x00, data[:third])))
    second = _p_data_tf(_pdv(context_id, 0x00, data[third:2 * third]))
    sock.sendall(second[:3])
    time.sleep(0.3)
    sock.sendall(second[3:] + _p_data_tf(_pdv(context_id, 0x02, data[2 * third:])))
    _, response = assoc.dimse.get_msg(block=True)  # DIMSE timeout: 30 s
    assoc.release()

    assert (response.MessageIDBeingRespondedTo, response.Status) == (7, 0x0000)
    assert Path(ReceivedInstance.objects.get().path).read_bytes().endswith(data)


@pytest.mark.parametrize("interruption", ["command", "other-context"])
def test_a_data_set_interrupted_by_another_message_ends_only_that_association(
    storage_server, tmp_path, interruption
):
    from gateway.dimse import c_store_rq

    path = sample_file("explicit", tmp_path)
    assoc, context_id, meta = _established(storage_server.port, path)
    command = c_store_rq(7, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 0)
    data = dataset_bytes(path)
    interrupting = (_pdv(context_id, 0x03, command) if interruption == "command"
                    else _pdv(context_id + 2, 0x02, data[100:]))

    assoc.dul.socket.socket.sendall(
        _p_data_tf(_pdv(context_id, 0x03, command)) + _p_data_tf(_pdv(context_id, 0x00, data[:100]))
        + _p_data_tf(interrupting))
    deadline = time.monotonic() + 10
    while not (assoc.is_aborted or not assoc.is_alive()) and time.monotonic() < deadline:
        time.sleep(0.02)

    assert assoc.is_aborted or not assoc.is_alive()
    assert not ReceivedInstance.objects.exists()
    result = storescu(storage_server.port, path)
    assert result.statuses == ["0x0000"], result.output
    assert ReceivedInstance.objects.count() == 1


@pytest.mark.parametrize("broken, then_close", [
    # A PDV item announcing more than its PDU holds. The gateway aborts at once, and
    # the abort closes this side's socket: it must not be touched afterwards.
    (_p_data_tf(struct.pack(">LBB", 5000, 1, 0x03) + b"\x00" * 10), False),
    # A PDU announcing 1 MB, then the connection ends.
    (struct.pack(">BxL", 0x04, 1 << 20) + b"\x00" * 100, True),
], ids=["pdv-past-its-pdu", "pdu-cut-off"])
def test_a_broken_pdu_within_an_association_ends_only_that_association(
    storage_server, tmp_path, broken, then_close
):
    path = sample_file("explicit", tmp_path)
    assoc, _context_id, _meta = _established(storage_server.port, path)
    sock = assoc.dul.socket.socket

    sock.sendall(broken)
    if then_close:  # the gateway is still waiting for the rest of the PDU
        sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 10
    while not (assoc.is_aborted or not assoc.is_alive()) and time.monotonic() < deadline:
        time.sleep(0.02)

    assert assoc.is_aborted or not assoc.is_alive()
    result = storescu(storage_server.port, path)
    assert result.statuses == ["0x0000"], result.output
    assert wait_for(lambda: DicomAssociation.objects.filter(
        result=AssociationResult.ABORTED).exists())

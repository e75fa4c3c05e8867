"""The Modality Worklist SCP as a modality meets it: DCMTK findscu -W (and a pynetdicom SCU
where DCMTK cannot send what we need) against the gateway AE listening on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from datetime import timedelta
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ModalityWorklistInformationFind as MWL

from gateway.dicom import set_tcp_nodelay
from gateway.models import AuditEvent
from tests.factories import DAY, at, bulk_steps, make_item
from worklist.dicom_handlers import WorklistConfig
from worklist.models import WorklistQuery

pytestmark = pytest.mark.django_db(transaction=True)

SPS = "ScheduledProcedureStepSequence[0]"


def sps_ids(result) -> list[str]:
    return [r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for r in result.responses]


def last_query_record(timeout: float = 5.0) -> WorklistQuery:
    """The newest WorklistQuery; the SCP writes it just after its final response."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = WorklistQuery.objects.first()
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError("no WorklistQuery was recorded")


@pytest.fixture
def department():
    """Four worklist items on the test day."""
    make_item(
        patient={"name": "SMITH^JOHN", "patient_id": "P1", "birth_date": "19600101"},
        order={"accession_number": "A1", "study_instance_uid": "1.2.3.1"},
        modality="CT",
        station_ae_title="CT1",
        start=at("0800"),
        sps_id="S1",
    )
    make_item(
        patient={"name": "Smythe^Anna", "patient_id": "P2"},
        order={"accession_number": "A2", "study_instance_uid": "1.2.3.2"},
        modality="MR",
        station_ae_title="MR1",
        start=at("1000"),
        sps_id="S2",
    )
    make_item(
        patient={"name": "JONES^MARY", "patient_id": "P3"},
        order={"accession_number": "A3", "study_instance_uid": "1.2.3.3"},
        modality="CT",
        station_ae_title="CT2",
        start=at("1500"),
        sps_id="S3",
    )
    make_item(
        patient={"name": "BROWN^TOM", "patient_id": "P4"},
        order={"accession_number": "A4", "study_instance_uid": "1.2.3.4"},
        modality="CT",
        station_ae_title="CT1",
        start=at("0900", DAY + timedelta(days=1)),
        sps_id="S4",
    )


def test_a_modality_receives_its_worklist_item(findscu, department):
    result = findscu(
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        f"{SPS}.Modality=MR",
        f"{SPS}.ScheduledStationAETitle",
        f"{SPS}.ScheduledProcedureStepStartDate",
        f"{SPS}.ScheduledProcedureStepStartTime",
        f"{SPS}.ScheduledProcedureStepID",
        f"{SPS}.ScheduledProcedureStepDescription",
    )

    assert result.final_status == "Success"
    assert len(result.responses) == 1
    item = result.responses[0]
    assert item.PatientName == "Smythe^Anna"
    assert item.PatientID == "P2"
    assert item.AccessionNumber == "A2"
    assert item.StudyInstanceUID == "1.2.3.2"
    assert item.PatientSex == "F"
    sps = item.ScheduledProcedureStepSequence[0]
    assert sps.Modality == "MR"
    assert sps.ScheduledStationAETitle == "MR1"
    assert sps.ScheduledProcedureStepStartDate == "20260316"
    assert sps.ScheduledProcedureStepStartTime == "100000"
    assert sps.ScheduledProcedureStepDescription == "CT HEAD W/O"


@pytest.mark.parametrize(
    "keys, expected",
    [
        pytest.param(["PatientID=P3"], ["S3"], id="single value"),
        pytest.param(["PatientName=smi*"], ["S1"], id="wildcard, case-insensitive name"),
        pytest.param(["PatientName=SM?TH*"], ["S1", "S2"], id="single-character wildcard"),
        pytest.param(["PatientName"], ["S1", "S2", "S3", "S4"], id="universal"),
        pytest.param(["PatientName=*"], ["S1", "S2", "S3", "S4"], id="asterisk only"),
        pytest.param(["StudyInstanceUID=1.2.3.1\\1.2.3.4"], ["S1", "S4"], id="UID list"),
        pytest.param([f"{SPS}.Modality=CT"], ["S1", "S3", "S4"], id="sequence item key"),
        pytest.param(
            [f"{SPS}.Modality=CT", f"{SPS}.ScheduledStationAETitle=CT1"],
            ["S1", "S4"],
            id="two keys in the sequence item",
        ),
        pytest.param(
            [f"{SPS}.ScheduledProcedureStepStartDate=20260316"], ["S1", "S2", "S3"], id="date"
        ),
        pytest.param(
            [f"{SPS}.ScheduledProcedureStepStartDate=20260317-"], ["S4"], id="open date range"
        ),
        pytest.param(
            [f"{SPS}.ScheduledProcedureStepStartTime=0830-1200"], ["S2", "S4"], id="time range"
        ),
        pytest.param(
            [
                f"{SPS}.ScheduledProcedureStepStartDate=20260316-20260317",
                f"{SPS}.ScheduledProcedureStepStartTime=0900-1000",
            ],
            ["S2", "S3", "S4"],
            id="combined date and time range",
        ),
        pytest.param(
            [f"{SPS}.ScheduledProcedureStepStartDate=20260101-20250101"], [], id="inverted range"
        ),
    ],
)
def test_findscu_sees_each_matching_type(findscu, department, keys, expected):
    result = findscu(*keys, f"{SPS}.ScheduledProcedureStepID")

    assert result.final_status == "Success"
    assert sorted(sps_ids(result)) == expected


def test_an_empty_sps_sequence_comes_back_full_and_unknown_keys_come_back_empty(
    findscu, department
):
    result = findscu("PatientID=P1", "PatientAge", "(0010,2160)", "ScheduledProcedureStepSequence")

    item = result.responses[0]
    assert item.PatientAge == ""
    assert item.EthnicGroup == ""
    sps = item.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == "CT1"
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert "ScheduledProtocolCodeSequence" in sps


def test_a_modality_that_proposes_only_implicit_vr_gets_the_same_answer(findscu, department):
    result = findscu(
        "PatientID=P2",
        "PatientName",
        "ScheduledProcedureStepSequence",
        extra=["--propose-implicit"],
    )

    assert result.responses[0].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert result.responses[0].PatientName == "Smythe^Anna"
    assert result.responses[0].ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MR1"


def test_a_latin1_query_is_decoded_with_its_character_set(findscu):
    make_item(patient={"name": "MÜLLER^HANS"}, sps_id="S1")
    make_item(patient={"name": "MULLER^HANS"}, sps_id="S2")

    result = findscu(
        b"SpecificCharacterSet=ISO_IR 100",
        "PatientName=M\u00dcLLER*".encode("latin-1"),
        f"{SPS}.ScheduledProcedureStepID",
    )

    assert sps_ids(result) == ["S1"]
    assert result.responses[0].SpecificCharacterSet == "ISO_IR 192"
    assert result.responses[0].PatientName == "MÜLLER^HANS"


def test_a_utf8_query_matches_names_case_insensitively(findscu):
    make_item(patient={"name": "ÅSTRÖM^ÉLISE"}, sps_id="S1")

    result = findscu(
        "SpecificCharacterSet=ISO_IR 192", "PatientName=åström*", f"{SPS}.ScheduledProcedureStepID"
    )

    assert sps_ids(result) == ["S1"]


def test_only_steps_a_modality_should_perform_are_returned(findscu):
    for status in ["SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "CANCELLED"]:
        make_item(status=status, sps_id=status)

    result = findscu(f"{SPS}.ScheduledProcedureStepID", f"{SPS}.ScheduledProcedureStepStatus")

    assert sorted(sps_ids(result)) == ["ARRIVED", "READY", "SCHEDULED"]


def test_c_cancel_stops_the_answers(findscu):
    # Enough answers that the C-CANCEL arrives while they are still going out, even on a
    # busy machine.
    bulk_steps(3000)

    result = findscu("PatientName", "ScheduledProcedureStepSequence", extra=["--cancel", "1"])

    assert "Cancel" in result.final_status
    assert 1 <= len(result.responses) < 3000
    record = last_query_record()
    assert record.status == "FE00"
    assert record.answers < 3000


def test_each_query_is_recorded_with_who_asked_what_and_the_outcome(findscu, department):
    findscu("PatientName=SMITH*", "PatientID", calling_ae="CT_EAST")

    record = last_query_record()
    assert record.calling_ae == "CT_EAST"
    assert record.called_ae == "GATEWAY"
    assert record.peer.startswith("127.0.0.1:")
    assert record.keys["00100010"]["Value"] == [{"Alphabetic": "SMITH*"}]
    assert "00100020" in record.keys
    assert record.answers == 1
    assert record.status == "0000"
    assert record.duration_ms > 0
    event = AuditEvent.objects.get(action="dicom.worklist.query")
    assert (event.actor, event.object_id) == ("dicom:CT_EAST", str(record.pk))
    assert (event.detail["answers"], event.detail["status"]) == (1, "0000")


def test_the_calling_station_sees_only_its_own_steps_when_restricted(start_mwl_server, tmp_path):
    from tests.fixtures_mwl import run_findscu

    make_item(station_ae_title="CT1", sps_id="S1")
    make_item(station_ae_title="CT2", sps_id="S2")
    server = start_mwl_server(WorklistConfig(restrict_to_calling_station=True))

    mine = run_findscu(server.port, [f"{SPS}.ScheduledProcedureStepID"], tmp_path, "CT1")
    other = run_findscu(
        server.port,
        [f"{SPS}.ScheduledProcedureStepID", f"{SPS}.ScheduledStationAETitle=CT2"],
        tmp_path,
        "CT1",
    )

    assert sps_ids(mine) == ["S1"]
    assert sps_ids(other) == ["S2"]


def test_answers_stop_at_the_cap_with_success(start_mwl_server, tmp_path):
    from tests.fixtures_mwl import run_findscu

    for hhmm in ["0800", "0900", "1000", "1100", "1200"]:
        make_item(start=at(hhmm), sps_id=f"S{hhmm}")
    server = start_mwl_server(WorklistConfig(max_results=3))

    result = run_findscu(server.port, [f"{SPS}.ScheduledProcedureStepID"], tmp_path)

    assert result.final_status == "Success"
    assert sps_ids(result) == ["S0800", "S0900", "S1000"]
    assert "MWL_MAX_RESULTS" in last_query_record().error_text


# --- What DCMTK cannot send: a pynetdicom SCU ---------------------------------------------------


@pytest.fixture
def association(mwl_server):
    ae = AE("PYSCU")
    ae.add_requested_context(MWL)
    assoc = ae.associate("127.0.0.1", mwl_server.port, ae_title=mwl_server.ae_title)
    assert assoc.is_established
    yield assoc
    if assoc.is_established:
        assoc.release()


def find(assoc, identifier: Dataset) -> list[tuple[int, Dataset | None, Dataset]]:
    return [(status.Status, ident, status) for status, ident in assoc.send_c_find(identifier, MWL)]


def find_raw(assoc, identifier: bytes | Dataset, message_id: int = 99) -> C_FIND:
    """Send identifier bytes as they are (a Dataset is encoded for the accepted transfer
    syntax first) and return the final C-FIND response."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == MWL)
    if isinstance(identifier, Dataset):
        identifier = encode(identifier, context.transfer_syntax[0].is_implicit_VR, True)
    request = C_FIND()
    request.MessageID = message_id
    request.AffectedSOPClassUID = MWL
    request.Priority = 2
    request.Identifier = BytesIO(identifier)
    # Pause the association's reactor, as pynetdicom's own send_c_* do, so that it does not
    # take the responses for itself.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        while True:
            _, response = assoc.dimse.get_msg(block=True)
            if response.Status != 0xFF00:
                return response
    finally:
        assoc._reactor_checkpoint.set()


def a_valid_query() -> Dataset:
    query = Dataset()
    query.PatientID = "P1"
    return query


def assert_the_server_still_answers(assoc, mwl_server):
    assert [s for s, _, _ in find(assoc, a_valid_query())] == [0xFF00, 0x0000]
    fresh = AE("PYSCU2")
    fresh.add_requested_context(MWL)
    other = fresh.associate("127.0.0.1", mwl_server.port, ae_title=mwl_server.ae_title)
    assert [s for s, _, _ in find(other, a_valid_query())] == [0xFF00, 0x0000]
    other.release()


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("PatientBirthDate", "2026XX01"),
        ("StudyInstanceUID", "1.2.abc"),
        ("PatientName", None),  # replaced below by a name with a wrong VR
    ],
)
def test_a_malformed_identifier_fails_and_the_association_lives_on(
    association, mwl_server, department, keyword, value
):
    query = Dataset()
    if value is None:
        query.add_new(0x00100010, "DA", "20260101")  # PatientName sent as a date
    else:
        query.add_new(keyword, "DA" if keyword.endswith("Date") else "UI", value)

    responses = find(association, query)

    assert [s for s, _, _ in responses] == [0xA900]
    assert responses[0][2].ErrorComment
    assert_the_server_still_answers(association, mwl_server)
    assert WorklistQuery.objects.filter(calling_ae="PYSCU", status="A900").count() == 1


@pytest.mark.filterwarnings("ignore:Failed to decode byte string")
def test_undecodable_text_fails_and_the_association_lives_on(association, mwl_server, department):
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.PatientName = "ZZZZ"
    context = next(cx for cx in association.accepted_contexts if cx.abstract_syntax == MWL)
    implicit = context.transfer_syntax[0].is_implicit_VR
    raw = encode(query, implicit, True).replace(b"ZZZZ", b"\xff\xfe\xfd*")

    status = find_raw(association, raw)

    assert status.Status == 0xA900
    assert_the_server_still_answers(association, mwl_server)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x10\x00\x10\x00PN\xff\x00SMITH", id="value cut short"),
        pytest.param(b"\x10\x00\x10\x00XX\x04\x00ABCD", id="unknown VR"),
        pytest.param(
            b"\x40\x00\x00\x01SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00garbage!",
            id="runaway sequence",
        ),
    ],
)
def test_an_unparsable_identifier_fails_and_the_association_lives_on(
    association, mwl_server, department, garbage
):
    status = find_raw(association, garbage)

    assert status.Status == 0xC001
    assert_the_server_still_answers(association, mwl_server)


def test_identifiers_are_not_written_to_the_application_log(association, department, caplog):
    caplog.set_level(logging.DEBUG)
    query = Dataset()
    query.PatientName = "SMITH^JOHN"
    query.PatientBirthDate = "1960XX01"

    find(association, query)
    query.PatientBirthDate = "19600101"
    find(association, query)

    assert "SMITH" not in caplog.text
    assert "1960XX01" not in caplog.text


# --- The AE itself ----------------------------------------------------------------------------


def test_the_ae_answers_c_echo(mwl_server):
    done = subprocess.run(
        ["echoscu", "-aec", mwl_server.ae_title, "127.0.0.1", str(mwl_server.port)],
        capture_output=True,
        timeout=30,
    )

    assert done.returncode == 0, done.stderr


def test_new_connections_get_tcp_nodelay():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    event = SimpleNamespace(
        assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=accepted)))
    )
    try:
        set_tcp_nodelay(event)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (client, accepted, server):
            s.close()

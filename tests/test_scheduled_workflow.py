"""IHE Scheduled Workflow end to end, as the department runs it: the RIS sends HL7 to the real
`hl7listener` process, the modality asks the real `dicomserver` process with DCMTK findscu -W,
both on the PostgreSQL test database."""

from __future__ import annotations

import datetime

import hl7.client
import pytest
from django.db import connection

from tests.servers import findscu_worklist, gateway_command, process_env
from worklist.models import Station

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("status_mappings"),
]

SPS = "ScheduledProcedureStepSequence[0]"
KEYS = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription",
    "ReferringPhysicianName", "RequestingPhysician", "AdmissionID",
    f"{SPS}.Modality", f"{SPS}.ScheduledStationAETitle", f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime", f"{SPS}.ScheduledProcedureStepID",
    f"{SPS}.ScheduledProcedureStepDescription",
]


@pytest.fixture(scope="module")
def gateway(django_db_setup, django_db_blocker):
    """The HL7 listener and the DICOM AE as their own processes, sharing the test database."""
    with django_db_blocker.unblock():
        name = connection.settings_dict["NAME"]
    env = process_env(name)
    with gateway_command(["hl7listener", "--host", "127.0.0.1", "--port", "0"], env) as hl7_port:
        with gateway_command(
            ["dicomserver", "--host", "127.0.0.1", "--port", "0", "--ae-title", "GATEWAY"], env
        ) as dicom_port:
            yield hl7_port, dicom_port


def send(port: int, message: str, encoding: str = "utf-8") -> str:
    with hl7.client.MLLPClient("127.0.0.1", port, encoding=encoding) as client:
        return client.send_message(message.replace("\n", "\r")).decode(encoding)


def seg(name: str, fields: dict[int, str]) -> str:
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


def orm(control_id: str, patient: str, name: str, accession: str, *, control: str = "NW",
        status: str = "SC", start: str = "20261127100000", charset: str = "",
        version: str = "2.3.1") -> str:
    msh = {2: "RIS", 3: "HOSP", 4: "GATEWAY", 5: "HOSP", 6: "20261127090000", 8: "ORM^O01",
           9: control_id, 10: "P", 11: version}
    if charset:
        msh[17] = charset
    return "\n".join([
        "MSH|^~\\&|" + seg("", msh)[2:],
        seg("PID", {1: "1", 3: f"{patient}^^^HOSP^MR", 5: name, 7: "19800214", 8: "F"}),
        seg("PV1", {1: "1", 2: "O", 3: "CT^1^1", 8: "0042^Referrer^Rita^^^Dr",
                    19: f"V{accession}"}),
        seg("ORC", {1: control, 2: f"PO{accession}", 3: f"FO{accession}", 5: status,
                    7: f"^^^{start}^^R"}),
        seg("OBR", {1: "1", 2: f"PO{accession}", 3: f"FO{accession}",
                    4: "CTHEAD^CT Head^L^CTH01^CT head plain^LOCAL", 16: "0077^Orderly^Otto^^^Dr",
                    18: accession, 19: f"RP{accession}", 20: f"SPS{accession}", 24: "CT",
                    44: "CTHEAD^CT Head^LOCAL"}),
        f"ZDS|1.2.826.0.1.3680043.8.498.{accession[3:]}^^Application^DICOM",
    ]) + "\n"


def test_a_modality_finds_the_order_the_ris_sent_in_latin1(gateway):
    hl7_port, dicom_port = gateway
    Station.objects.create(ae_title="CT_ROOM_1", station_name="CT1", modality="CT")

    ack = send(hl7_port, orm("E2E1", "E2E-P1", "Müller^Jürgen", "ACC9100001", charset="8859/1"),
               encoding="latin-1")
    assert "MSA|AA|E2E1" in ack

    [item] = findscu_worklist(dicom_port, KEYS + ["PatientID=E2E-P1"])
    assert str(item.PatientName) == "Müller^Jürgen"
    assert item.IssuerOfPatientID == "HOSP"
    assert item.PatientBirthDate == "19800214"
    assert item.PatientSex == "F"
    assert item.AccessionNumber == "ACC9100001"
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.9100001"
    assert item.RequestedProcedureID == "RPACC9100001"
    assert item.RequestedProcedureDescription == "CT Head"
    assert str(item.ReferringPhysicianName) == "Referrer^Rita^^Dr"
    assert str(item.RequestingPhysician) == "Orderly^Otto^^Dr"
    sps = item.ScheduledProcedureStepSequence[0]
    assert sps.Modality == "CT"
    assert sps.ScheduledStationAETitle == "CT_ROOM_1"
    assert sps.ScheduledProcedureStepStartDate == "20261127"
    assert sps.ScheduledProcedureStepStartTime.startswith("1000")
    assert sps.ScheduledProcedureStepID == "SPSACC9100001"
    assert sps.ScheduledProcedureStepDescription == "CT head plain"


def test_a_cancelled_order_leaves_the_worklist(gateway):
    hl7_port, dicom_port = gateway
    assert "MSA|AA" in send(hl7_port, orm("E2E2", "E2E-P2", "Doe^Jane", "ACC9100002"))
    assert len(findscu_worklist(dicom_port, KEYS + ["AccessionNumber=ACC9100002"])) == 1

    ack = send(hl7_port, orm("E2E3", "E2E-P2", "Doe^Jane", "ACC9100002", control="CA", status="CA"))
    assert "MSA|AA|E2E3" in ack
    assert findscu_worklist(dicom_port, KEYS + ["AccessionNumber=ACC9100002"]) == []


def test_a_rescheduled_order_moves_on_the_worklist(gateway):
    hl7_port, dicom_port = gateway
    send(hl7_port, orm("E2E4", "E2E-P3", "Roe^Richard", "ACC9100003", start="20261201080000"))
    ack = send(hl7_port, orm("E2E5", "E2E-P3", "Roe^Richard", "ACC9100003", control="XO",
                             start="20261203143000"))
    assert "MSA|AA|E2E5" in ack

    on_the_first = findscu_worklist(
        dicom_port, KEYS[:6] + [f"{SPS}.ScheduledProcedureStepStartDate=20261201"])
    assert "ACC9100003" not in [i.AccessionNumber for i in on_the_first]
    [item] = findscu_worklist(dicom_port, KEYS + ["AccessionNumber=ACC9100003"])
    sps = item.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledProcedureStepStartDate, sps.ScheduledProcedureStepStartTime[:4]) == (
        "20261203", "1430")


def test_a_patient_update_and_a_merge_reach_the_worklist(gateway):
    hl7_port, dicom_port = gateway
    send(hl7_port, orm("E2E6", "E2E-TEMP", "Unknown^Patient", "ACC9100004"))

    a08 = (
        "MSH|^~\\&|RIS|HOSP|GATEWAY|HOSP|20261127091000||ADT^A08|E2E7|P|2.5\r"
        "EVN|A08|20261127091000\r"
        "PID|1||E2E-TEMP^^^HOSP^MR||Known^Kate||19750505|F\r"
        "PV1|1|O\r"
    )
    assert "MSA|AA|E2E7" in send(hl7_port, a08)
    [item] = findscu_worklist(dicom_port, KEYS + ["AccessionNumber=ACC9100004"])
    assert (str(item.PatientName), item.PatientBirthDate) == ("Known^Kate", "19750505")

    a40 = (
        "MSH|^~\\&|RIS|HOSP|GATEWAY|HOSP|20261127092000||ADT^A40^ADT_A39|E2E8|P|2.5\r"
        "EVN|A40|20261127092000\r"
        "PID|1||E2E-MAIN^^^HOSP^MR||Known^Kate||19750505|F\r"
        "MRG|E2E-TEMP^^^HOSP^MR\r"
    )
    assert "MSA|AA|E2E8" in send(hl7_port, a40)
    [item] = findscu_worklist(dicom_port, KEYS + ["AccessionNumber=ACC9100004"])
    assert item.PatientID == "E2E-MAIN"
    assert findscu_worklist(dicom_port, KEYS + ["PatientID=E2E-TEMP"]) == []


def test_an_omi_with_two_steps_gives_the_modality_two_items(gateway):
    hl7_port, dicom_port = gateway
    today = datetime.date.today().strftime("%Y%m%d")
    omi = (
        "MSH|^~\\&|RIS|HOSP|GATEWAY|HOSP|20261127093000||OMI^O23^OMI_O23|E2E9|P|2.5.1|||||"
        "|UNICODE UTF-8\r"
        "PID|1||E2E-P5^^^HOSP^MR||Παπαδόπουλος^Νίκος||19660606|M\r"
        "PV1|1|I|WARD^3^2\r"
        "ORC|NW|PO9100005|FO9100005||SC\r"
        f"TQ1|1||||||{today}080000||R\r"
        "OBR|1|PO9100005|FO9100005|MRKNEE^MR Knee^LOCAL\r"
        "IPC|ACC9100005|RP9100005|1.2.826.0.1.3680043.8.498.9100005|SPSA|MR|"
        "T1^Knee T1^LOCAL|||MR_ROOM_2\r"
        "IPC|ACC9100005|RP9100005|1.2.826.0.1.3680043.8.498.9100005|SPSB|MR|"
        "T2^Knee T2^LOCAL|||MR_ROOM_2\r"
    )
    assert "MSA|AA|E2E9" in send(hl7_port, omi)

    items = findscu_worklist(
        dicom_port,
        KEYS + [f"{SPS}.ScheduledStationAETitle=MR_ROOM_2",
                f"{SPS}.ScheduledProcedureStepStartDate={today}"],
        calling_ae="MR_ROOM_2",
    )
    assert sorted(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for i in items) == [
        "SPSA", "SPSB"]
    assert {str(i.PatientName) for i in items} == {"Παπαδόπουλος^Νίκος"}
    assert {i.StudyInstanceUID for i in items} == {"1.2.826.0.1.3680043.8.498.9100005"}

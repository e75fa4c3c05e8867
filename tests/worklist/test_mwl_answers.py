"""The identifiers the worklist answers with: exactly the requested keys, unknown ones empty,
sequences filled, text in UTF-8 only when needed, and encodings a modality can read."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from tests.factories import make_item
from worklist.mwl import find_worklist

pytestmark = pytest.mark.django_db


def only_answer(query: Dataset, implicit_vr: bool = False) -> Dataset:
    """The single answer as a modality decodes it off the wire (encoded by pynetdicom)."""
    answers = list(find_worklist(query, implicit_vr=implicit_vr))
    assert len(answers) == 1
    wire = encode(answers[0], implicit_vr, True)
    return decode(BytesIO(wire), implicit_vr, True)


def keywords(ds: Dataset) -> list[str]:
    return [elem.keyword or str(elem.tag) for elem in ds]


def test_it_returns_exactly_the_requested_keys():
    make_item(patient={"name": "DOE^JANE", "patient_id": "P1"}, order={"accession_number": "A1"})
    query = Dataset()
    query.PatientName = ""
    query.AccessionNumber = ""

    answer = only_answer(query)

    assert keywords(answer) == ["AccessionNumber", "PatientName"]
    assert answer.PatientName == "DOE^JANE"
    assert answer.AccessionNumber == "A1"


def test_keys_the_gateway_does_not_know_come_back_empty():
    make_item()
    query = Dataset()
    query.PatientAge = ""
    query.EthnicGroup = ""
    query.ReferencedPatientSequence = []
    query.add_new(0x00291010, "LO", "")
    query.PatientID = ""

    answer = only_answer(query)

    assert keywords(answer) == [
        "ReferencedPatientSequence",
        "PatientID",
        "PatientAge",
        "EthnicGroup",
        "(0029,1010)",
    ]
    assert answer.PatientAge == ""
    assert answer.EthnicGroup == ""
    assert len(answer.ReferencedPatientSequence) == 0
    assert answer[0x00291010].value in ("", None, b"")
    assert answer.PatientID != ""


def test_an_empty_sps_sequence_comes_back_with_its_full_item():
    make_item(
        modality="MR",
        station_ae_title="MR1",
        station_name="MRROOM",
        location="RAD2",
        sps_id="S1",
        description="MR KNEE",
        performing_physician="HOUSE^GREGORY",
        pre_medication="NONE",
        contrast_agent="GADO",
        comments="Left knee",
        protocol_codes=[{"value": "P1", "scheme": "99X", "meaning": "Knee"}],
    )
    query = Dataset()
    query.ScheduledProcedureStepSequence = []

    sps = only_answer(query).ScheduledProcedureStepSequence[0]

    assert sps.Modality == "MR"
    assert sps.ScheduledStationAETitle == "MR1"
    assert sps.ScheduledStationName == "MRROOM"
    assert sps.ScheduledProcedureStepLocation == "RAD2"
    assert sps.ScheduledProcedureStepStartDate == "20260316"
    assert sps.ScheduledProcedureStepStartTime == "090000"
    assert sps.ScheduledProcedureStepID == "S1"
    assert sps.ScheduledProcedureStepDescription == "MR KNEE"
    assert sps.ScheduledPerformingPhysicianName == "HOUSE^GREGORY"
    assert sps.PreMedication == "NONE"
    assert sps.RequestedContrastAgent == "GADO"
    assert sps.CommentsOnTheScheduledProcedureStep == "Left knee"
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    code = sps.ScheduledProtocolCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("P1", "99X", "Knee")


def test_an_sps_item_with_keys_comes_back_with_those_keys_only():
    make_item(modality="CT")
    item = Dataset()
    item.Modality = ""
    item.ScheduledProcedureStepStartDate = ""
    query = Dataset()
    query.ScheduledProcedureStepSequence = [item]

    sps = only_answer(query).ScheduledProcedureStepSequence[0]

    assert keywords(sps) == ["Modality", "ScheduledProcedureStepStartDate"]


def test_code_sequences_with_an_empty_item_come_back_with_every_code():
    make_item(
        order={
            "requested_procedure_codes": [
                {"value": "RP1", "scheme": "LN", "meaning": "CT Head"},
                {"value": "RP2", "scheme": "LN", "meaning": "CT Neck"},
            ]
        }
    )
    query = Dataset()
    query.RequestedProcedureCodeSequence = [Dataset()]

    codes = only_answer(query).RequestedProcedureCodeSequence

    assert [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in codes] == [
        ("RP1", "LN", "CT Head"),
        ("RP2", "LN", "CT Neck"),
    ]


def test_code_sequences_with_keys_come_back_with_those_keys_per_code():
    make_item(order={"requested_procedure_codes": [{"value": "RP1", "scheme": "LN"}]})
    code = Dataset()
    code.CodeValue = ""
    code.CodeMeaning = ""
    query = Dataset()
    query.RequestedProcedureCodeSequence = [code]

    codes = only_answer(query).RequestedProcedureCodeSequence

    assert keywords(codes[0]) == ["CodeValue", "CodeMeaning"]
    assert codes[0].CodeValue == "RP1"
    assert codes[0].CodeMeaning == ""


def test_other_patient_ids_come_back_as_items():
    make_item(patient={"other_ids": [{"id": "X9", "issuer": "NAT", "type": "TEXT"}]})
    query = Dataset()
    query.OtherPatientIDsSequence = []

    other = only_answer(query).OtherPatientIDsSequence[0]

    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == (
        "X9",
        "NAT",
        "TEXT",
    )


def test_patient_and_order_details_come_back_with_their_vrs():
    make_item(
        patient={"weight_kg": "72.5", "pregnancy_status": 4, "sex": "F", "birth_date": "19800214"},
        order={"study_instance_uid": "1.2.840.99.1", "priority": "STAT", "admission_id": "V1"},
    )
    query = Dataset()
    for keyword in (
        "PatientWeight",
        "PregnancyStatus",
        "PatientSex",
        "PatientBirthDate",
        "StudyInstanceUID",
        "RequestedProcedurePriority",
        "AdmissionID",
    ):
        setattr(query, keyword, None)

    answer = only_answer(query, implicit_vr=True)

    assert answer.PatientWeight == 72.5
    assert answer.PregnancyStatus == 4
    assert answer.PatientSex == "F"
    assert answer.PatientBirthDate == "19800214"
    assert answer.StudyInstanceUID == "1.2.840.99.1"
    assert answer.RequestedProcedurePriority == "STAT"
    assert answer.AdmissionID == "V1"


def test_a_weight_that_is_not_a_decimal_string_comes_back_empty():
    make_item(patient={"weight_kg": "about 70"})
    query = Dataset()
    query.PatientWeight = None

    assert only_answer(query).PatientWeight is None


def test_non_ascii_answers_are_utf8_with_their_character_set():
    make_item(patient={"name": "MÜLLER^JÜRGEN"})
    query = Dataset()
    query.PatientName = ""
    query.ScheduledProcedureStepSequence = []

    answers = list(find_worklist(query))
    wire = encode(answers[0], False, True)

    assert "MÜLLER".encode() in wire
    answer = decode(BytesIO(wire), False, True)
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert answer.PatientName == "MÜLLER^JÜRGEN"


@pytest.mark.parametrize("query_charset", [None, "ISO_IR 100"])
def test_ascii_answers_carry_no_character_set(query_charset):
    make_item(patient={"name": "MULLER^JURGEN"})
    query = Dataset()
    if query_charset:
        query.SpecificCharacterSet = query_charset
    query.PatientName = ""

    answer = only_answer(query)

    assert "SpecificCharacterSet" not in answer
    assert answer.PatientName == "MULLER^JURGEN"


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_answers_decode_the_same_in_either_vr_encoding(implicit_vr):
    make_item(patient={"name": "DOE^JOHN"}, modality="CT", sps_id="S7")
    query = Dataset()
    query.PatientName = ""
    query.ScheduledProcedureStepSequence = []

    answer = only_answer(query, implicit_vr=implicit_vr)

    assert answer.PatientName == "DOE^JOHN"
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "S7"
    assert answer.ScheduledProcedureStepSequence[0].Modality == "CT"

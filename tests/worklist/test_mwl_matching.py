"""Modality Worklist matching (PS3.4 C.2.2.2) translated to SQL: each test runs real queries
against real rows and checks which worklist items come back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from pydicom.dataset import Dataset

from tests.factories import DAY, at, bulk_steps, make_item, make_order, make_patient, make_step
from worklist.models import StepStatus
from worklist.mwl import InvalidIdentifier, WorklistOptions, find_worklist

pytestmark = pytest.mark.django_db


def mwl_query(sps: dict | None = None, **top) -> Dataset:
    """An identifier with the given top-level keys and SPS item keys; it always asks for the
    SPS ID so tests can tell the answers apart."""
    ds = Dataset()
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.ScheduledProcedureStepID = ""
    for keyword, value in (sps or {}).items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = [item]
    return ds


def matched(query: Dataset, **kwargs) -> list[str]:
    return [
        answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
        for answer in find_worklist(query, **kwargs)
    ]


# --- PS3.4 C.2.2.2.1 single value -----------------------------------------------------------


def test_it_matches_patient_name_case_insensitively():
    make_item(patient={"name": "Smith^John"}, sps_id="S1")
    make_item(patient={"name": "SMITHSON^JOHN"}, sps_id="S2")

    assert matched(mwl_query(PatientName="smith^JOHN")) == ["S1"]


def test_it_ignores_trailing_empty_name_components():
    make_item(patient={"name": "SMITH^JOHN"}, sps_id="S1")

    assert matched(mwl_query(PatientName="SMITH^JOHN^^")) == ["S1"]


def test_it_matches_other_single_values_exactly_and_case_sensitively():
    make_item(order={"accession_number": "A100"}, sps_id="S1")
    make_item(order={"accession_number": "A1000"}, sps_id="S2")
    make_item(order={"accession_number": "a100"}, sps_id="S3")

    assert matched(mwl_query(AccessionNumber="A100")) == ["S1"]


def test_any_of_several_values_matches():
    make_item(modality="CT", sps_id="S1")
    make_item(modality="MR", sps_id="S2")
    make_item(modality="US", sps_id="S3")

    assert sorted(matched(mwl_query({"Modality": ["MR", "CT"]}))) == ["S1", "S2"]


def test_it_matches_patient_id_and_issuer():
    make_item(patient={"patient_id": "P1", "issuer": "HOSP"}, sps_id="S1")
    make_item(patient={"patient_id": "P1", "issuer": "OTHER"}, sps_id="S2")

    assert matched(mwl_query(PatientID="P1", IssuerOfPatientID="HOSP")) == ["S1"]


def test_it_matches_pregnancy_status_as_a_number():
    make_item(patient={"pregnancy_status": 4}, sps_id="S1")
    make_item(patient={"pregnancy_status": 1}, sps_id="S2")

    assert matched(mwl_query(PregnancyStatus=4)) == ["S1"]


# --- PS3.4 C.2.2.2.3 universal ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "*", "**"])
def test_an_empty_or_asterisk_only_key_is_universal(value):
    make_item(patient={"name": "SMITH^JOHN"}, sps_id="S1")
    make_item(patient={"name": ""}, sps_id="S2")

    assert sorted(matched(mwl_query(PatientName=value))) == ["S1", "S2"]


# --- PS3.4 C.2.2.2.4 wildcard -----------------------------------------------------------------


def test_it_matches_patient_name_with_wildcards():
    make_item(patient={"name": "SMITH^JOHN"}, sps_id="S1")
    make_item(patient={"name": "Smyth^Jane"}, sps_id="S2")
    make_item(patient={"name": "JONES^SMITH"}, sps_id="S3")

    assert sorted(matched(mwl_query(PatientName="sm*"))) == ["S1", "S2"]
    assert matched(mwl_query(PatientName="SMI?H^*")) == ["S1"]
    assert matched(mwl_query(PatientName="*^SMITH")) == ["S3"]


def test_it_treats_sql_like_characters_in_values_literally():
    make_item(patient={"patient_id": "AB_1"}, sps_id="S1")
    make_item(patient={"patient_id": "ABX1"}, sps_id="S2")
    make_item(patient={"patient_id": "50%OFF"}, sps_id="S3")
    make_item(patient={"patient_id": "50XOFF"}, sps_id="S4")

    assert matched(mwl_query(PatientID="AB_*")) == ["S1"]
    assert matched(mwl_query(PatientID="50%*")) == ["S3"]
    assert matched(mwl_query(PatientID="AB_1")) == ["S1"]


def test_it_matches_station_ae_titles_with_wildcards_inside_the_sps_item():
    make_item(station_ae_title="CT_EAST", sps_id="S1")
    make_item(station_ae_title="CT_WEST", sps_id="S2")
    make_item(station_ae_title="MR_EAST", sps_id="S3")

    assert matched(mwl_query({"ScheduledStationAETitle": "CT?EAST"})) == ["S1"]
    assert sorted(matched(mwl_query({"ScheduledStationAETitle": "*EAST"}))) == ["S1", "S3"]


def test_it_matches_performing_physician_names_case_insensitively():
    make_item(performing_physician="House^Gregory", sps_id="S1")
    make_item(performing_physician="WILSON^JAMES", sps_id="S2")

    assert matched(mwl_query({"ScheduledPerformingPhysicianName": "HOUSE*"})) == ["S1"]


# --- PS3.4 C.2.2.2.2 list of UID --------------------------------------------------------------


def test_it_matches_a_list_of_study_instance_uids():
    make_item(order={"study_instance_uid": "1.2.3.1"}, sps_id="S1")
    make_item(order={"study_instance_uid": "1.2.3.2"}, sps_id="S2")
    make_item(order={"study_instance_uid": "1.2.3.3"}, sps_id="S3")

    assert sorted(matched(mwl_query(StudyInstanceUID=["1.2.3.1", "1.2.3.3"]))) == ["S1", "S3"]
    assert matched(mwl_query(StudyInstanceUID="1.2.3.2")) == ["S2"]


# --- PS3.4 C.2.2.2.5 range --------------------------------------------------------------------


def test_it_matches_a_single_scheduled_date_as_the_whole_day():
    make_item(start=DAY.replace(hour=0), sps_id="S1")
    make_item(start=DAY.replace(hour=23, minute=59, second=59), sps_id="S2")
    make_item(start=DAY + timedelta(days=1), sps_id="S3")
    make_item(start=None, sps_id="S4")

    assert matched(mwl_query({"ScheduledProcedureStepStartDate": "20260316"})) == ["S1", "S2"]


def test_it_matches_scheduled_date_ranges_including_open_ends():
    make_item(start=DAY - timedelta(days=1), sps_id="S1")
    make_item(start=DAY, sps_id="S2")
    make_item(start=DAY + timedelta(days=2), sps_id="S3")

    assert matched(mwl_query({"ScheduledProcedureStepStartDate": "20260316-20260317"})) == ["S2"]
    assert matched(mwl_query({"ScheduledProcedureStepStartDate": "20260316-"})) == ["S2", "S3"]
    assert matched(mwl_query({"ScheduledProcedureStepStartDate": "-20260316"})) == ["S1", "S2"]


def test_it_matches_a_time_range_on_any_day():
    make_item(start=at("0800"), sps_id="S1")
    make_item(start=at("1230", DAY + timedelta(days=3)), sps_id="S2")
    make_item(start=at("1900"), sps_id="S3")

    assert matched(mwl_query({"ScheduledProcedureStepStartTime": "0800-1300"})) == ["S1", "S2"]
    assert matched(mwl_query({"ScheduledProcedureStepStartTime": "12"})) == ["S2"]


def test_a_time_range_end_covers_the_precision_given():
    make_item(start=at("1259").replace(second=30), sps_id="S1")

    assert matched(mwl_query({"ScheduledProcedureStepStartTime": "-1259"})) == ["S1"]
    assert matched(mwl_query({"ScheduledProcedureStepStartTime": "-125829"})) == []


def test_it_combines_date_and_time_ranges_into_one_datetime_range():
    # PS3.4 C.2.2.2.5.2: 20260316-20260317 with 1000-1800 runs from Mar 16 10:00 to
    # Mar 17 18:00; Mar 16 20:00 is inside although 20:00 is outside 10:00-18:00.
    make_item(start=at("0900"), sps_id="S1")
    make_item(start=at("2000"), sps_id="S2")
    make_item(start=at("1700", DAY + timedelta(days=1)), sps_id="S3")
    make_item(start=at("1900", DAY + timedelta(days=1)), sps_id="S4")

    query = mwl_query(
        {
            "ScheduledProcedureStepStartDate": "20260316-20260317",
            "ScheduledProcedureStepStartTime": "1000-1800",
        }
    )
    assert matched(query) == ["S2", "S3"]


def test_a_single_date_with_a_time_range_matches_that_window_of_that_day():
    make_item(start=at("0730"), sps_id="S1")
    make_item(start=at("0930"), sps_id="S2")
    make_item(start=at("0930", DAY + timedelta(days=1)), sps_id="S3")

    query = mwl_query(
        {"ScheduledProcedureStepStartDate": "20260316", "ScheduledProcedureStepStartTime": "0800-"}
    )
    assert matched(query) == ["S2"]


@pytest.mark.parametrize(
    "sps",
    [
        {"ScheduledProcedureStepStartDate": "20260101-20250101"},
        {"ScheduledProcedureStepStartTime": "1800-0800"},
    ],
)
def test_an_inverted_range_matches_nothing(sps):
    make_item(start=at("0900"), sps_id="S1")

    assert matched(mwl_query(sps)) == []


def test_it_matches_birth_date_ranges_and_skips_unknown_birth_dates():
    make_item(patient={"birth_date": "19491231"}, sps_id="S1")
    make_item(patient={"birth_date": "19650704"}, sps_id="S2")
    make_item(patient={"birth_date": ""}, sps_id="S3")

    assert matched(mwl_query(PatientBirthDate="-19501231")) == ["S1"]
    assert matched(mwl_query(PatientBirthDate="19500101-19991231")) == ["S2"]
    assert matched(mwl_query(PatientBirthDate="19650704")) == ["S2"]


# --- PS3.4 C.2.2.2.6 sequence -----------------------------------------------------------------


def test_it_matches_every_key_inside_the_sps_item():
    make_item(modality="CT", station_ae_title="CT1", sps_id="S1")
    make_item(modality="CT", station_ae_title="CT2", sps_id="S2")
    make_item(modality="MR", station_ae_title="CT1", sps_id="S3")

    query = mwl_query({"Modality": "CT", "ScheduledStationAETitle": "CT1"})
    assert matched(query) == ["S1"]


@pytest.mark.skipif(
    not connection.features.supports_json_field_contains, reason="needs JSON containment"
)
def test_it_matches_a_scheduled_protocol_code_inside_the_sps_item():
    make_item(protocol_codes=[{"value": "P1", "scheme": "99X", "meaning": "Head"}], sps_id="S1")
    make_item(protocol_codes=[{"value": "P2", "scheme": "99X", "meaning": "Chest"}], sps_id="S2")
    code = Dataset()
    code.CodeValue = "P2"
    code.CodingSchemeDesignator = "99X"

    assert matched(mwl_query({"ScheduledProtocolCodeSequence": [code]})) == ["S2"]


# --- What the worklist holds ------------------------------------------------------------------


def test_it_returns_only_steps_a_modality_should_perform():
    for status in StepStatus.values:
        make_item(status=status, sps_id=status[:16])

    assert sorted(matched(mwl_query())) == ["ARRIVED", "READY", "SCHEDULED"]


def test_an_explicit_status_is_matched_among_the_states_a_modality_may_ask_for():
    for status in StepStatus.values:
        make_item(status=status, sps_id=status[:16])

    assert matched(mwl_query({"ScheduledProcedureStepStatus": "STARTED"})) == ["STARTED"]
    assert matched(mwl_query({"ScheduledProcedureStepStatus": "COMPLETED"})) == []
    assert matched(mwl_query({"ScheduledProcedureStepStatus": "CANCELLED"})) == []


def test_without_a_station_key_the_restriction_keeps_the_calling_station_only():
    make_item(station_ae_title="CT1", sps_id="S1")
    make_item(station_ae_title="CT2", sps_id="S2")
    mine = WorklistOptions(restrict_to_station="CT1")

    assert matched(mwl_query(), options=mine) == ["S1"]
    assert matched(mwl_query({"ScheduledStationAETitle": ""}), options=mine) == ["S1"]
    assert matched(mwl_query({"ScheduledStationAETitle": "CT2"}), options=mine) == ["S2"]
    assert sorted(matched(mwl_query())) == ["S1", "S2"]


def test_answers_come_in_scheduled_order_and_stop_at_the_limit():
    make_item(start=at("1100"), sps_id="S3")
    make_item(start=at("0900"), sps_id="S1")
    make_item(start=at("1000"), sps_id="S2")
    make_item(start=None, sps_id="S4")

    assert matched(mwl_query()) == ["S1", "S2", "S3", "S4"]
    assert matched(mwl_query(), limit=2) == ["S1", "S2"]


def test_a_large_answer_streams_past_the_first_page_without_gaps_or_repeats():
    bulk_steps(180, start=DAY, every=timedelta(minutes=0))  # equal starts: order by pk
    bulk_steps(20, start=DAY - timedelta(hours=1), every=timedelta(minutes=1))
    make_step(make_order(make_patient()), start=None, sps_id="LAST")

    found = matched(mwl_query(), chunk_size=7)
    assert len(found) == 201 and len(set(found)) == 201
    assert found[-1] == "LAST"
    assert len(matched(mwl_query(), limit=120, chunk_size=7)) == 120


# --- Identifiers that cannot be answered ------------------------------------------------------


@pytest.mark.parametrize(
    "top, sps",
    [
        ({"PatientBirthDate": "2026XX01"}, {}),
        ({"PatientBirthDate": "20260230"}, {}),
        ({}, {"ScheduledProcedureStepStartDate": "2026*"}),
        ({}, {"ScheduledProcedureStepStartTime": "2500"}),
        ({}, {"ScheduledProcedureStepStartDate": "20260101-20260201-20260301"}),
        ({"StudyInstanceUID": "not-a-uid"}, {}),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_it_rejects_values_their_vr_does_not_allow(top, sps):
    with pytest.raises(InvalidIdentifier):
        find_worklist(mwl_query(sps, **top))


def test_it_rejects_an_sps_sequence_with_two_items():
    query = mwl_query()
    query.ScheduledProcedureStepSequence.append(Dataset())

    with pytest.raises(InvalidIdentifier):
        find_worklist(query)

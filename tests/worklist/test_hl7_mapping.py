"""HL7 v2 fields to worklist values (IHE SWF RAD-4), per field, version, charset and encoding."""

from datetime import UTC, datetime

import pytest

from tests.fixtures_hl7 import DATA, message, msh, obr, orc, orm, pid, pv1, seg
from worklist.models import HL7Message, ImagingOrder, Patient, ScheduledStep, Station

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("status_mappings")]


def only_order() -> ImagingOrder:
    return ImagingOrder.objects.select_related("patient").get()


class TestPatientMapping:
    def test_it_maps_pid_3_to_patient_id_issuer_and_other_ids(self, hl7):
        ack = hl7(message(msh(), seg("PID", {3: "PAT9^^^HOSP&1.2.3&ISO^MR~NAT55^^^STATE^NI",
                                             5: "Roe^Jane"}), orc(), obr()))
        assert ack.code == "AA"
        patient = Patient.objects.get()
        assert (patient.patient_id, patient.issuer) == ("PAT9", "HOSP")
        assert patient.other_ids == [{"id": "NAT55", "issuer": "STATE", "type": "NI"}]

    def test_it_takes_the_universal_id_when_the_issuer_has_no_namespace(self, hl7):
        hl7(message(msh(), seg("PID", {3: "PAT9^^^&1.2.3.4&ISO"}), orc(), obr()))
        assert Patient.objects.get().issuer == "1.2.3.4"

    def test_it_reorders_xpn_into_dicom_person_name(self, hl7):
        hl7(message(msh(), pid(name="Doe^John^Quincy^Jr^Dr^PhD"), orc(), obr()))
        patient = Patient.objects.get()
        assert patient.name == "Doe^John^Quincy^Dr^Jr"
        assert patient.name_key == "DOE^JOHN^QUINCY^DR^JR"

    def test_it_strips_trailing_empty_name_components(self, hl7):
        hl7(message(msh(), pid(name="Doe^John^^^^"), orc(), obr()))
        assert Patient.objects.get().name == "Doe^John"

    def test_it_keeps_birth_date_and_maps_sex(self, hl7):
        hl7(message(msh(), pid(birth_date="197001011230", sex="F"), orc(), obr()))
        patient = Patient.objects.get()
        assert (patient.birth_date, patient.sex) == ("19700101", "F")

    @pytest.mark.parametrize("hl7_sex,dicom_sex", [("M", "M"), ("F", "F"), ("O", "O"),
                                                  ("A", "O"), ("U", ""), ("N", "")])
    def test_it_maps_administrative_sex(self, hl7, hl7_sex, dicom_sex):
        hl7(message(msh(), pid(sex=hl7_sex), orc(), obr()))
        assert Patient.objects.get().sex == dicom_sex

    def test_it_refuses_a_birth_date_that_is_not_a_date(self, hl7):
        ack = hl7(message(msh(), pid(birth_date="1970-01-01"), orc(), obr()))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "PID-7" in ack.error_text
        assert not Patient.objects.exists()

    def test_it_keeps_allergies_from_al1(self, hl7):
        hl7(message(msh(), pid(), seg("AL1", {1: "1", 2: "DA", 3: "^Iodine contrast"}),
                    orc(), obr()))
        assert Patient.objects.get().allergies == "Iodine contrast"


    def test_it_takes_the_weight_from_a_body_weight_obx(self, hl7):
        hl7(message(msh(), pid(), seg("OBX", {1: "1", 2: "NM", 3: "3141-9^Body weight^LN",
                                               5: "154", 6: "[lb_av]"}), orc(), obr()))
        assert Patient.objects.get().weight_kg == "69.9"


class TestOrderMapping:
    def test_it_maps_the_ihe_order_fields(self, hl7):
        ack = hl7(orm())
        assert ack.code == "AA"
        order = only_order()
        assert order.placer_order_number == "PL0001"
        assert order.filler_order_number == "FL0001"
        assert order.accession_number == "ACC0001"
        assert order.requested_procedure_id == "RP0001"
        assert order.requested_procedure_description == "CT Head"
        assert order.requested_procedure_codes == [
            {"value": "CTHEAD", "meaning": "CT Head", "scheme": "LOCAL"}]
        assert order.requesting_physician == "House^Gregory^^Dr"
        assert order.referring_physician == "Welby^Marcus^A^Dr^III"
        assert order.admission_id == "V0001"
        assert order.patient_location == "RAD^101^1"
        assert order.reason == "Headache"
        assert order.priority == "ROUTINE"
        assert (order.sending_application, order.sending_facility) == ("RIS", "RADIOLOGY")
        assert order.last_message == HL7Message.objects.get()

    def test_it_maps_the_scheduled_step(self, hl7):
        hl7(orm())
        step = ScheduledStep.objects.get()
        assert step.sps_id == "SPS0001"
        assert step.modality == "CT"
        assert step.start == datetime(2026, 1, 20, 9, 30, tzinfo=UTC)
        assert step.description == "CT Head without contrast"
        assert step.protocol_codes == [
            {"value": "CTH01", "meaning": "CT Head without contrast", "scheme": "LOCAL"}]
        assert step.status == "SCHEDULED"

    def test_it_falls_back_to_obr_4_components_1_to_3_for_the_protocol(self, hl7):
        hl7(message(msh(), pid(), orc(), obr(**{"f4": "MRBR^MR Brain^L", "f44": ""})))
        step = ScheduledStep.objects.get()
        assert step.description == "MR Brain"
        assert only_order().requested_procedure_description == "MR Brain"

    def test_it_reads_past_segments_it_does_not_map(self, hl7):
        ack = hl7(message(msh(), pid(), seg("NK1", {1: "1", 2: "Doe^Jane"}), pv1(),
                          seg("IN1", {1: "1", 2: "PLAN^Insurance", 49: "x"}),
                          seg("GT1", {1: "1", 3: "Doe^John"}), orc(),
                          seg("DG1", {1: "1", 3: "R51^Headache^I10"}), obr()))
        assert ack.code == "AA"
        order = only_order()
        assert (order.admission_id, order.accession_number) == ("V0001", "ACC0001")

    def test_it_takes_order_numbers_from_obr_when_orc_has_none(self, hl7):
        hl7(message(msh(), pid(), orc(placer="", filler=""), obr(placer="OP1", filler="OF1")))
        order = only_order()
        assert (order.placer_order_number, order.filler_order_number) == ("OP1", "OF1")

    def test_it_keeps_the_study_instance_uid_from_zds(self, hl7):
        hl7(message(msh(), pid(), orc(), obr(), seg("ZDS", {1: "1.2.3.4.5^RIS^Application^DICOM"})))
        assert only_order().study_instance_uid == "1.2.3.4.5"

    def test_it_generates_a_study_instance_uid_under_the_configured_root(self, hl7, settings):
        settings.GATEWAY_UID_ROOT = "1.2.826.0.1.3680043.10.999"
        hl7(orm())
        uid = only_order().study_instance_uid
        assert uid.startswith("1.2.826.0.1.3680043.10.999.")
        assert len(uid) <= 64

    def test_it_refuses_an_invalid_study_instance_uid(self, hl7):
        ack = hl7(message(msh(), pid(), orc(), obr(), seg("ZDS", {1: "1.2.abc"})))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "UID" in ack.error_text

    @pytest.mark.parametrize("hl7_priority,dicom", [("S", "STAT"), ("A", "HIGH"),
                                                    ("R", "ROUTINE"), ("LOW", "LOW"),
                                                    ("Z", "")])
    def test_it_maps_orc_7_6_priority(self, hl7, hl7_priority, dicom):
        hl7(message(msh(), pid(), orc(priority=hl7_priority), obr()))
        assert only_order().priority == dicom

    def test_it_falls_back_to_obr_27_for_priority_and_start(self, hl7):
        hl7(message(msh(), pid(), orc(start="", priority=""),
                    obr(**{"f27": "^^^202602031415^^S"})))
        assert only_order().priority == "STAT"
        assert ScheduledStep.objects.get().start == datetime(2026, 2, 3, 14, 15, tzinfo=UTC)

    def test_it_refuses_a_start_time_that_is_not_a_date(self, hl7):
        ack = hl7(message(msh(), pid(), orc(start="tomorrow"), obr()))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "ORC-7.4" in ack.error_text

    def test_it_refuses_an_accession_number_longer_than_dicom_allows(self, hl7):
        ack = hl7(orm(accession="ACC-0123456789-XYZ"))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "OBR-18" in ack.error_text and "16" in ack.error_text
        assert not ImagingOrder.objects.exists()

    def test_it_shortens_free_text_to_the_dicom_length(self, hl7):
        hl7(message(msh(), pid(), orc(), obr(**{"f44": "X^" + "very long description " * 5})))
        assert len(only_order().requested_procedure_description) == 64

    def test_it_defaults_procedure_and_step_ids_to_the_accession_number(self, hl7):
        hl7(orm(rp_id="", sps_id=""))
        order = only_order()
        assert order.requested_procedure_id == "ACC0001"
        assert order.steps.get().sps_id == "ACC0001"


class TestStationRouting:
    def test_it_takes_the_station_from_the_most_specific_station_row(self, hl7):
        Station.objects.create(ae_title="ANY_CT", modality="CT")
        Station.objects.create(ae_title="RAD_CT", station_name="CT ROOM 1", modality="CT",
                               location="RAD")
        Station.objects.create(ae_title="RAD_ANY", location="RAD")
        hl7(orm())
        step = ScheduledStep.objects.get()
        assert (step.station_ae_title, step.station_name) == ("RAD_CT", "CT ROOM 1")

    def test_it_prefers_a_modality_row_to_a_location_row(self, hl7):
        Station.objects.create(ae_title="ANY_CT", modality="CT")
        Station.objects.create(ae_title="RAD_ANY", location="RAD")
        hl7(orm())
        assert ScheduledStep.objects.get().station_ae_title == "ANY_CT"

    def test_it_routes_again_when_an_update_changes_the_modality(self, hl7):
        Station.objects.create(ae_title="CT_1", modality="CT")
        Station.objects.create(ae_title="MR_1", modality="MR")
        hl7(orm(control_id="A1"))
        assert ScheduledStep.objects.get().station_ae_title == "CT_1"
        hl7(orm(control_id="A2", control="XO", modality="MR"))
        assert ScheduledStep.objects.get().station_ae_title == "MR_1"

    def test_it_ignores_disabled_stations(self, hl7):
        Station.objects.create(ae_title="OLD_CT", modality="CT", enabled=False)
        hl7(orm())
        assert ScheduledStep.objects.get().station_ae_title == ""


class TestVersions:
    @pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
    def test_it_accepts_orm_in_every_supported_version(self, hl7, version):
        ack = hl7(orm(version=version))
        assert ack.code == "AA"
        assert ack.field("MSH", 12) == version
        assert ScheduledStep.objects.get().start == datetime(2026, 1, 20, 9, 30, tzinfo=UTC)

    def test_it_reads_tq1_for_start_and_priority_in_v2_5(self, hl7):
        hl7(message(msh(version="2.5"), pid(), orc(start="", priority=""),
                    seg("TQ1", {1: "1", 7: "20260301080000", 9: "S^Stat^HL70485"}), obr()))
        assert only_order().priority == "STAT"
        assert ScheduledStep.objects.get().start == datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class TestCharsets:
    def test_it_decodes_8859_1(self, hl7):
        raw = message(msh(charset="8859/1"), pid(name="Müller^Jürgen"), orc(), obr())
        ack = hl7(raw.decode("utf-8").encode("latin-1"))
        assert ack.code == "AA"
        assert Patient.objects.get().name == "Müller^Jürgen"
        assert ack.field("MSH", 18) == "8859/1"

    def test_it_decodes_utf_8_greek_and_japanese(self, hl7):
        hl7(message(msh(charset="UNICODE UTF-8"), pid(name="Παπαδόπουλος^Γιώργος"),
                    orc(), obr()))
        hl7(message(msh(control_id="MSG0002", charset="UTF-8"),
                    pid(patient_id="PAT002", name="山田^太郎"),
                    orc(placer="PL2", filler="FL2"), obr(placer="PL2", filler="FL2")))
        names = set(Patient.objects.values_list("name", flat=True))
        assert names == {"Παπαδόπουλος^Γιώργος", "山田^太郎"}

    def test_it_encodes_the_ack_in_the_message_charset(self, hl7):
        raw = message(msh(charset="8859/1", app="RIS-Ä"), pid(), orc(), obr())
        ack = hl7(raw.decode("utf-8").encode("latin-1"))
        assert "RIS-Ä".encode("latin-1") in ack.raw

    def test_it_falls_back_to_latin_1_without_msh_18(self, hl7):
        raw = message(msh(), pid(name="Müller^Jürgen"), orc(), obr())
        hl7(raw.decode("utf-8").encode("latin-1"))
        assert Patient.objects.get().name == "Müller^Jürgen"

    def test_it_reads_utf_8_without_msh_18(self, hl7):
        hl7(message(msh(), pid(name="Müller^Jürgen"), orc(), obr()))
        assert Patient.objects.get().name == "Müller^Jürgen"

    def test_it_refuses_bytes_that_are_not_the_declared_charset(self, hl7):
        raw = message(msh(charset="UNICODE UTF-8"), pid(name="Müller"), orc(), obr())
        ack = hl7(raw.decode("utf-8").encode("latin-1"))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "MSH-18" in ack.error_text
        assert HL7Message.objects.get().status == "ERROR"

    def test_it_rejects_an_unknown_charset(self, hl7):
        ack = hl7(message(msh(charset="KLINGON"), pid(), orc(), obr()))
        assert (ack.code, ack.error_code) == ("AR", "103")


class TestEncoding:
    def test_it_resolves_escape_sequences(self, hl7):
        hl7(message(msh(), pid(name=r"O\F\Brien\S\X^Ann\E\Marie\T\B"), orc(), obr()))
        # The delimiters come back as text; DICOM PN cannot hold ^ or \, so they are spaced.
        assert Patient.objects.get().name == "O|Brien X^Ann/Marie&B"

    def test_it_decodes_hex_escapes_in_the_message_charset(self, hl7):
        hl7(message(msh(charset="UNICODE UTF-8"), pid(name=r"M\XC3BC\ller^J\XC3\\XBC\rgen"),
                    orc(), obr()))
        assert Patient.objects.get().name == "Müller^Jürgen"

    def test_it_tolerates_formatting_escapes(self, hl7):
        note = seg("NTE", {3: "line one\\.br\\line two\\H\\!\\N\\"})
        hl7(message(msh(), pid(), orc(), obr(), note))
        assert ScheduledStep.objects.get().comments == "line one\nline two!"

    def test_it_reads_custom_delimiters(self, hl7):
        raw = "\r".join([
            msh("ORM$O01", f="#", encoding="$*@%"),
            "PID#1##PAT7$$$HOSP##Doe$Jane##19800101#F",
            "ORC#NW#PL7#FL7##SC##$$$20260120093000$$S",
            "OBR#1#PL7#FL7#CT1$CT Chest$L" + "#" * 14 + "ACC7#RP7#SPS7####CT",
        ]).encode()
        ack = hl7(raw)
        assert ack.code == "AA"
        assert ack.raw.startswith(b"MSH#$*@%#")
        assert ack.field("MSH", 9) == "ACK$O01$ACK"
        order = only_order()
        assert (order.patient.name, order.accession_number, order.priority) == (
            "Doe^Jane", "ACC7", "STAT")

    @pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
    def test_it_splits_segments_on_cr_lf_or_crlf(self, hl7, terminator):
        ack = hl7(message(msh(), pid(), pv1(), orc(), obr(), terminator=terminator))
        assert ack.code == "AA"
        assert only_order().admission_id == "V0001"

    def test_it_clears_a_value_sent_as_explicit_null(self, hl7):
        hl7(orm())
        hl7(message(msh(control_id="MSG0002"), pid(birth_date='""'), orc(control="XO"), obr()))
        assert Patient.objects.get().birth_date == ""

    def test_it_leaves_a_value_that_was_not_sent(self, hl7):
        hl7(orm())
        hl7(message(msh(control_id="MSG0002"), pid(birth_date=""), orc(control="XO"), obr()))
        assert Patient.objects.get().birth_date == "19700101"


class TestSampleFiles:
    def test_it_accepts_the_sample_messages_in_sequence(self, hl7):
        for path in sorted(DATA.glob("*.hl7")):
            ack = hl7(path.read_bytes())
            assert ack.code == "AA", (path.name, ack.text)
        assert ImagingOrder.objects.count() == 5
        assert ScheduledStep.objects.count() == 7
        cancelled = ImagingOrder.objects.get(placer_order_number="PL0001")
        assert cancelled.status == "CANCELLED"
        # A cancelled order stays with the prior patient of the merge.
        assert cancelled.patient.patient_id == "PAT001"
        assert Patient.objects.get(patient_id="PAT001").merged_into.patient_id == "PAT900"
        assert Patient.objects.get(patient_id="PAT251").name == "山田^太郎"

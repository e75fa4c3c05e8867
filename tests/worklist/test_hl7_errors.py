"""What a RIS sees for messages the gateway will not apply, and the ACK's form."""

import pytest

from tests.fixtures_hl7 import message, msh, obr, orc, orm, pid, seg
from worklist.models import HL7Message, ImagingOrder, Patient

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("status_mappings")]


class TestAckForm:
    def test_it_mirrors_the_header_in_the_ack(self, hl7):
        raw = message(msh("ORM^O01^ORM_O01", "CTRL1", "2.5.1", processing_id="T",
                          charset="UNICODE UTF-8"), pid(), orc(), obr())
        ack = hl7(raw)
        assert ack.code == "AA"
        assert [ack.field("MSH", n) for n in (3, 4, 5, 6)] == [
            "GATEWAY", "HOSPITAL", "RIS", "RADIOLOGY"]
        assert ack.field("MSH", 9) == "ACK^O01^ACK"
        assert (ack.field("MSH", 11), ack.field("MSH", 12), ack.field("MSH", 18)) == (
            "T", "2.5.1", "UNICODE UTF-8")
        assert ack.field("MSH", 10) and ack.field("MSH", 10) != "CTRL1"
        assert ack.control_id == "CTRL1"
        assert not ack.segment("ERR")

    def test_it_gives_each_ack_its_own_control_id(self, hl7):
        first = hl7(orm(control_id="A1"))
        second = hl7(orm(control_id="A2"))
        assert first.field("MSH", 10) != second.field("MSH", 10)

    def test_it_reports_errors_in_err_3_4_and_8_from_version_2_5(self, hl7):
        ack = hl7(message(msh(version="2.5"), seg("PID", {1: "1", 5: "Doe^John"}), orc(),
                          obr()))
        err = ack.segment("ERR")
        assert err[2] == "PID^1^3"
        assert err[3] == "101^Required field missing^HL70357"
        assert err[4] == "E"
        assert err[8] == "PID-3 (patient identifier) is required"

    def test_it_reports_errors_in_err_1_before_version_2_5(self, hl7):
        ack = hl7(message(msh(version="2.4"), seg("PID", {1: "1", 5: "Doe^John"}), orc(),
                          obr()))
        assert ack.segment("ERR")[1] == "PID^1^3^101&Required field missing&HL70357"
        assert ack.field("MSA", 3) == "PID-3 (patient identifier) is required"

    def test_it_escapes_delimiters_in_error_texts(self, hl7):
        ack = hl7(message(msh(), pid(birth_date="1970|01"), orc(), obr()))
        assert ack.code == "AE"
        assert "|" not in ack.field("MSA", 3)


class TestRefusals:
    def test_it_refuses_an_order_without_pid(self, hl7):
        ack = hl7(message(msh(), orc(), obr()))
        assert (ack.code, ack.control_id, ack.error_code) == ("AE", "MSG0001", "101")
        assert "PID-3 (patient identifier) is required" in ack.error_text
        record = HL7Message.objects.get()
        assert (record.status, record.error_code) == ("ERROR", "101")
        assert not ImagingOrder.objects.exists() and not Patient.objects.exists()

    def test_it_refuses_an_order_without_order_numbers(self, hl7):
        ack = hl7(message(msh(), pid(), orc(placer="", filler=""),
                          obr(placer="", filler="", accession="")))
        assert (ack.code, ack.error_code) == ("AE", "101")
        assert "ORC-2" in ack.error_text

    def test_it_refuses_an_order_without_orc(self, hl7):
        ack = hl7(message(msh(), pid()))
        assert (ack.code, ack.error_code) == ("AE", "101")
        assert "ORC" in ack.error_text

    def test_it_refuses_obr_before_orc(self, hl7):
        ack = hl7(message(msh(), pid(), obr(), orc()))
        assert (ack.code, ack.error_code) == ("AE", "100")

    def test_it_rejects_bytes_without_msh(self, hl7):
        ack = hl7(b"PID|||123\rORC|NW\r")
        assert (ack.code, ack.error_code) == ("AR", "100")
        assert ack.raw.startswith(b"MSH|^~\\&|")
        record = HL7Message.objects.get()
        assert (record.status, bytes(record.raw)) == ("REJECTED", b"PID|||123\rORC|NW\r")

    @pytest.mark.parametrize("before, charset", [
        (b"\x0c", ""),  # a form feed some interfaces put between messages
        (b"\xef\xbb\xbf", "8859/1"),  # a UTF-8 byte order mark, then Latin-1 text
    ])
    def test_it_reads_msh_after_padding_before_it(self, hl7, before, charset):
        raw = message(msh(control_id="PADDED1", charset=charset), pid(), orc(), obr())
        ack = hl7(before + raw)
        assert (ack.code, ack.control_id) == ("AA", "PADDED1")
        record = HL7Message.objects.get()
        assert (record.control_id, record.sending_application) == ("PADDED1", "RIS")
        assert ImagingOrder.objects.get().sending_application == "RIS"

    def test_it_rejects_garbage(self, hl7):
        ack = hl7(bytes(range(256)))
        assert ack.code == "AR"

    def test_it_rejects_an_empty_message(self, hl7):
        assert hl7(b"").code == "AR"

    def test_it_rejects_an_unknown_message_type(self, hl7):
        ack = hl7(message(msh("ORU^R01", "RES1"), pid()))
        assert (ack.code, ack.control_id, ack.error_code) == ("AR", "RES1", "200")
        assert ack.field("MSH", 9) == "ACK^R01^ACK"
        assert HL7Message.objects.get().status == "REJECTED"

    def test_it_rejects_an_unsupported_event_of_a_known_type(self, hl7):
        ack = hl7(message(msh("ADT^A01"), pid()))
        assert (ack.code, ack.error_code) == ("AR", "201")

    def test_it_rejects_an_unknown_processing_id(self, hl7):
        ack = hl7(message(msh(processing_id="X"), pid(), orc(), obr()))
        assert (ack.code, ack.error_code) == ("AR", "202")
        assert not ImagingOrder.objects.exists()

    @pytest.mark.parametrize("processing_id", ["P", "T", "D"])
    def test_it_accepts_production_training_and_debug(self, hl7, processing_id):
        assert hl7(message(msh(processing_id=processing_id), pid(), orc(), obr())).code == "AA"

    def test_it_rejects_an_unsupported_version(self, hl7):
        ack = hl7(message(msh(version="2.1"), pid(), orc(), obr()))
        assert (ack.code, ack.error_code) == ("AR", "203")
        assert ack.field("MSH", 12) == "2.1"

    def test_it_rejects_a_message_without_control_id(self, hl7):
        ack = hl7(message(msh(control_id=""), pid(), orc(), obr()))
        assert (ack.code, ack.error_code) == ("AR", "101")
        assert "MSH-10" in ack.error_text

    def test_it_refuses_an_order_without_order_control(self, hl7):
        ack = hl7(message(msh(), pid(), orc(control=""), obr()))
        assert (ack.code, ack.error_code) == ("AE", "101")
        assert "ORC-1" in ack.error_text


class TestDatabaseFailures:
    def test_it_never_answers_aa_when_the_effect_cannot_be_stored(self, hl7, monkeypatch):
        from django.db import OperationalError

        from worklist.hl7 import service

        def broken(info):
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(service, "save_patient", broken)
        ack = hl7(orm())
        assert (ack.code, ack.error_code) == ("AE", "207")
        assert not ImagingOrder.objects.exists()
        assert HL7Message.objects.get().status == "ERROR"

    def test_it_answers_ae_when_a_bug_breaks_the_effect(self, hl7, monkeypatch):
        from worklist.hl7 import service

        monkeypatch.setattr(service, "new_study_uid", lambda: 1 / 0)
        ack = hl7(orm())
        assert (ack.code, ack.error_code) == ("AE", "207")
        assert not Patient.objects.exists()

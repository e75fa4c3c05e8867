"""Order lifecycle over HL7 (RAD-4 / RAD-13): new, resend, duplicate, reschedule, cancel,
discontinue, status change, several procedures, OMI with several steps."""

from datetime import UTC, datetime

import pytest

from gateway.models import AuditEvent
from tests.fixtures_hl7 import message, msh, obr, orc, orm, pid, pv1, seg
from worklist.models import HL7Message, ImagingOrder, OrderStatusMapping, ScheduledStep

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("status_mappings")]


def step_statuses() -> list[str]:
    return list(ScheduledStep.objects.order_by("sps_id").values_list("status", flat=True))


def omi(control_id="OMI0001", control="NW", ipcs=None, version="2.5.1") -> bytes:
    ipcs = ipcs if ipcs is not None else [("SPSA", "MR", "T1^T1 sagittal^L", "MR_1"),
                                          ("SPSB", "MR", "T2^T2 axial^L", "MR_1")]
    return message(
        msh("OMI^O23^OMI_O23", control_id, version),
        pid(),
        pv1(),
        orc(control, start="", priority=""),
        seg("TQ1", {1: "1", 7: "20260121101500", 9: "S"}),
        obr(accession="", rp_id="", sps_id="", modality="", **{"f44": "MRKNEE^MR Knee^L"}),
        *[seg("IPC", {1: "ACC2", 2: "RP2", 3: "1.2.3.2", 4: sps, 5: mod, 6: proto, 7: "MR1",
                      8: "MRROOM", 9: ae}) for sps, mod, proto, ae in ipcs],
    )


class TestNewOrder:
    def test_it_stores_the_message_with_its_effect(self, hl7):
        ack = hl7(orm(control_id="CTRL42"))
        assert (ack.code, ack.control_id) == ("AA", "CTRL42")
        record = HL7Message.objects.get()
        assert record.status == "ACCEPTED"
        assert (record.control_id, record.message_type, record.version) == (
            "CTRL42", "ORM^O01", "2.3.1")
        assert (record.sending_application, record.sending_facility) == ("RIS", "RADIOLOGY")
        assert record.patient_id == "PAT001"
        assert record.peer == "127.0.0.1:5000"
        assert bytes(record.raw) == orm(control_id="CTRL42")
        assert bytes(record.ack) == ack.raw
        assert ImagingOrder.objects.get().last_message == record

    def test_it_records_the_hl7_sender_as_the_actor(self, hl7):
        hl7(orm())
        received, created = AuditEvent.objects.order_by("id")
        assert (received.actor, received.action) == ("hl7:RIS", "hl7.message.received")
        assert received.detail["status"] == "ACCEPTED" and received.detail["type"] == "ORM^O01"
        assert (created.actor, created.action) == ("hl7:RIS", "hl7.order.created")

    def test_it_updates_an_order_resent_with_nw_instead_of_duplicating_it(self, hl7):
        hl7(orm(control_id="A1"))
        ack = hl7(orm(control_id="A2", modality="MR"))
        assert ack.code == "AA"
        assert ImagingOrder.objects.count() == 1
        assert ScheduledStep.objects.get().modality == "MR"

    def test_it_keeps_the_study_uid_when_an_update_sends_none(self, hl7):
        hl7(orm(control_id="A1"))
        uid = ImagingOrder.objects.get().study_instance_uid
        hl7(orm(control_id="A2", control="XO"))
        assert ImagingOrder.objects.get().study_instance_uid == uid

    def test_it_creates_one_order_per_procedure(self, hl7):
        ack = hl7(message(
            msh(), pid(),
            orc(), obr(accession="ACC1", rp_id="RP1", sps_id="SPS1", modality="CT"),
            orc(), obr(accession="ACC2", rp_id="RP2", sps_id="SPS2", modality="MR"),
        ))
        assert ack.code == "AA"
        orders = ImagingOrder.objects.order_by("requested_procedure_id")
        assert [(o.accession_number, o.steps.get().modality) for o in orders] == [
            ("ACC1", "CT"), ("ACC2", "MR")]
        assert orders[0].study_instance_uid != orders[1].study_instance_uid

    def test_it_tells_same_numbered_procedures_apart_by_accession(self, hl7):
        procedures = [orc(), obr(accession="ACC1", rp_id="", sps_id=""),
                      orc(), obr(accession="ACC2", rp_id="", sps_id="")]
        hl7(message(msh(), pid(), *procedures))
        hl7(message(msh(control_id="MSG0002"), pid(), *procedures))
        assert sorted(ImagingOrder.objects.values_list("accession_number", flat=True)) == [
            "ACC1", "ACC2"]

    def test_it_refuses_procedures_it_cannot_tell_apart(self, hl7):
        same = [orc(), obr(accession="", rp_id="", sps_id="")]
        ack = hl7(message(msh(), pid(), *same, *same))
        assert (ack.code, ack.error_code) == ("AE", "101")
        assert "OBR-19" in ack.error_text

    def test_it_creates_one_step_per_ipc_segment(self, hl7):
        ack = hl7(omi())
        assert ack.code == "AA"
        order = ImagingOrder.objects.get()
        assert (order.accession_number, order.requested_procedure_id,
                order.study_instance_uid, order.priority) == ("ACC2", "RP2", "1.2.3.2", "STAT")
        steps = order.steps.order_by("sps_id")
        assert [(s.sps_id, s.description, s.station_ae_title, s.station_name, s.location)
                for s in steps] == [("SPSA", "T1 sagittal", "MR_1", "MR1", "MRROOM"),
                                    ("SPSB", "T2 axial", "MR_1", "MR1", "MRROOM")]
        assert steps[0].start == datetime(2026, 1, 21, 10, 15, tzinfo=UTC)

    def test_it_refuses_a_station_ae_title_longer_than_16(self, hl7):
        ack = hl7(omi(ipcs=[("SPSA", "MR", "", "A_VERY_LONG_AE_TITLE")]))
        assert (ack.code, ack.error_code) == ("AE", "102")
        assert "IPC-9" in ack.error_text


class TestDuplicates:
    def test_it_answers_a_repeated_control_id_with_aa_and_no_second_effect(self, hl7):
        hl7(orm(control_id="SAME"))
        ack = hl7(orm(control_id="SAME", modality="MR"))
        assert (ack.code, ack.control_id) == ("AA", "SAME")
        assert ScheduledStep.objects.get().modality == "CT"
        assert sorted(HL7Message.objects.values_list("status", flat=True)) == [
            "ACCEPTED", "DUPLICATE"]

    def test_it_treats_the_same_control_id_from_another_sender_as_new(self, hl7):
        hl7(orm(control_id="SAME"))
        other = message(msh(control_id="SAME", app="OTHER_RIS"), pid(), orc(placer="X1"),
                        obr(placer="X1", accession="ACCX"))
        assert hl7(other).code == "AA"
        assert ImagingOrder.objects.count() == 2

    def test_it_processes_a_resend_of_a_refused_message(self, hl7):
        OrderStatusMapping.objects.filter(order_control="NW", order_status="SC").delete()
        assert hl7(orm(control_id="RETRY")).code == "AE"
        OrderStatusMapping.objects.create(order_control="NW", order_status="SC",
                                          step_status="SCHEDULED")
        from worklist.hl7.service import clear_caches

        clear_caches()
        assert hl7(orm(control_id="RETRY")).code == "AA"
        assert ImagingOrder.objects.count() == 1
        assert sorted(HL7Message.objects.values_list("status", flat=True)) == [
            "ACCEPTED", "ERROR"]


class TestOrderUpdates:
    def test_it_reschedules_on_xo(self, hl7):
        hl7(orm(control_id="A1"))
        ack = hl7(message(msh(control_id="A2"), pid(), orc("XO", start="20260122140000"),
                          obr(**{"f44": "CTHEADC^CT Head with contrast^LOCAL"})))
        assert ack.code == "AA"
        order = ImagingOrder.objects.get()
        assert order.requested_procedure_description == "CT Head with contrast"
        assert order.steps.get().start == datetime(2026, 1, 22, 14, 0, tzinfo=UTC)

    def test_it_adds_and_removes_omi_steps_on_xo(self, hl7):
        hl7(omi())
        ack = hl7(omi("OMI0002", "XO", ipcs=[("SPSB", "MR", "T2^T2 axial^L", "MR_1"),
                                             ("SPSC", "MR", "DWI^Diffusion^L", "MR_1")]))
        assert ack.code == "AA"
        assert dict(ScheduledStep.objects.values_list("sps_id", "status")) == {
            "SPSA": "CANCELLED", "SPSB": "SCHEDULED", "SPSC": "SCHEDULED"}
        assert ImagingOrder.objects.get().status == "OPEN"

    def test_it_does_not_put_a_started_step_back_on_the_worklist(self, hl7):
        hl7(orm(control_id="A1"))
        ScheduledStep.objects.update(status="STARTED")
        hl7(orm(control_id="A2"))
        assert step_statuses() == ["STARTED"]

    def test_it_cancels_on_ca(self, hl7):
        hl7(orm(control_id="A1"))
        ack = hl7(message(msh(control_id="A2"), pid(), orc("CA", status="CA")))
        assert ack.code == "AA"
        assert step_statuses() == ["CANCELLED"]
        assert ImagingOrder.objects.get().status == "CANCELLED"

    def test_it_cancels_on_oc(self, hl7):
        hl7(orm(control_id="A1"))
        assert hl7(orm(control_id="A2", control="OC", status="CA")).code == "AA"
        assert ImagingOrder.objects.get().status == "CANCELLED"

    def test_it_discontinues_on_dc(self, hl7):
        hl7(orm(control_id="A1"))
        ScheduledStep.objects.update(status="STARTED")
        ack = hl7(orm(control_id="A2", control="DC", status="DC"))
        assert ack.code == "AA"
        assert step_statuses() == ["DISCONTINUED"]
        assert ImagingOrder.objects.get().status == "DISCONTINUED"

    def test_it_keeps_a_completed_step_completed_on_cancel(self, hl7):
        hl7(omi())
        ScheduledStep.objects.filter(sps_id="SPSA").update(status="COMPLETED")
        hl7(message(msh("OMI^O23", "OMI0002", "2.5.1"), pid(), orc("CA", status="CA")))
        assert step_statuses() == ["COMPLETED", "CANCELLED"]
        assert ImagingOrder.objects.get().status == "COMPLETED"

    @pytest.mark.parametrize("orc_5,step,order", [("IP", "STARTED", "OPEN"),
                                                  ("CM", "COMPLETED", "COMPLETED"),
                                                  ("A", "STARTED", "OPEN")])
    def test_it_changes_status_on_sc(self, hl7, orc_5, step, order):
        hl7(orm(control_id="A1"))
        assert hl7(orm(control_id="A2", control="SC", status=orc_5)).code == "AA"
        assert step_statuses() == [step]
        assert ImagingOrder.objects.get().status == order

    def test_it_changes_only_the_named_step_on_sc(self, hl7):
        hl7(omi())
        ack = hl7(message(msh("OMI^O23", "OMI0002", "2.5.1"), pid(), orc("SC", status="CM"),
                          obr(accession="", rp_id="", sps_id=""),
                          seg("IPC", {1: "ACC2", 2: "RP2", 3: "1.2.3.2", 4: "SPSB", 5: "MR"})))
        assert ack.code == "AA"
        assert step_statuses() == ["SCHEDULED", "COMPLETED"]

    def test_it_refuses_a_cancel_for_an_unknown_order(self, hl7):
        ack = hl7(message(msh(), pid(), orc("CA", placer="NOPE", filler="NOPE2", status="CA")))
        assert (ack.code, ack.error_code) == ("AE", "204")
        assert "NOPE" in ack.error_text
        assert HL7Message.objects.get().status == "ERROR"

    def test_it_refuses_an_xo_for_an_unknown_order(self, hl7):
        ack = hl7(orm(control="XO"))
        assert (ack.code, ack.error_code) == ("AE", "204")
        assert not ImagingOrder.objects.exists()

    def test_it_refuses_an_unmapped_order_control_and_status_pair(self, hl7):
        hl7(orm(control_id="A1"))
        ack = hl7(orm(control_id="A2", control="SC", status="ZZ"))
        assert (ack.code, ack.error_code) == ("AE", "103")
        assert "ORC-5" in ack.error_text and "ZZ" in ack.error_text
        assert step_statuses() == ["SCHEDULED"]

    def test_it_uses_mappings_an_administrator_added(self, hl7):
        OrderStatusMapping.objects.create(order_control="SC", order_status="HD",
                                          step_status="READY")
        hl7(orm(control_id="A1"))
        assert hl7(orm(control_id="A2", control="SC", status="HD")).code == "AA"
        assert step_statuses() == ["READY"]

    def test_it_rolls_back_the_whole_message_when_one_procedure_fails(self, hl7):
        hl7(orm(control_id="A1"))
        ack = hl7(message(msh(control_id="A2"), pid(),
                          orc("CA", status="CA"),
                          orc("CA", placer="NOPE", filler="NOPE", status="CA")))
        assert ack.code == "AE"
        assert step_statuses() == ["SCHEDULED"]

    def test_it_moves_an_order_to_the_patient_the_ris_now_names(self, hl7):
        hl7(orm(control_id="A1"))
        hl7(message(msh(control_id="A2"), pid(patient_id="PAT777"), pv1(), orc("XO"), obr()))
        assert ImagingOrder.objects.get().patient.patient_id == "PAT777"

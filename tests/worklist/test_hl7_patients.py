"""Patient update (ADT^A08 / A31) and merge (ADT^A40), RAD-12."""

import pytest

from gateway.models import AuditEvent
from tests.fixtures_hl7 import message, msh, obr, orc, orm, pid, pv1, seg
from worklist.models import HL7Message, ImagingOrder, Patient

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("status_mappings")]


class TestPatientUpdate:
    @pytest.mark.parametrize("event", ["A08", "A31"])
    def test_it_updates_a_known_patient(self, hl7, event):
        hl7(orm())
        ack = hl7(message(msh(f"ADT^{event}", "ADT1", "2.5"),
                          pid(name="Doe^Johnny", birth_date="19700102", sex="M")))
        assert ack.code == "AA"
        patient = Patient.objects.get()
        assert (patient.name, patient.name_key, patient.birth_date) == (
            "Doe^Johnny", "DOE^JOHNNY", "19700102")
        assert AuditEvent.objects.filter(action="hl7.patient.updated").exists()

    def test_it_leaves_fields_the_update_does_not_send(self, hl7):
        hl7(orm())
        hl7(message(msh("ADT^A08", "ADT1", "2.5"), pid(name="Doe^Johnny", birth_date="",
                                                       sex="")))
        patient = Patient.objects.get()
        assert (patient.birth_date, patient.sex) == ("19700101", "M")

    def test_it_updates_the_visit_of_open_orders(self, hl7):
        hl7(orm())
        hl7(message(msh("ADT^A08", "ADT1", "2.5"), pid(),
                    pv1(f3="ICU^7^2", f8="999^Kildare^James")))
        order = ImagingOrder.objects.get()
        assert (order.patient_location, order.referring_physician) == (
            "ICU^7^2", "Kildare^James")

    def test_it_accepts_an_update_for_an_unknown_patient_without_storing_it(self, hl7):
        ack = hl7(message(msh("ADT^A08", "ADT1", "2.5"), pid(patient_id="NEW1")))
        assert ack.code == "AA"
        assert not Patient.objects.exists()
        assert HL7Message.objects.get().status == "ACCEPTED"

    def test_it_refuses_an_update_without_patient_id(self, hl7):
        ack = hl7(message(msh("ADT^A08", "ADT1", "2.5"), pid(patient_id="")))
        assert (ack.code, ack.error_code) == ("AE", "101")


class TestMerge:
    def merge(self, control_id="ADT40", prior="PAT001", surviving="PAT900"):
        return message(msh("ADT^A40^ADT_A39", control_id, "2.5"),
                       pid(patient_id=surviving, name="Doe^John^Q"),
                       seg("MRG", {1: f"{prior}^^^HOSP^MR"}))

    def test_it_moves_open_orders_to_the_surviving_patient(self, hl7):
        hl7(orm())
        ack = hl7(self.merge())
        assert ack.code == "AA"
        prior = Patient.objects.get(patient_id="PAT001")
        surviving = Patient.objects.get(patient_id="PAT900")
        assert prior.merged_into == surviving
        assert ImagingOrder.objects.get().patient == surviving
        assert surviving.name == "Doe^John^Q"

    def test_it_leaves_closed_orders_with_the_prior_patient(self, hl7):
        hl7(orm())
        ImagingOrder.objects.update(status="COMPLETED")
        hl7(self.merge())
        assert ImagingOrder.objects.get().patient.patient_id == "PAT001"

    def test_it_merges_into_an_existing_surviving_patient(self, hl7):
        hl7(orm())
        hl7(message(msh(control_id="MSG2"), pid(patient_id="PAT900"), pv1(),
                    orc(placer="PL2", filler="FL2"),
                    obr(placer="PL2", filler="FL2", accession="ACC2")))
        assert Patient.objects.count() == 2
        hl7(self.merge())
        surviving = Patient.objects.get(patient_id="PAT900")
        assert surviving.orders.count() == 2
        assert Patient.objects.get(patient_id="PAT001").merged_into == surviving

    def test_it_requires_mrg_1(self, hl7):
        ack = hl7(message(msh("ADT^A40", "ADT40", "2.5"), pid(patient_id="PAT900")))
        assert (ack.code, ack.error_code) == ("AE", "101")
        assert "MRG-1" in ack.error_text

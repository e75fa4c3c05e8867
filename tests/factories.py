"""Rows for tests and benchmarks, created directly (no HL7): one at a time with readable
defaults, or in bulk. Every value can be overridden by keyword."""

from __future__ import annotations

import itertools
import secrets
from datetime import UTC, datetime, timedelta

from worklist.models import ImagingOrder, Patient, ScheduledStep, StepStatus

_seq = itertools.count(1)

# A fixed day, so tests never depend on the clock.
DAY = datetime(2026, 3, 16, tzinfo=UTC)


def at(hhmm: str, day: datetime = DAY) -> datetime:
    """A scheduled start on the test day: ``at("0930")``."""
    return day.replace(hour=int(hhmm[:2]), minute=int(hhmm[2:4]))


def make_patient(**fields) -> Patient:
    n = next(_seq)
    values = {
        "patient_id": f"PID{n:06d}",
        "issuer": "HOSP",
        "name": f"DOE^JANE{n}",
        "birth_date": "19700101",
        "sex": "F",
    }
    values.update(fields)
    return Patient.objects.create(**values)


def make_order(patient: Patient | None = None, **fields) -> ImagingOrder:
    n = next(_seq)
    values = {
        "patient": patient or make_patient(),
        "placer_order_number": f"PLC{n}",
        "filler_order_number": f"FIL{n}",
        "accession_number": f"ACC{n:06d}",
        "requested_procedure_id": f"RP{n}",
        "study_instance_uid": f"2.25.{n}{n:012d}",
        "requested_procedure_description": "CT HEAD",
        "priority": "ROUTINE",
    }
    values.update(fields)
    return ImagingOrder.objects.create(**values)


def make_step(order: ImagingOrder | None = None, **fields) -> ScheduledStep:
    """A scheduled CT step at 09:00 on the test day for a new patient and order."""
    n = next(_seq)
    values = {
        "order": order or make_order(),
        "sps_id": f"SPS{n}",
        "status": StepStatus.SCHEDULED,
        "modality": "CT",
        "station_ae_title": "CT1",
        "station_name": "CTROOM1",
        "location": "RAD1",
        "start": at("0900"),
        "description": "CT HEAD W/O",
    }
    values.update(fields)
    return ScheduledStep.objects.create(**values)


def make_item(patient: dict | None = None, order: dict | None = None, **step) -> ScheduledStep:
    """One worklist item: a patient, an order and a step, each with the given overrides."""
    return make_step(make_order(make_patient(**(patient or {})), **(order or {})), **step)


def bulk_steps(
    count: int,
    start: datetime = DAY,
    every: timedelta = timedelta(minutes=1),
    batch: int = 5000,
    **step_fields,
) -> None:
    """``count`` worklist items, each with its own patient and order, scheduled ``every``
    apart from ``start``. Uses bulk_create, so Patient.save() does not run: name_key is set
    here."""
    # A random block prefix keeps ids unique across calls and processes (benchmarks reuse a
    # database); the "B" keeps them apart from single rows.
    block = secrets.token_hex(3).upper()
    for offset in range(0, count, batch):
        numbers = range(offset, min(offset + batch, count))
        patients = Patient.objects.bulk_create(
            Patient(
                patient_id=f"B{block}{i}",
                issuer="HOSP",
                name=f"BULK^PATIENT{block}{i}",
                name_key=f"BULK^PATIENT{block}{i}",
                birth_date="19800101",
                sex="M",
            )
            for i in numbers
        )
        orders = ImagingOrder.objects.bulk_create(
            ImagingOrder(
                patient=p,
                accession_number=f"B{block}{i}",
                requested_procedure_id=f"B{block}{i}",
                study_instance_uid=f"2.25.{int(block, 16)}{i:07d}",
                requested_procedure_description="BULK PROCEDURE",
            )
            for i, p in zip(numbers, patients, strict=True)
        )
        values = {"modality": "CT", "station_ae_title": "BULK1", "status": StepStatus.SCHEDULED}
        values.update(step_fields)
        ScheduledStep.objects.bulk_create(
            ScheduledStep(
                order=o,
                sps_id=f"B{block}{i}",
                start=start + every * i,
                description="BULK STEP",
                **values,
            )
            for i, o in zip(numbers, orders, strict=True)
        )


# --- Received studies, instances and deliveries (no file on disk) ---------------------------


def make_received_study(**fields):
    """A ReceivedStudy last received now (override ``last_received_at`` to age it)."""
    from django.utils import timezone

    from routing.models import ReceivedStudy

    n = next(_seq)
    values = {
        "study_instance_uid": f"2.25.9{n:012d}",
        "patient_id": f"RPID{n:05d}",
        "patient_name": f"ROE^RICHARD{n}",
        "accession_number": f"RACC{n:06d}",
        "study_date": "20260316",
        "study_description": "CT CHEST",
        "modalities": "CT",
        "last_received_at": timezone.now(),
    }
    values.update(fields)
    return ReceivedStudy.objects.create(**values)


def make_received_instance(study=None, **fields):
    """A routed CT ReceivedInstance of ``study`` (a new one by default), received now; its
    ``path`` names no real file."""
    from django.utils import timezone

    from routing.models import ReceivedInstance, RoutingStatus

    n = next(_seq)
    study = study or make_received_study()
    values = {
        "study": study,
        "sop_instance_uid": f"{study.study_instance_uid}.1.{n}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "series_instance_uid": f"{study.study_instance_uid}.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "header": {"Modality": "CT"},
        "calling_ae": "CT1",
        "size": 524288,
        "path": f"/nonexistent/{n}.dcm",
        "received_at": timezone.now(),
        "routing_status": RoutingStatus.ROUTED,
    }
    values.update(fields)
    return ReceivedInstance.objects.create(**values)


def make_delivery_row(node, instance=None, **fields):
    """A Delivery of ``instance`` (a new one by default) to ``node``: PENDING, due now.
    ``created_at`` may be given (it is set after the insert, past auto_now_add)."""
    from django.utils import timezone

    from routing.models import Delivery

    created_at = fields.pop("created_at", None)
    instance = instance or make_received_instance()
    values = {
        "instance": instance,
        "node": node,
        "rule_name": "to archive",
        "instance_version": instance.version,
        "next_attempt_at": timezone.now(),
    }
    values.update(fields)
    row = Delivery.objects.create(**values)
    if created_at is not None:
        Delivery.objects.filter(pk=row.pk).update(created_at=created_at)
        row.created_at = created_at
    return row

"""Orders from the RIS and the scheduled procedure steps a modality sees on its worklist.

Levels follow DICOM's Modality Worklist information model (PS3.4 K.6): a Patient has
imaging orders (one Requested Procedure each, with its Imaging Service Request identifiers),
and each order has one or more Scheduled Procedure Steps.

Dates and times from HL7 and DICOM are local wall-clock values without a zone. ``start`` keeps
that wall-clock time stored as if it were UTC, so that what goes in comes back unchanged and
range queries are plain comparisons on one indexed column.
"""

from __future__ import annotations

from django.db import models, transaction

from gateway import audit as audit_trail


class StepStatus(models.TextChoices):
    """Scheduled Procedure Step Status (0040,0020) plus the states that end a step."""

    SCHEDULED = "SCHEDULED", "Scheduled"
    ARRIVED = "ARRIVED", "Arrived"
    READY = "READY", "Ready"
    STARTED = "STARTED", "Started"
    COMPLETED = "COMPLETED", "Completed"
    DISCONTINUED = "DISCONTINUED", "Discontinued"
    CANCELLED = "CANCELLED", "Cancelled"

    @classmethod
    def on_worklist(cls) -> list[str]:
        """The states a modality should still perform, so the ones MWL returns."""
        return [cls.SCHEDULED, cls.ARRIVED, cls.READY]

    @classmethod
    def ended(cls) -> list[str]:
        """The states after which nothing more happens to a step."""
        return [cls.COMPLETED, cls.DISCONTINUED, cls.CANCELLED]


class OrderStatus(models.TextChoices):
    OPEN = "OPEN", "Open"
    COMPLETED = "COMPLETED", "Completed"
    DISCONTINUED = "DISCONTINUED", "Discontinued"
    CANCELLED = "CANCELLED", "Cancelled"

    @classmethod
    def for_steps(cls, step_statuses) -> str:
        """The order status its steps' statuses imply: open while any step is still to be
        done or under way; once all have ended, completed if any was performed, else
        discontinued if any was stopped, else cancelled."""
        statuses = set(step_statuses)
        ended = {StepStatus.COMPLETED, StepStatus.DISCONTINUED, StepStatus.CANCELLED}
        if not statuses or statuses - ended:
            return cls.OPEN
        if StepStatus.COMPLETED in statuses:
            return cls.COMPLETED
        if StepStatus.DISCONTINUED in statuses:
            return cls.DISCONTINUED
        return cls.CANCELLED


class Patient(models.Model):
    """A patient as the RIS identifies them (PID-3.1 with its assigning authority PID-3.4)."""

    patient_id = models.CharField(max_length=64)
    issuer = models.CharField(max_length=64, blank=True, default="")
    # DICOM PN form: Family^Given^Middle^Prefix^Suffix (alphabetic group only).
    name = models.CharField(max_length=324, blank=True, default="")
    # Upper-cased name for case-insensitive PatientName matching on an index.
    name_key = models.CharField(max_length=324, blank=True, default="")
    birth_date = models.CharField(max_length=8, blank=True, default="")  # YYYYMMDD
    sex = models.CharField(max_length=16, blank=True, default="")
    other_ids = models.JSONField(default=list, blank=True)  # [{"id":..., "issuer":..., "type":...}]
    weight_kg = models.CharField(max_length=16, blank=True, default="")
    medical_alerts = models.CharField(max_length=64, blank=True, default="")
    allergies = models.CharField(max_length=64, blank=True, default="")
    pregnancy_status = models.PositiveSmallIntegerField(null=True, blank=True)
    merged_into = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="merged_from"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["patient_id", "issuer"], name="patient_unique_id_issuer"
            )
        ]
        indexes = [
            # PatientID equality and prefix wildcard matching (LIKE 'ABC%') in MWL queries;
            # varchar_pattern_ops because the database collation is not C (PostgreSQL only).
            models.Index(
                fields=["patient_id"],
                name="patient_id_pattern_idx",
                opclasses=["varchar_pattern_ops"],
            ),
            # Name prefix matching (LIKE 'DOE%') in MWL queries and the worklist page.
            models.Index(
                fields=["name_key"],
                name="patient_name_key_pattern_idx",
                opclasses=["varchar_pattern_ops"],
            ),
        ]

    def save(self, *args, **kwargs):
        self.name_key = (self.name or "").upper()
        super().save(*args, **kwargs)

    def __str__(self) -> str:
        issuer = f" ({self.issuer})" if self.issuer else ""
        return f"{self.name or '(no name)'} [{self.patient_id}{issuer}]"


class ImagingOrder(models.Model):
    """One Requested Procedure with the Imaging Service Request identifiers it came with
    (one ORC/OBR group of an ORM, or one IPC group's requested procedure of an OMI)."""

    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="orders",
                                db_index=False)
    status = models.CharField(max_length=16, choices=OrderStatus.choices, default=OrderStatus.OPEN)
    sending_application = models.CharField(max_length=180, blank=True, default="")
    sending_facility = models.CharField(max_length=180, blank=True, default="")
    placer_order_number = models.CharField(max_length=64, blank=True, default="")
    filler_order_number = models.CharField(max_length=64, blank=True, default="")
    accession_number = models.CharField(max_length=16, blank=True, default="")
    requested_procedure_id = models.CharField(max_length=16, blank=True, default="")
    study_instance_uid = models.CharField(max_length=64)
    requested_procedure_description = models.CharField(max_length=64, blank=True, default="")
    # Requested Procedure Code Sequence: [{"value":..., "scheme":..., "meaning":...}]
    requested_procedure_codes = models.JSONField(default=list, blank=True)
    priority = models.CharField(max_length=16, blank=True, default="")  # STAT HIGH ROUTINE ...
    reason = models.CharField(max_length=64, blank=True, default="")
    requesting_physician = models.CharField(max_length=324, blank=True, default="")
    referring_physician = models.CharField(max_length=324, blank=True, default="")
    admission_id = models.CharField(max_length=64, blank=True, default="")
    patient_location = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_message = models.ForeignKey(
        "HL7Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        # Every index here is paid on each order an HL7 message creates: one per column,
        # pattern ops where MWL matching may use a wildcard (they serve equality too).
        indexes = [
            models.Index(fields=["patient", "status"]),  # also the patient foreign key's
            *(models.Index(fields=[column], name=f"order_{short}_pattern_idx",
                           opclasses=["varchar_pattern_ops"])
              for column, short in (("placer_order_number", "placer"),
                                    ("filler_order_number", "filler"),
                                    ("accession_number", "accession"))),
            models.Index(fields=["study_instance_uid"], name="order_study_uid_idx"),
            # RequestedProcedureID equality and prefix wildcard matching in MWL queries.
            models.Index(
                fields=["requested_procedure_id"],
                name="order_req_proc_id_pattern_idx",
                opclasses=["varchar_pattern_ops"],
            ),
        ]

    def __str__(self) -> str:
        return f"Accession {self.accession_number or '-'} / {self.requested_procedure_description}"


class ScheduledStep(models.Model):
    """A Scheduled Procedure Step: what one modality should do, when, for which order."""

    order = models.ForeignKey(ImagingOrder, on_delete=models.CASCADE, related_name="steps")
    sps_id = models.CharField(max_length=16)
    status = models.CharField(
        max_length=16, choices=StepStatus.choices, default=StepStatus.SCHEDULED
    )
    modality = models.CharField(max_length=16, blank=True, default="")
    station_ae_title = models.CharField(max_length=16, blank=True, default="")
    station_name = models.CharField(max_length=16, blank=True, default="")
    location = models.CharField(max_length=16, blank=True, default="")
    # Local wall-clock start stored as if UTC (see module docstring); null when not scheduled.
    start = models.DateTimeField(null=True, blank=True)
    description = models.CharField(max_length=64, blank=True, default="")
    # Scheduled Protocol Code Sequence: [{"value":..., "scheme":..., "meaning":...}]
    protocol_codes = models.JSONField(default=list, blank=True)
    performing_physician = models.CharField(max_length=324, blank=True, default="")
    contrast_agent = models.CharField(max_length=64, blank=True, default="")
    pre_medication = models.CharField(max_length=64, blank=True, default="")
    comments = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "station_ae_title", "start"]),
            models.Index(fields=["status", "modality", "start"]),
            models.Index(fields=["status", "start"]),
            models.Index(fields=["sps_id"]),
            # The worklist page: every step by start, and (its default) the open ones by start.
            models.Index(fields=["start", "id"], name="step_start_id_idx"),
            models.Index(
                fields=["start", "id"],
                name="step_open_start_id_idx",
                condition=models.Q(status__in=["SCHEDULED", "ARRIVED", "READY"]),
            ),
        ]

    def __str__(self) -> str:
        return f"SPS {self.sps_id} {self.modality} @ {self.station_ae_title or '-'} ({self.status})"

    def end_by_hand(self, status: str) -> None:
        """Cancel or complete this step from the UI (``status`` CANCELLED or COMPLETED).

        In one transaction: the step's status, its order's status recomputed from all its
        steps, and the audit event ``worklist.step.cancelled`` / ``worklist.step.completed``
        with the statuses before and after. The order is locked first, as an HL7 message
        about it locks it, so the two queue up. Raises :class:`StepAlreadyEnded` when the
        step has completed, been discontinued or cancelled (perhaps meanwhile)."""
        action = _HAND_ACTIONS[status]
        with transaction.atomic():
            order = ImagingOrder.objects.select_for_update().get(pk=self.order_id)
            steps = list(order.steps.select_for_update().order_by("id"))
            step = next(s for s in steps if s.pk == self.pk)
            if step.status in StepStatus.ended():
                raise StepAlreadyEnded(step.get_status_display())
            before = {"status": step.status, "order_status": order.status}
            step.status = status
            step.save(update_fields=["status", "updated_at"])
            order.status = OrderStatus.for_steps(s.status for s in steps)
            order.save(update_fields=["status", "updated_at"])
            audit_trail.record_change(action, step, before,
                                      {"status": step.status, "order_status": order.status},
                                      order=order.pk)
        self.status, self.updated_at, self.order = step.status, step.updated_at, order


class StepAlreadyEnded(Exception):
    """A hand action on a step that has already ended; the message names its status."""


_HAND_ACTIONS = {
    StepStatus.CANCELLED: "worklist.step.cancelled",
    StepStatus.COMPLETED: "worklist.step.completed",
}


class Station(models.Model):
    """A modality station: where steps go when the order names no station AE (IPC-9).
    Matched on modality and/or location; the most specific row wins."""

    ae_title = models.CharField(max_length=16)
    station_name = models.CharField(max_length=16, blank=True, default="")
    modality = models.CharField(max_length=16, blank=True, default="")
    location = models.CharField(max_length=64, blank=True, default="")
    enabled = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["modality", "location"], name="station_unique_route")
        ]

    def __str__(self) -> str:
        where = f"{self.modality or 'any modality'} / {self.location or 'any location'}"
        return f"{self.ae_title} ({where})"


class OrderStatusMapping(models.Model):
    """What an ORC-1 order control with an ORC-5 order status does to the steps.
    An empty ``order_status`` matches a message whose ORC-5 is empty."""

    order_control = models.CharField(max_length=2)
    order_status = models.CharField(max_length=2, blank=True, default="")
    step_status = models.CharField(max_length=16, choices=StepStatus.choices)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["order_control", "order_status"], name="order_status_mapping_unique"
            )
        ]
        ordering = ["order_control", "order_status"]

    def __str__(self) -> str:
        status = self.order_status or "(empty)"
        return f"ORC-1 {self.order_control} / ORC-5 {status} → {self.step_status}"


class MessageStatus(models.TextChoices):
    ACCEPTED = "ACCEPTED", "Accepted (AA)"
    DUPLICATE = "DUPLICATE", "Duplicate (AA, no effect)"
    ERROR = "ERROR", "Error (AE)"
    REJECTED = "REJECTED", "Rejected (AR)"


class HL7Message(models.Model):
    """Every HL7 message received, raw, with the ACK sent back. Stored in the same transaction
    as its effect, before the ACK leaves."""

    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    peer = models.CharField(max_length=100, blank=True, default="")
    sending_application = models.CharField(max_length=180, blank=True, default="")
    sending_facility = models.CharField(max_length=180, blank=True, default="")
    receiving_application = models.CharField(max_length=180, blank=True, default="")
    receiving_facility = models.CharField(max_length=180, blank=True, default="")
    control_id = models.CharField(max_length=199, blank=True, default="")
    message_type = models.CharField(max_length=20, blank=True, default="")
    version = models.CharField(max_length=10, blank=True, default="")
    status = models.CharField(max_length=16, choices=MessageStatus.choices)
    error_code = models.CharField(max_length=8, blank=True, default="")
    error_text = models.TextField(blank=True, default="")
    patient_id = models.CharField(max_length=64, blank=True, default="")
    raw = models.BinaryField()
    ack = models.BinaryField(default=b"")
    # Set on the row of a new attempt when an operator reprocessed a refused message.
    reprocessed_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reprocessed_as"
    )

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["sending_application", "sending_facility", "control_id"]),
            # Filters of the messages page: control id alone, and type by prefix ("ORM").
            models.Index(fields=["control_id"], name="hl7message_control_id_idx"),
            models.Index(fields=["status"], name="hl7message_status_idx"),
            models.Index(fields=["patient_id"], name="hl7message_patient_id_idx"),
            models.Index(
                fields=["message_type"],
                name="hl7message_type_pattern_idx",
                opclasses=["varchar_pattern_ops"],
            ),
        ]
        constraints = [
            # One accepted effect per sender and control id: a concurrent duplicate fails here
            # and is answered as a duplicate.
            models.UniqueConstraint(
                fields=["sending_application", "sending_facility", "control_id"],
                condition=models.Q(status="ACCEPTED"),
                name="hl7message_one_accepted_per_control_id",
            )
        ]

    def __str__(self) -> str:
        kind = self.message_type or "?"
        return f"{kind} {self.control_id} from {self.sending_application} ({self.status})"


class WorklistQuery(models.Model):
    """One Modality Worklist C-FIND: who asked, what, how many answers."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    calling_ae = models.CharField(max_length=16, db_index=True)
    called_ae = models.CharField(max_length=16, blank=True, default="")
    peer = models.CharField(max_length=100, blank=True, default="")
    keys = models.JSONField(default=dict, blank=True)
    answers = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=8, blank=True, default="")  # final DIMSE status, hex
    error_text = models.TextField(blank=True, default="")
    duration_ms = models.FloatField(default=0)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        when = f"{self.at:%Y-%m-%d %H:%M:%S}"
        return f"MWL query by {self.calling_ae} at {when}: {self.answers} answers"

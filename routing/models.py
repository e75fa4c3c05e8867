"""Routing: destination nodes, rules, what was received, and what has to go where.

Hand-off between stages is the database: the storage SCP records a ReceivedInstance (file on
disk, fsynced) before it answers Success; rule evaluation turns it into Delivery rows; Celery
tasks only execute deliveries that rows say are due, and a periodic sweep finds rows whose task
was lost.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Coalesce


class EchoState(models.TextChoices):
    """What a node's last C-ECHO (Verify, or the periodic check) said."""

    OK = "ok", "OK"
    FAILED = "failed", "Failed"
    NEVER = "never", "Never checked"


class NodeQuerySet(models.QuerySet):
    """``Node.objects``: nodes, and what the pages show about their deliveries."""

    def with_activity(self) -> NodeQuerySet:
        """The nodes with ``backlog`` (open deliveries), ``dead`` (given up) and
        ``last_delivered_at``, of any age, in the same query: three subqueries per node, two on
        the (node, status, next_attempt_at) index and one on the (node, delivered_at) index, so
        the cost does not grow with the deliveries behind them."""
        deliveries = Delivery.objects.filter(node=models.OuterRef("pk")).order_by()

        def count(statuses: list[str]) -> Coalesce:
            return Coalesce(
                models.Subquery(
                    deliveries.filter(status__in=statuses)
                    .values("node")
                    .annotate(n=models.Count("*"))  # from the index alone
                    .values("n")
                ),
                0,
            )

        return self.annotate(
            backlog=count(DeliveryStatus.open()),
            dead=count([DeliveryStatus.DEAD]),
            last_delivered_at=models.Subquery(
                deliveries.filter(delivered_at__isnull=False)
                .order_by("-delivered_at")
                .values("delivered_at")[:1]
            ),
        )


class Node(models.Model):
    """A destination DICOM node (a PACS or archive) that studies are forwarded to."""

    name = models.CharField(max_length=64, unique=True)
    ae_title = models.CharField(max_length=16)
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField()
    enabled = models.BooleanField(default=True)
    max_associations = models.PositiveSmallIntegerField(
        default=2, help_text="Most associations opened to this node at the same time."
    )
    last_echo_at = models.DateTimeField(null=True, blank=True)
    last_echo_ok_at = models.DateTimeField(null=True, blank=True)
    last_echo_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = NodeQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    @property
    def echo_state(self) -> EchoState:
        """The last C-ECHO's outcome. Every echo sets ``last_echo_at`` and ``last_echo_error``
        (empty on success), so the error says whether the last one failed."""
        if self.last_echo_at is None:
            return EchoState.NEVER
        return EchoState.FAILED if self.last_echo_error else EchoState.OK


class MatchMode(models.TextChoices):
    ALL = "all", "All conditions"
    ANY = "any", "Any condition"


class RoutingMode(models.TextChoices):
    INSTANCE = "instance", "Each instance as it arrives"
    STUDY = "study", "The whole study once it is quiet"


class Rule(models.Model):
    """An ordered routing rule: conditions on DICOM attributes and on the association, the
    nodes that matching instances go to, and coercions applied to the forwarded copy only.

    ``conditions``: ``[{"attribute": "Modality", "op": "equals", "value": "CT"}, ...]``
    ``coerce``: ``[{"attribute": "InstitutionName", "action": "set", "value": "General"}, ...]``
    """

    name = models.CharField(max_length=100, unique=True)
    order = models.IntegerField(default=100, db_index=True)
    enabled = models.BooleanField(default=True)
    match = models.CharField(max_length=3, choices=MatchMode.choices, default=MatchMode.ALL)
    conditions = models.JSONField(default=list, blank=True)
    destinations = models.ManyToManyField(Node, related_name="rules", blank=True)
    coerce = models.JSONField(default=list, blank=True)
    stop = models.BooleanField(default=False, help_text="Evaluate no further rules on a match.")
    mode = models.CharField(max_length=8, choices=RoutingMode.choices, default=RoutingMode.INSTANCE)
    study_quiet_seconds = models.PositiveIntegerField(
        default=60, help_text="Per-study rules: route once no instance arrived for this long."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return f"{self.order}: {self.name}{'' if self.enabled else ' (disabled)'}"


class AssociationResult(models.TextChoices):
    OPEN = "OPEN", "Open"
    RELEASED = "RELEASED", "Released"
    ABORTED = "ABORTED", "Aborted"
    REJECTED = "REJECTED", "Rejected"


class DicomAssociation(models.Model):
    """One association a peer opened with the gateway's AE."""

    started_at = models.DateTimeField(auto_now_add=True, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    calling_ae = models.CharField(max_length=16, db_index=True)
    called_ae = models.CharField(max_length=16, blank=True, default="")
    peer = models.CharField(max_length=100, blank=True, default="")
    instances = models.PositiveIntegerField(default=0)
    failures = models.PositiveIntegerField(default=0)
    result = models.CharField(
        max_length=10, choices=AssociationResult.choices, default=AssociationResult.OPEN
    )
    error_text = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.calling_ae} from {self.peer}: {self.instances} instances ({self.result})"


class ReceivedStudy(models.Model):
    """A study as the gateway has received it so far."""

    study_instance_uid = models.CharField(max_length=64, unique=True)
    patient_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    patient_name = models.CharField(max_length=324, blank=True, default="")
    accession_number = models.CharField(max_length=16, blank=True, default="", db_index=True)
    study_date = models.CharField(max_length=8, blank=True, default="")
    study_description = models.CharField(max_length=64, blank=True, default="")
    modalities = models.CharField(max_length=64, blank=True, default="")
    first_received_at = models.DateTimeField(auto_now_add=True)
    last_received_at = models.DateTimeField(db_index=True)
    # Per-study rules: set once the study was quiet long enough and has been routed.
    study_routed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_received_at"]

    def __str__(self) -> str:
        return f"Study {self.accession_number or self.study_instance_uid} ({self.patient_id})"


class RoutingStatus(models.TextChoices):
    PENDING = "PENDING", "Waiting for rules"
    ROUTED = "ROUTED", "Routed"
    UNMATCHED = "UNMATCHED", "No rule matched"


class ReceivedInstance(models.Model):
    """One SOP instance received, stored as it came (file meta + dataset bytes) under
    GATEWAY_DATA_DIR and fsynced before the C-STORE response."""

    study = models.ForeignKey(ReceivedStudy, on_delete=models.CASCADE, related_name="instances")
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    sop_class_uid = models.CharField(max_length=64)
    series_instance_uid = models.CharField(max_length=64, db_index=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    # The header attributes rules use, by keyword: {"Modality": "CT", "InstitutionName": ...}.
    header = models.JSONField(default=dict)
    calling_ae = models.CharField(max_length=16)
    called_ae = models.CharField(max_length=16, blank=True, default="")
    source_ip = models.CharField(max_length=64, blank=True, default="")
    association = models.ForeignKey(
        DicomAssociation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    size = models.PositiveBigIntegerField()
    path = models.CharField(max_length=512)
    received_at = models.DateTimeField(db_index=True)
    # Incremented when the same SOP Instance UID is received again (replace policy).
    version = models.PositiveIntegerField(default=1)
    routing_status = models.CharField(
        max_length=10, choices=RoutingStatus.choices, default=RoutingStatus.PENDING, db_index=True
    )
    routed_at = models.DateTimeField(null=True, blank=True)
    file_deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"Instance {self.sop_instance_uid} ({self.header.get('Modality', '?')})"


class DeliveryStatus(models.TextChoices):
    PENDING = "PENDING", "Pending"
    SENDING = "SENDING", "Sending"
    DELIVERED = "DELIVERED", "Delivered"
    FAILED = "FAILED", "Failed (will retry)"
    DEAD = "DEAD", "Dead (gave up)"
    ABANDONED = "ABANDONED", "Abandoned"

    @classmethod
    def open(cls) -> list[str]:
        """States in which the delivery still has to happen."""
        return [cls.PENDING, cls.SENDING, cls.FAILED]


class Delivery(models.Model):
    """A routing decision: this instance goes to this node. Written before any task runs."""

    instance = models.ForeignKey(
        ReceivedInstance, on_delete=models.CASCADE, related_name="deliveries"
    )
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="deliveries")
    rule = models.ForeignKey(Rule, null=True, blank=True, on_delete=models.SET_NULL)
    rule_name = models.CharField(max_length=100, blank=True, default="")
    # The rule's coercions as they were when the decision was made.
    coerce = models.JSONField(default=list, blank=True)
    instance_version = models.PositiveIntegerField(default=1)
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    next_attempt_at = models.DateTimeField(db_index=True)
    # When a worker claimed it (SENDING); a claim older than the lease is taken back.
    claimed_at = models.DateTimeField(null=True, blank=True)
    # Which association holds the claim: a node's open associations are its distinct holders,
    # counted against max_associations across every worker process and machine.
    claimed_by = models.CharField(max_length=40, blank=True, default="")
    # Set by a retry by hand: the give-up clock (DELIVERY_GIVE_UP_HOURS) restarts from here.
    retried_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["node", "status", "next_attempt_at"]),
            models.Index(fields=["status", "next_attempt_at"]),
            # The dashboard: deliveries per hour, and each node's last delivery.
            models.Index(fields=["delivered_at"], name="delivery_delivered_at_idx"),
            models.Index(fields=["node", "delivered_at"], name="delivery_node_delivered_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.instance.sop_instance_uid} → {self.node.name} ({self.status})"

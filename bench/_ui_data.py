"""The UI benchmark's data set: 100,000 rows behind every list of the administrator's pages,
loaded once into the bench database and reused by later runs.

What a busy department's gateway holds after two months: scheduled steps with their orders and
patients (the worklist benchmark's synthetic data, statuses set by date), HL7 messages (~1 KB
each) from a handful of senders, received studies with their instances and deliveries to five
nodes (one of them flaky, one disabled), fifty rules, and an audit trail written through
``gateway.audit.append`` so that its hash chain is valid. Times are spread over ``DAYS`` days
up to the moment of seeding, so the dashboard's last 24 hours hold about 1/60 of each table.

Bulk rows go in with COPY (``_mwl_data._copy``); the run that seeds also VACUUMs and ANALYZEs.
A comment on the database records what was seeded and when, so that a later run reuses it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import _synthetic as syn
from _common import log
from _mwl_data import _copy, load_database

SEED_VERSION = 1
DAYS = 60
BIG_STUDY_INSTANCES = 500
AUDIT_BATCH = 1000
# A seed older than this is made again: the dashboard's last 24 hours would be empty.
MAX_SEED_AGE = timedelta(days=2)

# (application, facility, weight): who sends HL7 to the gateway.
SENDERS = [
    ("RIS", "GENERAL HOSPITAL", 55),
    ("EPIC", "GENERAL HOSPITAL", 20),
    ("RIS", "NORTH CAMPUS", 12),
    ("HIS", "GENERAL HOSPITAL", 10),
    ("CARDIO", "HEART CENTER", 3),
]
MESSAGE_TYPES = {
    "ORM^O01": 60,
    "OMI^O23": 12,
    "ADT^A08": 18,
    "ADT^A31": 5,
    "ADT^A40": 2,
    "ORU^R01": 3,
}
ORDER_TYPES = ("ORM^O01", "OMI^O23")
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# name, AE title, host, enabled
NODES = [
    ("PACS-MAIN", "PACS", "pacs.example.org", True),
    ("ARCHIVE", "VNA", "vna.example.org", True),
    ("AI-TRIAGE", "AITRIAGE", "ai.example.org", True),
    ("TELERAD", "TELERAD", "telerad.example.net", True),  # flaky: failures and dead ones
    ("RESEARCH", "RESEARCH", "research.example.org", False),  # disabled 5 days ago
]
ERRORS = [
    "Association rejected: called AE title not recognised",
    "Connection refused (111) to telerad.example.net:104",
    "C-STORE failed: 0xA700 Out of resources",
    "Timed out waiting for the C-STORE response after 30 s",
]
NOTE = (
    "Patient reports intermittent pain for three weeks; prior imaging at an outside "
    "facility available on request. Contrast allergy: none known. Creatinine normal. "
)
# action -> weight in the audit trail (per 10,000 events)
AUDIT_ACTIONS = {
    "hl7.message.received": 4000,
    "hl7.order.created": 2000,
    "hl7.order.updated": 500,
    "hl7.order.status": 500,
    "hl7.patient.updated": 300,
    "dicom.association": 1200,
    "dicom.worklist.query": 800,
    "delivery.delivered": 400,
    "delivery.failed": 80,
    "delivery.dead": 20,
    "auth.login": 50,
    "auth.logout": 30,
    "auth.login_failed": 10,
    "routing.node.updated": 30,
    "routing.node.verified": 20,
    "routing.rule.updated": 20,
    "routing.rule.moved": 10,
    "worklist.step.cancelled": 10,
    "delivery.retry": 5,
    "hl7.message.reprocessed": 5,
}
USERS = ["ada", "grace", "olivia", "tomasz"]


@dataclass(frozen=True)
class Sizes:
    rows: int = 100_000  # steps (with orders), HL7 messages, studies, audit events

    @property
    def patients(self) -> int:
        return max(1, self.rows // 5)


@dataclass
class Picks:
    """Values the benchmark's URLs use, read from the seeded rows."""

    counts: dict
    patient_prefix: str
    sender: str
    control_id: str
    accession: str
    flaky_node: int
    step: int
    message: int
    big_study: int
    big_study_instances: int
    audit_event: int
    audit_q: str
    seeded_at: str
    seeded_now: bool = False


# --- Reuse or seed ---------------------------------------------------------------------------


def ensure_seeded(sizes: Sizes, force: bool = False) -> Picks:
    """Seed the (migrated) bench database unless it already holds this data set; return the
    values the benchmark's URLs use."""
    from django.db import connection

    marker = _marker()
    counts = table_counts()
    wanted = {"version": SEED_VERSION, **asdict(sizes)}
    fresh = False
    if marker and {k: marker.get(k) for k in wanted} == wanted:
        age = datetime.now(UTC) - datetime.fromisoformat(marker["seeded_at"])
        short = [k for k, v in minimum_counts(sizes).items() if counts.get(k, 0) < v]
        if force:
            log("--reseed: seeding again")
        elif short:
            log(f"seeded data incomplete ({', '.join(short)}); seeding again")
        elif age > MAX_SEED_AGE:
            log(f"seed is {age.days} days old; seeding again so that the last 24 h hold data")
        else:
            log(f"reusing the data seeded at {marker['seeded_at']}: {counts}")
            fresh = True
    if not fresh:
        seed(sizes)
        counts = table_counts()
        with connection.cursor() as cur:
            marker = {**wanted, "seeded_at": datetime.now(UTC).isoformat(timespec="seconds")}
            cur.execute(
                f"COMMENT ON DATABASE {connection.ops.quote_name(_db_name())} IS "
                f"{_literal(json.dumps(marker))}"
            )
    picks = read_picks(counts)
    picks.seeded_at = marker["seeded_at"]
    picks.seeded_now = not fresh
    return picks


def minimum_counts(sizes: Sizes) -> dict[str, int]:
    n = sizes.rows
    return {
        "steps": n,
        "orders": n,
        "hl7": n,
        "studies": n,
        "instances": n,
        "deliveries": n,
        "audit": n,
        "nodes": len(NODES),
        "rules": 50,
    }


def table_counts() -> dict[str, int]:
    from django.db import connection

    tables = _tables()
    with connection.cursor() as cur:
        out = {}
        for key, model in tables.items():
            cur.execute(f"SELECT count(*) FROM {model._meta.db_table}")
            out[key] = cur.fetchone()[0]
    return out


def _tables() -> dict:
    from gateway.models import AuditEvent
    from routing.models import Delivery, Node, ReceivedInstance, ReceivedStudy, Rule
    from worklist.models import HL7Message, ImagingOrder, Patient, ScheduledStep

    return {
        "steps": ScheduledStep,
        "orders": ImagingOrder,
        "patients": Patient,
        "hl7": HL7Message,
        "studies": ReceivedStudy,
        "instances": ReceivedInstance,
        "deliveries": Delivery,
        "audit": AuditEvent,
        "nodes": Node,
        "rules": Rule,
    }


def _db_name() -> str:
    from django.db import connection

    return connection.settings_dict["NAME"]


def _marker() -> dict | None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname = current_database()"
        )
        text = cur.fetchone()[0]
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- Seeding ---------------------------------------------------------------------------------


def seed(sizes: Sizes) -> None:
    """Empty the seeded tables and load the data set (a few minutes on 2 cores)."""
    import time

    from django.core.management.color import no_style
    from django.db import connection

    from routing.models import Rule

    started = time.monotonic()
    tables = [m._meta.db_table for m in _tables().values()]
    tables.append(Rule.destinations.through._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    now = datetime.now(UTC).replace(microsecond=0)
    rng = random.Random(SEED_VERSION)

    steps = seed_worklist(sizes, now)
    messages = seed_hl7(sizes, steps, now, rng)
    nodes, rules = seed_configuration(rng, now)
    seed_studies(sizes, steps, nodes, rules, now, rng)
    seed_audit(sizes, steps, messages, nodes, rules, now, rng)

    models = list(_tables().values())
    with connection.cursor() as cur:
        for sql in connection.ops.sequence_reset_sql(no_style(), models):
            cur.execute(sql)
        log("VACUUM ANALYZE")
        cur.execute("VACUUM ANALYZE")
    from gateway import audit

    checked, broken = audit.verify()
    if broken is not None:
        raise RuntimeError(f"the seeded audit chain breaks at event {broken['id']}")
    log(f"audit chain verified over {checked:,} events")
    log(f"seeded in {time.monotonic() - started:.0f} s")


def _spread(i: int, n: int, now: datetime, rng: random.Random) -> datetime:
    """The i-th of n times, evenly over the last DAYS days in id order, a little jittered."""
    span = DAYS * 86400
    seconds = span * (i + rng.random() * 0.5) / n
    return now - timedelta(seconds=span - seconds)


def seed_worklist(sizes: Sizes, now: datetime) -> list[syn.Step]:
    """Patients, orders and steps (the worklist benchmark's generator and loader), then the
    statuses a real department would show: past steps mostly completed, today's under way,
    future ones scheduled."""
    from django.db import connection

    from worklist.models import ImagingOrder, ScheduledStep

    pats = syn.patients(sizes.patients, seed=1)
    steps = syn.steps(sizes.rows, pats, now.date(), days=DAYS // 2, seed=2)
    load_database(pats, steps)
    today = datetime.combine(now.date(), datetime.min.time(), UTC)
    bucket = "((id * 7919) %% 100)"  # %% : the query has parameters
    step_table = ScheduledStep._meta.db_table
    order_table = ImagingOrder._meta.db_table
    with connection.cursor() as cur:
        cur.execute(
            f"""UPDATE {step_table} SET status = CASE
              WHEN start < %(today)s THEN CASE
                WHEN {bucket} < 84 THEN 'COMPLETED' WHEN {bucket} < 91 THEN 'CANCELLED'
                WHEN {bucket} < 95 THEN 'DISCONTINUED' ELSE 'SCHEDULED' END
              WHEN start < %(tomorrow)s THEN CASE
                WHEN {bucket} < 30 THEN 'COMPLETED' WHEN {bucket} < 40 THEN 'STARTED'
                WHEN {bucket} < 55 THEN 'ARRIVED' WHEN {bucket} < 65 THEN 'READY'
                WHEN {bucket} < 70 THEN 'CANCELLED' ELSE 'SCHEDULED' END
              ELSE CASE WHEN {bucket} < 95 THEN 'SCHEDULED' ELSE 'CANCELLED' END
            END""",
            {"today": today, "tomorrow": today + timedelta(days=1)},
        )
        cur.execute(
            f"""UPDATE {order_table} o SET status = CASE s.status
                  WHEN 'COMPLETED' THEN 'COMPLETED' WHEN 'CANCELLED' THEN 'CANCELLED'
                  WHEN 'DISCONTINUED' THEN 'DISCONTINUED' ELSE 'OPEN' END
                FROM {step_table} s WHERE s.order_id = o.id"""
        )
    log("step and order statuses set by date")
    return steps


def seed_hl7(
    sizes: Sizes, steps: list[syn.Step], now: datetime, rng: random.Random
) -> list[tuple[str, str]]:
    """One message per row, in time order; order messages are about the order of the same
    index, and that order names the message as its last. Returns (type, control id) per
    message."""
    from django.db import connection

    from worklist.models import HL7Message, ImagingOrder, MessageStatus

    kinds, kind_weights = list(MESSAGE_TYPES), list(MESSAGE_TYPES.values())
    senders = [(a, f) for a, f, _ in SENDERS]
    sender_weights = [w for _, _, w in SENDERS]
    out: list[tuple[str, str]] = []

    def rows():
        for k in range(sizes.rows):
            kind = rng.choices(kinds, kind_weights)[0]
            app, fac = rng.choices(senders, sender_weights)[0]
            control = f"{app[:3]}{k + 1:010d}"
            step = steps[k] if kind in ORDER_TYPES else None
            patient = step.patient if step else steps[rng.randrange(len(steps))].patient
            when = _spread(k, sizes.rows, now, rng)
            status, code, text = MessageStatus.ACCEPTED, "", ""
            r = rng.random()
            if kind == "ORU^R01":
                status, code, text = (
                    MessageStatus.REJECTED,
                    "200",
                    "Unsupported message type ORU^R01",
                )
            elif r < 0.02:
                status = MessageStatus.DUPLICATE
            elif r < 0.05:
                status, code = MessageStatus.ERROR, "204"
                text = f"Unknown key identifier: no order with placer number PL{k:08d}"
            elif r < 0.06:
                status, code, text = MessageStatus.ERROR, "101", "Required field missing: PID-3"
            out.append((kind, control))
            yield {
                "id": k + 1,
                "received_at": when,
                "peer": f"10.20.{rng.randint(1, 9)}.{rng.randint(2, 250)}:"
                f"{rng.randint(30000, 60000)}",
                "sending_application": app,
                "sending_facility": fac,
                "receiving_application": "GATEWAY",
                "receiving_facility": "RADIOLOGY",
                "control_id": control,
                "message_type": kind,
                "version": "2.3.1",
                "status": status,
                "error_code": code,
                "error_text": text,
                "patient_id": patient.patient_id,
                "raw": _hl7(kind, app, fac, control, when, patient, step, rng),
                "ack": _ack(kind, app, fac, control, when, status, code, text),
                "reprocessed_from_id": None,
            }

    _copy(HL7Message, rows())
    with connection.cursor() as cur:
        cur.execute(
            f"""UPDATE {ImagingOrder._meta.db_table} o SET last_message_id = m.id
                FROM {HL7Message._meta.db_table} m
                WHERE m.id = o.id AND m.message_type = ANY(%s)""",
            [list(ORDER_TYPES)],
        )
    return out


def _hl7(
    kind: str,
    app: str,
    fac: str,
    control: str,
    when: datetime,
    patient: syn.Patient,
    step: syn.Step | None,
    rng: random.Random,
) -> bytes:
    ts = when.strftime("%Y%m%d%H%M%S")
    segs = [
        f"MSH|^~\\&|{app}|{fac}|GATEWAY|RADIOLOGY|{ts}||{kind}|{control}|P|2.3.1"
        "||||||UNICODE UTF-8",
    ]
    if kind.startswith("ADT"):
        segs.append(f"EVN|{kind[4:]}|{ts}")
    segs.append(
        f"PID|1||{patient.patient_id}^^^HOSP^MR||{patient.name}^^^^L||{patient.birth_date}|"
        f"{patient.sex}|||{rng.randint(1, 999)} Main St^^Springfield^IL^{rng.randint(10000, 99999)}"
    )
    if kind == "ADT^A40":
        segs.append(f"MRG|P{rng.randint(0, 9999999):07d}^^^HOSP^MR")
    phys = step.referring if step else rng.choice(syn.PHYSICIANS)
    segs.append(f"PV1|1|O|RAD^{rng.randint(1, 20)}^1||||{phys}^^^^^^MD")
    if step is not None:
        st = step.start.strftime("%Y%m%d%H%M%S")
        i = step.index
        segs += [
            f"ORC|NW|PL{i:08d}|FI{i:08d}||SC||^^^{st}^^R||{ts}|||{phys}^^^^^^MD",
            f"OBR|1|PL{i:08d}|FI{i:08d}|{step.procedure_code}^{step.procedure_description}"
            f"^LOCAL|||{ts}|||||||||{phys}^^^^^^MD||{step.accession}|"
            f"{step.requested_procedure_id}|{step.sps_id}||||{step.modality}|||^^^{st}^^R||||"
            f"^Routine follow-up|||||{st}",
            f"ZDS|{step.study_uid}^GATEWAY^Application^DICOM",
        ]
    body = "\r".join(segs)
    pad = max(0, 1000 - len(body) - 12)
    segs.append(f"NTE|1||{(NOTE * (pad // len(NOTE) + 1))[:pad]}")
    return ("\r".join(segs) + "\r").encode()


def _ack(
    kind: str, app: str, fac: str, control: str, when: datetime, status: str, code: str, text: str
) -> bytes:
    ts = when.strftime("%Y%m%d%H%M%S")
    ack = {"ACCEPTED": "AA", "DUPLICATE": "AA", "ERROR": "AE", "REJECTED": "AR"}[status]
    segs = [
        f"MSH|^~\\&|GATEWAY|RADIOLOGY|{app}|{fac}|{ts}||ACK^{kind[4:]}|A{control}|P|2.3.1",
        f"MSA|{ack}|{control}",
    ]
    if code:
        segs.append(f"ERR|||{code}^{text}^HL70357|E")
    return ("\r".join(segs) + "\r").encode()


def seed_configuration(rng: random.Random, now: datetime) -> tuple[list, list]:
    """Five nodes and fifty rules (ORM, a few rows each)."""
    from routing.models import Node, Rule

    nodes = Node.objects.bulk_create(
        [
            Node(
                name=name,
                ae_title=ae,
                host=host,
                port=104 if i % 2 else 11112,
                enabled=enabled,
                max_associations=2 + i % 3,
                last_echo_at=now - timedelta(minutes=3),
                last_echo_ok_at=now - timedelta(minutes=3 if name != "TELERAD" else 50),
                last_echo_error="" if name != "TELERAD" else ERRORS[1],
            )
            for i, (name, ae, host, enabled) in enumerate(NODES)
        ]
    )
    modalities = list(syn.MODALITY_WEIGHTS)
    rules = []
    for i in range(50):
        mod = modalities[i % len(modalities)]
        conditions = [{"attribute": "Modality", "op": "equals", "value": mod}]
        if i % 3 == 0:
            conditions.append({"attribute": "calling_ae", "op": "wildcard", "value": f"{mod}0*"})
        if i % 7 == 0:
            conditions.append(
                {"attribute": "StudyDescription", "op": "regex", "value": "(?i)head|brain"}
            )
        coerce = (
            [{"attribute": "InstitutionName", "action": "set", "value": "General Hospital"}]
            if i % 4 == 0
            else []
        )
        rules.append(
            Rule(
                name=f"{mod} rule {i + 1:02d}",
                order=(i + 1) * 10,
                enabled=i % 9 != 8,
                match="all" if i % 5 else "any",
                conditions=conditions,
                coerce=coerce,
                stop=i % 6 == 0,
                mode="study" if i % 8 == 0 else "instance",
            )
        )
    rules = Rule.objects.bulk_create(rules)
    through = Rule.destinations.through
    through.objects.bulk_create(
        [
            through(rule_id=rule.pk, node_id=node.pk)
            for i, rule in enumerate(rules)
            for j, node in enumerate(nodes)
            if j == i % len(nodes) or (j == 0 and i % 2 == 0)
        ]
    )
    log(f"{len(nodes)} nodes, {len(rules)} rules")
    return nodes, rules


def _header(step: syn.Step, study_uid: str, series: str, sop: str, number: int) -> dict:
    """The top-level attributes the storage SCP keeps (about 1 KB of JSON, as a CT's)."""
    return {
        "SpecificCharacterSet": "ISO_IR 192",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SOPClassUID": SOP_CLASSES[step.modality],
        "SOPInstanceUID": sop,
        "StudyDate": step.start.strftime("%Y%m%d"),
        "StudyTime": step.start.strftime("%H%M%S"),
        "AccessionNumber": step.accession,
        "Modality": step.modality,
        "Manufacturer": "ACME Medical",
        "InstitutionName": "General Hospital",
        "ReferringPhysicianName": step.referring,
        "StationName": step.station_ae,
        "StudyDescription": step.procedure_description,
        "SeriesDescription": f"{step.procedure_description} series",
        "ManufacturerModelName": "Imager 9000",
        "PatientName": step.patient.name,
        "PatientID": step.patient.patient_id,
        "IssuerOfPatientID": "HOSP",
        "PatientBirthDate": step.patient.birth_date,
        "PatientSex": step.patient.sex,
        "BodyPartExamined": "CHEST",
        "SliceThickness": "1.0",
        "KVP": "120",
        "SoftwareVersions": "VA20",
        "ProtocolName": step.procedure_code,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series,
        "StudyID": "1",
        "SeriesNumber": series.rsplit(".", 1)[1],
        "InstanceNumber": str(number),
        "ImagePositionPatient": ["0", "0", str(number)],
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "Rows": "512",
        "Columns": "512",
        "PixelSpacing": ["0.7", "0.7"],
        "WindowCenter": "40",
        "WindowWidth": "400",
    }


def seed_studies(
    sizes: Sizes, steps: list[syn.Step], nodes: list, rules: list, now: datetime, rng: random.Random
) -> None:
    """Studies (one per step index, received over DAYS days), their instances (one to a few,
    one study with BIG_STUDY_INSTANCES) and a delivery per instance and node the study goes
    to."""
    from routing.models import Delivery, ReceivedInstance, ReceivedStudy

    n = sizes.rows
    big = n - 11  # index of the big study: recent, on the first page of the list
    by_name = {node.name: node for node in nodes}
    # Rule i sends to node i % 5 (see seed_configuration): the first such rule decided.
    rule_for = {node.pk: rules[j] for j, node in enumerate(nodes)}
    studies, instances, deliveries = [], [], []
    instance_id = delivery_id = 0
    research_off = now - timedelta(days=5)
    for i in range(n):
        step = steps[i]
        last = _spread(i, n, now, rng)
        count = (
            BIG_STUDY_INSTANCES if i == big else rng.choices((1, 2, 3, 4, 5), (75, 15, 5, 3, 2))[0]
        )
        targets = [by_name["PACS-MAIN"]]
        if rng.random() < 0.4:
            targets.append(by_name["ARCHIVE"])
        if step.modality in ("CT", "MR") and rng.random() < 0.3:
            targets.append(by_name["AI-TRIAGE"])
        if rng.random() < 0.1 or i == big:
            targets.append(by_name["TELERAD"])
        if rng.random() < 0.02:
            targets.append(by_name["RESEARCH"])
        unmatched = rng.random() < 0.01
        studies.append(
            {
                "id": i + 1,
                "study_instance_uid": step.study_uid,
                "patient_id": step.patient.patient_id,
                "patient_name": step.patient.name,
                "accession_number": step.accession,
                "study_date": last.strftime("%Y%m%d"),
                "study_description": step.procedure_description,
                "modalities": step.modality,
                "first_received_at": last - timedelta(seconds=count),
                "last_received_at": last,
                "study_routed_at": None,
            }
        )
        for j in range(count):
            instance_id += 1
            series = f"{step.study_uid}.{1 + j * 3 // max(count, 1)}"
            sop = f"{series}.{j + 1}"
            received = last - timedelta(seconds=count - j)
            age = now - received
            instances.append(
                {
                    "id": instance_id,
                    "study_id": i + 1,
                    "sop_instance_uid": sop,
                    "sop_class_uid": SOP_CLASSES[step.modality],
                    "series_instance_uid": series,
                    "transfer_syntax_uid": EXPLICIT_LE,
                    "_header": (i, series, sop, j + 1),  # made while copying (memory)
                    "calling_ae": step.station_ae,
                    "called_ae": "GATEWAY",
                    "source_ip": f"10.30.1.{10 + steps[i].index % 40}",
                    "association_id": None,
                    "size": rng.randint(180_000, 540_000),
                    "path": f"/var/lib/gateway/data/{step.study_uid}/{sop}.dcm",
                    "received_at": received,
                    "version": 1,
                    "routing_status": "UNMATCHED" if unmatched else "ROUTED",
                    "routed_at": received + timedelta(milliseconds=40),
                    "file_deleted_at": (
                        received + timedelta(hours=25) if age > timedelta(hours=25) else None
                    ),
                }
            )
            if unmatched:
                continue
            for node in targets:
                delivery_id += 1
                deliveries.append(
                    _delivery(
                        delivery_id,
                        instance_id,
                        node,
                        rule_for[node.pk],
                        received,
                        now,
                        research_off,
                        rng,
                    )
                )
    _copy(ReceivedStudy, studies)
    _copy(
        ReceivedInstance,
        (
            {**row, "header": _header(steps[i], steps[i].study_uid, series, sop, number)}
            for row in instances
            for i, series, sop, number in [row["_header"]]
        ),
    )
    _copy(Delivery, deliveries)


def _delivery(
    pk: int,
    instance_id: int,
    node,
    rule,
    received: datetime,
    now: datetime,
    research_off: datetime,
    rng: random.Random,
) -> dict:
    created = received + timedelta(milliseconds=60)
    age = now - created
    r = rng.random()
    status, attempts, error = "DELIVERED", 1, ""
    if node.name == "RESEARCH" and created > research_off:
        status, attempts = "PENDING", 0
    elif node.name == "TELERAD":
        if age < timedelta(days=1) and r < 0.35:
            status, attempts, error = "FAILED", rng.randint(1, 8), rng.choice(ERRORS)
        elif r < 0.08:
            status, attempts, error = "DEAD", rng.randint(20, 40), rng.choice(ERRORS)
        elif r < 0.1:
            status, attempts, error = "ABANDONED", rng.randint(5, 30), rng.choice(ERRORS)
    elif age < timedelta(minutes=2):
        status, attempts = ("PENDING", 0) if r < 0.7 else ("SENDING", 0)
    elif r < 0.002:
        status, attempts, error = "DEAD", rng.randint(20, 40), rng.choice(ERRORS)
    elif r < 0.004:
        status, attempts, error = "ABANDONED", rng.randint(5, 30), rng.choice(ERRORS)
    elif node.name == "AI-TRIAGE" and age < timedelta(hours=6) and r < 0.02:
        status, attempts, error = "FAILED", rng.randint(1, 4), rng.choice(ERRORS)
    delivered = created + timedelta(milliseconds=rng.randint(80, 2500))
    return {
        "id": pk,
        "instance_id": instance_id,
        "node_id": node.pk,
        "rule_id": rule.pk,
        "rule_name": rule.name,
        "coerce": rule.coerce,
        "instance_version": 1,
        "status": status,
        "attempts": attempts,
        "last_error": error,
        "next_attempt_at": (
            now + timedelta(seconds=rng.randint(30, 3600)) if status == "FAILED" else created
        ),
        "claimed_at": now if status == "SENDING" else None,
        "claimed_by": "bench-worker:1" if status == "SENDING" else "",
        "retried_at": None,
        "created_at": created,
        "updated_at": delivered if status == "DELIVERED" else created,
        "delivered_at": delivered if status == "DELIVERED" else None,
    }


def seed_audit(
    sizes: Sizes,
    steps: list[syn.Step],
    messages: list[tuple[str, str]],
    nodes: list,
    rules: list,
    now: datetime,
    rng: random.Random,
) -> None:
    """The trail, in time order, through ``gateway.audit.append`` in batches (so each event's
    hash chains to the one before, as ``verify_audit`` checks)."""
    from gateway import audit

    actions, weights = list(AUDIT_ACTIONS), list(AUDIT_ACTIONS.values())
    n = sizes.rows
    batch: list[dict] = []
    for i in range(n):
        action = rng.choices(actions, weights)[0]
        k = min(len(messages) - 1, i * len(messages) // n)  # the message of that moment
        event = _audit_event(action, k, steps, messages, nodes, rules, rng)
        event["at"] = _spread(i, n, now, rng)
        batch.append(event)
        if len(batch) == AUDIT_BATCH:
            audit.append(batch)
            batch = []
        if i and i % 20_000 == 0:
            log(f"audit events: {i:,}")
    audit.append(batch)
    log(f"appended {n:,} audit events")


def _audit_event(
    action: str,
    k: int,
    steps: list[syn.Step],
    messages: list[tuple[str, str]],
    nodes: list,
    rules: list,
    rng: random.Random,
) -> dict:
    kind, control = messages[k]
    sender = control[:3].rstrip("0123456789")
    step = steps[k]
    order_repr = f"Accession {step.accession} / {step.procedure_description}"
    if action == "hl7.message.received" or action == "hl7.message.reprocessed":
        return {
            "actor": f"hl7:{sender}" if action.endswith("received") else "user:ada",
            "action": action,
            "object_type": "worklist.HL7Message",
            "object_id": str(k + 1),
            "object_repr": f"{kind} {control}",
            "detail": {
                "status": "ACCEPTED",
                "type": kind,
                "control_id": control,
                "sending_application": sender,
                "error_code": "",
            },
        }
    if action.startswith("hl7.order."):
        return {
            "actor": f"hl7:{sender}",
            "action": action,
            "object_type": "worklist.ImagingOrder",
            "object_id": str(k + 1),
            "object_repr": order_repr,
            "detail": {"message": k + 1, "control_id": control, "order_control": "NW"},
        }
    if action == "hl7.patient.updated":
        return {
            "actor": f"hl7:{sender}",
            "action": action,
            "object_type": "worklist.Patient",
            "object_id": str(step.patient.index + 1),
            "object_repr": f"{step.patient.name} [{step.patient.patient_id} (HOSP)]",
            "detail": {"message": k + 1, "fields": ["address", "name"]},
        }
    if action in ("dicom.association", "dicom.worklist.query"):
        ae = step.station_ae
        label = (
            "routing.DicomAssociation"
            if action == "dicom.association"
            else "worklist.WorklistQuery"
        )
        return {
            "actor": f"dicom:{ae}",
            "action": action,
            "object_type": label,
            "object_id": str(rng.randint(1, 10**6)),
            "object_repr": f"{ae} from 10.30.1.{rng.randint(10, 50)}",
            "detail": {"calling_ae": ae, "answers": rng.randint(0, 40), "status": "0000"},
        }
    if action.startswith("delivery.") and action != "delivery.delivered":
        node = rng.choice(nodes)
        return {
            "actor": "system" if action != "delivery.retry" else "user:grace",
            "action": action,
            "object_type": "routing.Delivery",
            "object_id": str(rng.randint(1, 100_000)),
            "object_repr": f"{step.study_uid}.1.1 → {node.name} (FAILED)",
            "detail": {
                "attempts": rng.randint(1, 30),
                "last_error": rng.choice(ERRORS),
                "node": node.pk,
            },
        }
    if action == "delivery.delivered":
        node = rng.choice(nodes)
        return {
            "actor": "system",
            "action": action,
            "object_type": "routing.Node",
            "object_id": str(node.pk),
            "object_repr": str(node),
            "detail": {"count": rng.randint(1, 20), "deliveries": [k + 1]},
        }
    if action.startswith("auth."):
        user = rng.choice(USERS)
        return {
            "actor": f"user:{user}" if action != "auth.login_failed" else "anonymous",
            "action": action,
            "object_type": "" if action.endswith("failed") else "auth.User",
            "object_id": "" if action.endswith("failed") else str(USERS.index(user) + 1),
            "object_repr": "" if action.endswith("failed") else user,
            "detail": {"ip": f"10.40.0.{rng.randint(2, 200)}", "username": user},
        }
    if action.startswith("routing.node."):
        node = rng.choice(nodes)
        detail = (
            {"ok": True, "error": "", "ms": rng.randint(2, 60)}
            if action.endswith("verified")
            else {"before": {"max_associations": 2}, "after": {"max_associations": 4}}
        )
        return {
            "actor": f"user:{rng.choice(USERS)}",
            "action": action,
            "object_type": "routing.Node",
            "object_id": str(node.pk),
            "object_repr": str(node),
            "detail": detail,
        }
    if action.startswith("routing.rule."):
        rule = rng.choice(rules)
        return {
            "actor": f"user:{rng.choice(USERS)}",
            "action": action,
            "object_type": "routing.Rule",
            "object_id": str(rule.pk),
            "object_repr": str(rule),
            "detail": {"before": {"order": rule.order}, "after": {"order": rule.order + 5}},
        }
    # worklist.step.cancelled
    return {
        "actor": f"user:{rng.choice(USERS)}",
        "action": action,
        "object_type": "worklist.ScheduledStep",
        "object_id": str(k + 1),
        "object_repr": f"SPS {step.sps_id} {step.modality} @ {step.station_ae} (CANCELLED)",
        "detail": {"before": {"status": "SCHEDULED"}, "after": {"status": "CANCELLED"}},
    }


# --- What the URLs ask for -------------------------------------------------------------------


def read_picks(counts: dict) -> Picks:
    """Query values and detail pages, chosen from the seeded rows so that each filter finds
    something and each detail page is a realistic one."""
    from django.db.models import Count

    from gateway.models import AuditEvent
    from routing.models import Delivery, Node, ReceivedInstance, ReceivedStudy
    from worklist.models import HL7Message, Patient, ScheduledStep

    prefix = "SCHM"  # SCHMIDT: a common family name, some hundreds of steps
    if not Patient.objects.filter(name_key__startswith=prefix).exists():
        prefix = Patient.objects.order_by("id").values_list("name_key", flat=True).first()[:4]
    sender = "CARDIO"  # the rarest sender: the filter has to look furthest back
    middle = max(1, counts.get("hl7", 1) // 2)
    control = (
        HL7Message.objects.filter(id__gte=middle)
        .order_by("id")
        .values_list("control_id", flat=True)
        .first()
    )
    accession = (
        ReceivedStudy.objects.filter(id__gte=max(1, counts.get("studies", 2) // 2))
        .order_by("id")
        .values_list("accession_number", flat=True)
        .first()
    )
    flaky = (
        Delivery.objects.filter(status="FAILED")
        .values("node")
        .annotate(n=Count("id"))
        .order_by("-n")
        .values_list("node", flat=True)
        .first()
        or Node.objects.order_by("id").values_list("id", flat=True).first()
    )
    step = (
        ScheduledStep.objects.filter(status="ARRIVED")
        .order_by("id")
        .values_list("id", flat=True)
        .first()
    )
    message = (
        HL7Message.objects.filter(message_type="ORM^O01", status="ACCEPTED", id__gte=middle)
        .order_by("id")
        .values_list("id", flat=True)
        .first()
    )
    big = (
        ReceivedInstance.objects.values("study")
        .annotate(n=Count("id"))
        .order_by("-n")
        .values_list("study", "n")
        .first()
    )
    event = (
        AuditEvent.objects.filter(action="hl7.order.created", id__gte=counts.get("audit", 1) // 2)
        .order_by("id")
        .values_list("id", flat=True)
        .first()
    )
    q = "A" + f"{counts.get('steps', 2) // 3:09d}"  # an accession: a needle in the trail
    return Picks(
        counts=counts,
        patient_prefix=prefix,
        sender=sender,
        control_id=control,
        accession=accession or "",
        flaky_node=flaky,
        step=step,
        message=message,
        big_study=big[0],
        big_study_instances=big[1],
        audit_event=event,
        audit_q=q,
        seeded_at="",
    )

"""The Modality Worklist benchmark's data set, twice: as rows in the gateway's tables (COPY,
so 100,000 steps load in seconds) and as DCMTK worklist files (``*.wl``) for the file-based
peers, cached under bench/output/ by a hash of the generation parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import _synthetic as syn
from _common import OUTPUT_DIR, log

WL_FORMAT_VERSION = 2  # bump when the content of the .wl files changes


@dataclass(frozen=True)
class Params:
    n_steps: int
    n_patients: int
    days: int
    today: str  # YYYY-MM-DD; dates are spread around it, so it is part of the cache key
    seed: int = 1

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "v": WL_FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generate(params: Params) -> tuple[list[syn.Patient], list[syn.Step]]:
    pats = syn.patients(params.n_patients, seed=params.seed)
    today = date.fromisoformat(params.today)
    return pats, syn.steps(params.n_steps, pats, today, params.days, seed=params.seed + 1)


# --- PostgreSQL --------------------------------------------------------------------------


def load_database(pats: list[syn.Patient], steps: list[syn.Step]) -> None:
    """COPY patients, one order per step, and the steps into the (empty, migrated) bench
    database, then reset sequences and ANALYZE so the planner sees the real distribution."""
    from django.core.management.color import no_style
    from django.db import connection

    from worklist.models import ImagingOrder, Patient, ScheduledStep, StepStatus

    now = datetime.now(UTC)
    _copy(
        Patient,
        (
            {
                "id": p.index + 1,
                "patient_id": p.patient_id,
                "issuer": "HOSP",
                "name": p.name,
                "name_key": p.name.upper(),
                "birth_date": p.birth_date,
                "sex": p.sex,
                "created_at": now,
                "updated_at": now,
            }
            for p in pats
        ),
    )
    _copy(
        ImagingOrder,
        (
            {
                "id": s.index + 1,
                "patient_id": s.patient.index + 1,
                "sending_application": "RIS",
                "sending_facility": "GENERAL HOSPITAL",
                "placer_order_number": f"PL{s.index:08d}",
                "filler_order_number": f"FI{s.index:08d}",
                "accession_number": s.accession,
                "requested_procedure_id": s.requested_procedure_id,
                "study_instance_uid": s.study_uid,
                "requested_procedure_description": s.procedure_description,
                "requested_procedure_codes": [
                    {
                        "value": s.procedure_code,
                        "scheme": "LOCAL",
                        "meaning": s.procedure_description,
                    }
                ],
                "priority": "ROUTINE",
                "referring_physician": s.referring,
                "requesting_physician": s.referring,
                "created_at": now,
                "updated_at": now,
            }
            for s in steps
        ),
    )
    _copy(
        ScheduledStep,
        (
            {
                "id": s.index + 1,
                "order_id": s.index + 1,
                "sps_id": s.sps_id,
                "status": StepStatus.SCHEDULED,
                "modality": s.modality,
                "station_ae_title": s.station_ae,
                "station_name": s.station_ae,
                "start": s.start.replace(tzinfo=UTC),  # wall clock stored as UTC
                "description": s.procedure_description,
                "protocol_codes": [
                    {
                        "value": s.procedure_code,
                        "scheme": "LOCAL",
                        "meaning": s.procedure_description,
                    }
                ],
                "performing_physician": s.physician,
                "created_at": now,
                "updated_at": now,
            }
            for s in steps
        ),
    )
    with connection.cursor() as cur:
        for sql in connection.ops.sequence_reset_sql(
            no_style(), [Patient, ImagingOrder, ScheduledStep]
        ):
            cur.execute(sql)
        cur.execute("ANALYZE")


def _copy(model, rows) -> None:
    from django.db import connection, models

    fields = model._meta.concrete_fields
    cols = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    sql = f"COPY {connection.ops.quote_name(model._meta.db_table)} ({cols}) FROM STDIN"
    n = 0
    with connection.cursor() as cur, cur.copy(sql) as copy:
        for row in rows:
            values = []
            for f in fields:
                if f.attname in row:
                    v = row[f.attname]
                elif f.has_default():
                    v = f.get_default()
                else:
                    v = None
                if isinstance(f, models.JSONField):
                    v = json.dumps(v)
                values.append(v)
            copy.write_row(values)
            n += 1
    log(f"copied {n:,} rows into {model._meta.db_table}")


# --- Worklist files ----------------------------------------------------------------------


def worklist_dir(params: Params, ae_title: str) -> Path:
    """A directory that ``wlmscpfs -dfp`` serves: <root>/<AE title>/{lockfile,*.wl}.
    Written once per parameter set; a ``complete`` marker says the cache is whole."""
    root = OUTPUT_DIR / f"worklist-files-{params.key()}"
    ae_dir = root / ae_title
    if (root / "complete").exists():
        log(f"worklist files cached in {root}")
        return root
    if root.exists():
        shutil.rmtree(root)
    ae_dir.mkdir(parents=True)
    (ae_dir / "lockfile").touch()
    log(f"writing {params.n_steps:,} worklist files to {ae_dir} (cached for the next run)")
    jobs = max(1, min(4, os.cpu_count() or 1))
    _, steps = generate(params)
    chunk = -(-len(steps) // (jobs * 4))
    with ProcessPoolExecutor(jobs) as pool:
        list(
            pool.map(
                _write_files,
                [(str(ae_dir), steps[i : i + chunk]) for i in range(0, len(steps), chunk)],
            )
        )
    (root / "params.json").write_text(json.dumps(asdict(params)))
    (root / "complete").touch()
    return root


def _write_files(job) -> None:
    ae_dir, steps = job
    for s in steps:
        _worklist_file(s).save_as(Path(ae_dir) / f"{s.sps_id}.wl", enforce_file_format=True)


def _worklist_file(s: syn.Step):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = s.accession
    ds.ReferringPhysicianName = s.referring
    ds.PatientName = s.patient.name
    ds.PatientID = s.patient.patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = s.patient.birth_date
    ds.PatientSex = s.patient.sex
    ds.StudyInstanceUID = s.study_uid
    ds.RequestingPhysician = s.referring
    ds.RequestedProcedureDescription = s.procedure_description
    ds.RequestedProcedureID = s.requested_procedure_id
    ds.RequestedProcedurePriority = "ROUTINE"
    code = Dataset()
    code.CodeValue = s.procedure_code
    code.CodingSchemeDesignator = "LOCAL"
    code.CodeMeaning = s.procedure_description
    ds.RequestedProcedureCodeSequence = [code]
    sps = Dataset()
    sps.ScheduledStationAETitle = s.station_ae
    sps.ScheduledProcedureStepStartDate = s.start.strftime("%Y%m%d")
    sps.ScheduledProcedureStepStartTime = s.start.strftime("%H%M%S")
    sps.Modality = s.modality
    sps.ScheduledPerformingPhysicianName = s.physician
    sps.ScheduledProcedureStepDescription = s.procedure_description
    sps.ScheduledStationName = s.station_ae
    sps.ScheduledProcedureStepID = s.sps_id
    sps.ScheduledProcedureStepStatus = "SCHEDULED"
    ds.ScheduledProcedureStepSequence = [sps]
    # Type 2 sequences wlmscpfs otherwise adds (with a warning) to every answer.
    ds.ReferencedStudySequence = []
    ds.ReferencedPatientSequence = []
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[s.sps_id])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds

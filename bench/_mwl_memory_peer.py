"""Framework floor for the MWL benchmark: a bare pynetdicom C-FIND SCP that holds the bench's
worklist items in memory (dict indexes, no database, no audit record) and answers the five
query shapes. Whatever time the gateway spends above this is its own; what this one spends
is pynetdicom and pydicom.

    python bench/_mwl_memory_peer.py --port P --steps N --patients M --today YYYY-MM-DD
"""

from __future__ import annotations

import argparse
import bisect
import logging
import signal
import socket
import threading
from collections import defaultdict
from datetime import date, timedelta

import _mwl_data
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class Index:
    def __init__(self, steps):
        self.steps = steps
        self.by_pid = defaultdict(list)
        self.by_acc = defaultdict(list)
        self.by_station_day = defaultdict(list)
        self.by_modality_day = defaultdict(list)
        names = []
        for s in steps:
            day = s.start.strftime("%Y%m%d")
            self.by_pid[s.patient.patient_id].append(s)
            self.by_acc[s.accession].append(s)
            self.by_station_day[(s.station_ae, day)].append(s)
            self.by_modality_day[(s.modality, day)].append(s)
            names.append((s.patient.name.upper(), s.index))
        names.sort()
        self.names = names
        self.name_keys = [n for n, _ in names]

    def candidates(self, ident: Dataset, sps: Dataset):
        pid = str(ident.get("PatientID", "") or "")
        acc = str(ident.get("AccessionNumber", "") or "")
        name = str(ident.get("PatientName", "") or "").upper()
        station = str(sps.get("ScheduledStationAETitle", "") or "")
        modality = str(sps.get("Modality", "") or "")
        days = _days(str(sps.get("ScheduledProcedureStepStartDate", "") or ""))
        if pid:
            found = self.by_pid.get(pid, [])
        elif acc:
            found = self.by_acc.get(acc, [])
        elif station and days:
            found = [s for d in days for s in self.by_station_day.get((station, d), [])]
        elif modality and days:
            found = [s for d in days for s in self.by_modality_day.get((modality, d), [])]
        elif name.endswith("*") and "*" not in name[:-1] and "?" not in name:
            prefix = name[:-1]
            lo = bisect.bisect_left(self.name_keys, prefix)
            hi = bisect.bisect_left(self.name_keys, prefix + "\uffff")
            found = [self.steps[i] for _, i in self.names[lo:hi]]
        else:
            found = self.steps
        for s in found:
            if pid and s.patient.patient_id != pid:
                continue
            if acc and s.accession != acc:
                continue
            if station and s.station_ae != station:
                continue
            if modality and s.modality != modality:
                continue
            if days and s.start.strftime("%Y%m%d") not in days:
                continue
            if name and not _name_matches(name, s.patient.name.upper()):
                continue
            yield s


def _days(value: str) -> set[str] | None:
    if not value:
        return None
    if "-" not in value:
        return {value}
    a, b = value.split("-")
    first, last = date.fromisoformat(_iso(a)), date.fromisoformat(_iso(b))
    return {(first + timedelta(days=i)).strftime("%Y%m%d") for i in range((last - first).days + 1)}


def _iso(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}"


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def answer(s, ident: Dataset, sps_keys: Dataset) -> Dataset:
    """Only the keys the query asked for, as an SCP must (PS3.4 K.4.1.1.3.2)."""
    values = {
        "SpecificCharacterSet": "ISO_IR 192",
        "AccessionNumber": s.accession,
        "ReferringPhysicianName": s.referring,
        "PatientName": s.patient.name,
        "PatientID": s.patient.patient_id,
        "IssuerOfPatientID": "HOSP",
        "PatientBirthDate": s.patient.birth_date,
        "PatientSex": s.patient.sex,
        "StudyInstanceUID": s.study_uid,
        "RequestedProcedureDescription": s.procedure_description,
        "RequestedProcedureID": s.requested_procedure_id,
        "RequestedProcedurePriority": "ROUTINE",
    }
    sps_values = {
        "Modality": s.modality,
        "ScheduledStationAETitle": s.station_ae,
        "ScheduledProcedureStepStartDate": s.start.strftime("%Y%m%d"),
        "ScheduledProcedureStepStartTime": s.start.strftime("%H%M%S"),
        "ScheduledPerformingPhysicianName": s.physician,
        "ScheduledProcedureStepDescription": s.procedure_description,
        "ScheduledProcedureStepID": s.sps_id,
        "ScheduledStationName": s.station_ae,
    }
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    for elem in ident:
        if elem.keyword in values:
            setattr(out, elem.keyword, values[elem.keyword])
    item = Dataset()
    for elem in sps_keys:
        if elem.keyword in sps_values:
            setattr(item, elem.keyword, sps_values[elem.keyword])
    out.ScheduledProcedureStepSequence = [item]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ae-title", default="BENCH")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--today", required=True)
    args = parser.parse_args()

    params = _mwl_data.Params(args.steps, args.patients, args.days, args.today)
    _, steps = _mwl_data.generate(params)
    index = Index(steps)

    def on_open(event):
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_find(event):
        ident = event.identifier
        seq = ident.get("ScheduledProcedureStepSequence") or [Dataset()]
        sps = seq[0]
        for s in index.candidates(ident, sps):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, answer(s, ident, sps)

    ae = AE(args.ae_title)
    ae.add_supported_context(ModalityWorklistInformationFind)
    ae.add_supported_context(Verification)
    server = ae.start_server(
        (args.host, args.port),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_FIND, on_find)],
    )
    print(f"memory MWL peer listening on {args.host}:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()


if __name__ == "__main__":
    main()

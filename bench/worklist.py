#!/usr/bin/env python
"""Worklist benchmark: HL7 orders in (MLLP listener) and Modality Worklist C-FIND out, each
side by side with a peer, every figure next to its target.

    cd /work/main && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test TCP_NODELAY=1 \\
        .venv/bin/python bench/worklist.py [--quick]

Uses its own database (``gateway_bench`` on DATABASE_URL's server, dropped and created),
starts ``manage.py hl7listener`` and ``manage.py dicomserver`` as subprocesses on 127.0.0.1,
and prints a table; the figures also go to bench/output/worklist-<timestamp>.json.

1. HL7: ORM^O01 new orders over 1 and 4 MLLP connections, each waiting for its ACK before
   the next; messages/s and ACK latency. Peer: a bare asyncio MLLP server that only parses
   with ``hl7`` and ACKs (bench/_mllp_peer.py). Also parse time of ``hl7`` vs ``hl7apy``.
2. MWL: 100,000 scheduled steps; five query shapes through a pynetdicom SCU on one
   association and through DCMTK ``findscu -W`` (one process per query). Peers: DCMTK
   ``wlmscpfs`` serving the same items as worklist files and, if its plugin is installed,
   Orthanc's worklist plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from _common import (
    BENCH_DIR,
    LOCALHOST,
    OUTPUT_DIR,
    PYTHON,
    Report,
    Service,
    bench_database_url,
    drop_database,
    free_port,
    gateway_env,
    log,
    manage_help,
    manage_service,
    percentile,
    recreate_database,
    setup_django,
    summary_ms,
)

AE_TITLE = "BENCH"  # called AE of every SCP here (wlmscpfs serves the folder of that name)
CALLING_AE = "BENCHSCU"
ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_WORKLIST_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")


@dataclass
class Sizes:
    hl7_messages: int
    steps: int
    patients: int
    queries: int  # per shape, gateway with pynetdicom
    findscu_queries: int  # per shape, gateway with findscu
    peer_queries: int  # per shape, file-based peers (they re-read every file per query)
    hl7_seconds: float  # time cap of one HL7 run (fewer messages if the listener is slow)
    shape_seconds: float  # time cap of one query shape on one server with one client


FULL = Sizes(
    hl7_messages=20_000,
    steps=100_000,
    patients=20_000,
    queries=200,
    findscu_queries=200,
    peer_queries=5,
    hl7_seconds=120,
    shape_seconds=60,
)
QUICK = Sizes(
    hl7_messages=2_000,
    steps=10_000,
    patients=2_000,
    queries=20,
    findscu_queries=20,
    peer_queries=3,
    hl7_seconds=20,
    shape_seconds=10,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts for a one-minute smoke run"
    )
    parser.add_argument("--db", default="gateway_bench", help="name of the bench's own database")
    parser.add_argument(
        "--keep-db", action="store_true", help="do not drop the database at the end"
    )
    parser.add_argument("--only", choices=["hl7", "mwl"], help="run one half only")
    parser.add_argument("--hl7-messages", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--queries", type=int, help="repetitions per shape (gateway, pynetdicom)")
    parser.add_argument(
        "--findscu-queries", type=int, help="repetitions per shape (gateway, findscu)"
    )
    parser.add_argument("--peer-queries", type=int, help="repetitions per shape (file-based peers)")
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc peer")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="record py-spy flame graphs of the gateway processes into DIR",
    )
    parser.add_argument("--hl7-seconds", type=float, help="time cap of one HL7 run")
    parser.add_argument("--shape-seconds", type=float, help="time cap of one query shape")
    args = parser.parse_args()

    sizes = QUICK if args.quick else FULL
    names = ("hl7_messages", "steps", "queries", "findscu_queries", "peer_queries")
    for name in (*names, "hl7_seconds", "shape_seconds"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    sizes.patients = max(1, sizes.steps // 5)

    report = Report(f"Worklist benchmark ({'quick' if args.quick else 'full'} sizes)")
    report.notes.append(
        f"bounded: each HL7 run stops after {sizes.hl7_seconds:.0f} s and each query shape after "
        f"{sizes.shape_seconds:.0f} s per server and client; 'n=' and 'msgs' say how many ran"
    )
    report.data["sizes"] = sizes.__dict__
    report.data["cpus"] = os.cpu_count()
    db_url = bench_database_url(args.db)
    started = time.monotonic()
    recreate_database(db_url)
    setup_django(db_url)
    try:
        if args.only in (None, "hl7"):
            _guarded(report, "HL7", bench_hl7, report, db_url, sizes, args.profile)
        if args.only in (None, "mwl"):
            _guarded(
                report, "MWL", bench_mwl, report, db_url, sizes, not args.no_orthanc, args.profile
            )
    finally:
        report.notes.append(
            f"run took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs "
            "(clients, servers and PostgreSQL share them)"
        )
        report.print()
        path = report.write_json("worklist")
        print(f"figures written to {path}")
        if not args.keep_db:
            from django.db import connections

            connections.close_all()
            drop_database(db_url)


def _guarded(report: Report, name: str, fn, *args) -> None:
    """Run one half; if it fails, say so in the report and go on with the other half."""
    try:
        fn(*args)
    except Exception:
        import traceback

        traceback.print_exc()
        report.notes.append(f"{name} half failed: {traceback.format_exc().splitlines()[-1]}")


# --- HL7 ---------------------------------------------------------------------------------


def bench_hl7(report: Report, db_url: str, sizes: Sizes, profile: str | None) -> None:
    sec = "HL7 ORM^O01 in (MLLP, ACK after commit)"
    n = sizes.hl7_messages
    parse = parse_times()
    report.data["hl7_parse"] = parse
    report.add(
        sec,
        "parse time per message, hl7",
        parse["hl7"]["mean_ms"],
        "ms",
        note=f"{parse['n']} messages of ~{parse['bytes']} bytes",
    )
    report.add(
        sec,
        "parse time per message, hl7apy",
        parse["hl7apy"]["mean_ms"],
        "ms",
        note="parse_message(find_groups=True), no validation",
    )
    if "gateway" in parse:
        report.add(
            sec,
            "split + map per message, gateway (Message and mapping)",
            parse["gateway"]["mean_ms"],
            "ms",
            note="the listener's own split, reading every value the worklist maps",
        )

    peer_port = free_port()
    peer = Service(
        "mllp peer",
        [PYTHON, str(BENCH_DIR / "_mllp_peer.py"), "--port", str(peer_port)],
        gateway_env(db_url),
        peer_port,
    )
    with peer:
        run_mllp(peer_port, 200, 1, "WPEER")  # warm-up
        peer1 = run_mllp(peer_port, n, 1, "PEER1", sizes.hl7_seconds)
        peer4 = run_mllp(peer_port, n, 4, "PEER4", sizes.hl7_seconds)
    report.data["hl7_peer"] = {"1": _strip(peer1), "4": _strip(peer4)}

    env = gateway_env(db_url)
    inproc = handle_message_in_process()
    if inproc:
        report.data["hl7_in_process"] = inproc
        report.add(
            sec,
            "handle_message() in this process, no sockets: time per message",
            inproc["lat"].get("p50_ms"),
            "ms",
            note=f"p99 {inproc['lat'].get('p99_ms', 0):.1f} ms; "
            f"{inproc['sql_per_message']:.1f} SQL statements per message "
            f"({', '.join(inproc['sql_kinds'])})",
        )
    help_text = manage_help("hl7listener", env)
    if help_text is None:
        for label, r in (("4 connections", peer4), ("1 connection", peer1)):
            report.add(
                sec,
                f"msg/s, {label}",
                None,
                "msg/s",
                peer=r["rate"],
                peer_name="asyncio+hl7 peer",
                note="manage.py hl7listener not available",
            )
            report.add(
                sec,
                f"ACK p50 / p99, {label}",
                None,
                "ms",
                peer=r["lat"].get("p50_ms"),
                peer_name="asyncio+hl7 peer",
                note=f"peer p99 {r['lat'].get('p99_ms', 0):.1f} ms",
            )
        return
    worker_counts = [1, 2] if "--workers" in help_text else [1]
    if len(worker_counts) == 1:
        report.notes.append("hl7listener has no --workers option: measured with one worker only")
    report.data["hl7_gateway"] = {}
    for workers in worker_counts:
        port = free_port()
        argv = ["hl7listener", "--host", LOCALHOST, "--port", str(port)]
        if "--workers" in help_text:
            argv += ["--workers", str(workers)]
        with manage_service(f"hl7listener x{workers}", argv, env, port) as svc:
            run_mllp(port, 200, 1, f"U{workers}")  # warm-up: connections, caches
            before = pg_counters()
            with py_spy(profile, svc.pid, f"hl7listener-w{workers}-c1"):
                one = run_mllp(port, n, 1, f"G{workers}A", sizes.hl7_seconds)
            per_message = pg_delta(before, pg_counters(), one["messages"])
            before = pg_counters()
            with py_spy(profile, svc.pid, f"hl7listener-w{workers}-c4"):
                four = run_mllp(port, n, 4, f"G{workers}B", sizes.hl7_seconds)
            per_message_4 = pg_delta(before, pg_counters(), four["messages"])
            rss = svc.peak_rss_mb()
        stored = stored_orders([f"G{workers}A", f"G{workers}B"])
        report.data["hl7_gateway"][str(workers)] = {
            "1": _strip(one),
            "4": _strip(four),
            "peak_rss_mb": rss,
            "orders_stored": stored,
            "db_work_per_message": per_message,
            "db_work_per_message_4": per_message_4,
        }
        w = f"{workers} worker{'s' if workers > 1 else ''}"
        report.add(
            sec,
            f"msg/s, 4 connections, {w}",
            four["rate"],
            "msg/s",
            ">= 600",
            peer4["rate"],
            "asyncio+hl7 peer",
            note=_codes(four),
        )
        report.add(
            sec,
            f"msg/s, 1 connection, {w}",
            one["rate"],
            "msg/s",
            "",
            peer1["rate"],
            "asyncio+hl7 peer",
            note=_codes(one),
        )
        report.add(
            sec,
            f"ACK p50, 1 connection, {w}",
            one["lat"].get("p50_ms"),
            "ms",
            "<= 5",
            peer1["lat"].get("p50_ms"),
            "asyncio+hl7 peer",
        )
        report.add(
            sec,
            f"ACK p99, 1 connection, {w}",
            one["lat"].get("p99_ms"),
            "ms",
            "<= 20",
            peer1["lat"].get("p99_ms"),
            "asyncio+hl7 peer",
        )
        report.add(
            sec,
            f"ACK p50 / p99, 4 connections, {w}",
            four["lat"].get("p50_ms"),
            "ms",
            "",
            peer4["lat"].get("p50_ms"),
            "asyncio+hl7 peer",
            note=f"p99 {four['lat'].get('p99_ms', 0):.1f} ms "
            f"(peer {peer4['lat'].get('p99_ms', 0):.1f})",
        )
        expected = one["codes"].get("AA", 0) + four["codes"].get("AA", 0)
        report.add(
            sec,
            f"orders stored for AA'd messages, {w}",
            stored,
            "",
            f">= {expected}" if expected else "",
            note=f"{expected} messages answered AA",
        )
        report.add(sec, f"listener peak RSS, {w}", rss, "MB")
        report.add(
            sec,
            f"DB row writes + scans + commits per message, 1 connection, {w}",
            per_message.get("statements~"),
            "",
            note=", ".join(f"{k} {v:.1f}" for k, v in per_message.items() if k != "statements~"),
        )
        report.add(
            sec,
            f"DB row writes + scans + commits per message, 4 connections, {w}",
            per_message_4.get("statements~"),
            "",
            note=", ".join(f"{k} {v:.2f}" for k, v in per_message_4.items()
                           if k != "statements~") + " (messages arriving together share a commit)",
        )


def run_mllp(port: int, total: int, conns: int, tag: str, max_seconds: float = 60) -> dict:
    """Send ``total`` ORM^O01 over ``conns`` connections (one client process each) and wait for
    every ACK. Returns rate over the whole run, latency summary and ACK codes."""
    per = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    procs = [
        subprocess.Popen(
            [
                PYTHON,
                str(BENCH_DIR / "_mllp_client.py"),
                "--port",
                str(port),
                "--count",
                str(c),
                "--tag",
                f"{tag}{i}",
                "--max-seconds",
                str(max_seconds),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, c in enumerate(per)
    ]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "READY":
            for q in procs:
                q.kill()
            raise RuntimeError(f"MLLP client did not start: {line!r}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    timeout = max_seconds + 120  # bounded even if the server stalls
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        results.append(
            json.loads(out.strip().splitlines()[-1])
            if out.strip()
            else {"start": 0, "end": 0, "latencies": [], "codes": {}, "errors": ["no result"]}
        )
    lat = [x for r in results for x in r["latencies"]]
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    codes = Counter()
    for r in results:
        codes.update(r["codes"])
    errors = [e for r in results for e in r["errors"]]
    out = {
        "messages": len(lat),
        "connections": conns,
        "seconds": end - start,
        "rate": len(lat) / (end - start) if end > start else None,
        "lat": summary_ms(lat),
        "codes": dict(codes),
        "errors": errors,
    }
    log(
        f"MLLP {tag}: {len(lat)} msgs over {conns} conn in {end - start:.1f} s = "
        f"{out['rate'] or 0:.0f} msg/s, p50 {out['lat'].get('p50_ms', 0):.2f} ms, "
        f"p99 {out['lat'].get('p99_ms', 0):.2f} ms, {dict(codes)} {errors[:3]}"
    )
    return out


def parse_times(n: int = 200) -> dict:
    """Mean/p50 time per message of ``hl7.parse``, hl7apy's ``parse_message`` and, when the
    gateway is importable, the listener's own split plus reading every mapped value."""
    import _synthetic
    import hl7
    from hl7apy.parser import parse_message

    raws = _synthetic.orm_messages(n, "PARSE")
    msgs = [m.decode() for m in raws]
    out = {"n": n, "bytes": round(statistics.mean(len(m) for m in msgs))}
    candidates = [("hl7", hl7.parse, msgs, 5), ("hl7apy", parse_message, msgs, 1)]
    try:
        from worklist.hl7 import mapping
        from worklist.hl7.parse import Message

        def gateway(raw: bytes) -> None:
            msg = Message(raw)
            mapping.patient_info(msg, msg.first("PID"))
            mapping.procedures(msg)

        candidates.append(("gateway", gateway, raws, 5))
    except ImportError:
        pass
    for name, fn, inputs, reps in candidates:
        fn(inputs[0])
        times = []
        for _ in range(reps):
            for m in inputs:
                t0 = time.perf_counter()
                fn(m)
                times.append(time.perf_counter() - t0)
        out[name] = summary_ms(times)
    log("parse: " + ", ".join(f"{k} {out[k]['mean_ms']:.3f} ms"
                              for k in ("hl7", "hl7apy", "gateway") if k in out))
    return out


def handle_message_in_process(n: int = 300) -> dict | None:
    """The listener's plain function called directly: what one message costs without MLLP,
    threads or a second process, and which SQL statements it runs."""
    try:
        from worklist.hl7.service import handle_message
    except ImportError:
        return None
    import _synthetic
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    msgs = _synthetic.orm_messages(n + 60, "INPROC")
    for m in msgs[:10]:
        handle_message(m, "127.0.0.1:1")
    with CaptureQueriesContext(connection) as ctx:
        for m in msgs[10:60]:
            handle_message(m, "127.0.0.1:1")
    kinds = Counter(q["sql"].split(None, 1)[0].upper() for q in ctx.captured_queries)
    times = []
    for m in msgs[60:]:
        t0 = time.perf_counter()
        ack = handle_message(m, "127.0.0.1:1")
        times.append(time.perf_counter() - t0)
    connection.close()
    return {
        "lat": summary_ms(times),
        "sql_per_message": len(ctx.captured_queries) / 50,
        "sql_kinds": [f"{k} {v / 50:g}" for k, v in kinds.most_common()],
        "last_ack": ack.decode("utf-8", "replace"),
    }


def pg_counters() -> dict[str, int]:
    """Commits, row writes and index/sequential scans of the bench database so far (from
    PostgreSQL's statistics views, which lag a little: call after a pause)."""
    from django.db import connection

    time.sleep(1.0)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        commits = cur.fetchone()[0]
        cur.execute(
            "SELECT coalesce(sum(n_tup_ins), 0), coalesce(sum(n_tup_upd), 0), "
            "coalesce(sum(n_tup_del), 0), coalesce(sum(seq_scan), 0), "
            "coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables"
        )
        ins, upd, dele, seq, idx = (int(v) for v in cur.fetchone())
    connection.close()
    return {
        "commits": commits,
        "inserts": ins,
        "updates": upd,
        "deletes": dele,
        "seq_scans": seq,
        "idx_scans": idx,
    }


def pg_delta(before: dict, after: dict, messages: int) -> dict[str, float]:
    """Per-message database work between two :func:`pg_counters`; ``statements~`` estimates
    round trips as row writes plus scans plus commits (an estimate: a scan is not a query)."""
    if not messages:
        return {}
    out = {k: (after[k] - before[k]) / messages for k in after}
    out["statements~"] = sum(
        out[k] for k in ("inserts", "updates", "deletes", "idx_scans", "seq_scans", "commits")
    )
    return out


def stored_orders(tags: list[str]) -> int:
    from django.db import connection
    from django.db.models import Q

    from worklist.models import ImagingOrder

    q = Q()
    for t in tags:
        q |= Q(accession_number__startswith=t)
    n = ImagingOrder.objects.filter(q).count()
    connection.close()
    return n


def _codes(r: dict) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
    return f"{r['messages']} msgs in {r['seconds']:.1f} s; ACKs {codes}" + (
        f"; errors: {r['errors'][:2]}" if r["errors"] else ""
    )


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items()}


# --- MWL ---------------------------------------------------------------------------------

SHAPES = {
    "patient_id": "1 patient ID",
    "accession": "2 accession number",
    "station_today": "3 station AE + today",
    "modality_week": "4 modality + week",
    "name_wildcard": "5 PatientName wildcard",
}


@dataclass
class Query:
    shape: str
    keys: dict[str, str] = field(default_factory=dict)  # top-level matching keys
    sps: dict[str, str] = field(default_factory=dict)  # matching keys in the SPS item

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {**self.keys, **self.sps}.items())


RETURN_KEYS = [
    "SpecificCharacterSet",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "RequestedProcedurePriority",
]
SPS_RETURN_KEYS = [
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledStationName",
]


def make_queries(steps, today: date, reps: int, seed: int = 7) -> dict[str, list[Query]]:
    """``reps`` queries per shape with values drawn from the data (so most have answers)."""
    from _synthetic import MODALITY_WEIGHTS, STATIONS

    rng = random.Random(seed)
    out: dict[str, list[Query]] = {s: [] for s in SHAPES}
    stations = [ae for aes in STATIONS.values() for ae in aes]
    ascii_prefixes = sorted(
        {
            s.patient.name[:3]
            for s in steps
            if s.patient.name[:3].isascii() and s.patient.name[:3].isalpha()
        }
    )
    for _ in range(reps):
        s = rng.choice(steps)
        out["patient_id"].append(Query("patient_id", {"PatientID": s.patient.patient_id}))
        out["accession"].append(
            Query("accession", {"AccessionNumber": rng.choice(steps).accession})
        )
        out["station_today"].append(
            Query(
                "station_today",
                sps={
                    "ScheduledStationAETitle": rng.choice(stations),
                    "ScheduledProcedureStepStartDate": today.strftime("%Y%m%d"),
                },
            )
        )
        first = today + timedelta(days=rng.randint(-30, 23))
        last = first + timedelta(days=6)
        out["modality_week"].append(
            Query(
                "modality_week",
                sps={
                    "Modality": rng.choice(list(MODALITY_WEIGHTS)),
                    "ScheduledProcedureStepStartDate": f"{first:%Y%m%d}-{last:%Y%m%d}",
                },
            )
        )
        out["name_wildcard"].append(
            Query("name_wildcard", {"PatientName": rng.choice(ascii_prefixes) + "*"})
        )
    return out


def identifier(q: Query):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k in RETURN_KEYS:
        setattr(ds, k, "")
    for k, v in q.keys.items():
        setattr(ds, k, v)
    item = Dataset()
    for k in SPS_RETURN_KEYS:
        setattr(item, k, "")
    for k, v in q.sps.items():
        setattr(item, k, v)
    ds.ScheduledProcedureStepSequence = [item]
    return ds


def findscu_args(q: Query) -> list[str]:
    keys = []
    for k in RETURN_KEYS:
        keys += ["-k", f"{k}={q.keys.get(k, '')}"]
    for k, v in q.keys.items():
        if k not in RETURN_KEYS:
            keys += ["-k", f"{k}={v}"]
    for k in SPS_RETURN_KEYS:
        keys += ["-k", f"ScheduledProcedureStepSequence[0].{k}={q.sps.get(k, '')}"]
    return keys


def run_pynetdicom(
    port: int, queries: dict[str, list[Query]], reps: int, who: str, budget: float = 60
) -> dict:
    """Every shape's first ``reps`` queries on one association; per query: seconds, items."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate(
        LOCALHOST, port, ae_title=AE_TITLE, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise RuntimeError(f"{who}: association to port {port} not established")
    out: dict[str, list[dict]] = {}
    try:
        for shape, qs in queries.items():
            res = []
            shape_start = time.perf_counter()
            for q in qs[:reps]:
                if time.perf_counter() - shape_start > budget:
                    break  # the shape's time cap: fewer queries, reported as n
                ds = identifier(q)
                items, final = 0, None
                t0 = time.perf_counter()
                for status, _identifier in assoc.send_c_find(ds, ModalityWorklistInformationFind):
                    if status and status.Status in (0xFF00, 0xFF01):
                        items += 1
                    elif status:
                        final = status.Status
                dt = time.perf_counter() - t0
                res.append({"s": dt, "items": items, "status": final, "q": q.label()})
            out[shape] = res
            _log_shape(who + " pynetdicom", shape, res)
    finally:
        assoc.release()
    return out


def _nodelay(event) -> None:
    """pynetdicom leaves Nagle on: the SCU's identifier PDU would wait for the SCP's delayed
    ACK of the command PDU (~40 ms per query), which measures the kernel, not the SCP."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_RESPONSE = re.compile(r"Find Response: \d+ \(Pending\)")


def run_findscu(
    port: int, queries: dict[str, list[Query]], reps: int, who: str, budget: float = 60
) -> dict:
    """One ``findscu -W`` process per query; seconds (process start to exit) and items."""
    env = dict(os.environ, TCP_NODELAY="1")
    out: dict[str, list[dict]] = {}
    for shape, qs in queries.items():
        res = []
        shape_start = time.perf_counter()
        for q in qs[:reps]:
            if time.perf_counter() - shape_start > budget:
                break  # the shape's time cap: fewer queries, reported as n
            argv = [
                "findscu",
                "-W",
                "-aet",
                CALLING_AE,
                "-aec",
                AE_TITLE,
                "-to",
                "120",
                "-ta",
                "30",
                "-td",
                "300",
                LOCALHOST,
                str(port),
                *findscu_args(q),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(
                argv, env=env, capture_output=True, text=True, errors="replace", timeout=600
            )
            dt = time.perf_counter() - t0
            text = proc.stdout + proc.stderr
            res.append(
                {
                    "s": dt,
                    "items": len(_RESPONSE.findall(text)),
                    "status": proc.returncode,
                    "q": q.label(),
                }
            )
        out[shape] = res
        _log_shape(who + " findscu", shape, res)
    return out


def _log_shape(who: str, shape: str, res: list[dict]) -> None:
    s = summary_ms(r["s"] for r in res)
    items = [r["items"] for r in res]
    log(
        f"{who} {shape}: n={len(res)} p50 {s.get('p50_ms', 0):.1f} ms "
        f"p99 {s.get('p99_ms', 0):.1f} ms "
        f"items median {statistics.median(items) if items else 0}"
    )


def bench_mwl(
    report: Report, db_url: str, sizes: Sizes, orthanc: bool, profile: str | None
) -> None:
    import _mwl_data

    sec = "Modality Worklist C-FIND"
    today = date.today()
    params = _mwl_data.Params(sizes.steps, sizes.patients, 30, today.isoformat())
    pats, steps = _mwl_data.generate(params)
    _truncate_worklist()
    t0 = time.perf_counter()
    _mwl_data.load_database(pats, steps)
    load_s = time.perf_counter() - t0
    from django.db import connection

    connection.close()
    report.add(sec, f"load {len(steps):,} steps / {len(pats):,} patients (COPY)", load_s, "s")
    wl_root = _mwl_data.worklist_dir(params, AE_TITLE)
    reps = max(sizes.queries, sizes.findscu_queries, sizes.peer_queries)
    queries = make_queries(steps, today, reps)
    cap = sizes.shape_seconds
    report.data["mwl"] = {"params": params.__dict__, "load_s": load_s}

    env = gateway_env(db_url)
    gateway: dict = {}
    if manage_help("dicomserver", env) is None:
        report.add(sec, "gateway dicomserver", None, note="manage.py dicomserver not available")
    else:
        port = free_port()
        svc = manage_service(
            "dicomserver",
            ["dicomserver", "--host", LOCALHOST, "--port", str(port), "--ae-title", AE_TITLE],
            env,
            port,
        )
        with svc:
            run_pynetdicom(port, {k: v[:3] for k, v in queries.items()}, 3, "warm-up")
            with py_spy(profile, svc.pid, "dicomserver-pynetdicom"):
                gateway["pynetdicom"] = run_pynetdicom(port, queries, sizes.queries, "gateway", cap)
            with py_spy(profile, svc.pid, "dicomserver-findscu"):
                gateway["findscu"] = run_findscu(
                    port, queries, sizes.findscu_queries, "gateway", cap
                )
            gateway["peak_rss_mb"] = svc.peak_rss_mb()
            log(f"dicomserver peak RSS {gateway['peak_rss_mb']} MB")
        gateway["recorded"] = recorded_queries()

    peers: dict[str, dict] = {}
    port = free_port()
    memory = Service(
        "in-memory pynetdicom SCP",
        [
            PYTHON,
            str(BENCH_DIR / "_mwl_memory_peer.py"),
            *("--port", str(port), "--ae-title", AE_TITLE, "--today", params.today),
            *("--steps", str(params.n_steps), "--patients", str(params.n_patients)),
            *("--days", str(params.days)),
        ],
        gateway_env(db_url),
        port,
    )
    with memory:
        run_pynetdicom(port, {k: v[:3] for k, v in queries.items()}, 3, "warm-up")
        peers["memory"] = {
            "pynetdicom": run_pynetdicom(port, queries, sizes.queries, "memory", cap),
            "findscu": run_findscu(port, queries, sizes.findscu_queries, "memory", cap),
            "peak_rss_mb": memory.peak_rss_mb(),
        }
    port = free_port()
    wlm = Service(
        "wlmscpfs",
        ["wlmscpfs", "-ll", "error", "-csk", "-dfp", str(wl_root), str(port)],
        gateway_env(db_url),
        port,
        cwd=OUTPUT_DIR,
    )
    with wlm:
        peers["wlmscpfs"] = {
            "pynetdicom": run_pynetdicom(port, queries, sizes.peer_queries, "wlmscpfs", cap),
            "findscu": run_findscu(port, queries, sizes.peer_queries, "wlmscpfs", cap),
        }
    # Orthanc, like wlmscpfs, reads every file per query: three repetitions say enough.
    orthanc_reps = min(3, sizes.peer_queries)
    if orthanc and ORTHANC.exists() and ORTHANC_WORKLIST_PLUGIN.exists():
        try:
            with orthanc_service(wl_root / AE_TITLE) as (orth, oport):
                peers["orthanc"] = {
                    "pynetdicom": run_pynetdicom(oport, queries, orthanc_reps, "orthanc", cap),
                    "findscu": run_findscu(oport, queries, orthanc_reps, "orthanc", cap),
                }
        except Exception as exc:  # the peer is optional; say why it is missing
            report.notes.append(f"Orthanc worklist peer skipped: {exc}")
    elif orthanc:
        report.notes.append(
            "Orthanc worklist peer skipped: Orthanc or its worklist plugin is not installed"
        )

    report.data["mwl"].update({"gateway": gateway, "peers": peers})
    _mwl_rows(report, sec, sizes, gateway, peers)


def _mwl_rows(report: Report, sec: str, sizes: Sizes, gateway: dict, peers: dict) -> None:
    wlm = peers.get("wlmscpfs", {})
    for client in ("pynetdicom", "findscu"):
        g = gateway.get(client, {})
        section = f"{sec}, {client}" + (
            " (one association, timed in the SCU)"
            if client == "pynetdicom"
            else " (one process per query, timed from spawn to exit)"
        )
        for shape, title in SHAPES.items():
            res = g.get(shape, [])
            pres = wlm.get(client, {}).get(shape, [])
            s = summary_ms(r["s"] for r in res)
            ps = summary_ms(r["s"] for r in pres)
            peer = f"wlmscpfs n={len(pres)}"
            items = [r["items"] for r in res]
            med_items = statistics.median(items) if items else None
            bad = sum(1 for r in res if r["status"] not in (0, 0x0000))
            note = f"n={len(res)}, items median {med_items:g} (max {max(items)})" if items else ""
            if bad:
                note += f", {bad} not successful"
            report.add(
                section,
                f"{title} p50",
                s.get("p50_ms"),
                "ms",
                "",
                ps.get("p50_ms"),
                peer,
                note=note,
            )
            report.add(section, f"{title} p99", s.get("p99_ms"), "ms", "", ps.get("p99_ms"), peer)
            if s.get("p50_ms") and ps.get("p50_ms"):
                small = med_items is not None and med_items <= 10
                report.add(
                    section,
                    f"{title} speed-up vs wlmscpfs (p50/p50)",
                    ps["p50_ms"] / s["p50_ms"],
                    "x",
                    ">= 30" if small else "",
                    note="" if small else "more than 10 items: not held to the 30x target",
                )
            mem = peers.get("memory", {}).get(client, {}).get(shape, [])
            if mem:
                ms = summary_ms(r["s"] for r in mem)
                report.add(
                    section,
                    f"{title} p50 / p99, in-memory pynetdicom SCP (floor)",
                    ms.get("p50_ms"),
                    "ms",
                    note=f"p99 {ms.get('p99_ms', 0):.1f} ms, n={len(mem)}",
                )
            orth = peers.get("orthanc", {}).get(client, {}).get(shape, [])
            if orth:
                os_ = summary_ms(r["s"] for r in orth)
                report.add(
                    section,
                    f"{title} p50, Orthanc worklist plugin (peer)",
                    os_.get("p50_ms"),
                    "ms",
                    note=f"n={len(orth)}, items median "
                    f"{statistics.median(r['items'] for r in orth):g}",
                )

    sec2 = f"{sec}: targets"
    g = gateway.get("pynetdicom", {})
    small = [r["s"] for rs in g.values() for r in rs if r["items"] <= 10]
    s = summary_ms(small)
    floor = summary_ms(
        r["s"]
        for rs in peers.get("memory", {}).get("pynetdicom", {}).values()
        for r in rs
        if r["items"] <= 10
    )
    report.add(
        sec2,
        f"queries answering <= 10 items, pynetdicom p50 (n={s['n']})",
        s.get("p50_ms"),
        "ms",
        "<= 15",
        floor.get("p50_ms"),
        "in-memory pynetdicom SCP",
    )
    report.add(
        sec2,
        f"queries answering <= 10 items, pynetdicom p99 (n={s['n']})",
        s.get("p99_ms"),
        "ms",
        "<= 50",
        floor.get("p99_ms"),
        "in-memory pynetdicom SCP",
    )
    fs = summary_ms(
        r["s"] for rs in gateway.get("findscu", {}).values() for r in rs if r["items"] <= 10
    )
    report.add(
        sec2,
        f"queries answering <= 10 items, findscu p50 (n={fs['n']})",
        fs.get("p50_ms"),
        "ms",
        note="includes findscu process start",
    )
    for client in ("pynetdicom", "findscu"):
        big = [r for r in gateway.get(client, {}).get("modality_week", []) if r["items"]]
        rates = [r["items"] / r["s"] for r in big]
        mem = peers.get("memory", {}).get(client, {}).get("modality_week", [])
        frates = [r["items"] / r["s"] for r in mem if r["items"]]
        prates = [
            r["items"] / r["s"] for r in wlm.get(client, {}).get("modality_week", []) if r["items"]
        ]
        report.add(
            sec2,
            f"large answers (modality + week), {client}, items/s p50",
            percentile(rates, 50),
            "items/s",
            ">= 1500" if client == "pynetdicom" else "",
            percentile(frates, 50),
            "in-memory pynetdicom SCP",
            note=(f"median {statistics.median(r['items'] for r in big):g} items; " if big else "")
            + f"wlmscpfs {percentile(prates, 50) or 0:.0f} items/s",
        )
    recorded = gateway.get("recorded") or []
    rs = [d / 1000 for a, d in recorded if a <= 10]
    rec = summary_ms(rs)
    report.add(
        sec2,
        f"handler time, queries answering <= 10 items (WorklistQuery.duration_ms, n={rec['n']})",
        rec.get("p50_ms"),
        "ms",
        note=f"p99 {rec.get('p99_ms') or 0:.1f} ms; the rest of the SCU-side time is pynetdicom",
    )
    report.add(sec2, "dicomserver peak RSS (VmHWM)", gateway.get("peak_rss_mb"), "MB", "<= 300")
    report.add(
        sec2,
        "in-memory pynetdicom SCP peak RSS (VmHWM)",
        peers.get("memory", {}).get("peak_rss_mb"),
        "MB",
    )
    for name in ("wlmscpfs", "memory"):
        mismatches, compared = _compare_answers(gateway, peers.get(name, {}), name)
        report.add(
            sec2,
            f"answers differing from {name} peer ({compared} queries compared)",
            mismatches,
            "",
            "<= 0" if compared else "",
            note="same query, item counts",
        )


def _compare_answers(gateway: dict, wlm: dict, name: str) -> tuple[int, int]:
    mism = compared = 0
    for client in ("pynetdicom", "findscu"):
        for shape, pres in wlm.get(client, {}).items():
            gres = {r["q"]: r["items"] for r in gateway.get(client, {}).get(shape, [])}
            for r in pres:
                if r["q"] in gres:
                    compared += 1
                    if gres[r["q"]] != r["items"]:
                        mism += 1
                        log(
                            f"answer count differs for {client} {r['q']}: gateway {gres[r['q']]}, "
                            f"{name} {r['items']}"
                        )
    return mism, compared


def recorded_queries() -> list[tuple[int, float]]:
    """(answers, duration_ms) of every query the gateway recorded as a WorklistQuery: its own
    view of the time spent, from the handler's start to its final response."""
    from django.db import connection

    from worklist.models import WorklistQuery

    rows = list(WorklistQuery.objects.values_list("answers", "duration_ms"))
    connection.close()
    return rows


def _truncate_worklist() -> None:
    from django.db import connection

    from worklist.models import HL7Message, ImagingOrder, Patient, ScheduledStep

    tables = ", ".join(m._meta.db_table for m in (ScheduledStep, ImagingOrder, Patient, HL7Message))
    with connection.cursor() as cur:
        cur.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


class orthanc_service:
    """Orthanc with its Modality Worklists plugin serving ``folder`` (the same .wl files)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        work = OUTPUT_DIR / "orthanc"
        work.mkdir(parents=True, exist_ok=True)
        port, http = free_port(), free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(work / "db"),
            "IndexDirectory": str(work / "db"),
            "DicomAet": AE_TITLE,
            "DicomPort": port,
            "HttpPort": http,
            "RemoteAccessAllowed": False,
            "HttpServerEnabled": True,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {"bench": [CALLING_AE, LOCALHOST, 104]},
            "Plugins": [str(ORTHANC_WORKLIST_PLUGIN)],
            "Worklists": {"Enable": True, "Database": str(self.folder)},
            "StableAge": 1,
            "ConcurrentJobs": 1,
        }
        (work / "orthanc.json").write_text(json.dumps(cfg))
        self.svc = Service(
            "orthanc",
            [str(ORTHANC), str(work / "orthanc.json")],
            dict(os.environ, TCP_NODELAY="1"),
            port,
            cwd=work,
        ).start(timeout=60)
        return self.svc, port

    def __exit__(self, *exc):
        self.svc.stop()


class py_spy:
    """``py-spy record`` of ``pid`` into DIR/<name>.svg while the block runs (no-op without DIR)."""

    def __init__(self, directory: str | None, pid: int, name: str):
        self.directory, self.pid, self.name = directory, pid, name
        self.proc = None

    def __enter__(self):
        if self.directory:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            exe = Path(PYTHON).with_name("py-spy")
            out = Path(self.directory) / f"{self.name}"
            self.proc = subprocess.Popen(
                [
                    str(exe),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--subprocesses",
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "-o",
                    f"{out}.txt",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    sys.exit(main())

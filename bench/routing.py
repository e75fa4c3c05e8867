"""Routing benchmark: how fast the gateway takes in CT instances and forwards them to a PACS.

Figures, not a test. Each figure is printed next to its target and a peer measured in the same
run on the same machine:

1. N synthetic CT instances (512x512, 16 bit, ~0.5 MB, one study, Explicit VR Little Endian)
   are generated once into bench/output/ct-<N>/ and reused.
2. Ingest: ``dcmsend`` -> gateway ``dicomserver`` with no rule (each instance fsynced and recorded
   before Success) against ``dcmsend`` -> DCMTK ``storescp`` (writes files, no fsync).
3. End to end: ``dcmsend`` -> gateway -> Celery worker (Redis DB 14) -> Orthanc until Orthanc holds
   all N, against ``dcmsend`` -> Orthanc directly; latency of the first instance (Orthanc holding
   it minus the gateway's ``received_at``), in bulk and for single sends, with Redis and with the
   embedded filesystem broker.
4. Drain: pending deliveries created in bulk (a node that was down), sent once a worker runs.

Run: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/test TCP_NODELAY=1 \
.venv/bin/python bench/routing.py [--quick]``. Uses its own database (gateway_bench_routing),
Redis DB 14 on 127.0.0.1:6379 (flushed first and last), and only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    OUTPUT_DIR,
    PYTHON,
    ROOT,
    Report,
    bench_database_url,
    drop_database,
    free_port,
    gateway_env,
    log,
    manage_service,
    percentile,
    project_importable,
    recreate_database,
    setup_django,
    tree_cpu_seconds,
)

project_importable()
from tests.servers import orthanc_config  # noqa: E402  (needs the project's root on sys.path)

ORTHANC = "/usr/sbin/Orthanc"
GATEWAY_AE = "GATEWAY"
ORTHANC_AE = "ORTHANC"
REDIS_URL = "redis://127.0.0.1:6379/14"
SINGLE_SENDS = 5


# --- Synthetic data --------------------------------------------------------------------------


def ensure_ct(n: int, tag: str = "ct") -> list[Path]:
    """N CT instances of one study in bench/output/<tag>-<n>/, generated once and cached."""
    target = OUTPUT_DIR / f"{tag}-{n}"
    if target.is_dir():
        files = sorted(target.glob("*.dcm"))
        if len(files) == n:
            log(f"reusing {n} instances in {target}")
            return files
        shutil.rmtree(target)
    tmp = OUTPUT_DIR / f"{tag}-{n}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"generating {n} CT instances into {target}")
    write_ct(tmp, n)
    tmp.rename(target)
    return sorted(target.glob("*.dcm"))


def write_ct(directory: Path, n: int, study_uid: str | None = None) -> list[Path]:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng()
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    base = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
    paths = []
    for i in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = series_uid
        ds.Modality = "CT"
        ds.PatientID = "BENCH0001"
        ds.PatientName = "Bench^Routing"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "BENCHACC1"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.7, 0.7]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 512
        ds.Columns = 512
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        # Random-ish: one random base image, rolled and salted per slice.
        pixels = np.roll(base, i * 7, axis=0) ^ np.uint16(i & 0x0FFF)
        ds.PixelData = pixels.tobytes()
        path = directory / f"{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True, little_endian=True, implicit_vr=False)
        paths.append(path)
    return paths


# --- Peers and processes ---------------------------------------------------------------------


class Orthanc:
    """Orthanc 1.10 on free ports of 127.0.0.1, no plugin, fresh storage."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        config = orthanc_config("bench-pacs", ORTHANC_AE, self.dicom_port, self.http_port,
                                self.directory)
        (self.directory / "orthanc.json").write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.log = open(self.directory / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.directory / "orthanc.json")],
            cwd=self.directory,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("Orthanc exited at start; see " + str(self.directory))
            try:
                self.count()
                return self
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def count(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(json.loads(r.read())["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


class Worker:
    """``celery -A gateway worker`` as a subprocess group; ready once it logs "ready."."""

    def __init__(self, env: dict[str, str], log_path: Path, beat_schedule: Path | None = None):
        self.env = env
        self.log_path = log_path
        self.beat_schedule = beat_schedule
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Worker:
        argv = [PYTHON, "-m", "celery", "-A", "gateway", "worker", "--concurrency", "2"]
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        # INFO only so that "ready." shows: the bench must not start the clock before it.
        argv += ["--loglevel", "INFO", "--hostname", f"bench{os.getpid()}@%h"]
        if self.beat_schedule is not None:
            argv += ["--beat", "--schedule", str(self.beat_schedule)]
        log(f"starting worker: {' '.join(argv[2:])}")
        self._out = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while " ready." not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker did not become ready:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.proc = None
        if getattr(self, "_out", None):
            self._out.close()


def dcmsend(port: int, paths: list[Path] | Path, called_ae: str, timeout: float) -> float:
    """Send with dcmsend (one association); return seconds from start to exit."""
    targets = [paths] if isinstance(paths, Path) else paths
    argv = ["dcmsend", "--decompress-never", "-aec", called_ae, "-aet", "BENCHSCU", "+sd"]
    argv += ["127.0.0.1", str(port), *map(str, targets)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.monotonic()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"dcmsend exited with {res.returncode}: {res.stderr[-1500:]}")
    return elapsed


class CountPoller:
    """Polls Orthanc's instance count in a thread; wall times when it first reached each goal."""

    def __init__(self, orthanc: Orthanc, goal: int, interval: float = 0.01):
        self.orthanc = orthanc
        self.goal = goal
        self.interval = interval
        self.first_wall: float | None = None
        self.first_mono: float | None = None
        self.all_mono: float | None = None
        self.all_wall: float | None = None
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.orthanc.count()
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(self.interval)
                continue
            wall, mono = time.time(), time.monotonic()
            self.last = n
            if n >= 1 and self.first_wall is None:
                self.first_wall, self.first_mono = wall, mono
            if n >= self.goal:
                self.all_mono, self.all_wall = mono, wall
                return
            time.sleep(self.interval if self.first_wall is None else max(self.interval, 0.05))

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout=timeout)
        return self.all_mono is not None


# --- Database helpers ------------------------------------------------------------------------


def truncate_routing_tables() -> None:
    from django.db import connection

    from routing.models import (
        Delivery,
        DicomAssociation,
        Node,
        ReceivedInstance,
        ReceivedStudy,
        Rule,
    )

    tables = [
        m._meta.db_table
        for m in (Delivery, ReceivedInstance, ReceivedStudy, DicomAssociation, Rule, Node)
    ]
    tables.append(Rule.destinations.through._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


def received_at_wall(sop_uid: str) -> float | None:
    from routing.models import ReceivedInstance

    row = ReceivedInstance.objects.filter(sop_instance_uid=sop_uid).first()
    return row.received_at.timestamp() if row else None


def first_received() -> tuple[str, float] | None:
    from routing.models import ReceivedInstance

    row = ReceivedInstance.objects.order_by("received_at", "id").first()
    return (row.sop_instance_uid, row.received_at.timestamp()) if row else None


def import_config(env: dict[str, str], orthanc: Orthanc, directory: Path) -> None:
    doc = {
        "nodes": [
            {
                "name": "orthanc",
                "ae_title": ORTHANC_AE,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "enabled": True,
                "max_associations": 2,
            }
        ],
        "rules": [
            {
                "name": "everything to orthanc",
                "order": 10,
                "enabled": True,
                "match": "all",
                "conditions": [],
                "destinations": ["orthanc"],
                "mode": "instance",
            }
        ],
    }
    path = directory / "routing-config.json"
    path.write_text(json.dumps(doc))
    subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "import_config", str(path)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


# --- Measurements ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def named_cpu_seconds(name: str) -> float:
    """CPU time so far of every process whose command is ``name`` (PostgreSQL's backends,
    which serve the gateway's connections, are separate processes of the server)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] == name:
            fields = text.rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time every core of the machine has spent busy so far (not idle, not waiting)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file())


def bench_ingest(report: Report, db_url: str, files: list[Path], ct_dir: Path, run: Path):
    n = len(files)
    mb = sum(p.stat().st_size for p in files) / 1e6
    timeout = max(120.0, n * 0.5)

    # Peer: DCMTK storescp writing files (no fsync).
    out = run / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    scp = subprocess.Popen(
        ["storescp", "-aet", GATEWAY_AE, "-od", str(out), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        from _common import wait_for_port

        wait_for_port(port, scp)
        peer_s = dcmsend(port, ct_dir, GATEWAY_AE, timeout)
        stored = count_files(out)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    if stored != n:
        report.notes.append(f"storescp wrote {stored} of {n} files")
    shutil.rmtree(out, ignore_errors=True)

    # Gateway, no rule: every instance fsynced and recorded before Success.
    truncate_routing_tables()
    data = run / "gw-ingest"
    port = free_port()
    env = gateway_env(db_url, GATEWAY_DATA_DIR=str(data), GATEWAY_MIN_FREE_MB="0")
    gw = manage_service(
        "dicomserver", ["dicomserver", "--host", "127.0.0.1", "--port", str(port)], env, port
    )
    with gw:
        cpu0 = cpu_seconds(gw.pid)
        gw_s = dcmsend(port, ct_dir, GATEWAY_AE, timeout)
        cpu_s = cpu_seconds(gw.pid) - cpu0
        rss = gw.peak_rss_mb()
    from routing.models import ReceivedInstance

    recorded = ReceivedInstance.objects.count()
    if recorded != n:
        report.notes.append(f"gateway recorded {recorded} of {n} instances")
    section = f"Ingest: dcmsend -> gateway, no rule ({n} instances, {mb:.0f} MB)"
    report.add(section, "images/s", n / gw_s, "img/s", ">= 150", n / peer_s, "storescp")
    report.add(section, "MB/s", mb / gw_s, "MB/s", ">= 75", mb / peer_s, "storescp")
    report.add(section, "wall time per instance", gw_s / n * 1000, "ms", note="150/s = 6.7 ms")
    report.add(
        section,
        "dicomserver CPU per instance",
        cpu_s / n * 1000,
        "ms",
        note=f"{100 * cpu_s / gw_s:.0f}% of one CPU while sending",
    )
    report.add(section, "recorded instances", recorded, "", note=f"of {n}")
    report.add(section, "dicomserver peak RSS", rss, "MiB")
    report.data["ingest"] = {
        "n": n,
        "mb": mb,
        "gateway_s": gw_s,
        "storescp_s": peer_s,
        "recorded": recorded,
        "dicomserver_cpu_s": cpu_s,
        "storescp_files": stored,
        "dicomserver_peak_rss_mib": rss,
    }
    shutil.rmtree(data, ignore_errors=True)


def single_latencies(gw_port: int, orthanc: Orthanc, run: Path, label: str) -> list[float]:
    """Send SINGLE_SENDS fresh instances one by one; seconds from the gateway's received_at to
    Orthanc holding each one."""
    from pydicom.uid import generate_uid

    directory = run / f"single-{label}"
    directory.mkdir(parents=True)
    paths = write_ct(directory, SINGLE_SENDS, generate_uid())
    out = []
    for path in paths:
        before = orthanc.count()
        with CountPoller(orthanc, before + 1, interval=0.005) as poller:
            dcmsend(gw_port, path, GATEWAY_AE, 60)
            if not poller.wait(30):
                raise RuntimeError(f"{label}: Orthanc did not receive a single instance in 30 s")
        from pydicom import dcmread

        sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        out.append(poller.all_wall - received_at_wall(sop))
        time.sleep(0.2)
    shutil.rmtree(directory, ignore_errors=True)
    return out


def bench_end_to_end(
    report: Report, db_url: str, files: list[Path], ct_dir: Path, run: Path, embedded: bool
):
    n = len(files)
    timeout = max(180.0, n * 1.0)
    section = f"End to end: dcmsend -> gateway -> worker -> Orthanc ({n} instances)"

    # Peer: dcmsend -> Orthanc directly.
    orthanc = Orthanc(run / "orthanc-direct").start()
    try:
        with CountPoller(orthanc, n) as poller:
            t0 = time.monotonic()
            cpu0 = cpu_seconds(orthanc.proc.pid)
            machine0 = machine_cpu_seconds()
            dcmsend(orthanc.dicom_port, ct_dir, ORTHANC_AE, timeout)
            if not poller.wait(timeout):
                raise RuntimeError(f"Orthanc holds {poller.last} of {n} after {timeout:.0f} s")
            direct_cpu = cpu_seconds(orthanc.proc.pid) - cpu0
            direct_machine = machine_cpu_seconds() - machine0
        direct_s = poller.all_mono - t0
    finally:
        orthanc.stop()
        shutil.rmtree(run / "orthanc-direct", ignore_errors=True)

    # Gateway with Redis and a Celery worker.
    truncate_routing_tables()
    flush_redis()
    orthanc = Orthanc(run / "orthanc-gw").start()
    data = run / "gw-e2e"
    data.mkdir(parents=True)
    env = gateway_env(
        db_url, GATEWAY_DATA_DIR=str(data), GATEWAY_MIN_FREE_MB="0", REDIS_URL=REDIS_URL
    )
    worker = Worker(env, run / "worker-e2e.log")
    port = free_port()
    gw = manage_service(
        "dicomserver", ["dicomserver", "--host", "127.0.0.1", "--port", str(port)], env, port
    )
    try:
        import_config(env, orthanc, run)
        gw.start()
        worker.start()
        parts = {"dicomserver": lambda: cpu_seconds(gw.pid),
                 "worker": lambda: tree_cpu_seconds(worker.proc.pid),
                 "Orthanc": lambda: cpu_seconds(orthanc.proc.pid),
                 "PostgreSQL": lambda: named_cpu_seconds("postgres"),
                 "Redis": lambda: named_cpu_seconds("redis-server"),
                 "machine (all processes)": machine_cpu_seconds}
        with CountPoller(orthanc, n, interval=0.005) as poller:
            t0 = time.monotonic()
            cpu0 = {name: read() for name, read in parts.items()}
            send_s = dcmsend(port, ct_dir, GATEWAY_AE, timeout)
            if not poller.wait(timeout):
                raise RuntimeError(f"Orthanc holds {poller.last} of {n} after {timeout:.0f} s")
            cpu = {name: read() - cpu0[name] for name, read in parts.items()}
        total_s = poller.all_mono - t0
        first = first_received()
        bulk_first_latency = poller.first_wall - first[1] if first else None
        singles = single_latencies(port, orthanc, run, "redis")
        rss_gw = gw.peak_rss_mb()
    finally:
        worker.stop()
        gw.stop()
        orthanc.stop()
    from routing.models import Delivery

    delivered = Delivery.objects.filter(status="DELIVERED").count()
    report.add(
        section,
        "throughput (first send -> Orthanc holds all)",
        n / total_s,
        "img/s",
        f">= {0.5 * n / direct_s:.1f}",
        n / direct_s,
        "dcmsend->Orthanc",
        note="target = 0.5x direct",
    )
    report.add(section, "ratio to direct", direct_s / total_s, "x", ">= 0.5")
    report.add(section, "gateway ingest part (dcmsend exit)", n / send_s, "img/s")
    for name, seconds in cpu.items():
        direct = {"Orthanc": direct_cpu, "machine (all processes)": direct_machine}.get(name)
        report.add(section, f"{name} CPU per instance", seconds / n * 1000, "ms",
                   peer=direct / n * 1000 if direct is not None else None,
                   peer_name=f"{name.split()[0]}, direct" if direct is not None else "",
                   note=f"{100 * seconds / total_s:.0f}% of one CPU until Orthanc holds all")
    report.add(
        section,
        "first instance: Orthanc - received_at (bulk)",
        bulk_first_latency,
        "s",
        "<= 1",
        note="Redis broker, while the rest of the study streams in",
    )
    report.add(
        section,
        f"single instance: Orthanc - received_at p50 (n={len(singles)})",
        percentile(singles, 50),
        "s",
        "<= 1",
        note=f"max {max(singles):.3f} s, Redis broker",
    )
    report.data["end_to_end"] = {
        "n": n,
        "direct_s": direct_s,
        "gateway_total_s": total_s,
        "gateway_dcmsend_s": send_s,
        "cpu_s": cpu,
        "orthanc_direct_cpu_s": direct_cpu,
        "machine_direct_cpu_s": direct_machine,
        "bulk_first_latency_s": bulk_first_latency,
        "single_latencies_redis_s": singles,
        "delivered_rows": delivered,
        "dicomserver_peak_rss_mib": rss_gw,
    }
    shutil.rmtree(run / "orthanc-gw", ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)

    if not embedded:
        return
    # Embedded mode: filesystem broker, GATEWAY_DATA_DIR shared by dicomserver and worker.
    orthanc = Orthanc(run / "orthanc-emb").start()
    data = run / "gw-embedded"
    data.mkdir(parents=True)
    env = gateway_env(db_url, GATEWAY_DATA_DIR=str(data), GATEWAY_MIN_FREE_MB="0")
    worker = Worker(env, run / "worker-embedded.log")
    port = free_port()
    gw = manage_service(
        "dicomserver", ["dicomserver", "--host", "127.0.0.1", "--port", str(port)], env, port
    )
    try:
        truncate_routing_tables()
        import_config(env, orthanc, run)
        gw.start()
        worker.start()
        singles_emb = single_latencies(port, orthanc, run, "embedded")
    finally:
        worker.stop()
        gw.stop()
        orthanc.stop()
    report.add(
        section,
        f"single instance, embedded broker p50 (n={len(singles_emb)})",
        percentile(singles_emb, 50),
        "s",
        "<= 1",
        note=f"max {max(singles_emb):.3f} s, filesystem broker",
    )
    report.data["end_to_end"]["single_latencies_embedded_s"] = singles_emb
    shutil.rmtree(run / "orthanc-emb", ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


def bench_drain(report: Report, db_url: str, count: int, run: Path):
    from django.db import transaction
    from django.utils import timezone
    from pydicom import dcmread

    from routing.models import Delivery, Node, ReceivedInstance, ReceivedStudy
    from routing.tasks import deliver_node

    files = ensure_ct(count, "ct-drain")
    links = run / "drain-files"
    links.mkdir(parents=True)
    truncate_routing_tables()
    flush_redis()
    orthanc = Orthanc(run / "orthanc-drain").start()
    head = dcmread(files[0], stop_before_pixels=True)
    now = timezone.now()
    with transaction.atomic():
        node = Node.objects.create(
            name="orthanc", ae_title=ORTHANC_AE, host="127.0.0.1", port=orthanc.dicom_port
        )
        study = ReceivedStudy.objects.create(
            study_instance_uid=head.StudyInstanceUID,
            patient_id=head.PatientID,
            last_received_at=now,
        )
        instances = []
        for i, path in enumerate(files):
            link = links / path.name
            os.link(path, link)
            # Each file of the set has its own SOP Instance UID; read it from the header.
            sop = dcmread(link, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            instances.append(
                ReceivedInstance(
                    study=study,
                    sop_instance_uid=sop.SOPInstanceUID,
                    sop_class_uid=head.SOPClassUID,
                    series_instance_uid=head.SeriesInstanceUID,
                    transfer_syntax_uid=head.file_meta.TransferSyntaxUID,
                    header={"Modality": "CT", "PatientID": head.PatientID},
                    calling_ae="BENCHSCU",
                    size=link.stat().st_size,
                    path=str(link),
                    received_at=now,
                    routing_status="ROUTED",
                    routed_at=now,
                )
            )
            if i and i % 500 == 0:
                log(f"drain rows: {i}")
        ReceivedInstance.objects.bulk_create(instances, batch_size=1000)
        Delivery.objects.bulk_create(
            [
                Delivery(
                    instance=inst,
                    node=node,
                    rule_name="bench drain",
                    coerce=[],
                    instance_version=1,
                    next_attempt_at=now,
                )
                for inst in instances
            ],
            batch_size=1000,
        )
    data = run / "gw-drain"
    data.mkdir(parents=True)
    env = gateway_env(
        db_url,
        GATEWAY_DATA_DIR=str(data),
        REDIS_URL=REDIS_URL,
        DELIVERY_SWEEP_SECONDS="5",
    )
    worker = Worker(env, run / "worker-drain.log", beat_schedule=data / "beat-schedule")
    timeout = max(180.0, count * 0.5)
    try:
        worker.start()
        with CountPoller(orthanc, count, interval=0.05) as poller:
            t0 = time.monotonic()
            deliver_node.delay(node.pk)
            deliver_node.delay(node.pk)
            if not poller.wait(timeout):
                raise RuntimeError(f"drain: Orthanc holds {poller.last} of {count}")
        drain_s = poller.all_mono - t0
    finally:
        worker.stop()
        orthanc.stop()
    section = f"Drain: {count} pending deliveries, node back up"
    report.add(section, "instances/s", count / drain_s, "img/s", note="2 associations (default)")
    report.data["drain"] = {"count": count, "seconds": drain_s}
    shutil.rmtree(run / "orthanc-drain", ignore_errors=True)
    shutil.rmtree(links, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


# --- Main ------------------------------------------------------------------------------------


def _guarded(report: Report, name: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # a failed part is reported, the others still run
        log(f"{name} failed: {exc!r}")
        report.notes.append(f"{name} failed: {exc}"[:600])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 instances instead of 1,000")
    parser.add_argument("--db", default="gateway_bench_routing")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("-n", "--instances", type=int, help="instances per run")
    parser.add_argument("--drain", type=int, help="pending deliveries to drain (0: skip)")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded figure")
    args = parser.parse_args()

    n = args.instances or (100 if args.quick else 1000)
    drain = args.drain if args.drain is not None else (200 if args.quick else 2000)
    report = Report(f"Routing benchmark ({'quick' if args.quick else 'full'} sizes, N={n})")
    report.data.update(n=n, drain=drain, cpus=os.cpu_count())
    db_url = bench_database_url(args.db)
    run = OUTPUT_DIR / f"routing-run-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    started = time.monotonic()
    recreate_database(db_url)
    os.environ["REDIS_URL"] = REDIS_URL  # this process enqueues the drain tasks
    setup_django(db_url)
    flush_redis()
    try:
        files = ensure_ct(n)
        ct_dir = files[0].parent
        _guarded(report, "ingest", bench_ingest, report, db_url, files, ct_dir, run)
        _guarded(
            report,
            "end to end",
            bench_end_to_end,
            report,
            db_url,
            files,
            ct_dir,
            run,
            not args.no_embedded,
        )
        if drain:
            _guarded(report, "drain", bench_drain, report, db_url, drain, run)
    finally:
        report.notes.append(
            f"run took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs (senders, "
            "gateway, worker, Orthanc and PostgreSQL share them); storescp does not fsync"
        )
        report.notes.append(f"finished {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        report.print()
        path = report.write_json("routing")
        print(f"figures written to {path}")
        try:
            flush_redis()
        except Exception:
            pass
        shutil.rmtree(run, ignore_errors=True)
        if not args.keep_db:
            from django.db import connections

            connections.close_all()
            drop_database(db_url)


if __name__ == "__main__":
    sys.exit(main())

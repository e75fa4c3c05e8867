"""Fixtures for delivery tests: Orthanc as the destination PACS, Celery workers, a Redis of our own.

- ``start_orthanc(**config)`` starts Orthanc (the Debian package) on free ports on 127.0.0.1 with
  no plugin, a Lua script that logs every instance it stores, and the REST API for checking what
  arrived. ``OverwriteInstances`` is on so that a second reception of an instance shows in the log.
- ``pacs_redis`` is a redis-server of the tests' own (never the shared one), ``celery_broker``
  points this process's Celery app at it, and ``start_worker(**env)`` runs a real
  ``celery -A gateway worker --beat`` against it and the test database.
- ``make_node``, ``make_instance`` and ``make_delivery`` create rows directly: each instance is a
  copy of a pydicom test file with a fresh SOP Instance UID, written under a tmp directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.utils import timezone
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.servers import free_port, orthanc_config, process_env

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = "/usr/sbin/Orthanc"
PACS_AE = "PACS1"
UNCOMPRESSED_ONLY = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]

RECEIVED_LOG_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   local f = io.open(os.getenv("ORTHANC_RECEIVED_LOG"), "a")
   f:write(tags["SOPInstanceUID"] .. "\\n")
   f:close()
end
"""


def wait_until(
    predicate: Callable[[], object], timeout: float = 60, what: str = "", interval: float = 0.1
) -> object:
    """Poll until ``predicate()`` is truthy and return it; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


# --- Orthanc -------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """An Orthanc process: its AE title, DICOM and HTTP ports, and REST helpers."""

    directory: Path
    config: dict
    ae_title: str = PACS_AE
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "orthanc.log"

    @property
    def received_log(self) -> Path:
        return self.directory / "received.log"

    def start(self) -> Orthanc:
        config = orthanc_config(
            "test-pacs", self.ae_title, self.dicom_port, self.http_port, self.directory,
            LuaScripts=[str(self.directory / "received.lua")], ConcurrentJobs=1,
            **self.config,
        )
        (self.directory / "received.lua").write_text(RECEIVED_LOG_LUA)
        (self.directory / "orthanc.json").write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1", "ORTHANC_RECEIVED_LOG": str(self.received_log)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.directory / "orthanc.json")],
                cwd=self.directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.get("/system")
                break
            except (OSError, urllib.error.URLError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"Orthanc did not start:\n{self.log.read_text()[-3000:]}"
                    ) from exc
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Stop at once (SIGKILL): a PACS going down; a clean stop takes Orthanc seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def instances(self) -> dict[str, str]:
        """``{SOP Instance UID: Orthanc id}`` of everything Orthanc holds."""
        found = {}
        for orthanc_id in self.get_json("/instances"):
            tags = self.get_json(f"/instances/{orthanc_id}/simplified-tags")
            found[tags["SOPInstanceUID"]] = orthanc_id
        return found

    def file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def transfer_syntax(self, orthanc_id: str) -> str:
        return self.get(f"/instances/{orthanc_id}/metadata/TransferSyntax").decode()

    def tags(self, orthanc_id: str) -> dict:
        return self.get_json(f"/instances/{orthanc_id}/simplified-tags")

    def receptions(self) -> list[str]:
        """SOP Instance UIDs in the order Orthanc stored them, one line per reception."""
        if not self.received_log.exists():
            return []
        return self.received_log.read_text().split()


@pytest.fixture
def start_orthanc(tmp_path_factory) -> Iterator[Callable[..., Orthanc]]:
    """``start_orthanc(AcceptedTransferSyntaxes=[...], start=True)``: an Orthanc of the test's
    own; ``start=False`` only reserves its ports (a PACS that is down until ``.start()``)."""
    started: list[Orthanc] = []

    def start(start: bool = True, ae_title: str = PACS_AE, **config) -> Orthanc:
        orthanc = Orthanc(
            tmp_path_factory.mktemp("orthanc"), config, ae_title, free_port(), free_port()
        )
        started.append(orthanc)
        return orthanc.start() if start else orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


@pytest.fixture
def orthanc(start_orthanc) -> Orthanc:
    return start_orthanc()


# --- Redis and Celery ----------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free port of 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self.ping, 20, f"redis on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: everything it held is gone."""
        self.stop()
        self.start()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def queued(self, queue: str = "celery") -> int:
        return int(self.client().llen(queue))


@pytest.fixture(scope="session")
def pacs_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _point_celery_at(url: str, transport_options: dict) -> None:
    from kombu import pools

    from gateway.celery import app

    app.conf.broker_url = url
    app.conf.broker_transport_options = transport_options
    # The connection and producer pools keep connections to the broker they were made for.
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def celery_broker(pacs_redis) -> Iterator[RedisServer]:
    """Tasks this process enqueues go to the tests' own Redis, emptied first."""
    from gateway.celery import app

    if not pacs_redis.ping():
        pacs_redis.start()
    pacs_redis.client().flushall()
    before = (app.conf.broker_url, dict(app.conf.broker_transport_options or {}))
    _point_celery_at(pacs_redis.url, {})
    yield pacs_redis
    _point_celery_at(*before)


# Short retry and sweep times for the workers the tests start.
WORKER_ENV = {
    "DELIVERY_RETRY_BASE_SECONDS": "1",
    "DELIVERY_RETRY_MAX_SECONDS": "2",
    "DELIVERY_SWEEP_SECONDS": "1",
    "DELIVERY_LEASE_SECONDS": "10",
    "DICOM_AE_TITLE": "GATEWAY",
    "LOG_LEVEL": "INFO",
}


@dataclass
class Worker:
    """A ``celery worker --beat`` process group."""

    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group (main process, pool children, beat), as a crash would. Also
        how a test ends it: nothing the worker does then matters any more."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def start_worker(transactional_db, celery_broker, tmp_path) -> Iterator[Callable[..., Worker]]:
    """``start_worker(concurrency=2, **env)``: a real Celery worker with embedded beat, sharing
    the test database (rows must be committed: transactional_db) and the tests' Redis."""
    from django.db import connection

    assert connection.vendor == "postgresql", "worker tests need DATABASE_URL=postgres://..."
    workers: list[Worker] = []

    def start(concurrency: int = 2, **env: str) -> Worker:
        n = len(workers) + 1
        data_dir = tmp_path / f"worker{n}"
        data_dir.mkdir()
        environment = process_env(
            connection.settings_dict["NAME"],
            REDIS_URL=celery_broker.url,
            GATEWAY_DATA_DIR=str(data_dir),
            **{**WORKER_ENV, **env},
        )
        log = tmp_path / f"worker{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "gateway",
                    "worker",
                    "--beat",
                    "--schedule",
                    str(data_dir / "beat-schedule"),
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(concurrency),
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "INFO",
                    "--hostname",
                    f"test{n}@%h",
                ],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, log)
        workers.append(worker)
        wait_until(
            lambda: " ready." in worker.output() or proc.poll() is not None,
            60,
            "the Celery worker to be ready",
        )
        assert proc.poll() is None, f"worker exited:\n{worker.output()[-3000:]}"
        return worker

    yield start
    for worker in workers:
        worker.kill()


# --- Rows ----------------------------------------------------------------------------------


def make_node(orthanc: Orthanc | None = None, **fields):
    """A node for ``orthanc`` (or for whatever ``fields`` say)."""
    from routing.models import Node

    values = {
        "name": "PACS1",
        "ae_title": PACS_AE,
        "host": "127.0.0.1",
        "port": 1,
        "max_associations": 2,
    }
    if orthanc is not None:
        values.update(ae_title=orthanc.ae_title, port=orthanc.dicom_port)
    values.update(fields)
    return Node.objects.create(**values)


def write_copy(directory: Path, source: str = "CT_small.dcm", **attributes) -> Path:
    """A copy of pydicom's test file ``source`` with a fresh SOP Instance UID (and any
    ``attributes`` set), written in its own transfer syntax."""
    ds = dcmread(get_testdata_file(source))
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_instance(directory: Path, source: str = "CT_small.dcm", study=None, **attributes):
    """A ReceivedInstance (and its study) for a fresh copy of ``source`` under ``directory``."""
    from routing.models import ReceivedInstance, ReceivedStudy

    now = timezone.now()
    if study is None:
        study = ReceivedStudy.objects.create(
            study_instance_uid=generate_uid(),
            patient_id="PID1",
            last_received_at=now,
        )
    attributes.setdefault("StudyInstanceUID", study.study_instance_uid)
    path = write_copy(directory, source, **attributes)
    ds = dcmread(path, stop_before_pixels=True)
    return ReceivedInstance.objects.create(
        study=study,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.get("SeriesInstanceUID", generate_uid()),
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        header={"Modality": ds.get("Modality", ""), "PatientID": ds.get("PatientID", "")},
        calling_ae="MODALITY1",
        size=path.stat().st_size,
        path=str(path),
        received_at=now,
    )


def make_delivery(instance, node, **fields):
    """A PENDING delivery due now, as the rules stage writes it."""
    from routing.models import Delivery

    values = {
        "instance": instance,
        "node": node,
        "rule_name": "test rule",
        "coerce": [],
        "instance_version": instance.version,
        "next_attempt_at": timezone.now(),
    }
    values.update(fields)
    return Delivery.objects.create(**values)

"""Start the gateway's own long-lived commands as real processes for end-to-end tests, and talk
to them with real peers (DCMTK)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r" on (\S+):(\d+)")


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gateway_command(args: list[str], env: dict[str, str], timeout: float = 60) -> Iterator[int]:
    """Run ``manage.py <args>`` until the block ends; yield the port it reports listening on.
    Stops it with SIGTERM, as a supervisor would."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        # A thread reads every line, so nothing waits in a buffer that select() cannot see
        # and the process never blocks on a full pipe.
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"{args[0]} did not start:\n{''.join(output)}")
            output.append(line)
            if match := LISTENING.search(line):
                port = int(match.group(2))
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def orthanc_config(name: str, ae_title: str, dicom_port: int, http_port: int,
                   directory: Path, **extra) -> dict:
    """The configuration of an Orthanc acting as a destination PACS for tests and benchmarks:
    its own storage under ``directory``, no plugin, no authentication, stores anything sent
    to its AE title (a second copy overwrites the first); ``extra`` adds or overrides keys."""
    return {
        "Name": name,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "storage"),
        # Orthanc 1.10 has no option to bind to one address: the HTTP API refuses other
        # hosts, and the tests only connect to 127.0.0.1.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "OverwriteInstances": True,
        "Plugins": [],
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 4,
        **extra,
    }


def process_env(database_name: str, **extra: str) -> dict[str, str]:
    """The environment of a gateway process that shares the test database."""
    env = dict(os.environ)
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    env["DATABASE_URL"] = url.rsplit("/", 1)[0] + "/" + database_name
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def findscu_worklist(port: int, keys: list[str], called_ae: str = "GATEWAY",
                     calling_ae: str = "FINDSCU", extra_args: list[str] | None = None,
                     ) -> list[Dataset]:
    """Query the worklist with DCMTK's findscu -W and return the identifiers it received."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["findscu", "-W", "-X", "-od", out, "-aet", calling_ae, "-aec", called_ae]
        for key in keys:
            argv += ["-k", key]
        argv += [*(extra_args or []), "127.0.0.1", str(port)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "TCP_NODELAY": "1"})
        assert done.returncode == 0, f"findscu failed: {done.stdout}{done.stderr}"
        return [dcmread(path) for path in sorted(Path(out).glob("rsp*.dcm"))]

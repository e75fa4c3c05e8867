"""``manage.py dicomserver``: the AE as its own process, as a supervisor runs it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MANAGE = Path(__file__).resolve().parents[2] / "manage.py"


def start_dicomserver(*args: str) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen(
        [sys.executable, str(MANAGE), "dicomserver", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    seen = []

    def read_first_lines():
        for line in proc.stdout:
            lines.put(line)
            if line.startswith("DICOM AE "):
                return

    threading.Thread(target=read_first_lines, daemon=True).start()
    deadline = time.monotonic() + 30
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        seen.append(line)
        if match := re.search(r"^DICOM AE (\S+) listening on 127\.0\.0\.1:(\d+)$", line):
            return proc, int(match.group(2)), match.group(1)
    proc.kill()
    raise AssertionError("dicomserver did not report its port:\n" + "".join(seen))


def echo(port: int, called_ae: str) -> int:
    return subprocess.run(
        ["echoscu", "-aec", called_ae, "127.0.0.1", str(port)], capture_output=True, timeout=30
    ).returncode


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_it_listens_on_the_port_it_prints_and_stops_cleanly_on_a_signal(stop_signal):
    proc, port, ae_title = start_dicomserver("--ae-title", "WORKLIST")
    try:
        assert port > 0
        assert ae_title == "WORKLIST"
        assert echo(port, "WORKLIST") == 0
    finally:
        proc.send_signal(stop_signal)
        output, _ = proc.communicate(timeout=30)

    assert proc.returncode == 0, output
    assert "DICOM AE stopped" in output
    assert echo(port, "WORKLIST") != 0


def test_it_refuses_an_ae_title_longer_than_sixteen_characters():
    done = subprocess.run(
        [sys.executable, str(MANAGE), "dicomserver", "--port", "0", "--ae-title", "X" * 17],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0
    assert "ae-title" in done.stderr

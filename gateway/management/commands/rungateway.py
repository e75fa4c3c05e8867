"""Everything in one foreground process group: web UI, HL7 listener, DICOM AE, Celery worker
and beat. Each part is its own command for production (one process per container); this
command only starts them, watches them, and stops them all on SIGTERM / Ctrl-C or when one
of them dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand


def gateway_processes(http_host: str) -> dict[str, list[str]]:
    """The command line of each part, by name."""
    py = sys.executable
    manage = str(settings.BASE_DIR / "manage.py")
    return {
        "web": [
            py, "-m", "gunicorn", "gateway.wsgi:application",
            "--bind", f"{http_host}:{settings.HTTP_PORT}",
            "--workers", os.environ.get("WEB_CONCURRENCY", "2"),
            "--config", "python:gateway.gunicorn_config",
        ],
        "hl7listener": [py, manage, "hl7listener"],
        "dicomserver": [py, manage, "dicomserver"],
        "celery": [
            py, "-m", "celery", "-A", "gateway", "worker", "--beat",
            "--loglevel", settings.LOG_LEVEL,
            "--concurrency", os.environ.get("CELERY_CONCURRENCY", "2"),
            "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
        ],
    }


class Command(BaseCommand):
    help = "Run the web UI, HL7 listener, DICOM AE, Celery worker and beat together."

    def add_arguments(self, parser):
        parser.add_argument("--http-host", default=os.environ.get("HTTP_HOST", "0.0.0.0"))
        parser.add_argument(
            "--only", nargs="*", default=None, help="start only these parts (for debugging)"
        )

    def handle(self, *args, http_host: str, only: list[str] | None, **options):
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

        children: dict[str, subprocess.Popen] = {}
        for name, argv in gateway_processes(http_host).items():
            if only and name not in only:
                continue
            # Children ignore Ctrl-C from the terminal: this command stops them in order.
            children[name] = subprocess.Popen(argv, preexec_fn=_ignore_sigint)
            self.stdout.write(f"started {name} (pid {children[name].pid})")
        self.stdout.write(
            f"gateway up: web :{settings.HTTP_PORT}, HL7 :{settings.HL7_PORT}, "
            f"DICOM {settings.DICOM_AE_TITLE}@:{settings.DICOM_PORT}"
        )
        exit_code = 0
        try:
            while not stopping:
                for name, child in children.items():
                    if child.poll() is not None:
                        self.stderr.write(f"{name} exited with {child.returncode}; stopping all")
                        exit_code = 1
                        stopping = True
                        break
                time.sleep(0.2)
        finally:
            _stop_all(children)
        if exit_code:
            sys.exit(exit_code)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_all(children: dict[str, subprocess.Popen], grace: float = 20.0) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

"""The gateway's DICOM AE: Verification, Modality Worklist C-FIND and Storage SCP, until SIGTERM or
Ctrl-C."""

from __future__ import annotations

import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gateway.dicom import start_server, stop_server


class Command(BaseCommand):
    help = "Run the DICOM AE (C-ECHO, Modality Worklist C-FIND, C-STORE) in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.DICOM_HOST)
        parser.add_argument(
            "--port", type=int, default=settings.DICOM_PORT, help="0 picks a free port"
        )
        parser.add_argument("--ae-title", default=settings.DICOM_AE_TITLE)

    def handle(self, *args, host: str, port: int, ae_title: str, **options):
        if not ae_title.strip() or len(ae_title) > 16 or "\\" in ae_title or not ae_title.isascii():
            raise CommandError("--ae-title must be 1-16 ASCII characters without backslash")
        if not 0 <= port <= 65535:
            raise CommandError("--port must be 0-65535")
        stop = threading.Event()

        def request_stop(signum, frame):
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

        try:
            server = start_server(host, port, ae_title)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
        bound_host, bound_port = server.server_address[:2]
        self.stdout.write(f"DICOM AE {ae_title} listening on {bound_host}:{bound_port}")
        self.stdout.flush()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            stop_server(server)
            self.stdout.write("DICOM AE stopped")

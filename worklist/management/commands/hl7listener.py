"""The HL7 v2 listener: MLLP on HL7_HOST:HL7_PORT, orders and patient updates from the RIS.

With ``--workers N`` (HL7_WORKERS) it forks N processes that each bind the port with
SO_REUSEPORT, so that the kernel spreads connections over the CPU cores. SIGTERM (or Ctrl-C)
stops accepting, lets messages in progress be answered, and exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from worklist.hl7.service import handle_messages, handle_oversize
from worklist.mllp import MLLPServer, bind_socket


class Command(BaseCommand):
    help = "Receive HL7 v2 messages over MLLP and apply them to the worklist."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.HL7_HOST)
        parser.add_argument("--port", type=int, default=settings.HL7_PORT,
                            help="0 picks a free port (printed at start)")
        parser.add_argument("--workers", type=int, default=settings.HL7_WORKERS,
                            help="processes sharing the port (SO_REUSEPORT)")
        parser.add_argument("--threads", type=int, default=settings.HL7_THREADS,
                            help="database threads per process: batches handled at once")

    def handle(self, *args, host: str, port: int, workers: int, threads: int, **options):
        if workers < 1 or threads < 1:
            raise CommandError("--workers and --threads must be at least 1")
        if workers == 1:
            sock = bind_socket(host, port)
            self._announce(host, sock.getsockname()[1], workers)
            _run_worker(sock, threads)
            return
        # Hold the port (and learn it when 0 was asked for) while the workers bind it too;
        # not listening, so the kernel gives it no connections.
        reserved = bind_socket(host, port, reuse_port=True, listen=False)
        port = reserved.getsockname()[1]
        children: list[int] = []
        # Forward SIGTERM/SIGINT from the first moment there are workers to stop.
        _forward_signals(children)
        ready_read, ready_write = os.pipe()
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    os.close(ready_read)
                    sock = bind_socket(host, port, reuse_port=True)
                    os.write(ready_write, b"1")
                    os.close(ready_write)
                    _run_worker(sock, threads)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            children.append(pid)
        os.close(ready_write)
        started = 0
        while started < workers:
            chunk = os.read(ready_read, workers)
            if not chunk:
                break
            started += len(chunk)
        os.close(ready_read)
        if started < workers:
            _supervise(children)
            raise CommandError("a worker could not bind the port")
        self._announce(host, port, workers)
        _supervise(children)
        reserved.close()

    def _announce(self, host: str, port: int, workers: int) -> None:
        self.stdout.write(f"HL7 listener on {host}:{port} ({workers} worker"
                          f"{'s' if workers > 1 else ''})")
        self.stdout.flush()
        sys.stdout.flush()


def _run_worker(sock, threads: int) -> None:
    server = MLLPServer(
        handle_messages,
        handle_oversize,
        max_message_bytes=settings.HL7_MAX_MESSAGE_BYTES,
        idle_timeout=settings.HL7_IDLE_TIMEOUT,
        threads=threads,
    )

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        await server.start(sock)
        await server.serve_until_stopped()

    asyncio.run(main())


def _forward_signals(children: list[int]) -> None:
    def forward(signum, frame):
        _stop_workers(children)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


def _stop_workers(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _supervise(children: list[int]) -> None:
    """Wait for the workers (SIGTERM/SIGINT are passed on to them); if one dies, stop the
    others."""
    remaining = set(children)
    while remaining:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        remaining.discard(pid)
        if remaining:
            _stop_workers(list(remaining))

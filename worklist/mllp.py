"""MLLP (HL7 v2 Minimal Lower Layer Protocol) server: frames in, ACK frames out.

A frame is 0x0B, the message, 0x1C 0x0D. Each connection is read by one asyncio task and its
messages are answered in order. Messages are handled by a plain function of a batch (by
default :func:`worklist.hl7.service.handle_messages`) on a few database threads, each with
its own Django database connection: a message goes to a free thread at once, and messages
that arrive on other connections while every thread is busy wait and go together as the
next batch, which commits once for all of them (group commit). A connection that sends
something that is not MLLP, or a frame larger than the limit (answered AR first), is
closed; no other connection notices.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from django.db import connection

log = logging.getLogger("worklist.mllp")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
_BETWEEN_FRAMES = b"\r\n\t "
_PREFIX_BYTES = 65536
# A connection that sent a message this recently is expected to send the next one soon.
_LATELY_SECONDS = 0.05


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def _in_thread(handler: Callable, *args):
    """Run a handler on a pool thread with its own database connection. A connection that
    broke (the database restarted, a network blip) is dropped and the messages handled once
    more on a fresh one: the first attempt was rolled back, or, if its commit did land,
    the second is recognised as a duplicate and answered AA."""
    answer = handler(*args)
    if _drop_broken_connection():
        answer = handler(*args)
        _drop_broken_connection()
    return answer


def _drop_broken_connection() -> bool:
    if connection.connection is None or not connection.errors_occurred:
        return False
    connection.errors_occurred = False
    if connection.is_usable():
        return False
    connection.close()
    return True


def bind_socket(host: str, port: int, reuse_port: bool = False, listen: bool = True
                ) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6 by the host's form); connections queue
    from here on, before the event loop runs. SO_REUSEPORT lets several worker processes
    bind the same port and the kernel spread connections across them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(256)
    return sock


class MLLPServer:
    """Serve MLLP on a bound socket until :meth:`stop`."""

    def __init__(
        self,
        handler: Callable[[list[tuple[bytes, str]]], list[bytes]],
        oversize_handler: Callable[[bytes, str, int], bytes],
        *,
        max_message_bytes: int,
        idle_timeout: float,
        threads: int = 2,
        max_batch: int = 50,
        gather_seconds: float = 0.002,
    ):
        """``handler`` takes ``(message, peer)`` pairs and returns their ACKs in order;
        ``threads`` batches are handled at a time, of at most ``max_batch`` messages; a
        message waits at most ``gather_seconds`` for those of other busy connections."""
        self.handler = handler
        self.oversize_handler = oversize_handler
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.threads = threads
        self.max_batch = max_batch
        # One more thread than batches, so that an oversize frame's AR never waits.
        self.executor = ThreadPoolExecutor(max_workers=threads + 1, thread_name_prefix="hl7")
        self.gather_seconds = gather_seconds
        # (message, peer, ACK future, arrival time) in arrival order.
        self._waiting: list[tuple[bytes, str, asyncio.Future, float]] = []
        self._batches = 0
        self._in_flight = 0
        self._last_message: dict[asyncio.Task, float] = {}
        self._gather_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._server: asyncio.Server | None = None
        self._busy: dict[asyncio.Task, bool] = {}
        self._stopping = False
        self._stopped: asyncio.Event | None = None

    async def start(self, sock: socket.socket) -> int:
        """Listen on ``sock``; returns the port (the real one when bound to port 0)."""
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(
            self._serve_connection, sock=sock, limit=self.max_message_bytes + len(END_BLOCK),
            backlog=256,
        )
        return sock.getsockname()[1]

    @property
    def waiting(self) -> int:
        """Messages read and waiting for a database thread."""
        return len(self._waiting)

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let messages being handled finish and be answered, close."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._busy.items()):
            if not busy:
                task.cancel()
        tasks = list(self._busy)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        # Messages still waiting now are not applied: their connections close without an
        # ACK and the senders send them again.
        self._closing = True
        self._fail_waiting()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_database_connections)
        await loop.run_in_executor(None, self.executor.shutdown, True)
        if self._stopped is not None:
            self._stopped.set()

    def _close_database_connections(self) -> None:
        """Close each pool thread's database connection (Django connections belong to their
        thread): one task per thread, held at a barrier so that no thread takes two."""
        count = self.threads + 1
        barrier = threading.Barrier(count)

        def close() -> None:
            try:
                barrier.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
            connection.close()

        for future in [self.executor.submit(close) for _ in range(count)]:
            future.result()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._busy[task] = False
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if address else "?"
        try:
            while not self._stopping:
                message = await self._read_frame(reader, writer, peer)
                if message is None:
                    break
                self._busy[task] = True
                ack = await self._answer(message, peer)
                writer.write(frame(ack))
                await writer.drain()
                self._busy[task] = False
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            log.info("closing idle HL7 connection from %s", peer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("HL7 connection from %s failed", peer)
        finally:
            self._busy.pop(task, None)
            self._last_message.pop(task, None)
            writer.close()

    async def _answer(self, message: bytes, peer: str) -> bytes:
        """The message's ACK, once its batch has been handled."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = loop.time()
        self._last_message[asyncio.current_task()] = now
        self._waiting.append((message, peer, future, now))
        self._start_batches()
        return await future

    def _gathered(self, now: float) -> bool:
        """Whether the waiting messages should go now: every connection that has been
        sending lately has its message waiting or being handled, or the first one has
        waited long enough. Without this the batches of a few busy connections settle
        into alternating sizes (one connection, then the others) and commit twice as
        often."""
        if now - self._waiting[0][3] >= self.gather_seconds:
            return True
        lately = now - _LATELY_SECONDS
        sending = sum(1 for last in self._last_message.values() if last >= lately)
        return len(self._waiting) + self._in_flight >= sending

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for _message, _peer, future, _at in waiting:
            if not future.done():
                future.set_exception(ConnectionAbortedError("the HL7 listener is stopping"))

    def _start_batches(self) -> None:
        if self._closing:
            self._fail_waiting()
            return
        loop = asyncio.get_running_loop()
        while self._waiting and self._batches < self.threads:
            now = loop.time()
            if not self._gathered(now):
                if self._gather_timer is None:
                    self._gather_timer = loop.call_at(self._waiting[0][3] + self.gather_seconds,
                                                      self._gather_timeout)
                return
            # Spread what is waiting over the free threads: one thread's database round trips
            # then overlap with another's Python work.
            free = self.threads - self._batches
            size = min(self.max_batch, -(-len(self._waiting) // free))
            batch = self._waiting[:size]
            del self._waiting[:size]
            handled = loop.run_in_executor(self.executor, _in_thread, self.handler,
                                           [(message, peer) for message, peer, _, _ in batch])
            self._batches += 1
            self._in_flight += len(batch)
            handled.add_done_callback(partial(self._batch_done, batch))

    def _gather_timeout(self) -> None:
        self._gather_timer = None
        self._start_batches()

    def _batch_done(self, batch: list[tuple[bytes, str, asyncio.Future, float]],
                    handled: asyncio.Future) -> None:
        self._batches -= 1
        self._in_flight -= len(batch)
        error = handled.exception() if not handled.cancelled() else asyncio.CancelledError()
        acks = [] if error is not None else handled.result()
        for index, (_message, _peer, future, _at) in enumerate(batch):
            if future.done():  # the connection's task was cancelled meanwhile
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(acks[index])
        self._start_batches()

    async def _read_frame(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          peer: str) -> bytes | None:
        """The next message, or None when the connection should close."""
        async with asyncio.timeout(self.idle_timeout):
            while True:
                first = await reader.read(1)
                if not first:
                    return None
                if first == START_BLOCK:
                    break
                if first not in _BETWEEN_FRAMES:
                    log.warning("closing HL7 connection from %s: not MLLP (byte 0x%02x where "
                                "a frame should start)", peer, first[0])
                    return None
            try:
                body = await reader.readuntil(END_BLOCK)
            except asyncio.LimitOverrunError:
                prefix = await reader.read(_PREFIX_BYTES)
                log.warning("refusing a frame of more than %d bytes from %s; closing",
                            self.max_message_bytes, peer)
                loop = asyncio.get_running_loop()
                ack = await loop.run_in_executor(self.executor, _in_thread,
                                                 self.oversize_handler, prefix, peer,
                                                 self.max_message_bytes)
                writer.write(frame(ack))
                await writer.drain()
                return None
        body = body[: -len(END_BLOCK)]
        # A sender that gave up on a frame and started again: keep the last start.
        restart = body.rfind(START_BLOCK)
        if restart != -1:
            body = body[restart + 1 :]
        if len(body) > self.max_message_bytes:
            loop = asyncio.get_running_loop()
            ack = await loop.run_in_executor(self.executor, _in_thread, self.oversize_handler,
                                             body[:_PREFIX_BYTES], peer,
                                             self.max_message_bytes)
            writer.write(frame(ack))
            await writer.drain()
            return None
        return body

"""Verify from the pages: a C-ECHO someone waits for gives up in seconds, not minutes."""

from __future__ import annotations

import socket
import threading

import pytest

from routing import config
from routing.models import Node

pytestmark = pytest.mark.django_db


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def test_verify_gives_up_on_a_node_that_accepts_but_never_answers(silent_peer):
    node = Node.objects.create(name="MUTE", ae_title="MUTE", host="127.0.0.1",
                               port=silent_peer)

    error, _ms = config.verify_node(node.pk)

    assert "timed out" in error
    node.refresh_from_db()
    assert node.last_echo_error == error and node.last_echo_ok_at is None

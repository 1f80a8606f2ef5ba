"""The private servers that the tests, the demo and the benchmarks start (`workers.server`)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import KIND
from tests.support import left_for_the_collector
from workers.server import LocalServer, ServerError, _ephemeral_ports_start, free_port


def test_a_free_port_lies_below_the_ports_outgoing_connections_take() -> None:
    low = _ephemeral_ports_start()
    assert all(1024 <= free_port() < low for _ in range(20))


def test_a_server_whose_port_was_taken_before_its_first_start_takes_another() -> None:
    server = LocalServer(KIND, cluster=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.cluster_port))
        taken.listen()
        chosen = server.cluster_port
        try:
            server.start()
            assert server.cluster_port != chosen
            port = server.port
            server.restart()
            assert server.port == port  # once started, its clients know its port
        finally:
            server.close()


def test_a_server_whose_port_another_server_holds_is_not_taken_for_that_one() -> None:
    """The other server's answer passed for its own: `start()` returned while it exited with
    "Address already in use", and its clients used the other's data."""
    with LocalServer(KIND) as other:
        given = LocalServer(KIND, port=other.port)  # a port given is not moved
        try:
            with pytest.raises(ServerError, match="Address already in use"):
                given.start()
        finally:
            given.close()
        picked = LocalServer(KIND)
        picked.port = other.port  # as if another session took the port it picked
        try:
            picked.start()
            assert picked.port != other.port and picked.process is not None
            assert picked.process.poll() is None  # its own, running
        finally:
            picked.close()


def test_a_server_stopped_or_killed_leaves_nothing_open() -> None:
    """Its pipe is closed with it: the chaos runs stop and kill servers hundreds of times."""
    with left_for_the_collector() as left:
        server = LocalServer(KIND)
        try:
            server.start()
            server.kill()
            server.restart()
        finally:
            server.close()
    assert left == []

"""Ports chosen for the workspace's servers at start: free, and distinct from each other and from the
configured ones."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from paitient.services.kit import process
from paitient.services.kit.process import free_ports


def test_ports_chosen_together_are_distinct_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises if the port were taken


class Offered:
    """A socket whose system offers the ports of a script, repeats included: what one-at-a-time asking can
    meet, and what choosing while holding every offer open must not pass on."""

    script: list[int] = []

    def __init__(self) -> None:
        self.port = 0

    def bind(self, address: tuple[str, int]) -> None:
        self.port = Offered.script.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


def test_a_port_offered_twice_or_configured_elsewhere_is_not_chosen(monkeypatch):
    monkeypatch.setattr(process, "socket", SimpleNamespace(socket=Offered))  # this module's sockets only
    Offered.script = [41000, 41000, 41001]
    assert free_ports(2) == [41000, 41001]  # the hub and the proxy's API once both got 41000
    Offered.script = [8000, 41002, 0]
    assert free_ports(1, avoid=[8000, 0, None]) == [41002]

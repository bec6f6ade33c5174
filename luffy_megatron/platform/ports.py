"""Choosing and checking TCP ports for the processes a run launches (servers, router, rendezvous stores)."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

#: Linux's default ephemeral range, used where ``/proc`` does not say.
DEFAULT_EPHEMERAL = (32768, 60999)


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on now, for a process to listen on later (a
    rendezvous store, a server): chosen below the OS's ephemeral range, like :func:`free_port_block`, so that no
    ``bind(0)`` or outgoing connection can take it in between."""
    return free_port_block(1)


def ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out for ``bind(port 0)`` and outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` would fail the way a server's bind (with ``SO_REUSEADDR``) fails."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    """Poll until ``host:port`` can be bound (a killed server may hold it a few seconds); False if it never could."""
    deadline = time.monotonic() + timeout_s
    while port_in_use(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def free_port_block(size: int = 40, host: str = "127.0.0.1", low: int = 10000) -> int:
    """A base port whose next ``size`` ports are free now, chosen below the OS's ephemeral range.

    Ports from that range are what every ``bind(0)`` gets (gloo's pair sockets, torchrun's store, :func:`free_port`),
    so a server port taken from it can be grabbed by the trainer's own process groups before the server binds it.
    """
    ephemeral_low = ephemeral_range()[0]
    high = ephemeral_low - size if ephemeral_low - size > low else 65535 - size
    for _ in range(200):
        base = random.randint(low, high)
        if not any(port_in_use(host, p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports found in [{low}, {high + size})")

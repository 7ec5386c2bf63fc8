"""Loopback ports for a private broker: free ones to pick, busy ones to report, and whether
an AMQP 0-9-1 server really answers on one. Everything binds and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import socket

__all__ = ["HOST", "amqp_handshake", "can_connect", "free_ports", "port_free"]

HOST = "127.0.0.1"
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now. All sockets are held open together so the ports
    differ; another process may still take one before we bind it (start() then fails with the
    port named, rather than hanging)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(port: int) -> bool:
    """Whether nobody listens on 127.0.0.1:port. SO_REUSEADDR, as the servers use, so that
    connections of the previous run in TIME_WAIT do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def can_connect(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def amqp_handshake(port: int, timeout: float) -> bool:
    """A real AMQP 0-9-1 greeting: send the protocol header and expect Connection.Start
    (method frame on channel 0, class 10, method 10). A bare TCP connect is not enough: the
    port can accept while the reader is not up. Blocking on purpose: start() may be called from
    inside a running event loop, where asyncio.run is not allowed."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_AMQP_HEADER)
            data = b""
            while len(data) < 11:
                chunk = sock.recv(11 - len(data))
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    frame_type, channel = data[0], int.from_bytes(data[1:3], "big")
    class_id, method_id = int.from_bytes(data[7:9], "big"), int.from_bytes(data[9:11], "big")
    return (frame_type, channel, class_id, method_id) == (1, 0, 10, 10)

"""Loopback helpers for tests that start servers or process groups."""

import random
import socket

#: Below the kernel's ephemeral range (32768-60999 here), so no outgoing connection takes a port
#: between the moment it is chosen and the moment a server binds it; above the worker-port ranges
#: the test clusters give their nodes (20000-23999).
PORT_RANGE = (24000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never handed out before in this process."""
    rng = random.Random()
    while True:
        port = rng.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port

"""Loopback plumbing shared by the real-peer fixtures.

Peers listen on 127.0.0.1 only, on ports picked free at runtime, and every
wait for them is bounded.  Binding a port and releasing it before the peer
binds it again leaves a short window in which another process could take
it; on a test machine that is rare, and a peer that loses the race fails to
start with its log in the error.
"""

import socket
from pathlib import Path

HOST = "127.0.0.1"

# /proc/net/{udp,tcp} "st" column: 07 is TCP_CLOSE (an unconnected UDP
# socket), 0A is TCP_LISTEN.
_BOUND_STATE = {
    socket.SOCK_DGRAM: ("/proc/net/udp", "07"),
    socket.SOCK_STREAM: ("/proc/net/tcp", "0A"),
}


def free_port(kind: socket.SocketKind) -> int:
    """Return a port on HOST that is free for `kind` (SOCK_DGRAM or SOCK_STREAM) right now."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def is_bound(port: int, kind: socket.SocketKind) -> bool:
    """Tell whether some process has a UDP socket bound, or a TCP socket listening, on `port`.

    Reading the kernel's socket table leaves the peer undisturbed: a probe
    datagram or connection would reach its SIP scenario as a message.
    """
    table, state = _BOUND_STATE[kind]
    for line in Path(table).read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == state:
            return True
    return False


def tail(path: Path, lines: int = 60) -> str:
    """Return the last `lines` lines of a log file, or a note that it does not exist."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

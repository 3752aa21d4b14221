"""The app as the README starts it listens on 127.0.0.1 only: without sign-in, anyone who can
reach it can edit every project, so it must not be reachable from other machines by default."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from streamlit_app import REPO, free_port, start_app

TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket (include/net/tcp_states.h)


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets a process holds open: its /proc/<pid>/fd links read 'socket:[inode]'."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} write an address as the kernel holds it: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, IPv4 and IPv6."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                host, port = local.split(":")
                found.append((_address(host), int(port, 16)))
    return found


def test_address_parsing_matches_the_kernel_for_sockets_of_our_own():
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::", 0))  # what Streamlit binds when no address is configured
        v4.listen()
        v6.listen()
        found = listening_addresses(os.getpid())
        assert ("127.0.0.1", v4.getsockname()[1]) in found and ("::", v6.getsockname()[1]) in found


def test_the_readme_command_starts_an_app_that_listens_on_127_0_0_1_only(tmp_path):
    assert "python -m streamlit run app.py" in (REPO / "scripts" / "start.sh").read_text()  # what start.sh runs
    port = free_port()
    server = start_app(tmp_path / "home", tmp_path / "streamlit.log", port)
    try:
        listening = listening_addresses(server.pid)
        assert listening == [("127.0.0.1", port)], listening
    finally:
        server.terminate()
        server.wait(timeout=30)

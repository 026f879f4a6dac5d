"""A test host of our own: a network namespace joined to this machine by a veth pair.

Both ends carry loopback-range addresses (127.X.Y.1 here, 127.X.Y.2 inside), which Linux
routes over the veth only with ``route_localnet``; nothing leaves the machine. ``cut`` takes
the link down, as a Wi-Fi drop would: no RST, connections simply go quiet; ``heal`` brings it
back and the same TCP connections carry on.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=10)


def _sysctl(setting: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "sysctl", "-qw", setting], check=True, capture_output=True, timeout=10)


def why_namespaces_cannot_be_made() -> str | None:
    """None when this process can make network namespaces; otherwise the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("sysctl") is None:
        return "iproute2 (ip) and procps (sysctl) are needed for network namespaces"
    probe = f"corral-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@dataclass
class NamespacedHost:
    netns: str
    host_veth: str
    host_address: str
    """This machine's end: servers the namespace should reach bind here too."""
    inner_address: str

    def command_prefix(self) -> list[str]:
        """Prepend to a command line to run it inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    def cut(self) -> None:
        _ip("link", "set", self.host_veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_veth, "up")


@contextmanager
def namespaced_host() -> Iterator[NamespacedHost]:
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    netns, host_veth, inner_veth = f"corral-{tag}", f"crh{tag}", f"crn{tag}"
    second, third = random.randrange(64, 250), random.randrange(1, 250)
    host_address, inner_address = f"127.{second}.{third}.1", f"127.{second}.{third}.2"
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", inner_veth)
        _ip("link", "set", inner_veth, "netns", netns)
        _ip("addr", "add", f"{host_address}/30", "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _sysctl(f"net.ipv4.conf.{host_veth}.route_localnet=1")
        _ip("addr", "add", f"{inner_address}/30", "dev", inner_veth, netns=netns)
        _ip("link", "set", inner_veth, "up", netns=netns)
        _sysctl(f"net.ipv4.conf.{inner_veth}.route_localnet=1", netns=netns)
        yield NamespacedHost(netns, host_veth, host_address, inner_address)
    finally:
        # Deleting the namespace deletes its veth end, and with it the peer on this side.
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", host_veth], capture_output=True, timeout=10)

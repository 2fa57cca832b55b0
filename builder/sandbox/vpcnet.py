"""The sandbox's VPCs: one bridge per VPC, in a network namespace of its own, never the host's.

Each instance's machine gets a second interface, ``ens5`` (what the primary interface of a
Debian instance is called on Nitro), holding the private address EC2 gave it, with a route to
every CIDR block of its VPC on that link. Its other end is a port of the VPC's bridge, which
lives in the named network namespace ``/run/netns/<prefix><vpc-id>``: machines of one VPC reach
each other's private addresses (the bridge plays the VPC's router), machines of another VPC sit
on another bridge, and the host has neither an interface nor a route into any of them. A veth
pair is made straight between those two namespaces (``ip -n VPC link add ... peer ... netns
PID``), so it never shows on the host, and it is gone as soon as the machine's namespace is:
removing a VPC's namespace removes its bridge and whatever ports are left.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder.errors import MachineError

NETNS_DIR = Path("/run/netns")
BRIDGE = "br0"
INSIDE = "ens5"


@dataclass(frozen=True)
class Nic:
    """A machine's interface in its VPC: the namespace of the VPC's bridge, its port and the address."""

    netns: str  # name under /run/netns
    port: str  # the bridge's end of the pair (unique in the VPC's namespace, <= 15 characters)
    address: str  # e.g. 172.31.3.4
    prefix: int  # the subnet's prefix length
    routes: tuple[str, ...] = ()  # the VPC's CIDR blocks, reached on the link

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Nic:
        return cls(
            str(data["netns"]), str(data["port"]), str(data["address"]), int(data["prefix"]), tuple(data["routes"])
        )


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise MachineError(netns or "host", f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def ensure_network(netns: str) -> None:
    """Make the VPC's namespace with its bridge unless it exists. Raises MachineError."""
    if (NETNS_DIR / netns).exists():
        return
    _ip("netns", "add", netns)
    try:
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("link", "add", BRIDGE, "type", "bridge", netns=netns)
        _ip("link", "set", BRIDGE, "up", netns=netns)
    except MachineError:
        remove_network(netns)
        raise


def plug(leader: int, nic: Nic) -> None:
    """Connect the machine whose PID 1 is ``leader`` to its VPC's bridge, as ``ens5`` with its address.

    Raises MachineError when a step fails (what is made is undone by the machine's stop).
    """
    ensure_network(nic.netns)
    _ip("link", "del", nic.port, netns=nic.netns, check=False)  # a stale port of an earlier start
    _ip("link", "add", nic.port, "type", "veth", "peer", "name", INSIDE, "netns", str(leader), netns=nic.netns)
    _ip("link", "set", nic.port, "master", BRIDGE, "up", netns=nic.netns)
    inside = ["nsenter", "-t", str(leader), "-n", "--"]
    for args in (
        ["addr", "add", f"{nic.address}/{nic.prefix}", "dev", INSIDE],
        ["link", "set", INSIDE, "up"],
        *(["route", "replace", cidr, "dev", INSIDE] for cidr in nic.routes),
    ):
        done = subprocess.run([*inside, "ip", *args], capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise MachineError(str(leader), f"ip {' '.join(args)} in the machine: {done.stderr.strip()}")


def remove_network(netns: str) -> None:
    """Remove a VPC's namespace, its bridge and any port left on it (idempotent)."""
    if (NETNS_DIR / netns).exists():
        _ip("netns", "del", netns, check=False)


def networks(prefix: str) -> list[str]:
    """Return the names of the VPC namespaces that start with ``prefix`` (one sandbox's)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def remove_networks(prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Remove every VPC namespace of ``prefix`` but those in ``keep``."""
    for netns in networks(prefix):
        if netns not in keep:
            with contextlib.suppress(OSError):
                remove_network(netns)

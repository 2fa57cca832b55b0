"""Test helpers around real local Debian machines (builder.sandbox.machine).

A Booted is a started machine with a data volume attached and an SSH session whose host
key is pinned to the one handed to the machine in its user-data, the way the builder
reaches an EC2 instance.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.errors import CommandResult
from builder.keys import KeyPair
from builder.remote import Remote
from builder.render import Script, render_role
from builder.roles import Role
from builder.sandbox.dataplane import address_free
from builder.sandbox.machine import Disk, Machine, make_image
from builder.userdata import builder_user_data

VOLUME_ID = "vol-0123456789abcdef0"
MANIFEST_TOOL = Path(__file__).with_name("tree_manifest.py")
_addresses = itertools.count(10)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, mounts and loop devices")


def next_address() -> str:
    """Return a fresh loopback address for a machine's SSH (127.0.0.0/8 is all local)."""
    while True:  # another test run on the same host may hold an address
        n = next(_addresses)
        address = f"127.0.{n // 250 + 1}.{n % 250 + 2}"
        if address_free(address):
            return address


@dataclass
class Booted:
    """A running machine, its data volume and a pinned SSH session."""

    machine: Machine
    remote: Remote
    disk: Disk
    login: KeyPair
    host_key: KeyPair
    scripts: dict[str, Script] = field(default_factory=dict)

    def sh(self, command: str, *, check: bool = True, timeout: float = 600) -> CommandResult:
        """Run a shell command as root over SSH."""
        result = self.remote.run(f"sudo -n bash -c {_q(command)}", timeout=timeout, on_line=lambda *_: None)
        if check and result.exit_status != 0:
            raise AssertionError(f"{command!r} exited {result.exit_status}:\n{result.tail()}")
        return result

    def run_script(self, name: str, *args: str, check: bool = True) -> CommandResult:
        """Run one of the role's rendered scripts as the build does (over stdin); return its result."""
        script = self.scripts[name]
        result = self.remote.run_script(name, script.text, args, timeout=900, on_line=lambda *_: None, check=False)
        if check and result.exit_status != 0:
            raise AssertionError(f"{name} exited {result.exit_status}:\n{result.tail(40)}")
        return result

    def run_script_as_root(self, name: str, *args: str, check: bool = True) -> CommandResult:
        """Run one of the role's scripts with all of root's capabilities; return its result.

        Root over SSH has only the capabilities of the machine's user namespace (containment):
        no CAP_MKNOD, no CAP_LINUX_IMMUTABLE; root on an EC2 instance has them, and copying
        device nodes and chattr flags needs them. In a machine booted with ``host_root`` this
        enters all of the machine's namespaces but its user namespace, from the host, as the
        host's root (the machine's own userland still runs it).
        """
        text = self.scripts[name].text
        done = self.machine.exec("bash", "-c", 'eval "$(cat)"', name, *args, check=False, timeout=900, input_text=text)
        result = CommandResult(f"bash {name}", done.returncode, done.stdout, done.stderr)
        if check and result.exit_status != 0:
            raise AssertionError(f"{name} exited {result.exit_status}:\n{result.tail(40)}")
        return result

    def provision(self, check: bool = True, *, as_root: bool = False) -> CommandResult:
        if as_root:
            return self.run_script_as_root("provision.sh", VOLUME_ID, check=check)
        return self.run_script("provision.sh", VOLUME_ID, check=check)

    def root_sh(self, command: str) -> str:
        """Run a shell command with all of root's capabilities (see run_script_as_root); return stdout."""
        return self.machine.exec("bash", "-c", command, timeout=600).stdout

    def verify(self, check: bool = True) -> CommandResult:
        return self.run_script("verify.sh", check=check)

    def manifest(self, *roots: str) -> list[str]:
        """Return the tree manifest of ``roots`` on the machine (see tree_manifest.py)."""
        self.remote.put(MANIFEST_TOOL.read_text(), f"/tmp/{MANIFEST_TOOL.name}", 0o755)
        out = self.sh(f"python3 /tmp/{MANIFEST_TOOL.name} {' '.join(_q(r) for r in roots)}").stdout
        return out.splitlines()


def _q(text: str) -> str:
    return shlex.quote(text)


def machine_name(name: str) -> str:
    """Return the name ``boot`` gives machine ``name``: cgroups are named by machine, and two test
    runs on one host must not meet."""
    return f"{name}-{os.getpid()}"


def boot(
    name: str,
    rootfs: Path,
    state_root: Path,
    *,
    role: Role | None = None,
    image: Path | None = None,
    size_gib: float = 2,
    host_root: bool = False,
) -> Booted:
    """Start a machine with a data volume at /dev/xvdf (by-id name of VOLUME_ID); log in.

    ``host_root``: root_sh and run_script_as_root run as the host's root (see Machine.start).
    """
    login, host_key = KeyPair.generate("ebsrole-test"), KeyPair.generate("ebsrole-test-host")
    if image is None:
        image = make_image(state_root.parent / "images" / f"{name}.img", size_gib)
    disk = Disk(image, "xvdf", VOLUME_ID)
    machine = Machine.start(
        machine_name(name),
        [rootfs],
        user_data=builder_user_data(login, host_key),
        ssh_address=next_address(),
        disks=[disk],
        state_root=state_root,
        host_root=host_root,
    )
    try:
        remote = Remote.connect(*machine.ssh_endpoint, "admin", login, host_key, deadline=90)
    except BaseException:
        machine.stop()
        raise
    scripts = {s.name: s for s in render_role(role)} if role else {}
    return Booted(machine, remote, disk, login, host_key, scripts)


def leftovers(machine: Machine) -> list[str]:
    """Return what a stopped machine left on the host (processes, loops, cgroups, mounts, state)."""
    found = []
    if machine.state.exists():
        found.append(f"state dir {machine.state}")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(machine.state.parent.parent) in line]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if str(machine.state) in line]
    for top in (
        Path("/sys/fs/cgroup/unified/ebsrole"),
        Path("/sys/fs/cgroup/ebsrole"),
        Path("/sys/fs/cgroup/devices/ebsrole"),
    ):
        if (top / machine.name).exists():
            found.append(f"cgroup {top / machine.name}")
    procs = subprocess.run(["pgrep", "-af", str(machine.state)], capture_output=True, text=True, check=False).stdout
    found += [f"process {line}" for line in procs.splitlines()]
    return found

"""The sandbox's data plane: the bytes and the machines behind the EC2 API's ids.

The EC2 emulator (moto) keeps the control plane: which instance runs which image, which
volume is attached where, in what state. This module keeps what moto only names:

- a data volume is a sparse file, plugged into its instance's machine as a loop device
  at its EC2 device name (``/dev/sdf`` shows as ``/dev/xvdf`` and by its Nitro by-id name);
- a root volume is an overlay: the read-only layers it was made from (the cached Debian
  tree, then the trees of the snapshots it descends from) and its own writable tree;
- a snapshot is a frozen copy: of a data volume's file (holes kept), or of a root
  volume's writable tree together with the layers under it;
- an instance is a local machine (``machine.Machine``) with its root volume as its root
  filesystem and its data volumes plugged in, its private address on its VPC's bridge
  (``vpcnet``), and, when EC2 would give it a public address, its own loopback address of
  the host, where its sshd and the ports its security groups admit answer.

Everything lives under one directory, with an index (``dataplane.json``) rewritten after
every change, so a later sandbox process picks up the same world.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import DataPlaneError, MachineError
from builder.files import write_atomic
from builder.sandbox import vpcnet
from builder.sandbox.machine import Disk, Machine, make_image

log = logging.getLogger(__name__)

ADDRESS_NET = "127.77"  # instances get 127.77.x.y, one each; all of 127/8 is local on Linux
INDEX = "dataplane.json"


def device_node(device: str) -> str:
    """Return the node an EC2 device name shows as on a Nitro-like Debian: /dev/sdf -> xvdf."""
    name = device.removeprefix("/dev/")
    return "xvd" + name.removeprefix("sd") if name.startswith("sd") else name


def network_prefix(root: Path) -> str:
    """Return the prefix of the VPC namespaces of the data plane kept under ``root`` (one per sandbox)."""
    return f"ebsrole-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}-"


@dataclass(frozen=True)
class Placement:
    """Where an instance sits in its VPC: the private address EC2 gave it, in its subnet."""

    vpc_id: str
    address: str
    prefix: int  # the subnet's prefix length
    cidrs: tuple[str, ...]  # the VPC's CIDR blocks


@dataclass(frozen=True)
class Attachment:
    """A data volume to plug in at boot: its id and EC2 device name."""

    volume_id: str
    device: str


class DataPlane:
    """Volumes, snapshots and machines of one sandbox, kept under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.machines_root = root / "machines"
        self._lock = threading.RLock()
        self._stopping: set[str] = set()
        for sub in ("volumes", "snapshots", "machines"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        index = root / INDEX
        data: dict[str, Any] = json.loads(index.read_text()) if index.exists() else {}
        self.volumes: dict[str, dict[str, Any]] = data.get("volumes", {})
        self.snapshots: dict[str, dict[str, Any]] = data.get("snapshots", {})
        self.instances: dict[str, dict[str, Any]] = data.get("instances", {})
        self.next_address: int = data.get("next_address", 0)
        self.network_prefix = network_prefix(root)

    def save(self) -> None:
        """Write the index (atomically)."""
        with self._lock:
            data = {
                "volumes": self.volumes,
                "snapshots": self.snapshots,
                "instances": self.instances,
                "next_address": self.next_address,
            }
            write_atomic(self.root / INDEX, json.dumps(data, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------ volumes

    def create_volume(self, volume_id: str, size_gib: int, snapshot_id: str | None) -> None:
        """Make the bytes of a new data volume: empty, or a copy of a snapshot's."""
        snapshot = self.snapshots.get(snapshot_id or "")
        if snapshot and "tree" in snapshot:
            self.volumes[volume_id] = {"layers": [snapshot["tree"], *snapshot["layers"]]}
            self.save()
            return
        path = self.root / "volumes" / f"{volume_id}.img"
        if snapshot:
            _copy_sparse(Path(snapshot["file"]), path)
            with path.open("r+b") as handle:
                if handle.seek(0, os.SEEK_END) < size_gib * 1024**3:
                    handle.truncate(size_gib * 1024**3)
        else:
            make_image(path, size_gib)
        self.volumes[volume_id] = {"file": str(path)}
        self.save()

    def create_root_volume(self, volume_id: str, layers: Sequence[Path | str]) -> None:
        """Record a root volume made of ``layers`` (topmost first); its writable tree comes with its machine."""
        self.volumes[volume_id] = {"layers": [str(p) for p in layers]}
        self.save()

    def root_layers(self, snapshot_id: str | None) -> list[str] | None:
        """Return the layers a root volume made from ``snapshot_id`` has, or None if it is not a root snapshot."""
        snapshot = self.snapshots.get(snapshot_id or "")
        if snapshot and "tree" in snapshot:
            return [snapshot["tree"], *snapshot["layers"]]
        return None

    def is_root_volume(self, volume_id: str) -> bool:
        return "layers" in self.volumes.get(volume_id, {})

    def delete_volume(self, volume_id: str) -> None:
        """Free a volume's bytes (idempotent)."""
        entry = self.volumes.pop(volume_id, None)
        if entry and "file" in entry:
            Path(entry["file"]).unlink(missing_ok=True)
        if entry and "tree" in entry:
            shutil.rmtree(entry["tree"], ignore_errors=True)
        self._collect_layers()
        self.save()

    def attach(self, instance_id: str, volume_id: str, device: str) -> None:
        """Plug a data volume into a running instance (a stopped one gets it at its next start)."""
        entry = self._data_volume(volume_id)
        machine = self._machine(instance_id)
        if machine.running and instance_id not in self._stopping:
            try:
                machine.attach(Disk(Path(entry["file"]), device_node(device), volume_id))
            except MachineError as exc:
                raise DataPlaneError("InternalError", f"attaching {volume_id} at {device}: {exc}") from exc

    def check_attachable(self, volume_id: str) -> None:
        """Raise DataPlaneError when ``volume_id`` cannot be plugged in as a data volume."""
        self._data_volume(volume_id)

    def detach(self, instance_id: str, device: str) -> None:
        """Unplug the volume at ``device`` from a running instance (idempotent)."""
        machine = self._machine(instance_id)
        with contextlib.suppress(MachineError):
            machine.detach(device_node(device))

    # ------------------------------------------------------------ snapshots

    def snapshot(self, volume_id: str, snapshot_id: str) -> None:
        """Freeze a copy of a volume's bytes as they are now (what the volume has been sent)."""
        entry = self.volumes.get(volume_id)
        if entry is None:
            raise DataPlaneError("InternalError", f"the sandbox holds no data for {volume_id}")
        try:
            if "file" in entry:
                self._flush(volume_id)
                target = self.root / "snapshots" / f"{snapshot_id}.img"
                _copy_sparse(Path(entry["file"]), target)
                self.snapshots[snapshot_id] = {"file": str(target)}
            else:
                tree = self.root / "snapshots" / f"{snapshot_id}.tree"
                source = self._root_tree(volume_id)
                if source.is_dir():
                    _copy_tree(source, tree)
                else:
                    tree.mkdir(parents=True)
                self.snapshots[snapshot_id] = {"tree": str(tree), "layers": entry["layers"]}
        except (OSError, subprocess.CalledProcessError) as exc:
            raise DataPlaneError("InternalError", f"snapshot of {volume_id} failed: {exc}") from exc
        self.save()

    def copy_snapshot(self, source_id: str, snapshot_id: str) -> None:
        """Make ``snapshot_id`` a copy of ``source_id``'s bytes (CopySnapshot)."""
        source = self.snapshots.get(source_id)
        if source is None:
            return
        if "file" in source:
            target = self.root / "snapshots" / f"{snapshot_id}.img"
            _copy_sparse(Path(source["file"]), target)
            self.snapshots[snapshot_id] = {"file": str(target)}
        else:
            tree = self.root / "snapshots" / f"{snapshot_id}.tree"
            _copy_tree(Path(source["tree"]), tree)
            self.snapshots[snapshot_id] = {"tree": str(tree), "layers": source["layers"]}
        self.save()

    def snapshot_bytes(self, snapshot_id: str) -> int:
        """Bytes a snapshot holds: the blocks allocated to its sparse copy, or to its tree's files
        (a root volume's tree holds only what was written over its layers)."""
        entry = self.snapshots.get(snapshot_id, {})
        if "file" in entry:
            with contextlib.suppress(OSError):
                return Path(entry["file"]).stat().st_blocks * 512
            return 0
        return _disk_usage(Path(entry["tree"])) if "tree" in entry else 0

    def in_use_as_layer(self, snapshot_id: str) -> bool:
        """True when a root volume or another snapshot still reads ``snapshot_id``'s tree."""
        tree = self.snapshots.get(snapshot_id, {}).get("tree")
        if not tree:
            return False
        users = [*self.volumes.values(), *self.snapshots.values()]
        return any(tree in entry.get("layers", ()) for entry in users)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Free a snapshot's bytes (idempotent). A tree other volumes still stand on is kept until they go."""
        entry = self.snapshots.get(snapshot_id)
        if entry is None:
            return
        if self.in_use_as_layer(snapshot_id):
            entry["deleted"] = True
        else:
            self.snapshots.pop(snapshot_id)
            if "file" in entry:
                Path(entry["file"]).unlink(missing_ok=True)
            if "tree" in entry:
                shutil.rmtree(entry["tree"], ignore_errors=True)
        self.save()

    def _collect_layers(self) -> None:
        """Free the trees of deleted snapshots that nothing stands on any more."""
        for snapshot_id in [s for s, e in self.snapshots.items() if e.get("deleted")]:
            if not self.in_use_as_layer(snapshot_id):
                self.delete_snapshot(snapshot_id)

    # ------------------------------------------------------------ instances

    def launch(
        self,
        instance_id: str,
        root_volume_id: str,
        attachments: Sequence[Attachment],
        user_data: str,
        public_keys: Sequence[str] = (),
        *,
        placement: Placement | None = None,
        public: bool = True,
        ssh_later: bool = False,
    ) -> str | None:
        """Start the machine of a new instance; return its public address (None without one).

        ``placement`` plugs it into its VPC; ``public`` gives it a loopback address of the
        host, where its sshd answers (with ``ssh_later``, only from the first ``forward``
        on). Raises DataPlaneError.
        """
        address = self._address() if public else None
        layers = self.volumes[root_volume_id]["layers"]
        nic = self._nic(instance_id, placement) if placement else None
        self.instances[instance_id] = {
            "address": address,
            "private_address": placement.address if placement else None,
            "network": nic.netns if nic else None,
            "root_volume": root_volume_id,
            **({"forwarded": []} if ssh_later else {}),
        }
        self.volumes[root_volume_id]["instance"] = instance_id
        self.save()
        try:
            Machine.start(
                instance_id,
                [Path(p) for p in layers],
                user_data=user_data,
                ssh_address=address,
                ssh_port=22,
                disks=[self._disk(a) for a in attachments],
                public_keys=public_keys,
                state_root=self.machines_root,
                nic=nic,
                ssh_later=ssh_later,
            )
        except (MachineError, OSError) as exc:
            self.prune_networks()
            raise DataPlaneError("Server.InternalError", f"{instance_id} failed to start: {exc}") from exc
        return address

    def _nic(self, instance_id: str, placement: Placement) -> vpcnet.Nic:
        # A port name is at most 15 characters; an instance id's last 12 hex digits are unique enough in a VPC.
        port = "v" + instance_id.rsplit("-", 1)[-1][-12:]
        return vpcnet.Nic(
            self.network_prefix + placement.vpc_id, port, placement.address, placement.prefix, placement.cidrs
        )

    def prune_networks(self) -> None:
        """Remove the VPC namespaces no running machine of this sandbox is plugged into."""
        running = self.running()
        keep = {str(e["network"]) for i, e in self.instances.items() if e.get("network") and running.get(i)}
        vpcnet.remove_networks(self.network_prefix, keep)

    def forward(self, instance_id: str, ports: set[int]) -> None:
        """Make the machine's ``ports`` answer on its address (what its security groups admit)."""
        entry = self.instances.get(instance_id)
        machine = self._machine(instance_id)
        if entry is None or not entry.get("address") or not machine.running:
            return
        done = set(entry.get("forwarded", [22]))
        for port in sorted(ports - done):
            try:
                machine.forward(port, port)
            except MachineError as exc:
                log.warning("%s", exc)
                continue
            done.add(port)
        entry["forwarded"] = sorted(done)
        self.save()

    def address(self, instance_id: str) -> str | None:
        """Return the instance's public address (its loopback address on the host), None without one."""
        return self.instances.get(instance_id, {}).get("address")

    def is_stopping(self, instance_id: str) -> bool:
        return instance_id in self._stopping

    def begin_stop(self, instance_id: str) -> None:
        """Mark an instance as halting (so its machine's end is not taken for a crash)."""
        self._stopping.add(instance_id)

    def stop(self, instance_id: str, *, clean: bool = True) -> None:
        """Halt an instance's machine, keeping its root tree (StopInstances; slow: run off the lock)."""
        self._stopping.add(instance_id)
        try:
            self._machine(instance_id).stop(clean=clean, keep_state=True, grace=30)
        finally:
            self._stopping.discard(instance_id)

    def start(self, instance_id: str, attachments: Sequence[Attachment]) -> None:
        """Start a stopped instance's machine again, with the data volumes now attached to it."""
        self.instances[instance_id]["forwarded"] = [22]
        try:
            Machine.resume(
                instance_id,
                disks=[self._disk(a) for a in attachments],
                state_root=self.machines_root,
            )
        except (MachineError, OSError) as exc:
            raise DataPlaneError("Server.InternalError", f"{instance_id} failed to start: {exc}") from exc

    def terminate(self, instance_id: str) -> None:
        """Remove an instance's machine; its root tree stays with its root volume if that survives."""
        entry = self.instances.pop(instance_id, None)
        machine = self._machine(instance_id)
        machine.stop(keep_state=True)
        root_volume = (entry or {}).get("root_volume")
        upper = machine.state / "rw" / "upper"
        if root_volume in self.volumes and upper.is_dir():
            kept = self.root / "volumes" / f"{root_volume}.tree"
            upper.rename(kept)
            self.volumes[root_volume].pop("instance", None)
            self.volumes[root_volume]["tree"] = str(kept)
        shutil.rmtree(machine.state, ignore_errors=True)
        self.save()
        self.prune_networks()

    def running(self) -> dict[str, bool]:
        """Return, for each instance with a machine, whether the machine lives."""
        return {i: self._machine(i).running for i in self.instances}

    def console(self, instance_id: str) -> str:
        return self._machine(instance_id).console_tail(5000) if instance_id in self.instances else ""

    def shutdown(self) -> None:
        """Stop every machine, keeping their state (the sandbox is being stopped)."""
        for instance_id in list(self.instances):
            self._machine(instance_id).stop(clean=True, keep_state=True, grace=10)
        vpcnet.remove_networks(self.network_prefix)

    # ------------------------------------------------------------ status

    def usage(self) -> dict[str, Any]:
        """Return what the data plane holds and uses on this host right now."""
        return {
            "machines": sorted(i for i, up in self.running().items() if up),
            "volumes": sorted(self.volumes),
            "snapshots": sorted(self.snapshots),
            "loop_devices": self.loop_devices(),
            "mounts": self.mounts(),
            "networks": vpcnet.networks(self.network_prefix),
            "bytes_on_disk": _disk_usage(self.root),
        }

    @staticmethod
    def empty_usage() -> dict[str, Any]:
        return {
            "machines": [],
            "volumes": [],
            "snapshots": [],
            "loop_devices": [],
            "mounts": [],
            "networks": [],
            "bytes_on_disk": 0,
        }

    def loop_devices(self) -> list[str]:
        """Return the host's loop devices backed by a file of this sandbox."""
        done = subprocess.run(
            ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True, check=False
        )
        return sorted(
            line.split()[0]
            for line in done.stdout.splitlines()
            if len(line.split()) > 1 and line.split(None, 1)[1].startswith(str(self.root))
        )

    def mounts(self) -> list[str]:
        """Return the host's mount points under this sandbox's directory."""
        root = str(self.root)
        mounts = (line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines())
        return sorted(m for m in mounts if m.startswith(root))

    # ------------------------------------------------------------ helpers

    def _machine(self, instance_id: str) -> Machine:
        return Machine(instance_id, self.machines_root / instance_id)

    def _data_volume(self, volume_id: str) -> dict[str, Any]:
        entry = self.volumes.get(volume_id)
        if entry is None:
            raise DataPlaneError("InternalError", f"the sandbox holds no data for {volume_id}")
        if "file" not in entry:
            raise DataPlaneError(
                "UnsupportedOperation", f"{volume_id} is a root filesystem; the sandbox plugs in only data volumes"
            )
        return entry

    def _disk(self, attachment: Attachment) -> Disk:
        entry = self._data_volume(attachment.volume_id)
        return Disk(Path(entry["file"]), device_node(attachment.device), attachment.volume_id)

    def _root_tree(self, volume_id: str) -> Path:
        entry = self.volumes[volume_id]
        if "instance" in entry:
            return self.machines_root / str(entry["instance"]) / "rw" / "upper"
        return Path(str(entry.get("tree", self.root / "volumes" / f"{volume_id}.tree")))

    def _flush(self, volume_id: str) -> None:
        """Write what the loop device of an attached volume still caches to its file."""
        back = self.volumes[volume_id]["file"]
        done = subprocess.run(["losetup", "-j", back, "-n", "-O", "NAME"], capture_output=True, text=True, check=False)
        for loop in done.stdout.split():
            fd = os.open(loop, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _address(self) -> str:
        # Another sandbox on the same host (a second state directory) counts from 0 too:
        # skip an address whose SSH port something already listens on.
        while True:
            index = self.next_address
            self.next_address += 1
            address = f"{ADDRESS_NET}.{index // 250}.{index % 250 + 2}"
            if address_free(address):
                return address


def address_free(address: str, port: int = 22) -> bool:
    """Return whether nothing on this host listens on ``address``:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _copy_sparse(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(part)], check=True, capture_output=True)
    part.rename(target)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a root tree with everything overlayfs needs: owners, modes, xattrs, whiteouts, links."""
    part = target.with_name(f".{target.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(part)], check=True, capture_output=True)
    part.rename(target)


def _disk_usage(root: Path) -> int:
    total = 0
    for path in _walk_files(root):
        with contextlib.suppress(OSError):
            total += path.lstat().st_blocks * 512
    return total


def _walk_files(root: Path) -> Iterator[Path]:
    for directory, _, files in os.walk(root):
        for name in files:
            yield Path(directory) / name

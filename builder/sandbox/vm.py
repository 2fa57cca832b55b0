"""The boot check: a provisioned machine's root booted as a real VM.

A local machine has no udev and no boot-time fstab processing, so it cannot show that
an instance of the role AMI mounts its volume at boot and starts the services after it.
This boots the same root under qemu (software emulation here: no KVM) with Debian's
cloud kernel (direct kernel boot; NVMe and ext4 are built in, so no initrd), the root as
one NVMe disk and the data volume as a second, hot-plugged after boot has begun, the way
a volume may still be arriving while an EC2 instance boots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError, EnvironmentProblem
from builder.sandbox.host import require_root, require_tools
from builder.sandbox.machine import free_port, nocloud_seed
from builder.sandbox.rootfs import DEFAULT_CACHE

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
NETWORK_UNIT = "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n"


@dataclass(frozen=True)
class Kernel:
    """Debian's cloud kernel, unpacked (never installed on the host)."""

    version: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/<version>


@dataclass
class VM:
    """A running qemu VM; stop() ends it and removes its files."""

    process: subprocess.Popen[bytes]
    workdir: Path
    ssh_address: str
    ssh_port: int
    monitor: Path
    serial: Path

    def hmp(self, command: str) -> str:
        """Send a human-monitor command to qemu; return its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.monitor))
            sock.settimeout(10)
            _qmp_read(sock)
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            _qmp_read(sock)
            request = {"execute": "human-monitor-command", "arguments": {"command-line": command}}
            sock.sendall(json.dumps(request).encode() + b"\n")
            return str(_qmp_read(sock).get("return", ""))

    def attach_data_volume(self) -> None:
        """Hot-plug the data volume (defined at start as drive ``data``) as an NVMe disk."""
        answer = self.hmp("device_add nvme,drive=data,serial=ebsroledata,bus=rp1,id=datavol")
        if answer.strip():
            raise BuildError(f"qemu could not plug the data volume: {answer.strip()}")

    def console(self) -> str:
        """Return what the VM has printed on its serial console so far, without colours."""
        try:
            return ANSI.sub("", self.serial.read_text(errors="replace"))
        except OSError:
            return ""

    def serial_tail(self, lines: int = 30) -> str:
        """Return the last lines of the VM's serial console."""
        return "\n".join(self.console().splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the VM and remove its disk images."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _qmp_read(sock: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    for line in data.decode().splitlines():
        message: dict[str, object] = json.loads(line)
        if "event" not in message:
            return message
    return _qmp_read(sock)


def ensure_kernel(cache_dir: Path = DEFAULT_CACHE) -> Kernel:
    """Return Debian's cloud kernel, downloading and unpacking it on first use."""
    root = cache_dir / "kernel"
    for vmlinuz in sorted(root.glob("*/boot/vmlinuz-*")):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        return Kernel(version, vmlinuz, vmlinuz.parent.parent / "lib/modules" / version)
    require_tools(**{"apt-get": "apt", "dpkg-deb": "dpkg"})
    with tempfile.TemporaryDirectory() as tmp:
        package = _kernel_package()
        download = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False
        )
        if download.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            download = subprocess.run(
                ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False
            )
        if download.returncode != 0:
            raise EnvironmentProblem(f"cannot download {package}: {download.stderr.strip()[-300:]}")
        deb = next(Path(tmp).glob("*.deb"))
        target = root / package
        work = root / f".{package}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], check=True)
        work.rename(target)
    return ensure_kernel(cache_dir)


def _kernel_package() -> str:
    depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=False)
    for line in depends.stdout.splitlines():
        word = line.strip().removeprefix("Depends: ")
        if word.startswith("linux-image-") and word != KERNEL_PACKAGE:
            return word
    raise EnvironmentProblem(f"apt knows no {KERNEL_PACKAGE}", hint="run apt-get update")


@contextlib.contextmanager
def _overlay(layers: list[Path], upper: Path, work: Path) -> Iterator[Path]:
    """Mount ``upper`` (written) over ``layers`` (read only, topmost first); yield the merged root."""
    merged, scratch = work / "merged", work / "overlay-work"
    merged.mkdir()
    scratch.mkdir()
    lower = ":".join(str(p) for p in layers)
    options = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=False)


def root_image(layers: list[Path], kernel: Kernel, user_data: str, workdir: Path, size_gib: int = 4) -> Path:
    """Make an ext4 disk image of the root ``layers`` (topmost first), ready to boot as a VM.

    Adds the kernel's modules, a root line in fstab (the provisioned data line kept),
    DHCP on eth0 through systemd-networkd, and a fresh NoCloud seed (a new instance).
    The layers are only read: what the VM needs goes into a layer of its own.
    """
    extra = workdir / "vm-layer"
    fstab = next((p / "etc/fstab" for p in layers if (p / "etc/fstab").exists()), None)
    lines = [line for line in (fstab.read_text().splitlines() if fstab else []) if line.split()[1:2] != ["/"]]
    _write(extra / "etc/fstab", "\n".join(["/dev/nvme0n1 / ext4 defaults 0 1", *lines]) + "\n")
    # usr/lib, never lib: a real lib/ in an upper layer would hide the /lib -> usr/lib link.
    shutil.copytree(kernel.modules, extra / "usr/lib/modules" / kernel.version, symlinks=True)
    _write(extra / "etc/systemd/network/10-eth0.network", NETWORK_UNIT)
    wants = extra / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/systemd-networkd.service")
    for name, text in nocloud_seed("vm", user_data).items():
        _write(extra / "var/lib/cloud/seed/nocloud" / name, text)
    image = workdir / "root.img"
    with _overlay(layers, extra, workdir) as merged:
        subprocess.run(["chroot", str(merged), "depmod", "-a", kernel.version], check=True)
        with image.open("wb") as handle:
            handle.truncate(size_gib * 1024**3)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(merged), str(image)], check=True)
    return image


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def boot(
    layers: list[Path],
    data_image: Path,
    user_data: str,
    *,
    ssh_address: str = "127.0.0.1",
    forward: tuple[int, ...] = (),
    cache_dir: Path = DEFAULT_CACHE,
    workdir: Path | None = None,
) -> tuple[VM, dict[int, int]]:
    """Boot ``layers`` as a VM with ``data_image`` ready to hot-plug; return it and the forwarded ports.

    ``forward`` lists guest TCP ports to reach from the host (22 always is). The VM
    uses a copy of nothing: the root image is made fresh, the data image is used in
    place (as the volume it is).
    """
    require_root("the boot check")
    require_tools(**{"qemu-system-x86_64": "qemu-system-x86", "mkfs.ext4": "e2fsprogs"})
    kernel = ensure_kernel(cache_dir)
    work = Path(tempfile.mkdtemp(prefix="ebsrole-vm-", dir=workdir))
    try:
        image = root_image(layers, kernel, user_data, work)
        ports = {port: free_port(ssh_address) for port in (22, *forward)}
        fwd = ",".join(f"hostfwd=tcp:{ssh_address}:{host}-:{guest}" for guest, host in ports.items())
        monitor, serial = work / "qmp.sock", work / "serial.log"
        command = [
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1536",
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-kernel",
            str(kernel.vmlinuz),
            "-append",
            "root=/dev/nvme0n1 rw console=ttyS0 net.ifnames=0 panic=-1",
            "-drive",
            f"file={image},format=raw,if=none,id=root,cache=unsafe",
            "-device",
            "nvme,drive=root,serial=ebsroleroot",
            "-drive",
            f"file={data_image},format=raw,if=none,id=data",
            "-device",
            "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-nic",
            f"user,model=virtio-net-pci,{fwd}",
            "-qmp",
            f"unix:{monitor},server=on,wait=off",
            "-serial",
            f"file:{serial}",
        ]
        with open(os.devnull, "rb") as null:
            process = subprocess.Popen(command, stdin=null, stdout=null, stderr=subprocess.PIPE, start_new_session=True)
        vm = VM(process, work, ssh_address, ports[22], monitor, serial)
        _wait_for_socket(vm)
        return vm, ports
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _wait_for_socket(vm: VM) -> None:
    deadline = time.monotonic() + 30
    while not vm.monitor.exists():
        if vm.process.poll() is not None:
            err = vm.process.stderr.read().decode() if vm.process.stderr else ""
            raise BuildError(f"qemu exited {vm.process.returncode}: {err.strip()[-500:]}")
        if time.monotonic() > deadline:
            vm.stop()
            raise BuildError("qemu did not start within 30 s")
        time.sleep(0.05)

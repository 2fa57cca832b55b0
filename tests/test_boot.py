"""The boot check: a provisioned web root booted as a real VM mounts its volume from fstab
and starts Apache only after it; without the RequiresMountsFor drop-in it does not. Booted
without its volume, it goes live when the volume is hot-added later (real udev), grown to
the volume's size, and stops Apache before the unmount when the volume goes."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.keys import KeyPair
from builder.remote import Remote
from builder.roles import load_role
from builder.sandbox import vm
from builder.userdata import builder_user_data
from tests.machines import boot, leftovers, needs_root, next_address

pytestmark = [needs_root, pytest.mark.slow]

DROPIN = "etc/systemd/system/apache2.service.d/ebsrole-data.conf"
RULE = "etc/udev/rules.d/90-ebsrole-data.rules"


@pytest.fixture(scope="module")
def provisioned_web(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A web machine provisioned, then halted cleanly; yields (its upper layer, the data volume image)."""
    state_root = tmp_path_factory.mktemp("boot") / "machines"
    booted = boot("b-web", rootfs, state_root, role=load_role("web"))
    try:
        booted.provision()
        booted.sh('printf \'<?php echo "served from " . realpath(__FILE__) . "\\n"; ?>\\n\' > /var/www/html/where.php')
        booted.verify()
    finally:
        booted.remote.close()
        booted.machine.stop(clean=True, keep_state=True)
    assert [x for x in leftovers(booted.machine) if not x.startswith("state dir")] == []
    yield booted.machine.state / "rw" / "upper", booted.disk.image


def boot_and_plug_late(layers: list[Path], image: Path, tmp_path: Path) -> tuple[vm.VM, Remote, int]:
    """Boot the VM, plug the data volume once sshd has started (services start with it), log in.

    Returns the VM, the logged-in session and the host port forwarded to the VM's port 80;
    the caller stops the VM (and closes the session)."""
    login, host_key = KeyPair.generate("boot"), KeyPair.generate("boot-host")
    machine, ports = vm.boot(
        layers, image, builder_user_data(login, host_key), ssh_address=next_address(), forward=(80,), workdir=tmp_path
    )
    try:
        deadline = time.monotonic() + 300
        while "Started ssh.service" not in machine.console():
            assert time.monotonic() < deadline, f"VM did not start sshd:\n{machine.serial_tail()}"
            assert machine.process.poll() is None, f"qemu exited:\n{machine.serial_tail()}"
            time.sleep(0.2)
        machine.attach_data_volume()
        remote = Remote.connect(machine.ssh_address, machine.ssh_port, "admin", login, host_key, deadline=240)
        remote.check("sudo -n systemctl is-system-running --wait || true", timeout=300)
        return machine, remote, ports[80]
    except BaseException:
        machine.stop()
        raise


def _monotonic(remote: Remote, unit: str, what: str = "ActiveEnterTimestampMonotonic") -> int:
    return int(remote.check(f"systemctl show -p {what} --value {unit}").stdout.strip() or 0)


def test_volume_mounts_at_boot_and_apache_waits_for_it(
    provisioned_web: tuple[Path, Path], rootfs: Path, tmp_path: Path
) -> None:
    upper, image = provisioned_web
    machine, remote, http = boot_and_plug_late([upper, rootfs], image, tmp_path)
    try:
        assert remote.check("findmnt -n -o SOURCE /data").stdout.strip().startswith("/dev/nvme1n1")
        assert remote.check("systemctl is-active apache2").stdout.strip() == "active"
        assert _monotonic(remote, "apache2.service") > _monotonic(remote, "data.mount")
        with urllib.request.urlopen(f"http://{machine.ssh_address}:{http}/where.php", timeout=30) as response:
            assert response.read().decode().strip() == "served from /data/var/www/html/where.php"
    finally:
        remote.close()
        machine.stop()


def test_without_the_dropin_apache_starts_before_the_volume(
    provisioned_web: tuple[Path, Path], rootfs: Path, tmp_path: Path
) -> None:
    upper, image = provisioned_web
    # Without the hot-attach rule too: it would start Apache again once the volume is mounted.
    removed = {path: (upper / path).read_text() for path in (DROPIN, RULE)}
    for path in removed:
        (upper / path).unlink()
    try:
        machine, remote, _ = boot_and_plug_late([upper, rootfs], image, tmp_path)
        try:
            assert remote.check("findmnt -n -o SOURCE /data").stdout.strip().startswith("/dev/nvme1n1")
            state = remote.run("systemctl is-active apache2").stdout.strip()
            assert state != "active", "Apache started on dangling symlinks and should have failed"
            assert _monotonic(remote, "apache2.service", "InactiveExitTimestampMonotonic") < _monotonic(
                remote, "data.mount"
            )
        finally:
            remote.close()
            machine.stop()
    finally:
        for path, text in removed.items():
            (upper / path).write_text(text)


def _wait(remote: Remote, command: str, want: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (seen := remote.run(command).stdout.strip()) != want:
        assert time.monotonic() < deadline, f"{what}: {command!r} says {seen!r} after {timeout:.0f} s"
        time.sleep(1)


def test_volume_attached_after_boot_goes_live_grown_and_stops_services_first(
    provisioned_web: tuple[Path, Path], rootfs: Path, tmp_path: Path
) -> None:
    """Boot without the data volume (data.mount fails, Apache stays down), then hot-add it, 1 GiB
    larger than its filesystem: real udev's rule starts ebsrole-data-live, which grows the
    filesystem, mounts it and starts Apache. Stopping the unit, and unplugging the volume, stop
    Apache before the unmount."""
    upper, seed = provisioned_web
    image = tmp_path / "restored.img"
    subprocess.run(["cp", "--sparse=always", str(seed), str(image)], check=True)
    before = image.stat().st_size
    os.truncate(image, before + 1024**3)  # a restore onto a volume larger than the snapshot
    login, host_key = KeyPair.generate("boot"), KeyPair.generate("boot-host")
    machine, ports = vm.boot(
        [upper, rootfs],
        image,
        builder_user_data(login, host_key),
        ssh_address=next_address(),
        forward=(80,),
        workdir=tmp_path,
    )
    try:
        remote = Remote.connect(machine.ssh_address, machine.ssh_port, "admin", login, host_key, deadline=300)
        sudo = "sudo -n "
        # Boot ends without the volume: its device times out (90 s), data.mount and Apache are down.
        remote.check(sudo + "systemctl is-system-running --wait || true", timeout=400)
        assert remote.run("findmnt -n /data").stdout.strip() == ""
        assert remote.run("systemctl is-active apache2").stdout.strip() != "active"

        machine.attach_data_volume()
        _wait(remote, "systemctl is-active apache2", "active", 120, "Apache after the hot attach")
        assert remote.check("findmnt -n -o SOURCE /data").stdout.strip().startswith("/dev/nvme1n1")
        with urllib.request.urlopen(f"http://{machine.ssh_address}:{ports[80]}/where.php", timeout=30) as response:
            assert response.status == 200
            assert response.read().decode().strip() == "served from /data/var/www/html/where.php"
        size = int(remote.check("df -B1 --output=size /data | tail -n 1").stdout)
        # Ungrown, df shows less than the snapshot's volume (ext4's own overhead); grown, more.
        assert size > before, f"/data is {size} bytes, its snapshot's volume {before}: not grown"
        journal = remote.check(sudo + "journalctl -b -u ebsrole-data-grow -u ebsrole-data-live --no-pager").stdout
        assert "grown from" in journal, journal

        remote.check(sudo + "systemctl stop ebsrole-data-live")
        assert remote.run("systemctl is-active apache2").stdout.strip() != "active"
        assert remote.run("findmnt -n /data").stdout.strip() == ""
        stopped = _monotonic(remote, "apache2.service", "InactiveEnterTimestampMonotonic")
        assert 0 < stopped < _monotonic(remote, "data.mount", "InactiveEnterTimestampMonotonic")

        # Unplugged while live: systemd stops the mount it binds to; Apache goes first.
        remote.check(sudo + "systemctl start ebsrole-data-live")
        assert remote.check("systemctl is-active apache2").stdout.strip() == "active"
        answer = machine.hmp("device_del datavol")
        assert not answer.strip(), answer
        _wait(remote, "findmnt -n /data || true", "", 60, "the unmount after the unplug")
        assert remote.run("systemctl is-active apache2").stdout.strip() != "active"
        assert remote.run("systemctl is-active ebsrole-data-live").stdout.strip() != "active"
        stopped = _monotonic(remote, "apache2.service", "InactiveEnterTimestampMonotonic")
        assert 0 < stopped <= _monotonic(remote, "data.mount", "InactiveEnterTimestampMonotonic")
        remote.close()
    finally:
        machine.stop()

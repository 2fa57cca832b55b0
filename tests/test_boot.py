"""The boot check: a provisioned web root booted as a real VM mounts its volume from fstab
and starts Apache only after it; without the RequiresMountsFor drop-in it does not."""

from __future__ import annotations

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


def _boot_and_plug_late(layers: list[Path], image: Path, tmp_path: Path) -> tuple[vm.VM, Remote, int]:
    """Boot the VM, plug the data volume once sshd has started (services start with it), log in."""
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
    machine, remote, http = _boot_and_plug_late([upper, rootfs], image, tmp_path)
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
    (upper / DROPIN).unlink()
    machine, remote, _ = _boot_and_plug_late([upper, rootfs], image, tmp_path)
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

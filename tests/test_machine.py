"""Local Debian machines: real systemd, real sshd with the pinned host key, real block devices, nothing left."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.errors import HostKeyMismatch, MachineError, SSHAuthFailed
from builder.keys import KeyPair
from builder.remote import Remote
from builder.sandbox.machine import Disk, Machine, make_image
from tests.machines import VOLUME_ID, boot, leftovers, machine_name, needs_root

pytestmark = [needs_root, pytest.mark.slow]


def test_machine_boots_like_an_instance(rootfs: Path, state_root: Path) -> None:
    started = time.monotonic()
    booted = boot("m-boot", rootfs, state_root)
    try:
        machine = booted.machine
        assert machine.running
        assert booted.sh("systemctl is-system-running --wait").stdout.strip() == "running"
        assert booted.sh("cat /proc/1/comm").stdout.strip() == "systemd"
        # systemctl is the real thing, not a chroot's "ignoring" no-op: ssh has a live main PID.
        pid = booted.sh("systemctl show -p MainPID --value ssh").stdout.strip()
        assert pid != "0" and booted.sh(f"test -d /proc/{pid}", check=False).exit_status == 0
        booted.sh("systemctl start systemd-hostnamed")
        assert booted.sh("systemctl is-active systemd-hostnamed").stdout.strip() == "active"
        # cloud-init ran for real from the NoCloud seed, with the default user admin.
        assert booted.sh("cloud-init status --wait").stdout.strip().endswith("done")
        assert booted.remote.check("id -un").stdout.strip() == "admin"
        assert booted.remote.check("sudo -n true").exit_status == 0
        # The data volume is a real block device under its EC2 names.
        assert (
            booted.sh(
                "test -b /dev/xvdf && readlink -f /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
                + VOLUME_ID.replace("-", "")
            ).stdout.strip()
            == "/dev/xvdf"
        )
        assert booted.sh("blockdev --getsize64 /dev/xvdf").stdout.strip() == str(2 * 1024**3)
        print(f"machine up and logged in after {time.monotonic() - started:.2f} s")
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_wrong_host_key_is_refused_at_once(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-hostkey", rootfs, state_root)
    try:
        started = time.monotonic()
        with pytest.raises(HostKeyMismatch) as caught:
            Remote.connect(
                *booted.machine.ssh_endpoint, "admin", booted.login, KeyPair.generate("impostor"), deadline=60
            )
        assert time.monotonic() - started < 10, "a host key mismatch must not be retried"
        assert "refusing" in caught.value.render()
        with pytest.raises(SSHAuthFailed):
            Remote.connect(
                *booted.machine.ssh_endpoint, "admin", KeyPair.generate("other"), booted.host_key, deadline=60
            )
    finally:
        booted.machine.stop()


def test_hot_attach_and_detach(rootfs: Path, state_root: Path, tmp_path: Path) -> None:
    booted = boot("m-attach", rootfs, state_root)
    try:
        extra = make_image(tmp_path / "extra.img", 1)
        booted.machine.attach(Disk(extra, "xvdg", "vol-0fedcba9876543210"))
        out = booted.sh(
            "mkfs.ext4 -q /dev/xvdg && mount /dev/xvdg /mnt && echo hi > /mnt/f && umount /mnt && "
            "readlink /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210"
        ).stdout
        assert out.strip() == "../../xvdg"
        booted.machine.detach("xvdg")
        assert booted.sh("test -e /dev/xvdg", check=False).exit_status != 0
        assert str(extra) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_machine_cannot_reach_host_devices(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-contain", rootfs, state_root)
    try:
        assert booted.sh("mknod /tmp/sda b 8 0", check=False).exit_status != 0, "CAP_MKNOD must be dropped"
        assert booted.sh("touch /sys/ebsrole-test", check=False).exit_status != 0, "/sys must be read-only"
        assert booted.sh("echo 1 > /proc/sys/vm/drop_caches", check=False).exit_status != 0
        host_disk = next(p for p in ("/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop-control") if Path(p).exists())
        # A devtmpfs would show every host device; the device cgroup must still deny them.
        probe = booted.sh(
            f"mkdir -p /run/d && mount -t devtmpfs devtmpfs /run/d && head -c 1 /run/d/{Path(host_disk).name}",
            check=False,
        )
        assert probe.exit_status != 0, f"read {host_disk} of the host from inside the machine"
    finally:
        booted.machine.stop()
    assert Path(host_disk).exists() and Path("/etc/passwd").exists()
    assert (rootfs / "etc/passwd").exists(), "the cached tree must never change"
    assert leftovers(booted.machine) == []


def test_stop_leaves_nothing_even_when_killed_hard(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-stop", rootfs, state_root)
    booted.sh("mkfs.ext4 -q /dev/xvdf && mkdir -p /data && mount /dev/xvdf /data && sleep 0.1")
    booted.remote.close()
    booted.machine.stop()  # PID 1 killed with the volume mounted
    assert leftovers(booted.machine) == []


def test_a_killed_machines_cgroups_do_not_stop_the_next_of_its_name(rootfs: Path, state_root: Path) -> None:
    """A supervisor killed with its machine leaves the machine's cgroups behind, children included."""
    from builder.sandbox.machine import _cgroup_dirs

    name = machine_name("m-stale")  # the name boot() gives the machine
    for top in _cgroup_dirs(name):
        if top is not None:
            (top / "payload").mkdir(parents=True)
    booted = boot("m-stale", rootfs, state_root)
    try:
        assert booted.machine.name == name
        assert booted.sh("true").exit_status == 0
    finally:
        booted.machine.stop()
    assert not any(top is not None and top.exists() for top in _cgroup_dirs(name))


def test_failed_start_says_why_and_cleans_up(state_root: Path, tmp_path: Path) -> None:
    not_a_tree = tmp_path / "empty"
    not_a_tree.mkdir()
    with pytest.raises(MachineError, match="not a root tree"):
        Machine.start("m-bad", [not_a_tree], user_data="#cloud-config\n", state_root=state_root)
    assert not (state_root / "m-bad").exists()


def test_missing_root_says_so(tmp_path: Path) -> None:
    project = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {project!r})\n"
        "from builder.sandbox.machine import Machine\n"
        "from builder.errors import BuildError\n"
        "try:\n    Machine.start('x', [], user_data='')\n"
        "except BuildError as e:\n    print(e.exit_code, e.render())\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    assert done.stdout.startswith("7 a local machine needs root"), done.stdout + done.stderr
    assert "sudo" in done.stdout


def test_missing_tool_names_its_debian_package() -> None:
    from builder.errors import EnvironmentProblem
    from builder.sandbox.host import require_tools

    require_tools(debootstrap="debootstrap", losetup="mount")  # present: no error
    with pytest.raises(EnvironmentProblem) as caught:
        require_tools(**{"ebsrole-no-such-tool": "ebsrole-tools", "losetup": "mount", "ebsrole-other": "ebsrole-more"})
    assert caught.value.exit_code == 7
    assert caught.value.render() == (
        "missing ebsrole-no-such-tool, ebsrole-other\n"
        "hint: install it: apt-get install ebsrole-more ebsrole-tools (or run scripts/setup.sh)"
    )

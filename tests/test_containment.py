"""Root in a local machine is root of its own user namespace only: not root of the host.

Each check is what an attacker with root in a machine (user-data runs as root) would try.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from builder.sandbox.machine import UID_BASE
from tests.machines import boot, leftovers, needs_root

pytestmark = [needs_root, pytest.mark.slow]


def test_root_in_a_machine_is_an_unprivileged_uid_of_the_host(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-userns", rootfs, state_root)
    try:
        leader = booted.machine.leader
        assert leader is not None
        status = Path(f"/proc/{leader}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids == [str(UID_BASE)] * 4, "systemd of the machine must not be uid 0 of the host"
        assert booted.sh("id -u").stdout.strip() == "0"
        assert booted.sh("cat /proc/self/uid_map").stdout.split() == ["0", str(UID_BASE), "65536"]
        # What root writes in its root tree is owned by root on disk (idmapped), not by the
        # shifted uid: root volumes, their snapshots and images stay portable.
        booted.sh("echo x > /root/made-inside && chown 1000:1000 /root/made-inside")
        made = booted.machine.state / "rw/upper/root/made-inside"
        assert (made.stat().st_uid, made.stat().st_gid) == (1000, 1000)
        assert (booted.machine.state / "rw/upper/root").stat().st_uid == 0
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_root_in_a_machine_cannot_read_host_files(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-files", rootfs, state_root)
    secret = secrets.token_hex(16)
    try:
        leader = booted.machine.leader
        # A host file that reaches the machine anyway (here: put in its /dev, a host tmpfs, by
        # the host, as a careless bind would): owned by the host's root, mode 0600.
        planted = Path(f"/proc/{leader}/root/dev/host-secret")
        planted.write_text(secret)
        planted.chmod(0o600)
        assert os.stat(planted).st_uid == 0
        probe = booted.sh("cat /dev/host-secret", check=False)
        assert probe.exit_status != 0 and secret not in probe.stdout
        assert "Permission denied" in probe.stderr
        # The host's own files are not in its view at all: /proc/1 is the machine's systemd.
        host_file = Path("/root") / f"ebsrole-containment-{secret[:8]}"
        host_file.write_text(secret)
        host_file.chmod(0o600)
        try:
            seen = booted.sh(f"cat /proc/1/root/root/{host_file.name} /root/{host_file.name}", check=False)
            assert seen.exit_status != 0 and secret not in seen.stdout
        finally:
            host_file.unlink()
        assert booted.sh("cat /proc/1/root/etc/hostname").stdout.strip() == booted.machine.name
        # Root's capabilities reach nothing the user namespace does not own: no chattr +i
        # (CAP_LINUX_IMMUTABLE counts only in the host's namespace), no device nodes.
        assert booted.sh("mknod /tmp/sda b 8 0", check=False).exit_status != 0
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_root_in_a_machine_cannot_reach_host_block_devices(rootfs: Path, state_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 1024 * 1024)
    loop = subprocess.run(["losetup", "--find", "--show", str(other)], capture_output=True, text=True, check=True)
    other_loop = loop.stdout.strip()
    booted = boot("m-blocks", rootfs, state_root)
    try:
        host_disk = next(p for p in ("/dev/vda", "/dev/sda", "/dev/nvme0n1") if Path(p).exists())
        # A devtmpfs (every host device) cannot be mounted in a user namespace,
        probe = booted.sh("mkdir -p /run/d && mount -t devtmpfs devtmpfs /run/d && ls /run/d", check=False)
        assert probe.exit_status != 0, "devtmpfs mounted inside the machine"
        for device in (host_disk, other_loop):
            st = os.stat(device)
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            # nor a node made: CAP_MKNOD of the host's namespace, which the machine lacks,
            assert booted.sh(f"mknod /run/b b {major} {minor}", check=False).exit_status != 0
            # and a node the host leaked into the machine's /dev opens for nobody but its owner.
            leaked = Path(f"/proc/{booted.machine.leader}/root/dev/leaked")
            os.mknod(leaked, 0o660 | 0o060000, st.st_rdev)
            probe = booted.sh("head -c 1 /dev/leaked | wc -c; mount -t ext4 /dev/leaked /mnt", check=False)
            assert probe.stdout.strip().startswith("0") and probe.exit_status != 0
            leaked.unlink()
        # The broker mounts the machine's own volume, and nothing else (not even /dev/null as ext4).
        refused = booted.sh("mount -t ext4 /dev/null /mnt", check=False)
        assert refused.exit_status != 0 and "not a block device" in refused.stderr
        mounted = booted.sh(
            "mkfs.ext4 -q /dev/xvdf && mkdir -p /data && mount /dev/xvdf /data && echo hi > /data/f && "
            "fsfreeze --freeze /data && fsfreeze --unfreeze /data && stat -c %u /data/f && umount /data"
        )
        assert mounted.stdout.strip() == "0"
        # Its root (an overlay) gets the broker's stand-in freeze: a sync, never a freeze of the
        # host's filesystem below it, which would stop the host's and every machine's writes.
        assert booted.sh("fsfreeze --freeze /", check=False).exit_status == 0
        try:
            host_write = subprocess.run(
                ["timeout", "10", "sh", "-c", f"echo x > {state_root}/host-write && sync -f {state_root}"], check=False
            )
            assert host_write.returncode == 0, "the host's filesystem froze"
            assert booted.sh("fsfreeze --freeze /", check=False).exit_status != 0, "a second freeze is EBUSY"
        finally:
            assert booted.sh("fsfreeze --unfreeze /", check=False).exit_status == 0
        assert booted.sh("fsfreeze --unfreeze /", check=False).exit_status != 0, "a thaw of a thawed root is EINVAL"
    finally:
        booted.machine.stop()
        subprocess.run(["losetup", "-d", other_loop], check=False)
    assert leftovers(booted.machine) == []


def test_root_in_a_machine_sees_only_its_processes(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-procs", rootfs, state_root)
    try:
        inside = booted.sh("ps -e -o pid=,args=").stdout
        pids = [int(line.split()[0]) for line in inside.splitlines()]
        assert 1 in pids and str(os.getpid()) not in (line.split()[0] for line in inside.splitlines())
        assert "pytest" not in inside and "slirp4netns" not in inside
        assert booted.sh("cat /proc/1/comm").stdout.strip() == "systemd"
        # A signal to a host process: there is no pid to name it by, and kill -1 stays inside.
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            booted.sh(f"kill -9 {sleeper.pid} 2>/dev/null; true")
            assert sleeper.poll() is None, "the machine killed a host process"
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_the_host_makes_xfs_only_on_the_machines_own_unmounted_volume(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-mkfs", rootfs, state_root)
    try:
        # The machine's root cannot set a block size itself (BLKBSZSET is the host's): the real
        # mkfs.xfs fails inside, whatever the machine installed.
        booted.sh("cloud-init status --wait >/dev/null; apt-get update -q >/dev/null; apt-get install -y -q xfsprogs")
        real = booted.sh("/usr/sbin/mkfs.xfs -q /dev/xvdf", check=False)
        assert real.exit_status != 0 and "cannot set blocksize" in real.stderr, real.stderr
        assert booted.sh("blkid -p /dev/xvdf", check=False).exit_status == 2
        # Forcing, a data section elsewhere, another device: refused before anything runs.
        for command, why in (
            ("mkfs.xfs -f /dev/xvdf", "'-f' is not one the sandbox passes on"),
            ("mkfs.xfs -d name=/etc/passwd /dev/xvdf", "'-d' is not one the sandbox passes on"),
            ("mkfs.xfs -q /dev/null", "not a block device"),
        ):
            refused = booted.sh(command, check=False)
            assert refused.exit_status != 0 and why in refused.stderr, (command, refused.stderr)
        assert booted.sh("blkid -p /dev/xvdf", check=False).exit_status == 2, "a refused mkfs wrote the volume"
        booted.sh("mkfs.xfs -q -L keep -m crc=1 -- /dev/xvdf")
        assert booted.sh("blkid -p -s TYPE -s LABEL -o value /dev/xvdf").stdout.split() == ["keep", "xfs"]
        booted.sh("mkdir -p /data && mount /dev/xvdf /data && touch /data/kept")
        mounted = booted.sh("mkfs.xfs -q /dev/xvdf", check=False)
        assert mounted.exit_status != 0 and "is mounted at" in mounted.stderr
        booted.sh("umount /data")
        # Without -f, mkfs.xfs itself refuses a device that holds a filesystem.
        again = booted.sh("mkfs.xfs -q -L other /dev/xvdf", check=False)
        assert again.exit_status != 0 and "existing filesystem" in again.stderr
        assert booted.sh("mount /dev/xvdf /data && ls /data").stdout.split() == ["kept"]
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []


def test_chattr_immutable_and_device_nodes_only_for_the_hosts_root(rootfs: Path, state_root: Path) -> None:
    booted = boot("m-chattr", rootfs, state_root)
    try:
        booted.sh("mkfs.ext4 -q /dev/xvdf && mkdir -p /data && mount /dev/xvdf /data && touch /data/f")
        # CAP_LINUX_IMMUTABLE and CAP_MKNOD count only in the host's user namespace: root of
        # the machine has neither, over SSH or entered from the host.
        for probe in ("chattr +i /data/f", "chattr +a /data/f", "mknod /data/null c 1 3"):
            over_ssh = booted.sh(probe, check=False)
            assert over_ssh.exit_status != 0 and "Operation not permitted" in over_ssh.stderr, probe
            assert booted.machine.exec("bash", "-c", probe, check=False).returncode != 0, probe
        flags = booted.sh("lsattr /data/f").stdout.split()[0]
        assert "i" not in flags and "a" not in flags
    finally:
        booted.machine.stop()
    assert leftovers(booted.machine) == []
    # A host_root machine (tests of what real root does): the host's exec has every capability,
    # root over SSH still has only the machine's.
    privileged = boot("m-hostroot", rootfs, state_root, host_root=True)
    try:
        privileged.sh("mkfs.ext4 -q /dev/xvdf && mkdir -p /data && mount /dev/xvdf /data && touch /data/f /data/g")
        assert privileged.sh("chattr +i /data/f", check=False).exit_status != 0
        privileged.root_sh("chattr +i /data/g && chown nobody:nogroup /data/f")
        assert "i" in privileged.sh("lsattr /data/g").stdout.split()[0]
        assert privileged.sh("stat -c %U /data/f").stdout.strip() == "nobody"
        assert privileged.sh("rm -f /data/g", check=False).exit_status != 0
        privileged.root_sh("chattr -i /data/g")
    finally:
        privileged.machine.stop()
    assert leftovers(privileged.machine) == []

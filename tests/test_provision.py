"""The rendered scripts on real Debian machines: over SSH with a pinned host key, real
systemd, a real block device. Nothing here is mocked."""

from __future__ import annotations

import calendar
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from builder.errors import SSHError
from builder.remote import Remote
from builder.roles import load_role
from builder.sandbox.machine import Disk
from tests.conftest import MINI_ROLE
from tests.machines import VOLUME_ID, Booted, boot, leftovers, needs_root

pytestmark = [needs_root, pytest.mark.slow]

WEB_PATHS = ("/etc/apache2", "/etc/php", "/var/www")

# Test content with everything a move must keep: owners, modes, setgid, ACLs (access and
# default), xattrs, hard links, symlinks, a fifo, old times, names with spaces and quotes.
FILL_WEB = r"""
set -e
apt-get install -y -q acl >/dev/null
cd /var/www/html
mkdir -p "dir with space" private
printf '<?php echo "served from " . realpath(__FILE__) . "\n"; ?>\n' > where.php
echo data > "dir with space/it's \"quoted\".txt"
ln index.html hardlink.html
ln -s index.html symlink.html
ln -s /nowhere dangling
mkfifo pipe
chown -R www-data:www-data private && chmod 2750 private
echo secret > private/key && chmod 0640 private/key && chown www-data:adm private/key
setfacl -m u:nobody:rwx "dir with space"
setfacl -d -m g:adm:rx "dir with space"
python3 -c 'import os; os.setxattr("index.html", "user.ebsrole", b"kept"); os.setxattr("private", "user.dir", b"x")'
touch -h -d '2001-02-03 04:05:06' symlink.html
touch -d '2001-02-03 04:05:06' "dir with space/it's \"quoted\".txt" private
echo 'ServerName localhost' > /etc/apache2/conf-available/servername.conf
a2enconf -q servername
"""


def install_packages(booted: Booted, packages: tuple[str, ...]) -> None:
    booted.sh(
        "cloud-init status --wait >/dev/null; apt-get update -q >/dev/null && "
        f"apt-get install -y -q {' '.join(packages)} >/dev/null"
    )


@pytest.fixture(scope="module")
def web(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Booted, list[str]]]:
    """A web machine provisioned once; yields it with the manifest of its trees from before."""
    state_root = tmp_path_factory.mktemp("web") / "machines"
    role = load_role("web")
    booted = boot("p-web", rootfs, state_root, role=role)
    try:
        install_packages(booted, role.packages)
        booted.sh(FILL_WEB)
        booted.sh("systemctl stop apache2")  # no writes while the trees are listed
        before = booted.manifest(*WEB_PATHS)
        booted.provision()
        yield booted, before
    finally:
        booted.machine.stop()
        assert leftovers(booted.machine) == []


def test_web_paths_move_onto_the_volume_with_everything_kept(web: tuple[Booted, list[str]]) -> None:
    booted, before = web
    for path in WEB_PATHS:
        assert booted.sh(f"readlink {path}").stdout.strip() == f"/data{path}"
    assert booted.sh("findmnt -n -o SOURCE /data").stdout.strip() == "/dev/xvdf"
    after = booted.manifest(*WEB_PATHS)
    assert len(before) > 250
    assert after == before
    assert any("user.ebsrole=" + b"kept".hex() in line for line in after)
    assert any("user:65534:rwx" in line and "default:group:4:r-x" in line for line in after)  # nobody, adm


def test_apache_serves_php_from_the_volume_over_http(web: tuple[Booted, list[str]]) -> None:
    booted, _ = web
    port = booted.machine.forward(80)
    address, _ = booted.machine.ssh_endpoint
    with urllib.request.urlopen(f"http://{address}:{port}/where.php", timeout=20) as response:
        body = response.read().decode()
    assert body.strip() == "served from /data/var/www/html/where.php"
    assert "RequiresMountsFor=/data" in booted.sh("systemctl cat apache2").stdout


def test_verify_passes(web: tuple[Booted, list[str]]) -> None:
    booted, _ = web
    lines = [line.split("\t") for line in booted.verify().stdout.splitlines() if "\t" in line]
    assert {(kind, subject) for status, kind, subject, _ in lines if status == "ok"} == {
        ("mount", "/data"),
        ("fstab", "/data"),
        ("service", "apache2.service"),
        *(("path", p) for p in WEB_PATHS),
    }


def _system_state(booted: Booted) -> str:
    return booted.sh(
        "cat /etc/fstab; stat -c '%n %F %a %U:%G %y' /etc /etc/fstab /var /etc/apache2 /etc/php /var/www"
        " /data /data/* /data/*/* /etc/systemd/system/apache2.service.d/*; cat /etc/systemd/system/apache2.service.d/*;"
        " blkid -p /dev/xvdf; systemctl is-enabled apache2; findmnt -n /data"
    ).stdout


def test_second_run_changes_nothing(web: tuple[Booted, list[str]]) -> None:
    booted, before = web
    state = _system_state(booted)
    booted.provision()
    assert _system_state(booted) == state
    assert booted.manifest(*WEB_PATHS) == before


def test_verify_names_a_broken_symlink_and_an_unmounted_volume(web: tuple[Booted, list[str]]) -> None:
    booted, _ = web
    booted.sh("mv /data/var/www /data/var/www.away")
    result = booted.verify(check=False)
    booted.sh("mv /data/var/www.away /data/var/www")
    assert result.exit_status == 1
    assert "FAIL\tpath\t/var/www\tbroken: /data/var/www does not exist" in result.stdout
    assert "ok\tpath\t/etc/apache2" in result.stdout

    booted.sh("systemctl stop apache2 && umount /data")
    result = booted.verify(check=False)
    booted.sh("mount /dev/xvdf /data && systemctl start apache2")
    assert result.exit_status == 1
    assert "FAIL\tmount\t/data\tthe data volume is not mounted" in result.stdout
    assert "FAIL\tpath\t/etc/php\tdangling: the data volume is not mounted at /data" in result.stdout
    assert "FAIL\tservice\tapache2.service\tis inactive, not active" in result.stdout
    booted.verify()


def test_image_hygiene_leaves_no_key_host_key_or_history(web: tuple[Booted, list[str]]) -> None:
    booted, _ = web
    booted.sh("echo 'ls' > /root/.bash_history; echo 'ls' > /home/admin/.bash_history")
    booted.run_script("image-hygiene.sh")
    leftover = booted.sh(
        "ls /etc/ssh/ssh_host_* /home/*/.ssh/authorized_keys /root/.ssh/authorized_keys /root/.bash_history "
        "/home/*/.bash_history /var/lib/cloud/instance /var/lib/systemd/random-seed 2>/dev/null; "
        "ls /var/lib/apt/lists | grep -v -x -e lock -e partial -e auxfiles; wc -c < /etc/machine-id",
        check=False,
    ).stdout.split()
    assert leftover == ["0"]
    # Hot attach ships in the image: the rule on the volume's filesystem UUID, its units, the helper.
    uuid = booted.sh("blkid -p -s UUID -o value /dev/xvdf").stdout.strip()
    kept = booted.sh(
        "cat /etc/udev/rules.d/90-ebsrole-data.rules /etc/systemd/system/ebsrole-data-live.service "
        "/etc/systemd/system/ebsrole-data-grow.service /etc/systemd/system/data.mount.d/ebsrole-grow.conf "
        "/etc/ebsrole/data-live.conf && test -x /usr/local/sbin/ebsrole-data-live"
    ).stdout
    assert f'ENV{{ID_FS_UUID}}=="{uuid}"' in kept and 'ENV{SYSTEMD_WANTS}+="ebsrole-data-live.service"' in kept
    assert "ExecStop=/usr/local/sbin/ebsrole-data-live stop" in kept and "SERVICES=(apache2.service)" in kept
    # The running session survives; a new login with the temporary key does not (sshd,
    # without host keys, now refuses every connection until a new instance makes its own).
    with pytest.raises(SSHError):
        Remote.connect(*booted.machine.ssh_endpoint, "admin", booted.login, booted.host_key, deadline=3)
    booted.run_script("image-hygiene.sh")  # idempotent


# ---------------------------------------------------------------- interrupted runs


def _kill_when(booted: Booted, marker: str, delay: float = 0.0) -> Callable[[str, str], None]:
    fired = []

    def on_line(_stream: str, line: str) -> None:
        if marker in line and not fired:
            fired.append(line)
            time.sleep(delay)
            # The script's own bash and its rsync, not the SSH session that started it.
            booted.machine.exec("pkill", "-KILL", "-f", "^bash /var/tmp/k/provision.sh", check=False)
            booted.machine.exec("pkill", "-KILL", "-x", "rsync", check=False)

    on_line.fired = fired  # type: ignore[attr-defined]
    return on_line


def test_killed_at_any_point_and_run_again_loses_nothing(rootfs: Path, state_root: Path) -> None:
    role = load_role("web")
    booted = boot("p-kill", rootfs, state_root, role=role, size_gib=3)
    try:
        install_packages(booted, role.packages)
        booted.sh(FILL_WEB + "\nfor i in $(seq 60); do head -c 5M /dev/urandom > /var/www/html/big-$i; done")
        booted.sh("systemctl stop apache2")
        before = booted.manifest(*WEB_PATHS)
        script = booted.scripts["provision.sh"].text
        booted.remote.check("mkdir -p /var/tmp/k")
        booted.remote.put(script, "/var/tmp/k/provision.sh", 0o700)
        kill_points = [
            ("services: stopping", 0.0),  # before any copy
            ("/etc/apache2: copying", 0.0),  # in the first copy
            ("/etc/php -> ", 0.0),  # between two paths
            ("/var/www: copying", 0.2),  # in the middle of a 300 MB copy
        ]
        for marker, delay in kill_points:
            on_line = _kill_when(booted, marker, delay)
            result = booted.remote.run("sudo -n bash /var/tmp/k/provision.sh vol-0123456789abcdef0", on_line=on_line)
            assert on_line.fired, f"never reached {marker!r}: {result.tail()}"  # type: ignore[attr-defined]
            assert result.exit_status != 0, f"not killed at {marker!r}"
        booted.sh("ls -d /var/www /var/www.ebsrole-old /data/var/www.ebsrole-partial 2>&1", check=False)
        booted.provision()
        assert booted.manifest(*WEB_PATHS) == before
        booted.verify()

        # The two states no kill can be timed to hit: between the two renames of a swap,
        # and a finished staging copy not yet renamed into place.
        booted.sh("systemctl stop apache2; rm /var/www && cp -a /data/var/www /var/www.ebsrole-old")
        booted.sh(
            "rm /etc/php && mv /data/etc/php /data/etc/php.ebsrole-partial && cp -a /data/etc/php.ebsrole-partial /etc/php"
        )
        booted.provision()
        assert booted.manifest(*WEB_PATHS) == before
        assert (
            booted.sh("ls -d /var/www.ebsrole-old /data/etc/php.ebsrole-partial 2>/dev/null", check=False).stdout == ""
        )
        booted.verify()
    finally:
        booted.machine.stop()


# ---------------------------------------------------------------- existing volumes


def test_volume_with_a_filesystem_is_never_reformatted(
    rootfs: Path, state_root: Path, roles_dir: Path, write_role: Callable[..., Path], tmp_path: Path
) -> None:
    seed = tmp_path / "seed"
    (seed / "srv/app").mkdir(parents=True)
    (seed / "srv/app/precious.txt").write_text("do not lose me\n")
    image = tmp_path / "existing.img"
    subprocess.run(["truncate", "-s", "1G", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(seed), str(image)], check=True)
    uuid_before = subprocess.run(
        ["blkid", "-p", "-s", "UUID", "-o", "value", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    write_role("app", MINI_ROLE)
    booted = boot("p-existing", rootfs, state_root, role=load_role("app", roles_dir), image=image)
    try:
        out = booted.provision().stdout
        assert "already has a ext4 filesystem; keeping it" in out
        assert booted.sh("cat /srv/app/precious.txt").stdout == "do not lose me\n"
        assert booted.sh("blkid -p -s UUID -o value /dev/xvdf").stdout.strip() == uuid_before
        booted.verify()
    finally:
        booted.machine.stop()


def test_device_with_a_partition_table_is_refused(
    rootfs: Path, state_root: Path, roles_dir: Path, write_role: Callable[..., Path], tmp_path: Path
) -> None:
    image = tmp_path / "parted.img"
    subprocess.run(["truncate", "-s", "1G", str(image)], check=True)
    mbr = bytearray(512)  # an MBR with one Linux partition: a partition table, no filesystem
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 204800)
    mbr[510:512] = b"\x55\xaa"
    with image.open("r+b") as handle:
        handle.write(mbr)
    write_role("app", MINI_ROLE)
    booted = boot("p-parted", rootfs, state_root, role=load_role("app", roles_dir), image=image)
    try:
        result = booted.provision(check=False)
        assert result.exit_status != 0
        assert "has a dos partition table and no filesystem; refusing to format it" in result.stderr
        assert booted.sh("blkid -p -s PTTYPE -o value /dev/xvdf").stdout.strip() == "dos"
    finally:
        booted.machine.stop()


# ---------------------------------------------------------------- the other roles


@pytest.mark.parametrize("role_name", ["database", "management"])
def test_other_roles_provision_and_verify(role_name: str, rootfs: Path, state_root: Path) -> None:
    role = load_role(role_name)
    booted = boot(f"p-{role_name}", rootfs, state_root, role=role)
    try:
        booted.provision()
        result = booted.verify()
        for path in (p.path for p in role.externalize):
            assert f"ok\tpath\t{path}\t-> /data{path}" in result.stdout
        for unit in role.services:
            assert f"ok\tservice\t{unit}" in result.stdout
        if role_name == "database":
            booted.sh("mariadb -e 'CREATE DATABASE ebsrole_check'")
            assert (
                booted.sh("test -d /data/var/lib/mysql/ebsrole_check && findmnt -n -o FSTYPE /data").stdout.strip()
                == "xfs"
            )
        else:
            assert booted.sh("stat -c '%U:%G %a' /data/srv/ops").stdout.strip() == "root:adm 2775"
    finally:
        booted.machine.stop()


# ---------------------------------------------------------------- the move keeps everything

KEEP_ROLE = {
    "description": "a role whose one directory holds every kind of file a move must keep",
    "packages": [],
    "services": [],
    "volume": {"device": "/dev/sdf", "mount_point": "/data", "size_gib": 2},
    "externalize": ["/srv/keep"],
}
# (chattr flags, path below the directory), set last: an immutable directory takes no entries.
KEEP_FLAGS = (
    ("+i", "immutable"),
    ("+a", "append-only.log"),
    ("+Ad", "frozen/inside"),
    ("+i", "frozen"),
    ("+a", "$'new\\nline'"),
)
MIB = 1024**2

# Sparse files, hard links, ACLs, user.* and security.* xattrs, file capabilities (also on
# a file not owned by root: a chown after setting them would drop them), a socket, a fifo,
# device nodes, setuid, and old times on files, directories and symlinks. The block node is of
# major 240 (local/experimental use): no device of the host answers it, whatever the host's loop
# devices are doing (a node of /dev/loop42 had its time moved while other runs used loop42).
FILL_KEEP = r"""
set -e
mkdir -p /srv/keep/frozen /srv/keep/sub/deeper && cd /srv/keep
printf start > sparse-1g && truncate -s 1G sparse-1g && printf end >> sparse-1g
truncate -s 4096 sparse-4k
head -c 300000 /dev/urandom > dense
cp /usr/bin/true ping-like && setcap cap_net_raw+ep ping-like
cp /usr/bin/true nobodys-tool && chown nobody:nogroup nobodys-tool && setcap cap_net_bind_service+ep nobodys-tool
echo once > hardlink-a && ln hardlink-a hardlink-b && ln hardlink-a sub/deeper/hardlink-c
echo keep > immutable && echo line > append-only.log && echo in > frozen/inside && echo x > $'new\nline'
setfacl -m u:nobody:rw dense && setfacl -d -m g:adm:rx sub
python3 -c '
import os, socket
os.setxattr("dense", "user.origin", b"test")
os.setxattr("dense", "security.ebsrole", b"label")
socket.socket(socket.AF_UNIX).bind("sock")
'
mkfifo fifo
mknod char-null c 1 3 && mknod block-loop b 240 42
cp /usr/bin/true setuid && chmod 4755 setuid
ln -s sparse-1g link && ln -s /nowhere dangling
touch -d '2001-02-03 04:05:06' dense immutable frozen/inside sub/deeper/hardlink-c fifo char-null sock
touch -h -d '2002-03-04 05:06:07' link dangling
touch -d '2003-04-05 06:07:08' sub/deeper sub frozen
"""


def _fill_keep(booted: Booted, root: str) -> None:
    booted.root_sh(FILL_KEEP.replace("/srv/keep", root))
    for flags, rel in KEEP_FLAGS:
        booted.root_sh(f"chattr {flags} {root}/{rel}")
    booted.root_sh(f"touch -d '2004-05-06 07:08:09' {root}")


@pytest.fixture(scope="module")
def keep(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Booted, list[str], str]]:
    """A machine whose /srv/keep was moved once by root with all its capabilities (as on
    EC2); yields it with the manifest from before and the move's output."""
    base = tmp_path_factory.mktemp("keep")
    (base / "roles").mkdir()
    (base / "roles/keep.yaml").write_text(yaml.safe_dump(KEEP_ROLE))
    booted = boot("p-keep", rootfs, base / "machines", role=load_role("keep", base / "roles"), host_root=True)
    try:
        install_packages(booted, ("acl", "rsync"))
        _fill_keep(booted, "/srv/keep")
        before = booted.manifest("/srv/keep")
        out = booted.provision(as_root=True).stdout
        yield booted, before, out
    finally:
        booted.machine.stop()
        assert leftovers(booted.machine) == []


def _field(manifest: list[str], rel: str, index: int) -> str:
    """Return field ``index`` of the manifest line of /srv/keep/``rel`` (see tree_manifest.py)."""
    return next(line.split("\t")[index] for line in manifest if line.split("\t")[0] == f"/srv/keep/{rel}")


def test_move_keeps_sparseness_flags_capabilities_specials_and_times(keep: tuple[Booted, list[str], str]) -> None:
    booted, before, out = keep
    assert "making a ext4 filesystem on empty /dev/xvdf" in out
    assert booted.sh("readlink /srv/keep").stdout.strip() == "/data/srv/keep"
    # What the manifest from before holds, so that its equality below says something.
    assert _field(before, "sparse-1g", 11) == "holes:0-4096,1073741824-1073741827"
    assert _field(before, "immutable", 10) == "i" == _field(before, "frozen", 10)
    assert _field(before, "append-only.log", 10) == "a" and _field(before, "frozen/inside", 10) == "dA"
    assert "security.capability=" in _field(before, "nobodys-tool", 7)
    assert "security.ebsrole=" in _field(before, "dense", 7) and "user:65534:rw-" in _field(before, "dense", 8)
    assert _field(before, "char-null", 6) == "1:3" and _field(before, "block-loop", 1).startswith("b")
    assert _field(before, "sock", 1).startswith("s") and _field(before, "fifo", 1).startswith("p")
    assert _field(before, "hardlink-b", 9) == "hardlink-a" == _field(before, "sub/deeper/hardlink-c", 9)
    assert _field(before, "sub", 5) == str(calendar.timegm((2003, 4, 5, 6, 7, 8)) * 10**9)
    assert _field(before, "link", 5) == str(calendar.timegm((2002, 3, 4, 5, 6, 7)) * 10**9)  # its own time

    assert booted.manifest("/srv/keep") == before

    allocated = int(booted.sh("stat -c '%b %B' /data/srv/keep/sparse-1g").stdout.split()[0]) * 512
    assert allocated < MIB, f"the sparse 1 GiB file takes {allocated} bytes on the volume"
    assert booted.sh("getcap /data/srv/keep/ping-like /data/srv/keep/nobodys-tool").stdout.splitlines() == [
        "/data/srv/keep/ping-like cap_net_raw=ep",
        "/data/srv/keep/nobodys-tool cap_net_bind_service=ep",
    ]
    # The flags work: the immutable file cannot be removed, the log can only grow.
    assert booted.sh("rm -f /srv/keep/immutable", check=False).exit_status != 0
    assert booted.sh("echo over > /srv/keep/append-only.log", check=False).exit_status != 0
    assert booted.sh("ls -d /srv/keep.ebsrole-old /data/srv/keep.ebsrole-partial", check=False).stdout == ""


def test_second_move_changes_nothing(keep: tuple[Booted, list[str], str]) -> None:
    booted, before, _ = keep
    out = booted.provision(as_root=True).stdout
    assert "/srv/keep: already on the volume" in out
    assert booted.manifest("/srv/keep") == before


def _leave_old_copy(booted: Booted, change: str = "") -> None:
    """Make the state of a run killed after its swap: the local copy left as .ebsrole-old."""
    booted.root_sh("cp -a /data/srv/keep /srv/keep.ebsrole-old")
    for flags, rel in KEEP_FLAGS:
        booted.root_sh(f"chattr {flags} /srv/keep.ebsrole-old/{rel}")
    if change:
        booted.root_sh(f"cd /srv/keep.ebsrole-old && {change}")


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (
            "printf X | dd of=dense bs=1 seek=1000 conv=notrunc status=none && touch -d '2001-02-03 04:05:06' dense",
            "dense",
        ),
        ("echo only here > sub/new-file", "sub/new-file"),
        ("chattr -i immutable", "chattr flags differ"),
    ],
    ids=["changed-byte", "extra-file", "lost-flag"],
)
def test_old_copy_that_differs_from_the_volume_is_kept(
    keep: tuple[Booted, list[str], str], change: str, shown: str
) -> None:
    booted, before, _ = keep
    _leave_old_copy(booted, change)
    old = booted.manifest("/srv/keep.ebsrole-old")
    try:
        result = booted.provision(check=False, as_root=True)
        assert result.exit_status == 1
        assert "/srv/keep.ebsrole-old differs from /data/srv/keep on the volume; kept it" in result.stderr
        assert shown in result.stderr
        assert booted.manifest("/srv/keep.ebsrole-old") == old
        assert booted.manifest("/srv/keep") == before
    finally:
        booted.root_sh("chattr -R -ia /srv/keep.ebsrole-old 2>/dev/null; rm -rf /srv/keep.ebsrole-old")


def test_old_copy_that_matches_the_volume_is_removed(keep: tuple[Booted, list[str], str]) -> None:
    booted, before, _ = keep
    _leave_old_copy(booted)
    booted.provision(as_root=True)
    assert booted.sh("ls -d /srv/keep.ebsrole-old", check=False).exit_status != 0
    assert booted.manifest("/srv/keep") == before


# ---------------------------------------------------------------- mkfs only on an empty device


def _image_with(path: Path, writes: list[tuple[int, bytes]]) -> Path:
    subprocess.run(["truncate", "-s", "1G", str(path)], check=True)
    with path.open("r+b") as handle:
        for offset, data in writes:
            handle.seek(offset)
            handle.write(data)
    return path


def _wiped_filesystem(path: Path, seed: Path) -> Path:
    """An ext4 volume with files whose signature wipefs -a removed: data, no signature."""
    (seed / "precious.txt").write_text("do not format me\n")
    subprocess.run(["truncate", "-s", "1G", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(seed), str(path)], check=True)
    subprocess.run(["wipefs", "-q", "-a", str(path)], check=True)
    return path


def _regions(image: Path) -> tuple[bytes, ...]:
    """Return the first 4 MiB, the 64 MiB in the middle and the last MiB of an image."""
    with image.open("rb") as handle:
        parts = []
        for offset, length in ((0, 4 * MIB), (480 * MIB, 64 * MIB), (1023 * MIB, MIB)):
            handle.seek(offset)
            parts.append(handle.read(length))
    return tuple(parts)


RANDOM = bytes(range(256)) * 256 + b"ebsrole-data"  # not zeros, and no signature


@pytest.mark.parametrize(
    ("case", "offset_shown"),
    [("start", 0), ("middle", 512 * MIB), ("end", 1024 * MIB - MIB), ("wiped-ext4", 0)],
)
def test_device_with_data_but_no_signature_is_not_formatted(
    keep: tuple[Booted, list[str], str], tmp_path: Path, case: str, offset_shown: int
) -> None:
    booted, _, _ = keep
    if case == "wiped-ext4":
        (tmp_path / "seed").mkdir()
        image = _wiped_filesystem(tmp_path / "wiped.img", tmp_path / "seed")
    else:
        at = {"start": 8192, "middle": 480 * MIB, "end": 1024 * MIB - 4096}[case]
        # In the middle: 64 MiB, a sixteenth of the device, somewhere between two samples.
        data = RANDOM * (64 * MIB // len(RANDOM)) if case == "middle" else RANDOM[:4096]
        image = _image_with(tmp_path / f"{case}.img", [(at, data)])
    regions = _regions(image)
    assert subprocess.run(["blkid", "-p", str(image)], capture_output=True, check=False).returncode == 2
    booted.root_sh("if mountpoint -q /data; then umount /data; fi")
    if "xvdf" in booted.root_sh("ls /dev"):
        booted.machine.detach("xvdf")
    booted.machine.attach(Disk(image, "xvdf", VOLUME_ID))

    result = booted.provision(check=False)
    assert result.exit_status == 1
    assert (
        f"/dev/xvdf has no filesystem signature but is not empty: the MiB at byte {offset_shown} holds data; "
        "refusing to format it" in result.stderr
    )
    assert "making a" not in result.stdout
    booted.machine.detach("xvdf")
    assert _regions(image) == regions

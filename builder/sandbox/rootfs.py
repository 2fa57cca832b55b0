"""The cached Debian root tree that local machines boot from.

Built once per release and architecture with debootstrap into a cache directory outside
the repository, then only read: every machine runs on an overlay above it. The tree is
made to look like a fresh instance of the official Debian AMI where it matters here:
cloud-init with the default user ``admin`` (passwordless sudo), openssh-server, systemd.
It is built in a temporary directory and renamed into place, so an interrupted build
never leaves a half tree that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from builder.errors import BuildError
from builder.sandbox.host import require_root, require_tools

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("EBSROLE_CACHE", "/var/cache/ebsrole"))
DEFAULT_MIRROR = os.environ.get("EBSROLE_MIRROR", "http://deb.debian.org/debian")
DONE_MARK = ".ebsrole-rootfs"
FORMAT = "1"  # bump when the tree's contents change, to rebuild caches

# What an official Debian cloud image has that matters to the scripts and to SSH.
INCLUDE = (
    "systemd-sysv",
    "dbus",
    "udev",
    "openssh-server",
    "openssh-client",
    "sudo",
    "cloud-init",
    "python3",
    "ca-certificates",
    "e2fsprogs",
    "procps",
    "iproute2",
    "netbase",
    "less",
    "kmod",
    "util-linux",
    "apt-utils",
    # python3-cryptography (for cloud-init) needs it, and debootstrap does not resolve it
    "python3-cffi-backend",
)

CLOUD_CFG = """\
# ebsrole local machine: behave like the official Debian AMI (default user admin with
# passwordless sudo), read only the NoCloud seed, and leave networking to the host.
datasource_list: [NoCloud, None]
network: {config: disabled}
locale: C.UTF-8
system_info:
  default_user:
    name: admin
    lock_passwd: true
    gecos: Debian
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
"""


def rootfs_path(release: str, arch: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return where the tree for ``release``/``arch`` lives (whether built or not)."""
    return cache_dir / "rootfs" / f"{release}-{arch}"


def is_ready(path: Path) -> bool:
    """Return True when ``path`` is a finished tree of the current format."""
    mark = path / DONE_MARK
    return mark.is_file() and mark.read_text().strip() == FORMAT


def ensure_rootfs(
    release: str, arch: str = "amd64", cache_dir: Path = DEFAULT_CACHE, mirror: str = DEFAULT_MIRROR
) -> Path:
    """Return the tree for ``release``/``arch``, building it first when missing.

    Raises EnvironmentProblem when not root or debootstrap is missing, BuildError when
    debootstrap fails (with the tail of its log).
    """
    target = rootfs_path(release, arch, cache_dir)
    if is_ready(target):
        return target
    require_root("building the Debian root tree")
    require_tools(debootstrap="debootstrap")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    log.info("rootfs: preparing Debian %s %s in %s (first use only; a few minutes)", release, arch, target)
    started = time.monotonic()
    try:
        _debootstrap(release, arch, work, mirror)
        _customize(work)
        (work / DONE_MARK).write_text(FORMAT + "\n")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        work.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("rootfs: Debian %s %s ready (%.0f s)", release, arch, time.monotonic() - started)
    return target


def _debootstrap(release: str, arch: str, work: Path, mirror: str) -> None:
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--arch={arch}",
        f"--include={','.join(INCLUDE)}",
        release,
        str(work),
        mirror,
    ]
    lines: list[str] = []
    last_note = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            log.debug("debootstrap: %s", line.rstrip())
            if time.monotonic() - last_note > 15:
                log.info("rootfs: %s", line.strip()[:100])
                last_note = time.monotonic()
    if proc.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise BuildError(
            f"debootstrap {release} failed (exit {proc.returncode}):\n{tail}",
            hint=f"is the Debian mirror {mirror} reachable? set EBSROLE_MIRROR to another",
        )


def _customize(root: Path) -> None:
    """Apply what every machine shares; per-machine identity is left out on purpose."""
    for key in root.glob("etc/ssh/ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")  # slirp4netns's DNS forwarder
    cfg = root / "etc/cloud/cloud.cfg.d/90-ebsrole.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(CLOUD_CFG)
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True, capture_output=True)
    root.chmod(0o755)

"""What a contained machine cannot do itself, done for it by the host: idmapped binds, mounts, freezes.

A machine's root is root of its own user namespace only, so three things need the host:

- its root tree is the cached Debian tree (owned by real root) under an overlay: the host
  gives each layer to the machine as an *idmapped* bind (``python -m builder.sandbox.broker
  bind USERNS SRC DST``), so files owned by uid 0 on disk show as the machine's root;
- ext4/xfs are not mountable in a user namespace (no FS_USERNS_MOUNT): ``mount.ext4`` in the
  machine hands the broker an open file of the device, and the broker mounts it (idmapped
  too, so the volume's files are owned on disk as the machine sees them) in the machine's
  mount namespace, only if the device is one of the machine's own volumes;
- FIFREEZE needs CAP_SYS_ADMIN over the filesystem's owner (the host): ``fsfreeze`` in the
  machine hands over an open file of the mount point, frozen only if it is on one of its volumes
  (its root, an overlay that cannot be frozen, gets a stand-in: ``Broker.freeze_root``);
- mkfs.xfs sets the device's block size (BLKBSZSET, CAP_SYS_ADMIN of the host's namespace):
  ``mkfs.xfs`` in the machine hands over an open file of the device and its arguments; the
  broker runs the host's mkfs.xfs on the loop device behind it, only for one of the machine's
  own volumes that is mounted nowhere, with options from a short allow-list (never ``-f``:
  mkfs.xfs then refuses a device that holds a filesystem, on top of provision.sh's checks).

The broker of a machine (``python -m builder.sandbox.broker serve STATE``) listens on
``STATE/broker.sock``, which only the machine's root reaches (inside as ``/dev/.ebsrole-broker``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

from builder.errors import BrokerRefused
from builder.sandbox.machine import Machine

SYSCALLS = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "mount_setattr": 442}
OPEN_TREE_CLONE, CLOEXEC, AT_RECURSIVE, AT_EMPTY_PATH = 1, 0o2000000, 0x8000, 0x1000
MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_IDMAP = 4, 0x100000
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
CLONE_NEWNS = 0x00020000
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
MOUNT_ATTRS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x10, "nodiratime": 0x80}
IGNORED = {"defaults", "rw", "auto", "noauto", "nofail", "user", "nouser", "users", "_netdev", "relatime", "suid"}
SOCKET_INSIDE = "/dev/.ebsrole-broker"
# mkfs.xfs options the broker passes on: quiet, a label, and -m's feature switches (0 or 1).
MKFS_FLAGS = {"-q"}
MKFS_LABEL = re.compile(r"[\w.+-]{1,12}", re.ASCII)
MKFS_META = re.compile(r"(crc|finobt|rmapbt|reflink|inobtcount|bigtime)=[01]")
MKFS_TIMEOUT = 300.0

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _call(name: str, *args: object) -> int:
    result = int(_libc.syscall(SYSCALLS[name], *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _idmap(mount_fd: int, userns_fd: int) -> None:
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    size = ctypes.c_size_t(ctypes.sizeof(attr))
    _call("mount_setattr", mount_fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), size)


def idmapped_bind(source: str, target: str, userns: str) -> None:
    """Bind ``source`` on ``target`` with uid/gid k on disk shown as what k is in ``userns``."""
    userns_fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tree = _call("open_tree", -100, source.encode(), OPEN_TREE_CLONE | CLOEXEC)
        try:
            _idmap(tree, userns_fd)
            _call("move_mount", tree, b"", -100, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(tree)
    finally:
        os.close(userns_fd)


def _fs_mount(fstype: str, device: str, options: str) -> int:
    """Return a detached mount of ``device`` (made by the host, so any filesystem type)."""
    fs = _call("fsopen", fstype.encode(), 1)
    try:
        _call("fsconfig", fs, FSCONFIG_SET_STRING, b"source", device.encode(), 0)
        attrs = 0
        for option in filter(None, options.split(",")):
            if option in MOUNT_ATTRS:
                attrs |= MOUNT_ATTRS[option]
            elif option in IGNORED or option.lower().startswith(("x-", "comment=")):
                continue
            elif "=" in option:
                key, value = option.split("=", 1)
                _call("fsconfig", fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
            else:
                _call("fsconfig", fs, FSCONFIG_SET_FLAG, option.encode(), None, 0)
        if attrs & MOUNT_ATTRS["ro"]:
            _call("fsconfig", fs, FSCONFIG_SET_FLAG, b"ro", None, 0)
        _call("fsconfig", fs, FSCONFIG_CMD_CREATE, None, None, 0)
        return _call("fsmount", fs, 1, attrs)
    finally:
        os.close(fs)


class Broker:
    """Serves one machine, by its state directory (leader pid, its volumes' loop devices)."""

    def __init__(self, state: Path) -> None:
        self.state = state

    def leader(self) -> int:
        leader = Machine(self.state.name, self.state).leader
        if leader is None:
            raise BrokerRefused("the machine is not running")
        return leader

    def volume_of(self, rdev: int) -> str:
        """Return the host loop device of this machine's volume with device number ``rdev``."""
        for entry in json.loads((self.state / "loops.json").read_text() or "[]"):
            if os.makedev(int(entry["major"]), int(entry["minor"])) == rdev:
                return str(entry["loop"])
        raise BrokerRefused(f"device {os.major(rdev)}:{os.minor(rdev)} is not a volume of this machine")

    def mount(self, device_fd: int, source: str, fstype: str, target: str, options: str) -> None:
        st = os.fstat(device_fd)
        if not stat.S_ISBLK(st.st_mode):
            raise BrokerRefused("the source is not a block device")
        self.volume_of(st.st_rdev)
        if fstype not in {"ext2", "ext3", "ext4", "xfs"}:
            raise BrokerRefused(f"filesystem type {fstype!r} is not one the broker mounts")
        leader = self.leader()
        userns = os.open(f"/proc/{leader}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        mnt_ns = os.open(f"/proc/{leader}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._mount_inside(mnt_ns, userns, (fstype, source, options, target), st.st_rdev)
        finally:
            os.close(userns)
            os.close(mnt_ns)

    @staticmethod
    def _mount_inside(mnt_ns: int, userns: int, spec: tuple[str, str, str, str], rdev: int) -> None:
        """Mount in the machine's mount namespace (a child: setns), the source named as the machine names it.

        The mount is attached only if the filesystem made is on device ``rdev``, whatever the
        machine's path pointed to by then.
        """
        fstype, source, options, target = spec
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only makes syscalls and reports
            os.close(read)
            failure = ""
            try:
                if _libc.setns(mnt_ns, CLONE_NEWNS) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                mount_fd = _fs_mount(fstype, source, options)
                if os.fstat(mount_fd).st_dev != rdev:
                    failure = f"{source} is not the device handed over"
                else:
                    _idmap(mount_fd, userns)
                    _call("move_mount", mount_fd, b"", -100, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
            except OSError as exc:
                failure = f"{exc.strerror or os.strerror(exc.errno or 0)}"
            os.write(write, failure.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as reply:
            failure = reply.read().decode()
        os.waitpid(pid, 0)
        if failure:
            raise BrokerRefused(failure)

    def mkfs(self, device_fd: int, fstype: str, args: list[str]) -> tuple[int, str]:
        """Make a filesystem on the machine's volume open as ``device_fd``; return (exit status, output).

        Raises BrokerRefused for anything but xfs on an unmounted volume of this machine with
        allowed options.
        """
        st = os.fstat(device_fd)
        if not stat.S_ISBLK(st.st_mode):
            raise BrokerRefused("the device is not a block device")
        loop = self.volume_of(st.st_rdev)
        if fstype != "xfs":
            raise BrokerRefused(f"filesystem type {fstype!r} is made inside the machine, not by the host")
        options = mkfs_options(args)
        self.check_unmounted(st.st_rdev)
        mkfs = shutil.which("mkfs.xfs", path="/usr/sbin:/sbin")
        if mkfs is None:
            raise BrokerRefused("the host has no mkfs.xfs (Debian package xfsprogs; scripts/setup.sh installs it)")
        done = subprocess.run(
            [mkfs, *options, "--", loop],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=MKFS_TIMEOUT,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        )
        # The machine knows the device by its own name, not by the host's loop device.
        return done.returncode, (done.stdout + done.stderr).replace(loop, args[-1])

    def check_unmounted(self, rdev: int) -> None:
        """Raise BrokerRefused when device ``rdev`` is mounted in the machine or on the host."""
        wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
        for table in (f"/proc/{self.leader()}/mountinfo", "/proc/self/mountinfo"):
            for line in Path(table).read_text().splitlines():
                if line.split()[2] == wanted:
                    raise BrokerRefused(f"device {wanted} is mounted at {line.split()[4]}; not formatting it")

    def freeze(self, dir_fd: int, thaw: bool) -> None:
        st = os.fstat(dir_fd)
        if st.st_dev == os.stat(f"/proc/{self.leader()}/root").st_dev:
            self.freeze_root(dir_fd, thaw)
            return
        self.volume_of(st.st_dev)
        fcntl.ioctl(dir_fd, FITHAW if thaw else FIFREEZE, 0)

    def freeze_root(self, dir_fd: int, thaw: bool) -> None:
        """The stand-in of FIFREEZE/FITHAW for the machine's root, an overlay (not freezable).

        EC2 roots are ext4, which fsfreeze freezes; an overlay has no freeze of its own, and
        freezing the host filesystem below it would stop every machine. What a snapshot of a
        frozen root relies on is kept: freezing writes everything back (syncfs), a second freeze
        is EBUSY and a thaw of what is not frozen EINVAL, as the kernel answers (so a watchdog's
        thaw shows). Not kept: writes are not blocked while "frozen" (the root snapshot copies
        the tree at the CreateSnapshot call, so what it holds is still the tree at one instant).
        """
        marker = self.state / "root-frozen"
        if thaw:
            if not marker.exists():
                raise OSError(errno.EINVAL, "the root filesystem is not frozen")
            marker.unlink()
            return
        if marker.exists():
            raise OSError(errno.EBUSY, "the root filesystem is frozen already")
        if _libc.syncfs(dir_fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs of the root filesystem failed")
        marker.touch()

    def handle(self, conn: socket.socket) -> None:
        """Answer one request on ``conn``: {"ok": true, ...} or {"ok": false, "error": why}."""
        data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
        try:
            reply = {"ok": True, **self.dispatch(json.loads(data), fds)}
        except (BrokerRefused, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            reply = {"ok": False, "error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        conn.sendall(json.dumps(reply).encode())

    def dispatch(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        """Carry out ``request`` on the file handed over; return what the reply adds."""
        if not fds:
            raise BrokerRefused("no file handed over")
        op = request["op"]
        if op == "mount":
            self.mount(
                fds[0],
                str(request["source"]),
                str(request["type"]),
                str(request["target"]),
                str(request.get("options", "")),
            )
        elif op in ("freeze", "unfreeze"):
            self.freeze(fds[0], op == "unfreeze")
        elif op == "mkfs" and isinstance(request["args"], list):
            status, output = self.mkfs(fds[0], str(request["type"]), [str(a) for a in request["args"]])
            return {"status": status, "output": output}
        else:
            raise BrokerRefused(f"unknown request {op!r}")
        return {}

    def serve(self, ready_fd: int | None = None) -> None:
        path = self.state / "broker.sock"
        path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            os.chmod(path, 0o600)
            server.listen(8)
            if ready_fd is not None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(30)
                    try:
                        self.handle(conn)
                    except OSError:
                        continue


def mkfs_options(args: list[str]) -> list[str]:
    """Return mkfs.xfs's options among ``args`` (the device, the last argument, left out).

    Raises BrokerRefused naming the first option outside the allow-list.
    """
    if not args or args[-1].startswith("-"):
        raise BrokerRefused("usage: mkfs.xfs [-q] [-L LABEL] [-m FEATURE=0|1,...] [--] DEVICE")
    rest, options = [a for a in args[:-1] if a != "--"], []
    while rest:
        option = rest.pop(0)
        if option in MKFS_FLAGS:
            options.append(option)
        elif rest and _mkfs_value_ok(option, rest[0]):
            options += [option, rest.pop(0)]
        else:
            raise BrokerRefused(
                f"mkfs.xfs option {option!r} is not one the sandbox passes on (-q, -L LABEL, -m FEATURE=0|1)"
            )
    return options


def _mkfs_value_ok(option: str, value: str) -> bool:
    if option == "-L":
        return MKFS_LABEL.fullmatch(value) is not None
    return option == "-m" and all(MKFS_META.fullmatch(o) for o in value.split(","))


def main(argv: list[str]) -> int:
    """``bind USERNS (SRC DST)...`` or ``serve STATE [READY_FD]``; returns the exit status."""
    if len(argv) >= 4 and argv[0] == "bind" and len(argv) % 2 == 0:
        for source, target in zip(argv[2::2], argv[3::2], strict=True):
            idmapped_bind(source, target, argv[1])
        return 0
    if len(argv) in (2, 3) and argv[0] == "serve":
        Broker(Path(argv[1])).serve(int(argv[2]) if len(argv) == 3 else None)
        return 0
    sys.stderr.write("usage: broker bind USERNS SRC DST... | serve STATE [READY_FD]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

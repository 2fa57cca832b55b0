"""Local Debian machines: like a fresh instance of the Debian AMI, started in well under a second.

A machine is a set of private namespaces (mount, pid, uts, ipc, cgroup, network) whose
root is an overlay with a throw-away upper layer over the cached Debian tree (the tree is
never written), with systemd as PID 1, networking through slirp4netns and sshd forwarded
to a loopback address of the host (or not at all: an instance without a public address), and
for an instance of the sandbox a second interface in its VPC (``vpcnet``). cloud-init runs
for real from a NoCloud seed made of the caller's user-data, so the login key and the host
key reach the machine the way they reach an EC2 instance. Data volumes are sparse files on
loop devices, visible inside as their EC2 device name and as ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...``.

Containment: a machine runs in its own user namespace, made with the others (mount, pid,
uts, ipc, cgroup, network are owned by it): uids and gids 0-65535 inside are
``UID_BASE``.. on the host, so root inside is an unprivileged uid of the host, and its
capabilities (systemd-nspawn's set less CAP_MKNOD and CAP_LINUX_IMMUTABLE: ``CAPS``) count
only for what its namespaces own. Its root tree's layers and its writable layer are idmapped
binds (what is uid 0 on disk is root inside), so root trees, their snapshots and images stay
owned by root on disk. Its /dev is a tmpfs the host fills (a filesystem mounted inside a user
namespace never honours device nodes, and the machine cannot make any); the host chowns its
volumes' nodes to the machine's root. What needs the host's namespace is done by a broker
process per machine (``broker.py``), reached through /dev/.ebsrole-broker, only for the
machine's own volumes: mounting ext2/3/4 or xfs (not mountable in a user namespace), fsfreeze
(FIFREEZE: CAP_SYS_ADMIN over the filesystem's owner, the host) and mkfs.xfs (BLKBSZSET:
CAP_SYS_ADMIN of the host's namespace; only a volume mounted nowhere, only ``-q``, ``-L``,
``-m``, never ``-f``). mkfs.ext4 runs inside. A machine started with ``host_root`` (tests of
what only real root does) maps its uids onto the same host uids, so that ``exec`` can run as
the host's root in it with the host's capabilities; over SSH its root is still contained.

Known limits, with their kernel reasons: ``chattr +i``/``+a`` by root inside fail
(CAP_LINUX_IMMUTABLE counts only in the host's user namespace; the broker does not carry
them: a machine could then make files even the host's cleanup must unflag), so does any
mknod of a device node (CAP_MKNOD, and device nodes on a filesystem mounted in a user
namespace never open), online resize (xfs_growfs/resize2fs ioctls need CAP_SYS_RESOURCE or
CAP_SYS_ADMIN over the filesystem, which the host mounted), and xfsprogs' own
/usr/sbin/mkfs.xfs once installed inside (the helper is ``/usr/local/sbin/mkfs.xfs``, first on
every PATH the scripts set). Still shared with the host: the kernel, the page cache and the loopback addresses the
host forwards; every machine uses the same uid range (another machine's files are out of its
view, not out of its uid's reach). /sys is read-only, and (where the host has the cgroup v1
devices controller) a device cgroup denies every device but the basic ones and the machine's
own volumes. Stopping kills the namespace's PID 1 (``unshare`` ignores SIGTERM), which ends
every process inside and with them every mount; the loop devices, the broker and cgroups are
then removed, so nothing is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError, EnvironmentProblem, MachineError
from builder.sandbox.host import require_root, require_tools
from builder.sandbox.vpcnet import Nic, plug

log = logging.getLogger(__name__)

STATE_ROOT = Path(os.environ.get("EBSROLE_STATE", "/var/lib/ebsrole/machines"))
STAGE = Path(__file__).with_name("stage.sh")
INSIDE = Path(__file__).with_name("inside")
# Host uids and gids BASE..BASE+65535 are uids 0..65535 of every machine (root inside is BASE
# on the host). Far above what /etc/subuid conventions hand out (100000 + 65536 per user).
UID_BASE = 0x10000000
# What the broker does for the machine, put in a layer above its root tree: mount(8) helpers
# for the filesystems of data volumes (where mount(8) looks: /sbin), fsfreeze and mkfs.xfs (in
# /usr/local/sbin, first on PATH: a package installed in the machine writes /usr/sbin/mkfs.xfs
# to the upper layer, which would hide a helper in /usr/sbin).
HELPERS = {
    "usr/sbin/mount.ext4": "mount-helper",
    "usr/sbin/mount.ext3": "mount-helper",
    "usr/sbin/mount.ext2": "mount-helper",
    "usr/sbin/mount.xfs": "mount-helper",
    "usr/sbin/fsfreeze": "fsfreeze",
    "usr/local/sbin/fsfreeze": "fsfreeze",
    "usr/local/sbin/mkfs.xfs": "mkfs.xfs",
}
TOOLS = {
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
    "losetup": "mount",
    "script": "bsdutils",
    "slirp4netns": "slirp4netns",
    "mkfs.ext4": "e2fsprogs",
    "blkid": "util-linux",
    "ip": "iproute2",
}
# systemd-nspawn's default set, less CAP_MKNOD (the host makes every device node) and
# CAP_LINUX_IMMUTABLE (it counts only in the host's user namespace). All of them are
# capabilities of the machine's user namespace: they act on what its namespaces own.
CAPS = (
    "-all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid,+ipc_owner,+kill,+lease,"
    "+net_bind_service,+net_broadcast,+net_raw,+net_admin,+setgid,+setfcap,"
    "+setpcap,+setuid,+sys_admin,+sys_boot,+sys_chroot,+sys_nice,+sys_ptrace,+sys_resource,"
    "+sys_tty_config,+audit_write,+audit_control"
)
# null zero full random urandom tty, /dev/console and pts ptys, ptmx, tun.
DEVICES_ALLOWED = (
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rw",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
)
_DELEGATED = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")
BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
# A property line of `udevadm test` (KEY=value).
UDEV_PROPERTY = re.compile(r"[A-Z][A-Z0-9_]*=.*")


@dataclass(frozen=True)
class Disk:
    """A data volume: a (sparse) image file, shown in the machine as /dev/<node>."""

    image: Path
    node: str  # e.g. "xvdf"
    volume_id: str | None = None  # e.g. "vol-0123..."; adds the Nitro by-id name

    @property
    def by_id(self) -> str | None:
        """Return the /dev/disk/by-id name EC2 Nitro instances show, if a volume id is set."""
        return f"{BY_ID_PREFIX}{self.volume_id.replace('-', '')}" if self.volume_id else None


def make_image(path: Path, size_gib: float) -> Path:
    """Create a sparse image file of ``size_gib`` GiB (a fresh, empty volume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as handle:
        handle.truncate(int(size_gib * 1024**3))
    return path


def free_port(address: str) -> int:
    """Return a TCP port that is free on ``address`` right now."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def nocloud_seed(name: str, user_data: str, public_keys: Sequence[str] = ()) -> dict[str, str]:
    """Return NoCloud seed files (meta-data, user-data) for a new instance of ``name``.

    ``public_keys`` play the part of the EC2 key pair (instance metadata ``public-keys``):
    cloud-init installs them for the default user.
    """
    meta = f"instance-id: {name}-{uuid.uuid4().hex[:12]}\nlocal-hostname: {name}\n"
    if public_keys:
        meta += f"public-keys: {json.dumps(list(public_keys))}\n"
    return {"meta-data": meta, "user-data": user_data}


class Machine:
    """A local Debian machine, by its name and state directory."""

    def __init__(self, name: str, state: Path) -> None:
        self.name = name
        self.state = state
        self.ssh_later = False  # set by start(): sshd's port is forwarded by a later forward(22)

    # ------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        name: str,
        layers: Sequence[Path],
        *,
        user_data: str,
        ssh_address: str | None = "127.0.0.1",
        ssh_port: int | None = None,
        disks: Sequence[Disk] = (),
        public_keys: Sequence[str] = (),
        state_root: Path = STATE_ROOT,
        timeout: float = 20.0,
        host_root: bool = False,
        nic: Nic | None = None,
        ssh_later: bool = False,
    ) -> Machine:
        """Start a machine whose root is an overlay of ``layers`` (topmost first).

        Returns once systemd is PID 1 and the network is wired (SSH answers a little
        later: see wait_for_ssh). ``host_root`` maps the machine's uids onto the same host
        uids (root inside is uid 0 of the host, still without the host's capabilities), so
        that ``exec`` can run as the host's root with every capability, as root on EC2 has
        them: for tests of what only real root does (chattr +i, device nodes); never for
        machines of the sandbox endpoint. ``ssh_address`` None forwards nothing to the host
        (an instance without a public address); ``nic`` plugs the machine into its VPC's
        bridge (``vpcnet``), at this start and every resume. ``ssh_later`` leaves its sshd
        unreachable at ``ssh_address`` until ``forward(22, port)`` (at this start only: as
        an EC2 instance, unreachable until it runs). Raises EnvironmentProblem when the host lacks root or
        a tool, MachineError (with the console's tail) when the machine does not start;
        a machine that fails to start is stopped and leaves nothing.
        """
        require_root("a local machine")
        require_tools(**TOOLS)
        state = state_root / name
        if state.exists():
            raise MachineError(name, f"already exists ({state}); stop it first")
        machine = cls(name, state)
        machine.ssh_later = ssh_later
        machine._boot(
            lambda: machine._prepare(
                layers,
                user_data=user_data,
                address=ssh_address,
                port=ssh_port or (free_port(ssh_address) if ssh_address else 0),
                disks=disks,
                public_keys=public_keys,
                base=0 if host_root else UID_BASE,
                nic=nic,
            ),
            timeout,
            keep_state=False,
        )
        return machine

    @classmethod
    def resume(
        cls, name: str, *, disks: Sequence[Disk] = (), state_root: Path = STATE_ROOT, timeout: float = 20.0
    ) -> Machine:
        """Start again a machine stopped with ``keep_state``: same root (upper layer), same address.

        Like an EC2 instance's start after a stop: cloud-init sees the same instance id, so
        per-instance steps do not run again. A failed start keeps the state for another try.
        """
        require_root("a local machine")
        require_tools(**TOOLS)
        machine = cls(name, state_root / name)
        if not (machine.state / "rw" / "upper").is_dir():
            raise MachineError(name, f"no kept state in {machine.state} to start from")
        if machine.running:
            raise MachineError(name, "already running")

        def prepare() -> None:
            fifo = machine.state / "go"
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
            (machine.state / "root").mkdir(exist_ok=True)
            machine._save_loops([])
            machine._make_cgroups()
            for disk in disks:
                machine._record_loop(disk)

        machine._boot(prepare, timeout, keep_state=True)
        return machine

    def _boot(self, prepare: Callable[[], None], timeout: float, *, keep_state: bool) -> None:
        try:
            prepare()
            self._launch(timeout)
        except BaseException as exc:
            console = self.console_tail()
            self.stop(keep_state=keep_state)
            if isinstance(exc, BuildError) or not isinstance(exc, Exception):
                raise
            raise MachineError(self.name, f"failed to start: {exc}", console) from exc
        log.debug("machine %s: started (leader pid %s)", self.name, self.leader)

    def _prepare(
        self,
        layers: Sequence[Path],
        *,
        user_data: str,
        address: str | None,
        port: int,
        disks: Sequence[Disk],
        public_keys: Sequence[str],
        base: int,
        nic: Nic | None,
    ) -> None:
        for layer in layers:
            if not (layer / "sbin/init").exists() and not (layer / "etc").is_dir():
                raise MachineError(self.name, f"{layer} is not a root tree")
        upper = self.state / "rw" / "upper"
        (upper / "etc").mkdir(parents=True)
        (self.state / "root").mkdir()
        os.mkfifo(self.state / "go")
        self._write("layers", "\n".join(str(p) for p in layers))
        self._write("base", str(base))
        self._write("ssh", f"{address} {port}" if address else "")
        if nic is not None:
            self._write("nic.json", json.dumps(nic.to_json()))
        (upper / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (upper / "etc/hostname").write_text(self.name + "\n")
        (upper / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n::1\tlocalhost ip6-localhost\n"
        )
        seed = upper / "var/lib/cloud/seed/nocloud"
        seed.mkdir(parents=True)
        for file_name, text in nocloud_seed(self.name, user_data, public_keys).items():
            (seed / file_name).write_text(text)
            (seed / file_name).chmod(0o600)
        self._make_cgroups()
        for disk in disks:
            self._record_loop(disk)

    def _launch(self, timeout: float) -> None:
        cgroup, devices = _cgroup_dirs(self.name)
        disks = " ".join(self._disk_specs())
        # -P: the working directory (another checkout, say) never shadows this package.
        broker = f"env PYTHONPATH={shlex.quote(str(Path(__file__).parents[2]))} {shlex.quote(sys.executable)} -P"
        env = {
            "STATE": str(self.state),
            "LOWER": ":".join(self._read("layers").splitlines()),
            "HELPERS": str(self._make_helpers()),
            "NAME": self.name,
            "CGROUP": str(cgroup / "payload"),
            "CAPS": CAPS,
            "DISKS": disks,
            "BASE": str(self.base),
            "BROKER": f"{broker} -m builder.sandbox.broker",
        }
        self._start_broker()
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        join = [
            f"echo $$ > {shlex.quote(str(self.state / 'unshare.pid'))}",
            f"echo 0 > {cgroup}/supervisor/cgroup.procs",
        ]
        if devices:
            join.append(f"echo 0 > {devices}/payload/cgroup.procs")
        inner = "; ".join(
            [
                "trap '' HUP",
                *join,
                "exec unshare --mount -- "
                f"env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {env_args} bash {shlex.quote(str(STAGE))} host",
            ]
        )
        console = self.state / "console.log"
        with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:
            proc = subprocess.Popen(
                ["script", "-qfec", f"sh -c {shlex.quote(inner)}", str(console)],
                stdin=null_in,
                stdout=null_out,
                stderr=null_out,
                start_new_session=True,
            )
        self._write("script.pid", str(proc.pid))
        deadline = time.monotonic() + timeout
        leader = self._wait_leader(deadline, proc)
        self._start_network(leader, deadline)
        self._signal_go(deadline)

    def _make_helpers(self) -> Path:
        """Return the layer holding the in-machine ends of the broker (made afresh on each start)."""
        layer = self.state / "helpers"
        shutil.rmtree(layer, ignore_errors=True)
        for inside, source in HELPERS.items():
            (layer / inside).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(INSIDE / source, layer / inside)
            (layer / inside).chmod(0o755)
        return layer

    def _start_broker(self) -> None:
        read_fd, write_fd = os.pipe()
        with open(self.state / "broker.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "builder.sandbox.broker", "serve", str(self.state), str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(write_fd,),
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
            )
        os.close(write_fd)
        self._write("broker.pid", str(proc.pid))
        try:
            ready = os.read(read_fd, 1)
        finally:
            os.close(read_fd)
        if not ready:
            raise MachineError(self.name, f"the broker failed: {self._read('broker.log', '').strip()[-500:]}")

    def _wait_leader(self, deadline: float, proc: subprocess.Popen[bytes]) -> int:
        while time.monotonic() < deadline:
            leader = self.leader
            if leader:
                return leader
            if proc.poll() is not None:
                raise MachineError(self.name, f"the namespace launcher exited {proc.returncode}", self.console_tail())
            time.sleep(0.005)
        raise MachineError(self.name, "no PID 1 appeared", self.console_tail())

    def _start_network(self, leader: int, deadline: float) -> None:
        read_fd, write_fd = os.pipe()
        api = self.state / "slirp.sock"
        with open(self.state / "slirp.log", "wb") as out:
            proc = subprocess.Popen(
                [
                    "slirp4netns",
                    "--configure",
                    "--mtu=65520",
                    "--disable-host-loopback",
                    f"--api-socket={api}",
                    f"--ready-fd={write_fd}",
                    str(leader),
                    "tap0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        os.close(write_fd)
        self._write("slirp.pid", str(proc.pid))
        try:
            ready = os.read(read_fd, 1)
        finally:
            os.close(read_fd)
        if not ready:
            raise MachineError(self.name, f"slirp4netns failed: {self._read('slirp.log', '').strip()}")
        if self.nic is not None:
            plug(leader, self.nic)
        if self.public and not self.ssh_later:
            self.forward(22, self.ssh_endpoint[1])

    def _signal_go(self, deadline: float) -> None:
        """Tell stage.sh the network is wired (it waits on the fifo before exec'ing systemd)."""
        while True:
            try:
                fd = os.open(self.state / "go", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline or not self.leader:
                    raise MachineError(self.name, "the machine's root was never set up", self.console_tail()) from None
                time.sleep(0.005)
                continue
            os.write(fd, b"go\n")
            os.close(fd)
            return

    # ------------------------------------------------------------ state

    @property
    def leader(self) -> int | None:
        """Return the host PID of the machine's PID 1, or None when it is not running."""
        pid = self._read("unshare.pid", "").strip()
        if not pid:
            return None
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        # Before PID 1 exists, the launcher's children are the set-up steps of stage.sh.
        return next((int(c) for c in children if _is_pid1(int(c))), None)

    @property
    def base(self) -> int:
        """Return the host uid (and gid) of the machine's root: UID_BASE, or 0 for a ``host_root`` machine."""
        return int(self._read("base", str(UID_BASE)))

    @property
    def running(self) -> bool:
        """Return True while the machine's PID 1 lives."""
        return self.leader is not None

    @property
    def public(self) -> bool:
        """Return whether the machine answers on a host address (False: reached only from its VPC)."""
        return bool(self._read("ssh").strip())

    @property
    def nic(self) -> Nic | None:
        """Return the machine's interface in its VPC, or None when it has none."""
        text = self._read("nic.json", "")
        return Nic.from_json(json.loads(text)) if text else None

    @property
    def ssh_endpoint(self) -> tuple[str, int]:
        """Return the host address and port that reach the machine's sshd. Raises MachineError when it has none."""
        fields = self._read("ssh").split()
        if not fields:
            raise MachineError(self.name, "has no address on the host (it is reached from its VPC only)")
        return fields[0], int(fields[1])

    def forward(self, guest_port: int, host_port: int | None = None) -> int:
        """Forward ``guest_port`` of the machine to its SSH address on the host; return the host port."""
        address, _ = self.ssh_endpoint
        port = host_port or free_port(address)
        reply = _slirp_api(
            self.state / "slirp.sock",
            {
                "execute": "add_hostfwd",
                "arguments": {"proto": "tcp", "host_addr": address, "host_port": port, "guest_port": guest_port},
            },
        )
        if "error" in reply:
            raise MachineError(self.name, f"cannot forward {address}:{port} to port {guest_port}: {reply['error']}")
        return port

    def console_tail(self, lines: int = 25) -> str:
        """Return the last lines the machine printed on its console."""
        text = self._read("console.log", "")
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def exec(
        self, *argv: str, check: bool = True, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine as its root; return the result.

        In a ``host_root`` machine the command is the host's root with every capability,
        like root on an EC2 instance (chattr +i, mknod), which root reached over SSH is not:
        it enters the machine's mount, uts, ipc, network, pid and cgroup namespaces but not
        its user namespace. In a contained machine it enters the user namespace too: root
        there has only the machine's capabilities (a host process whose uids are not the
        machine's would see its files, chown and ACLs shifted). For the host and tests only.
        """
        leader = self.leader
        if leader is None:
            raise MachineError(self.name, "not running")
        namespaces = ["-m", "-u", "-i", "-n", "-p", "-C"] if self.base == 0 else ["-a"]
        done = subprocess.run(
            ["nsenter", "-t", str(leader), *namespaces, "--wdns=/", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
        )
        if check and done.returncode != 0:
            raise MachineError(self.name, f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return done

    # ------------------------------------------------------------ volumes

    def attach(self, disk: Disk) -> str:
        """Plug ``disk`` into the running machine; return the host's loop device."""
        leader = self.leader
        if leader is None:
            raise MachineError(self.name, "not running")
        loop, major, minor = self._record_loop(disk)
        dev = Path(f"/proc/{leader}/root/dev")
        node = dev / disk.node
        if node.exists():
            raise MachineError(self.name, f"/dev/{disk.node} is already attached")
        os.mknod(node, 0o660 | 0o060000, os.makedev(major, minor))
        os.chown(node, self.base, self.base + 6)
        links = [dev / "disk/by-id" / disk.by_id] if disk.by_id else []
        uuid_ = _fs_uuid(loop)
        if uuid_:
            (dev / "disk/by-uuid").mkdir(exist_ok=True)
            links.append(dev / "disk/by-uuid" / uuid_)
        for link in links:
            link.unlink(missing_ok=True)
            link.symlink_to(f"../../{disk.node}")
            os.lchown(link, self.base, self.base)
        self.announce(disk.node)
        return loop

    def announce(self, node: str) -> list[str]:
        """Do for /dev/<node>, just plugged, what udev and systemd do on an instance; return the units started.

        The machine's own udev rules engine evaluates the device (``inside/uevent``: its
        ``udevadm test``, no side effects left); when its rules tag the device for systemd,
        the units their SYSTEMD_WANTS name are started, as systemd starts them when a device
        appears. Nothing here knows any unit. A failure is logged, never raised: a kernel's
        uevent cannot fail an attach either.
        """
        try:
            done = self.exec("bash", "-s", node, check=True, timeout=120, input_text=(INSIDE / "uevent").read_text())
            found = dict(line.split("=", 1) for line in done.stdout.splitlines() if UDEV_PROPERTY.fullmatch(line))
            wanted = found.get("SYSTEMD_WANTS", "").split() if ":systemd:" in found.get("TAGS", "") else []
            if wanted:
                self.exec("systemctl", "start", "--no-block", "--", *wanted, timeout=60)
                log.info("%s: /dev/%s appeared: started %s (its udev rules' SYSTEMD_WANTS)", self.name, node, wanted)
            return wanted
        except (MachineError, subprocess.TimeoutExpired) as exc:
            log.warning("%s: /dev/%s: udev's part of its uevent failed: %s", self.name, node, exc)
            return []

    def detach(self, node: str) -> None:
        """Unplug the volume shown as /dev/<node> and free its loop device."""
        leader = self.leader
        loops = self._loops()
        entry = next((e for e in loops if e["node"] == node), None)
        if entry is None:
            raise MachineError(self.name, f"no volume at /dev/{node}")
        if leader is not None:
            dev = Path(f"/proc/{leader}/root/dev")
            (dev / node).unlink(missing_ok=True)
            for links in (dev / "disk/by-id", dev / "disk/by-uuid"):
                for link in links.iterdir() if links.is_dir() else ():
                    if os.readlink(link) == f"../../{node}":
                        link.unlink()
        _, devices = _cgroup_dirs(self.name)
        if devices and (devices / "payload").is_dir():
            for level in (devices / "payload", devices):
                _write_quiet(level / "devices.deny", f"b {entry['major']}:{entry['minor']} rwm")
        _detach_loop(str(entry["loop"]))
        self._save_loops([e for e in loops if e["node"] != node])

    def _record_loop(self, disk: Disk) -> tuple[str, int, int]:
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(disk.image)], capture_output=True, text=True, check=False
        )
        if loop.returncode != 0:
            raise EnvironmentProblem(
                f"losetup {disk.image}: {loop.stderr.strip()}", hint="are loop devices available (modprobe loop)?"
            )
        path = loop.stdout.strip()
        st = os.stat(path)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self._save_loops(
            [
                *self._loops(),
                {
                    "node": disk.node,
                    "loop": path,
                    "major": major,
                    "minor": minor,
                    "by_id": disk.by_id or "",
                    "uuid": _fs_uuid(path),
                    "image": str(disk.image),
                },
            ]
        )
        _, devices = _cgroup_dirs(self.name)
        if devices and devices.is_dir():
            for level in (devices, devices / "payload"):
                if level.is_dir():
                    (level / "devices.allow").write_text(f"b {major}:{minor} rwm")
        return path, major, minor

    def _disk_specs(self) -> Iterator[str]:
        for entry in self._loops():
            yield f"{entry['node']}:{entry['major']}:{entry['minor']}:{entry['by_id']}:{entry.get('uuid', '')}"

    def _loops(self) -> list[dict[str, str | int]]:
        text = self._read("loops.json", "")
        return list(json.loads(text)) if text else []

    def _save_loops(self, loops: list[dict[str, str | int]]) -> None:
        self._write("loops.json", json.dumps(loops))

    # ------------------------------------------------------------ stop

    def stop(self, *, clean: bool = False, keep_state: bool = False, grace: float = 30) -> None:
        """Stop the machine and remove everything it used on the host (idempotent).

        ``clean`` halts systemd first (SIGRTMIN+3) so filesystems are synced; otherwise
        PID 1 is killed at once. ``keep_state`` keeps the upper layer and the state
        directory (for a later start of the same root); loop devices are always freed.
        """
        leader = self.leader
        if leader and clean:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGRTMIN + 3)
            _wait_gone(leader, grace)
        if leader:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        for pid_file in ("unshare.pid", "slirp.pid", "script.pid", "broker.pid"):
            pid = self._read(pid_file, "").strip()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                _wait_gone(int(pid), 5)
        for entry in self._loops():
            _detach_loop(str(entry["loop"]))
        if self.state.exists():
            self._save_loops([])
        _remove_cgroups(self.name)
        if not keep_state:
            shutil.rmtree(self.state, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    def _make_cgroups(self) -> None:
        cgroup, devices = _cgroup_dirs(self.name)
        # A machine of this name that was killed (its supervisor with it) leaves its cgroups;
        # a v1 devices cgroup with a child refuses a new deny list (EINVAL): start afresh.
        _remove_cgroups(self.name)
        for top in (cgroup, devices):
            if top is not None and top.exists():
                raise MachineError(
                    self.name, f"cgroup {top} of an earlier machine of this name still has processes in it"
                )
        for sub in ("supervisor", "payload"):
            (cgroup / sub).mkdir(parents=True, exist_ok=True)
        # Delegated to the machine's root, as systemd delegates to a container: PID 1 moves
        # itself from supervisor to payload (which needs the common parent's cgroup.procs),
        # and its systemd makes its own cgroups below payload.
        os.chown(cgroup / "cgroup.procs", self.base, self.base)
        for path in (cgroup / "payload", *(cgroup / "payload" / f for f in _DELEGATED)):
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, self.base, self.base)
        if devices:
            devices.mkdir(parents=True, exist_ok=True)
            (devices / "devices.deny").write_text("a")
            for rule in DEVICES_ALLOWED:
                (devices / "devices.allow").write_text(rule)
            (devices / "payload").mkdir(exist_ok=True)

    def _read(self, name: str, default: str | None = None) -> str:
        try:
            return (self.state / name).read_text()
        except FileNotFoundError:
            if default is None:
                raise MachineError(self.name, f"no state file {name} (not started?)") from None
            return default

    def _write(self, name: str, text: str) -> None:
        (self.state / name).write_text(text)


def _cgroup_dirs(name: str) -> tuple[Path, Path | None]:
    """Return (cgroup2 dir of the machine, cgroup v1 devices dir or None)."""
    v2 = _mount_of("cgroup2") or Path("/sys/fs/cgroup")
    devices = _devices_root()
    return v2 / "ebsrole" / name, (devices / "ebsrole" / name) if devices else None


def _mount_of(fstype: str) -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == fstype:
            return Path(fields[1])
    return None


def _devices_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup" and "devices" in fields[3].split(","):
            return Path(fields[1])
    return None


def _remove_cgroups(name: str) -> None:
    for top in _cgroup_dirs(name):
        if top is None or not top.exists():
            continue
        for _ in range(50):
            for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
            if not top.exists():
                break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            top.parent.rmdir()


def _is_pid1(pid: int) -> bool:
    """Return True when ``pid`` is PID 1 of a namespace below the host's."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
    return len(ids) == 2 and ids[1] == "1"


def _fs_uuid(device: str) -> str:
    """Return the UUID of the filesystem on ``device`` ("" when it has none).

    Machines have no udev, so the host makes the /dev/disk/by-uuid link that fstab
    lines by UUID (and systemd's mount units made from them) need at boot.
    """
    done = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "UUID", device], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _detach_loop(loop: str) -> None:
    subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie still answers kill(0): reap it when it is ours.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        time.sleep(0.02)


def _write_quiet(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(text)


def _slirp_api(sock_path: Path, request: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_path))
        sock.sendall(json.dumps(request).encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    reply: dict[str, object] = json.loads(data or b"{}")
    return reply

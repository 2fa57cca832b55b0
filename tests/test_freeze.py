"""--freeze: only the role's data volume is ever frozen, and it always thaws within a bound.

EC2 is the sandbox's endpoint; the instance is one of its real machines (systemd as PID 1,
OpenSSH, the data volume a real loop device with ext4), so fsfreeze, the systemd timer
that guards a freeze and a write blocked on a frozen filesystem are all real.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from builder import freeze as freezing
from builder.aws.ec2 import EC2
from builder.backups import MARKER, RoleInstance, role_instances
from builder.errors import FreezeRefused
from builder.remote import Remote
from tests.conftest import MINI_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import Instance, World

BOUND = 4.0  # the watchdog's bound in these tests, seconds


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    shutil.copy(PROJECT / "roles/defaults.yaml", path)
    (path / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    return path


@pytest.fixture(scope="module")
def instance(world: World, roles: Path) -> Iterator[Instance]:
    """One running instance of a role without packages, shared by the module's tests."""
    built = world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    launched = world.launch(json.loads(built.stdout)["builds"][0]["ami"])
    yield launched
    # Whatever a failed test left frozen: a frozen loop device would hang the sandbox's reset.
    with Remote.connect(launched.address, 22, "admin", launched.login, launched.host_key, deadline=60) as remote:
        remote.run("sudo -n fsfreeze --unfreeze /data", timeout=30)
    world.client().terminate_instances(InstanceIds=[launched.id])


@pytest.fixture(scope="module")
def volume(world: World, instance: Instance) -> RoleInstance:
    """The instance's data volume as the snapshot command finds it."""
    found = [i for i in role_instances(EC2(world.client()), ["mini"]) if i.instance_id == instance.id]
    assert len(found) == 1 and found[0].mount_point == "/data"
    return found[0]


@pytest.fixture(scope="module")
def login(instance: Instance, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The instance's login key and its pinned host key, as files an operator has."""
    where = tmp_path_factory.mktemp("login")
    key = where / "key"
    key.write_text(instance.login.private_openssh)
    key.chmod(0o600)
    known = where / "known_hosts"
    known.write_text(f"{instance.address} {' '.join(instance.host_key.public_line.split()[:2])}\n")
    return key, known


def fresh(instance: Instance) -> Remote:
    """A new SSH session to the instance (not the one a test may have killed)."""
    return Remote.connect(instance.address, 22, "admin", instance.login, instance.host_key, deadline=60)


def root(remote: Remote, command: str, timeout: float = 30) -> str:
    result = remote.run(f"sudo -n bash -c {_quote(command)}", timeout=timeout, on_line=lambda *_: None)
    assert result.exit_status == 0, f"{command!r} exited {result.exit_status}:\n{result.tail()}"
    return result.stdout


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def watchdogs(remote: Remote) -> str:
    """The ebsrole watchdog units systemd still knows on the instance ("" when none)."""
    return root(remote, f"systemctl list-units --all --plain --no-legend '{freezing.UNIT_PREFIX}*' || true").strip()


def timed_write(remote: Remote, path: str, timeout: float) -> float:
    """Write a file on the instance; return the seconds it took (a write waits while its filesystem is frozen)."""
    started = time.monotonic()
    root(remote, f"date > {path} && sync -f {path}", timeout=timeout)
    return time.monotonic() - started


def snapshot(world: World, roles: Path, login: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    key, known = login
    return world.cli(
        "snapshot", "mini", "--roles-dir", str(roles), "--sandbox", "--freeze", "--identity", str(key),
        "--known-hosts", str(known), *args,
    )  # fmt: skip


def snapshots_of(world: World, volume_id: str) -> set[str]:
    found = world.client().describe_snapshots(Filters=[{"Name": "tag:ebsrole:source-volume", "Values": [volume_id]}])
    return {s["SnapshotId"] for s in found["Snapshots"]}


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", sorted(freezing.SCRIPTS))
def test_scripts_pass_shellcheck(name: str, tmp_path: Path) -> None:
    plain = RoleInstance("i-1", "mini", "", "a", "", "vol-0abc", "/dev/sdf", "/data")
    path = tmp_path / f"{name}.sh"
    path.write_text("#!/bin/bash\n" + freezing.render(freezing.SCRIPTS[name], plain, "ebsrole-thaw-0a1b", 2.5))
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = Path(sys.executable).with_name("shellcheck")
    done = subprocess.run([str(shellcheck), "--severity=style", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_values_reach_the_script_as_data(tmp_path: Path) -> None:
    hostile = "/data/$(touch pwned) 'x' `touch y`;touch z"
    volume = RoleInstance("i-1", "mini", "", "a", "", "vol-0abc", "/dev/sdf", hostile)
    script = freezing.render(freezing.SCRIPTS["check"], volume)
    done = subprocess.run(["bash", "-s"], input=script, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == freezing.REFUSED
    assert (
        done.stderr
        == f"refused: the volume is not mounted at {hostile} (freezing it would freeze the root filesystem)\n"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- never the wrong filesystem


@needs_root
def test_unmounted_volume_is_refused_and_root_never_frozen(
    world: World, roles: Path, instance: Instance, volume: RoleInstance, login: tuple[Path, Path]
) -> None:
    remote = fresh(instance)
    before = snapshots_of(world, volume.volume_id)
    root(remote, "umount /data")  # what nofail allows at boot: the instance runs, the volume is not mounted
    try:
        done = snapshot(world, roles, login, "--freeze-timeout", str(BOUND), "--format", "json")
        assert done.returncode == 1, done.stderr
        (mine,) = [s for s in json.loads(done.stdout)["snapshots"] if s["instance_id"] == instance.id]
        assert mine["result"] == "failed" and mine["snapshot_id"] is None and not mine["frozen"]
        assert f"{instance.id}: refusing to freeze /data for volume {volume.volume_id}" in mine["error"]
        assert "not mounted at /data" in mine["error"]
        # Nothing was done: no snapshot, no marker written onto root's empty /data, no watchdog.
        assert snapshots_of(world, volume.volume_id) == before
        assert root(remote, "ls -A /data").strip() == ""
        assert watchdogs(remote) == ""
        assert timed_write(remote, "/var/tmp/root-probe", timeout=10) < 5  # root is not frozen
    finally:
        root(remote, "mountpoint -q /data || mount /data")
    assert root(remote, "findmnt -rn -o SOURCE --mountpoint /data").strip() == "/dev/xvdf"
    remote.close()


@needs_root
@pytest.mark.parametrize(
    ("cover", "reason"),
    [
        ("mkdir -p /var/tmp/not-data && mount --bind /var/tmp/not-data /data", "is a mount of the root filesystem"),
        ("mount -t tmpfs scratch /data", "is a mount of scratch"),
    ],
    ids=["root-bind-mount", "tmpfs"],
)
def test_something_else_mounted_on_top_is_refused(
    instance: Instance, volume: RoleInstance, cover: str, reason: str
) -> None:
    remote = fresh(instance)
    root(remote, cover)
    try:
        with pytest.raises(FreezeRefused) as refused:
            freezing.freeze(remote, volume, BOUND)
        message = refused.value.render()
        assert f"{instance.id}: refusing to freeze /data for volume {volume.volume_id}: /data {reason}" in message
        assert f"not of volume {volume.volume_id}" in message or "root filesystem" in message
        assert watchdogs(remote) == ""
        assert timed_write(remote, "/data/covered-probe", timeout=10) < 5
    finally:
        root(remote, "umount /data")  # the cover only: the volume stays mounted underneath
    assert root(remote, "findmnt -rn -o SOURCE --mountpoint /data").strip() == "/dev/xvdf"
    remote.close()


@needs_root
def test_root_itself_is_refused(instance: Instance, volume: RoleInstance) -> None:
    with fresh(instance) as remote:
        with pytest.raises(FreezeRefused, match="/ is the root filesystem"):
            freezing.freeze(remote, dataclasses.replace(volume, mount_point="/"), BOUND)
        with pytest.raises(FreezeRefused, match="is not attached"):
            freezing.check_mount(
                remote, dataclasses.replace(volume, volume_id="vol-0ffffffffffffffff", device="/dev/sdz")
            )


# ---------------------------------------------------------------- always thawed

# A client that freezes through the library, says so, and waits to be killed.
FREEZE_AND_HANG = """
import sys, time
from pathlib import Path
from builder.backups import RoleInstance
from builder.freeze import freeze
from builder.keys import KeyPair
from builder.remote import Remote
address, key, host_key, volume, bound = sys.argv[1:]
remote = Remote.connect(address, 22, "admin", KeyPair.from_file(Path(key)), host_key, deadline=60)
freeze(remote, RoleInstance("i", "mini", "", "", address, volume, "/dev/sdf", "/data"), float(bound))
print("frozen", flush=True)
time.sleep(600)
"""


@needs_root
def test_killed_client_leaves_the_volume_thawed_within_the_bound(
    instance: Instance, volume: RoleInstance, login: tuple[Path, Path]
) -> None:
    key, _ = login
    client = subprocess.Popen(
        [sys.executable, "-c", FREEZE_AND_HANG, instance.address, str(key), instance.host_key.public_line,
         volume.volume_id, str(BOUND)],
        cwd=PROJECT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "frozen"
        frozen_at = time.monotonic()
        client.send_signal(signal.SIGKILL)  # the client dies, and its SSH connection with it
        client.wait(timeout=10)
    finally:
        client.kill()
    remote = fresh(instance)
    try:
        # The write waits on the frozen filesystem until the watchdog thaws it: not sooner, not much later.
        timed_write(remote, "/data/after-kill", timeout=BOUND + 30)
        waited = time.monotonic() - frozen_at
    finally:  # without a watchdog it stays frozen: thaw it, or every later test hangs on it
        with fresh(instance) as rescue:
            rescue.run("sudo -n fsfreeze --unfreeze /data", timeout=30)
    assert BOUND - 1 <= waited <= BOUND + 3, (
        f"written {waited:.1f} s after the freeze; the watchdog's bound is {BOUND} s"
    )
    assert root(remote, "cat /data/after-kill").strip()
    assert watchdogs(remote) == ""  # the watchdog ran once and is gone
    remote.close()


@needs_root
def test_an_action_outlasting_the_bound_is_thawed_by_the_watchdog_and_says_so(
    instance: Instance, volume: RoleInstance
) -> None:
    with fresh(instance) as remote:
        value, thawed = freezing.while_frozen(remote, volume, lambda: time.sleep(BOUND + 1.5) or "done", BOUND)
        assert value == "done" and thawed == freezing.Thawed(BOUND, "watchdog")
        assert timed_write(remote, "/data/after-watchdog", timeout=10) < 5
        assert watchdogs(remote) == ""


@needs_root
def test_snapshot_freeze_reports_its_frozen_time_and_leaves_nothing_frozen(
    world: World, roles: Path, instance: Instance, volume: RoleInstance, login: tuple[Path, Path]
) -> None:
    remote = fresh(instance)
    done = snapshot(world, roles, login, "--freeze-timeout", "30", "--as-of", "2026-01-01", "--format", "json")
    assert done.returncode == 0, done.stderr
    (mine,) = [s for s in json.loads(done.stdout)["snapshots"] if s["instance_id"] == instance.id]
    assert mine["result"] == "created" and mine["frozen"] and mine["thawed_by"] == "ebsrole"
    assert 0 < mine["frozen_seconds"] < 30
    assert root(remote, f"cat /data/{MARKER}").strip() == mine["marker"]
    assert watchdogs(remote) == ""  # cancelled after the thaw
    assert timed_write(remote, "/data/after-snapshot", timeout=10) < 5

    text = snapshot(world, roles, login, "--as-of", "2026-01-02")
    assert text.returncode == 0, text.stderr
    (line,) = [line for line in text.stdout.splitlines() if instance.id in line]
    assert line.startswith("created") and " frozen " in line and line.endswith(" s")
    seconds = float(line.split(" frozen ")[1].removesuffix(" s"))
    assert 0 < seconds < freezing.DEFAULT_TIMEOUT
    assert watchdogs(remote) == ""
    assert timed_write(remote, "/data/after-snapshot-2", timeout=10) < 5
    remote.close()


def test_freeze_timeout_out_of_range_is_refused(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    done = run_cli("snapshot", "--freeze", "--identity", str(tmp_path / "k"), "--freeze-timeout", "0")
    assert done.returncode == 2 and "--freeze-timeout 0: give 1 to 900 seconds" in done.stderr


def test_marker_never_lands_on_root_when_the_volume_is_not_mounted(
    world: World, roles: Path, instance: Instance, volume: RoleInstance, login: tuple[Path, Path]
) -> None:
    """Without --freeze an unmounted volume is still snapshotted (its data is data), but unmarked."""
    remote = fresh(instance)
    key, known = login
    root(remote, "umount /data")
    try:
        done = world.cli(
            "snapshot", "mini", "--roles-dir", str(roles), "--sandbox", "--identity", str(key),
            "--known-hosts", str(known), "--as-of", "2026-11-01", "--format", "json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (mine,) = [s for s in json.loads(done.stdout)["snapshots"] if s["instance_id"] == instance.id]
        assert mine["result"] == "created" and mine["marker"] is None
        assert f"/data holds no mount of {volume.volume_id}" in done.stderr
        assert root(remote, "ls -A /data").strip() == ""  # nothing written onto root
        tags = world.client().describe_snapshots(SnapshotIds=[mine["snapshot_id"]])["Snapshots"][0].get("Tags", [])
        assert "ebsrole:marker" not in {t["Key"] for t in tags}
    finally:
        root(remote, "mountpoint -q /data || mount /data")
    remote.close()

"""No stop on the critical path: the builder is frozen (data, then root), snapshotted, thawed, terminated.

Against the sandbox: its snapshots copy the bytes at the CreateSnapshot call, so what they hold
is what the builder's filesystems held at that instant.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder import tags
from builder.aws.ec2 import EC2
from builder.pipeline import BuildOptions, build
from builder.remote import Remote
from builder.roles import load_role
from builder.sandbox import control
from builder.sandbox.dataplane import INDEX
from tests.machines import needs_root
from tests.sandbox import BASE_AMI, REGION, World, clean, wait_until
from tests.test_boot import boot_and_plug_late

pytestmark = needs_root

MARK = "written-just-before-the-freeze"


def writing_before_the_freeze(*args: Any, **kwargs: Any) -> Remote:
    """Connect; the session writes a file on data and on root (not synced) just before it freezes them."""
    remote = Remote.connect(*args, **kwargs)
    original = remote.hold

    def hold(command: str, stdin: str, ready: str, timeout: float) -> Any:
        remote.check(f"sudo -n sh -c 'echo {MARK} > /data/marker; echo {MARK} > /root/marker'")
        return original(command, stdin, ready, timeout)

    remote.hold = hold  # type: ignore[method-assign]
    return remote


def snapshot_file(world: World, snapshot_id: str, suffix: str) -> Path:
    (found,) = world.state.rglob(f"{snapshot_id}{suffix}")
    return found


def test_a_stop_free_build_snapshots_both_filesystems_as_of_the_freeze(
    world: World, mini_dir: Path, tmp_path: Path
) -> None:
    ec2 = EC2.connect(REGION, None, world.endpoint, credentials=control.credentials(world.state))
    role = load_role("mini", mini_dir)
    options = BuildOptions(manifest_path=tmp_path / "manifest.json", connect=writing_before_the_freeze)
    manifest = build(role, ec2, options)

    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["status"] == "complete" and doc["snapshot_way"] == "frozen"
    steps = [s["step"] for s in doc["steps"]]
    assert "freeze and snapshot" in steps and "stop builder" not in steps
    assert "stop_instances" not in doc["api_calls_by_action"]
    assert not clean(world.status())
    # The sandbox keeps RegisterImage's tags, as EC2 does: the AMI names its snapshots from its
    # creation, and one CreateTags marks it and both snapshots complete.
    assert doc["api_calls_by_action"]["create_tags"] == 1
    image = ec2.call("describe_images", ImageIds=[str(manifest.ami)])["Images"][0]
    assert tags.tags_of(image)[tags.SEED_SNAPSHOT] == manifest.seed_snapshot
    artefacts = [str(manifest.ami), str(manifest.seed_snapshot), str(manifest.root_snapshot)]
    snapshots = ec2.call("describe_snapshots", SnapshotIds=artefacts[1:])["Snapshots"]
    for described in [image, *snapshots]:
        assert tags.tags_of(described)[tags.STATUS] == "complete"
        assert tags.tags_of(described)[tags.AMI] == manifest.ami
    # The data snapshot: the file is in it, and its filesystem is clean (no journal to replay).
    image = snapshot_file(world, str(manifest.seed_snapshot), ".img")
    cat = subprocess.run(["debugfs", "-R", "cat /marker", str(image)], capture_output=True, text=True, check=True)
    assert cat.stdout.strip() == MARK
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features:"))
    assert "needs_recovery" not in features  # frozen: the journal was flushed, nothing to replay
    # The root snapshot (the builder's writable tree, copied at the call).
    tree = snapshot_file(world, str(manifest.root_snapshot), ".tree")
    assert (tree / "root" / "marker").read_text().strip() == MARK
    # The AMI restores: a new instance sees the file on its data volume.
    restored = world.launch(str(manifest.ami))
    assert restored.sh("cat /data/marker").strip() == MARK
    world.client().terminate_instances(InstanceIds=[restored.id])
    # The boot check: the AMI's root (its snapshot's tree over its layers) boots as a real VM and
    # mounts a copy of the seed snapshot's volume without a journal replay.
    layers = [Path(p) for p in _index(world)["snapshots"][str(manifest.root_snapshot)]["layers"]]
    volume = tmp_path / "seed.img"
    shutil.copyfile(image, volume)
    _boot_and_check([tree, *layers], volume, tmp_path)


def _index(world: World) -> dict[str, Any]:
    (index,) = world.state.rglob(INDEX)
    return dict(json.loads(index.read_text()))


def _boot_and_check(layers: list[Path], volume: Path, tmp_path: Path) -> None:
    machine, remote, _ = boot_and_plug_late(layers, volume, tmp_path)
    try:
        wait = "for _ in $(seq 100); do mountpoint -q /data && break; sleep 0.2; done"
        assert remote.check(f"{wait}; sudo -n cat /data/marker /root/marker").stdout.split() == [MARK, MARK]
        kernel = remote.check("sudo -n dmesg").stdout
        assert "recovery complete" not in kernel and "mounted filesystem" in kernel, kernel[-2000:]
    finally:
        remote.close()
        machine.stop()


def test_stop_still_stops_the_builder_first(world: World, mini_dir: Path) -> None:
    built = world.cli("mini", "--roles-dir", str(mini_dir), "--sandbox", "--stop", timeout=300)
    assert built.returncode == 0, built.stderr
    line = next(line for line in built.stdout.splitlines() if line.startswith("mini: AMI "))
    doc = json.loads(Path(line.rsplit("(manifest ", 1)[1].rstrip(")")).read_text())
    assert doc["status"] == "complete" and doc["snapshot_way"] == "stopped"
    steps = [s["step"] for s in doc["steps"]]
    assert "stop builder" in steps and "freeze and snapshot" not in steps
    assert doc["api_calls_by_action"]["stop_instances"] == 1
    assert not clean(world.status())


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    """A sandbox whose snapshots stay `pending` 4.5 s (the fixed latency model at 0.1), not throttled."""
    state = tmp_path_factory.mktemp("slow-sandbox")
    world = World.start(state, latency=("fixed", 0.1, 0.0))
    try:
        yield world
    finally:
        control.reset(state)


def test_a_snapshot_holds_what_was_there_at_its_call_not_what_is_written_while_it_is_pending(
    slow_world: World,
) -> None:
    """Point in time: what is written once CreateSnapshot has answered, while the snapshot is still
    `pending`, is in neither the data nor the root snapshot, not even once they are `completed`."""
    ec2 = slow_world.client()
    instance = slow_world.launch(BASE_AMI)
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["State"] == "available", 30, "volume")
    ec2.attach_volume(VolumeId=volume, InstanceId=instance.id, Device="/dev/sdf")
    # No journal: `sync` puts every block in its place, so debugfs reads the image as the guest left it.
    plug = "for _ in $(seq 100); do [ -b /dev/xvdf ] && break; sleep 0.1; done"
    instance.sh(f"{plug}; mkfs.ext4 -q -O ^has_journal /dev/xvdf && mkdir /mnt/v && mount /dev/xvdf /mnt/v")
    instance.sh("echo at-the-call | tee /mnt/v/a /root/a >/dev/null; sync")
    described = slow_world.describe(instance.id)
    (root,) = (m["Ebs"]["VolumeId"] for m in described["BlockDeviceMappings"] if m["DeviceName"] == "/dev/xvda")
    snapshots = [ec2.create_snapshot(VolumeId=v)["SnapshotId"] for v in (volume, root)]
    instance.sh("echo after-the-call | tee /mnt/v/a /mnt/v/b /root/a /root/b >/dev/null; sync")

    def states() -> set[str]:
        return {s["State"] for s in ec2.describe_snapshots(SnapshotIds=snapshots)["Snapshots"]}

    assert states() == {"pending"}  # the second writes came while both snapshots were in progress
    wait_until(lambda: states() == {"completed"}, 30, "both snapshots completed")
    image = snapshot_file(slow_world, snapshots[0], ".img")
    debugfs = ["debugfs", "-R", "cat /a", str(image)]
    assert subprocess.run(debugfs, capture_output=True, text=True, check=True).stdout == "at-the-call\n"
    listing = subprocess.run(["debugfs", "-R", "ls -p /", str(image)], capture_output=True, text=True, check=True)
    assert {line.split("/")[5] for line in listing.stdout.split()} == {".", "..", "lost+found", "a"}
    tree = snapshot_file(slow_world, snapshots[1], ".tree") / "root"
    assert (tree / "a").read_text() == "at-the-call\n" and not (tree / "b").exists()
    assert instance.sh("cat /mnt/v/a /mnt/v/b /root/a /root/b").split() == ["after-the-call"] * 4
    ec2.terminate_instances(InstanceIds=[instance.id])

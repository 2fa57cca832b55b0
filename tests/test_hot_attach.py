"""Hot attach and grow on restore: a role instance goes live when its volume is attached after
boot, and a volume larger than its snapshot is grown into.

The machines have no udevd; attaching a volume runs the machine's own udev rules engine on
the device (``Machine.announce``) and starts what the rules' SYSTEMD_WANTS name, as systemd
does when a device appears. The rule and the unit are the role's own, from provision.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from builder.keys import KeyPair
from builder.launch import HOST_KEYS, KEY_LINE
from builder.remote import Remote
from builder.roles import load_role
from builder.sandbox import control
from builder.sandbox.machine import Disk, make_image
from builder.userdata import builder_user_data
from tests.conftest import MINI_ROLE, PROJECT, run_cli
from tests.machines import VOLUME_ID, boot, needs_root
from tests.sandbox import World, wait_until

GIB = 1024**3


@pytest.mark.parametrize("verb", ["launch", "drill"])
def test_volume_size_below_one_gib_is_refused_before_any_call(verb: str) -> None:
    done = run_cli(verb, "web", "--volume-size", "0", "--endpoint-url", "http://127.0.0.1:9")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[0] == "error: --volume-size 0: give a size in GiB, at least 1"


@needs_root
def test_only_the_roles_volume_goes_live_grown_and_stops_services_first(
    rootfs: Path, state_root: Path, tmp_path: Path
) -> None:
    """A provisioned machine whose volume is gone: another filesystem plugged in is left alone;
    its own volume, grown by 1 GiB, is grown into and mounted; stopping the unit unmounts it."""
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    booted = boot("hot", rootfs, state_root, role=load_role("mini", roles))
    machine = booted.machine
    try:
        booted.provision()
        booted.root_sh("echo kept > /srv/app/marker && sync && systemctl stop data.mount")
        machine.detach("xvdf")
        other = make_image(tmp_path / "other.img", 1)
        subprocess.run(["mkfs.ext4", "-q", "-L", "mini", str(other)], check=True)  # same label, other UUID
        assert machine.attach(Disk(other, "xvdg", "vol-0aaaaaaaaaaaaaaaa"))
        assert machine.announce("xvdg") == []  # its rules want nothing for another filesystem
        assert booted.root_sh("findmnt -n /data || true").strip() == ""
        assert booted.root_sh("systemctl is-active ebsrole-data-live || true").strip() != "active"

        os.truncate(booted.disk.image, 3 * GIB)  # restored onto a volume larger than its snapshot
        machine.attach(Disk(booted.disk.image, "xvdf", VOLUME_ID))
        assert machine.announce("xvdf") == ["ebsrole-data-live.service"]  # again: started once, no harm
        wait_until(lambda: booted.root_sh("findmnt -n -o SOURCE /data || true").strip() == "/dev/xvdf", 60, "/data")
        assert booted.root_sh("cat /srv/app/marker").strip() == "kept"
        assert int(booted.root_sh("df -B1 --output=size /data | tail -n 1")) > 2 * GIB  # 2 GiB: not grown
        journal = booted.root_sh("journalctl -u ebsrole-data-grow --no-pager")
        assert "grown from 2147483648 to 3221225472 bytes" in journal, journal

        booted.root_sh("systemctl stop ebsrole-data-live")
        assert booted.root_sh("findmnt -n /data || true").strip() == ""
    finally:
        booted.remote.close()
        machine.stop(clean=True)


# ---------------------------------------------------------------- the sandbox, with plain awscli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state)
    try:
        yield world
    finally:
        control.reset(state)
        assert not state.exists()


@pytest.fixture(scope="module")
def web(world: World) -> dict[str, str]:
    """The web role built in the sandbox: its manifest (ami, seed_snapshot)."""
    built = world.cli("web", "--sandbox", "--format", "json", timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]
    return dict(json.loads(built.stdout)["builds"][0])


def _awscli(world: World, tmp_path: Path, script: str, **env: str) -> list[str]:
    venv = Path(sys.executable).parent
    assert (venv / "aws").exists(), "awscli is missing: pip install -r requirements-dev.txt"
    full = {
        **control.loopback_only_env(tmp_path),
        "PATH": f"{venv}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "EBSROLE_SANDBOX": str(world.state),
        **env,
    }
    done = subprocess.run(
        ["bash", "-c", 'set -euo pipefail\neval "$("$PYTHON" build.py sandbox env)"\n' + script],
        cwd=PROJECT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            return page.status, page.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


@needs_root
@pytest.mark.slow
def test_awscli_attach_volume_from_the_seed_makes_web_live(world: World, web: dict[str, str], tmp_path: Path) -> None:
    """The original recipe: run the web AMI without its data device, create a volume from the
    seed snapshot, attach it at /dev/sdf: Apache serves the seed's page."""
    login, host_key = KeyPair.generate("hot"), KeyPair.generate("hot-host")
    (tmp_path / "user-data").write_text(builder_user_data(login, host_key))
    instance_id, az, address = _awscli(
        world,
        tmp_path,
        """sg=$(aws ec2 create-security-group --group-name hot-web --description http --query GroupId --output text)
aws ec2 authorize-security-group-ingress --group-id "$sg" --protocol tcp --port 80 --cidr 127.0.0.0/8 >/dev/null
id=$(aws ec2 run-instances --image-id "$AMI" --instance-type t3.small --security-group-ids "$sg" \
    --user-data "file://$USER_DATA" --block-device-mappings 'DeviceName=/dev/sdf,NoDevice=""' \
    --query 'Instances[0].InstanceId' --output text)
aws ec2 wait instance-running --instance-ids "$id"
aws ec2 describe-instances --instance-ids "$id" --output text \
    --query 'Reservations[0].Instances[0].[InstanceId,Placement.AvailabilityZone,PublicIpAddress]'
""",
        AMI=web["ami"],
        USER_DATA=str(tmp_path / "user-data"),
    )
    remote = Remote.connect(address, 22, "admin", login, host_key, deadline=120)
    try:
        # Booted without its volume: nothing at /data, Apache down, no page.
        remote.check("sudo -n systemctl is-system-running --wait || true", timeout=300)
        assert remote.run("findmnt -n /data").stdout.strip() == ""
        assert remote.run("systemctl is-active apache2").stdout.strip() != "active"
        assert _http(f"http://{address}/")[0] != 200

        (volume_id,) = _awscli(
            world,
            tmp_path,
            """vol=$(aws ec2 create-volume --snapshot-id "$SNAP" --availability-zone "$AZ" --query VolumeId --output text)
aws ec2 wait volume-available --volume-ids "$vol"
aws ec2 attach-volume --volume-id "$vol" --instance-id "$ID" --device /dev/sdf >/dev/null
aws ec2 wait volume-in-use --volume-ids "$vol"
echo "$vol"
""",
            SNAP=web["seed_snapshot"],
            AZ=az,
            ID=instance_id,
        )
        wait_until(lambda: _http(f"http://{address}/")[0] == 200, 90, "HTTP 200 after attach-volume")
        served = _http(f"http://{address}/")[1]
        assert served == remote.check("sudo -n cat /data/var/www/html/index.html").stdout
        assert remote.check("findmnt -n -o SOURCE /data").stdout.strip() == "/dev/xvdf"
        assert remote.check("systemctl is-active apache2").stdout.strip() == "active"
    finally:
        remote.close()
        world.client().terminate_instances(InstanceIds=[instance_id])
    wait_until(lambda: world.describe(instance_id)["State"]["Name"] == "terminated", 60, "terminated")
    world.client().delete_volume(VolumeId=volume_id)


@needs_root
@pytest.mark.slow
def test_launch_volume_size_grows_the_filesystem(world: World, web: dict[str, str], tmp_path: Path) -> None:
    """`launch --volume-size` larger than the seed: the restored filesystem is that large;
    smaller than the seed: exit 2 naming both sizes, nothing launched."""
    ec2 = world.client()
    seed = ec2.describe_snapshots(SnapshotIds=[web["seed_snapshot"]])["Snapshots"][0]["VolumeSize"]
    before = world.ec2_view()
    small = world.cli("launch", "web", "--from", "seed", "--volume-size", str(seed - 1), "--sandbox")
    assert small.returncode == 2, small.stderr
    assert (
        small.stderr.splitlines()[0]
        == f"error: --volume-size {seed - 1} GiB is smaller than snapshot {web['seed_snapshot']} ({seed} GiB)"
    )
    assert world.ec2_view()["instances"] == before["instances"]

    mine = KeyPair.generate("operator")
    ec2.import_key_pair(KeyName="grow-operator", PublicKeyMaterial=mine.public_line.encode())
    done = world.cli(
        "launch", "web", "--from", "seed", "--volume-size", str(seed + 2), "--key-name", "grow-operator",
        "--sandbox", "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    instance = json.loads(done.stdout)["instances"][0]
    try:
        volume = ec2.describe_volumes(VolumeIds=[instance["volume_id"]])["Volumes"][0]
        assert (volume["Size"], volume["SnapshotId"]) == (seed + 2, web["seed_snapshot"])
        text = ""
        deadline = time.monotonic() + 120
        while not HOST_KEYS.findall(text) and time.monotonic() < deadline:
            text = ec2.get_console_output(InstanceId=instance["instance_id"]).get("Output", "")
            time.sleep(1)
        host_key = "ssh-ed25519 " + dict(KEY_LINE.findall(HOST_KEYS.findall(text)[0]))["ssh-ed25519"]
        remote = Remote.connect(instance["address"], 22, "admin", mine, host_key, deadline=120)
        try:
            size = int(remote.check("df -B1 --output=size /data | tail -n 1").stdout)
            assert size > seed * GIB, f"/data is {size} bytes: not grown beyond the seed's {seed} GiB"
            journal = remote.check("sudo -n journalctl -b -u ebsrole-data-grow --no-pager").stdout
            assert "grown from" in journal, journal
            assert remote.check("systemctl is-active apache2").stdout.strip() == "active"
        finally:
            remote.close()
    finally:
        ec2.terminate_instances(InstanceIds=[instance["instance_id"]])

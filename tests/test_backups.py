"""Backups by design: nightly snapshots and retention, DLM policy, launch from a snapshot, drills, copies.

EC2 is the sandbox's endpoint (moto underneath); instances are its real machines, so
snapshots hold real bytes and restores really boot and mount them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.stub import Stubber

from builder.keys import KeyPair
from builder.remote import Remote
from builder.restore import HOST_KEYS, KEY_LINE
from builder.schedule import dlm_policy
from tests.conftest import MINI_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import REGION, Instance, World

ARN = "arn:aws:iam::123456789012:role/AWSDataLifecycleManagerDefaultRole"


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    shutil.copy(PROJECT / "roles/defaults.yaml", path)
    shutil.copy(PROJECT / "roles/web.yaml", path)
    (path / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    return path


@pytest.fixture(scope="module")
def mini_ami(world: World, roles: Path) -> str:
    built = world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    return str(json.loads(built.stdout)["builds"][0]["ami"])


def cli(world: World, roles: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return world.cli(*args, "--roles-dir", str(roles), "--sandbox")


def pinned(world: World, instance: Instance, tmp_path: Path) -> tuple[Path, Path]:
    """Write the instance's login key and its host key (known_hosts) to files, as an operator has them."""
    key = tmp_path / f"{instance.id}.key"
    key.write_text(instance.login.private_openssh)
    key.chmod(0o600)
    known = tmp_path / f"{instance.id}.known_hosts"
    known.write_text(f"{instance.address} {' '.join(instance.host_key.public_line.split()[:2])}\n")
    return key, known


# ---------------------------------------------------------------- retention


@needs_root
def test_a_month_of_nightly_runs_keeps_exactly_the_policy(world: World, roles: Path, mini_ami: str) -> None:
    instance = world.launch(mini_ami)
    ec2 = world.client()
    mappings = ec2.describe_images(ImageIds=[mini_ami])["Images"][0]["BlockDeviceMappings"]
    seeds = {m["Ebs"]["SnapshotId"] for m in mappings if "Ebs" in m}  # the AMI's root and seed snapshots
    ids: dict[str, str] = {}
    for day in range(1, 31):
        date = f"2026-11-{day:02}"
        done = cli(world, roles, "snapshot", "mini", "--as-of", date, "--keep-daily", "7", "--keep-weekly", "4",
                   "--format", "json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        made = [s for s in report["snapshots"] if s["instance_id"] == instance.id]
        assert [s["result"] for s in made] == ["created"]
        ids[date] = made[0]["snapshot_id"]
        if day == 1:
            # An AMI that names the first night's snapshot: retention must never delete it.
            ec2.register_image(
                Name="keeps-a-nightly", RootDeviceName="/dev/xvda",
                BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": ids[date]}}],
            )  # fmt: skip

    # Safe to run twice: the same night again makes nothing and deletes nothing more.
    again = json.loads(
        cli(world, roles, "snapshot", "mini", "--as-of", "2026-11-30", "--keep-daily", "7", "--keep-weekly", "4",
            "--format", "json").stdout
    )  # fmt: skip
    assert [s["result"] for s in again["snapshots"] if s["instance_id"] == instance.id] == ["exists"]
    assert not [r for r in again["retention"] if r["fate"] == "deleted"]

    left = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    kept = {date for date, snapshot in ids.items() if snapshot in left}
    # 7 newest nights; the newest of each of the 4 most recent ISO weeks (49: 30th, 48: 29th,
    # 47: 22nd, 46: 15th); the 1st because an AMI names it.
    expected = {f"2026-11-{d:02}" for d in (1, 15, 22, 24, 25, 26, 27, 28, 29, 30)}
    assert kept == expected
    assert seeds <= left  # seed and root snapshots of the AMI: never considered
    world.client().terminate_instances(InstanceIds=[instance.id])


@needs_root
def test_freeze_always_unfreezes(world: World, roles: Path, mini_ami: str, tmp_path: Path) -> None:
    instance = world.launch(mini_ami)
    key, known = pinned(world, instance, tmp_path)
    args = ("snapshot", "mini", "--freeze", "--identity", str(key), "--known-hosts", str(known), "--format", "json")

    done = cli(world, roles, *args, "--as-of", "2027-01-01")
    assert done.returncode == 0, done.stderr
    mine = next(s for s in json.loads(done.stdout)["snapshots"] if s["instance_id"] == instance.id)
    assert mine["result"] == "created" and mine["frozen"] and mine["marker"]
    instance.sh("timeout 10 touch /data/thawed-after-success")

    # The snapshot call fails (its bytes cannot be written): the filesystem is thawed anyway.
    snapshots = world.state / "data" / "snapshots"
    subprocess.run(["chattr", "+i", str(snapshots)], check=True)
    try:
        failed = cli(world, roles, *args, "--as-of", "2027-01-02")
    finally:
        subprocess.run(["chattr", "-i", str(snapshots)], check=True)
    assert failed.returncode == 1, failed.stderr
    mine = next(s for s in json.loads(failed.stdout)["snapshots"] if s["instance_id"] == instance.id)
    assert mine["result"] == "failed" and "InternalError" in mine["error"]
    instance.sh("timeout 10 touch /data/thawed-after-failure")
    world.client().terminate_instances(InstanceIds=[instance.id])


# ---------------------------------------------------------------- DLM


def test_dlm_policy_is_a_valid_create_lifecycle_policy_request() -> None:
    dlm = boto3.client("dlm", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y")
    for copy_to in (None, "eu-central-1"):
        policy = dlm_policy("web", execution_role_arn=ARN, time="02:30", keep_daily=7, keep_weekly=4, copy_to=copy_to)
        with Stubber(dlm) as stub:
            stub.add_response("create_lifecycle_policy", {"PolicyId": "policy-0123456789abcdef0"}, policy)
            assert dlm.create_lifecycle_policy(**policy)["PolicyId"] == "policy-0123456789abcdef0"
    details = policy["PolicyDetails"]
    assert details["TargetTags"] == [{"Key": "ebsrole:data-of", "Value": "web"}]
    daily, weekly = details["Schedules"]
    assert daily["CreateRule"]["Times"] == ["02:30"] and daily["RetainRule"] == {"Count": 7}
    assert weekly["CreateRule"]["CronExpression"] == "cron(30 2 ? * SUN *)" and weekly["RetainRule"] == {"Count": 4}
    assert daily["CrossRegionCopyRules"][0]["Target"] == "eu-central-1"


def test_schedule_command_prints_the_policy(roles: Path) -> None:
    done = subprocess.run(
        [sys.executable, "build.py", "schedule", "web",
         "--roles-dir", str(roles), "--execution-role-arn", ARN, "--keep-daily", "10", "--copy-to", "eu-central-1"],
        cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    assert policy["PolicyDetails"]["Schedules"][0]["RetainRule"] == {"Count": 10}
    bad = subprocess.run(
        [sys.executable, "build.py", "schedule", "web", "--roles-dir", str(roles),
         "--execution-role-arn", ARN, "--time", "25:00"],
        cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "--time '25:00'" in bad.stderr


# ---------------------------------------------------------------- launch, drill


def _console_host_key(world: World, instance_id: str) -> str:
    text = world.client().get_console_output(InstanceId=instance_id)["Output"]  # botocore decodes it
    keys = dict(KEY_LINE.findall(HOST_KEYS.findall(text)[0]))
    return f"ssh-ed25519 {keys['ssh-ed25519']}"


@needs_root
@pytest.mark.slow
def test_snapshot_then_restore_elsewhere_serves_the_new_page(world: World, roles: Path, tmp_path: Path) -> None:
    built = cli(world, roles, "web", "--format", "json")
    assert built.returncode == 0, built.stderr[-2000:]
    ec2 = world.client()
    # The operator's own key pair, and a group admitting HTTP.
    mine = KeyPair.generate("operator")
    ec2.import_key_pair(KeyName="operator", PublicKeyMaterial=mine.public_line.encode())
    group = ec2.create_security_group(GroupName="web-http", Description="http")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpProtocol="tcp", FromPort=80, ToPort=80, CidrIp="127.0.0.0/8")

    prod = json.loads(cli(world, roles, "launch", "web", "--from", "seed", "--env", "production", "--key-name", "operator",
                          "--security-group-id", group, "--wait", "--format", "json").stdout)  # fmt: skip
    assert prod["instances"][0]["verified"] is True
    production = prod["instances"][0]
    host_key = _console_host_key(world, production["instance_id"])
    remote = Remote.connect(production["address"], 22, "admin", mine, host_key, deadline=60)
    remote.check("echo '<h1>new page</h1>' | sudo -n tee /var/www/html/new.html >/dev/null && sudo -n sync")
    key = tmp_path / "operator.key"
    key.write_text(mine.private_openssh)
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"{production['address']} {host_key}\n")
    snap = cli(world, roles, "snapshot", "web", "--identity", str(key), "--known-hosts", str(known), "--format", "json")
    assert snap.returncode == 0, snap.stderr

    other_az = f"{REGION}c" if production["az"] != f"{REGION}c" else f"{REGION}d"
    staging = json.loads(cli(world, roles, "launch", "web", "--from", "latest", "--source-env", "production",
                             "--env", "staging", "--az", other_az, "--security-group-id", group, "--wait",
                             "--format", "json").stdout)["instances"][0]  # fmt: skip
    assert staging["az"] == other_az and staging["verified"] is True
    with urllib.request.urlopen(f"http://{staging['address']}/new.html", timeout=30) as page:
        assert page.read().decode().strip() == "<h1>new page</h1>"

    # A drill of the newest nightly snapshot passes and leaves nothing.
    before, host = world.ec2_view(), world.status()
    left = ("machines", "loop_devices", "mounts")
    drill = cli(world, roles, "drill", "web", "--format", "json")
    report = json.loads(drill.stdout)
    assert drill.returncode == 0 and report["passed"], drill.stdout + drill.stderr
    assert report["az"] != report["source_az"] and report["seconds_to_verified"] > 0
    assert {c["check"] for c in report["checks"]} >= {"marker", "service", "http"}
    assert world.ec2_view() == before
    assert {k: world.status()[k] for k in left} == {k: host[k] for k in left}

    # A broken backup (a snapshot of an empty volume) fails the drill with a reason, and leaves nothing.
    empty = ec2.create_volume(Size=10, AvailabilityZone=f"{REGION}a")["VolumeId"]
    broken = ec2.create_snapshot(VolumeId=empty)["SnapshotId"]
    ec2.delete_volume(VolumeId=empty)
    before = world.ec2_view()
    failed = cli(world, roles, "drill", "web", "--from", broken, "--format", "json")
    report = json.loads(failed.stdout)
    assert failed.returncode == 1 and not report["passed"]
    assert any("/var/www" in reason or "mount" in reason for reason in report["reasons"]), report["reasons"]
    assert world.ec2_view() == before
    assert {k: world.status()[k] for k in left} == {k: host[k] for k in left}
    remote.close()
    for instance in (production["instance_id"], staging["instance_id"]):
        ec2.terminate_instances(InstanceIds=[instance])


# ---------------------------------------------------------------- copy to another region


@needs_root
def test_copy_keeps_the_pairing_in_the_other_region(world: World, roles: Path, mini_ami: str) -> None:
    done = cli(world, roles, "copy", "mini", "--to", "eu-west-1", "--format", "json")
    assert done.returncode == 0, done.stderr
    copied = json.loads(done.stdout)
    other = world.client("eu-west-1")
    image = other.describe_images(ImageIds=[copied["ami"]])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    devices = {m["DeviceName"]: m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]}
    assert tags["ebsrole:role"] == "mini" and tags["ebsrole:status"] == "complete"
    assert tags["ebsrole:seed-snapshot"] == devices["/dev/sdf"] == copied["seed_snapshot"]
    assert tags["ebsrole:copied-from"] == f"{REGION}/{mini_ami}"
    seed = other.describe_snapshots(SnapshotIds=[copied["seed_snapshot"]])["Snapshots"][0]
    assert {t["Key"]: t["Value"] for t in seed["Tags"]}["ebsrole:ami"] == copied["ami"]
    # The copy is a real one: it boots in its region with the seed's data.
    restored = world.launch(copied["ami"], region="eu-west-1")
    assert restored.sh("readlink /srv/app").strip() == "/data/srv/app"
    other.terminate_instances(InstanceIds=[restored.id])


@needs_root
def test_build_copy_to_other_regions(world: World, roles: Path) -> None:
    regions = ("eu-central-1", "ap-southeast-2")
    done = cli(world, roles, "mini", *[a for r in regions for a in ("--copy-to", r)], "--format", "json")
    assert done.returncode == 0, done.stderr
    assert "copying ami-" in done.stderr and "at once" in done.stderr
    build = json.loads(done.stdout)["builds"][0]
    assert [c["region"] for c in build["copies"]] == list(regions)
    for copy in build["copies"]:
        assert copy["source_ami"] == build["ami"]
        image = world.client(copy["region"]).describe_images(ImageIds=[copy["ami"]])["Images"][0]
        tags = {t["Key"]: t["Value"] for t in image["Tags"]}
        assert tags["ebsrole:seed-snapshot"] == copy["seed_snapshot"] and tags["ebsrole:fingerprint"]
    own = cli(world, roles, "copy", "mini", "--to", REGION)
    assert own.returncode == 2 and f"--copy-to {REGION}: that is the AMI's own region" in own.stderr


def test_one_failing_copy_does_not_stop_the_others() -> None:
    from moto import mock_aws

    from builder.ec2 import EC2, RETRIES
    from builder.registry import RoleImage
    from builder.restore import CopiesFailed, copy_images

    with mock_aws():
        client = boto3.client("ec2", region_name="us-east-1", config=RETRIES)
        volume = client.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
        snapshot = client.create_snapshot(VolumeId=volume)["SnapshotId"]
        ami = client.register_image(
            Name="mini-1",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}],
        )["ImageId"]
        client.create_tags(Resources=[ami], Tags=[{"Key": "ebsrole:role", "Value": "mini"}])
        image = RoleImage.of(client.describe_images(ImageIds=[ami])["Images"][0])
        refusing = boto3.client("ec2", region_name="eu-west-2", config=RETRIES)
        targets = {"eu-west-2": EC2(refusing), "eu-west-1": EC2(boto3.client("ec2", region_name="eu-west-1"))}
        with Stubber(refusing) as stub:
            stub.add_client_error("copy_image", "InvalidRequest", "copies to this region are disabled")
            with pytest.raises(CopiesFailed) as caught:
                copy_images(EC2(client), targets, image)
        message = caught.value.render()
        assert "copy to eu-west-2: EC2 copy_image: InvalidRequest" in message
        (done,) = caught.value.done
        assert done.region == "eu-west-1" and f"copy to eu-west-1: done, AMI {done.ami}" in message
        copied = targets["eu-west-1"].client.describe_images(ImageIds=[done.ami])["Images"][0]
        assert {"Key": "ebsrole:role", "Value": "mini"} in copied["Tags"]

"""Backups by design: nightly snapshots and retention, DLM policy, launch from a snapshot, drills, copies.

EC2 is the sandbox's endpoint (moto underneath); instances are its real machines, so
snapshots hold real bytes and restores really boot and mount them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.stub import Stubber

from builder.aws.ec2 import EC2
from builder.backups import plan_retention
from builder.errors import InvalidInput
from builder.keys import KeyPair
from builder.launch import HOST_KEYS, KEY_LINE
from builder.remote import Remote
from builder.sandbox import control
from builder.schedule import apply_policy, dlm_policy
from tests.conftest import MINI_ROLE, PROJECT, run_cli
from tests.machines import needs_root
from tests.sandbox import REGION, Instance, World, wait_until

ARN = "arn:aws:iam::123456789012:role/AWSDataLifecycleManagerDefaultRole"
# The fixed latency model (no variance: these checks time the night), scaled: a snapshot
# stays `pending` for 6.75 s, as EC2's do
# for a minute, so a run sees its own night's snapshot pending; instances pend 2.25 s.
SCALE = 0.15


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    """This module's sandbox, with the latency model: snapshots really are `pending` for a while."""
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state, latency=("fixed", SCALE, 0.0))
    try:
        yield world
    finally:
        control.reset(state)
        assert not state.exists()


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


def completed(world: World, snapshot_ids: list[str]) -> bool:
    """Return whether every one of ``snapshot_ids`` that still exists is `completed`."""
    found = world.client().describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": snapshot_ids}])
    return all(s["State"] == "completed" for s in found["Snapshots"])


def existing(world: World, snapshot_ids: list[str]) -> set[str]:
    found = world.client().describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": snapshot_ids}])
    return {s["SnapshotId"] for s in found["Snapshots"]}


def night(world: World, roles: Path, instance: Instance, date: str, *flags: str) -> tuple[int, dict[str, Any], str]:
    """Run `snapshot mini --as-of DATE FLAGS`; return its exit code, this instance's report rows, stderr."""
    done = cli(world, roles, "snapshot", "mini", "--as-of", date, *flags, "--format", "json")
    report = json.loads(done.stdout) if done.stdout.strip() else {"snapshots": [], "retention": []}
    mine = next(s for s in report["snapshots"] if s["instance_id"] == instance.id)
    rows = {r["snapshot_id"]: r for r in report["retention"] if r["volume_id"] == mine["volume_id"]}
    return done.returncode, {"snapshot": mine, "retention": rows}, done.stderr


# ---------------------------------------------------------------- retention


@needs_root
def test_keep_daily_1_while_tonight_is_pending_keeps_yesterday(world: World, roles: Path, mini_ami: str) -> None:
    instance = world.launch(mini_ami)
    code, yesterday, err = night(world, roles, instance, "2026-03-01")
    assert code == 0, err
    first = yesterday["snapshot"]["snapshot_id"]
    wait_until(lambda: completed(world, [first]), 60, "yesterday's snapshot completed")

    code, tonight, err = night(world, roles, instance, "2026-03-02", "--keep-daily", "1")
    assert code == 0, err
    second = tonight["snapshot"]["snapshot_id"]
    rows = tonight["retention"]
    assert existing(world, [first, second]) == {first, second}
    assert rows[first]["fate"] == "kept (daily)"
    assert rows[second].get("state") == "pending" and rows[second]["fate"] == "kept (pending)"  # really pending

    # Once tonight's has completed it is the one kept, and yesterday's goes.
    wait_until(lambda: completed(world, [second]), 60, "tonight's snapshot completed")
    code, again, err = night(world, roles, instance, "2026-03-02", "--keep-daily", "1")
    assert code == 0 and again["retention"][first]["fate"] == "deleted", err
    assert existing(world, [first, second]) == {second}
    world.client().terminate_instances(InstanceIds=[instance.id])


@needs_root
def test_a_failing_night_deletes_nothing(world: World, roles: Path, mini_ami: str) -> None:
    instance = world.launch(mini_ami)
    made = []
    for date in ("2026-04-01", "2026-04-02"):
        code, report, err = night(world, roles, instance, date)
        assert code == 0, err
        made.append(report["snapshot"]["snapshot_id"])
    wait_until(lambda: completed(world, made), 60, "the two nights' snapshots completed")

    # Tonight's snapshot fails (its bytes cannot be written).
    snapshots = world.state / "data" / "snapshots"
    subprocess.run(["chattr", "+i", str(snapshots)], check=True)
    try:
        code, report, err = night(world, roles, instance, "2026-04-03", "--keep-daily", "1")
    finally:
        subprocess.run(["chattr", "-i", str(snapshots)], check=True)
    assert existing(world, made) == set(made)
    volume = report["snapshot"]["volume_id"]
    assert code == 1 and report["snapshot"]["result"] == "failed"
    assert f"snapshot of volume {volume}" in err and "nothing deleted" in err, err
    assert report["retention"] == {}
    world.client().terminate_instances(InstanceIds=[instance.id])


def test_plan_retention_counts_only_completed() -> None:
    def snap(n: int, state: str = "completed", date: str = "") -> dict[str, Any]:
        return {"id": f"s{n}", "state": state, "start": f"2026-05-{n:02}T03:00:00+00:00", "date": date}

    # Newest first by start time; pending and error ones never push a completed one out.
    fates = plan_retention([snap(1), snap(2), snap(3, "pending"), snap(4, "error")], 1, 0)
    assert fates == {"s4": "kept (error, no newer completed)", "s3": "kept (pending)", "s2": "kept (daily)",
                     "s1": "delete"}  # fmt: skip
    # An error snapshot goes once a newer completed one exists.
    assert plan_retention([snap(1, "error"), snap(2)], 1, 0) == {"s1": "delete", "s2": "kept (daily)"}
    # A future date tag does not make a snapshot the newest: its start time ranks it.
    fates = plan_retention([snap(1, date="2099-01-01"), snap(2, date="2026-05-02")], 1, 0)
    assert fates == {"s2": "kept (daily)", "s1": "delete"}
    # Started in the same second (EC2's resolution): the later night is the newer, whatever the ids.
    same = [{**snap(1, date="2026-05-15"), "id": "s1"}, {**snap(1, date="2026-05-14"), "id": "s9"}]
    assert plan_retention(same, 1, 0) == {"s1": "kept (daily)", "s9": "delete"}
    # Nothing completed: nothing is deleted.
    assert set(plan_retention([snap(1, "pending"), snap(2, "error")], 1, 4).values()) == {
        "kept (pending)", "kept (error, no newer completed)"}  # fmt: skip


@needs_root
def test_snapshot_refuses_a_future_night_and_an_unknown_role(world: World, roles: Path) -> None:
    future = cli(world, roles, "snapshot", "mini", "--as-of", "2999-01-01")
    assert future.returncode == 2 and "--as-of 2999-01-01: a night in the future" in future.stderr
    unknown = cli(world, roles, "snapshot", "nosuchrole")
    assert unknown.returncode == 2, unknown.stderr
    assert unknown.stderr.splitlines()[0].endswith("nosuchrole.yaml: no such role"), unknown.stderr


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

    # Nights follow each other here faster than snapshots complete: the pending ones were
    # kept. Once all are completed the same night again brings the volume to the policy,
    wait_until(lambda: completed(world, list(ids.values())), 120, "the month's snapshots completed")
    settled = cli(world, roles, "snapshot", "mini", "--as-of", "2026-11-30", "--keep-daily", "7", "--keep-weekly",
                  "4", "--format", "json")  # fmt: skip
    assert settled.returncode == 0, settled.stderr
    # and is safe to run twice: the same night again makes nothing and deletes nothing more.
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

    done = cli(world, roles, *args, "--as-of", "2026-10-01")
    assert done.returncode == 0, done.stderr
    mine = next(s for s in json.loads(done.stdout)["snapshots"] if s["instance_id"] == instance.id)
    assert mine["result"] == "created" and mine["frozen"] and mine["marker"]
    instance.sh("timeout 10 touch /data/thawed-after-success")

    # The snapshot call fails (its bytes cannot be written): the filesystem is thawed anyway.
    snapshots = world.state / "data" / "snapshots"
    subprocess.run(["chattr", "+i", str(snapshots)], check=True)
    try:
        failed = cli(world, roles, *args, "--as-of", "2026-10-02")
    finally:
        subprocess.run(["chattr", "-i", str(snapshots)], check=True)
    assert failed.returncode == 1, failed.stderr
    mine = next(s for s in json.loads(failed.stdout)["snapshots"] if s["instance_id"] == instance.id)
    assert mine["result"] == "failed" and "InternalError" in mine["error"]
    instance.sh("timeout 10 touch /data/thawed-after-failure")
    world.client().terminate_instances(InstanceIds=[instance.id])


def test_nothing_to_do_is_not_success(tmp_path: Path) -> None:
    missing = run_cli("validate", "--roles-dir", "/nonexistent")
    assert missing.returncode == 2 and "/nonexistent: no such roles directory" in missing.stderr, missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    everything = run_cli("--all", "--roles-dir", str(empty), "--endpoint-url", "http://127.0.0.1:9")
    assert everything.returncode == 2, everything.stderr
    assert everything.stderr.splitlines()[0] == f"error: {empty}: no role files (ROLE.yaml) in the roles directory"


# ---------------------------------------------------------------- exact restore sources


def restored_from(world: World, roles: Path, *args: str) -> str:
    """Launch mini with ARGS; return the snapshot its data came from (the instance is terminated)."""
    done = cli(world, roles, "launch", "mini", *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    world.client().terminate_instances(InstanceIds=[i["instance_id"] for i in report["instances"]])
    return str(report["source"]["snapshot_id"])


@needs_root
def test_restores_take_their_own_env_and_the_newest_start(world: World, roles: Path, mini_ami: str) -> None:
    ec2 = world.client()
    volumes, snaps = {}, {}
    for env in ("production", "staging"):  # staging's snapshot is the newer one
        done = cli(world, roles, "launch", "mini", "--from", "seed", "--env", env, "--format", "json")
        assert done.returncode == 0, done.stderr
        instance = json.loads(done.stdout)["instances"][0]
        volumes[env] = instance["volume_id"]
        taken = cli(world, roles, "snapshot", "mini", "--env", env, "--as-of", "2026-06-01", "--format", "json")
        assert taken.returncode == 0, taken.stderr
        snaps[env] = next(s["snapshot_id"] for s in json.loads(taken.stdout)["snapshots"]
                          if s["instance_id"] == instance["instance_id"])  # fmt: skip
    wait_until(lambda: completed(world, list(snaps.values())), 60, "the snapshots completed")

    assert restored_from(world, roles, "--env", "production") == snaps["production"]
    assert restored_from(world, roles, "--env", "staging") == snaps["staging"]
    assert restored_from(world, roles, "--env", "staging", "--source-env", "production") == snaps["production"]

    # A snapshot the DLM policy made: its tags, no date tag; newer than cron's: it is the latest.
    policy = dlm_policy("mini", execution_role_arn=ARN, env="production")
    added = policy["PolicyDetails"]["Schedules"][0]["TagsToAdd"]
    dlm = ec2.create_snapshot(VolumeId=volumes["production"],
                              TagSpecifications=[{"ResourceType": "snapshot", "Tags": added}])["SnapshotId"]  # fmt: skip
    wait_until(lambda: completed(world, [dlm]), 60, "the DLM snapshot completed")
    assert restored_from(world, roles, "--env", "production") == dlm

    # Another role's snapshot is refused, naming both roles, unless explicitly allowed.
    web = [{**t, "Value": "web"} if t["Key"] == "ebsrole:role" else t for t in added]
    other = ec2.create_snapshot(VolumeId=volumes["production"],
                                TagSpecifications=[{"ResourceType": "snapshot", "Tags": web}])["SnapshotId"]  # fmt: skip
    untagged = ec2.create_snapshot(VolumeId=volumes["production"])["SnapshotId"]
    wait_until(lambda: completed(world, [other, untagged]), 60, "the other snapshots completed")
    before = world.ec2_view()["instances"]
    refused = cli(world, roles, "launch", "mini", "--from", other, "--env", "production")
    assert refused.returncode == 2 and "a snapshot of role web, not of role mini" in refused.stderr, refused.stderr
    assert "--allow-other-role" in refused.stderr
    foreign = cli(world, roles, "launch", "mini", "--from", untagged, "--env", "production", "--allow-other-role")
    assert foreign.returncode == 2 and "kind (none) is not a backup ebsrole restores" in foreign.stderr
    elsewhere = cli(world, roles, "launch", "mini", "--from", snaps["staging"], "--env", "production")
    assert elsewhere.returncode == 2 and "from environment staging, not production" in elsewhere.stderr
    assert world.ec2_view()["instances"] == before  # nothing was launched
    assert restored_from(world, roles, "--from", other, "--env", "production", "--allow-other-role") == other
    live = [i for i in world.ec2_view()["instances"] if i in before]
    ec2.terminate_instances(InstanceIds=live)


# ---------------------------------------------------------------- DLM


def test_dlm_policy_is_a_valid_create_lifecycle_policy_request() -> None:
    dlm = boto3.client("dlm", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y")
    for copy_to in (None, "eu-central-1"):
        policy = dlm_policy("web", execution_role_arn=ARN, time="02:30", keep_daily=7, keep_weekly=4, copy_to=copy_to)
        with Stubber(dlm) as stub:
            stub.add_response("create_lifecycle_policy", {"PolicyId": "policy-0123456789abcdef0"}, policy)
            assert dlm.create_lifecycle_policy(**policy)["PolicyId"] == "policy-0123456789abcdef0"
    details = policy["PolicyDetails"]
    assert details["TargetTags"] == [{"Key": "ebsrole:backup-target", "Value": "web"}]
    daily, weekly = details["Schedules"]
    assert daily["CreateRule"]["Times"] == ["02:30"] and daily["RetainRule"] == {"Count": 7}
    assert weekly["CreateRule"]["CronExpression"] == "cron(30 2 ? * SUN *)" and weekly["RetainRule"] == {"Count": 4}
    assert daily["CrossRegionCopyRules"][0]["Target"] == "eu-central-1"


def test_dlm_policy_tags_like_the_tool_and_keeps_copies_as_the_flags_say() -> None:
    arn = "arn:aws:iam::123456789012:role/service-role/AWSDataLifecycleManagerDefaultRole"
    policy = dlm_policy("web", execution_role_arn=arn, env="production", keep_daily=10, keep_weekly=6,
                        copy_to="eu-central-1")  # fmt: skip
    assert re.fullmatch(r"[0-9A-Za-z _-]+", policy["Description"])  # DLM's pattern for descriptions
    assert policy["PolicyDetails"]["TargetTags"] == [{"Key": "ebsrole:backup-target", "Value": "web@production"}]
    daily, weekly = policy["PolicyDetails"]["Schedules"]
    for rule in (daily, weekly):
        assert "VariableTags" not in rule and rule["CopyTags"] is False  # volume-targeted: fixed tags only
        tags = {t["Key"]: t["Value"] for t in rule["TagsToAdd"]}
        assert (
            tags["ebsrole:role"] == "web" and tags["ebsrole:kind"] == "nightly" and tags["ebsrole:env"] == "production"
        )
    assert daily["CrossRegionCopyRules"][0]["RetainRule"] == {"Interval": 10, "IntervalUnit": "DAYS"}
    assert weekly["CrossRegionCopyRules"][0]["RetainRule"] == {"Interval": 6, "IntervalUnit": "WEEKS"}
    with pytest.raises(InvalidInput, match="not an IAM role ARN"):
        dlm_policy("web", execution_role_arn="arn:aws:iam::123:user/me")


def test_schedule_apply_updates_the_one_policy_instead_of_adding_one() -> None:
    """moto (5.2.5) has no DLM: the calls go through botocore's DLM model, checked by Stubber."""
    policy = dlm_policy("web", execution_role_arn=ARN, env="production")
    ec2 = EC2(boto3.client("ec2", region_name="eu-west-1"))
    ec2.dlm_client = boto3.client("dlm", region_name="eu-west-1")
    listed = {"ResourceTypes": ["VOLUME"]}
    mine = {"PolicyId": "policy-0aaaaaaaaaaaaaaaa", "Tags": {"ebsrole:role": "web", "ebsrole:env": "production"}}
    others = [
        {"PolicyId": "policy-0bbbbbbbbbbbbbbbb", "Tags": {"ebsrole:role": "web", "ebsrole:env": "staging"}},
        {"PolicyId": "policy-0cccccccccccccccc", "Tags": {"ebsrole:role": "db", "ebsrole:env": "production"}},
    ]
    update = {k: v for k, v in policy.items() if k != "Tags"}
    with Stubber(ec2.dlm_client) as stub:
        stub.add_response("get_lifecycle_policies", {"Policies": others}, listed)
        stub.add_response("create_lifecycle_policy", {"PolicyId": mine["PolicyId"]}, policy)
        stub.add_response("get_lifecycle_policies", {"Policies": [*others, mine]}, listed)
        stub.add_response("update_lifecycle_policy", {}, {"PolicyId": mine["PolicyId"], **update})
        stub.add_response("get_lifecycle_policies", {"Policies": [mine, {**mine, "PolicyId": "policy-0d"}]}, listed)
        assert apply_policy(ec2, "web", "production", policy) == (mine["PolicyId"], "created")
        assert apply_policy(ec2, "web", "production", policy) == (mine["PolicyId"], "updated")
        with pytest.raises(InvalidInput, match="2 DLM policies for environment production"):
            apply_policy(ec2, "web", "production", policy)
        stub.assert_no_pending_responses()


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
    tonight = [s["snapshot_id"] for s in json.loads(snap.stdout)["snapshots"]]
    # "latest" is the newest *completed* snapshot: wait for tonight's, as a restore after a backup would.
    wait_until(lambda: completed(world, tonight), 120, "tonight's snapshot completed")

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
    drill = cli(world, roles, "drill", "web", "--source-env", "production", "--format", "json")
    report = json.loads(drill.stdout)
    assert drill.returncode == 0 and report["passed"], drill.stdout + drill.stderr
    assert report["az"] != report["source_az"] and report["seconds_to_verified"] > 0
    assert {c["check"] for c in report["checks"]} >= {"marker", "service", "http"}
    assert world.ec2_view() == before
    assert {k: world.status()[k] for k in left} == {k: host[k] for k in left}

    # A broken backup (a snapshot of an empty volume) fails the drill with a reason, and leaves nothing.
    empty = ec2.create_volume(Size=10, AvailabilityZone=f"{REGION}a")["VolumeId"]
    backup = {"ebsrole:role": "web", "ebsrole:kind": "nightly", "ebsrole:env": "production"}  # restorable
    broken = ec2.create_snapshot(
        VolumeId=empty,
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in backup.items()]}],
    )["SnapshotId"]
    wait_until(lambda: completed(world, [broken]), 60, "the broken snapshot completed")
    ec2.delete_volume(VolumeId=empty)
    before = world.ec2_view()
    failed = cli(world, roles, "drill", "web", "--from", broken, "--source-env", "production", "--format", "json")
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

    from builder.aws.ec2 import EC2, RETRIES
    from builder.copy import copy_images
    from builder.errors import CopiesFailed
    from builder.registry import RoleImage

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

"""`build.py ROLE`: the pipeline against moto with real local machines as the instances."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import yaml
from moto import mock_aws

from builder.aws import waits as waits_module
from builder.aws.ec2 import EC2, RETRIES
from builder.aws.resources import ssh_cidr, this_host
from builder.aws.waits import SimulatedClock, Waits, poll_delay
from builder.errors import BuildError, CloudError, ExitCode, HostKeyMismatch, LeftBehind, RemoteCommandFailed
from builder.keys import KeyPair
from builder.pipeline import BuildOptions, build
from builder.remote import Remote
from builder.roles import load_role
from builder.sandbox.control import Running
from builder.tags import tag
from builder.userdata import builder_user_data
from tests.conftest import MINI_ROLE
from tests.dataplane import DataPlane
from tests.machines import needs_root

REGION = "eu-west-1"
NEWEST_BOOKWORM = "ami-000000000000000d2"


@pytest.fixture
def ec2() -> Iterator[EC2]:
    with mock_aws():
        yield EC2(boto3.client("ec2", region_name=REGION, config=RETRIES))


@pytest.fixture
def mini(roles_dir: Path, write_role: Callable[..., Path]) -> Any:
    write_role("mini", MINI_ROLE)
    return load_role("mini", roles_dir)


def everything(ec2: EC2) -> dict[str, list[str]]:
    """Every resource in the (fresh) moto account that a build could have made."""
    client = ec2.client
    instances = [
        i["InstanceId"]
        for r in client.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    return {
        "instances": instances,
        "volumes": [v["VolumeId"] for v in client.describe_volumes()["Volumes"]],
        "snapshots": [
            s["SnapshotId"]
            for s in client.describe_snapshots(Filters=[{"Name": "tag-key", "Values": [tag("build-id")]}])["Snapshots"]
        ],
        "images": [i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"]],
        "key_pairs": [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]],
        "security_groups": [
            g["GroupId"] for g in client.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
        ],
    }


def nothing_left(ec2: EC2) -> bool:
    return not any(everything(ec2).values())


def options(plane: DataPlane, tmp_path: Path, **extra: Any) -> BuildOptions:
    settings: dict[str, Any] = {
        "ssh_host": plane.address,
        "ssh_port": plane.port,
        "ssh_cidr": "127.0.0.1/32",
        "ssh_timeout": 60,
        "manifest_path": tmp_path / "manifest.json",
    }
    return BuildOptions(**{**settings, **extra})


def intercepting(before_run: Callable[[str, dict[str, Any]], None]) -> Callable[..., Any]:
    """Return a connector whose sessions call ``before_run(command, kwargs)`` before each command."""

    def connect(*args: Any, **kwargs: Any) -> Any:
        remote = Remote.connect(*args, **kwargs)
        original = remote.run

        def run(command: str, **kw: Any) -> Any:
            before_run(command, kw)
            return original(command, **kw)

        remote.run = run
        return remote

    return connect


def failing_build(
    ec2: EC2, role: Any, plane: DataPlane, tmp_path: Path, error: type[BaseException], **extra: Any
) -> Any:
    """Run a build that must fail with ``error``; stop the plane's machines; return the error."""
    plane.install(ec2.client)
    try:
        with pytest.raises(error) as caught:
            build(role, ec2, options(plane, tmp_path, **extra))
    finally:
        plane.stop_all()
    return caught.value


# ---------------------------------------------------------------- pure parts


def test_ssh_is_never_open_to_the_world_by_default() -> None:
    assert this_host("http://127.0.0.1:5000") == "127.0.0.0/8"
    assert ssh_cidr("203.0.113.7") == "203.0.113.7/32"
    assert ssh_cidr("0.0.0.0/0") == "0.0.0.0/0"  # only when asked, with a warning
    with pytest.raises(BuildError, match="not a CIDR"):
        ssh_cidr("everywhere")


def test_user_data_carries_keys_and_deadman_switch() -> None:
    login, host = KeyPair.generate("l"), KeyPair.generate("h")
    text = builder_user_data(login, host, deadline_seconds=3600)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["ssh_authorized_keys"] == [login.public_line]
    assert doc["ssh_keys"]["ed25519_public"] == host.public_line
    assert doc["ssh_keys"]["ed25519_private"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert doc["runcmd"] == [
        ["systemd-run", "--unit=ebsrole-deadline", "--on-active=3600s", "/bin/systemctl", "poweroff"]
    ]


def test_base_image_is_the_newest_official_release(ec2: EC2) -> None:
    image = ec2.newest_image("136693071363", "debian-12-amd64-2*", "x86_64")
    assert image.image_id == NEWEST_BOOKWORM  # not the daily, not the impostor owner's newer one
    with pytest.raises(CloudError, match="no available arm64 AMI"):
        ec2.newest_image("136693071363", "debian-12-amd64-2*", "arm64")


def test_no_matching_base_image_stops_before_creating_anything(
    ec2: EC2, mini: Any, tmp_path: Path, roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    write_role("old", dict(MINI_ROLE, base={"name": "debian-9-*"}))
    plane = DataPlane(Path("/nonexistent"), tmp_path, with_machines=False)
    plane.install(ec2.client)
    with pytest.raises(CloudError) as caught:
        build(load_role("old", roles_dir), ec2, options(plane, tmp_path))
    assert caught.value.exit_code == ExitCode.CLOUD
    assert "no available x86_64 AMI" in caught.value.render()
    assert nothing_left(ec2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["resources"] == []


# ---------------------------------------------------------------- with real machines


@needs_root
@pytest.mark.slow
def test_happy_path_makes_ami_and_seed_snapshot_and_leaves_only_them(
    ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path
) -> None:
    plane = DataPlane(rootfs, tmp_path)
    plane.install(ec2.client)
    refusals = iter([True, True])  # the builder still shutting down at cleanup: its group is in use

    def still_in_use(model: Any, **_: Any) -> None:
        if next(refusals, False):
            error = {"Error": {"Code": "DependencyViolation", "Message": "resource has a dependent object"}}
            raise botocore.exceptions.ClientError(error, model.name)  # type: ignore[arg-type]

    ec2.client.meta.events.register("before-call.ec2.DeleteSecurityGroup", still_in_use)
    try:
        manifest = build(mini, ec2, options(plane, tmp_path))
    finally:
        ec2.client.meta.events.unregister("before-call.ec2.DeleteSecurityGroup", still_in_use)
        plane.stop_all()
    operations = [op for op, _ in plane.requests]  # the build's calls (the checks below add theirs)
    assert operations.count("DeleteSecurityGroup") == 3  # refused twice, then deleted
    # EC2 places the builder itself (no subnet given): no offerings asked for, one RunInstances.
    assert "DescribeInstanceTypeOfferings" not in operations and operations.count("RunInstances") == 1
    # What is left: the AMI and its two snapshots, nothing else.
    left = everything(ec2)
    assert left["images"] == [manifest.ami]
    assert sorted(left["snapshots"]) == sorted([manifest.seed_snapshot, manifest.root_snapshot])
    assert not left["instances"] and not left["volumes"] and not left["key_pairs"] and not left["security_groups"]
    # Requests that moto does not keep.
    run = plane.params("RunInstances")[0]
    # The login key travels only in the user data: no key pair was ever made or named.
    assert "KeyName" not in run and not plane.params("ImportKeyPair")
    assert yaml.safe_load(run["UserData"])["ssh_authorized_keys"][0].startswith("ssh-ed25519 ")
    assert run["MetadataOptions"]["HttpTokens"] == "required"
    assert run["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert run["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
    assert run["ImageId"] == NEWEST_BOOKWORM
    user_data = yaml.safe_load(run["UserData"])
    assert user_data["ssh_keys"]["ed25519_public"].startswith("ssh-ed25519 ")
    assert "/bin/systemctl" in user_data["runcmd"][0] and "--on-active=3600s" in user_data["runcmd"][0]
    assert {t["ResourceType"] for t in run["TagSpecifications"]} == {"instance", "volume"}
    ingress = plane.params("AuthorizeSecurityGroupIngress")[0]["IpPermissions"][0]
    assert ingress["FromPort"] == 22 and ingress["IpRanges"][0]["CidrIp"] == "127.0.0.1/32"
    data = run["BlockDeviceMappings"][1]
    assert data["DeviceName"] == "/dev/sdf"
    assert data["Ebs"] == {"VolumeSize": 2, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}
    register = plane.params("RegisterImage")[0]
    assert register["ImdsSupport"] == "v2.0"
    data = next(m for m in register["BlockDeviceMappings"] if m["DeviceName"] == "/dev/sdf")
    assert data["Ebs"] == {"SnapshotId": manifest.seed_snapshot, "DeleteOnTermination": False, "VolumeType": "gp3"}
    # Released once its snapshots started, the builder is not waited for at cleanup: its group's
    # deletion (refused while it has not terminated) proves it gone. No DescribeInstances after.
    after = operations[operations.index("TerminateInstances") :]
    assert "DescribeInstances" not in after and after[-1] == "DeleteSecurityGroup", " ".join(after)
    # The AMI names its snapshots from its creation; moto drops RegisterImage's tags, so they are
    # applied again, and then one call marks the AMI and both snapshots complete at once.
    created = {t["Key"]: t["Value"] for t in register["TagSpecifications"][0]["Tags"]}
    assert created[tag("seed-snapshot")] == manifest.seed_snapshot and created[tag("status")] == "pending"
    retag, done = plane.params("CreateTags")
    assert retag["Resources"] == [manifest.ami]
    assert sorted(done["Resources"]) == sorted([manifest.ami, manifest.seed_snapshot, manifest.root_snapshot])
    # Pairing tags: each names the other.
    image = ec2.client.describe_images(ImageIds=[manifest.ami])["Images"][0]
    image_tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image_tags[tag("seed-snapshot")] == manifest.seed_snapshot
    assert image_tags[tag("role")] == "mini" and image_tags[tag("paths")] == "/srv/app"
    assert image_tags[tag("base-ami")] == NEWEST_BOOKWORM and image_tags[tag("status")] == "complete"
    seed = ec2.client.describe_snapshots(SnapshotIds=[manifest.seed_snapshot])["Snapshots"][0]
    seed_tags = {t["Key"]: t["Value"] for t in seed["Tags"]}
    assert seed_tags[tag("ami")] == manifest.ami and seed_tags[tag("build-id")] == manifest.build_id
    # The manifest, written atomically.
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["status"] == "complete" and doc["ami"] == manifest.ami and doc["base_ami"] == NEWEST_BOOKWORM
    assert doc["externalized"] == ["/srv/app"] and doc["device"] == "/dev/sdf" and doc["mount_point"] == "/data"
    fates = {(r["kind"], r["fate"]) for r in doc["resources"]}
    assert fates == {
        ("security-group", "deleted"),
        ("instance", "deleted"),
        ("snapshot", "kept"),
        ("image", "kept"),
    }
    assert doc["api_calls"] > 10 and doc["api_calls_by_action"]["run_instances"] == 1
    assert [s["step"] for s in doc["steps"]][:2] == ["resolve base image", "temporary credentials"]


EC2_STEPS = [
    ("DescribeImages", 1),
    ("CreateSecurityGroup", 1),
    ("AuthorizeSecurityGroupIngress", 1),
    ("RunInstances", 1),
    ("DescribeInstances", 1),
    ("StopInstances", 1),
    ("CreateSnapshot", 2),
    ("DescribeSnapshots", 1),
    ("RegisterImage", 1),
    ("DescribeImages", 2),
    ("CreateTags", 2),
]


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize(("operation", "nth"), EC2_STEPS, ids=[f"{op}-{n}" for op, n in EC2_STEPS])
def test_failure_at_any_ec2_call_leaves_nothing(
    ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path, operation: str, nth: int
) -> None:
    plane = DataPlane(rootfs, tmp_path)
    plane.fail[operation] = nth
    # StopInstances is only called with --stop; a failed CreateSnapshot fails while the builder is frozen.
    error = failing_build(ec2, mini, plane, tmp_path, CloudError, stop=operation == "StopInstances")
    assert error.exit_code == ExitCode.CLOUD
    assert "InjectedFault" in error.render()
    assert nothing_left(ec2), everything(ec2)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["status"] == "failed"
    assert all(r["fate"] == "deleted" for r in doc["resources"])


@needs_root
@pytest.mark.slow
def test_host_key_mismatch_is_refused_and_leaves_nothing(ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path) -> None:
    plane = DataPlane(rootfs, tmp_path)
    plane.host_key_override = builder_user_data(KeyPair.generate("x"), KeyPair.generate("impostor"))
    error = failing_build(ec2, mini, plane, tmp_path, BuildError)
    assert isinstance(error, HostKeyMismatch), error
    assert error.exit_code == ExitCode.CONNECTION
    assert nothing_left(ec2)


@needs_root
@pytest.mark.slow
def test_failing_script_fails_the_build_with_its_output(
    ec2: EC2, rootfs: Path, tmp_path: Path, roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    write_role("broken", dict(MINI_ROLE, packages=["no-such-package-ebsrole"]))
    plane = DataPlane(rootfs, tmp_path)
    error = failing_build(ec2, load_role("broken", roles_dir), plane, tmp_path, RemoteCommandFailed)
    assert error.exit_code == ExitCode.REMOTE
    assert "provision.sh exited" in error.render()
    assert "no-such-package-ebsrole" in error.render()
    assert nothing_left(ec2)


@needs_root
@pytest.mark.slow
def test_ssh_dropped_mid_script_fails_the_build(
    ec2: EC2, rootfs: Path, tmp_path: Path, roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    write_role("slow", dict(MINI_ROLE, packages=["apache2"]))  # apt takes long enough to cut it
    plane = DataPlane(rootfs, tmp_path)
    plane.install(ec2.client)

    def cut_when_installing(command: str, kw: dict[str, Any]) -> None:
        if "provision.sh" in command:

            def cut(_stream: str, line: str) -> None:
                if "packages: installing" in line:
                    machine = next(iter(plane.machines.values()))
                    machine.exec("pkill", "-KILL", "-f", "^sshd: admin", check=False)

            kw["on_line"] = cut

    connect = intercepting(cut_when_installing)
    try:
        with pytest.raises(BuildError) as caught:
            build(load_role("slow", roles_dir), ec2, options(plane, tmp_path, connect=connect))
    finally:
        plane.stop_all()
    assert caught.value.exit_code == ExitCode.CONNECTION, caught.value.render()
    assert "connection lost" in caught.value.render()
    assert nothing_left(ec2)


@needs_root
@pytest.mark.slow
def test_cleanup_that_fails_names_what_it_left(ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path) -> None:
    plane = DataPlane(rootfs, tmp_path)
    plane.fail["RunInstances"] = 1
    plane.fail["DeleteSecurityGroup"] = 1
    plane.install(ec2.client)
    with pytest.raises(LeftBehind) as caught:
        build(mini, ec2, options(plane, tmp_path))
    assert caught.value.exit_code == ExitCode.LEFTOVERS
    (group,) = everything(ec2)["security_groups"]
    assert f"security-group {group}" in caught.value.render()
    assert "sweep" in caught.value.render()
    assert not everything(ec2)["instances"]


@needs_root
@pytest.mark.slow
def test_keep_on_failure_keeps_the_builder_and_says_how_to_reach_it(
    ec2: EC2,
    rootfs: Path,
    tmp_path: Path,
    roles_dir: Path,
    write_role: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_role("broken", dict(MINI_ROLE, packages=["no-such-package-ebsrole"]))
    plane = DataPlane(rootfs, tmp_path)
    plane.install(ec2.client)
    try:
        with pytest.raises(RemoteCommandFailed):
            build(load_role("broken", roles_dir), ec2, options(plane, tmp_path, keep_on_failure=True))
        left = everything(ec2)
        assert left["instances"] and left["volumes"] and left["security_groups"] and not left["key_pairs"]
        key = tmp_path / "manifest.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert f"ssh -i {key} -p {plane.port} admin@{plane.address}" in caplog.text
        # The kept key really reaches the kept builder.

        login = KeyPair(key.read_text(), "")
        doc = json.loads((tmp_path / "manifest.json").read_text())
        assert {r["kind"] for r in doc["resources"] if r["fate"] == "kept"} == {
            "instance",
            "security-group",
        }
        pinned = yaml.safe_load(plane.params("RunInstances")[0]["UserData"])["ssh_keys"]["ed25519_public"]
        with Remote.connect(plane.address, plane.port, "admin", login, pinned, deadline=30) as remote:
            assert remote.check("id -un").stdout.strip() == "admin"
    finally:
        plane.stop_all()


def test_no_ssh_answer_fails_with_connection_code_and_leaves_nothing(ec2: EC2, mini: Any, tmp_path: Path) -> None:
    plane = DataPlane(Path("/nonexistent"), tmp_path, with_machines=False)  # nothing listens there
    plane.install(ec2.client)
    with pytest.raises(BuildError) as caught:
        build(mini, ec2, options(plane, tmp_path, ssh_timeout=2))
    assert caught.value.exit_code == ExitCode.CONNECTION
    assert "no connection after" in caught.value.render()
    assert nothing_left(ec2)


# Break the machine for real just before a script runs, so that the script itself fails.
BREAK_BEFORE = {
    "verify.sh": "umount -l /data",
    "image-hygiene.sh": "rm -f /etc/machine-id && mkdir /etc/machine-id",
}


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BREAK_BEFORE))
def test_a_failing_verify_or_hygiene_fails_the_build(
    ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path, script: str
) -> None:
    plane = DataPlane(rootfs, tmp_path)

    def break_machine(command: str, _kw: dict[str, Any]) -> None:
        if command.startswith("sudo") and script in command:
            next(iter(plane.machines.values())).exec("bash", "-c", BREAK_BEFORE[script])

    error = failing_build(ec2, mini, plane, tmp_path, RemoteCommandFailed, connect=intercepting(break_machine))
    assert error.exit_code == ExitCode.REMOTE
    assert f"{script} exited 1" in error.render()
    assert nothing_left(ec2)


def test_waits_ride_out_eventual_consistency_and_back_off(ec2: EC2) -> None:
    answers = iter(["NotFound", "NotFound", "pending", "running"])
    seen: list[float] = []

    def describe() -> str:
        seen.append(time.monotonic())
        answer = next(answers)
        if answer == "NotFound":
            raise CloudError("describe_instances", "InvalidInstanceID.NotFound", "not yet")
        return answer

    assert ec2.wait_for("instance i-1", describe, "running", timeout=30) == "running"
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert all(later >= earlier - 0.05 for earlier, later in itertools.pairwise(gaps)), "polls never speed up"
    # The schedule: fast first, then a third of the time waited, never more than 5 s.
    delays = [poll_delay(t / 10) for t in range(0, 600)]
    assert delays == sorted(delays) and delays[0] == 0.25 and max(delays) == 5.0
    assert all(poll_delay(t) <= max(0.25, t / 3) for t in (1, 4, 10, 30))
    with pytest.raises(CloudError, match="went 'stopped'"):
        ec2.wait_for("instance i-1", lambda: "stopped", "running", timeout=5, failed=("stopped",))
    with pytest.raises(CloudError, match="still 'pending' after 1 s"):
        ec2.wait_for("instance i-1", lambda: "pending", "running", timeout=1)
    gone = CloudError("describe_instances", "InvalidInstanceID.NotFound", "gone")
    assert (
        ec2.wait_for("instance i-1", lambda: (_ for _ in ()).throw(gone), "terminated", timeout=5, missing="terminated")
        == "terminated"
    )


def test_waits_learn_when_to_look(ec2: EC2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait that always takes the same time costs one look after a few builds, and little overshoot.

    On a simulated clock: the schedule is what is tested, not this machine's sleeps (a real 0.6 s
    wait came out 0.12 s late under a loaded CI run, from the sleeps alone)."""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    ec2.waits = Waits(tmp_path / "waits.json")
    takes = 15.0  # an EC2 launch
    looks: list[int] = []
    late: list[float] = []
    for _ in range(8):
        seen = 0
        started = clock.now

        def describe(started: float = started) -> str:
            nonlocal seen
            seen += 1
            return "done" if clock.now - started >= takes else "going"

        ec2.wait_for("thing", describe, "done", timeout=900, kind="thing")
        looks.append(seen)
        late.append(clock.now - started - takes)
    assert looks[0] >= 3, looks  # nothing known: fast looks backing off
    assert looks[-3:] == [1, 1, 1], looks
    assert max(late[-3:]) < 0.02 * takes, late  # the end is known to within a few per cent
    assert list(json.loads((tmp_path / "waits.json").read_text())) == [ec2._wait_key("thing")]  # learnt per kind
    assert sum(looks[1:]) < 2 * 7, looks  # learning it costs at most one extra look a build


def test_wait_plans_follow_what_the_intervals_say(tmp_path: Path) -> None:
    waits = Waits(tmp_path / "waits.json")
    assert waits.plan("k") is None
    waits.record("k", 4.0, 6.0)  # it ended between 4 and 6 s: one wait says little of the spread
    plan = waits.plan("k")
    assert plan is not None and len(plan.looks) > 2 and plan.looks[0] < 5.0 < plan.looks[-1]
    for _ in range(7):
        waits.record("k", 4.9, 5.0)  # always the same: a look or two, just after 5 s
    plan = waits.plan("k")
    assert plan is not None and len(plan.looks) <= 2 and plan.looks[0] > 4.9 and plan.looks[-1] < 5.5
    for lo in (3.0, 7.0, 4.0, 6.0, 8.0):
        waits.record("k", lo, lo + 0.5)  # it varies: looks spread over the fitted distribution
    plan = waits.plan("k")
    assert plan is not None and len(plan.looks) > 2 and plan.looks[0] < 6.0 and plan.looks[-1] > 8.0
    (tmp_path / "waits.json").write_text('{"k": [3.2, "x"]}')  # an older or damaged file: no history
    assert waits.plan("k") is None
    waits.record("k", 1.0, 2.0)
    assert waits.intervals("k") == [(1.0, 2.0)]


def test_sandbox_waits_are_remembered_by_latency_model_not_port() -> None:
    model = {"instance_pending": 1.5}
    assert Running(1, "http://127.0.0.1:1", model).wait_scope == Running(2, "http://127.0.0.1:2", model).wait_scope
    assert Running(1, "http://127.0.0.1:1", None).wait_scope != Running(1, "http://127.0.0.1:1", model).wait_scope


def test_ctrl_c_between_creating_and_recording_a_resource_waits_for_the_record() -> None:
    import os
    import signal

    from builder.cleanup import UndoStack

    undo = UndoStack()
    # As build.py's main sets it up (the test runner may have been started with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with undo.creating():
                os.kill(os.getpid(), signal.SIGINT)  # arrives right after the create call returns
                time.sleep(0.05)
                undo.push("volume", "vol-1", lambda: None)  # still recorded
            pytest.fail("the deferred Ctrl-C must take effect when the block ends")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r.id for r in undo.resources] == ["vol-1"]
    assert [r.fate for r in undo.resources] == ["created"]
    assert undo.unwind() == [] and undo.resources[0].fate == "deleted"


@needs_root
@pytest.mark.slow
def test_a_twin_from_a_lost_response_is_found_by_tag_and_removed(
    ec2: EC2, mini: Any, rootfs: Path, tmp_path: Path
) -> None:
    plane = DataPlane(rootfs, tmp_path)
    plane.install(ec2.client)
    other = boto3.client("ec2", region_name=REGION)  # outside the tool: like a retry whose first answer was lost

    def twin(parsed: dict[str, Any], **_: Any) -> None:
        request = plane.params("CreateSnapshot")[-1]
        if request["Description"].startswith("ebsrole mini seed-snapshot"):
            other.create_snapshot(  # the same request again, as a retry sends it
                VolumeId=request["VolumeId"],
                Description=request["Description"],
                TagSpecifications=request["TagSpecifications"],
            )
            # As botocore reports a call it retried (the first answer lost, the twin made).
            parsed.setdefault("ResponseMetadata", {})["RetryAttempts"] = 1

    ec2.client.meta.events.register("after-call.ec2.CreateSnapshot", twin)
    try:
        manifest = build(mini, ec2, options(plane, tmp_path))
    finally:
        plane.stop_all()
    assert sorted(everything(ec2)["snapshots"]) == sorted([manifest.seed_snapshot, manifest.root_snapshot])
    doc = json.loads((tmp_path / "manifest.json").read_text())
    twins = [r for r in doc["resources"] if r["kind"] == "snapshot" and r["fate"] == "deleted"]
    assert len(twins) == 1 and twins[0]["id"] not in (manifest.seed_snapshot, manifest.root_snapshot)

"""The sandbox: a local EC2 endpoint whose instances, volumes and snapshots are real.

Every test here goes through the sandbox's HTTP endpoint, as the tool and any other EC2
client do, with real machines, loop devices and file copies behind it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import botocore.auth
import botocore.exceptions
import pytest
import yaml

from builder.sandbox import auth, control
from builder.sandbox.server import mappings_from_params, mappings_to_params, merge_mappings, response_ids
from tests.conftest import MINI_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import REGION, World, clean, wait_until

pytestmark = needs_root


def manifest_of(result: subprocess.CompletedProcess[str], role: str) -> dict[str, Any]:
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"{role}: AMI "))
    path = line.rsplit("(manifest ", 1)[1].rstrip(")")
    return dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- the WSGI layer's pieces


def test_launch_mappings_merge_over_the_image_by_device() -> None:
    image = [
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-root", "VolumeSize": 8}},
        {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": "snap-seed", "VolumeSize": 10}},
        {"DeviceName": "/dev/sdg", "Ebs": {"SnapshotId": "snap-other", "VolumeSize": 1}},
    ]
    request = [
        {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 20}},
        {"DeviceName": "/dev/sdg", "NoDevice": ""},
        {"DeviceName": "/dev/sdh", "Ebs": {"VolumeSize": 5}},
    ]
    merged = merge_mappings(image, request)
    assert merged == [
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-root", "VolumeSize": 20}},
        {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": "snap-seed", "VolumeSize": 10}},
        {"DeviceName": "/dev/sdh", "Ebs": {"VolumeSize": 5}},
    ]
    params = mappings_to_params({"Action": "RunInstances", "BlockDeviceMapping.9.DeviceName": "/dev/old"}, merged)
    assert "BlockDeviceMapping.9.DeviceName" not in params
    assert params["BlockDeviceMapping.1.Ebs.VolumeSize"] == "20"
    assert mappings_from_params(params) == merged


def test_ids_are_read_from_ec2_answers() -> None:
    body = (
        b'<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><instancesSet>'
        b"<item><instanceId>i-1</instanceId></item><item><instanceId>i-2</instanceId></item>"
        b"</instancesSet></RunInstancesResponse>"
    )
    assert response_ids(body, "instanceId") == ["i-1", "i-2"]


# ---------------------------------------------------------------- bad hosts


def test_not_root_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run(
        # Debian's python3 (the venv's may live under /root, which nobody cannot read).
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "build.py",
            "sandbox",
            "start",
        ],
        cwd=PROJECT,
        env={**os.environ, "EBSROLE_SANDBOX": str(tmp_path / "s"), "PYTHONPATH": os.pathsep.join(_site())},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert done.stderr.startswith("error: the sandbox needs root"), done.stderr
    assert done.stderr.count("\n") <= 2, done.stderr  # the error, and a hint


def test_missing_tool_names_the_debian_package(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nsenter", "setpriv", "losetup", "script", "mkfs.ext4", "blkid", "unshare"):
        found = subprocess.run(["which", tool], capture_output=True, text=True, check=False).stdout.strip()
        (bin_dir / tool).symlink_to(found)
    import sys

    done = subprocess.run(
        [sys.executable, "build.py", "sandbox", "start"],
        cwd=PROJECT,
        env={**os.environ, "EBSROLE_SANDBOX": str(tmp_path / "s"), "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert "slirp4netns" in done.stderr and "apt-get install" in done.stderr, done.stderr
    assert done.stderr.count("\n") <= 2, done.stderr


def _site() -> list[str]:
    import sys

    return [str(PROJECT), *[p for p in sys.path if p.endswith("-packages")]]


# ---------------------------------------------------------------- builds and restores


def test_build_restore_and_sandbox_restart(world: World, mini_dir: Path) -> None:
    built = world.cli("mini", "--roles-dir", str(mini_dir), "--sandbox", timeout=300)
    assert built.returncode == 0, built.stderr
    manifest = manifest_of(built, "mini")
    assert manifest["ami"].startswith("ami-") and manifest["seed_snapshot"].startswith("snap-")
    assert not clean(world.status())

    image = world.client().describe_images(ImageIds=[manifest["ami"]])["Images"][0]
    devices = {m["DeviceName"]: m["Ebs"] for m in image["BlockDeviceMappings"]}
    assert devices["/dev/sdf"]["SnapshotId"] == manifest["seed_snapshot"]
    assert image["ImdsSupport"] == "v2.0"

    # A restore: the role AMI, its data volume made from the seed snapshot, mounted at boot.
    restored = world.launch(manifest["ami"])
    mounts = restored.sh("findmnt -n -o SOURCE,TARGET /data")
    assert mounts.split() == ["/dev/xvdf", "/data"]
    assert restored.sh("readlink /srv/app").strip() == "/data/srv/app"
    volume = _volume_at(world, restored.id, "/dev/sdf")
    assert volume["SnapshotId"] == manifest["seed_snapshot"]
    restored.sh("echo on-root > /root/marker && echo on-data > /srv/app/marker && sync")

    # The sandbox stops and starts: same instance, same address, same bytes; new credentials.
    old_key, old_secret = control.credentials(world.state)
    assert world.cli("sandbox", "stop").returncode == 0
    assert world.status()["machines"] == [] and world.status()["loop_devices"] == []
    again = world.cli("sandbox", "start")
    assert again.returncode == 0, again.stderr
    world.endpoint = control.running(world.state).endpoint  # type: ignore[union-attr]
    assert world.describe(restored.id)["State"]["Name"] == "running"
    assert _error(lambda: _client(world, old_key, old_secret).describe_volumes()) == (403, "AuthFailure")
    restored.reconnect()
    assert restored.sh("cat /root/marker /srv/app/marker").split() == ["on-root", "on-data"]

    world.client().terminate_instances(InstanceIds=[restored.id])
    assert restored.id not in world.status()["machines"]
    # The seed volume outlives the instance (DeleteOnTermination false), as on EC2.
    assert world.client().describe_volumes(VolumeIds=[volume["VolumeId"]])["Volumes"][0]["State"] == "available"


def _volume_at(world: World, instance_id: str, device: str) -> dict[str, Any]:
    described = world.describe(instance_id)
    volume_id = next(m["Ebs"]["VolumeId"] for m in described["BlockDeviceMappings"] if m["DeviceName"] == device)
    return dict(world.client().describe_volumes(VolumeIds=[volume_id])["Volumes"][0])


@pytest.mark.slow
def test_shipped_roles_build_and_web_serves_from_the_restored_volume(world: World, tmp_path: Path) -> None:
    built = world.cli("web", "database", "management", "--sandbox", "--format", "json", timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]
    builds = json.loads(built.stdout)["builds"]
    assert [b["result"] for b in builds] == ["complete"] * 3
    manifests = {b["role"]: json.loads(Path(b["manifest"]).read_text()) for b in builds}
    assert not clean(world.status())

    web = world.launch(manifests["web"]["ami"], open_ports=(80,))
    volume = _volume_at(world, web.id, "/dev/sdf")
    assert volume["SnapshotId"] == manifests["web"]["seed_snapshot"]
    wait_until(lambda: web.sh("systemctl is-active apache2", check=False).strip() == "active", 90, "apache2")
    assert web.sh("readlink /var/www").strip() == "/data/var/www"
    with urllib.request.urlopen(f"http://{web.address}/", timeout=30) as page:
        assert page.status == 200
        body = page.read().decode()
    served = web.sh("cat /data/var/www/html/index.html")
    assert body == served
    world.client().terminate_instances(InstanceIds=[web.id])


# ---------------------------------------------------------------- failures leave nothing


def test_failing_script_leaves_nothing(world: World, mini_dir: Path) -> None:
    before = world.ec2_view()
    (mini_dir / "broken.yaml").write_text(yaml.safe_dump({**MINI_ROLE, "packages": ["ebsrole-no-such-package"]}))
    failed = world.cli("broken", "--roles-dir", str(mini_dir), "--sandbox", timeout=300)
    assert failed.returncode == 4, failed.stderr
    assert "provision.sh" in failed.stderr
    assert not clean(world.status())
    assert world.ec2_view() == before


def test_ctrl_c_mid_build_leaves_nothing(world: World, mini_dir: Path, tmp_path: Path) -> None:
    before = world.ec2_view()
    log = tmp_path / "build.log"
    proc = world.popen("mini", "--roles-dir", str(mini_dir), "--sandbox", log=log)
    wait_until(lambda: "provision, verify, image hygiene ..." in log.read_text(), 120, "provisioning")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert not clean(world.status())
    assert world.ec2_view() == before


def test_stopping_the_sandbox_fails_a_running_build_cleanly(world: World, mini_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    proc = world.popen("mini", "--roles-dir", str(mini_dir), "--sandbox", log=log)
    wait_until(lambda: "provision, verify, image hygiene ..." in log.read_text(), 120, "provisioning")
    assert world.cli("sandbox", "stop").returncode == 0
    code = proc.wait(timeout=300)
    output = log.read_text()
    # The build fails, says so, and names what it could not remove with the endpoint gone.
    assert code == 6, output
    assert "left behind" in output or "could not remove" in output, output
    assert world.cli("sandbox", "start").returncode == 0
    world.endpoint = control.running(world.state).endpoint  # type: ignore[union-attr]
    swept = world.cli("sweep", "--sandbox", "--older-than", "0s", "--force")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert not clean(world.status())
    view = world.ec2_view()
    leftover = [i for i in view["instances"] if "ebsrole" in json.dumps(world.describe(i).get("Tags", []))]
    assert leftover == []


# ---------------------------------------------------------------- EC2 behaviour of the machines


def test_a_machine_that_powers_off_follows_its_shutdown_behaviour(world: World, rootfs: Path) -> None:
    base = "ami-000000000000000d2"
    stays = world.launch(base, InstanceInitiatedShutdownBehavior="stop")
    goes = world.launch(base, InstanceInitiatedShutdownBehavior="terminate")
    for instance in (stays, goes):
        instance.remote.run("sudo -n systemctl poweroff --no-block", timeout=30, on_line=lambda *_: None)
    # Generous limits: a machine on a loaded host can take long to halt; the states are the point.
    explain = partial(world.explain, stays.id, goes.id)
    wait_until(lambda: world.describe(stays.id)["State"]["Name"] == "stopped", 180, "stopped", explain)
    wait_until(lambda: world.describe(goes.id)["State"]["Name"] == "terminated", 180, "terminated", explain)
    assert world.describe(goes.id)["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown"
    assert goes.id not in world.status()["machines"]

    world.client().start_instances(InstanceIds=[stays.id])
    assert world.describe(stays.id)["State"]["Name"] == "running"
    assert world.describe(stays.id)["PublicIpAddress"] == stays.address
    assert stays.id in world.status()["machines"]
    world.client().terminate_instances(InstanceIds=[stays.id])


def test_stop_is_stopping_until_the_machine_has_halted(world: World) -> None:
    instance = world.launch("ami-000000000000000d2")
    world.client().stop_instances(InstanceIds=[instance.id])
    states = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states.add(world.describe(instance.id)["State"]["Name"])
        if "stopped" in states:
            break
    assert states <= {"stopping", "stopped"} and "stopped" in states
    assert instance.id not in world.status()["machines"]
    world.client().terminate_instances(InstanceIds=[instance.id])


def test_data_plane_limits_answer_as_ec2_errors(world: World) -> None:
    ec2 = world.client()
    with pytest.raises(botocore.exceptions.ClientError) as arm:
        ec2.run_instances(ImageId="ami-000000000000000d4", MinCount=1, MaxCount=1, InstanceType="t4g.small")
    assert arm.value.response["Error"]["Code"] == "Unsupported"

    # A snapshot whose bytes cannot be written is an InternalError, and no snapshot appears.
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{world.client().meta.region_name}a")["VolumeId"]
    snapshots = world.state / "data" / "snapshots"
    subprocess.run(["chattr", "+i", str(snapshots)], check=True)
    try:
        with pytest.raises(botocore.exceptions.ClientError) as failed:
            ec2.create_snapshot(VolumeId=volume)
    finally:
        subprocess.run(["chattr", "-i", str(snapshots)], check=True)
    assert failed.value.response["Error"]["Code"] == "InternalError"
    owned = ec2.describe_snapshots(Filters=[{"Name": "volume-id", "Values": [volume]}])["Snapshots"]
    assert owned == []
    ec2.delete_volume(VolumeId=volume)
    assert volume not in world.status()["volumes"]


# ---------------------------------------------------------------- who may talk to it


def _client(world: World, key: str, secret: str) -> Any:
    return boto3.client(
        "ec2", region_name=REGION, endpoint_url=world.endpoint, aws_access_key_id=key, aws_secret_access_key=secret
    )


def _error(call: Any) -> tuple[int, str]:
    """Return the HTTP status and EC2 error code a boto3 call fails with."""
    with pytest.raises(botocore.exceptions.ClientError) as failed:
        call()
    return failed.value.response["ResponseMetadata"]["HTTPStatusCode"], failed.value.response["Error"]["Code"]


def _send(world: World, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Send a raw HTTP request; return its status and the EC2 error code of its answer ("" when none)."""
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(world.endpoint + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as refused:
        text = refused.read().decode()
        return refused.code, text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else text


def _signed(world: World, path: str, body: bytes | None = None) -> dict[str, str]:
    credentials = auth.Credentials(*control.credentials(world.state))
    return auth.sign("GET" if body is None else "POST", world.endpoint + path, credentials, REGION, body or b"")


def _sandbox_env(world: World, *args: str) -> str:
    done = world.cli("sandbox", "env", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_only_requests_signed_with_the_sandbox_credentials_are_answered(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ec2 = world.client()
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    before = world.ec2_view()
    key, secret = control.credentials(world.state)
    launch = {"Action": "RunInstances", "Version": "2016-11-15", "ImageId": "ami-000000000000000d2"}
    run = urlencode({**launch, "MinCount": "1", "MaxCount": "1"}).encode()

    # Unsigned, signed with the wrong secret, or with another key id: 403, nothing launched.
    assert _send(world, "/", run) == (403, "AuthFailure")
    assert _error(lambda: _client(world, key, "0" * 40).run_instances(**_launch())) == (403, "SignatureDoesNotMatch")
    assert _error(lambda: _client(world, "AKIAIOSFODNN7EXAMPLE", secret).run_instances(**_launch())) == (
        403,
        "AuthFailure",
    )
    # A good signature does not carry over to another body, nor to a later request.
    describe = urlencode({"Action": "DescribeVolumes", "Version": "2016-11-15"}).encode()
    assert _send(world, "/", run, _signed(world, "/", describe)) == (403, "SignatureDoesNotMatch")
    assert _send(world, "/", describe, _signed(world, "/", describe)) == (200, "")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now - dt.timedelta(minutes=20))
    assert _send(world, "/", describe, _signed(world, "/", describe)) == (403, "RequestExpired")
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now - dt.timedelta(minutes=10))
    assert _send(world, "/", describe, _signed(world, "/", describe)) == (200, "")  # clock skew within AWS's 15 min
    monkeypatch.undo()

    # moto's own API is not served, signed or not; nor is the sandbox's status unsigned.
    for path in ("/moto-api/reset", "/moto-api/reset-auth"):
        assert _send(world, path, b"") == (403, "AuthFailure")
        assert _send(world, path, b"", _signed(world, path, b"")) == (403, "AuthFailure")
    for path in ("/moto-api/data.json", "/moto-api/"):
        assert _send(world, path) == (403, "AuthFailure")
        assert _send(world, path, None, _signed(world, path)) == (403, "AuthFailure")
    assert _send(world, "/ebsrole-sandbox/status") == (403, "AuthFailure")

    assert world.ec2_view() == before  # nothing launched, nothing reset: the volume is still there
    assert "refused POST '/moto-api/reset': AuthFailure" in (world.state / "server.log").read_text()
    ec2.delete_volume(VolumeId=volume)


def _launch() -> dict[str, Any]:
    return {"ImageId": "ami-000000000000000d2", "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.small"}


def test_state_directory_and_credentials_are_private(world: World) -> None:
    state, credentials = os.stat(world.state), os.stat(world.state / auth.CREDENTIALS_FILE)
    assert (stat.S_IMODE(state.st_mode), state.st_uid) == (0o700, os.geteuid())
    assert (stat.S_IMODE(credentials.st_mode), credentials.st_uid) == (0o600, os.geteuid())


def test_awscli_builds_and_describes_through_sandbox_env(world: World, tmp_path: Path) -> None:
    """`eval "$(build.py sandbox env)"` is all awscli needs: launch, describe, image; a wrong secret is refused."""
    venv = Path(sys.executable).parent
    assert (venv / "aws").exists(), "awscli is missing: pip install -r requirements-dev.txt"
    script = """set -euo pipefail
eval "$("$PYTHON" build.py sandbox env)"
id=$(aws ec2 run-instances --image-id ami-000000000000000d2 --instance-type t3.small \
    --query 'Instances[0].InstanceId' --output text)
aws ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].State.Name' --output text
image=$(aws ec2 create-image --instance-id "$id" --name "awscli-$id" --query ImageId --output text)
aws ec2 describe-images --image-ids "$image" --query 'Images[0].[ImageId,State]' --output text
aws ec2 terminate-instances --instance-ids "$id" --output text >/dev/null
echo "$id"
AWS_SECRET_ACCESS_KEY=wrong aws ec2 describe-images --image-ids "$image" || echo "refused: $?"
"""
    env = {
        **control.loopback_only_env(tmp_path),
        "PATH": f"{venv}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "EBSROLE_SANDBOX": str(world.state),
        "AWS_PROFILE": "nowhere",  # a user's leftover profile: `sandbox env` unsets it
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    state, described, instance_id, refused = done.stdout.splitlines()
    image_id = described.split()[0]
    assert state == "running" and described.split()[1] == "available"
    assert refused == "refused: 255" and "SignatureDoesNotMatch" in done.stderr
    # Those were the sandbox's instance and image: it holds them.
    assert world.describe(instance_id)["State"]["Name"] == "terminated"
    assert image_id in world.status()["ec2"][REGION]["images"]
    world.client().deregister_image(ImageId=image_id)


# ---------------------------------------------------------------- another EC2 client


def test_packer_amazon_ebs_builds_against_the_sandbox(world: World, tmp_path: Path) -> None:
    """Debian's Packer 1.6.6 (aws-sdk-go) builds an AMI here as against EC2, and the AMI boots."""
    packer = shutil.which("packer")
    assert packer, "Debian's packer is missing: scripts/setup.sh --dev installs it"
    # As a user would: `sandbox env`'s exports, read by the template (Packer 1.6.6's SDK
    # predates AWS_ENDPOINT_URL_EC2) and by Packer itself (the credentials).
    exports = _sandbox_env(world, "--format", "json")
    template = {
        "variables": {"endpoint": "{{env `AWS_ENDPOINT_URL_EC2`}}", "region": "{{env `AWS_DEFAULT_REGION`}}"},
        "builders": [
            {
                "type": "amazon-ebs",
                "region": "{{user `region`}}",
                "custom_endpoint_ec2": "{{user `endpoint`}}",
                "source_ami": "ami-000000000000000d2",
                "instance_type": "t3.small",
                "ssh_username": "admin",
                "ssh_timeout": "120s",
                "ami_name": f"packer-{tmp_path.name}",
                "temporary_security_group_source_cidrs": ["127.0.0.0/8"],
            }
        ],
        "provisioners": [
            {"type": "shell", "inline": ["echo packer-was-here | sudo tee /etc/packer-marker"]},
        ],
    }
    (tmp_path / "template.json").write_text(json.dumps(template))
    env = {**control.loopback_only_env(tmp_path), **json.loads(exports), "AWS_POLL_DELAY_SECONDS": "1"}
    done = subprocess.run(
        [packer, "build", "-machine-readable", "template.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    artifact = next(line for line in done.stdout.splitlines() if ",artifact,0,id," in line)
    image_id = artifact.rsplit(":", 1)[1].strip()
    assert not clean(world.status())

    # Packer's AMI (CreateImage of its stopped instance) boots with what the provisioner wrote.
    launched = world.launch(image_id)
    assert launched.sh("cat /etc/packer-marker").strip() == "packer-was-here"
    world.client().terminate_instances(InstanceIds=[launched.id])


def test_an_instance_that_cannot_boot_is_terminated_with_a_reason(world: World) -> None:
    """An image whose root device holds a data snapshot cannot boot: terminated, Server.InternalError."""
    ec2 = world.client()
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    image = ec2.register_image(
        Name=f"no-root-{volume}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}],
    )["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    described = world.describe(instance)
    assert described["State"]["Name"] == "terminated"
    assert described["StateReason"]["Code"] == "Server.InternalError"
    assert "no root filesystem" in described["StateReason"]["Message"]
    assert not clean(world.status())
    ec2.deregister_image(ImageId=image)
    ec2.delete_snapshot(SnapshotId=snapshot)
    ec2.delete_volume(VolumeId=volume)
    assert snapshot not in world.status()["snapshots"]

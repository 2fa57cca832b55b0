"""Scale-out (builder/scaleout.py, `template`, `snapshot --update-template`) in the sandbox, with real machines.

One web role is built once for the module. A nightly snapshot records a page written on the
production instance; `template --asg` puts a launch template and an Auto Scaling group on it;
plain awscli then scales the group out, and the machine it boots serves that night's page (the
seed has no such page). The next night, `snapshot --update-template` moves the template's
default version to the new snapshot, and the next scale-out serves the new page. Scaling in
stops the machine and deletes its data volume (a template's data volumes go with their instance).
Retention never deletes the snapshot a template's default version maps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.keys import KeyPair
from builder.launch import HOST_KEYS, KEY_LINE
from builder.remote import Remote
from builder.sandbox import control
from tests.conftest import GOOD_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import World, wait_until

GROUP = "web-prod"
TEMPLATE = "ebsrole-web-prod"
HOWTO = PROJECT / "docs/howto/scale-out.md"
# docs/howto/scale-out.md shows these lines verbatim (checked below).
SCALE = """aws autoscaling set-desired-capacity --auto-scaling-group-name {group} --desired-capacity {desired}
aws autoscaling describe-auto-scaling-groups --auto-scaling-group-names {group} \\
    --query 'AutoScalingGroups[0].Instances[].InstanceId' --output text
"""


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    (path / "web.yaml").write_text(yaml.safe_dump(GOOD_ROLE))  # apache2, /var/www on the data volume
    return path


def cli(world: World, roles: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return world.cli(*args, "--roles-dir", str(roles), "--sandbox")


def awscli(world: World, tmp_path: Path, script: str) -> str:
    """Run ``script`` in bash after `eval "$(build.py sandbox env)"`, as the how-to does; return its stdout."""
    venv = Path(sys.executable).parent
    env = {
        **control.loopback_only_env(tmp_path),
        "PATH": f"{venv}:{os.environ['PATH']}",
        "EBSROLE_SANDBOX": str(world.state),
    }
    done = subprocess.run(
        ["bash", "-c", f'set -euo pipefail\neval "$(python build.py sandbox env)"\n{script}'],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def page(address: str, name: str) -> str | None:
    """Return the page's text, or None when the server does not answer 200 (yet)."""
    try:
        with urllib.request.urlopen(f"http://{address}/{name}", timeout=10) as answer:
            return str(answer.read().decode().strip()) if answer.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def scale(world: World, tmp_path: Path, desired: int) -> list[str]:
    """Set the group's desired capacity with awscli, as the how-to does; return its instances' ids."""
    return awscli(world, tmp_path, SCALE.format(group=GROUP, desired=desired)).split()


def test_the_howto_shows_the_awscli_commands_this_test_runs() -> None:
    text = HOWTO.read_text(encoding="utf-8")
    for desired in (1, 0):
        assert SCALE.format(group=GROUP, desired=desired).splitlines()[0] in text
    assert SCALE.format(group=GROUP, desired=1).split("\n", 1)[1] in text


def serves(world: World, instance_id: str, name: str, text: str) -> None:
    """Wait until the instance's web server answers ``name`` with ``text``."""
    address = world.describe(instance_id).get("PublicIpAddress", "")
    assert address, world.describe(instance_id)
    wait_until(
        lambda: page(address, name) == text, 180, f"{instance_id} serves {name}", lambda: world.explain(instance_id)
    )


def night(
    world: World, roles: Path, remote: Remote, keys: tuple[Path, Path], date: str, text: str, *flags: str
) -> dict[str, Any]:
    """Write the night's page on production, then take the night's snapshot; return its JSON report."""
    remote.check(f"echo '{text}' | sudo -n tee /var/www/html/night.html >/dev/null && sudo -n sync")
    done = cli(world, roles, "snapshot", "web", "--env", "prod", "--as-of", date, "--identity", str(keys[0]),
               "--known-hosts", str(keys[1]), *flags, "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def completed(world: World, snapshot_id: str) -> bool:
    return bool(world.client().describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"] == "completed")


@needs_root
@pytest.mark.slow
def test_an_asg_on_the_template_boots_last_nights_data_and_follows_each_night(
    world: World, roles: Path, tmp_path: Path
) -> None:
    built = cli(world, roles, "web", "--format", "json")
    assert built.returncode == 0, built.stderr[-2000:]
    ec2 = world.client()
    mine = KeyPair.generate("operator")
    ec2.import_key_pair(KeyName="operator", PublicKeyMaterial=mine.public_line.encode())
    http = ec2.create_security_group(GroupName="web-http", Description="http")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=http, IpProtocol="tcp", FromPort=80, ToPort=80, CidrIp="127.0.0.0/8")
    launched = cli(world, roles, "launch", "web", "--from", "seed", "--env", "prod", "--key-name", "operator",
                   "--security-group-id", http, "--wait", "--format", "json")  # fmt: skip
    production = json.loads(launched.stdout)["instances"][0]
    text = ec2.get_console_output(InstanceId=production["instance_id"])["Output"]
    host_key = "ssh-ed25519 " + dict(KEY_LINE.findall(HOST_KEYS.findall(text)[0]))["ssh-ed25519"]
    remote = Remote.connect(production["address"], 22, "admin", mine, host_key, deadline=60)
    key, known = tmp_path / "operator.key", tmp_path / "known_hosts"
    key.write_text(mine.private_openssh)
    key.chmod(0o600)
    known.write_text(f"{production['address']} {host_key}\n")

    first = night(world, roles, remote, (key, known), "2026-05-01", "<h1>night one</h1>")["snapshots"][0]["snapshot_id"]
    wait_until(lambda: completed(world, first), 120, "night one's snapshot completed")
    done = cli(world, roles, "template", "web", "--env", "prod", "--from", "latest", "--key-name", "operator",
               "--security-group-id", http, "--asg", GROUP, "--min", "0", "--max", "2", "--desired", "0",
               "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    made = json.loads(done.stdout)
    assert made["template"]["name"] == TEMPLATE and made["template"]["snapshot_id"] == first
    assert made["group"]["done"] == "created" and made["group"]["desired"] == 0
    version = ec2.describe_launch_template_versions(LaunchTemplateName=TEMPLATE, Versions=["$Default"])
    data = version["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert [m["Ebs"]["SnapshotId"] for m in data["BlockDeviceMappings"]] == [first]
    assert all(m["Ebs"]["Encrypted"] for m in data["BlockDeviceMappings"])

    # Scale out with plain awscli: a real machine boots from the template and serves night one's page.
    (scaled,) = scale(world, tmp_path, 1)
    assert scaled in world.status()["machines"]
    serves(world, scaled, "night.html", "<h1>night one</h1>")
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [scaled]}])["Volumes"]
    data_volume = next(v for v in volumes if v.get("SnapshotId") == first)
    assert {"Key": "ebsrole:restored-from", "Value": first} in data_volume["Tags"]

    # Scale in: the machine stops and its data volume goes with it.
    assert scale(world, tmp_path, 0) == []
    wait_until(lambda: scaled not in world.status()["machines"], 60, f"{scaled}'s machine stopped")
    assert world.describe(scaled)["State"]["Name"] == "terminated"
    assert data_volume["VolumeId"] not in world.status()["volumes"]

    # The next night moves the template's default version to its snapshot; a scale-out serves it.
    report = night(world, roles, remote, (key, known), "2026-05-02", "<h1>night two</h1>", "--update-template")
    second = report["snapshots"][0]["snapshot_id"]
    assert [(t["template"], t["result"], t["snapshot_id"], t["version"]) for t in report["templates"]] == [
        (TEMPLATE, "updated", second, 2)
    ]
    assert (
        ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]["DefaultVersionNumber"] == 2
    )
    (again,) = scale(world, tmp_path, 1)
    serves(world, again, "night.html", "<h1>night two</h1>")
    assert scale(world, tmp_path, 0) == []
    wait_until(lambda: again not in world.status()["machines"], 60, f"{again}'s machine stopped")

    # Retention spares what the template's default version maps: here night one's again.
    pinned = cli(world, roles, "template", "web", "--env", "prod", "--from", first, "--format", "json")
    assert json.loads(pinned.stdout)["template"]["version"] == 3, pinned.stderr
    third = night(world, roles, remote, (key, known), "2026-05-03", "<h1>night three</h1>")["snapshots"][0]
    wait_until(lambda: completed(world, third["snapshot_id"]), 120, "night three's snapshot completed")
    kept = night(world, roles, remote, (key, known), "2026-05-03", "<h1>night three</h1>", "--keep-daily", "1")
    fates = {r["snapshot_id"]: r["fate"] for r in kept["retention"]}
    assert fates == {first: "protected", second: "deleted", third["snapshot_id"]: "kept (daily)"}, kept
    remote.close()
    world.client(service="autoscaling").delete_auto_scaling_group(AutoScalingGroupName=GROUP)
    ec2.terminate_instances(InstanceIds=[production["instance_id"]])


@needs_root
def test_template_refuses_bad_sizes_and_a_group_it_did_not_make(world: World, roles: Path) -> None:
    bad = cli(world, roles, "template", "web", "--env", "prod", "--asg", "g", "--min", "3", "--max", "1")
    assert bad.returncode == 2 and "--min 3 is more than --max 1" in bad.stderr, bad.stderr
    stray = cli(world, roles, "template", "web", "--env", "prod", "--desired", "1")
    assert stray.returncode == 2 and "--desired: options of an Auto Scaling group; give --asg NAME" in stray.stderr
    if not world.status()["ec2"][control.REGION]["images"]:
        pytest.skip("needs the module's web build (the slow test)")
    ec2, scaling = world.client(), world.client(service="autoscaling")
    scaling.create_auto_scaling_group(
        AutoScalingGroupName="theirs", LaunchTemplate={"LaunchTemplateName": TEMPLATE}, MinSize=0, MaxSize=1,
        AvailabilityZones=[f"{control.REGION}a"],
    )  # fmt: skip
    versions = ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0][
        "LatestVersionNumber"
    ]
    refused = cli(world, roles, "template", "web", "--env", "prod", "--from", "seed", "--asg", "theirs", "--max", "3")
    assert refused.returncode == 3, refused.stderr
    assert "Auto Scaling group theirs is left as it is" in refused.stderr
    # Refused before anything changed: the template has no new version either.
    after = ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]["LatestVersionNumber"]
    assert after == versions
    unsized = cli(world, roles, "template", "web", "--env", "prod", "--from", "seed", "--asg", "new-group")
    assert unsized.returncode == 2 and "creating it needs --min and --max" in unsized.stderr, unsized.stderr
    assert (
        ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]["LatestVersionNumber"]
        == versions
    )
    assert (
        scaling.describe_auto_scaling_groups(AutoScalingGroupNames=["theirs"])["AutoScalingGroups"][0]["MaxSize"] == 1
    )
    scaling.delete_auto_scaling_group(AutoScalingGroupName="theirs")


def test_template_volume_size_is_at_least_the_snapshot_and_maps_the_bigger_volume(world: World, roles: Path) -> None:
    if not world.status()["ec2"][control.REGION]["images"]:
        pytest.skip("needs the module's web build (the slow test)")
    ec2 = world.client()
    before = ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]["LatestVersionNumber"]
    small = cli(world, roles, "template", "web", "--env", "prod", "--from", "seed", "--volume-size", "1")
    assert small.returncode == 2 and "is smaller than snapshot" in small.stderr, small.stderr
    after = ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])["LaunchTemplates"][0]["LatestVersionNumber"]
    assert after == before, "refused before a version was made"
    big = cli(world, roles, "template", "web", "--env", "prod", "--from", "seed", "--volume-size", "40")
    assert big.returncode == 0, big.stderr
    data = ec2.describe_launch_template_versions(LaunchTemplateName=TEMPLATE, Versions=["$Default"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    sizes = [m["Ebs"].get("VolumeSize") for m in data["BlockDeviceMappings"] if m.get("Ebs", {}).get("SnapshotId")]
    assert sizes == [40], data["BlockDeviceMappings"]

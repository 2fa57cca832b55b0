"""End to end in a private network: `web` is built in a subnet without public addresses, reached
only through a real OpenSSH `ssh -W` bastion, and its seed is drilled the same way in another AZ.

The sandbox gives private-subnet instances no host route at all (tests/test_sandbox_vpc.py):
a build that succeeds here went through the bastion.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from builder import tags
from tests.sandbox import REGION, Bastion, World, bastion, private_network

pytestmark = [pytest.mark.slow, pytest.mark.skipif(__import__("os").geteuid() != 0, reason="machines need root")]


@pytest.fixture(scope="module")
def network(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A VPC with private subnets in two AZs and a bastion in its public subnet."""
    ec2 = world.client()
    private_a, public = private_network(ec2, "10.30.0.0/16", f"{REGION}a")
    vpc = ec2.describe_subnets(SubnetIds=[private_a])["Subnets"][0]["VpcId"]
    private_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.30.2.0/24", AvailabilityZone=f"{REGION}b")["Subnet"]
    jump = bastion(world, public, tmp_path_factory.mktemp("bastion"))
    return {"vpc": vpc, "a": private_a, "b": private_b["SubnetId"], "bastion": jump}


def _through(jump: Bastion) -> list[str]:
    return [
        "--bastion", jump.spec,
        "--bastion-known-hosts", str(jump.known_hosts),
        "--bastion-identity", str(jump.key_file),
    ]  # fmt: skip


def _ssh_processes() -> list[str]:
    done = subprocess.run(["pgrep", "-a", "-x", "ssh"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def built(world: World, network: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    manifest = tmp_path_factory.mktemp("manifest") / "web.json"
    done = world.cli(
        "web", "--sandbox", "--subnet-id", network["a"], *_through(network["bastion"]),
        "--manifest", str(manifest), "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"result": json.loads(done.stdout), "stderr": done.stderr, "manifest": json.loads(manifest.read_text())}


def test_web_builds_in_a_private_subnet_through_the_bastion(world: World, built: dict[str, Any]) -> None:
    ec2 = world.client()
    image = ec2.describe_images(ImageIds=[built["result"]["builds"][0]["ami"]])["Images"][0]
    assert image["State"] == "available"
    build_filter = [{"Name": f"tag:{tags.BUILD_ID}", "Values": [built["manifest"]["build_id"]]}]
    builders = [i for r in ec2.describe_instances(Filters=build_filter)["Reservations"] for i in r["Instances"]]
    assert builders, "the builder is still described (terminated)"
    for builder in builders:
        assert not builder.get("PublicIpAddress"), builder
        assert builder["PrivateIpAddress"].startswith("10.30.1."), builder["PrivateIpAddress"]
    # SSH was admitted from the VPC, never from the world or this host's address.
    assert "10.30.0.0/16" in built["stderr"]
    assert "0.0.0.0/0" not in built["stderr"]
    assert not _ssh_processes(), "the proxy's ssh processes are gone"


def test_the_seed_drills_through_the_bastion_in_another_az(
    world: World, network: dict[str, Any], built: dict[str, Any]
) -> None:
    done = world.cli(
        "drill", "web", "--sandbox", "--from", "seed", "--subnet-id", network["b"],
        *_through(network["bastion"]), "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["passed"] and not report["left_behind"]
    assert report["az"] == f"{REGION}b" and report["source_az"] == f"{REGION}a"  # the seed records where it was
    assert any(c["check"] == "http" and c["state"] == "ok" for c in report["checks"]), report["checks"]
    assert not _ssh_processes()


def test_without_the_bastion_the_private_builder_cannot_be_reached(world: World, network: dict[str, Any]) -> None:
    """Asking for the public address of a builder in a private subnet: exit 2, what to give instead, nothing left."""
    done = world.cli("web", "--sandbox", "--subnet-id", network["a"], "--connect", "public", "--ssh-timeout", "30")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has no public IP address" in done.stderr and "--bastion" in done.stderr
    assert "Traceback" not in done.stderr
    bastion_id = network["bastion"].id
    assert [i for i in world.ec2_view()["instances"] if i != bastion_id] == []
    volumes = world.client().describe_volumes()["Volumes"]
    assert [v["VolumeId"] for v in volumes if all(a["InstanceId"] != bastion_id for a in v["Attachments"])] == []

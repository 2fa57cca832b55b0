"""Capacity: instance_types as an ordered fallback, the AZ left to EC2 first, then AZs from its offerings, StateReasons named.

The launch decisions run against moto in-process (no machine needed); the fallback of a real
build and of a restore runs in the sandbox, told to refuse a type in an AZ
(`sandbox capacity`), as EC2 refuses it when it has no capacity.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
import yaml
from moto import mock_aws

from builder.aws.ec2 import EC2, RETRIES
from builder.aws.resources import LaunchSpec, launch, placements
from builder.drill import other_zone
from builder.errors import CloudError, InvalidInput
from builder.roles import load_role
from builder.sandbox import capacity
from tests.conftest import GOOD_ROLE, MINI_ROLE
from tests.machines import needs_root
from tests.sandbox import World

# moto's offerings, as EC2's: us-east-1e offers neither t3.small nor t3a.small; it offers t2.large.


@pytest.fixture
def ec2() -> Iterator[EC2]:
    with mock_aws():
        yield EC2(boto3.client("ec2", region_name="us-east-1", config=RETRIES))


def spec(ec2: EC2, instance_type: str, **extra: Any) -> LaunchSpec:
    image = ec2.client.describe_images(Owners=["136693071363"])["Images"][0]["ImageId"]
    return LaunchSpec(image, instance_type, (), {"test": "capacity"}, {"test": "capacity"}, **extra)


def test_pairs_go_az_by_az_in_the_roles_order_of_types(ec2: EC2) -> None:
    pairs = placements(ec2, ["t3.small", "t2.large"])
    assert pairs[:3] == [("t3.small", "us-east-1a"), ("t2.large", "us-east-1a"), ("t3.small", "us-east-1b")]
    assert ("t2.large", "us-east-1e") in pairs and ("t3.small", "us-east-1e") not in pairs
    with pytest.raises(CloudError) as caught:
        placements(ec2, ["t3.small", "t3a.small"], az="us-east-1e")
    assert "none of t3.small, t3a.small is offered in us-east-1e" in caught.value.render()


def test_a_type_the_subnets_az_does_not_offer_is_skipped(ec2: EC2, caplog: pytest.LogCaptureFixture) -> None:
    subnets = ec2.client.describe_subnets()["Subnets"]
    subnet = next(s["SubnetId"] for s in subnets if s["AvailabilityZone"] == "us-east-1e")
    caplog.set_level(logging.INFO)
    (instance_id,) = launch(ec2, spec(ec2, "t3.small", subnet_id=subnet), fallback=("t2.large",), running=30)
    described = ec2.described[instance_id]
    assert (described["InstanceType"], described["Placement"]["AvailabilityZone"]) == ("t2.large", "us-east-1e")
    assert ec2.calls["run_instances"] == 1  # t3.small was never asked for there
    assert f"t3.small is not offered in us-east-1e (subnet {subnet}): skipped" in caplog.text


def test_a_launch_ec2_may_place_asks_for_no_offerings(ec2: EC2) -> None:
    """No subnet, no AZ, public addressing as the default VPC says: RunInstances first, no AZ, nothing before it."""
    wanted = spec(ec2, "t3.small", client_token="build-1")
    sent: list[tuple[str, dict[str, Any]]] = []
    ec2.client.meta.events.register(
        "provide-client-params.ec2.*", lambda model, params, **_: sent.append((model.name, dict(params)))
    )
    launched = launch(ec2, wanted, fallback=("t2.large",), running=30)
    operations = [op for op, _ in sent]
    assert "DescribeInstanceTypeOfferings" not in operations and "DescribeSubnets" not in operations
    assert operations[0] == "RunInstances" and operations.count("RunInstances") == 1
    run = sent[0][1]
    assert "Placement" not in run and "SubnetId" not in run and run["ClientToken"] == "build-1"
    (instance,) = [i for r in ec2.client.describe_instances()["Reservations"] for i in r["Instances"]]
    assert [instance["InstanceId"]] == launched and instance["InstanceType"] == "t3.small"
    assert instance["State"]["Name"] == "running"


def test_drill_takes_the_first_other_az_that_offers_a_type_of_the_role(
    ec2: EC2, roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    write_role("r", {**GOOD_ROLE, "instance_types": ["t3.small", "t3a.small"]})
    role = load_role("r", roles_dir)
    zones = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1e", "us-east-1f"]
    # Alphabetically the next one after 1d is 1e, which offers neither type.
    assert other_zone(ec2, role, "us-east-1d", zones[3:]) == "us-east-1f"
    with pytest.raises(CloudError) as caught:
        other_zone(ec2, role, "us-east-1a", ["us-east-1a", "us-east-1e"])
    assert "other than us-east-1a (us-east-1e) offers t3.small or t3a.small" in caught.value.render()


def test_sandbox_capacity_patterns_are_checked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    refusals = capacity.update(state, ["t3.small@us-east-1a", "*@us-east-1b"], ["t3a.small@*"])
    assert refusals.refuses("t3.small", "us-east-1a") and refusals.refuses("m5.large", "us-east-1b")
    assert not refusals.refuses("t3.small", "us-east-1c") and refusals.fails_late("t3a.small", "us-east-1f")
    assert capacity.load(state) == refusals
    assert capacity.update(state, [], [], clear=True) == capacity.Refusals()
    with pytest.raises(InvalidInput, match="TYPE@AZ"):
        capacity.update(state, ["t3.small"], [])


# ---------------------------------------------------------------- in the sandbox


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    (path / "mini.yaml").write_text(yaml.safe_dump({**MINI_ROLE, "instance_types": ["t3.small", "t3a.small"]}))
    return path


def refuse(world: World, *args: str) -> None:
    done = world.cli("sandbox", "capacity", "--clear", *args)
    assert done.returncode == 0, done.stderr


def leftovers(world: World, images: list[str]) -> dict[str, list[str]]:
    """Return what the sandbox's EC2 holds beyond ``images``: live instances, volumes, keys, groups."""
    client = world.client()
    view = world.ec2_view()
    groups = [g["GroupId"] for g in client.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
    return {
        "instances": view["instances"],
        "volumes": view["volumes"],
        "images": [i for i in view["images"] if i not in images],
        "key_pairs": [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]],
        "security_groups": groups,
    }


@pytest.fixture(scope="module")
def fallback_build(world: World, roles: Path) -> tuple[str, str]:
    """Build mini while t3.small has no capacity in us-east-1a (the first AZ); return (AMI, stderr)."""
    refuse(world, "--refuse", "t3.small@us-east-1a")
    built = world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    return str(json.loads(built.stdout)["builds"][0]["ami"]), built.stderr


@needs_root
def test_a_refused_type_falls_back_to_the_next_and_the_build_succeeds(
    world: World, fallback_build: tuple[str, str]
) -> None:
    ami, stderr = fallback_build
    assert (
        "t3.small in us-east-1a: InsufficientInstanceCapacity (We currently do not have sufficient t3.small "
        "capacity in the Availability Zone you requested (us-east-1a)."
    ) in stderr
    assert "; trying t3a.small in us-east-1a" in stderr
    # EC2 placed the first attempt itself (no AZ asked for, no offerings asked for before it), then
    # the tool went AZ by AZ where offered: t3.small again in us-east-1a, then t3a.small there.
    first = "t3.small in an AZ of EC2's choice: InsufficientInstanceCapacity (We currently do not have sufficient"
    assert first in stderr and "; trying AZ by AZ where offered" in stderr
    assert stderr.index(first) < stderr.index("t3.small in us-east-1a: InsufficientInstanceCapacity")
    builders = [i for r in world.client().describe_instances()["Reservations"] for i in r["Instances"]]
    assert [(i["InstanceType"], i["Placement"]["AvailabilityZone"]) for i in builders] == [("t3a.small", "us-east-1a")]
    assert world.client().describe_images(ImageIds=[ami])["Images"][0]["State"] == "available"
    assert not any(leftovers(world, [ami]).values()), leftovers(world, [ami])


@needs_root
def test_when_every_pair_is_refused_the_build_names_each_attempt_and_leaves_nothing(
    world: World, roles: Path, fallback_build: tuple[str, str]
) -> None:
    ami, _ = fallback_build
    subnet = next(
        s["SubnetId"] for s in world.client().describe_subnets()["Subnets"] if s["AvailabilityZone"] == "us-east-1a"
    )
    refuse(world, "--refuse", "t3.small@us-east-1a", "--refuse-late", "t3a.small@*")
    try:
        built = world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--subnet-id", subnet)
    finally:
        refuse(world)
    assert built.returncode == 3, built.stderr
    error = built.stderr.strip().splitlines()
    assert any("NoCapacity" in line for line in error), built.stderr
    assert "t3.small in us-east-1a: InsufficientInstanceCapacity (We currently do not" in built.stderr
    # The second attempt launched, and its instance ended terminated: EC2's StateReason names why.
    assert "t3a.small in us-east-1a: Server.InsufficientInstanceCapacity (instance i-" in built.stderr
    assert (
        "(t3a.small in us-east-1a) went 'terminated' before running: "
        "Server.InsufficientInstanceCapacity: Insufficient capacity.)" in built.stderr
    )
    assert not any(leftovers(world, [ami]).values()), leftovers(world, [ami])


@needs_root
def test_a_restore_whose_instance_ends_terminated_names_the_state_reason(
    world: World, roles: Path, fallback_build: tuple[str, str]
) -> None:
    """The AMI of ``fallback_build`` restored from its seed, while t3.small ends terminated in us-east-1b."""
    refuse(world, "--refuse-late", "t3.small@us-east-1b")
    try:
        done = world.cli(
            "launch",
            "mini",
            "--from",
            "seed",
            "--az",
            "us-east-1b",
            "--instance-type",
            "t3.small",
            "--roles-dir",
            str(roles),
            "--sandbox",
        )
    finally:
        refuse(world)
    assert done.returncode == 3, done.stderr
    assert "Server.InsufficientInstanceCapacity" in done.stderr and "Insufficient capacity." in done.stderr
    assert "(t3.small in us-east-1b) went 'terminated' before running" in done.stderr
    assert world.ec2_view()["instances"] == [] and world.ec2_view()["volumes"] == []


@needs_root
def test_a_restore_placed_by_ec2_goes_on_az_by_az_and_names_every_attempt(
    world: World, roles: Path, fallback_build: tuple[str, str]
) -> None:
    """No --az: EC2 places the first instance (us-east-1a); ended terminated, it is not asked for there again."""
    offers = world.client().describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": ["t3.small"]}]
    )["InstanceTypeOfferings"]
    refuse(world, "--refuse-late", "t3.small@*")
    try:
        done = world.cli(
            "launch", "mini", "--from", "seed", "--instance-type", "t3.small", "--roles-dir", str(roles), "--sandbox"
        )
    finally:
        refuse(world)
    assert done.returncode == 3, done.stderr
    error = next(line for line in done.stderr.splitlines() if "NoCapacity" in line)
    tried = re.findall(r"t3\.small in ([a-z0-9-]+): Server\.InsufficientInstanceCapacity \(instance i-", error)
    assert tried == sorted(o["Location"] for o in offers), error  # us-east-1a (EC2's choice) once, then AZ by AZ
    assert "t3.small in us-east-1a: Server.InsufficientInstanceCapacity (instance i-" in done.stderr
    assert "Insufficient capacity.); trying AZ by AZ where offered" in done.stderr
    assert world.ec2_view()["instances"] == [] and world.ec2_view()["volumes"] == []


@needs_root
def test_after_ec2s_own_placement_ends_terminated_each_attempt_has_its_own_client_token(world: World) -> None:
    """The refused instance's token is not reused (EC2 would answer with that instance), nor is its pair retried."""
    ec2 = EC2(world.client(config=RETRIES))
    image = ec2.client.describe_images(Owners=["136693071363"])["Images"][0]["ImageId"]
    wanted = LaunchSpec(image, "t3.small", (), {"test": "capacity"}, {"test": "capacity"}, client_token="build-7")
    sent: list[dict[str, Any]] = []
    ec2.client.meta.events.register("provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(params))
    refuse(world, "--refuse-late", "t3.small@us-east-1a")
    try:
        (instance_id,) = launch(ec2, wanted, fallback=("t3a.small",), running=120)
    finally:
        refuse(world)
    try:
        asked = [(p["InstanceType"], p.get("Placement", {}).get("AvailabilityZone"), p["ClientToken"]) for p in sent]
        assert asked == [("t3.small", None, "build-7"), ("t3a.small", "us-east-1a", "build-7-1")]
        described = world.describe(instance_id)
        assert (described["InstanceType"], described["State"]["Name"]) == ("t3a.small", "running")
    finally:
        ec2.terminate(instance_id)
    assert world.ec2_view()["instances"] == [] and world.ec2_view()["volumes"] == []


@needs_root
def test_the_sandbox_refuses_as_ec2_does(world: World) -> None:
    """An AZ that does not offer a type answers Unsupported; a refused one InsufficientInstanceCapacity, HTTP 500."""
    image = world.client().describe_images(Owners=["136693071363"])["Images"][0]["ImageId"]
    once = world.client(config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 1}))
    refuse(world, "--refuse", "t3.small@us-east-1b")
    try:
        answers = {}
        for az in ("us-east-1e", "us-east-1b"):
            with pytest.raises(botocore.exceptions.ClientError) as caught:
                once.run_instances(
                    ImageId=image, InstanceType="t3.small", MinCount=1, MaxCount=1, Placement={"AvailabilityZone": az}
                )
            answers[az] = caught.value.response
    finally:
        refuse(world)
    assert answers["us-east-1e"]["Error"]["Code"] == "Unsupported"
    assert "(t3.small) is not supported in your requested Availability Zone (us-east-1e)" in str(answers["us-east-1e"])
    refused = answers["us-east-1b"]
    assert refused["Error"]["Code"] == "InsufficientInstanceCapacity"
    assert refused["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert refused["Error"]["Message"].startswith(
        "We currently do not have sufficient t3.small capacity in the Availability Zone you requested (us-east-1b)."
    )
    assert world.ec2_view()["instances"] == []

"""Publishing to SSM parameters (builder/publish.py): build, copy and snapshot write them; prune spares them.

Against the sandbox's endpoint (moto's SSM behind SigV4, its EC2 with real machines), with
the latency model, so that a nightly snapshot really is `pending` for a while. Every check
reads the parameters the way other tools do: boto3's ``ssm`` client with the sandbox's
credentials (``aws ssm get-parameter`` is the same call).

moto's RunInstances does not resolve ``resolve:ssm:`` in a launch template's ImageId (5.2.5:
nothing in moto reads it), so a template reading ``/ebsrole/<role>/ami`` is not booted here:
the tests check the parameter's value and data type, which is what the resolution reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import InvalidInput
from builder.publish import ami_name, check_env, latest_snapshot_name
from builder.sandbox import control
from tests.conftest import MINI_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import REGION, World, wait_until
from tests.test_registry import fake_role_image

OTHER_REGION = "eu-west-1"
IMAGE = "aws:ec2:image"
SCALE = 0.15  # the latency model, scaled: a snapshot stays `pending` for about 7 s


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state, latency=("fixed", SCALE, 0.0))
    try:
        yield world
    finally:
        control.reset(state)


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    shutil.copy(PROJECT / "roles/defaults.yaml", path)
    (path / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    return path


def cli(world: World, roles: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return world.cli(*args, "--roles-dir", str(roles), "--sandbox")


@pytest.fixture(scope="module")
def built(world: World, roles: Path) -> dict[str, Any]:
    """One build of mini, published for environment staging too."""
    done = cli(world, roles, "mini", "--env", "staging", "--format", "json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout)["builds"][0])


def parameter(world: World, name: str, region: str = REGION) -> dict[str, Any] | None:
    """Return the parameter as ``aws ssm get-parameter`` shows it, None when there is none."""
    ssm = world.client(region, service="ssm")
    try:
        return dict(ssm.get_parameter(Name=name)["Parameter"])
    except ssm.exceptions.ParameterNotFound:
        return None


def values(world: World, *names: str, region: str = REGION) -> dict[str, str | None]:
    """Return each parameter's value (None: no such parameter)."""
    return {name: (parameter(world, name, region) or {}).get("Value") for name in names}


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("env", ["", "prod", "staging-2", "eu.west_1", "A" * 63])
def test_names_of_valid_environments(env: str) -> None:
    check_env(env, "--env")
    assert ami_name("web", env) == (f"/ebsrole/web/{env}/ami" if env else "/ebsrole/web/ami")
    assert latest_snapshot_name("web", env).startswith("/ebsrole/web/")


@pytest.mark.parametrize("env", ["prod/eu", "-prod", ".", "prod env", "prød", "A" * 64, "prod:1"])
def test_an_environment_that_cannot_be_one_level_of_a_path_is_refused(env: str) -> None:
    with pytest.raises(InvalidInput, match="not usable in an SSM parameter name") as caught:
        check_env(env, "--env")
    assert caught.value.exit_code == 2 and repr(env) in str(caught.value)


# ---------------------------------------------------------------- build


@needs_root
def test_build_publishes_the_ami_its_seed_and_the_envs_ami(world: World, built: dict[str, Any]) -> None:
    ami, seed = built["ami"], built["seed_snapshot"]
    current = parameter(world, "/ebsrole/mini/ami")
    assert current is not None and current["Value"] == ami and current["DataType"] == "aws:ec2:image"
    assert values(world, "/ebsrole/mini/seed-snapshot", "/ebsrole/mini/staging/ami") == {
        "/ebsrole/mini/seed-snapshot": seed,
        "/ebsrole/mini/staging/ami": ami,
    }
    ssm = world.client(service="ssm")
    described = ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": ["/ebsrole/mini/ami"]}])
    build_id = Path(built["manifest"]).stem.removeprefix("mini-")
    assert f"build {build_id}" in described["Parameters"][0]["Description"]
    tagged = ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId="/ebsrole/mini/staging/ami")
    found = {t["Key"]: t["Value"] for t in tagged["TagList"]}
    assert found["ebsrole:role"] == "mini" and found["ebsrole:env"] == "staging"
    assert found["ebsrole:created-by"].startswith("ebsrole ")
    assert {p["name"]: p["outcome"] for p in built["published"]} == {
        "/ebsrole/mini/ami": "written",
        "/ebsrole/mini/seed-snapshot": "written",
        "/ebsrole/mini/staging/ami": "written",
    }


@needs_root
def test_an_unchanged_rebuild_repairs_stale_and_missing_parameters_and_no_publish_writes_none(
    world: World, roles: Path, built: dict[str, Any]
) -> None:
    ssm = world.client(service="ssm")
    version = parameter(world, "/ebsrole/mini/ami")["Version"]  # type: ignore[index]
    again = cli(world, roles, "mini", "--if-changed", "--format", "json")
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)["builds"][0]
    assert record["result"] == "unchanged" and {p["outcome"] for p in record["published"]} == {"unchanged"}
    assert parameter(world, "/ebsrole/mini/ami")["Version"] == version  # type: ignore[index]  # no new version

    # Someone pointed the parameter elsewhere and deleted the seed's: a re-run puts both right.
    ssm.put_parameter(
        Name="/ebsrole/mini/ami", Value="ami-000000000000000d2", Type="String", DataType=IMAGE, Overwrite=True
    )
    ssm.delete_parameter(Name="/ebsrole/mini/seed-snapshot")
    skipped = cli(world, roles, "mini", "--if-changed", "--no-publish", "--format", "json")
    assert skipped.returncode == 0 and json.loads(skipped.stdout)["builds"][0]["published"] == []
    assert values(world, "/ebsrole/mini/ami", "/ebsrole/mini/seed-snapshot") == {
        "/ebsrole/mini/ami": "ami-000000000000000d2",
        "/ebsrole/mini/seed-snapshot": None,
    }
    repaired = cli(world, roles, "mini", "--if-changed", "--format", "json")
    assert repaired.returncode == 0, repaired.stderr
    assert values(world, "/ebsrole/mini/ami", "/ebsrole/mini/seed-snapshot") == {
        "/ebsrole/mini/ami": built["ami"],
        "/ebsrole/mini/seed-snapshot": built["seed_snapshot"],
    }


@needs_root
def test_a_parameter_ssm_refuses_warns_and_the_build_still_succeeds(
    world: World, roles: Path, built: dict[str, Any]
) -> None:
    """SSM keeps 100 versions; when the oldest carries a label it refuses a 101st (as AWS does)."""
    ssm = world.client(service="ssm")
    name = "/ebsrole/mini/full/ami"
    for n in range(100):
        ssm.put_parameter(Name=name, Value=f"ami-{n:017x}", Type="String", DataType=IMAGE, Overwrite=n > 0)
    ssm.label_parameter_version(Name=name, ParameterVersion=1, Labels=["pinned"])
    try:
        done = cli(world, roles, "mini", "--if-changed", "--env", "full", "--format", "json")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)["builds"][0]
        assert record["ami"] == built["ami"]
        outcomes = {p["name"]: p["outcome"] for p in record["published"]}
        assert outcomes[name] == "failed" and outcomes["/ebsrole/mini/ami"] == "unchanged"
        warning = next(line for line in done.stderr.splitlines() if line.startswith("warning: SSM parameter"))
        assert (
            f"{name} in {REGION} NOT set to {built['ami']}" in warning and "ParameterMaxVersionLimitExceeded" in warning
        )
        assert "hint: the result stands" in done.stderr and "--no-publish" in done.stderr
        assert parameter(world, name)["Value"] == f"ami-{99:017x}"  # type: ignore[index]
    finally:
        ssm.delete_parameter(Name=name)


@needs_root
def test_a_bad_env_name_is_refused_before_anything(world: World, roles: Path) -> None:
    before = world.status()["api_calls_by_operation"]
    done = cli(world, roles, "mini", "--env", "prod/eu", "--format", "json")
    assert done.returncode == 2 and "--env 'prod/eu': not usable in an SSM parameter name" in done.stderr
    assert "Traceback" not in done.stderr and world.status()["api_calls_by_operation"] == before


# ---------------------------------------------------------------- copy


@needs_root
def test_copy_publishes_the_copy_in_its_region(world: World, roles: Path, built: dict[str, Any]) -> None:
    done = cli(
        world, roles, "copy", "mini", "--ami", built["ami"], "--to", OTHER_REGION, "--env", "dr", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    copy = json.loads(done.stdout)
    there = parameter(world, "/ebsrole/mini/ami", OTHER_REGION)
    assert there is not None and there["Value"] == copy["ami"] != built["ami"]
    assert there["DataType"] == "aws:ec2:image"
    assert values(world, "/ebsrole/mini/seed-snapshot", "/ebsrole/mini/dr/ami", region=OTHER_REGION) == {
        "/ebsrole/mini/seed-snapshot": copy["seed_snapshot"],
        "/ebsrole/mini/dr/ami": copy["ami"],
    }
    assert parameter(world, "/ebsrole/mini/ami")["Value"] == built["ami"]  # type: ignore[index]  # home untouched
    assert parameter(world, "/ebsrole/mini/dr/ami") is None


# ---------------------------------------------------------------- nightly snapshots


def snapshot_run(world: World, roles: Path, night: str) -> dict[str, Any]:
    done = cli(world, roles, "snapshot", "mini", "--as-of", night, "--format", "json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def completed(world: World, snapshot_id: str) -> bool:
    found = world.client().describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    return bool(found) and found[0]["State"] == "completed"


@needs_root
def test_snapshot_publishes_each_envs_newest_completed_snapshot_only(
    world: World, roles: Path, built: dict[str, Any]
) -> None:
    env_tags = [{"ResourceType": "instance", "Tags": [{"Key": "ebsrole:env", "Value": "prod"}]}]
    prod = world.launch(built["ami"], TagSpecifications=env_tags)
    plain = world.launch(built["ami"])
    ec2 = world.client()
    name, plain_name = "/ebsrole/mini/prod/latest-snapshot", "/ebsrole/mini/latest-snapshot"
    try:
        first = snapshot_run(world, roles, "2026-03-01")
        mine = {s["instance_id"]: s["snapshot_id"] for s in first["snapshots"]}
        rows = {p["parameter"]: p for p in first["published"]}
        # Tonight's snapshots are still pending: nothing completed to publish yet, and it says so.
        assert rows[name]["outcome"] == "none completed" and mine[prod.id] in rows[name]["note"]
        assert parameter(world, name) is None and parameter(world, plain_name) is None
        wait_until(lambda: completed(world, mine[prod.id]) and completed(world, mine[plain.id]), 60, "completed")

        again = snapshot_run(world, roles, "2026-03-01")  # the same night: nothing new, publishes what completed
        assert {p["parameter"]: p["outcome"] for p in again["published"]} == {name: "written", plain_name: "written"}
        assert values(world, name, plain_name) == {name: mine[prod.id], plain_name: mine[plain.id]}

        second = snapshot_run(world, roles, "2026-03-02")
        tonight = {s["instance_id"]: s["snapshot_id"] for s in second["snapshots"]}[prod.id]
        row = next(p for p in second["published"] if p["parameter"] == name)
        assert row["outcome"] == "unchanged" and row["snapshot_id"] == mine[prod.id]
        assert tonight in row["note"] and "pending" in row["note"]
        assert parameter(world, name)["Value"] == mine[prod.id]  # type: ignore[index]  # not the pending one
        assert parameter(world, name)["DataType"] == "text"  # type: ignore[index]
    finally:
        ec2.terminate_instances(InstanceIds=[prod.id, plain.id])
        gone = {"Name": "instance-state-name", "Values": ["terminated"]}
        ids = [prod.id, plain.id]
        wait_until(
            lambda: len(ec2.describe_instances(InstanceIds=ids, Filters=[gone])["Reservations"]) == 2, 120, "gone"
        )


# ---------------------------------------------------------------- prune


def images_available(world: World, ids: list[str]) -> bool:
    found = world.client().describe_images(ImageIds=ids)["Images"]
    return len(found) == len(ids) and all(i["State"] == "available" for i in found)


@needs_root
def test_prune_spares_the_ami_an_envs_parameter_names_beyond_the_newest(
    world: World, roles: Path, built: dict[str, Any]
) -> None:
    """The built AMI stays named by /ebsrole/mini/staging/ami only, while two newer AMIs of mini exist."""
    newer = [fake_role_image(world, "mini", f"{n:032x}", "/srv/app", f"20991231T00000{n}Z-0000000{n}") for n in (1, 2)]
    ids = [m["image"] for m in newer]
    wait_until(lambda: images_available(world, ids), 60, "the newer AMIs available")  # they pend first
    ssm = world.client(service="ssm")
    ssm.put_parameter(Name="/ebsrole/mini/ami", Value=newer[1]["image"], Type="String", DataType=IMAGE, Overwrite=True)
    try:
        done = cli(world, roles, "prune", "mini", "--keep", "1", "--dry-run", "--format", "json")
        assert done.returncode == 0, done.stderr
        rows = {r["image_id"]: r for r in json.loads(done.stdout)["images"]}
        assert rows[built["ami"]]["fate"] == "in use", (built["ami"], ids, rows)
        assert rows[built["ami"]]["detail"] == "SSM parameter /ebsrole/mini/staging/ami"
        assert rows[newer[0]["image"]]["fate"] == "would deregister"
    finally:
        ec2 = world.client()
        for made in newer:
            ec2.deregister_image(ImageId=made["image"])
        ssm.put_parameter(Name="/ebsrole/mini/ami", Value=built["ami"], Type="String", DataType=IMAGE, Overwrite=True)

"""sweep touches only what the tool made, never a running build; sweep --volumes lists before it deletes.

EC2 is moto's HTTP server in this process (no sandbox here, no mock_aws); the CLI runs as a
user runs it, and a running build is a real build process waiting at SSH with every resource made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder import sweep
from builder.errors import LeftBehind
from builder.pipeline import BuildOptions, new_build_id
from builder.tags import tag
from tests.conftest import run_cli
from tests.test_build_cli import both_volumes_attached, resources, start_build, wait_until

REGION = "eu-west-1"
OLD = "2020-01-01T00:00:00Z"


def swept(endpoint: str, *args: str) -> Any:
    return run_cli("sweep", "--endpoint-url", endpoint, "--region", REGION, *args)


def tool_tags(build_id: str, role: str = "web", kind: str = "builder", **changed: str | None) -> list[dict[str, str]]:
    """The tags a build puts on a temporary resource (``changed``: replaced, None: left out)."""
    tags: dict[str, str | None] = {
        tag("build-id"): build_id,
        tag("role"): role,
        tag("kind"): kind,
        tag("created-by"): "ebsrole 0.9.0",
        tag("created-at"): OLD,
        tag("temporary"): "true",
    }
    tags.update({tag(k.replace("_", "-")): v for k, v in changed.items()})
    return [{"Key": k, "Value": v} for k, v in tags.items() if v is not None]


def spec(resource_type: str, tags: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": tags}]


def key_pair(client: Any, name: str, tags: list[dict[str, str]]) -> str:
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDQq1T4bRkI7L8r2K3mFv5V2vXJ6Qz6yQ3F2nQm5l7aX test"
    client.import_key_pair(KeyName=name, PublicKeyMaterial=public.encode(), TagSpecifications=spec("key-pair", tags))
    return name


def group(client: Any, name: str, tags: list[dict[str, str]]) -> str:
    made = client.create_security_group(
        GroupName=name, Description=name, TagSpecifications=spec("security-group", tags)
    )
    return str(made["GroupId"])


def instance(client: Any, key: str, group_id: str, tags: list[dict[str, str]]) -> str:
    reply = client.run_instances(
        ImageId="ami-000000000000000d2",
        MinCount=1,
        MaxCount=1,
        KeyName=key,
        SecurityGroupIds=[group_id],
        TagSpecifications=[*spec("instance", tags), *spec("volume", tags)],
    )
    return str(reply["Instances"][0]["InstanceId"])


def build_of(client: Any, instance_id: str) -> str:
    """Return the build id an instance is tagged with."""
    (reservation,) = client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return next(t["Value"] for t in reservation["Instances"][0]["Tags"] if t["Key"] == tag("build-id"))


def live_instances(client: Any) -> set[str]:
    reservations = client.describe_instances()["Reservations"]
    return {i["InstanceId"] for r in reservations for i in r["Instances"] if i["State"]["Name"] != "terminated"}


# ---------------------------------------------------------------- what the tool made, and what only looks like it


def test_sweep_removes_a_dead_build_and_leaves_lookalikes_alone(endpoint: str, client: Any) -> None:
    dead = "20200101T000000Z-0badc0de"
    name = f"ebsrole-web-{dead}"
    ours = instance(
        client, key_pair(client, name, tool_tags(dead)), group(client, name, tool_tags(dead)), tool_tags(dead)
    )
    # Someone copied the build's tags onto their own instance, key pair and group.
    copied = tool_tags(dead)
    foreign_key, foreign_group = key_pair(client, "ops", copied), group(client, "web-prod", copied)
    foreign = instance(client, foreign_key, foreign_group, copied)
    # Named as the tool names things, but tags the tool never writes.
    odd = {
        "no created-at": tool_tags("20200101T000000Z-00000001", created_at=None),
        "garbled created-at": tool_tags("20200101T000000Z-00000002", created_at="last tuesday"),
        "no created-by": tool_tags("20200101T000000Z-00000003", created_by=None),
        "another tool": tool_tags("20200101T000000Z-00000004", created_by="terraform"),
        "not a build id": tool_tags("b1"),
    }
    odd_groups = {}
    for why, tags in odd.items():
        build_id = next(t["Value"] for t in tags if t["Key"] == tag("build-id"))
        odd_groups[why] = group(client, f"ebsrole-web-{build_id}", tags)

    done = swept(endpoint, "--older-than", "3h", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    removed = {r["id"] for r in report["resources"] if r["fate"] == "deleted"}
    assert ours in removed and name in removed
    spared = {r["id"]: r["reason"] for r in report["spared"]}
    assert "not named after build" in spared[foreign] or "neither its key pair" in spared[foreign]
    assert "not named after build" in spared[foreign_key]
    assert "not named after build" in spared[foreign_group]
    assert "never old" in spared[odd_groups["garbled created-at"]]
    assert "never old" in spared[odd_groups["no created-at"]]
    assert "created-by" in spared[odd_groups["no created-by"]] and "created-by" in spared[odd_groups["another tool"]]
    assert "not one the tool makes" in spared[odd_groups["not a build id"]]

    # What a user sees in EC2: the dead build is gone, every lookalike is still there.
    assert live_instances(client) == {foreign}
    assert {k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]} == {"ops"}
    groups = {g["GroupId"] for g in client.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"}
    assert groups == {foreign_group, *odd_groups.values()}


def test_a_resource_without_a_readable_time_is_never_old(endpoint: str, client: Any) -> None:
    for build_id, created_at in (("20200101T000000Z-000000a1", None), ("20200101T000000Z-000000a2", "2020-13-45")):
        key_pair(client, f"ebsrole-web-{build_id}", tool_tags(build_id, created_at=created_at))
    forced = swept(endpoint, "--older-than", "0s", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == "nothing to sweep"
    assert "never old" in forced.stderr
    assert len(client.describe_key_pairs()["KeyPairs"]) == 2


# ---------------------------------------------------------------- a build that is still running


def test_a_running_build_is_never_swept(endpoint: str, client: Any, mini_dir: Path, tmp_path: Path) -> None:
    proc = start_build(endpoint, mini_dir, tmp_path)
    try:
        wait_until(lambda: both_volumes_attached(client))
        running = resources(client)
        assert running["instances"] and running["security_groups"] and not running["key_pairs"]

        for age in ("0s", "1h", "119m"):
            refused = swept(endpoint, "--older-than", age)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert "below 2h" in refused.stderr and "--build-id" in refused.stderr
        # A longer build time limit raises the floor.
        assert swept(endpoint, "--older-than", "3h", "--build-time-limit", "7200").returncode == 2
        # At the floor (the default) the build is too young: spared, and said so.
        default = swept(endpoint)
        assert default.returncode == 0, default.stderr
        assert default.stdout.strip() == "nothing to sweep"
        assert f"spared instances {running['instances'][0]}: younger than 2h" in default.stderr
        assert resources(client) == running
        assert proc.poll() is None, "the build is still running"
    finally:
        proc.kill()
        proc.wait()
    # The build is dead now (SIGKILL: no cleanup). Its own id sweeps it, whatever its age.
    done = swept(endpoint, "--build-id", build_of(client, running["instances"][0]))
    assert done.returncode == 0, done.stderr
    assert not any(resources(client).values()), resources(client)
    assert swept(endpoint, "--build-id", "not-an-id").returncode == 2


def test_a_killed_builder_in_a_given_group_is_swept_by_its_client_token(
    endpoint: str, client: Any, mini_dir: Path, tmp_path: Path
) -> None:
    """No key pair and --security-group-id: only the launch's client token names the builder after its build."""
    given = client.create_security_group(GroupName="ops-ssh", Description="the operator's own group")["GroupId"]
    proc = start_build(endpoint, mini_dir, tmp_path, "--security-group-id", given)
    try:
        wait_until(lambda: both_volumes_attached(client))
    finally:
        proc.kill()
        proc.wait()
    (builder,) = resources(client)["instances"]
    (reservation,) = client.describe_instances(InstanceIds=[builder])["Reservations"]
    assert "KeyName" not in reservation["Instances"][0]
    assert [g["GroupId"] for g in reservation["Instances"][0]["SecurityGroups"]] == [given]
    # A lookalike with the builder's tags copied, launched with another token, is not the tool's.
    copied = reservation["Instances"][0]["Tags"]
    foreign = client.run_instances(
        ImageId="ami-000000000000000d2",
        MinCount=1,
        MaxCount=1,
        SecurityGroupIds=[given],
        ClientToken="someone-elses-launch",
        TagSpecifications=spec("instance", copied),
    )["Instances"][0]["InstanceId"]

    done = swept(endpoint, "--build-id", build_of(client, builder), "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert builder in {r["id"] for r in report["resources"] if r["fate"] == "deleted"}
    assert "client token" in {r["id"]: r["reason"] for r in report["spared"]}[foreign]
    assert live_instances(client) == {foreign}
    assert given in {g["GroupId"] for g in client.describe_security_groups()["SecurityGroups"]}


def test_cleanup_that_fails_names_its_build_not_an_age() -> None:
    build_id = new_build_id()
    text = LeftBehind([("key-pair", f"ebsrole-web-{build_id}", "denied")], None, build_id).render()
    assert f"python build.py sweep --build-id {build_id}" in text
    assert "older-than" not in text


def test_the_sweep_knows_the_builds_id_format_and_time_limit() -> None:
    assert sweep.BUILD_ID.fullmatch(new_build_id())
    assert BuildOptions().timeout == sweep.BUILD_TIME_LIMIT


# ---------------------------------------------------------------- sweep --volumes


def test_sweep_volumes_lists_the_tools_available_volumes_and_deletes_only_when_asked(
    endpoint: str, client: Any
) -> None:
    zone = f"{REGION}a"

    def volume(tags: dict[str, str]) -> str:
        made = client.create_volume(
            AvailabilityZone=zone,
            Size=1,
            TagSpecifications=spec("volume", [{"Key": k, "Value": v} for k, v in tags.items()]),
        )
        return str(made["VolumeId"])

    launched = {tag("role"): "web", tag("env"): "production", tag("kind"): "volume", tag("created-by"): "ebsrole 0.9.0"}
    snapshotted = volume(launched)
    client.create_snapshot(VolumeId=snapshotted)
    never_snapshotted = volume(launched)
    builder = volume({**launched, tag("kind"): "builder-volume", tag("temporary"): "true"})
    foreign = volume({**launched, tag("created-by"): "terraform"})
    untagged = volume({"Name": "scratch"})  # no tag of the tool
    attached = volume(launched)
    holder = client.run_instances(ImageId="ami-000000000000000d2", MinCount=1, MaxCount=1)["Instances"][0]
    client.attach_volume(VolumeId=attached, InstanceId=holder["InstanceId"], Device="/dev/sdf")

    def existing() -> set[str]:
        return {v["VolumeId"] for v in client.describe_volumes()["Volumes"]}

    before = existing()
    listed = swept(endpoint, "--volumes", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["dry_run"] is True
    fates = {v["id"]: v["fate"] for v in report["volumes"]}
    assert fates == {snapshotted: "found", builder: "found", never_snapshotted: "spared"}
    assert existing() == before, "listing deletes nothing"
    text = swept(endpoint, "--volumes")
    assert text.returncode == 0 and "--delete" in text.stdout and existing() == before

    assert swept(endpoint, "--delete").returncode == 2  # --delete only goes with --volumes

    deleted = swept(endpoint, "--volumes", "--delete")
    assert deleted.returncode == 0, deleted.stderr
    assert existing() == before - {snapshotted, builder}
    assert {never_snapshotted, foreign, untagged, attached} <= existing()


def test_a_killed_drills_security_group_is_found_by_its_build_id(endpoint: str, client: Any) -> None:
    """A drill's group carries the drill's own tags (drill.drill_tags): sweep --build-id removes it."""
    from builder.drill import drill_tags

    drill_id = new_build_id()
    tags = [{"Key": k, "Value": v} for k, v in {**drill_tags(drill_id, "web"), tag("kind"): "security-group"}.items()]
    group_id = group(client, f"ebsrole-drill-{drill_id}", tags)
    done = swept(endpoint, "--build-id", drill_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in json.loads(done.stdout)["resources"]] == [group_id]
    assert not client.describe_security_groups(Filters=[{"Name": "group-id", "Values": [group_id]}])["SecurityGroups"]

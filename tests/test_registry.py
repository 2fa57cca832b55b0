"""Fingerprints, `changed`, --if-changed, several roles at once, audit --registered/--instance, prune.

Everything that needs EC2 runs against the sandbox's endpoint (moto with the sandbox's
data plane, which keeps image block-device mappings as EC2 does); builds and the live
audit use its real machines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.fingerprint import fingerprint
from builder.render import TEMPLATES_DIR
from builder.roles import load_role
from tests.conftest import MINI_ROLE, PROJECT
from tests.machines import needs_root
from tests.sandbox import REGION, World, clean

BASE = "ami-000000000000000d2"  # the newest Debian 12 amd64 AMI of the catalogue


@pytest.fixture
def roles(tmp_path: Path) -> Path:
    """A roles directory with the project's defaults and three small roles."""
    path = tmp_path / "roles"
    path.mkdir()
    shutil.copy(PROJECT / "roles/defaults.yaml", path)
    for name in ("alpha", "beta", "gamma"):
        role = {
            **MINI_ROLE,
            "externalize": [{"path": f"/srv/{name}", "owner": "root", "group": "root", "mode": "0755"}],
        }
        (path / f"{name}.yaml").write_text(yaml.safe_dump(role))
    return path


def cli(world: World, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return world.cli(*args, timeout=timeout)


def fake_role_image(
    world: World, role: str, value: str, paths: str, build_id: str, root: str | None = None
) -> dict[str, str]:
    """Register an AMI tagged as the tool tags a finished build (volume, two snapshots, pairing).

    Its root snapshot is ``root`` (a bootable one) or a copy of an empty volume (not bootable).
    """
    facts = {"ebsrole:fingerprint": value, "ebsrole:paths": paths}
    return register_fake_image(world.client(), role, build_id, az=f"{REGION}a", root=root, facts=facts)


def register_fake_image(
    ec2: Any,
    role: str,
    build_id: str,
    *,
    az: str,
    root: str | None = None,
    facts: dict[str, str] | None = None,
    **volume: Any,
) -> dict[str, str]:
    """Register, with the boto3 client ``ec2``, an AMI tagged as a finished build, plus ``facts`` (full tag keys).

    Its snapshots come from one new volume (``volume``: e.g. Encrypted, KmsKeyId); its root is
    ``root`` when given. Returns the AMI and snapshot ids.
    """
    volume_id = ec2.create_volume(Size=1, AvailabilityZone=az, **volume)["VolumeId"]
    root = root or ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    seed = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    ec2.delete_volume(VolumeId=volume_id)
    image = ec2.register_image(
        Name=f"ebsrole-{role}-{build_id}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": root}},
            {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": seed, "DeleteOnTermination": False}},
        ],
    )["ImageId"]
    tags = {
        "ebsrole:role": role,
        "ebsrole:kind": "image",
        "ebsrole:status": "complete",
        "ebsrole:build-id": build_id,
        **(facts or {}),
        "ebsrole:seed-snapshot": seed,
        "ebsrole:root-snapshot": root,
    }
    ec2.create_tags(Resources=[image], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return {"image": image, "root": root, "seed": seed}


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_changes_with_what_the_build_makes(roles: Path, tmp_path: Path) -> None:
    role = load_role("alpha", roles)
    before = fingerprint(role, BASE).value

    def edited(change: dict[str, Any]) -> str:
        doc = yaml.safe_load((roles / "alpha.yaml").read_text())
        (roles / "alpha.yaml").write_text(yaml.safe_dump({**doc, **change}))
        try:
            return fingerprint(load_role("alpha", roles), BASE).value
        finally:
            (roles / "alpha.yaml").write_text(yaml.safe_dump(doc))

    assert edited({"packages": ["curl"]}) != before
    assert edited({"externalize": ["/srv/other"]}) != before
    assert fingerprint(role, "ami-000000000000000d1").value != before

    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    verify = templates / "verify.sh.j2"
    verify.write_text(verify.read_text() + "\n# one more line\n")
    assert fingerprint(role, BASE, templates).value != before


def test_fingerprint_ignores_key_order_and_comments(roles: Path) -> None:
    before = fingerprint(load_role("alpha", roles), BASE).value
    doc = yaml.safe_load((roles / "alpha.yaml").read_text())
    reordered = "# a comment\n" + yaml.safe_dump(dict(reversed(list(doc.items()))), sort_keys=False)
    (roles / "alpha.yaml").write_text(reordered + "# trailing comment\n")
    assert fingerprint(load_role("alpha", roles), BASE).value == before


def test_fingerprint_command_offline(roles: Path) -> None:
    done = subprocess.run(
        [sys.executable, "build.py", "fingerprint", "alpha", "beta", "--base-ami", BASE, "--roles-dir", str(roles),
         "--format", "json"],
        cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = {f["role"]: f["fingerprint"] for f in json.loads(done.stdout)["fingerprints"]}
    assert found["alpha"] == fingerprint(load_role("alpha", roles), BASE).value
    assert found["alpha"] != found["beta"]


# ---------------------------------------------------------------- changed, --if-changed


@needs_root
def test_changed_lists_exactly_the_roles_without_an_ami(world: World, roles: Path) -> None:
    done = cli(world, "fingerprint", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert done.returncode == 0, done.stderr
    current = {f["role"]: f["fingerprint"] for f in json.loads(done.stdout)["fingerprints"]}
    fake_role_image(world, "beta", current["beta"], "/srv/beta", "20260101T000000Z-00000001")
    fake_role_image(world, "gamma", "0" * 32, "/srv/gamma", "20260101T000000Z-00000002")  # an old fingerprint

    names = cli(world, "changed", "--roles-dir", str(roles), "--sandbox")
    assert names.returncode == 0, names.stderr
    assert names.stdout.split() == ["alpha", "gamma"]
    matrix = cli(world, "changed", "--roles-dir", str(roles), "--sandbox", "--format", "github-matrix")
    assert json.loads(matrix.stdout) == {"role": ["alpha", "gamma"]}

    # The number of EC2 calls does not grow with the number of roles.
    few = json.loads(cli(world, "changed", "alpha", "--roles-dir", str(roles), "--sandbox", "--format", "json").stdout)
    many = json.loads(cli(world, "changed", "--roles-dir", str(roles), "--sandbox", "--format", "json").stdout)
    assert few["api_calls"] == many["api_calls"] <= 3

    # --if-changed: beta has an AMI of its fingerprint: no instance, its AMI printed.
    before = world.client().describe_instances()["Reservations"]
    skipped = cli(world, "beta", "--if-changed", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert skipped.returncode == 0, skipped.stderr
    record = json.loads(skipped.stdout)["builds"][0]
    assert record["result"] == "unchanged" and record["ami"].startswith("ami-")
    assert world.client().describe_instances()["Reservations"] == before


# ---------------------------------------------------------------- several roles at once


@needs_root
def test_parallel_builds_one_failing(world: World, roles: Path) -> None:
    broken = yaml.safe_load((roles / "gamma.yaml").read_text())
    (roles / "gamma.yaml").write_text(yaml.safe_dump({**broken, "packages": ["ebsrole-no-such-package"]}))
    before = world.ec2_view()
    done = cli(
        world, "alpha", "beta", "gamma", "--jobs", "3", "--roles-dir", str(roles), "--sandbox", "--format", "json"
    )
    assert done.returncode == 4, done.stderr[-3000:]  # gamma's provision.sh failed
    builds = {b["role"]: b for b in json.loads(done.stdout)["builds"]}
    assert builds["alpha"]["result"] == builds["beta"]["result"] == "complete"
    assert builds["gamma"]["result"] == "failed" and builds["gamma"]["ami"] is None
    for line in done.stderr.splitlines():
        assert line.startswith(("[alpha] ", "[beta] ", "[gamma] ", "building 3 roles")), line
    after = world.ec2_view()
    # Exactly two AMIs and their snapshots more; the failed build left no instance or volume.
    assert set(after["images"]) - set(before["images"]) == {builds["alpha"]["ami"], builds["beta"]["ami"]}
    assert len(set(after["snapshots"]) - set(before["snapshots"])) == 4
    assert after["instances"] == before["instances"] and after["volumes"] == before["volumes"]
    assert not clean(world.status())
    text = cli(world, "alpha", "beta", "--if-changed", "--roles-dir", str(roles), "--sandbox")
    assert text.returncode == 0
    assert "unchanged" in text.stdout and "role" in text.stdout.splitlines()[0]


# ---------------------------------------------------------------- audit


@needs_root
def test_audit_registered_shows_drift_and_the_paths_built(world: World, roles: Path) -> None:
    built = cli(world, "alpha", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    ami = json.loads(built.stdout)["builds"][0]["ami"]

    def audit() -> dict[str, Any]:
        done = cli(world, "audit", "--registered", "--roles-dir", str(roles), "--sandbox", "--format", "json")
        assert done.returncode == 0, done.stderr
        return {r["role"]: r for r in json.loads(done.stdout)["roles"] if r["role"] == "alpha"}

    assert audit()["alpha"]["drift"] == "none" and audit()["alpha"]["ami"] == ami
    doc = yaml.safe_load((roles / "alpha.yaml").read_text())
    doc["externalize"].append({"path": "/srv/later", "owner": "root", "group": "root", "mode": "0755"})
    (roles / "alpha.yaml").write_text(yaml.safe_dump(doc))
    record = audit()["alpha"]
    assert record["drift"] == "role changed"
    assert record["paths"] == ["/srv/alpha"]  # what the AMI was built with, not today's file

    (roles / "alpha.yaml").unlink()
    gone = cli(world, "audit", "--registered", "--roles-dir", str(roles), "--sandbox")
    assert any(line.split()[:2] == ["alpha", ami] and "role file gone" in line for line in gone.stdout.splitlines())


@needs_root
def test_audit_instance_checks_a_live_instance(world: World, roles: Path, tmp_path: Path) -> None:
    built = cli(world, "beta", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    ami = json.loads(built.stdout)["builds"][0]["ami"]
    instance = world.launch(ami)
    key = tmp_path / "id"
    key.write_text(instance.login.private_openssh)
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"{instance.address} {' '.join(instance.host_key.public_line.split()[:2])}\n")
    args = ["audit", "--instance", instance.id, "--identity", str(key), "--roles-dir", str(roles), "--sandbox"]

    done = cli(world, *args, "--known-hosts", str(known), "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["role"] == "beta"
    assert {"ok"} == {c["state"] for c in report["checks"]}
    assert any(c["subject"] == "/srv/beta" for c in report["checks"])

    instance.sh("umount -l /data")
    broken = cli(world, *args, "--known-hosts", str(known))
    assert broken.returncode == 1
    assert "FAIL" in broken.stdout

    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    refused = cli(world, *args, "--known-hosts", str(unknown))
    assert refused.returncode == 5 and "no host key" in refused.stderr
    world.client().terminate_instances(InstanceIds=[instance.id])


# ---------------------------------------------------------------- prune


@needs_root
def test_prune_keeps_the_newest_and_those_in_use(world: World) -> None:
    ec2 = world.client()
    # A bootable root snapshot for the AMI an instance will run from.
    source = ec2.run_instances(ImageId=BASE, MinCount=1, MaxCount=1)["Instances"][0]
    ec2.stop_instances(InstanceIds=[source["InstanceId"]])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[source["InstanceId"]], WaiterConfig={"Delay": 1})
    root_volume = source["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    bootable = ec2.create_snapshot(VolumeId=root_volume)["SnapshotId"]
    ec2.terminate_instances(InstanceIds=[source["InstanceId"]])
    made = [
        fake_role_image(
            world, "delta", f"{n:032x}", "/srv/delta", f"20260102T00000{n}Z-0000000{n}", bootable if n == 1 else None
        )
        for n in range(5)
    ]
    # An instance launched from the second-oldest, then stopped: that AMI is in use.
    launched = ec2.run_instances(ImageId=made[1]["image"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[launched])

    dry = cli(world, "prune", "delta", "--keep", "2", "--dry-run", "--sandbox", "--format", "json")
    assert dry.returncode == 0, dry.stderr
    fates = {r["image_id"]: r["fate"] for r in json.loads(dry.stdout)["images"]}
    assert fates == {
        made[4]["image"]: "kept",
        made[3]["image"]: "kept",
        made[2]["image"]: "would deregister",
        made[1]["image"]: "in use",
        made[0]["image"]: "would deregister",
    }
    assert len(ec2.describe_images(ImageIds=[m["image"] for m in made])["Images"]) == 5

    done = cli(world, "prune", "delta", "--keep", "2", "--sandbox", "--format", "json")
    assert done.returncode == 0, done.stderr
    left = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert {m["image"] for m in made} & left == {made[4]["image"], made[3]["image"], made[1]["image"]}
    snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    for gone in (made[0], made[2]):
        assert gone["root"] not in snapshots and gone["seed"] not in snapshots
    for kept in (made[1], made[3], made[4]):
        assert kept["root"] in snapshots and kept["seed"] in snapshots
    ec2.terminate_instances(InstanceIds=[launched])

    refused = cli(world, "prune", "delta", "--keep", "0", "--sandbox")
    assert refused.returncode == 2 and "--keep 0" in refused.stderr


@needs_root
def test_prune_spares_amis_that_templates_parameters_and_other_accounts_use(world: World) -> None:
    ec2 = world.client()
    ssm = world.client(service="ssm")
    made = [
        fake_role_image(world, "epsilon", f"{n:032x}", "/srv/e", f"20260103T00000{n}Z-0000000{n}") for n in range(6)
    ]
    ids = [m["image"] for m in made]
    # Version 1 (the default) names the base AMI; only version 2 names made[0].
    template = ec2.create_launch_template(LaunchTemplateName="web-asg", LaunchTemplateData={"ImageId": BASE})
    template_id = template["LaunchTemplate"]["LaunchTemplateId"]
    ec2.create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData={"ImageId": ids[0]})
    ec2.modify_image_attribute(ImageId=ids[1], LaunchPermission={"Add": [{"UserId": "111122223333"}]})
    ssm.put_parameter(Name="/ebsrole/epsilon/production/ami", Value=ids[2], Type="String", DataType="aws:ec2:image")
    # A team's own parameter (not the tool's), named by a template through resolve:ssm:.
    ssm.put_parameter(Name="/team/golden-ami", Value=ids[3], Type="String", DataType="aws:ec2:image")
    indirect = ec2.create_launch_template(
        LaunchTemplateName="golden", LaunchTemplateData={"ImageId": "resolve:ssm:/team/golden-ami"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    try:
        dry = cli(world, "prune", "epsilon", "--keep", "1", "--dry-run", "--sandbox", "--format", "json")
        assert dry.returncode == 0, dry.stderr
        rows = {r["image_id"]: r for r in json.loads(dry.stdout)["images"]}
        assert {i: r["fate"] for i, r in rows.items()} == {
            ids[5]: "kept",
            ids[4]: "would deregister",
            ids[3]: "in use",
            ids[2]: "in use",
            ids[1]: "shared",
            ids[0]: "in use",
        }
        assert rows[ids[0]]["detail"] == "launch template web-asg version 2"
        assert rows[ids[1]]["detail"] == "shared with account 111122223333"
        assert rows[ids[2]]["detail"] == "SSM parameter /ebsrole/epsilon/production/ami"
        assert rows[ids[3]]["detail"] == "launch template golden version 1 (through /team/golden-ami)"

        done = cli(world, "prune", "epsilon", "--keep", "1", "--sandbox")
        assert done.returncode == 0, done.stderr
        assert any(line.startswith("shared") and ids[1] in line for line in done.stdout.splitlines()), done.stdout
        left = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
        assert set(ids) & left == set(ids) - {ids[4]}

        wider = cli(world, "prune", "epsilon", "--keep", "1", "--include-shared", "--dry-run", "--sandbox")
        assert wider.returncode == 0, wider.stderr
        assert any(line.startswith("would deregister") and ids[1] in line for line in wider.stdout.splitlines())
    finally:
        ec2.delete_launch_template(LaunchTemplateId=template_id)
        ec2.delete_launch_template(LaunchTemplateId=indirect)
        ssm.delete_parameters(Names=["/ebsrole/epsilon/production/ami", "/team/golden-ami"])

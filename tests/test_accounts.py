"""Other accounts: share (launch permission, createVolumePermission, the AWS-managed key refused),
--role-arn, KMS keys for the root volume and copies, AMI deprecation and deregistration protection.

What needs no machine runs against moto as a real HTTP server in this process (``endpoint``):
sharing, refusing, and --role-arn, whose AssumeRole moto answers with fresh keys that it
maps to the role's account (so a call signed with them sees that account's EC2). Deprecation
and deregistration protection are not in moto: the sandbox answers them (docs/explanation/
sandbox.md), so the build that uses them, and prune, run there with a real machine.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import yaml

from builder import accounts
from builder.cli.context import Target, connect
from builder.fingerprint import fingerprint
from builder.roles import load_role
from tests.conftest import MINI_ROLE, PROJECT, run_cli
from tests.machines import needs_root
from tests.sandbox import REGION, World
from tests.test_registry import register_fake_image

OTHER = "111122223333"
THIRD = "444455556666"
ROLE_ARN = f"arn:aws:iam::{OTHER}:role/ebsrole-ci"
ORG = "arn:aws:organizations::999988887777:organization/o-abcdefghij"


def granted(ec2: Any, made: dict[str, str]) -> tuple[list[dict[str, str]], dict[str, set[str]]]:
    """Return the AMI's launch permissions and each snapshot's createVolumePermission user ids."""
    launch = ec2.describe_image_attribute(ImageId=made["image"], Attribute="launchPermission")["LaunchPermissions"]
    volumes = {}
    for kind in ("root", "seed"):
        attribute = ec2.describe_snapshot_attribute(SnapshotId=made[kind], Attribute="createVolumePermission")
        volumes[kind] = {p["UserId"] for p in attribute["CreateVolumePermissions"] if "UserId" in p}
    return launch, volumes


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing touched


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["share", "web", "--accounts", "1111222233"], "--accounts '1111222233': not a 12-digit AWS account id"),
        (["share", "web", "--accounts", f"{OTHER},x"], "--accounts 'x': not a 12-digit AWS account id"),
        (["share", "web", "--org-arn", "o-abc"], "--org-arn 'o-abc': not an organization ARN"),
        (["share", "web", "--ou-arn", ORG], "not an organizational unit ARN"),
        (["prune", "web", "--keep", "1", "--role-arn", "ci"], "--role-arn 'ci': not an IAM role ARN"),
        (["prune", "web", "--keep", "1", "--external-id", "abc"], "--external-id goes with --role-arn"),
        (["copy", "web", "--to", "eu-west-1", "--kms-key-id", "eu-west-1"], "give REGION=KEY"),
        (["copy", "web", "--to", "eu-west-1", "--kms-key-id", "eu-west-1=my key"], "give REGION=KEY"),
        (["web", "--kms-key-id", "my-key"], "--kms-key-id 'my-key': not a KMS key id"),
        (["web", "--deprecate-at", "2001-01-01"], "--deprecate-at '2001-01-01': must be in the future"),
        (["web", "--deprecate-at", "soon"], "--deprecate-at 'soon': not a date"),
        (["web", "--deprecate-after", "0"], "--deprecate-after 0: give 1 to 3650 days"),
        (["share", "web", "--accounts", OTHER, "--sandbox", "--role-arn", ROLE_ARN], "cannot assume --role-arn"),
    ],
)
def test_bad_accounts_keys_and_dates_are_refused_in_one_line(args: list[str], says: str) -> None:
    where = [] if "--sandbox" in args else ["--region", "eu-west-1", "--endpoint-url", "http://127.0.0.1:9"]
    done = run_cli(*args, *where)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1


def test_the_root_key_changes_the_fingerprint_and_what_comes_after_the_image_does_not(
    roles_dir: Path, write_role: Any
) -> None:
    write_role("mini", MINI_ROLE)
    plain = load_role("mini", roles_dir)
    base = "ami-000000000000000d2"
    keyed = replace(plain, root_kms_key_id="alias/ebsrole")
    later = replace(plain, deprecate_after_days=30, deregistration_protection=True, copy_kms_key_ids=(("x", "y"),))
    assert fingerprint(keyed, base).value != fingerprint(plain, base).value
    assert fingerprint(later, base).value == fingerprint(plain, base).value


# ---------------------------------------------------------------- share, against moto's HTTP server


@pytest.fixture
def aws(endpoint: str) -> Any:
    """An EC2 client of moto's server, its state reset first."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    return boto3.client("ec2", region_name="eu-west-1", endpoint_url=endpoint)


def share_cli(endpoint: str, *args: str) -> Any:
    return run_cli("share", *args, "--region", "eu-west-1", "--endpoint-url", endpoint)


def test_share_grants_the_ami_and_every_snapshot_and_revoke_takes_them_back(endpoint: str, aws: Any) -> None:
    made = register_fake_image(aws, "web", "20260101T000000Z-00000001", az="eu-west-1a")
    done = share_cli(endpoint, "web", "--accounts", f"{OTHER},{THIRD}", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["image_id"] == made["image"]
    launch, volumes = granted(aws, made)
    assert sorted(p["UserId"] for p in launch) == [OTHER, THIRD]
    assert volumes == {"root": {OTHER, THIRD}, "seed": {OTHER, THIRD}}

    back = share_cli(endpoint, "web", "--accounts", THIRD, "--revoke")
    assert back.returncode == 0, back.stderr
    launch, volumes = granted(aws, made)
    assert [p["UserId"] for p in launch] == [OTHER] and volumes == {"root": {OTHER}, "seed": {OTHER}}

    org = share_cli(endpoint, "web", "--org-arn", ORG)
    assert org.returncode == 0, org.stderr
    assert "createVolumePermission names accounts only" in org.stdout
    launch, _ = granted(aws, made)
    assert {"OrganizationArn": ORG} in launch

    missing = share_cli(endpoint, "api", "--accounts", OTHER)
    assert missing.returncode == 2 and "no AMI of role api" in missing.stderr


def _encrypted_with(aws: Any, endpoint: str, key: str) -> dict[str, str]:
    """A role AMI whose root snapshot is a copy encrypted with ``key`` (CopySnapshot names the key: moto keeps it)."""
    made = register_fake_image(aws, "web", "20260101T000000Z-00000002", az="eu-west-1a", Encrypted=True)
    copy = aws.copy_snapshot(SourceSnapshotId=made["root"], SourceRegion="eu-west-1", Encrypted=True, KmsKeyId=key)[
        "SnapshotId"
    ]
    aws.create_tags(Resources=[made["image"]], Tags=[{"Key": "ebsrole:root-snapshot", "Value": copy}])
    aws.create_tags(Resources=[made["image"]], Tags=[{"Key": "ebsrole:seed-snapshot", "Value": copy}])
    return {**made, "root": copy, "seed": copy}


def test_share_refuses_the_aws_managed_key_and_grants_nothing(endpoint: str, aws: Any) -> None:
    kms = boto3.client("kms", region_name="eu-west-1", endpoint_url=endpoint)
    aws.create_volume(Size=1, AvailabilityZone="eu-west-1a", Encrypted=True)  # EC2 makes aws/ebs on first use
    managed = kms.describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]["Arn"]
    made = _encrypted_with(aws, endpoint, managed)

    done = share_cli(endpoint, "web", "--accounts", OTHER)
    assert done.returncode == 2, done.stderr
    assert f"{made['image']}: snapshot {made['root']} is encrypted with the AWS-managed key aws/ebs" in done.stderr
    assert "nothing was granted" in done.stderr and "--kms-key-id" in done.stderr
    statement = json.loads(done.stderr.split("add to that key's policy: ", 1)[1].strip())
    assert statement["Principal"] == {"AWS": [f"arn:aws:iam::{OTHER}:root"]} and "kms:Decrypt" in statement["Action"]
    launch, volumes = granted(aws, made)
    assert launch == [] and volumes == {"root": set(), "seed": set()}

    # The same AMI's snapshot copied with a customer-managed key: shared.
    mine = kms.create_key(Description="ebsrole shared AMIs")["KeyMetadata"]["Arn"]
    keyed = _encrypted_with(aws, endpoint, mine)
    ok = share_cli(endpoint, "web", "--accounts", OTHER, "--ami", keyed["image"])
    assert ok.returncode == 0, ok.stderr
    assert granted(aws, keyed)[1]["root"] == {OTHER}


# ---------------------------------------------------------------- --role-arn


def test_role_arn_works_in_the_roles_account_with_its_keys(endpoint: str, aws: Any) -> None:
    sts = boto3.client("sts", region_name="eu-west-1", endpoint_url=endpoint)
    given = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="test")["Credentials"]
    theirs = boto3.client(
        "ec2",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id=given["AccessKeyId"],
        aws_secret_access_key=given["SecretAccessKey"],
        aws_session_token=given["SessionToken"],
    )
    made = register_fake_image(theirs, "web", "20260101T000000Z-00000003", az="eu-west-1a")  # in account OTHER

    mine = share_cli(endpoint, "web", "--accounts", THIRD)  # the standard chain's account has no such AMI
    assert mine.returncode == 2 and "no AMI of role web" in mine.stderr
    done = share_cli(endpoint, "web", "--accounts", THIRD, "--role-arn", ROLE_ARN, "--external-id", "ci-job-7")
    assert done.returncode == 0, done.stderr
    assert [p["UserId"] for p in granted(theirs, made)[0]] == [THIRD]

    # Every client of the command signs with the keys AssumeRole returned (a botocore hook sees each request).
    ec2 = connect(Target("eu-west-1", None, endpoint, False, ROLE_ARN, None, "share"))
    signed: list[tuple[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        found = re.search(r"Credential=([^/]+)/\d+/[^/]+/([^/]+)/", request.headers["Authorization"].decode())
        assert found
        signed.append((found[1], found[2]))

    for events in {id(e): e for e in (ec2.session.events, ec2.client.meta.events)}.values():
        events.register("before-send", record)
    accounts.share(ec2, "web", None, accounts.Grantees((THIRD,)))
    identity = ec2.session.client("sts", region_name="eu-west-1", endpoint_url=endpoint).get_caller_identity()
    key = ec2.client._request_signer._credentials.access_key
    assert key != os.environ["AWS_ACCESS_KEY_ID"] and {k for k, _ in signed} == {key}
    assert {"ec2", "sts"} <= {service for _, service in signed}
    assert identity["Account"] == OTHER and identity["Arn"].endswith(":assumed-role/ebsrole-ci/ebsrole-share")


def test_a_failed_assume_role_is_one_line_and_exit_3() -> None:
    done = run_cli(
        "prune", "web", "--keep", "1", "--region", "eu-west-1", "--endpoint-url", "http://127.0.0.1:9",
        "--role-arn", ROLE_ARN,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: EC2 sts AssumeRole: ") and "Traceback" not in done.stderr


# ---------------------------------------------------------------- in the sandbox: a build, keys, deprecation, protection


@needs_root
def test_a_build_with_keys_is_deprecated_protected_shared_copied_and_pruned_around(
    world: World, tmp_path: Path
) -> None:
    ec2, kms = world.client(), world.client(service="kms")
    key = kms.create_key(Description="ebsrole root and data")["KeyMetadata"]["Arn"]
    copy_key = world.client("eu-west-1", service="kms").create_key(Description="copies")["KeyMetadata"]["Arn"]
    older = register_fake_image(ec2, "keyed", "20260101T000000Z-00000004", az=f"{REGION}a")
    ec2.enable_image_deregistration_protection(ImageId=older["image"])
    roles = tmp_path / "roles"
    roles.mkdir()
    role = {
        **MINI_ROLE,
        "volume": {**MINI_ROLE["volume"], "kms_key_id": key},
        "root": {"kms_key_id": key},
        "deprecate_after_days": 30,
        "deregistration_protection": True,
        "copy_kms_key_ids": {"eu-west-1": copy_key},
    }
    (roles / "keyed.yaml").write_text(yaml.safe_dump(role))
    built = world.cli("keyed", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr[-3000:]
    ami = json.loads(built.stdout)["builds"][0]["ami"]

    image = ec2.describe_images(ImageIds=[ami])["Images"][0]
    when = datetime.fromisoformat(image["DeprecationTime"].replace("Z", "+00:00"))
    assert abs(when - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=30)
    assert image["DeregistrationProtection"].startswith("enabled")
    assert ec2.describe_images(ImageIds=[older["image"]])["Images"][0]["DeregistrationProtection"] == "disabled"
    snapshots = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"] if "Ebs" in m]
    described = ec2.describe_snapshots(SnapshotIds=snapshots)["Snapshots"]
    assert {s["KmsKeyId"] for s in described} == {key}
    with pytest.raises(botocore.exceptions.ClientError, match="deregistration protection"):
        ec2.deregister_image(ImageId=ami)

    shared = world.cli("share", "keyed", "--accounts", OTHER, "--roles-dir", str(roles), "--sandbox")
    assert shared.returncode == 0, shared.stderr
    assert ec2.describe_image_attribute(ImageId=ami, Attribute="launchPermission")["LaunchPermissions"] == [
        {"UserId": OTHER}
    ]
    for snapshot in snapshots:
        permissions = ec2.describe_snapshot_attribute(SnapshotId=snapshot, Attribute="createVolumePermission")
        assert permissions["CreateVolumePermissions"] == [{"UserId": OTHER}]

    copied = world.cli("copy", "keyed", "--to", "eu-west-1", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert copied.returncode == 0, copied.stderr
    copy = json.loads(copied.stdout)
    there = world.client("eu-west-1").describe_snapshots(SnapshotIds=[copy["seed_snapshot"], copy["root_snapshot"]])
    assert {s["KmsKeyId"] for s in there["Snapshots"]} == {copy_key}

    ec2.enable_image_deregistration_protection(ImageId=older["image"])
    pruned = world.cli("prune", "keyed", "--keep", "1", "--sandbox", "--format", "json")
    assert pruned.returncode == 0, pruned.stderr
    rows = {r["image_id"]: r for r in json.loads(pruned.stdout)["images"]}
    assert rows[older["image"]]["fate"] == "protected"
    assert rows[older["image"]]["detail"] == "deregistration protection is on"
    assert ec2.describe_images(ImageIds=[older["image"]])["Images"]


@needs_root
def test_share_in_the_sandbox_refuses_snapshots_of_the_default_key(world: World) -> None:
    ec2 = world.client()
    made = register_fake_image(ec2, "plain", "20260101T000000Z-00000005", az=f"{REGION}a", Encrypted=True)
    done = world.cli("share", "plain", "--accounts", OTHER, "--sandbox")
    assert done.returncode == 2, done.stderr
    assert "AWS-managed key aws/ebs" in done.stderr and made["root"] in done.stderr
    launch, volumes = granted(ec2, made)
    assert launch == [] and volumes == {"root": set(), "seed": set()}


def test_docs_show_the_share_command() -> None:
    howto = (PROJECT / "docs/howto/accounts.md").read_text()
    assert "python build.py share" in howto and "kms:CreateGrant" in howto

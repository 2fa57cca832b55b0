"""A restore takes only this account's backups of the role: the checks on ``--from SNAP``, through moto.

moto keeps one account, so another account's snapshot is made the way EC2 would show it: the
describe answer carries the other owner (a botocore after-call hook, as FIELD-NOTES suggests
for what moto cannot model). Everything else is moto's own answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from builder import tags
from builder.aws.ec2 import EC2, RETRIES
from builder.errors import InvalidInput
from builder.launch import choose_source
from builder.registry import RoleImage

REGION = "eu-west-1"
OTHER_ACCOUNT = "111122223333"


@pytest.fixture
def ec2() -> Iterator[EC2]:
    with mock_aws():
        session = boto3.session.Session(region_name=REGION)
        yield EC2(session.client("ec2", config=RETRIES), session)


def nightly(ec2: EC2, role: str = "web", env: str = "production") -> str:
    volume = ec2.client.create_volume(AvailabilityZone=f"{REGION}a", Size=1)["VolumeId"]
    labels = {tags.ROLE: role, tags.KIND: tags.KIND_NIGHTLY, tags.ENV: env, tags.DATE: "2026-11-30"}
    made = ec2.client.create_snapshot(VolumeId=volume, TagSpecifications=tags.tag_specs("snapshot", labels))
    return str(made["SnapshotId"])


def owned_by(ec2: EC2, snapshot_id: str, account: str) -> None:
    def rewrite(parsed: dict[str, Any], **_: Any) -> None:
        for snapshot in parsed.get("Snapshots", []):
            if snapshot["SnapshotId"] == snapshot_id:
                snapshot["OwnerId"] = account

    ec2.client.meta.events.register("after-call.ec2.DescribeSnapshots", rewrite)


IMAGE = RoleImage.of({"ImageId": "ami-0123456789abcdef0", "Tags": [], "BlockDeviceMappings": []})


def test_this_accounts_backup_of_the_role_and_env_is_taken(ec2: EC2) -> None:
    snapshot = nightly(ec2)
    source = choose_source(ec2, "web", IMAGE, snapshot, "production")
    assert (source.snapshot_id, source.kind, source.env) == (snapshot, tags.KIND_NIGHTLY, "production")


def test_another_accounts_snapshot_is_refused_even_with_allow_other_role(ec2: EC2) -> None:
    snapshot = nightly(ec2)
    owned_by(ec2, snapshot, OTHER_ACCOUNT)
    with pytest.raises(InvalidInput) as refused:
        choose_source(ec2, "web", IMAGE, snapshot, "production", allow_other_role=True)
    assert refused.value.exit_code == 2
    assert f"owned by account {OTHER_ACCOUNT}, not by this account" in refused.value.message


@pytest.mark.parametrize(
    ("labels", "source_env", "expected"),
    [
        ({"role": "database"}, "production", "a snapshot of role database, not of role web"),
        ({"env": "staging"}, "production", "from environment staging, not production (give --source-env staging)"),
        ({"kind": "builder-volume"}, "production", "kind builder-volume is not a backup ebsrole restores"),
    ],
    ids=["other-role", "other-env", "other-kind"],
)
def test_other_roles_envs_and_kinds_are_refused(
    ec2: EC2, labels: dict[str, str], source_env: str, expected: str
) -> None:
    snapshot = nightly(ec2, role=labels.get("role", "web"), env=labels.get("env", "production"))
    if "kind" in labels:
        ec2.client.create_tags(Resources=[snapshot], Tags=[{"Key": tags.KIND, "Value": labels["kind"]}])
    with pytest.raises(InvalidInput) as refused:
        choose_source(ec2, "web", IMAGE, snapshot, source_env)
    assert expected in refused.value.message

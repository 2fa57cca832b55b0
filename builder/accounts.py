"""Other accounts: sharing a role AMI (launch permission, createVolumePermission) and the inputs that name them.

An AMI whose snapshots are encrypted with the AWS-managed key (``aws/ebs``) cannot be used by
another account: that key's policy admits its own account only and cannot be changed. So
:func:`share` looks at the key of every snapshot first and grants nothing when one of them is
the AWS-managed key; the refusal shows the key policy statement a customer-managed key needs.
EC2's createVolumePermission names accounts only: shared with an organization or OU, the AMI
launches there, but volumes cannot be made from its snapshots directly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from builder.aws.ec2 import EC2
from builder.errors import CloudError, InvalidInput, KeyNotShareable
from builder.registry import RoleImage, role_images

log = logging.getLogger(__name__)

ACCOUNT = re.compile(r"[0-9]{12}")
ORG_ARN = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/(o-[a-z0-9]{10,32})")
OU_ARN = re.compile(
    r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/(o-[a-z0-9]{10,32})/(ou-[a-z0-9]{4,32}-[a-z0-9]{8,32})"
)
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}")
EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")
AWS_EBS_ALIAS = "alias/aws/ebs"
# What another account needs of the key to launch from, or copy, the AMI (AWS's documented set).
KEY_USE = ["kms:Decrypt", "kms:DescribeKey", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant"]


def parse_accounts(text: str) -> tuple[str, ...]:
    """Return the account ids of ``--accounts A,B`` (InvalidInput naming the first bad one)."""
    items = [item.strip() for item in text.split(",")]
    for item in items:
        if not ACCOUNT.fullmatch(item):
            raise InvalidInput(f"--accounts {item!r}: not a 12-digit AWS account id")
    return tuple(dict.fromkeys(items))


def check_org_arn(arn: str) -> None:
    """Raise InvalidInput unless ``arn`` is an organization's ARN."""
    if not ORG_ARN.fullmatch(arn):
        raise InvalidInput(
            f"--org-arn {arn!r}: not an organization ARN such as "
            "arn:aws:organizations::111122223333:organization/o-exampleorgid"
        )


def check_ou_arn(arn: str) -> None:
    """Raise InvalidInput unless ``arn`` is an organizational unit's ARN."""
    if not OU_ARN.fullmatch(arn):
        raise InvalidInput(
            f"--ou-arn {arn!r}: not an organizational unit ARN such as "
            "arn:aws:organizations::111122223333:ou/o-exampleorgid/ou-exam-pleouid1"
        )


def check_role_arn(arn: str) -> None:
    """Raise InvalidInput unless ``arn`` is an IAM role's ARN (--role-arn)."""
    if not ROLE_ARN.fullmatch(arn):
        raise InvalidInput(f"--role-arn {arn!r}: not an IAM role ARN such as arn:aws:iam::111122223333:role/ebsrole-ci")


def check_external_id(value: str) -> None:
    """Raise InvalidInput unless ``value`` is an ExternalId STS takes (2 to 1224 of letters, digits, +=,.@:/-_)."""
    if not EXTERNAL_ID.fullmatch(value):
        raise InvalidInput(f"--external-id {value!r}: 2 to 1224 letters, digits or +=,.@:/-_")


@dataclass(frozen=True)
class Grantees:
    """Whom to share with: accounts, an organization or an organizational unit (exactly one kind)."""

    accounts: tuple[str, ...] = ()
    org_arn: str | None = None
    ou_arn: str | None = None

    def launch_permissions(self) -> list[dict[str, str]]:
        """Return the LaunchPermission entries of ModifyImageAttribute."""
        found = [{"UserId": a} for a in self.accounts]
        found += [{"OrganizationArn": self.org_arn}] if self.org_arn else []
        return found + ([{"OrganizationalUnitArn": self.ou_arn}] if self.ou_arn else [])

    def names(self) -> list[str]:
        """Return each grantee as a user reads it."""
        found = [f"account {a}" for a in self.accounts]
        found += [f"organization {self.org_arn}"] if self.org_arn else []
        return found + ([f"organizational unit {self.ou_arn}"] if self.ou_arn else [])

    def key_statement(self) -> dict[str, Any]:
        """Return the key policy statement that lets the grantees use a customer-managed key for the AMI."""
        statement: dict[str, Any] = {"Sid": "EbsroleSharedAmis", "Effect": "Allow", "Action": KEY_USE, "Resource": "*"}
        if self.accounts:
            return {**statement, "Principal": {"AWS": [f"arn:aws:iam::{a}:root" for a in self.accounts]}}
        org = ORG_ARN.fullmatch(self.org_arn or "")
        if org:
            return {**statement, "Principal": "*", "Condition": {"StringEquals": {"aws:PrincipalOrgID": org[1]}}}
        ou = OU_ARN.fullmatch(self.ou_arn or "")
        path = f"{ou[1]}/*/{ou[2]}/*" if ou else "*"
        condition = {"ForAnyValue:StringLike": {"aws:PrincipalOrgPaths": [path]}}
        return {**statement, "Principal": "*", "Condition": condition}


@dataclass(frozen=True)
class Shared:
    """What share did: the AMI, its snapshots, whom they were granted to (or revoked from)."""

    role: str
    region: str
    image_id: str
    snapshots: tuple[str, ...]
    grantees: tuple[str, ...]
    snapshot_grantees: tuple[str, ...]  # accounts only: createVolumePermission names no organization
    revoked: bool


def share(ec2: EC2, role: str, ami: str | None, grantees: Grantees, *, revoke: bool = False) -> Shared:
    """Grant (``revoke``: remove) ``grantees`` the launch permission of ``role``'s AMI and createVolumePermission
    on all its snapshots; return what was done.

    ``ami`` defaults to the role's newest. Raises InvalidInput (no such AMI of the role),
    KeyNotShareable (a snapshot uses the AWS-managed key: nothing granted), CloudError.
    """
    image = _role_image(ec2, role, ami)
    snapshots = tuple(dict.fromkeys(s for s in (*image.snapshots, image.seed_snapshot, image.root_snapshot) if s))
    if not revoke:
        managed = aws_managed_snapshots(ec2, snapshots)
        if managed:
            raise KeyNotShareable(image.image_id, managed, json.dumps(grantees.key_statement()))
    change = "Remove" if revoke else "Add"
    ec2.call("modify_image_attribute", ImageId=image.image_id, LaunchPermission={change: grantees.launch_permissions()})
    for snapshot_id in snapshots if grantees.accounts else ():
        ec2.call(
            "modify_snapshot_attribute",
            SnapshotId=snapshot_id,
            Attribute="createVolumePermission",
            OperationType=change.lower(),
            UserIds=list(grantees.accounts),
        )
    verb = "revoked from" if revoke else "granted to"
    log.info("%s: %s and %d snapshot(s) %s %s", role, image.image_id, len(snapshots), verb, ", ".join(grantees.names()))
    return Shared(role, ec2.region, image.image_id, snapshots, tuple(grantees.names()), grantees.accounts, revoke)


def _role_image(ec2: EC2, role: str, ami: str | None) -> RoleImage:
    """Return ``ami`` (checked to be ``role``'s) or the role's newest AMI (InvalidInput when there is none)."""
    if not ami:
        images = role_images(ec2, roles=[role])
        if not images:
            raise InvalidInput(f"no AMI of role {role} in {ec2.region}", hint=f"build it: python build.py {role}")
        return images[0]
    raw = ec2.call("describe_images", ImageIds=[ami])["Images"]
    image = RoleImage.of(raw[0]) if raw else None
    if image is None or image.role != role:
        raise InvalidInput(f"--ami {ami}: not an AMI of role {role} in {ec2.region}")
    return image


def aws_managed_snapshots(ec2: EC2, snapshot_ids: Sequence[str]) -> list[str]:
    """Return those of ``snapshot_ids`` encrypted with the AWS-managed key (KMS DescribeKey: KeyManager AWS,
    or the account's aws/ebs key). Unencrypted snapshots and customer-managed keys are fine. CloudError.
    """
    described = ec2.call("describe_snapshots", SnapshotIds=list(snapshot_ids))["Snapshots"]
    encrypted = [s for s in described if s.get("Encrypted")]
    if not encrypted:
        return []
    aws_ebs = _key_arn(ec2, AWS_EBS_ALIAS)
    managed: list[str] = []
    for snapshot in encrypted:
        # EC2 names every encrypted snapshot's key; without one it is the account's default key.
        key = snapshot.get("KmsKeyId") or ec2.call("get_ebs_default_kms_key_id")["KmsKeyId"]
        meta = ec2.kms_call("describe_key", KeyId=str(key))["KeyMetadata"]
        if meta.get("KeyManager") == "AWS" or meta.get("Arn") == aws_ebs:
            managed.append(str(snapshot["SnapshotId"]))
    return managed


def _key_arn(ec2: EC2, alias: str) -> str | None:
    """Return the ARN of the key ``alias`` names, or None when the account has no such key yet."""
    try:
        return str(ec2.kms_call("describe_key", KeyId=alias)["KeyMetadata"]["Arn"])
    except CloudError as exc:
        if exc.code == "NotFoundException":
            return None
        raise

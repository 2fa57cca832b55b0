"""The IAM permissions each command needs, and a least-privilege policy document for a set of them.

:data:`ACTIONS` says, per command that calls AWS, every action it may call (IAM's names:
``ec2:RunInstances``); ``tests/test_iam.py`` runs the commands against the sandbox and
fails when one calls an action its row lacks. :func:`policy` turns the rows of some
commands into a policy: statements grouped by what they may touch. Deleting, stopping
and detaching are allowed only on resources tagged ``created-by`` the tool; tags only at
creation (``ec2:CreateAction``) or, later, only the tool's own tag keys; KMS keys only
when a role names a customer-managed key. Describe and Get calls support no resource
scope in EC2, so they stay on ``*``.

Pure: no AWS, no printing. The tag key and value come from :mod:`builder.tags`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from builder import tags
from builder.errors import InvalidInput

if TYPE_CHECKING:
    from builder.roles import Role

_READ_IMAGES: Final = ("ec2:DescribeImages",)
# Restoring a role's instance from a snapshot (launch; a drill launches the same way).
_RESTORE: Final = (
    *_READ_IMAGES,
    "sts:GetCallerIdentity",  # whose snapshots are "ours"
    "ec2:DescribeSnapshots",
    "ec2:DescribeInstances",
    "ec2:RunInstances",
    "ec2:CreateTags",  # the data volume: its DLM target
    "ec2:GetConsoleOutput",  # --wait / a drill: the host key from the console
    "ec2:DescribeInstanceTypeOfferings",  # which AZs offer the types: given an AZ or subnet, after a refusal; drill
    "ec2:DescribeSubnets",  # --subnet-id's AZ; --no-public-ip: the AZ's default subnet
)
# Publishing the SSM parameters under /ebsrole/ (builder.publish): read, write only if changed, tag.
_PUBLISH: Final = ("ssm:GetParameters", "ssm:PutParameter", "ssm:AddTagsToResource")
_COPY: Final = (*_READ_IMAGES, "ec2:CopyImage", "ec2:CreateTags", *_PUBLISH)
# A role's launch template: found by name, its default version read, a version added and made default.
_TEMPLATE_VERSIONS: Final = (
    "ec2:DescribeLaunchTemplates",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:CreateLaunchTemplateVersion",
    "ec2:ModifyLaunchTemplate",
)

ACTIONS: Final[Mapping[str, frozenset[str]]] = {
    "build": frozenset(
        {
            *_COPY,  # --copy-to
            "ec2:DescribeInstances",
            "ec2:DescribeSnapshots",
            "ec2:DescribeSubnets",  # --subnet-id: its VPC and AZ; --no-public-ip: the default subnet
            "ec2:DescribeVpcs",  # connecting privately: the VPC's CIDRs are admitted
            "ec2:DescribeInstanceTypeOfferings",  # which AZs offer the types: with --subnet-id, or EC2's AZ refused
            "ec2:CreateSecurityGroup",
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:DeleteSecurityGroup",
            "ec2:RunInstances",
            "ec2:StopInstances",
            "ec2:TerminateInstances",
            "ec2:CreateSnapshot",
            "ec2:DeleteSnapshot",  # a failed build's half-made snapshot
            "ec2:RegisterImage",
            "ec2:DeregisterImage",  # a failed build's half-made AMI
            "ec2:CreateTags",
            "ec2:DescribeImages",  # --protect: the role's AMIs that lose their protection
            "ec2:EnableImageDeprecation",  # --deprecate-at/--deprecate-after, deprecate_after_days
            "ec2:EnableImageDeregistrationProtection",  # --protect, deregistration_protection
            "ec2:DisableImageDeregistrationProtection",  # the previous newest AMI's
        }
    ),
    "audit": frozenset({*_READ_IMAGES, "ec2:DescribeInstances"}),  # --registered; --instance
    "fingerprint": frozenset(_READ_IMAGES),
    "changed": frozenset(_READ_IMAGES),
    "prune": frozenset(
        {
            *_READ_IMAGES,
            "ec2:DescribeInstances",
            "ec2:DescribeImageAttribute",
            "ec2:DescribeLaunchTemplates",
            "ec2:DescribeLaunchTemplateVersions",
            "ec2:DeregisterImage",
            "ec2:DeleteSnapshot",
            "ssm:GetParametersByPath",
            "ssm:GetParameters",
        }
    ),
    "snapshot": frozenset(
        {
            *_READ_IMAGES,
            "ec2:DescribeInstances",
            "ec2:DescribeSnapshots",
            "ec2:CreateSnapshot",
            "ec2:DeleteSnapshot",
            *_PUBLISH,  # /ebsrole/ROLE[/ENV]/latest-snapshot
            *_TEMPLATE_VERSIONS,  # --update-template
        }
    ),
    "template": frozenset(
        {
            *_READ_IMAGES,
            "sts:GetCallerIdentity",  # whose snapshots are "ours"
            "ec2:DescribeSnapshots",
            "ec2:CreateLaunchTemplate",
            *_TEMPLATE_VERSIONS,
            "ec2:DescribeAvailabilityZones",  # --asg without --subnets: every AZ
            "ec2:RunInstances",  # a group made on a launch template needs its caller may launch it
            "autoscaling:DescribeAutoScalingGroups",
            "autoscaling:CreateAutoScalingGroup",
            "autoscaling:CreateOrUpdateTags",  # a group's tags at creation
            "autoscaling:UpdateAutoScalingGroup",
            "autoscaling:StartInstanceRefresh",  # --refresh
        }
    ),
    "schedule": frozenset(
        {
            "sts:GetCallerIdentity",  # the account's default DLM role, unless --execution-role-arn
            "dlm:GetLifecyclePolicies",
            "dlm:CreateLifecyclePolicy",
            "dlm:UpdateLifecyclePolicy",
            "iam:PassRole",  # DLM's execution role
        }
    ),
    "launch": frozenset(_RESTORE),
    "drill": frozenset(
        {
            *_RESTORE,
            "ec2:DescribeAvailabilityZones",  # an AZ other than the snapshot's
            "ec2:DescribeVpcs",  # connecting privately: the VPC's CIDRs are admitted
            "ec2:CreateSecurityGroup",
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:TerminateInstances",
            "ec2:DeleteSecurityGroup",
        }
    ),
    "copy": frozenset(_COPY),
    "share": frozenset(
        {
            *_READ_IMAGES,
            "ec2:DescribeSnapshots",
            "ec2:GetEbsDefaultKmsKeyId",  # an encrypted snapshot that names no key uses the default
            "kms:DescribeKey",  # is a snapshot's key the AWS-managed one (which cannot be shared)?
            "ec2:ModifyImageAttribute",  # launch permission
            "ec2:ModifySnapshotAttribute",  # createVolumePermission
        }
    ),
    "sweep": frozenset(
        {
            *_READ_IMAGES,
            "ec2:DescribeInstances",
            "ec2:DescribeVolumes",
            "ec2:TerminateInstances",
            "ec2:DetachVolume",
            "ec2:DeleteVolume",
            "ec2:DeleteSecurityGroup",
            "ec2:DescribeSnapshots",
            "ec2:DescribeKeyPairs",
            "ec2:DescribeSecurityGroups",
            "ec2:DeleteKeyPair",  # older builds imported their login key as a key pair
            "ec2:DeleteSnapshot",
            "ec2:DeregisterImage",
        }
    ),
}
# Commands of the table that call no AWS API at all.
OFFLINE: Final = frozenset({"validate", "render", "sandbox", "iam-policy"})
# Commands whose launches may pass an instance profile's role to EC2 (--instance-role-arn).
LAUNCHERS: Final = frozenset({"build", "launch", "drill"})
# Commands that make or read volumes and images encrypted with a role's key.
ENCRYPTING: Final = frozenset({"build", "launch", "drill", "copy"})

# Changing or removing a resource: only one the tool made (its created-by tag).
OWNED: Final = frozenset(
    {
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:DetachVolume",
        "ec2:DeleteVolume",
        "ec2:DeleteSnapshot",
        "ec2:DeregisterImage",
        "ec2:DeleteKeyPair",
        "ec2:DeleteSecurityGroup",
        "ec2:ModifyImageAttribute",  # share: only the tool's AMIs and snapshots
        "ec2:ModifySnapshotAttribute",
        "ec2:EnableImageDeprecation",
        "ec2:EnableImageDeregistrationProtection",
        "ec2:DisableImageDeregistrationProtection",
        "ec2:CreateLaunchTemplateVersion",
        "ec2:ModifyLaunchTemplate",
    }
)
# The calls that tag what they create (TagSpecifications): CreateTags is checked with this name.
TAG_ON_CREATE: Final = (
    "RunInstances",
    "CreateSecurityGroup",
    "CreateSnapshot",
    "RegisterImage",
    "CreateLaunchTemplate",
)
KMS_ACTIONS: Final = (
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncrypt*",
)
DLM_DEFAULT_ROLE: Final = "arn:aws:iam::*:role/AWSDataLifecycleManagerDefaultRole"
KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+")
ALIAS_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(alias/[A-Za-z0-9/_-]+)")


def known() -> tuple[str, ...]:
    """Return the commands that call AWS, in the table's order."""
    return tuple(ACTIONS)


def check_commands(names: Sequence[str]) -> list[str]:
    """Return ``names`` without repeats; raise InvalidInput naming an unknown or offline one and the known ones."""
    listed = ", ".join(known())
    for name in names:
        if name in OFFLINE:
            raise InvalidInput(f"--commands: {name!r} calls no AWS API: it needs no permission", hint=f"give {listed}")
        if name not in ACTIONS:
            raise InvalidInput(f"--commands: unknown command {name!r}", hint=f"known: {listed}")
    return list(dict.fromkeys(names))


def needed_by(commands: Iterable[str]) -> dict[str, list[str]]:
    """Return each action the ``commands`` need, sorted, with the commands that need it."""
    found: dict[str, list[str]] = {}
    for command in commands:
        for action in ACTIONS[command]:
            found.setdefault(action, []).append(command)
    return dict(sorted(found.items()))


def kms_keys(roles: Iterable[Role], extra: Iterable[str] = ()) -> list[str]:
    """Return the distinct customer-managed keys the roles name (``volume.kms_key_id``, ``root.kms_key_id``,
    ``copy_kms_key_ids``), and ``extra``.

    A role without keys uses the account's default EBS key (AWS-managed): no statement.
    """
    named = {key for r in roles for key in (r.volume.kms_key_id, r.root_kms_key_id, *dict(r.copy_kms_key_ids).values())}
    return sorted({k for k in (*named, *extra) if k})


def policy(
    commands: Sequence[str],
    roles: Iterable[Role] = (),
    *,
    kms_key_arns: Iterable[str] = (),
    execution_role_arn: str | None = None,
    instance_role_arn: str | None = None,
) -> dict[str, Any]:
    """Return the least-privilege policy document for ``commands`` (names of :data:`ACTIONS`).

    ``roles``: their customer-managed KMS keys (``volume.kms_key_id``: key id, key ARN,
    alias/NAME or alias ARN), with ``kms_key_arns``, get KMS statements when a command
    that encrypts is among ``commands``; ``execution_role_arn``: DLM's role for schedule
    (default: the account's default DLM role); ``instance_role_arn``: the role of the
    builder's instance profile. Raises InvalidInput for an unknown command.
    """
    names = check_commands(commands)
    actions = set(needed_by(names))
    keys = kms_keys(roles, kms_key_arns)
    statements = [
        *_ec2_statements(actions),
        *_other_statements(actions, names),
        *_pass_roles(names, actions, execution_role_arn, instance_role_arn),
        *(_kms_statements(keys) if ENCRYPTING & set(names) else []),
    ]
    return {"Version": "2012-10-17", "Statement": [s for s in statements if s["Action"]]}


def actions_of(document: Mapping[str, Any]) -> set[str]:
    """Return every action a policy document of :func:`policy` allows."""
    return {a for s in document["Statement"] for a in s["Action"]}


def _statement(
    sid: str, actions: Iterable[str], resource: str | list[str] = "*", condition: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    statement: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resource}
    if condition:
        statement["Condition"] = dict(condition)
    return statement


def _ec2_statements(actions: set[str]) -> list[dict[str, Any]]:
    ec2 = {a for a in actions if a.startswith("ec2:")}
    reads = {a for a in ec2 if a.split(":")[1].startswith(("Describe", "Get"))}
    owned = ec2 & OWNED
    creates = ec2 - reads - owned - {"ec2:CreateTags"}
    made = sorted(a for a in TAG_ON_CREATE if f"ec2:{a}" in creates)
    owner = {f"aws:ResourceTag/{tags.CREATED_BY}": f"{tags.TOOL} *"}  # created-by is "<tool> <version>"
    statements = [
        _statement("ReadEverywhere", reads),  # EC2's Describe*/Get* support no resource-level scope
        _statement("CreateAndLaunch", creates),
        _statement("ChangeOnlyWhatTheToolMade", owned, "*", {"StringLike": owner}),
    ]
    if made:  # TagSpecifications need CreateTags too, checked with the creating call's name
        statements.append(
            _statement("TagAtCreation", ["ec2:CreateTags"], "*", {"StringEquals": {"ec2:CreateAction": made}})
        )
    if "ec2:CreateTags" in ec2:
        only_ours = {"aws:TagKeys": [f"{tags.PREFIX}*", tags.NAME]}
        statements.append(
            _statement(
                "RetagWhatTheToolMade",
                ["ec2:CreateTags"],
                "*",
                {"StringLike": owner, "ForAllValues:StringLike": only_ours},
            )
        )
        if "ec2:CopyImage" in ec2:
            # CopyImage leaves the copy and its snapshots untagged: the tool tags them next.
            copies = ["arn:aws:ec2:*::image/*", "arn:aws:ec2:*::snapshot/*"]
            statements.append(
                _statement("TagTheCopies", ["ec2:CreateTags"], copies, {"ForAllValues:StringLike": only_ours})
            )
    return statements


def _other_statements(actions: set[str], names: list[str]) -> list[dict[str, Any]]:
    parameters = "arn:aws:ssm:*:*:parameter"
    ours = [f"{parameters}/{tags.TOOL}", f"{parameters}/{tags.TOOL}/*"]
    # Launch templates may name any parameter (resolve:ssm:NAME): prune reads those too.
    anywhere = {"ssm:GetParameters"} & actions if "prune" in names else set()
    reads = {"ssm:GetParametersByPath", "ssm:GetParameters"} & actions - anywhere
    return [
        _statement("ReadTheToolsParameters", reads, ours),
        _statement("ReadParametersNamedByLaunchTemplates", anywhere, f"{parameters}/*"),
        _statement("PublishTheToolsParameters", {"ssm:PutParameter", "ssm:AddTagsToResource"} & actions, ours),
        _statement("WhoAmI", {"sts:GetCallerIdentity"} & actions),
        # share: any snapshot's key may be asked whether it is AWS-managed (it reads, never uses, the key).
        _statement("DescribeSnapshotKeys", {"kms:DescribeKey"} & actions),
        _statement("LifecyclePolicies", {a for a in actions if a.startswith("dlm:")}),
        _statement("AutoScalingGroups", {a for a in actions if a.startswith("autoscaling:")}),
    ]


def _pass_roles(
    names: list[str], actions: set[str], execution_role_arn: str | None, instance_role_arn: str | None
) -> list[dict[str, Any]]:
    statements = []
    if "iam:PassRole" in actions:
        dlm = execution_role_arn or DLM_DEFAULT_ROLE
        statements.append(
            _statement(
                "PassTheRoleToDLM",
                ["iam:PassRole"],
                dlm,
                {"StringEquals": {"iam:PassedToService": "dlm.amazonaws.com"}},
            )
        )
    if instance_role_arn and LAUNCHERS & set(names):
        statements.append(
            _statement(
                "PassTheInstanceRoleToEC2",
                ["iam:PassRole"],
                instance_role_arn,
                {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            )
        )
    return statements


def _kms_statements(keys: list[str]) -> list[dict[str, Any]]:
    """Return the statements for EBS to use ``keys``: by ARN, or through the alias they carry."""
    arns = sorted({_key_arn(k) for k in keys if not _alias(k)})
    aliases = sorted({a for k in keys if (a := _alias(k))})
    statements = []
    for sid, resources, condition in (
        ("UseTheRolesKeys", arns, {}),
        (
            "UseTheRolesKeysByAlias",
            ["arn:aws:kms:*:*:key/*"] if aliases else [],
            {"ForAnyValue:StringEquals": {"kms:ResourceAliases": aliases}},
        ),
    ):
        if not resources:
            continue
        others = [a for a in KMS_ACTIONS if a != "kms:CreateGrant"]
        statements.append(_statement(sid, others, resources, condition))
        grant = {**condition, "Bool": {"kms:GrantIsForAWSResource": "true"}}
        statements.append(_statement(f"{sid}Grants", ["kms:CreateGrant"], resources, grant))
    return statements


def _alias(key: str) -> str | None:
    """Return the ``alias/NAME`` that ``key`` names, or None for a key id or key ARN."""
    if key.startswith("alias/"):
        return key
    match = ALIAS_ARN.fullmatch(key)
    return match.group(1) if match else None


def _key_arn(key: str) -> str:
    """Return ``key`` as an ARN: a bare id (globally unique) matches in any region and account."""
    return key if KEY_ARN.fullmatch(key) else f"arn:aws:kms:*:*:key/{key}"

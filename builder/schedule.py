"""The nightly snapshot policy of a role as an Amazon Data Lifecycle Manager policy.

For users who want AWS to run the schedule instead of `build.py snapshot` from cron: the
data volumes of one role and environment (`launch` tags each one
``ebsrole:backup-target=ROLE@ENV``, or ``ROLE`` without an environment), a daily snapshot
at a fixed UTC time kept ``keep_daily`` times, a weekly one (Sundays) kept ``keep_weekly``
times, and optionally a copy of each to another region kept as many days and weeks.

Each snapshot carries the tool's tags (role, kind ``nightly``, env), so `launch --from
latest` and `drill` find it. DLM's variable tags (``$(timestamp)``) exist only for policies
that target instances: a DLM snapshot has no date tag, and restores rank snapshots by their
StartTime instead. One policy per role and environment: `--apply` updates it in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from builder import tags
from builder.aws.ec2 import EC2
from builder.errors import InvalidInput

DEFAULT_ROLE_NAME = "AWSDataLifecycleManagerDefaultRole"
TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
# An IAM role ARN, with a path or without: role/NAME, role/service-role/NAME, ...
ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}$")
ENV = re.compile(r"^[A-Za-z0-9_-]{0,64}$")  # DLM descriptions allow [0-9A-Za-z _-] only


def dlm_policy(
    role: str,
    *,
    execution_role_arn: str,
    env: str = "",
    time: str = "03:00",
    keep_daily: int = 7,
    keep_weekly: int = 4,
    copy_to: str | None = None,
) -> dict[str, Any]:
    """Return the keyword arguments of ``dlm.create_lifecycle_policy`` for ``role``'s data volumes in ``env``.

    Raises InvalidInput for a bad time, count, environment name or execution role ARN.
    """
    if not TIME.match(time):
        raise InvalidInput(f"--time {time!r}: give HH:MM in UTC, e.g. 03:00")
    if keep_daily < 1 or keep_weekly < 0:
        raise InvalidInput("--keep-daily must be at least 1 and --keep-weekly at least 0")
    if not ROLE_ARN.match(execution_role_arn):
        raise InvalidInput(
            f"--execution-role-arn {execution_role_arn!r}: not an IAM role ARN",
            hint="e.g. arn:aws:iam::123456789012:role/service-role/AWSDataLifecycleManagerDefaultRole",
        )
    if not ENV.match(env):
        raise InvalidInput(f"--env {env!r}: letters, digits, '-' and '_' only")
    hour, minute = (int(x) for x in time.split(":"))
    added = tags.tag_list(tags.dlm_snapshot(role, env))

    def schedule(name: str, create: dict[str, Any], count: int, unit: str) -> dict[str, Any]:
        rule: dict[str, Any] = {
            "Name": f"ebsrole {role} {name}",
            # Not the volume's tags: its kind (data-volume) and restored-from would mislabel a backup.
            "CopyTags": False,
            "TagsToAdd": added,
            "CreateRule": create,
            "RetainRule": {"Count": count},
        }
        if copy_to:
            rule["CrossRegionCopyRules"] = [
                {
                    "Target": copy_to,
                    "Encrypted": True,
                    "CopyTags": True,
                    "RetainRule": {"Interval": count, "IntervalUnit": unit},
                }
            ]
        return rule

    schedules = [schedule("daily", {"Interval": 24, "IntervalUnit": "HOURS", "Times": [time]}, keep_daily, "DAYS")]
    if keep_weekly:
        cron = {"CronExpression": f"cron({minute} {hour} ? * SUN *)"}
        schedules.append(schedule("weekly", cron, keep_weekly, "WEEKS"))
    return {
        "ExecutionRoleArn": execution_role_arn,
        "Description": f"ebsrole {role} {env or 'no-env'} nightly snapshots of the data volume"[:500],
        "State": "ENABLED",
        "PolicyDetails": {
            "PolicyType": "EBS_SNAPSHOT_MANAGEMENT",
            "ResourceTypes": ["VOLUME"],
            "TargetTags": tags.tag_list({tags.BACKUP_TARGET: tags.backup_target(role, env)}),
            "Schedules": schedules,
        },
        "Tags": tags.dlm_policy(role, env),
    }


def apply_policy(ec2: EC2, role: str, env: str, policy: dict[str, Any]) -> tuple[str, str]:
    """Create the policy of ``role`` in ``env``, or update the one that exists; return (id, created|updated).

    The existing policy is the one tagged with the role and environment. Raises
    InvalidInput when there are several: which one to keep is the user's call.
    """
    summaries = ec2.dlm_call("get_lifecycle_policies", ResourceTypes=["VOLUME"])["Policies"]
    mine = [
        p["PolicyId"] for p in summaries if (seen := tags.view(p.get("Tags") or {})).role == role and seen.env == env
    ]
    if len(mine) > 1:
        raise InvalidInput(
            f"{role}: {len(mine)} DLM policies for environment {env or '(none)'}: {', '.join(sorted(mine))}",
            hint="delete all but one (aws dlm delete-lifecycle-policy --policy-id ID), then apply again",
        )
    if mine:
        update = {k: v for k, v in policy.items() if k != "Tags"}
        ec2.dlm_call("update_lifecycle_policy", PolicyId=mine[0], **update)
        return mine[0], "updated"
    return str(ec2.dlm_call("create_lifecycle_policy", **policy)["PolicyId"]), "created"


@dataclass(frozen=True)
class Scheduled:
    """A role's DLM policy, and with --apply its id and whether it was created or updated."""

    policy: dict[str, Any]
    policy_id: str | None = None
    done: str | None = None  # created | updated


def schedule(
    role: str,
    connect: Callable[[], EC2],
    *,
    apply: bool,
    execution_role_arn: str | None,
    env: str,
    time: str,
    keep_daily: int,
    keep_weekly: int,
    copy_to: str | None,
) -> Scheduled:
    """Return ``role``'s DLM policy; with ``apply``, create it (or update the existing one) too.

    ``connect()`` is called only when EC2 is needed: for the account's default execution
    role, or to apply. Raises like :func:`dlm_policy` and :func:`apply_policy`.
    """
    ec2 = None
    arn = execution_role_arn
    if not arn:
        ec2 = connect()
        arn = default_role_arn(ec2.account_id())
    policy = dlm_policy(
        role,
        execution_role_arn=arn,
        env=env,
        time=time,
        keep_daily=keep_daily,
        keep_weekly=keep_weekly,
        copy_to=copy_to,
    )
    if not apply:
        return Scheduled(policy)
    policy_id, done = apply_policy(ec2 or connect(), role, env, policy)
    return Scheduled(policy, policy_id, done)


def default_role_arn(account: str) -> str:
    """Return the ARN of the IAM role DLM creates by default in ``account``."""
    return f"arn:aws:iam::{account}:role/{DEFAULT_ROLE_NAME}"

"""The nightly snapshot policy of a role as an Amazon Data Lifecycle Manager policy.

For users who want AWS to run the schedule instead of `build.py snapshot` from cron: the
same targets (the data volumes `launch` tags ``ebsrole:data-of=ROLE``), a daily snapshot
at a fixed UTC time kept ``keep_daily`` times, a weekly one (Sundays) kept
``keep_weekly`` times, the tool's tags on every snapshot (so `launch --from latest` and
`drill` find them), and optionally a copy of each to another region.
"""

from __future__ import annotations

import re
from typing import Any

from builder import __version__
from builder.ec2 import tag
from builder.errors import InvalidInput

DEFAULT_ROLE_NAME = "AWSDataLifecycleManagerDefaultRole"
TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def dlm_policy(
    role: str,
    *,
    execution_role_arn: str,
    time: str = "03:00",
    keep_daily: int = 7,
    keep_weekly: int = 4,
    copy_to: str | None = None,
) -> dict[str, Any]:
    """Return the keyword arguments of ``dlm.create_lifecycle_policy`` for ``role``'s data volumes."""
    if not TIME.match(time):
        raise InvalidInput(f"--time {time!r}: give HH:MM in UTC, e.g. 03:00")
    if keep_daily < 1 or keep_weekly < 0:
        raise InvalidInput("--keep-daily must be at least 1 and --keep-weekly at least 0")
    hour, minute = (int(x) for x in time.split(":"))
    added = [
        {"Key": tag("role"), "Value": role},
        {"Key": tag("kind"), "Value": "nightly"},
        {"Key": tag("scheduled-by"), "Value": "dlm"},
    ]
    variable = [{"Key": tag("source-instance"), "Value": "$(instance-id)"}]

    def schedule(name: str, create: dict[str, Any], count: int) -> dict[str, Any]:
        rule: dict[str, Any] = {
            "Name": f"ebsrole {role} {name}",
            "CopyTags": True,
            "TagsToAdd": added,
            "VariableTags": variable,
            "CreateRule": create,
            "RetainRule": {"Count": count},
        }
        if copy_to:
            rule["CrossRegionCopyRules"] = [
                {
                    "Target": copy_to,
                    "Encrypted": True,
                    "CopyTags": True,
                    "RetainRule": {
                        "Interval": 7 if name == "daily" else 4,
                        "IntervalUnit": "DAYS" if name == "daily" else "WEEKS",
                    },
                }
            ]
        return rule

    schedules = [schedule("daily", {"Interval": 24, "IntervalUnit": "HOURS", "Times": [time]}, keep_daily)]
    if keep_weekly:
        schedules.append(schedule("weekly", {"CronExpression": f"cron({minute} {hour} ? * SUN *)"}, keep_weekly))
    return {
        "ExecutionRoleArn": execution_role_arn,
        "Description": f"ebsrole {role}: nightly snapshots of the data volume"[:500],
        "State": "ENABLED",
        "PolicyDetails": {
            "PolicyType": "EBS_SNAPSHOT_MANAGEMENT",
            "ResourceTypes": ["VOLUME"],
            "TargetTags": [{"Key": tag("data-of"), "Value": role}],
            "Schedules": schedules,
        },
        "Tags": {tag("role"): role, tag("created-by"): f"ebsrole {__version__}"},
    }


def default_role_arn(account: str) -> str:
    """Return the ARN of the IAM role DLM creates by default in ``account``."""
    return f"arn:aws:iam::{account}:role/{DEFAULT_ROLE_NAME}"

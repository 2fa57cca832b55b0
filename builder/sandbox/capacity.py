"""The sandbox's capacity: which instance types it refuses in which AZs, to test the fallback.

``python build.py sandbox capacity --refuse t3.small@us-east-1a`` makes RunInstances of
that type in that AZ fail as EC2 fails it when it has no capacity: InsufficientInstanceCapacity,
HTTP 500, with EC2's message. ``--refuse-late`` lets the launch succeed and the instance end
``terminated`` with the StateReason ``Server.InsufficientInstanceCapacity`` (EC2's other way
of saying it). Either part may be ``*``. The list lives in the sandbox's state directory
(``capacity.json``) and is read at every RunInstances, so it applies at once, running or not.
Types an AZ does not offer (DescribeInstanceTypeOfferings) are refused as EC2 does: Unsupported.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import InvalidInput
from builder.files import write_atomic
from builder.sandbox.auth import make_state_dir

CAPACITY_FILE = "capacity.json"
PLACEMENT = re.compile(r"^(\*|[a-z][a-z0-9-]*\.[a-z0-9-]+)@(\*|[a-z]{2}(-[a-z]+)+-[0-9][a-z])$")


@dataclass(frozen=True)
class Refusals:
    """The (type@AZ) patterns refused at RunInstances (``refuse``) and after it (``late``)."""

    refuse: tuple[str, ...] = ()
    late: tuple[str, ...] = ()

    def refuses(self, instance_type: str, az: str) -> bool:
        return _matches(self.refuse, instance_type, az)

    def fails_late(self, instance_type: str, az: str) -> bool:
        return _matches(self.late, instance_type, az)

    def to_dict(self) -> dict[str, list[str]]:
        return {"refuse": list(self.refuse), "refuse_late": list(self.late)}


def _matches(patterns: tuple[str, ...], instance_type: str, az: str) -> bool:
    return any(fnmatch.fnmatchcase(f"{instance_type}@{az}", pattern) for pattern in patterns)


def placement(given: str) -> str:
    """Return ``given`` (TYPE@AZ, either part may be *) checked; raise InvalidInput."""
    if not PLACEMENT.match(given):
        raise InvalidInput(f"{given!r}: give TYPE@AZ such as t3.small@us-east-1a (either part may be *)")
    return given


def load(state: Path) -> Refusals:
    """Return the refusals kept in ``state`` (none when there is no file or it is unreadable)."""
    try:
        data = json.loads((state / CAPACITY_FILE).read_text())
    except (OSError, ValueError):
        return Refusals()
    refuse, late = data.get("refuse", []), data.get("refuse_late", [])
    return Refusals(tuple(map(str, refuse)), tuple(map(str, late)))


def update(state: Path, refuse: list[str], late: list[str], *, clear: bool = False) -> Refusals:
    """Add the checked patterns to the refusals in ``state`` (after removing all with ``clear``); return them.

    Raises InvalidInput for a malformed pattern, EnvironmentProblem for an unsafe state directory.
    """
    current = Refusals() if clear else load(state)
    new = Refusals(
        tuple(dict.fromkeys([*current.refuse, *map(placement, refuse)])),
        tuple(dict.fromkeys([*current.late, *map(placement, late)])),
    )
    make_state_dir(state)
    write_atomic(state / CAPACITY_FILE, json.dumps(new.to_dict(), indent=1) + "\n", mode=0o600)
    return new


def insufficient_message(instance_type: str, az: str, others: list[str]) -> str:
    """Return EC2's InsufficientInstanceCapacity message for ``instance_type`` in ``az``."""
    choosing = f" or choosing {', '.join(others)}" if others else ""
    return (
        f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested "
        f"({az}). Our system will be working on provisioning additional capacity. You can currently get "
        f"{instance_type} capacity by not specifying an Availability Zone in your request{choosing}."
    )


def unsupported_message(instance_type: str, az: str) -> str:
    """Return EC2's Unsupported message for a type an AZ does not offer."""
    return (
        f"Your requested instance type ({instance_type}) is not supported in your requested Availability Zone "
        f"({az}). Please retry your request by not specifying an Availability Zone or choosing another one."
    )

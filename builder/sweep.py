"""Sweep: remove what builds left behind (a killed process, a lost machine), found by tag alone.

A finished build deletes all its temporary resources and marks its artefacts
``ebsrole:status=complete``. So anything tagged by the tool that is temporary, or an
AMI or snapshot that never became complete, belongs to no finished build, once it is
older than a build could still be running.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from builder.cleanup import already_gone
from builder.ec2 import EC2, CloudError, tag, tags_of
from builder.errors import InvalidInput

log = logging.getLogger(__name__)

# Removal order: what holds others first.
KINDS = ("instances", "images", "snapshots", "volumes", "key_pairs", "security_groups")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class Found:
    """A leftover resource and what became of it."""

    kind: str
    id: str
    build_id: str
    role: str
    created_at: str
    fate: str = "found"  # found (dry run) | deleted | left
    error: str = ""
    tool_kind: str = ""  # the ebsrole:kind tag (builder, builder-root, data-volume, ...)


# A builder's volumes (root and data) go with it: DeleteOnTermination. ("builder-root" is
# what builds before the data volume joined the launch tagged the root with.)
BUILDER_VOLUMES = ("builder-volume", "builder-root")


def parse_age(text: str) -> float:
    """Return seconds for ``30s``, ``15m``, ``2h``, ``1d``; raise InvalidInput otherwise."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise InvalidInput(f"--older-than {text!r}: give a number and s, m, h or d (e.g. 2h)")
    return int(match.group(1)) * UNITS[match.group(2)]


def find_leftovers(
    ec2: EC2, older_than: float, now: datetime | None = None, build_id: str | None = None
) -> list[Found]:
    """Return the tool's resources that belong to no finished build and are older than ``older_than`` s.

    With ``build_id``, only that build's.
    """
    now = now or datetime.now(UTC)
    if build_id:
        filters = [{"Name": f"tag:{tag('build-id')}", "Values": [build_id]}]
    else:
        filters = [{"Name": "tag-key", "Values": [tag("build-id")]}]
    found = []
    for kind in KINDS:
        for resource in ec2.find_tagged(kind, filters):
            tags = tags_of(resource)
            if not _abandoned(kind, resource, tags) or _age(tags, now) < older_than:
                continue
            found.append(
                Found(
                    kind,
                    _id(kind, resource),
                    tags.get(tag("build-id"), ""),
                    tags.get(tag("role"), ""),
                    tags.get(tag("created-at"), ""),
                    tool_kind=tags.get(tag("kind"), ""),
                )
            )
    return found


def remove(ec2: EC2, found: list[Found]) -> list[Found]:
    """Remove ``found`` in a safe order; return it with each fate set (keeps going past failures)."""
    for item in sorted(found, key=lambda f: KINDS.index(f.kind)):
        if item.tool_kind in BUILDER_VOLUMES and any(
            f.kind == "instances" and f.build_id == item.build_id for f in found
        ):
            item.fate = "deleted"  # a builder's root volume goes with its instance (DeleteOnTermination)
            continue
        try:
            _remove(ec2, item)
        except CloudError as exc:
            if already_gone(exc):  # went with its instance (a root volume), or by another hand
                item.fate = "deleted"
                continue
            item.fate, item.error = "left", str(exc).splitlines()[0]
            log.warning("could not remove %s %s: %s", item.kind, item.id, item.error)
        else:
            item.fate = "deleted"
            log.info("removed %s %s (build %s)", item.kind, item.id, item.build_id)
    return found


def _abandoned(kind: str, resource: dict[str, Any], tags: dict[str, str]) -> bool:
    if kind == "instances" and resource["State"]["Name"] in ("terminated", "shutting-down"):
        return False
    if tags.get(tag("temporary")) == "true":
        return True
    return kind in ("images", "snapshots") and tags.get(tag("status")) != "complete"


def _age(tags: dict[str, str], now: datetime) -> float:
    try:
        created = datetime.strptime(tags.get(tag("created-at"), ""), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return float("inf")  # no time on it: certainly no running build's
    return (now - created).total_seconds()


def _id(kind: str, resource: dict[str, Any]) -> str:
    key = {
        "instances": "InstanceId",
        "images": "ImageId",
        "snapshots": "SnapshotId",
        "volumes": "VolumeId",
        "key_pairs": "KeyName",
        "security_groups": "GroupId",
    }[kind]
    return str(resource[key])


def _remove(ec2: EC2, item: Found) -> None:
    if item.kind == "instances":
        ec2.terminate(item.id)
    elif item.kind == "images":
        ec2.call("deregister_image", ImageId=item.id)
    elif item.kind == "snapshots":
        ec2.call("delete_snapshot", SnapshotId=item.id)
    elif item.kind == "volumes":
        ec2.delete_volume(item.id, None)
    elif item.kind == "key_pairs":
        ec2.call("delete_key_pair", KeyName=item.id)
    else:
        ec2.delete_security_group(item.id)

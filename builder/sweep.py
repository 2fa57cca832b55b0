"""Sweep: remove what builds left behind (a killed process, a lost machine), found by tag alone.

A finished build deletes all its temporary resources and marks its artefacts
``ebsrole:status=complete``. So anything the tool made that is temporary, or an AMI or
snapshot that never became complete, belongs to no finished build, once it is older
than a build could still be running.

What the tool made is told by two things that must agree: its tags (created-by
``ebsrole``, a build id as ``pipeline.new_build_id`` makes them, a created-at time) and
its naming (the build's security group, and older builds' key pair, are
``ebsrole-<role>-<build id>``; its builder is in that group or was launched with the client
token ``<build id>-builder``; its AMI and snapshots carry the build id in name and
description). Copied tags alone are not enough; a resource whose time cannot be
read is never old.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from builder import tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.cleanup import already_gone
from builder.errors import CloudError, InvalidInput

log = logging.getLogger(__name__)

# Removal order: what holds others first.
KINDS = ("instances", "images", "snapshots", "volumes", "key_pairs", "security_groups")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# What pipeline.new_build_id makes (pipeline imports this module, so it is spelt here;
# a test holds the two together).
BUILD_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")
CREATED_AT = tags.TIME_FORMAT
# The build's default time limit (build --timeout, BuildOptions.timeout), after which its
# dead-man switch powers the builder off. Sweeping younger than twice that could hit a
# build that is still running.
BUILD_TIME_LIMIT = 3600.0
# The kinds of volume that hold a role's data (launch, drills), as opposed to a builder's.
DATA_VOLUMES = tags.DATA_VOLUMES


@dataclass
class Found:
    """A resource of the tool that sweep looked at, and what became of it."""

    kind: str
    id: str
    build_id: str
    role: str
    created_at: str
    fate: str = "found"  # found (dry run) | deleted | left | spared
    error: str = ""
    tool_kind: str = ""  # the ebsrole:kind tag (builder, builder-root, data-volume, ...)
    reason: str = ""  # why it was spared
    note: str = ""  # for volumes: where the data came from, its last snapshot


# A builder's volumes (root and data) go with it: DeleteOnTermination. ("builder-root" is
# what builds before the data volume joined the launch tagged the root with.)
BUILDER_VOLUMES = tags.BUILDER_VOLUMES


def builder_token(build_id: str) -> str:
    """Return the client token a build launches its builder with (a fallback type's adds ``-N``).

    With no key pair and a given security group, the token is what names the builder after its build.
    """
    return f"{build_id}-builder"


def parse_age(text: str) -> float:
    """Return seconds for ``30s``, ``15m``, ``2h``, ``1d``; raise InvalidInput otherwise."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise InvalidInput(f"--older-than {text!r}: give a number and s, m, h or d (e.g. 2h)")
    return int(match.group(1)) * UNITS[match.group(2)]


def age_floor(build_time_limit: float = BUILD_TIME_LIMIT) -> float:
    """Return the least age a region-wide sweep may take: twice the build time limit."""
    return 2 * build_time_limit


def check_older_than(older_than: float, text: str, floor: float, *, force: bool = False) -> None:
    """Raise InvalidInput when ``older_than`` is below ``floor`` and not ``force``d."""
    if older_than < floor and not force:
        raise InvalidInput(
            f"--older-than {text}: below {duration(floor)}, twice the build time limit: "
            "builds still running (yours or other jobs') would be swept",
            hint="for one build the tool named, use --build-id ID; to go below anyway, add --force",
        )


def check_build_id(build_id: str) -> None:
    """Raise InvalidInput unless ``build_id`` is one the tool makes."""
    if not BUILD_ID.fullmatch(build_id):
        raise InvalidInput(f"--build-id {build_id!r}: not a build id (like 20260101T120000Z-0123abcd)")


def find_leftovers(
    ec2: EC2, older_than: float, now: datetime | None = None, build_id: str | None = None
) -> list[Found]:
    """Return the tool's resources that belong to no finished build and are older than ``older_than`` s.

    With ``build_id``, only that build's.
    """
    return [f for f in survey(ec2, older_than, now, build_id) if f.fate == "found"]


def survey(ec2: EC2, older_than: float, now: datetime | None = None, build_id: str | None = None) -> list[Found]:
    """Return the leftovers of builds (fate ``found``) and what looks like one but is spared (with its reason)."""
    now = now or datetime.now(UTC)
    if build_id:
        filters = [{"Name": f"tag:{tags.BUILD_ID}", "Values": [build_id]}]
    else:
        filters = [{"Name": "tag-key", "Values": [tags.BUILD_ID]}]
    found: list[Found] = []
    attached: dict[str, str] = {}  # volume -> the instance it is attached to
    for kind in KINDS:
        for resource in ec2.find_tagged(kind, filters):
            seen = tags.parse(resource)
            if not _abandoned(kind, resource, seen):
                continue
            item = _found(kind, resource, seen)
            item.reason = _not_ours(kind, resource, seen) or _too_young(seen, now, older_than)
            item.fate = "spared" if item.reason else "found"
            found.append(item)
            for attachment in resource.get("Attachments") or [] if kind == "volumes" else []:
                attached[item.id] = str(attachment.get("InstanceId", ""))
    swept = {f.id for f in found if f.kind == "instances" and f.fate == "found"}
    for item in found:
        holder = attached.get(item.id)
        if item.fate == "found" and holder and holder not in swept:
            item.fate, item.reason = "spared", f"attached to instance {holder}, which is not swept"
    return found


def find_volumes(ec2: EC2) -> list[Found]:
    """Return the tool's available (unattached) volumes: data left by launch, drills, builders.

    A data volume (not temporary) that no completed snapshot was ever taken of is spared:
    its data exists nowhere else.
    """
    filters = [
        {"Name": "status", "Values": ["available"]},
        {"Name": "tag:" + tags.KIND, "Values": [*DATA_VOLUMES, *BUILDER_VOLUMES]},
    ]
    volumes = [v for v in ec2.find_tagged("volumes", filters) if tags.parse(v).by_tool]
    snapshots = _last_snapshots(ec2, [str(v["VolumeId"]) for v in volumes])
    found = []
    for volume in volumes:
        seen = tags.parse(volume)
        item = _found("volumes", volume, seen)
        item.created_at = item.created_at or _iso(volume.get("CreateTime"))
        last = snapshots.get(item.id)
        item.note = " ".join(
            part
            for part in (
                f"env {seen.env}" if seen.env else "",
                f"restored from {seen.restored_from}" if seen.restored_from else "",
                f"last snapshot {last[0]} {last[1]}" if last else "never snapshotted",
            )
            if part
        )
        if not last and item.tool_kind in DATA_VOLUMES and not seen.temporary:
            item.fate, item.reason = "spared", "no completed snapshot of it: its data exists nowhere else"
        found.append(item)
    return found


def _last_snapshots(ec2: EC2, volume_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Return each volume's newest completed snapshot (id, start time), in one call per 200 volumes."""
    newest: dict[str, tuple[str, str]] = {}
    for start in range(0, len(volume_ids), 200):
        filters = [
            {"Name": "volume-id", "Values": volume_ids[start : start + 200]},
            {"Name": "status", "Values": ["completed"]},
        ]
        for snap in ec2.find_tagged("snapshots", filters):
            when = _iso(snap.get("StartTime"))
            if snap["VolumeId"] not in newest or when > newest[snap["VolumeId"]][1]:
                newest[str(snap["VolumeId"])] = (str(snap["SnapshotId"]), when)
    return newest


def remove(ec2: EC2, found: list[Found]) -> list[Found]:
    """Remove ``found`` in a safe order; return it with each fate set (keeps going past failures)."""
    for item in sorted((f for f in found if f.fate == "found"), key=lambda f: KINDS.index(f.kind)):
        if item.tool_kind in BUILDER_VOLUMES and any(
            f.kind == "instances" and f.build_id == item.build_id and f.fate != "spared" for f in found
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


def _abandoned(kind: str, resource: dict[str, Any], seen: tags.TagView) -> bool:
    if kind == "instances" and resource["State"]["Name"] in ("terminated", "shutting-down"):
        return False
    if seen.temporary:
        return True
    return kind in ("images", "snapshots") and seen.status != tags.STATUS_COMPLETE


def _found(kind: str, resource: dict[str, Any], seen: tags.TagView) -> Found:
    return Found(kind, _id(kind, resource), seen.build_id, seen.role, seen.created_at, tool_kind=seen.kind)


def _not_ours(kind: str, resource: dict[str, Any], seen: tags.TagView) -> str:
    """Return why ``resource`` is not one the tool made (tags and naming disagree), or ''."""
    build_id, role = seen.build_id, seen.role
    if not seen.by_tool:
        return "no created-by tag of ebsrole"
    if not BUILD_ID.fullmatch(build_id):
        return f"build id {build_id!r} is not one the tool makes"
    if _created(seen) is None:
        return f"created-at {seen.created_at!r} is not a time: never old"
    names = {f"ebsrole-{role}-{build_id}", f"ebsrole-drill-{build_id}"}
    if kind == "key_pairs" and resource.get("KeyName") not in names:
        return f"key pair {resource.get('KeyName')!r} is not named after build {build_id}"
    if kind == "security_groups" and resource.get("GroupName") not in names:
        return f"security group {resource.get('GroupName')!r} is not named after build {build_id}"
    if kind == "instances":
        groups = {g.get("GroupName") for g in resource.get("SecurityGroups") or []}
        launched = str(resource.get("ClientToken") or "").startswith(builder_token(build_id))
        if resource.get("KeyName") not in names and not groups & names and not launched:
            return f"neither its key pair, a security group nor its client token is named after build {build_id}"
    if kind == "images" and resource.get("Name") != f"ebsrole-{role}-{build_id}":
        return f"AMI name {resource.get('Name')!r} is not build {build_id}'s"
    if kind == "snapshots" and not str(resource.get("Description", "")).endswith(f" {build_id}"):
        return f"description {resource.get('Description')!r} does not name build {build_id}"
    return ""


def _too_young(seen: tags.TagView, now: datetime, older_than: float) -> str:
    created = _created(seen)
    if created is None or (now - created).total_seconds() < older_than:
        return f"younger than {duration(older_than)}: its build may still be running"
    return ""


def _created(seen: tags.TagView) -> datetime | None:
    """Return the created-at time, or None when there is none or it cannot be read (never "old")."""
    try:
        return datetime.strptime(seen.created_at, CREATED_AT).replace(tzinfo=UTC)
    except ValueError:
        return None


def duration(seconds: float) -> str:
    """Return ``seconds`` as --older-than spells it (2h, 90m, 45s)."""
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{int(seconds)}s"


def _iso(value: Any) -> str:
    return value.astimezone(UTC).strftime(CREATED_AT) if isinstance(value, datetime) else str(value or "")


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
    resources.remove(ec2, item.kind, item.id)

"""Nightly snapshots of the data volumes of running role instances, and their retention.

An instance belongs to a role when it carries the tool's ``ebsrole:role`` tag (``launch``
puts it there) or runs one of the tool's role AMIs; its data volume is the one attached at
the device the AMI was built for. A nightly snapshot is tagged with the role, the source
instance, volume and AZ, the environment, kind ``nightly`` and its date; one per volume
and date, so running twice in a night makes nothing twice.

With ``--freeze`` the filesystem is frozen over SSH (``fsfreeze``) around the snapshot's
start, only once the mount point is checked to be the volume's own mount, and always
thawed: by us, also when the snapshot call fails, or by a watchdog on the instance within
``--freeze-timeout`` seconds when we cannot (``builder.freeze``). Over SSH a marker file is also
written onto the volume first and its token tagged on the snapshot, so that a restore drill
can check that the data it finds is the data that was snapshotted.

Retention (``--keep-daily N --keep-weekly M``), per source volume: the N newest completed
nightly snapshots (by their own start time), and the newest completed one of each of the M
most recent ISO weeks. Only ``completed`` snapshots count: a ``pending`` one is never
deleted and never stands in for a completed one; one in ``error`` is reported and deleted
only once a newer completed one exists; the newest completed snapshot of a volume is never
deleted, whatever the flags. Only ``nightly`` snapshots are ever considered; a seed
snapshot, any snapshot an AMI names, or one the default or latest version of one of the tool's
launch templates maps (`template`), never.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import freeze as freezing
from builder import publish, tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.errors import BuildError, CloudError, FreezeRefused
from builder.keys import KeyPair
from builder.live import known_host_key
from builder.reach import Reach
from builder.registry import RoleImage, role_images
from builder.remote import Remote

log = logging.getLogger(__name__)

MARKER = ".ebsrole-snapshot-marker"  # on the volume, at its mount point


@dataclass(frozen=True)
class RoleInstance:
    """A running instance of a role and its data volume."""

    instance_id: str
    role: str
    env: str
    az: str
    address: str
    volume_id: str
    device: str
    mount_point: str
    public_ip: str = ""
    private_ip: str = ""

    def addresses(self) -> dict[str, str]:
        """Return the instance's id and addresses as DescribeInstances names them (what a Reach reads)."""
        found = {"PublicIpAddress": self.public_ip, "PrivateIpAddress": self.private_ip}
        return {"InstanceId": self.instance_id, **{k: v for k, v in found.items() if v}}


@dataclass
class SnapshotResult:
    role: str
    instance_id: str
    volume_id: str
    snapshot_id: str | None
    result: str  # created | exists | failed
    frozen: bool = False
    marker: str | None = None
    error: str | None = None
    frozen_seconds: float | None = None  # --freeze: how long, on the instance's clock
    thawed_by: str | None = None  # --freeze: ebsrole | watchdog (the snapshot call outlasted its bound)


@dataclass
class Retained:
    snapshot_id: str
    volume_id: str
    date: str
    # kept (daily) | kept (weekly) | kept (newest) | kept (pending) | kept (error, no newer completed)
    # | deleted | would delete | protected | left
    fate: str
    error: str | None = None
    state: str = ""  # the snapshot's EC2 state: completed | pending | error


@dataclass
class SnapshotRun:
    snapshots: list[SnapshotResult] = field(default_factory=list)
    retention: list[Retained] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(s.result == "failed" for s in self.snapshots) or any(r.error for r in self.retention)


# ---------------------------------------------------------------- finding instances


def role_instances(ec2: EC2, roles: Sequence[str] | None = None, env: str | None = None) -> list[RoleInstance]:
    """Return the running instances of ``roles`` (all roles when None) with their data volumes."""
    images = {i.image_id: i for i in role_images(ec2, roles=roles)}
    running = {"Name": "instance-state-name", "Values": ["running"]}
    by_tag = (
        {"Name": f"tag:{tags.ROLE}", "Values": list(roles)}
        if roles is not None
        else {
            "Name": "tag-key",
            "Values": [tags.ROLE],
        }
    )
    queries = [[running, by_tag]]
    ids = sorted(images)
    queries += [[running, {"Name": "image-id", "Values": ids[n : n + 200]}] for n in range(0, len(ids), 200)]
    raw: dict[str, dict[str, Any]] = {}
    for filters in queries:
        for reservation in ec2.call("describe_instances", Filters=filters)["Reservations"]:
            for instance in reservation["Instances"]:
                raw[instance["InstanceId"]] = instance
    found = []
    for instance in raw.values():
        seen = tags.parse(instance)
        if seen.build_id:  # a builder, not an instance of the role
            continue
        image = images.get(instance["ImageId"])
        role = seen.role or (image.role if image else "")
        if not role or (roles is not None and role not in roles):
            continue
        if env is not None and seen.env != env:
            continue
        if image is None:
            image = _image_of(ec2, instance["ImageId"])
        device = image.device if image else ""
        volume = next(
            (m["Ebs"]["VolumeId"] for m in instance.get("BlockDeviceMappings", []) if m["DeviceName"] == device), None
        )
        if not volume or image is None:
            log.warning("%s (%s): no data volume at %s; skipped", instance["InstanceId"], role, device or "?")
            continue
        found.append(
            RoleInstance(
                instance_id=instance["InstanceId"],
                role=role,
                env=seen.env,
                az=instance.get("Placement", {}).get("AvailabilityZone", ""),
                address=instance.get("PublicIpAddress") or instance.get("PrivateIpAddress") or "",
                volume_id=volume,
                device=device,
                mount_point=image.mount_point,
                public_ip=instance.get("PublicIpAddress") or "",
                private_ip=instance.get("PrivateIpAddress") or "",
            )
        )
    return sorted(found, key=lambda i: (i.role, i.instance_id))


def _image_of(ec2: EC2, image_id: str) -> RoleImage | None:
    raw = ec2.call("describe_images", ImageIds=[image_id])["Images"]
    return RoleImage.of(raw[0]) if raw else None


# ---------------------------------------------------------------- snapshots

Connector = Callable[[RoleInstance], Remote]


def snapshot_instances(
    ec2: EC2,
    instances: Sequence[RoleInstance],
    date: dt.date,
    *,
    freeze: bool = False,
    connect: Connector | None = None,
    freeze_timeout: float = freezing.DEFAULT_TIMEOUT,
) -> list[SnapshotResult]:
    """Snapshot each instance's data volume for ``date`` (skipped when that night's exists)."""
    existing = nightly_snapshots(ec2, volumes=[i.volume_id for i in instances])
    done_tonight = {s["volume"] for s in existing if s["date"] == date.isoformat() and s["state"] != "error"}
    results = []
    for instance in instances:
        if instance.volume_id in done_tonight:
            snapshot = next(
                s
                for s in existing
                if s["volume"] == instance.volume_id and s["date"] == date.isoformat() and s["state"] != "error"
            )
            results.append(
                SnapshotResult(instance.role, instance.instance_id, instance.volume_id, snapshot["id"], "exists")
            )
            continue
        try:
            results.append(_snapshot_one(ec2, instance, date, freeze=freeze, connect=connect, bound=freeze_timeout))
        except (BuildError, OSError) as exc:
            log.warning("%s: snapshot of %s failed: %s", instance.instance_id, instance.volume_id, exc)
            results.append(
                SnapshotResult(instance.role, instance.instance_id, instance.volume_id, None, "failed", error=str(exc))
            )
    return results


def _snapshot_one(
    ec2: EC2, instance: RoleInstance, date: dt.date, *, freeze: bool, connect: Connector | None, bound: float
) -> SnapshotResult:
    result = SnapshotResult(instance.role, instance.instance_id, instance.volume_id, None, "created")
    remote = connect(instance) if connect else None
    try:
        if freeze and remote is None:
            raise BuildError("--freeze needs SSH to the instance (--identity)")
        if remote is not None and _volume_mounted(remote, instance, required=freeze):
            result.marker = f"{date.isoformat()}-{secrets.token_hex(8)}"
            path = shlex.quote(f"{instance.mount_point.rstrip('/')}/{MARKER}")
            remote.check(f"echo {shlex.quote(result.marker)} | sudo -n tee {path} >/dev/null && sudo -n sync")
        if freeze and remote is not None:
            result.snapshot_id, thawed = freezing.while_frozen(
                remote, instance, lambda: _create(ec2, instance, date, result.marker), bound
            )
            result.frozen, result.frozen_seconds, result.thawed_by = True, round(thawed.seconds, 3), thawed.by
        else:
            result.snapshot_id = _create(ec2, instance, date, result.marker)
    finally:
        if remote is not None:
            remote.close()
    log.info(
        "%s: %s of %s (%s)%s",
        instance.role,
        result.snapshot_id,
        instance.volume_id,
        instance.instance_id,
        f" frozen {result.frozen_seconds:.3f} s" if result.frozen else "",
    )
    return result


def _volume_mounted(remote: Remote, instance: RoleInstance, *, required: bool) -> bool:
    """Return whether the mount point is a mount of the instance's data volume.

    The marker goes onto the volume only then, never onto root. Raises FreezeRefused when
    ``required`` (a freeze) and it is not; otherwise warns: the snapshot is still taken.
    """
    try:
        freezing.check_mount(remote, instance)
    except FreezeRefused as exc:
        if required:
            raise
        log.warning(
            "%s: %s holds no mount of %s (%s): snapshot taken without a marker",
            exc.instance_id,
            exc.mount_point,
            exc.volume_id,
            exc.reason,
        )
        return False
    return True


def _create(ec2: EC2, instance: RoleInstance, date: dt.date, marker: str | None) -> str:
    nightly = tags.Nightly(
        instance.role,
        instance.env,
        date.isoformat(),
        instance.instance_id,
        instance.volume_id,
        instance.az,
        instance.device,
        marker,
    )
    description = f"ebsrole nightly {instance.role} {instance.volume_id} {date.isoformat()}"
    return resources.snapshot(ec2, instance.volume_id, description, tags.nightly_snapshot(nightly))


def nightly_snapshots(
    ec2: EC2, *, volumes: Sequence[str] | None = None, role: str | None = None, env: str | None = None
) -> list[dict[str, Any]]:
    """Return the tool's nightly snapshots (id, volume, date, role, env, state, start, owner, tags), newest first.

    Newest by the snapshot's own ``StartTime``: a DLM snapshot has no date tag, and a date
    tag can name any night (``--as-of``), so only EC2's start time ranks them all.
    """
    filters = [{"Name": f"tag:{tags.KIND}", "Values": [tags.KIND_NIGHTLY]}]
    if volumes is not None:
        if not volumes:
            return []
        filters.append({"Name": f"tag:{tags.SOURCE_VOLUME}", "Values": sorted(set(volumes))})
    if role is not None:
        filters.append({"Name": f"tag:{tags.ROLE}", "Values": [role]})
    found = []
    for raw in ec2.call("describe_snapshots", OwnerIds=["self"], Filters=filters)["Snapshots"]:
        seen = tags.parse(raw)
        if env is not None and seen.env != env:
            continue
        found.append(
            {
                "id": raw["SnapshotId"],
                "volume": seen.source_volume,
                "date": seen.date,
                "role": seen.role,
                "env": seen.env,
                "state": raw.get("State", ""),
                "start": _start(raw),
                "owner": str(raw.get("OwnerId", "")),
                "tags": dict(seen.all),
            }
        )
    return sorted(found, key=newest_first, reverse=True)


def _start(raw: dict[str, Any]) -> str:
    """Return the snapshot's StartTime as sortable ISO text in UTC ("" when EC2 gave none)."""
    start = raw.get("StartTime")
    if isinstance(start, dt.datetime):
        start = start.astimezone(dt.UTC) if start.tzinfo else start.replace(tzinfo=dt.UTC)
        return start.isoformat(timespec="microseconds")
    return str(start or "")


# ---------------------------------------------------------------- retention


def newest_first(snapshot: dict[str, Any]) -> tuple[str, str, str]:
    """Return the sort key (with reverse=True) that puts the newest snapshot first.

    The start time ranks; EC2 reports it to the second or millisecond, so two snapshots can
    share it (two nights taken in one run of catching up): the night recorded breaks the tie.
    """
    return snapshot["start"], snapshot["date"], snapshot["id"]


def plan_retention(snapshots: Sequence[dict[str, Any]], keep_daily: int, keep_weekly: int) -> dict[str, str]:
    """Return each snapshot's fate under the policy: a ``kept (...)`` reason, or ``delete``.

    ``snapshots`` are one volume's nightly snapshots. Only ``completed`` ones count. Daily:
    the ``keep_daily`` newest by start time. Weekly: the newest of each of the
    ``keep_weekly`` most recent ISO weeks of the night recorded (the date tag; the start
    day without one). The newest completed one is always kept; a pending one always; one
    in ``error`` until a completed one started after it.
    """
    ordered = sorted(snapshots, key=newest_first, reverse=True)
    completed = [s for s in ordered if s["state"] == "completed"]
    fates = {s["id"]: "delete" for s in completed}
    for snap in completed[: max(keep_daily, 1)]:
        fates[snap["id"]] = "kept (daily)" if keep_daily else "kept (newest)"
    weeks: set[tuple[int, int]] = set()
    for snap in completed:
        week = _week(snap)
        if week in weeks:
            continue
        weeks.add(week)
        if len(weeks) > keep_weekly:
            break
        if fates[snap["id"]] == "delete":
            fates[snap["id"]] = "kept (weekly)"
    newest = completed[0]["start"] if completed else None
    for snap in ordered:
        if snap["state"] == "error":
            fates[snap["id"]] = "delete" if newest and newest > snap["start"] else "kept (error, no newer completed)"
        elif snap["state"] != "completed":
            fates[snap["id"]] = f"kept ({snap['state'] or 'unknown state'})"
    return fates


def _week(snap: dict[str, Any]) -> tuple[int, int]:
    day = snap["date"] or snap["start"][:10]
    year, week, _ = dt.date.fromisoformat(day).isocalendar()
    return year, week


def apply_retention(
    ec2: EC2, volumes: Sequence[str], keep_daily: int, keep_weekly: int, *, dry_run: bool = False
) -> list[Retained]:
    """Delete the nightly snapshots of ``volumes`` the policy does not keep; never one an AMI names.

    Returns one row per snapshot considered; a snapshot in ``error`` is logged as a warning.
    """
    protected = {s for image in ec2.call("describe_images", Owners=["self"])["Images"] for s in _snapshots_of(image)}
    protected |= template_snapshots(ec2)
    rows = []
    snapshots = nightly_snapshots(ec2, volumes=volumes)
    for volume in sorted(set(volumes)):
        mine = [s for s in snapshots if s["volume"] == volume and s["start"]]
        fates = plan_retention(mine, keep_daily, keep_weekly)
        for snap in mine:
            fate = fates[snap["id"]]
            row = Retained(snap["id"], volume, snap["date"], fate, state=snap["state"])
            if snap["state"] == "error":
                log.warning("%s: snapshot %s of %s is in state error", snap["role"], snap["id"], volume)
            if fate == "delete":
                if snap["id"] in protected:
                    row.fate = "protected"
                elif dry_run:
                    row.fate = "would delete"
                else:
                    try:
                        resources.remove(ec2, "snapshots", snap["id"])
                        row.fate = "deleted"
                    except CloudError as exc:
                        row.fate, row.error = "left", str(exc).splitlines()[0]
            rows.append(row)
    return rows


def template_snapshots(ec2: EC2) -> set[str]:
    """Return the snapshots the default and latest versions of the tool's launch templates map.

    Retention never deletes them: an Auto Scaling group on such a template restores them at
    its next scale-out. Older versions are not counted, or nightly versions would keep every night.
    """
    ours = [{"Name": f"tag:{tags.KIND}", "Values": [tags.KIND_LAUNCH_TEMPLATE]}]
    found = set()
    for template in ec2.call("describe_launch_templates", Filters=ours)["LaunchTemplates"]:
        versions = ec2.call(
            "describe_launch_template_versions",
            LaunchTemplateId=template["LaunchTemplateId"],
            Versions=["$Default", "$Latest"],
        )["LaunchTemplateVersions"]
        found |= {s for v in versions for s in _snapshots_of(v.get("LaunchTemplateData") or {})}
    return found


def _snapshots_of(image: dict[str, Any]) -> list[str]:
    return [
        m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings") or [] if m.get("Ebs", {}).get("SnapshotId")
    ]


# ---------------------------------------------------------------- publishing


@dataclass
class Latest:
    """The newest completed nightly snapshot of a role in an environment, as ``snapshot`` published it."""

    role: str
    env: str
    parameter: str
    snapshot_id: str | None  # None: no completed nightly snapshot yet
    date: str
    outcome: str  # written | unchanged | failed | none completed | not published
    note: str | None = None  # a newer snapshot still pending, or why it was not published
    error: str | None = None


def publish_latest(ec2: EC2, instances: Sequence[RoleInstance]) -> list[Latest]:
    """Publish, per role and environment of ``instances``, its newest completed nightly snapshot.

    The parameter is ``builder.publish.latest_snapshot_name``. A newer snapshot still
    pending leaves it at the newest completed one (noted; the next run publishes the new
    one). An environment that cannot be part of a parameter name is noted, not published.
    Never raises BuildError for SSM: the outcome says what happened.
    """
    return [_publish_one(ec2, role, env) for role, env in sorted({(i.role, i.env) for i in instances})]


def _publish_one(ec2: EC2, role: str, env: str) -> Latest:
    snapshots = nightly_snapshots(ec2, role=role, env=env)  # newest first
    newest = next((s for s in snapshots if s["state"] == "completed"), None)
    row = Latest(role, env, "", newest["id"] if newest else None, newest["date"] if newest else "", "none completed")
    newer = [s for s in snapshots if s["state"] == "pending" and (newest is None or s["start"] > newest["start"])]
    if newer:
        row.note = f"{newer[0]['id']} ({newer[0]['date'] or '?'}) is still pending: a later run publishes it"
    if env and not publish.ENV_NAME.fullmatch(env):
        row.outcome, row.error = "not published", f"environment {env!r} cannot be part of an SSM parameter name"
        return row
    row.parameter = publish.latest_snapshot_name(role, env)
    if newest is not None:
        parameter = publish.snapshot_parameter(role, env, newest["id"], newest["date"])
        (done,) = publish.publish(ec2, [parameter], role, env)
        row.outcome, row.error = done.outcome, done.error
    return row


def ssh_connector(identity: Path, known_hosts: Path, user: str, reach: Reach | None = None) -> Connector:
    """Return a connector that logs in to an instance with ``identity``, its host key pinned from ``known_hosts``.

    ``reach`` says which address and proxy (default: its public IP, else its private one, directly).
    """
    key = KeyPair.from_file(identity)
    how = reach or Reach()

    def connect(instance: RoleInstance) -> Remote:
        address = how.address(instance.addresses())
        host_key = known_host_key(known_hosts, address, 22)
        proxy = how.proxy(address, 22, user, instance.instance_id)
        return Remote.connect(address, 22, user, key, host_key, deadline=60, prefix=f"[{instance.role}] ", proxy=proxy)

    return connect

"""Scale-out: one launch template per role and environment, its data the newest night's, and an ASG on it.

Another instance of a role is a restore, and in EC2 an Auto Scaling group makes instances
from a launch template; so the template *is* the restore, written down: the role's current
AMI, IMDSv2 required, and a data device (encrypted) made from the snapshot ``--from`` names,
tagged at creation as `launch` tags. The shape comes from :func:`builder.launch.restore_spec`
(one home for `launch` and `template`). Each `template` run adds a version and makes it the
default; `snapshot --update-template` adds one whose data is that night's completed snapshot.
An Auto Scaling group made here reads ``$Default``: it follows both without being touched.

Two choices differ from `launch`. The data volume is deleted when its instance terminates:
an ASG replaces instances at will (scale-in, refresh, health), and volumes it leaves would
pile up with nobody to reattach them; the durable copy is the nightly snapshot (``--keep-volumes``
keeps them anyway). And a template's volume tags apply to every volume of the instance, the
root too, so the DLM target tag (``ebsrole:backup-target``) is not put there: a DLM policy would
back up root volumes. `snapshot` (cron) backs up ASG instances: it finds them by their role tag.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from builder import tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.backups import RoleInstance, SnapshotResult, nightly_snapshots
from builder.errors import CloudError, InvalidInput
from builder.launch import (
    RestoreOptions,
    Source,
    check_volume_size,
    choose_source,
    current_image,
    restore_spec,
    zones,
)
from builder.roles import Role

log = logging.getLogger(__name__)

NOT_FOUND = ("InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound")
DEFAULT_VERSION = "$Default"


@dataclass(frozen=True)
class TemplateRequest:
    """What `template` asks for: which snapshot, which env, how its instances are set up."""

    choice: str = "latest"  # latest | seed | snap-...
    source_env: str = ""
    allow_other_role: bool = False
    env: str = ""
    instance_type: str | None = None
    key_name: str | None = None
    security_group_ids: tuple[str, ...] = ()
    keep_volumes: bool = False  # keep data volumes when instances terminate (default: delete them)
    volume_size: int | None = None  # GiB, at least the snapshot's (None: its size); grown at first mount


@dataclass(frozen=True)
class TemplateVersion:
    """A version `template` or `snapshot --update-template` made default."""

    name: str
    template_id: str
    version: int
    image_id: str
    snapshot_id: str
    created: bool = False  # the template itself was made by this run


@dataclass(frozen=True)
class GroupRequest:
    """What `template --asg` asks of an Auto Scaling group (None: leave as it is)."""

    name: str
    min_size: int | None = None
    max_size: int | None = None
    desired: int | None = None
    subnets: tuple[str, ...] = ()
    refresh: bool = False

    def check(self) -> None:
        """Raise InvalidInput for sizes that cannot be (negative, min > max, desired outside them)."""
        sizes = {"--min": self.min_size, "--max": self.max_size, "--desired": self.desired}
        problems = [f"{flag} {n}: at least 0" for flag, n in sizes.items() if n is not None and n < 0]
        low, high = self.min_size, self.max_size
        if low is not None and high is not None and low > high:
            problems.append(f"--min {low} is more than --max {high}")
        if self.desired is not None and (
            (low is not None and self.desired < low) or (high is not None and self.desired > high)
        ):
            problems.append(f"--desired {self.desired}: outside --min/--max")
        if problems:
            raise InvalidInput(f"--asg {self.name}: " + "; ".join(problems))


@dataclass
class Group:
    """What `template --asg` did to an Auto Scaling group."""

    name: str
    done: str  # created | updated
    version: str
    min_size: int
    max_size: int
    desired: int
    refresh_id: str | None = None


@dataclass
class TemplateUpdate:
    """What `snapshot --update-template` did for one role and env."""

    role: str
    env: str
    template: str
    snapshot_id: str | None
    result: str  # updated | unchanged | skipped
    version: int | None = None
    why: str = ""


@dataclass(frozen=True)
class Templated:
    """`template`'s result: the new default version, where its data comes from, the group if asked."""

    version: TemplateVersion
    source: Source
    group: Group | None = field(default=None)


# ---------------------------------------------------------------- templates


def put_template(ec2: EC2, role: Role, request: TemplateRequest) -> tuple[TemplateVersion, Source]:
    """Add a version to the launch template of ``role`` in ``request.env`` (made if missing), make it default.

    Returns the version and the snapshot its data device maps. Raises like
    :func:`builder.launch.current_image` and :func:`builder.launch.choose_source`, CloudError.
    """
    image = current_image(ec2, role.name)
    source = choose_source(
        ec2, role.name, image, request.choice, request.source_env, allow_other_role=request.allow_other_role
    )
    check_volume_size(ec2, source.snapshot_id, request.volume_size)
    options = RestoreOptions(
        env=request.env,
        instance_type=request.instance_type,
        key_name=request.key_name,
        security_group_ids=request.security_group_ids,
        delete_data_on_termination=not request.keep_volumes,
        volume_size=request.volume_size,
    )
    data = resources.template_data(restore_spec(role, image, source, options))
    description = f"{role.name} {image.image_id} data from {source.snapshot_id} ({source.kind} {source.date})"
    return add_version(ec2, role.name, request.env, data, description), source


def find_template(ec2: EC2, name: str) -> dict[str, Any] | None:
    """Return the launch template named ``name``, or None."""
    try:
        found = ec2.call("describe_launch_templates", LaunchTemplateNames=[name])["LaunchTemplates"]
    except CloudError as exc:
        if exc.code in NOT_FOUND:
            return None
        raise
    return dict(found[0]) if found else None


def add_version(ec2: EC2, role: str, env: str, data: dict[str, Any], description: str) -> TemplateVersion:
    """Add ``data`` as the newest version of the role's template (made with it if missing) and make it default."""
    name = tags.template_name(role, env)
    existing = find_template(ec2, name)
    snapshot_id = data_snapshot(data)
    if existing is None:
        made = ec2.call(
            "create_launch_template",
            LaunchTemplateName=name,
            VersionDescription=description[:255],
            LaunchTemplateData=data,
            TagSpecifications=tags.tag_specs("launch-template", tags.launch_template(role, env)),
        )["LaunchTemplate"]
        log.info("%s: launch template %s made, version 1: %s", role, made["LaunchTemplateId"], description)
        return TemplateVersion(name, made["LaunchTemplateId"], 1, data["ImageId"], snapshot_id, created=True)
    template_id = str(existing["LaunchTemplateId"])
    version = ec2.call(
        "create_launch_template_version",
        LaunchTemplateId=template_id,
        VersionDescription=description[:255],
        LaunchTemplateData=data,
    )["LaunchTemplateVersion"]["VersionNumber"]
    ec2.call("modify_launch_template", LaunchTemplateId=template_id, DefaultVersion=str(version))
    log.info("%s: launch template %s version %s is the default: %s", role, template_id, version, description)
    return TemplateVersion(name, template_id, int(version), data["ImageId"], snapshot_id)


def data_snapshot(data: dict[str, Any]) -> str:
    """Return the snapshot the data device of LaunchTemplateData maps ("" when none does)."""
    return next(
        (
            str(m["Ebs"]["SnapshotId"])
            for m in data.get("BlockDeviceMappings") or []
            if m.get("Ebs", {}).get("SnapshotId")
        ),
        "",
    )


def default_data(ec2: EC2, template_id: str) -> dict[str, Any]:
    """Return the LaunchTemplateData of the template's default version."""
    versions = ec2.call("describe_launch_template_versions", LaunchTemplateId=template_id, Versions=[DEFAULT_VERSION])
    return dict(versions["LaunchTemplateVersions"][0]["LaunchTemplateData"])


def with_snapshot(data: dict[str, Any], snapshot_id: str) -> dict[str, Any]:
    """Return ``data`` whose data device maps ``snapshot_id``, its tags saying so (restored-from)."""
    mappings = [
        {**m, "Ebs": {**m["Ebs"], "SnapshotId": snapshot_id}} if m.get("Ebs", {}).get("SnapshotId") else m
        for m in data.get("BlockDeviceMappings") or []
    ]
    specs = [
        {**s, "Tags": [{**t, "Value": snapshot_id} if t["Key"] == tags.RESTORED_FROM else t for t in s.get("Tags", [])]}
        for s in data.get("TagSpecifications") or []
    ]
    return {**data, "BlockDeviceMappings": mappings, "TagSpecifications": specs}


# ---------------------------------------------------------------- after a night's snapshots


def update_templates(
    ec2: EC2, instances: Sequence[RoleInstance], results: Sequence[SnapshotResult], timeout: float
) -> list[TemplateUpdate]:
    """Make each role's and env's template default to that night's newest snapshot, once it is completed.

    ``results`` are the night's (``snapshot_instances``); a role/env without a template is
    left alone (``unchanged``); one whose snapshot is not completed within ``timeout`` s (or
    ended in error) is ``skipped`` with the reason: its template keeps its older data.
    """
    env_of = {i.instance_id: i.env for i in instances}
    tonight: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.snapshot_id and r.result in ("created", "exists"):
            tonight.setdefault((r.role, env_of.get(r.instance_id, "")), []).append(r.snapshot_id)
    return [_update_one(ec2, role, env, ids, timeout) for (role, env), ids in sorted(tonight.items())]


def _update_one(ec2: EC2, role: str, env: str, snapshot_ids: list[str], timeout: float) -> TemplateUpdate:
    name = tags.template_name(role, env)
    template = find_template(ec2, name)
    if template is None:
        return TemplateUpdate(role, env, name, None, "unchanged", why=f"no launch template {name}")
    ranked = [s["id"] for s in nightly_snapshots(ec2, role=role, env=env) if s["id"] in snapshot_ids]
    newest = ranked[0] if ranked else snapshot_ids[-1]
    try:
        ec2.wait_for(
            f"snapshot {newest}",
            lambda: ec2.snapshot_states([newest])[0],
            "completed",
            timeout=timeout,
            failed=("error",),
            kind="snapshots-completed",
        )
    except CloudError as exc:
        why = f"{newest} not completed: {exc.message}; the template keeps its older data"
        log.warning("%s: %s", name, why)
        return TemplateUpdate(role, env, name, newest, "skipped", why=why)
    data = default_data(ec2, str(template["LaunchTemplateId"]))
    if data_snapshot(data) == newest:
        return TemplateUpdate(role, env, name, newest, "unchanged", why="already its data source")
    done = add_version(ec2, role, env, with_snapshot(data, newest), f"{role} nightly {newest}")
    return TemplateUpdate(role, env, name, newest, "updated", done.version)


# ---------------------------------------------------------------- Auto Scaling


def existing_group(ec2: EC2, role: str, env: str, request: GroupRequest) -> dict[str, Any] | None:
    """Return the group ``request`` names (None when there is none yet), checked before anything changes.

    A group not made by `template` on this role's and env's template (its ``ebsrole:template``
    tag) is refused (CloudError); creating one needs --min and --max (InvalidInput).
    """
    found = ec2.autoscaling_call("describe_auto_scaling_groups", AutoScalingGroupNames=[request.name])
    existing: dict[str, Any] | None = (found.get("AutoScalingGroups") or [None])[0]
    if existing is not None:
        _refuse_foreign(existing, request.name, tags.template_name(role, env))
    elif request.min_size is None or request.max_size is None:
        raise InvalidInput(f"--asg {request.name}: no such group yet; creating it needs --min and --max")
    return existing


def put_group(
    ec2: EC2, role: str, env: str, template: TemplateVersion, request: GroupRequest, *, existing: dict[str, Any] | None
) -> Group:
    """Create (``existing`` None) or update the group ``request.name`` on ``template``'s default version.

    ``existing`` comes from :func:`existing_group`. With ``request.refresh`` an instance
    refresh starts (its id is returned). Raises CloudError.
    """
    lt = {"LaunchTemplateName": template.name, "Version": DEFAULT_VERSION}
    sizes = {"MinSize": request.min_size, "MaxSize": request.max_size, "DesiredCapacity": request.desired}
    given = {k: v for k, v in sizes.items() if v is not None}
    where: dict[str, Any] = {"VPCZoneIdentifier": ",".join(request.subnets)} if request.subnets else {}
    if existing is None:
        where = where or {"AvailabilityZones": zones(ec2)}
        group_tags = [
            {"Key": k, "Value": v, "PropagateAtLaunch": False}
            for k, v in tags.autoscaling_group(role, env, template.name).items()
        ]
        ec2.autoscaling_call(
            "create_auto_scaling_group",
            AutoScalingGroupName=request.name,
            LaunchTemplate=lt,
            Tags=group_tags,
            **given,
            **where,
        )
        done = "created"
    else:
        ec2.autoscaling_call(
            "update_auto_scaling_group", AutoScalingGroupName=request.name, LaunchTemplate=lt, **given, **where
        )
        done = "updated"
    refresh_id = None
    if request.refresh:
        refresh_id = str(
            ec2.autoscaling_call("start_instance_refresh", AutoScalingGroupName=request.name)["InstanceRefreshId"]
        )
    now = ec2.autoscaling_call("describe_auto_scaling_groups", AutoScalingGroupNames=[request.name])[
        "AutoScalingGroups"
    ][0]
    log.info("%s: Auto Scaling group %s %s on %s %s", role, request.name, done, template.name, DEFAULT_VERSION)
    return Group(
        request.name, done, DEFAULT_VERSION, now["MinSize"], now["MaxSize"], now["DesiredCapacity"], refresh_id
    )


def _refuse_foreign(group: dict[str, Any], name: str, template: str) -> None:
    reads = {t["Key"]: t["Value"] for t in group.get("Tags") or []}.get(tags.TEMPLATE)
    if reads != template:
        whose = (
            f"it reads launch template {reads}" if reads else f"it has no {tags.TEMPLATE} tag: not made by `template`"
        )
        raise CloudError(
            "autoscaling update_auto_scaling_group",
            "NotOurs",
            f"Auto Scaling group {name} is left as it is: {whose}",
            hint="name another --asg, or point that group at the template yourself",
        )

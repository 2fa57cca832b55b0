"""The tool's tag schema: every ``ebsrole:*`` key, kind and status, their builders and one parser.

The tags are the tool's database: sweep, the registry, backups, restore and prune find
what the tool made by them alone, so their keys and values never change. Each resource
family has one builder here (a build's temporary resources, its artefacts, nightly
snapshots, launched instances and their data volumes, drills, copies), ``created-by`` is
written in one place, and :func:`parse` turns a described resource's tags into a
:class:`TagView`. ``tag_list`` and ``tag_specs`` give EC2's payload shapes.

This module imports nothing from the package but its version.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from builder import __version__

PREFIX: Final = "ebsrole:"
TOOL: Final = "ebsrole"
# created-at's format (UTC), as EC2 tags carry it.
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
# The externalized paths are split over paths, paths-2, ... of this many characters each
# (roles.tool_tag_count counts these chunks: the AMI stays within EC2's 50 tags).
PATHS_CHUNK: Final = 250


def tag(key: str) -> str:
    """Return the full tag key for one of the tool's tags (``role`` -> ``ebsrole:role``)."""
    return PREFIX + key


# ---------------------------------------------------------------- keys
NAME: Final = "Name"  # EC2's display name, not one of the tool's keys
BUILD_ID: Final = "ebsrole:build-id"  # a build's or a drill's id: every temporary resource has it
ROLE: Final = "ebsrole:role"
KIND: Final = "ebsrole:kind"
CREATED_BY: Final = "ebsrole:created-by"  # "ebsrole <version>": what made it
CREATED_AT: Final = "ebsrole:created-at"
TEMPORARY: Final = "ebsrole:temporary"  # "true" | "false"
STATUS: Final = "ebsrole:status"  # of an artefact: pending | complete
ENV: Final = "ebsrole:env"
BASE_AMI: Final = "ebsrole:base-ami"
FINGERPRINT: Final = "ebsrole:fingerprint"
MOUNT_POINT: Final = "ebsrole:mount-point"
DEVICE: Final = "ebsrole:device"
PATHS: Final = "ebsrole:paths"  # then ebsrole:paths-2, ebsrole:paths-3, ...
SEED_SNAPSHOT: Final = "ebsrole:seed-snapshot"
ROOT_SNAPSHOT: Final = "ebsrole:root-snapshot"
AMI: Final = "ebsrole:ami"  # on a build's snapshots and AMI: the AMI they belong to (on an AMI, itself)
COPIED_FROM: Final = "ebsrole:copied-from"  # "<region>/<ami>"
DATE: Final = "ebsrole:date"
SOURCE_INSTANCE: Final = "ebsrole:source-instance"
SOURCE_VOLUME: Final = "ebsrole:source-volume"
SOURCE_AZ: Final = "ebsrole:source-az"
MARKER: Final = "ebsrole:marker"
SCHEDULED_BY: Final = "ebsrole:scheduled-by"
RESTORED_FROM: Final = "ebsrole:restored-from"
DATA_OF: Final = "ebsrole:data-of"
BACKUP_TARGET: Final = "ebsrole:backup-target"
TEMPLATE: Final = "ebsrole:template"  # on an Auto Scaling group: the launch template it reads

# ---------------------------------------------------------------- kinds (values of ebsrole:kind)
KIND_IMAGE: Final = "image"
KIND_ROOT_SNAPSHOT: Final = "root-snapshot"
KIND_SEED_SNAPSHOT: Final = "seed-snapshot"
KIND_KEY_PAIR: Final = "key-pair"  # what older builds tagged their imported login key with
KIND_SECURITY_GROUP: Final = "security-group"
KIND_BUILDER: Final = "builder"
KIND_BUILDER_VOLUME: Final = "builder-volume"
KIND_BUILDER_ROOT: Final = "builder-root"  # what older builds tagged the builder's root with
KIND_NIGHTLY: Final = "nightly"
KIND_INSTANCE: Final = "instance"
KIND_VOLUME: Final = "volume"
KIND_DATA_VOLUME: Final = "data-volume"
KIND_DRILL: Final = "drill"
KIND_LAUNCH_TEMPLATE: Final = "launch-template"
KIND_AUTOSCALING_GROUP: Final = "autoscaling-group"
# The kinds of volume that hold a role's data (launch, drills), and a builder's volumes.
DATA_VOLUMES: Final = (KIND_VOLUME, KIND_DATA_VOLUME)
BUILDER_VOLUMES: Final = (KIND_BUILDER_VOLUME, KIND_BUILDER_ROOT)
# The kinds of snapshot a restore may start from.
RESTORABLE: Final = (KIND_NIGHTLY, KIND_SEED_SNAPSHOT)

# ---------------------------------------------------------------- statuses (values of ebsrole:status)
STATUS_PENDING: Final = "pending"
STATUS_COMPLETE: Final = "complete"


def created_by() -> dict[str, str]:
    """Return the created-by tag: the one place that says a resource is the tool's."""
    return {CREATED_BY: f"{TOOL} {__version__}"}


def now() -> str:
    """Return the current UTC time as created-at carries it."""
    return time.strftime(TIME_FORMAT, time.gmtime())


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """Return EC2's Key/Value list for a mapping."""
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tag_specs(resource_type: str, tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Return a TagSpecifications entry (tags applied at creation)."""
    return [{"ResourceType": resource_type, "Tags": tag_list(tags)}]


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """Return a described resource's tags as a mapping."""
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or []}


# ---------------------------------------------------------------- builds


@dataclass(frozen=True)
class BuildStamp:
    """What every resource of one build carries: its id, role, start time and the role's own tags."""

    build_id: str
    role: str
    created_at: str
    role_tags: Mapping[str, str] = field(default_factory=dict)

    def _base(self, kind: str, temporary: bool) -> dict[str, str]:
        return {
            **self.role_tags,
            BUILD_ID: self.build_id,
            ROLE: self.role,
            KIND: kind,
            **created_by(),
            CREATED_AT: self.created_at,
            TEMPORARY: "true" if temporary else "false",
        }

    def temporary(self, kind: str) -> dict[str, str]:
        """Return the tags of a build's temporary resource (builder, its volumes, key pair, group)."""
        return self._base(kind, True)

    def artefact(self, kind: str, status: str, facts: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the tags of a build's artefact (AMI, snapshots) with ``status`` and ``facts`` (full keys)."""
        return {**self._base(kind, False), STATUS: status, **(facts or {})}


def image_facts(base_ami: str, fingerprint: str, mount_point: str, device: str, paths: Sequence[str]) -> dict[str, str]:
    """Return what a role AMI says about itself: base AMI, fingerprint, volume and paths (chunked)."""
    facts = {BASE_AMI: base_ami, FINGERPRINT: fingerprint, MOUNT_POINT: mount_point, DEVICE: device}
    joined = " ".join(paths)
    chunks = [joined[i : i + PATHS_CHUNK] for i in range(0, len(joined), PATHS_CHUNK)] or [""]
    for index, chunk in enumerate(chunks):
        facts[PATHS if index == 0 else tag(f"paths-{index + 1}")] = chunk
    return facts


def pairing(seed_snapshot: str, root_snapshot: str) -> dict[str, str]:
    """Return the tags by which a role AMI names its snapshots."""
    return {SEED_SNAPSHOT: seed_snapshot, ROOT_SNAPSHOT: root_snapshot}


def artefacts_done(ami: str) -> dict[str, str]:
    """Return the tags a build's AMI and both its snapshots get, in one call, once the AMI is available.

    The AMI they belong to, and status complete: all three become complete at once, never a
    half-paired AMI. (The AMI names its snapshots from its creation.)
    """
    return {AMI: ami, STATUS: STATUS_COMPLETE}


# ---------------------------------------------------------------- copies


def copied_image(source: Mapping[str, str], origin: str, seed: str, root: str, ami: str) -> dict[str, str]:
    """Return a copied AMI's tags: the source's, where it came from (``region/ami``), its new snapshots, itself."""
    return {**source, COPIED_FROM: origin, **pairing(seed, root), AMI: ami}


def copied_snapshot(source: Mapping[str, str], origin: str, kind: str, ami: str) -> dict[str, str]:
    """Return a copied AMI's snapshot's tags: the source AMI's (not its pairing nor Name), origin, kind, AMI."""
    kept = {k: v for k, v in source.items() if k not in (SEED_SNAPSHOT, ROOT_SNAPSHOT, NAME)}
    return {**kept, COPIED_FROM: origin, KIND: kind, AMI: ami}


# ---------------------------------------------------------------- backups


@dataclass(frozen=True)
class Nightly:
    """What a nightly snapshot records about its source."""

    role: str
    env: str
    date: str  # ISO date
    instance_id: str
    volume_id: str
    az: str
    device: str
    marker: str | None = None


def nightly_snapshot(n: Nightly) -> dict[str, str]:
    """Return the tags of a nightly snapshot the tool takes (``snapshot``)."""
    tags = {
        NAME: f"{n.role}{'-' + n.env if n.env else ''} nightly {n.date}",
        ROLE: n.role,
        KIND: KIND_NIGHTLY,
        DATE: n.date,
        SOURCE_INSTANCE: n.instance_id,
        SOURCE_VOLUME: n.volume_id,
        SOURCE_AZ: n.az,
        ENV: n.env,
        DEVICE: n.device,
        **created_by(),
    }
    if n.marker:
        tags[MARKER] = n.marker
    return tags


def dlm_snapshot(role: str, env: str) -> dict[str, str]:
    """Return the tags a DLM policy puts on the nightly snapshots it takes."""
    return {ROLE: role, KIND: KIND_NIGHTLY, ENV: env, SCHEDULED_BY: "dlm", **created_by()}


def dlm_policy(role: str, env: str) -> dict[str, str]:
    """Return the tags of a role's DLM policy in ``env`` (how `schedule --apply` finds it again)."""
    return {ROLE: role, ENV: env, **created_by()}


def parameter(role: str, env: str) -> dict[str, str]:
    """Return the tags of an SSM parameter the tool publishes (``builder.publish``)."""
    return {ROLE: role, **({ENV: env} if env else {}), **created_by()}


def backup_target(role: str, env: str) -> str:
    """Return the ``ebsrole:backup-target`` value of the data volumes of ``role`` in ``env``."""
    return f"{role}@{env}" if env else role


# ---------------------------------------------------------------- launched instances and drills


def launched(name: str, role: str, env: str, restored_from: str) -> dict[str, str]:
    """Return the tags a launched instance and its volumes share (then each adds its kind)."""
    return {NAME: name, ROLE: role, ENV: env, RESTORED_FROM: restored_from, **created_by()}


def data_volume(role: str, env: str) -> dict[str, str]:
    """Return the tags a launched instance's data volume gets: the target of `schedule` and `snapshot`."""
    return {DATA_OF: role, KIND: KIND_DATA_VOLUME, BACKUP_TARGET: backup_target(role, env)}


def template_name(role: str, env: str) -> str:
    """Return the name of the one launch template of ``role`` in ``env`` (``ebsrole-web-prod``)."""
    return f"{TOOL}-{role}-{env}" if env else f"{TOOL}-{role}"


def launch_template(role: str, env: str) -> dict[str, str]:
    """Return the tags of the launch template of ``role`` in ``env`` (how `template` and `snapshot` find it)."""
    return {NAME: template_name(role, env), ROLE: role, ENV: env, KIND: KIND_LAUNCH_TEMPLATE, **created_by()}


def autoscaling_group(role: str, env: str, template: str) -> dict[str, str]:
    """Return the tags of an Auto Scaling group `template --asg` made on ``template`` (not propagated)."""
    return {ROLE: role, ENV: env, KIND: KIND_AUTOSCALING_GROUP, TEMPLATE: template, **created_by()}


def drill(drill_id: str, role: str, created_at: str | None = None) -> dict[str, str]:
    """Return the tags of every temporary resource of a drill: what `sweep` needs to find them after a kill."""
    return {
        BUILD_ID: drill_id,
        TEMPORARY: "true",
        ROLE: role,
        **created_by(),
        CREATED_AT: created_at or now(),
    }


def with_kind(tags: Mapping[str, str], kind: str) -> dict[str, str]:
    """Return ``tags`` with ``kind`` as the kind."""
    return {**tags, KIND: kind}


# ---------------------------------------------------------------- the parser


@dataclass(frozen=True)
class TagView:
    """A described resource's tags, typed: '' for a tag it does not carry (marker: None)."""

    all: Mapping[str, str]
    build_id: str = ""
    role: str = ""
    kind: str = ""
    env: str = ""
    status: str = ""
    temporary: bool = False
    created_by: str = ""
    created_at: str = ""
    date: str = ""
    source_volume: str = ""
    source_az: str = ""
    marker: str | None = None
    restored_from: str = ""
    fingerprint: str = ""
    base_ami: str = ""
    seed_snapshot: str = ""
    root_snapshot: str = ""
    mount_point: str = ""
    device: str = ""
    paths: tuple[str, ...] = ()

    @property
    def by_tool(self) -> bool:
        """Return whether created-by names this tool."""
        return self.created_by.split(" ")[0] == TOOL


def view(tags: Mapping[str, str]) -> TagView:
    """Return the typed view of a tag mapping."""
    return TagView(
        all=dict(tags),
        build_id=tags.get(BUILD_ID, ""),
        role=tags.get(ROLE, ""),
        kind=tags.get(KIND, ""),
        env=tags.get(ENV, ""),
        status=tags.get(STATUS, ""),
        temporary=tags.get(TEMPORARY) == "true",
        created_by=tags.get(CREATED_BY, ""),
        created_at=tags.get(CREATED_AT, ""),
        date=tags.get(DATE, ""),
        source_volume=tags.get(SOURCE_VOLUME, ""),
        source_az=tags.get(SOURCE_AZ, ""),
        marker=tags.get(MARKER),
        restored_from=tags.get(RESTORED_FROM, ""),
        fingerprint=tags.get(FINGERPRINT, ""),
        base_ami=tags.get(BASE_AMI, ""),
        seed_snapshot=tags.get(SEED_SNAPSHOT, ""),
        root_snapshot=tags.get(ROOT_SNAPSHOT, ""),
        mount_point=tags.get(MOUNT_POINT, ""),
        device=tags.get(DEVICE, ""),
        paths=_paths(tags),
    )


def parse(resource: Mapping[str, Any]) -> TagView:
    """Return the typed view of a described resource's tags (its ``Tags`` list)."""
    return view(tags_of(resource))


def _paths(tags: Mapping[str, str]) -> tuple[str, ...]:
    chunks, n = [tags.get(PATHS, "")], 2
    while tag(f"paths-{n}") in tags:
        chunks.append(tags[tag(f"paths-{n}")])
        n += 1
    return tuple("".join(chunks).split())

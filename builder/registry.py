"""What the tool has registered in a region: role AMIs by fingerprint, by role, and their age.

Every question here costs a fixed number of EC2 calls, however many roles ask it: the
base AMIs of all roles are resolved in one DescribeImages (plus one for pinned ids), and
the role AMIs are found by tag in one more (per 200 fingerprints).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from builder.ec2 import EC2, CloudError, Image, image_from, tag, tags_of
from builder.fingerprint import Fingerprint, fingerprint, template_sources
from builder.roles import Role

FILTER_VALUES = 200  # values one EC2 filter takes at most


@dataclass(frozen=True)
class RoleImage:
    """A role AMI made by the tool, as its tags describe it."""

    image_id: str
    role: str
    name: str
    created: str
    fingerprint: str
    build_id: str
    base_ami: str
    seed_snapshot: str
    root_snapshot: str
    mount_point: str
    device: str
    paths: tuple[str, ...]
    snapshots: tuple[str, ...]  # every snapshot its block-device mapping names

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> RoleImage:
        tags = tags_of(raw)
        chunks = [tags.get(tag("paths"), "")]
        n = 2
        while tag(f"paths-{n}") in tags:
            chunks.append(tags[tag(f"paths-{n}")])
            n += 1
        return cls(
            image_id=str(raw["ImageId"]),
            role=tags.get(tag("role"), ""),
            name=str(raw.get("Name", "")),
            created=str(raw.get("CreationDate", "")),
            fingerprint=tags.get(tag("fingerprint"), ""),
            build_id=tags.get(tag("build-id"), ""),
            base_ami=tags.get(tag("base-ami"), ""),
            seed_snapshot=tags.get(tag("seed-snapshot"), ""),
            root_snapshot=tags.get(tag("root-snapshot"), ""),
            mount_point=tags.get(tag("mount-point"), ""),
            device=tags.get(tag("device"), ""),
            paths=tuple("".join(chunks).split()),
            snapshots=tuple(
                m["Ebs"]["SnapshotId"]
                for m in raw.get("BlockDeviceMappings") or []
                if m.get("Ebs", {}).get("SnapshotId")
            ),
        )


def resolve_bases(ec2: EC2, roles: Sequence[Role]) -> dict[str, Image]:
    """Return each role's base AMI (pinned, or the newest match), in at most two calls."""
    found: dict[str, Image] = {}
    pinned = {r.name: r.base.ami for r in roles if r.base.ami}
    if pinned:
        raw = ec2.call("describe_images", ImageIds=sorted(set(pinned.values())))["Images"]
        by_id = {i["ImageId"]: i for i in raw}
        for name, ami in pinned.items():
            if ami not in by_id:
                raise CloudError(
                    "describe_images", "InvalidAMIID.NotFound", f"role {name}: no AMI {ami} in {ec2.region}"
                )
            found[name] = image_from(by_id[ami])
    searched = [r for r in roles if not r.base.ami]
    if searched:
        raw = ec2.call(
            "describe_images",
            Owners=sorted({r.base.owner for r in searched}),
            Filters=[
                {"Name": "name", "Values": sorted({r.base.name_pattern for r in searched})},
                {"Name": "architecture", "Values": sorted({r.base.ec2_architecture for r in searched})},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
        for role in searched:
            base = role.base
            matches = [
                i
                for i in raw
                if i.get("OwnerId") == base.owner
                and i.get("Architecture") == base.ec2_architecture
                and fnmatch.fnmatchcase(str(i.get("Name", "")), base.name_pattern)
            ]
            if not matches:
                raise CloudError(
                    "describe_images",
                    "NoMatchingImage",
                    f"role {role.name}: no available {base.ec2_architecture} AMI of owner {base.owner} "
                    f"named {base.name_pattern!r} in {ec2.region}",
                    hint="check base.owner / base.name in the role, or pin base.ami",
                )
            found[role.name] = image_from(max(matches, key=lambda i: (i.get("CreationDate", ""), i.get("Name", ""))))
    return found


def fingerprints(ec2: EC2, roles: Sequence[Role]) -> dict[str, Fingerprint]:
    """Return each role's fingerprint on its current base AMI."""
    bases = resolve_bases(ec2, roles)
    sources = template_sources()
    return {r.name: fingerprint(r, bases[r.name].image_id, sources=sources) for r in roles}


def role_images(
    ec2: EC2, *, roles: Iterable[str] | None = None, values: Iterable[str] | None = None
) -> list[RoleImage]:
    """Return the tool's complete, available role AMIs (of ``roles``, or with fingerprints ``values``)."""
    base_filters = [
        {"Name": f"tag:{tag('status')}", "Values": ["complete"]},
        {"Name": f"tag:{tag('kind')}", "Values": ["image"]},
        {"Name": "state", "Values": ["available"]},
    ]
    key, wanted = (
        (tag("fingerprint"), sorted(set(values)))
        if values is not None
        else (tag("role"), sorted(set(roles)))
        if roles is not None
        else (None, [])
    )
    if key is None:
        raw = ec2.call("describe_images", Owners=["self"], Filters=base_filters)["Images"]
    else:
        raw = []
        for start in range(0, len(wanted), FILTER_VALUES):
            chunk = wanted[start : start + FILTER_VALUES]
            filters = [*base_filters, {"Name": f"tag:{key}", "Values": chunk}]
            raw += ec2.call("describe_images", Owners=["self"], Filters=filters)["Images"]
    images = [RoleImage.of(i) for i in raw]
    return sorted(images, key=lambda i: (i.created, i.build_id), reverse=True)


@dataclass(frozen=True)
class Change:
    """A role, its current fingerprint, and the AMI already built from it (if any)."""

    role: str
    fingerprint: Fingerprint
    image: RoleImage | None

    @property
    def changed(self) -> bool:
        return self.image is None


def changes(ec2: EC2, roles: Sequence[Role]) -> list[Change]:
    """Return, for each role, whether an AMI of its current fingerprint exists."""
    current = fingerprints(ec2, roles)
    built: dict[str, RoleImage] = {}
    if current:
        for image in role_images(ec2, values=[f.value for f in current.values()]):
            built.setdefault(image.fingerprint, image)  # newest first
    return [Change(r.name, current[r.name], built.get(current[r.name].value)) for r in roles]


@dataclass(frozen=True)
class Pruned:
    """What prune did (or would do) with one AMI of the role."""

    image_id: str
    created: str
    fate: str  # kept | in use | deregistered | would deregister
    detail: str
    snapshots_deleted: tuple[str, ...] = ()


IN_USE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


def prune(ec2: EC2, role: str, keep: int, *, dry_run: bool = False) -> list[Pruned]:
    """Deregister ``role``'s AMIs but the newest ``keep`` and delete their snapshots.

    An AMI an instance still runs from (or is stopped with) is kept, and so is any
    snapshot another remaining AMI of the tool names.
    """
    images = role_images(ec2, roles=[role])  # newest first
    older = images[keep:]
    used: dict[str, str] = {}
    if older:
        reservations = ec2.call(
            "describe_instances",
            Filters=[
                {"Name": "image-id", "Values": [i.image_id for i in older]},
                {"Name": "instance-state-name", "Values": list(IN_USE_STATES)},
            ],
        )["Reservations"]
        for instance in (i for r in reservations for i in r["Instances"]):
            used.setdefault(instance["ImageId"], instance["InstanceId"])
    going = [i for i in older if i.image_id not in used]
    going_ids = {i.image_id for i in going}
    staying = {s for i in role_images(ec2) if i.image_id not in going_ids for s in i.snapshots}
    rows = [Pruned(i.image_id, i.created, "kept", f"one of the newest {keep}") for i in images[:keep]]
    for image in older:
        if image.image_id in used:
            rows.append(
                Pruned(image.image_id, image.created, "in use", f"instance {used[image.image_id]} runs from it")
            )
            continue
        snapshots = tuple(s for s in image.snapshots if s not in staying)
        if dry_run:
            rows.append(Pruned(image.image_id, image.created, "would deregister", "", snapshots))
            continue
        ec2.call("deregister_image", ImageId=image.image_id)
        for snapshot_id in snapshots:
            ec2.call("delete_snapshot", SnapshotId=snapshot_id)
        rows.append(Pruned(image.image_id, image.created, "deregistered", "", snapshots))
    return rows


@dataclass(frozen=True)
class Registered:
    """A role and its current AMI (or an AMI whose role file is gone), for audit --registered."""

    role: str
    file: str | None
    ami: str | None
    created: str | None
    fingerprint: str | None
    current_fingerprint: str | None
    drift: str  # none | role changed | base changed | no AMI | role file gone
    base_ami: str | None
    mount_point: str | None
    device: str | None
    paths: tuple[str, ...]


def registered(ec2: EC2, roles: Sequence[Role]) -> list[Registered]:
    """Return each role's current AMI with its drift, then the AMIs whose role file is gone.

    The paths, mount point and device come from the AMI's own tags (what it was built
    with), not from today's role file.
    """
    images = role_images(ec2)  # newest first
    current: dict[str, RoleImage] = {}
    for found in images:
        current.setdefault(found.role, found)
    now = fingerprints(ec2, roles) if roles else {}
    out = []
    for role in roles:
        image = current.get(role.name)
        value = now[role.name].value
        if image is None:
            drift = "no AMI"
        elif image.fingerprint == value:
            drift = "none"
        elif image.base_ami and fingerprint(role, image.base_ami).value == image.fingerprint:
            drift = "base changed"  # the role is as built; a newer base AMI is out
        else:
            drift = "role changed"
        out.append(_registered(role.name, role.file, image, value, drift))
    names = {r.name for r in roles}
    out += [_registered(i.role, None, i, None, "role file gone") for i in images if i.role not in names]
    return out


def _registered(role: str, file: str | None, image: RoleImage | None, now: str | None, drift: str) -> Registered:
    return Registered(
        role=role,
        file=file,
        ami=image.image_id if image else None,
        created=image.created if image else None,
        fingerprint=image.fingerprint if image else None,
        current_fingerprint=now,
        drift=drift,
        base_ami=image.base_ami if image else None,
        mount_point=image.mount_point if image else None,
        device=image.device if image else None,
        paths=image.paths if image else (),
    )

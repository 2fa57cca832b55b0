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

from builder import tags
from builder.aws import resources
from builder.aws.ec2 import EC2, Image, image_from
from builder.errors import CloudError
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
    protected: bool = False  # deregistration protection is on

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> RoleImage:
        seen = tags.parse(raw)
        return cls(
            image_id=str(raw["ImageId"]),
            role=seen.role,
            name=str(raw.get("Name", "")),
            created=str(raw.get("CreationDate", "")),
            fingerprint=seen.fingerprint,
            build_id=seen.build_id,
            base_ami=seen.base_ami,
            seed_snapshot=seen.seed_snapshot,
            root_snapshot=seen.root_snapshot,
            mount_point=seen.mount_point,
            device=seen.device,
            paths=seen.paths,
            snapshots=tuple(
                m["Ebs"]["SnapshotId"]
                for m in raw.get("BlockDeviceMappings") or []
                if m.get("Ebs", {}).get("SnapshotId")
            ),
            protected=str(raw.get("DeregistrationProtection") or "").startswith("enabled"),
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
        {"Name": f"tag:{tags.STATUS}", "Values": [tags.STATUS_COMPLETE]},
        {"Name": f"tag:{tags.KIND}", "Values": [tags.KIND_IMAGE]},
        {"Name": "state", "Values": ["available"]},
    ]
    key, wanted = (
        (tags.FINGERPRINT, sorted(set(values)))
        if values is not None
        else (tags.ROLE, sorted(set(roles)))
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
    fate: str  # kept | in use | shared | deregistered | would deregister
    detail: str
    snapshots_deleted: tuple[str, ...] = ()


IN_USE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
SSM_PATH = "/ebsrole/"  # where the tool's SSM parameters live (e.g. /ebsrole/<role>/<env>/ami)
RESOLVE_SSM = "resolve:ssm:"  # a launch template's ImageId that names an SSM parameter
SSM_NAMES = 10  # names one GetParameters takes at most


def prune(
    ec2: EC2, role: str, keep: int, *, dry_run: bool = False, include_shared: bool = False, check_ssm: bool = True
) -> list[Pruned]:
    """Deregister ``role``'s AMIs but the newest ``keep`` and delete their snapshots.

    Spared, with their reasons: an AMI an instance not yet terminated was launched from,
    one that any launch template version names (directly or through ``resolve:ssm:``),
    one an SSM parameter under /ebsrole/ holds, and (unless ``include_shared``) one shared
    with other accounts or public; and one with deregistration protection on. Any snapshot
    another remaining AMI of the tool names is kept. Raises CloudError, before deleting
    anything, when SSM cannot be read (unless ``check_ssm`` is False).
    """
    images = role_images(ec2, roles=[role])  # newest first
    older = images[keep:]
    ids = [i.image_id for i in older]
    used = references(ec2, ids, check_ssm=check_ssm) if older else {}
    shared = {} if include_shared or not older else shared_images(ec2, [i for i in ids if i not in used])
    # EC2 refuses to deregister a protected AMI: spare it, with the reason.
    protected = {i.image_id: ["deregistration protection is on"] for i in older if i.protected}
    shared.update({k: v for k, v in protected.items() if k not in used})
    going = [i for i in older if i.image_id not in used and i.image_id not in shared]
    going_ids = {i.image_id for i in going}
    staying = {s for i in role_images(ec2) if i.image_id not in going_ids for s in i.snapshots}
    rows = [Pruned(i.image_id, i.created, "kept", f"one of the newest {keep}") for i in images[:keep]]
    for image in older:
        if image.image_id in used or image.image_id in shared:
            fate = "in use" if image.image_id in used else "protected" if image.image_id in protected else "shared"
            reasons = used.get(image.image_id) or shared[image.image_id]
            rows.append(Pruned(image.image_id, image.created, fate, "; ".join(reasons)))
            continue
        snapshots = tuple(s for s in image.snapshots if s not in staying)
        if dry_run:
            rows.append(Pruned(image.image_id, image.created, "would deregister", "", snapshots))
            continue
        resources.remove(ec2, "images", image.image_id)
        for snapshot_id in snapshots:
            resources.remove(ec2, "snapshots", snapshot_id)
        rows.append(Pruned(image.image_id, image.created, "deregistered", "", snapshots))
    return rows


def references(ec2: EC2, image_ids: Sequence[str], *, check_ssm: bool = True) -> dict[str, list[str]]:
    """Return, for each of ``image_ids`` something refers to, what does.

    Looks at instances not yet terminated, every version of every launch template, and
    (with ``check_ssm``) the tool's SSM parameters. Raises CloudError when SSM cannot
    be read: a reference that cannot be checked must not be taken for none.
    """
    wanted = set(image_ids)
    found: dict[str, list[str]] = {}
    reservations = ec2.call(
        "describe_instances",
        Filters=[
            {"Name": "image-id", "Values": sorted(wanted)},
            {"Name": "instance-state-name", "Values": list(IN_USE_STATES)},
        ],
    )["Reservations"]
    for instance in (i for r in reservations for i in r["Instances"]):
        found.setdefault(instance["ImageId"], []).append(
            f"instance {instance['InstanceId']} runs from it"
            if instance["State"]["Name"] != "stopped"
            else f"instance {instance['InstanceId']} (stopped) was launched from it"
        )
    via_ssm: dict[str, list[str]] = {}
    for template, version, image in template_images(ec2):
        if image.startswith(RESOLVE_SSM):
            via_ssm.setdefault(image[len(RESOLVE_SSM) :], []).append(f"launch template {template} version {version}")
        elif image in wanted:
            found.setdefault(image, []).append(f"launch template {template} version {version}")
    if not check_ssm:
        return found
    try:
        for name, value in ssm_parameters(ec2).items():
            if value in wanted:
                found.setdefault(value, []).append(f"SSM parameter {name}")
        for name, value in resolve_parameters(ec2, sorted(via_ssm)).items():
            if value in wanted:
                found.setdefault(value, []).extend(f"{t} (through {name})" for t in via_ssm[name])
    except CloudError as exc:
        raise CloudError(
            "prune",
            "CannotCheckSSM",
            f"cannot read SSM parameters, so cannot tell which AMIs they name ({exc.code}); nothing was deleted",
            hint="grant ssm:GetParametersByPath and ssm:GetParameters, or run prune with --skip-ssm-check",
        ) from None
    return found


def template_images(ec2: EC2) -> list[tuple[str, int, str]]:
    """Return (template name, version, ImageId) of every version of every launch template."""
    found = []
    for template in _pages(ec2, "describe_launch_templates", "LaunchTemplates"):
        versions = _pages(
            ec2,
            "describe_launch_template_versions",
            "LaunchTemplateVersions",
            LaunchTemplateId=template["LaunchTemplateId"],
        )
        for version in versions:
            image = (version.get("LaunchTemplateData") or {}).get("ImageId")
            if image:
                found.append((str(template["LaunchTemplateName"]), int(version["VersionNumber"]), str(image)))
    return found


def ssm_parameters(ec2: EC2, path: str = SSM_PATH) -> dict[str, str]:
    """Return every SSM parameter under ``path`` (recursively): name to value; raise CloudError."""
    found: dict[str, str] = {}
    params: dict[str, Any] = {"Path": path, "Recursive": True}
    while True:
        reply = ec2.ssm_call("get_parameters_by_path", **params)
        found.update({str(p["Name"]): str(p["Value"]) for p in reply.get("Parameters") or []})
        if not reply.get("NextToken"):
            return found
        params["NextToken"] = reply["NextToken"]


def resolve_parameters(ec2: EC2, names: Sequence[str]) -> dict[str, str]:
    """Return the values of the SSM parameters ``names`` (those that exist); raise CloudError."""
    found: dict[str, str] = {}
    for start in range(0, len(names), SSM_NAMES):
        chunk = list(names[start : start + SSM_NAMES])
        reply = ec2.ssm_call("get_parameters", Names=chunk)
        for parameter in reply.get("Parameters") or []:
            for asked in chunk:
                if str(parameter["Name"]) in _parameter_names(asked):
                    found[asked] = str(parameter["Value"])
    return found


def _parameter_names(asked: str) -> set[str]:
    """Return the names an answer may give a parameter asked for as ``asked`` (name or ARN, :version, :label)."""
    name = asked.split(":parameter", 1)[1] if asked.startswith("arn:") else asked
    bare = name.rsplit(":", 1)[0] if ":" in name else name
    return {asked, name, bare, "/" + bare.lstrip("/"), bare.lstrip("/")}


def shared_images(ec2: EC2, image_ids: Sequence[str]) -> dict[str, list[str]]:
    """Return, for each of ``image_ids`` shared with other accounts or public, with whom."""
    found: dict[str, list[str]] = {}
    for image_id in image_ids:
        reply = ec2.call("describe_image_attribute", ImageId=image_id, Attribute="launchPermission")
        for permission in reply.get("LaunchPermissions") or []:
            if permission.get("Group") == "all":
                found.setdefault(image_id, []).append("public")
            for key, what in (
                ("UserId", "account"),
                ("OrganizationArn", "organization"),
                ("OrganizationalUnitArn", "OU"),
            ):
                if permission.get(key):
                    found.setdefault(image_id, []).append(f"shared with {what} {permission[key]}")
    return found


def _pages(ec2: EC2, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Return every item of a paginated EC2 Describe call."""
    items: list[dict[str, Any]] = []
    while True:
        reply = ec2.call(operation, **params)
        items += reply.get(key) or []
        if not reply.get("NextToken"):
            return items
        params["NextToken"] = reply["NextToken"]


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

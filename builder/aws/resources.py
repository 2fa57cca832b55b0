"""Typed EC2 operations, used by the build and the restore alike.

Each operation is the one home of its API payload: what ``run_instances`` is given (IMDSv2
always required), how a security group admits SSH from one CIDR (IPv4 or IPv6), how a
snapshot, a registered image and a region copy are asked for. Callers
say what they want in domain terms (a :class:`LaunchSpec`, a CIDR); tags come from
:mod:`builder.tags`. Whatever an operation creates is on the caller's undo stack before it
returns.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from builder import tags
from builder.aws.ec2 import EC2
from builder.cleanup import UndoStack
from builder.errors import CloudError
from builder.tags import tag_specs

log = logging.getLogger(__name__)

Undo = Callable[[], object]

# What makes a launch move on to the next (type, AZ): EC2 has no capacity for the type in that
# AZ, does not support it there, or this account may run no more of it. Any other error stops.
# A StateReason of an instance that ended `terminated` counts too (without its "Server.").
NEXT_PLACEMENT = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported", "InstanceLimitExceeded"}
)


@dataclass(frozen=True)
class Disk:
    """One EBS device of an instance: new (``size_gib``) or made from ``snapshot_id``."""

    device: str
    volume_type: str
    encrypted: bool | None  # None: as the snapshot is (an image's mapping says nothing)
    delete_on_termination: bool
    size_gib: int | None = None
    snapshot_id: str | None = None
    iops: int | None = None
    throughput: int | None = None
    kms_key_id: str | None = None

    def mapping(self) -> dict[str, Any]:
        """Return the BlockDeviceMappings entry (unset or zero sizes and rates left to EC2)."""
        ebs: dict[str, Any] = {
            "SnapshotId": self.snapshot_id,
            "VolumeSize": self.size_gib,
            "VolumeType": self.volume_type,
            "Encrypted": self.encrypted,
            "DeleteOnTermination": self.delete_on_termination,
            "Iops": self.iops,
            "Throughput": self.throughput,
            "KmsKeyId": self.kms_key_id,
        }
        kept = {k: v for k, v in ebs.items() if v or isinstance(v, bool)}
        return {"DeviceName": self.device, "Ebs": kept}


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch: ``count`` instances of an image, IMDSv2 required, tagged at creation."""

    image_id: str
    instance_type: str
    disks: tuple[Disk, ...]
    instance_tags: Mapping[str, str]
    volume_tags: Mapping[str, str]
    count: int = 1
    user_data: str | None = None
    key_name: str | None = None
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    az: str | None = None
    hop_limit: int | None = None  # IMDS hops (1: not reachable from containers on the instance)
    terminate_on_shutdown: bool = False
    client_token: str | None = None


def run_params(spec: LaunchSpec) -> dict[str, Any]:
    """Return the run_instances parameters of ``spec``."""
    metadata: dict[str, Any] = {"HttpTokens": "required", "HttpEndpoint": "enabled"}
    if spec.hop_limit:
        metadata["HttpPutResponseHopLimit"] = spec.hop_limit
    params: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.instance_type,
        "MinCount": spec.count,
        "MaxCount": spec.count,
        "MetadataOptions": metadata,
        "BlockDeviceMappings": [d.mapping() for d in spec.disks],
        "TagSpecifications": [*tag_specs("instance", spec.instance_tags), *tag_specs("volume", spec.volume_tags)],
    }
    optional = {
        "KeyName": spec.key_name,
        "UserData": spec.user_data,
        "SubnetId": spec.subnet_id,
        "SecurityGroupIds": list(spec.security_group_ids),
        "Placement": {"AvailabilityZone": spec.az} if spec.az else None,
        "InstanceInitiatedShutdownBehavior": "terminate" if spec.terminate_on_shutdown else None,
        "ClientToken": spec.client_token,
    }
    params.update({k: v for k, v in optional.items() if v})
    return params


def launch(
    ec2: EC2,
    spec: LaunchSpec,
    undo: UndoStack | None = None,
    *,
    terminate: Callable[[str], Undo] | None = None,
    fallback: Sequence[str] = (),
    running: float | None = None,
    kind: str | None = None,
) -> list[str]:
    """Launch ``spec`` and return the instance ids (each on ``undo`` first, if given); raise CloudError.

    The types to try are ``spec.instance_type`` then ``fallback``, AZ by AZ where offered
    (:func:`placements`: only the subnet's AZ, or ``spec.az``, when given). A pair EC2 has
    no capacity for (``NEXT_PLACEMENT``) is logged and the next is tried; when none is left,
    CloudError names every attempt. With ``running`` (a timeout in s) each instance is waited
    for until `running` (:func:`wait_running`; ``kind`` is the wait's kind), so one that ends
    `terminated` for capacity moves on too. ``terminate`` makes an instance's undo action
    (default: terminate it and wait).
    """
    pairs = placements(ec2, (spec.instance_type, *fallback), spec.subnet_id, spec.az)
    attempts: list[str] = []
    for n, (itype, az) in enumerate(pairs):
        token = spec.client_token and (spec.client_token if n == 0 else f"{spec.client_token[:60]}-{n}")
        attempt = replace(spec, instance_type=itype, az=None if spec.subnet_id else az, client_token=token)
        try:
            return _launch_running(ec2, attempt, undo, terminate=terminate, running=running, kind=kind)
        except CloudError as exc:
            if exc.code.removeprefix("Server.") not in NEXT_PLACEMENT:
                raise
            attempts.append(f"{itype} in {az}: {exc.code} ({_reason(exc)})")
            following = f"trying {pairs[n + 1][0]} in {pairs[n + 1][1]}" if n + 1 < len(pairs) else "none left to try"
            log.warning("%s; %s", attempts[-1], following)
    raise CloudError(
        "run_instances",
        "NoCapacity",
        f"no instance type could be launched in any AZ offering it: {'; '.join(attempts)}",
        hint="add types to the role's instance_types, give another --subnet-id (AZ), or try again later",
    )


def _reason(exc: CloudError) -> str:
    return exc.message.removeprefix(f"EC2 {exc.operation}: {exc.code}: ")


def _launch_running(
    ec2: EC2,
    spec: LaunchSpec,
    undo: UndoStack | None,
    *,
    terminate: Callable[[str], Undo] | None,
    running: float | None,
    kind: str | None,
) -> list[str]:
    """Launch ``spec`` in its one placement; with ``running``, wait for each instance (raises CloudError)."""
    ids = _launch_one(ec2, spec, undo, terminate)
    if running is None:
        return ids
    try:
        for instance_id in ids:
            wait_running(ec2, instance_id, running, kind)
    except CloudError:
        try:
            _discard(ec2, ids)
        except CloudError as exc:  # the launch's own error matters more; an undo stack may still hold them
            log.warning("could not remove the instances of a failed launch (%s): %s", " ".join(ids), exc)
        raise
    return ids


def _discard(ec2: EC2, instance_ids: list[str]) -> None:
    """Terminate a failed launch's instances and delete the volumes they would leave (not deleted on termination)."""
    ec2.call("terminate_instances", InstanceIds=instance_ids)
    for instance_id in instance_ids:
        mappings = (ec2.described.get(instance_id) or ec2.instance(instance_id)).get("BlockDeviceMappings") or []
        kept = [m["Ebs"]["VolumeId"] for m in mappings if not m.get("Ebs", {}).get("DeleteOnTermination", True)]
        ec2.terminate(instance_id, requested=True)
        for volume_id in kept:
            try:
                ec2.delete_volume(volume_id, instance_id)
            except CloudError as exc:
                if not exc.code.endswith("NotFound"):
                    raise


def wait_running(ec2: EC2, instance_id: str, timeout: float, kind: str | None = None) -> dict[str, Any]:
    """Wait until ``instance_id`` is running and return its description (``ec2.described``).

    Raises CloudError whose code and message are EC2's StateReason when it ends terminated,
    shutting down or stopped instead (e.g. Server.InsufficientInstanceCapacity), WaitTimeout.
    """
    try:
        ec2.wait_for(
            f"instance {instance_id}",
            lambda: ec2.instance_state(instance_id),
            "running",
            timeout=timeout,
            failed=("terminated", "shutting-down", "stopped"),
            kind=kind,
        )
    except CloudError as exc:
        if exc.code != "UnexpectedState":
            raise
        described = ec2.described.get(instance_id, {})
        reason = described.get("StateReason") or {}
        code = str(reason.get("Code") or "NoStateReason")
        where = f"{described.get('InstanceType', '?')} in {described.get('Placement', {}).get('AvailabilityZone', '?')}"
        state = described.get("State", {}).get("Name", "?")
        message = f"instance {instance_id} ({where}) went {state!r} before running: {reason.get('Message') or code}"
        raise CloudError("run_instances", code, message, HINTS_BY_REASON.get(code)) from None
    return ec2.described[instance_id]


HINTS_BY_REASON = {
    "Server.InsufficientInstanceCapacity": "add types to the role's instance_types, or give another --subnet-id (AZ)",
    "Client.VolumeLimitExceeded": "the account's EBS volume limit is reached",
    "Client.InternalError": "often a KMS key the instance's role may not use (volume.kms_key_id)",
}


def placements(
    ec2: EC2, types: Sequence[str], subnet_id: str | None = None, az: str | None = None
) -> list[tuple[str, str]]:
    """Return the (instance type, AZ) pairs to try, in order: AZ by AZ, the types it offers in their order.

    With ``subnet_id`` (or else ``az``) the AZ is fixed. A type not offered where asked is
    skipped, with a log line. Raises CloudError when no type is offered there at all.
    """
    offered = offered_zones(ec2, types)
    fixed = (
        str(ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"][0]["AvailabilityZone"]) if subnet_id else az
    )
    where = (f"{fixed}" + (f" (subnet {subnet_id})" if subnet_id else "")) if fixed else f"any AZ of {ec2.region}"
    wanted = list(dict.fromkeys(types))
    for itype in wanted:
        if not [z for z in offered.get(itype, []) if fixed in (None, z)]:
            log.warning("%s is not offered in %s: skipped", itype, where)
    zones = [fixed] if fixed else sorted({z for found in offered.values() for z in found})
    pairs = [(itype, z) for z in zones for itype in wanted if z in offered.get(itype, [])]
    if not pairs:
        raise CloudError(
            "describe_instance_type_offerings",
            "Unsupported",
            f"none of {', '.join(wanted)} is offered in {where}",
            hint="choose instance_types that this region (and the subnet's AZ) offers",
        )
    return pairs


def offered_zones(ec2: EC2, types: Sequence[str]) -> dict[str, list[str]]:
    """Return the AZs (sorted; regular AZs of the region, not Local or Wavelength Zones) offering each type."""
    zone = re.compile(re.escape(ec2.region) + "[a-z]")
    found: dict[str, list[str]] = {}
    params: dict[str, Any] = {
        "LocationType": "availability-zone",
        "Filters": [{"Name": "instance-type", "Values": list(dict.fromkeys(types))}],
    }
    while True:
        reply = ec2.call("describe_instance_type_offerings", **params)
        for offer in reply.get("InstanceTypeOfferings", []):
            if zone.fullmatch(str(offer["Location"])):
                found.setdefault(str(offer["InstanceType"]), []).append(str(offer["Location"]))
        if not reply.get("NextToken"):
            return {itype: sorted(set(zones)) for itype, zones in found.items()}
        params["NextToken"] = reply["NextToken"]


def _launch_one(
    ec2: EC2, spec: LaunchSpec, undo: UndoStack | None, terminate: Callable[[str], Undo] | None
) -> list[str]:
    """Call RunInstances once for ``spec``; each instance is on ``undo`` (if given) before this returns."""
    if undo is None:
        return _instance_ids(ec2.call("run_instances", **run_params(spec)))
    undo_of = terminate or (lambda instance_id: lambda: ec2.terminate(instance_id))
    with undo.creating():
        ids = _instance_ids(ec2.call("run_instances", **run_params(spec)))
        for instance_id in ids:
            undo.push("instance", instance_id, undo_of(instance_id))
    return ids


def _instance_ids(reply: Mapping[str, Any]) -> list[str]:
    return [str(i["InstanceId"]) for i in reply["Instances"]]


def ssh_group(
    ec2: EC2,
    name: str,
    description: str,
    cidr: str,
    *,
    group_tags: Mapping[str, str],
    undo: UndoStack,
    subnet_id: str | None = None,
) -> str:
    """Make a security group (in ``subnet_id``'s VPC, else the default) admitting SSH from ``cidr`` only.

    Returns its id; it is on ``undo`` before SSH is admitted. Raises CloudError.
    """
    params: dict[str, Any] = {"GroupName": name, "Description": description}
    if subnet_id:
        params["VpcId"] = ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"][0]["VpcId"]
    with undo.creating():
        reply = ec2.call("create_security_group", **params, TagSpecifications=tag_specs("security-group", group_tags))
        group_id = str(reply["GroupId"])
        undo.push("security-group", group_id, lambda: ec2.delete_security_group(group_id))
    ec2.call(
        "authorize_security_group_ingress",
        GroupId=group_id,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **ssh_ranges(cidr)}],
    )
    return group_id


def ssh_ranges(cidr: str) -> dict[str, list[dict[str, str]]]:
    """Return the IpPermissions ranges that admit ``cidr``: IpRanges (IPv4) or Ipv6Ranges (IPv6)."""
    if ipaddress.ip_network(cidr, strict=False).version == 6:
        return {"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "ebsrole SSH"}]}
    return {"IpRanges": [{"CidrIp": cidr, "Description": "ebsrole SSH"}]}


def snapshot(ec2: EC2, volume_id: str, description: str, snapshot_tags: Mapping[str, str]) -> str:
    """Start a snapshot of ``volume_id``, tagged at creation; return its id (CloudError)."""
    reply = ec2.call(
        "create_snapshot",
        VolumeId=volume_id,
        Description=description,
        TagSpecifications=tag_specs("snapshot", snapshot_tags),
    )
    return str(reply["SnapshotId"])


@dataclass(frozen=True)
class ImageSpec:
    """An AMI to register from snapshots: hvm, IMDSv2 required, tagged at creation."""

    name: str
    description: str
    architecture: str
    root_device_name: str
    ena_support: bool
    boot_mode: str | None
    disks: tuple[Disk, ...]
    image_tags: Mapping[str, str]


def register_params(spec: ImageSpec) -> dict[str, Any]:
    """Return the register_image parameters of ``spec``."""
    params: dict[str, Any] = {
        "Name": spec.name,
        "Description": spec.description[:255],
        "Architecture": spec.architecture,
        "RootDeviceName": spec.root_device_name,
        "VirtualizationType": "hvm",
        "EnaSupport": spec.ena_support,
        "ImdsSupport": "v2.0",
        "BlockDeviceMappings": [d.mapping() for d in spec.disks],
        "TagSpecifications": tag_specs("image", spec.image_tags),
    }
    if spec.boot_mode:
        params["BootMode"] = spec.boot_mode
    return params


def register(ec2: EC2, spec: ImageSpec, build_id: str) -> str:
    """Register ``spec`` and return the AMI id; raise CloudError.

    RegisterImage has no client token; the unique name makes a retry adopt the image
    this build (``build_id``) made, never another's.
    """
    try:
        return str(ec2.call("register_image", **register_params(spec))["ImageId"])
    except CloudError as exc:
        if exc.code != "InvalidAMIName.Duplicate":
            raise
    filters = [{"Name": "name", "Values": [spec.name]}]
    images = ec2.call("describe_images", Owners=["self"], Filters=filters)["Images"]
    mine = [i for i in images if tags.parse(i).build_id == build_id]
    if not mine:
        raise CloudError(
            "register_image", "InvalidAMIName.Duplicate", f"an AMI named {spec.name} exists and is not this build's"
        )
    return str(mine[0]["ImageId"])


def copy_image(target: EC2, source_region: str, image_id: str, name: str, description: str) -> str:
    """Start an encrypted copy of ``image_id`` into ``target``'s region; return the copy's id (CloudError).

    The client token makes a retried copy of the same AMI to the same region the same copy.
    """
    reply = target.call(
        "copy_image",
        SourceImageId=image_id,
        SourceRegion=source_region,
        Name=name,
        Description=description[:255],
        Encrypted=True,
        ClientToken=f"ebsrole-copy-{image_id}-{target.region}"[:64],
    )
    return str(reply["ImageId"])

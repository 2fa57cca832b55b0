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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from builder import tags
from builder.aws.ec2 import EC2
from builder.cleanup import UndoStack
from builder.errors import CloudError
from builder.tags import tag_specs

Undo = Callable[[], object]


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
) -> list[str]:
    """Launch ``spec`` and return the instance ids (each on ``undo`` first, if given); raise CloudError.

    ``terminate`` makes an instance's undo action (default: terminate it and wait).
    """
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


def remove(ec2: EC2, kind: str, resource_id: str) -> None:
    """Delete one resource: an instance (terminated, waited for), image (deregistered), snapshot,
    volume (detached first when ours), key pair or security group (retried while in use).

    ``kind`` is one of sweep's KINDS: instances, images, snapshots, volumes, key_pairs, security_groups.
    """
    if kind == "instances":
        ec2.terminate(resource_id)
    elif kind == "images":
        ec2.call("deregister_image", ImageId=resource_id)
    elif kind == "snapshots":
        ec2.call("delete_snapshot", SnapshotId=resource_id)
    elif kind == "volumes":
        ec2.delete_volume(resource_id, None)
    elif kind == "key_pairs":
        ec2.call("delete_key_pair", KeyName=resource_id)
    elif kind == "security_groups":
        ec2.delete_security_group(resource_id)
    else:
        raise ValueError(f"no such kind of resource: {kind}")

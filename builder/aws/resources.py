"""Typed EC2 operations, used by the build and the restore alike.

Each operation is the one home of its API payload: what ``run_instances`` is given (IMDSv2
always required, public IP or not, instance profile), whom a security group admits SSH from
(a CIDR, the VPC's CIDRs when connecting privately, or a source group; never the world
unless asked) and how, how a
snapshot, a registered image and a region copy are asked for. Callers
say what they want in domain terms (a :class:`LaunchSpec`, a CIDR); tags come from
:mod:`builder.tags`. Whatever an operation creates is on the caller's undo stack before it
returns.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from builder import tags
from builder.aws.ec2 import EC2
from builder.aws.waits import Limits
from builder.cleanup import UndoStack
from builder.errors import CloudError, InvalidInput
from builder.tags import tag_specs

log = logging.getLogger(__name__)

Undo = Callable[[], object]
CHECKIP_URL = "https://checkip.amazonaws.com"

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
    public_ip: bool | None = None  # False: no public IP (needs a subnet); None: as the subnet says
    instance_profile: str | None = None  # an instance profile's name or ARN


def instance_profile(name_or_arn: str) -> dict[str, str]:
    """Return the IamInstanceProfile parameter of an instance profile's name or ARN."""
    return {"Arn": name_or_arn} if name_or_arn.startswith("arn:") else {"Name": name_or_arn}


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
    optional: dict[str, Any] = {
        "KeyName": spec.key_name,
        "UserData": spec.user_data,
        "SubnetId": spec.subnet_id,
        "SecurityGroupIds": list(spec.security_group_ids),
        "Placement": {"AvailabilityZone": spec.az} if spec.az else None,
        "InstanceInitiatedShutdownBehavior": "terminate" if spec.terminate_on_shutdown else None,
        "ClientToken": spec.client_token,
        "IamInstanceProfile": instance_profile(spec.instance_profile) if spec.instance_profile else None,
    }
    if spec.public_ip is not None:
        # Public addressing is a property of the network interface: the subnet and the
        # groups then go there, not next to it (EC2 refuses both at once).
        interface = {"DeviceIndex": 0, "AssociatePublicIpAddress": spec.public_ip, "SubnetId": spec.subnet_id}
        optional["NetworkInterfaces"] = [{**interface, "Groups": list(spec.security_group_ids)}]
        optional["SubnetId"] = optional["SecurityGroupIds"] = None
    params.update({k: v for k, v in optional.items() if v})
    return params


# What a launch template cannot hold, or holds elsewhere: counts and a token belong to a launch,
# the subnet and the AZ to whatever reads the template (an Auto Scaling group's subnets).
NOT_IN_TEMPLATES = ("MinCount", "MaxCount", "ClientToken", "SubnetId", "Placement")


def template_data(spec: LaunchSpec) -> dict[str, Any]:
    """Return the LaunchTemplateData of ``spec``: what :func:`run_params` gives a launch, less ``NOT_IN_TEMPLATES``.

    A template's user data is base64 text (run_instances encodes it itself).
    """
    data = {k: v for k, v in run_params(spec).items() if k not in NOT_IN_TEMPLATES}
    if "UserData" in data:
        data["UserData"] = base64.b64encode(str(data["UserData"]).encode()).decode()
    return data


def default_subnet(ec2: EC2, az: str | None = None) -> str:
    """Return the default VPC's default subnet (in ``az`` when given, else the first AZ's).

    Raises InvalidInput when there is none: a launch without a public IP needs a subnet.
    """
    filters = [{"Name": "default-for-az", "Values": ["true"]}]
    if az:
        filters.append({"Name": "availability-zone", "Values": [az]})
    subnets = ec2.call("describe_subnets", Filters=filters)["Subnets"]
    if not subnets:
        where = f" in {az}" if az else ""
        raise InvalidInput(
            f"--no-public-ip needs a subnet: the default VPC has no default subnet{where}; give --subnet-id"
        )
    return str(min(subnets, key=lambda s: str(s.get("AvailabilityZone", "")))["SubnetId"])


def launch(
    ec2: EC2,
    spec: LaunchSpec,
    undo: UndoStack | None = None,
    *,
    terminate: Callable[[str], Undo] | None = None,
    fallback: Sequence[str] = (),
    running: float | None = None,
    kind: str | None = None,
    ready: Callable[[str], Callable[[], bool | None] | None] | None = None,
) -> list[str]:
    """Launch ``spec`` and return the instance ids (each on ``undo`` first, if given); raise CloudError.

    The types to try are ``spec.instance_type`` then ``fallback``. When EC2 may choose the AZ
    (no subnet, no AZ, a public IP allowed: the default VPC), the first attempt is the first
    type with no AZ and no call before it: EC2 places it in an AZ that offers the type, so a
    build asks for no offerings unless that attempt is refused. Otherwise, and after such a
    refusal, the (type, AZ) pairs are tried AZ by AZ where offered (:func:`placements`: only
    the subnet's AZ, or ``spec.az``, when given; the refused instance's own pair is skipped
    when its AZ is known). A refusal EC2 gives for capacity (``NEXT_PLACEMENT``) is logged
    and the next is tried; when none is left, CloudError names every attempt. With
    ``running`` (a timeout in s) each instance is waited for until `running`
    (:func:`wait_running`; ``kind`` is the wait's kind), so one that ends `terminated` for
    capacity moves on too. ``terminate`` makes an instance's undo action (default: terminate
    it and wait). Without a public IP (``spec.public_ip`` False) and no subnet, each attempt
    goes to the default subnet of its AZ. ``ready`` makes an instance's ``sooner`` check for
    that wait (:func:`wait_running`).
    """
    attempts: list[str] = []
    skip: tuple[str, str] | None = None
    if _ec2_chooses(spec):
        launched: list[str] = []
        try:
            return _launch_running(
                ec2, spec, undo, terminate=terminate, running=running, kind=kind, ready=ready, launched=launched
            )
        except CloudError as exc:
            if not _moves_on(exc):
                raise
            az = _zone(ec2, launched)
            skip = (spec.instance_type, az) if az else None
            attempts.append(_attempt(spec.instance_type, az or "an AZ of EC2's choice", exc))
            log.warning("%s; trying AZ by AZ where offered", attempts[-1])
    pairs = [p for p in placements(ec2, (spec.instance_type, *fallback), spec.subnet_id, spec.az) if p != skip]
    for k, (itype, az) in enumerate(pairs):
        placed = _placed(ec2, spec, itype, az, len(attempts))
        try:
            return _launch_running(ec2, placed, undo, terminate=terminate, running=running, kind=kind, ready=ready)
        except CloudError as exc:
            if not _moves_on(exc):
                raise
            attempts.append(_attempt(itype, az, exc))
            following = f"trying {pairs[k + 1][0]} in {pairs[k + 1][1]}" if k + 1 < len(pairs) else "none left to try"
            log.warning("%s; %s", attempts[-1], following)
    raise CloudError(
        "run_instances",
        "NoCapacity",
        f"no instance type could be launched in any AZ offering it: {'; '.join(attempts)}",
        hint="add types to the role's instance_types, give another --subnet-id (AZ), or try again later",
    )


def _ec2_chooses(spec: LaunchSpec) -> bool:
    """Return whether EC2 may place ``spec`` itself: no subnet, no AZ, and the default VPC's public addressing."""
    return not (spec.subnet_id or spec.az or spec.public_ip is False)


def _moves_on(exc: CloudError) -> bool:
    """Return whether ``exc`` (an answer or a StateReason) means: try the next placement."""
    return exc.code.removeprefix("Server.") in NEXT_PLACEMENT


def _placed(ec2: EC2, spec: LaunchSpec, itype: str, az: str, n: int) -> LaunchSpec:
    """Return ``spec`` as the ``n``-th attempt (from 0): ``itype`` in ``az``, with that attempt's client token.

    Only the first attempt has the caller's token, each later one its own, so a retried call
    stays idempotent and never answers with an earlier attempt's instance.
    """
    token = spec.client_token and (spec.client_token if n == 0 else f"{spec.client_token[:60]}-{n}")
    placed = replace(spec, instance_type=itype, az=None if spec.subnet_id else az, client_token=token)
    if placed.public_ip is False and not placed.subnet_id:
        placed = replace(placed, subnet_id=default_subnet(ec2, az), az=None)
    return placed


def _attempt(itype: str, where: str, exc: CloudError) -> str:
    return f"{itype} in {where}: {exc.code} ({_reason(exc)})"


def _reason(exc: CloudError) -> str:
    return exc.message.removeprefix(f"EC2 {exc.operation}: {exc.code}: ")


def _zone(ec2: EC2, instance_ids: Sequence[str]) -> str | None:
    """Return the AZ of the first of ``instance_ids`` as last described, or None (none launched or described)."""
    described = ec2.described.get(instance_ids[0], {}) if instance_ids else {}
    return described.get("Placement", {}).get("AvailabilityZone") or None


def _launch_running(
    ec2: EC2,
    spec: LaunchSpec,
    undo: UndoStack | None,
    *,
    terminate: Callable[[str], Undo] | None,
    running: float | None,
    kind: str | None,
    ready: Callable[[str], Callable[[], bool | None] | None] | None = None,
    launched: list[str] | None = None,
) -> list[str]:
    """Launch ``spec`` in its one placement; with ``running``, wait for each instance (raises CloudError).

    The ids are added to ``launched`` (if given) as soon as RunInstances answers, so a caller
    can still tell where a launch that then failed went.
    """
    ids = _launch_one(ec2, spec, undo, terminate)
    if launched is not None:
        launched.extend(ids)
    if running is None:
        return ids
    try:
        for instance_id in ids:
            wait_running(ec2, instance_id, running, kind, ready(instance_id) if ready else None)
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


def wait_running(
    ec2: EC2, instance_id: str, timeout: float, kind: str | None = None, sooner: Callable[[], bool | None] | None = None
) -> dict[str, Any]:
    """Wait until ``instance_id`` is running and return its description (``ec2.described``).

    ``sooner`` (e.g. its sshd answers) says without an EC2 call that it may be running now
    (``Limits``). Raises CloudError whose code and message are EC2's StateReason when it ends
    terminated, shutting down or stopped instead (e.g. Server.InsufficientInstanceCapacity),
    WaitTimeout.
    """
    limits: Limits = {"timeout": timeout, "failed": ("terminated", "shutting-down", "stopped")}
    if sooner:
        limits["sooner"] = sooner
    try:
        ec2.wait_for(f"instance {instance_id}", lambda: ec2.instance_state(instance_id), "running", kind=kind, **limits)
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
    fixed = subnet_zone(ec2, subnet_id) if subnet_id else az
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


@dataclass(frozen=True)
class SshSource:
    """Where SSH is admitted from: CIDRs (IPv4 or IPv6), or the members of a security group."""

    cidrs: tuple[str, ...] = ()
    group_id: str | None = None

    def permission(self) -> dict[str, Any]:
        """Return the IpPermissions entry admitting this source on tcp/22."""
        rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
        if self.group_id:
            return {**rule, "UserIdGroupPairs": [{"GroupId": self.group_id, "Description": "ebsrole SSH"}]}
        for cidr in self.cidrs:
            for key, ranges in ssh_ranges(cidr).items():
                rule.setdefault(key, []).extend(ranges)
        return rule

    def __str__(self) -> str:
        return f"members of {self.group_id}" if self.group_id else ", ".join(self.cidrs)


def ssh_group(
    ec2: EC2,
    name: str,
    description: str,
    source: SshSource | str,
    *,
    group_tags: Mapping[str, str],
    undo: UndoStack,
    subnet_id: str | None = None,
) -> str:
    """Make a security group (in ``subnet_id``'s VPC, else the default) admitting SSH from ``source`` only.

    ``source`` is an :class:`SshSource` or one CIDR. Returns the group's id; it is on
    ``undo`` before SSH is admitted. Raises CloudError.
    """
    admitted = SshSource((source,)) if isinstance(source, str) else source
    params: dict[str, Any] = {"GroupName": name, "Description": description}
    if subnet_id:
        params["VpcId"] = ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"][0]["VpcId"]
    with undo.creating():
        reply = ec2.call("create_security_group", **params, TagSpecifications=tag_specs("security-group", group_tags))
        group_id = str(reply["GroupId"])
        undo.push("security-group", group_id, lambda: ec2.delete_security_group(group_id))
    ec2.call("authorize_security_group_ingress", GroupId=group_id, IpPermissions=[admitted.permission()])
    log.info("security group %s admits SSH from %s only", group_id, admitted)
    return group_id


def ssh_ranges(cidr: str) -> dict[str, list[dict[str, str]]]:
    """Return the IpPermissions ranges that admit ``cidr``: IpRanges (IPv4) or Ipv6Ranges (IPv6)."""
    if ipaddress.ip_network(cidr, strict=False).version == 6:
        return {"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "ebsrole SSH"}]}
    return {"IpRanges": [{"CidrIp": cidr, "Description": "ebsrole SSH"}]}


def ssh_source(
    ec2: EC2,
    *,
    cidr: str | None = None,
    group_id: str | None = None,
    private: bool = False,
    subnet_id: str | None = None,
) -> SshSource:
    """Return where a new security group admits SSH from; never the world unless ``cidr`` says so.

    In order: the source group ``group_id``; the given ``cidr``; when connecting ``private``ly
    (from inside the VPC: a private address, a bastion or a proxy) the CIDRs of ``subnet_id``'s
    VPC, else of the default VPC; else this machine's address as EC2 sees it (:func:`this_host`).
    Raises InvalidInput for a bad CIDR or group id, or when none can be found.
    """
    if group_id and cidr:
        raise InvalidInput("--ssh-source-group and --ssh-cidr both say whom to admit: give one of them")
    if group_id:
        if not re.fullmatch(r"sg-[0-9a-f]{8,17}", group_id):
            raise InvalidInput(f"--ssh-source-group {group_id!r}: give a security group id (sg-...)")
        return SshSource(group_id=group_id)
    if cidr:
        return SshSource((ssh_cidr(cidr),))
    if private:
        return SshSource(vpc_cidrs(ec2, subnet_id))
    return SshSource((this_host(ec2.endpoint_url),))


def subnet_zone(ec2: EC2, subnet_id: str, az: str | None = None) -> str:
    """Return ``subnet_id``'s AZ; raise InvalidInput when ``az`` is given and is another one."""
    zone = str(ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"][0]["AvailabilityZone"])
    if az and az != zone:
        raise InvalidInput(f"--az {az} and --subnet-id {subnet_id} (in {zone}) contradict: give one of them")
    return zone


def vpc_cidrs(ec2: EC2, subnet_id: str | None = None) -> tuple[str, ...]:
    """Return the IPv4 CIDRs of ``subnet_id``'s VPC, else of the default VPC (InvalidInput: none)."""
    if subnet_id:
        vpc_id = ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"][0]["VpcId"]
        vpcs = ec2.call("describe_vpcs", VpcIds=[vpc_id])["Vpcs"]
    else:
        vpcs = ec2.call("describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise InvalidInput(
            f"no default VPC in {ec2.region} to admit SSH from: give --subnet-id, --ssh-cidr or --ssh-source-group"
        )
    vpc = vpcs[0]
    associated = [
        str(a["CidrBlock"])
        for a in vpc.get("CidrBlockAssociationSet", [])
        if a.get("CidrBlockState", {}).get("State", "associated") == "associated"
    ]
    return tuple(dict.fromkeys([str(vpc["CidrBlock"]), *associated]))


def ssh_cidr(given: str) -> str:
    """Return the CIDR ``given`` (normalized; a host address becomes /32 or /128), warning when it is wide.

    The world (0.0.0.0/0) is only ever admitted when given explicitly. Raises InvalidInput.
    """
    try:
        network = ipaddress.ip_network(given, strict=False)
    except ValueError:
        raise InvalidInput(f"--ssh-cidr {given!r} is not a CIDR such as 203.0.113.7/32") from None
    if world_open(network):
        log.warning(
            "SSH is open to %s (%s), as asked: give your own address instead, e.g. --ssh-cidr 203.0.113.7/32",
            "the whole internet" if network.prefixlen == 0 else "a large part of the internet",
            network,
        )
    return str(network)


def this_host(endpoint_url: str | None = None) -> str:
    """Return this machine's address as EC2 sees it, as a CIDR (InvalidInput when it cannot be found).

    For a loopback endpoint (the sandbox) the loopback range; otherwise the public
    address that AWS's checkip service reports, /32 (or /128).
    """
    host = urllib.parse.urlsplit(endpoint_url).hostname if endpoint_url else None
    if host and _is_loopback(host):
        return "127.0.0.0/8"
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=5) as response:
            address = ipaddress.ip_address(response.read().decode().strip())
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"cannot detect this machine's public address ({exc}); give --ssh-cidr",
            hint="inside the VPC: --connect private admits its CIDR; SSH is never opened to the world "
            "unless --ssh-cidr 0.0.0.0/0 is given explicitly",
        ) from None
    return f"{address}/{address.max_prefixlen}"


def world_open(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Return True when ``network`` admits much of the internet: a /8 or wider (IPv4), /16 (IPv6).

    Private, loopback and link-local ranges (10.0.0.0/8, 127.0.0.0/8, fc00::/7) are not the
    internet; ::/0 and 0.0.0.0/0 are, and so are 0.0.0.0/1 or 2000::/3.
    """
    widest = 8 if network.version == 4 else 16
    return network.prefixlen <= widest and not (network.is_private or network.is_loopback or network.is_link_local)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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


def copy_image(
    target: EC2, source_region: str, image_id: str, name: str, description: str, *, kms_key_id: str | None = None
) -> str:
    """Start an encrypted copy of ``image_id`` into ``target``'s region; return the copy's id (CloudError).

    ``kms_key_id``: the copy's key (a key of the target region); the region's default EBS key
    otherwise. The client token makes a retried copy of the same AMI to the same region the same copy.
    """
    key = {"KmsKeyId": kms_key_id} if kms_key_id else {}
    reply = target.call(
        "copy_image",
        SourceImageId=image_id,
        SourceRegion=source_region,
        Name=name,
        Description=description[:255],
        Encrypted=True,
        ClientToken=f"ebsrole-copy-{image_id}-{target.region}"[:64],
        **key,
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

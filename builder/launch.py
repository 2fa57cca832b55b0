"""Restores: launch a role from a snapshot, log in to what was launched, verify it.

Bringing up an instance of a role *is* a restore: the role AMI with its data device made
from a snapshot (the newest nightly, the seed, or one named), in any AZ of the region.
SSH to instances the tool launches is pinned the EC2 way: the host keys come from the
instance's console output (cloud-init prints them there), never trusted on first use; the
login key is a temporary in-memory key handed over in user-data.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from builder import tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.backups import nightly_snapshots
from builder.cleanup import UndoStack
from builder.errors import CloudError, InvalidInput, SSHError
from builder.keys import KeyPair
from builder.live import verify_checks
from builder.reach import Reach
from builder.registry import RoleImage, role_images
from builder.remote import Remote
from builder.roles import Role
from builder.tags import RESTORABLE, tag_list

log = logging.getLogger(__name__)

HOST_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)
KEY_LINE = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) ([A-Za-z0-9+/]+=*)")


@dataclass(frozen=True)
class Source:
    """The snapshot a restore starts from."""

    snapshot_id: str
    kind: str  # seed | nightly | seed-snapshot
    date: str  # the night it records (its start day when it has no date tag: DLM's)
    source_az: str
    marker: str | None
    env: str
    role: str = ""
    started: str = ""  # EC2's StartTime, ISO


# Kinds of snapshot a restore may start from (tags.RESTORABLE): nightly backups (the tool's
# or its DLM policy's) and the seed of a role AMI. Root snapshots, a builder's temporary
# ones and snapshots the tool did not make are never restored.


def current_image(ec2: EC2, role: str) -> RoleImage:
    """Return the role's newest complete AMI."""
    images = role_images(ec2, roles=[role])
    if not images:
        raise CloudError(
            "describe_images",
            "NoRoleImage",
            f"no AMI of role {role} in {ec2.region}",
            hint=f"build it: python build.py {role}",
        )
    return images[0]


def choose_source(
    ec2: EC2, role: str, image: RoleImage, choice: str, source_env: str = "", *, allow_other_role: bool = False
) -> Source:
    """Return the snapshot ``choice`` (latest | seed | snap-...) names for ``role``'s restore.

    "latest" is the newest completed nightly snapshot (by its StartTime) that this account
    owns, of ``role`` and of environment ``source_env``. A given snapshot id must be one
    this account owns, of a restorable kind, of ``role`` (unless ``allow_other_role``) and,
    for a nightly one, of ``source_env``. Raises InvalidInput (exit 2) naming what differs,
    CloudError when there is no such snapshot.
    """
    if choice == "seed":  # its source-az (a build's snapshots record the builder's AZ) sends a drill elsewhere
        raw = ec2.call("describe_snapshots", SnapshotIds=[image.seed_snapshot])["Snapshots"]
        zone = tags.parse(raw[0]).source_az if raw else ""
        return Source(image.seed_snapshot, "seed", image.created[:10], zone, None, "", role)
    if choice != "latest" and not re.fullmatch(r"snap-[0-9a-f]{8,17}", choice):
        raise InvalidInput(f"--from {choice!r}: give latest, seed or a snapshot id (snap-...)")
    account = ec2.account_id()
    if choice == "latest":
        return _latest(ec2, role, source_env, account)
    raw = ec2.call("describe_snapshots", SnapshotIds=[choice])["Snapshots"]
    if not raw:
        raise CloudError("describe_snapshots", "InvalidSnapshot.NotFound", f"no snapshot {choice} in {ec2.region}")
    refused = _refusals(raw[0], role, source_env, account, allow_other_role)
    if refused:
        hint = "--allow-other-role restores another role's snapshot" if "not of role" in refused[0] else None
        raise InvalidInput(f"--from {choice}: " + "; ".join(refused), hint=hint)
    seen = tags.parse(raw[0])
    start = _iso(raw[0].get("StartTime"))
    return Source(choice, seen.kind, seen.date or start[:10], seen.source_az, seen.marker, seen.env, seen.role, start)


def _latest(ec2: EC2, role: str, source_env: str, account: str) -> Source:
    found = [
        s
        for s in nightly_snapshots(ec2, role=role, env=source_env)
        if s["state"] == "completed" and s["owner"] == account
    ]
    if not found:
        where = f"environment {source_env}" if source_env else "no environment"
        raise CloudError(
            "describe_snapshots",
            "NoNightlySnapshot",
            f"no completed nightly snapshot of role {role} ({where}) in {ec2.region}",
            hint="take one with: python build.py snapshot ROLE; another environment's: --source-env ENV; "
            "the AMI's seed: --from seed",
        )
    snap = found[0]  # newest by StartTime: cron's and DLM's rank together
    seen = tags.view(snap["tags"])
    return Source(
        snap["id"],
        tags.KIND_NIGHTLY,
        snap["date"] or snap["start"][:10],
        seen.source_az,
        seen.marker,
        snap["env"],
        role,
        snap["start"],
    )


def _refusals(raw: dict[str, Any], role: str, source_env: str, account: str, allow_other_role: bool) -> list[str]:
    """Return why snapshot ``raw`` must not be restored for ``role`` (empty: it may)."""
    seen = tags.parse(raw)
    kind, owner, of_role = seen.kind, str(raw.get("OwnerId", "")), seen.role
    refused = []
    if of_role != role and not allow_other_role:
        refused.append(f"a snapshot of role {of_role or '(none)'}, not of role {role}")
    if owner != account:
        refused.append(f"owned by account {owner or '(unknown)'}, not by this account {account}")
    if kind not in RESTORABLE or seen.temporary:
        refused.append(f"kind {kind or '(none)'} is not a backup ebsrole restores (those are: {', '.join(RESTORABLE)})")
    env = seen.env
    if kind == tags.KIND_NIGHTLY and env != source_env:
        refused.append(f"from environment {env or '(none)'}, not {source_env or '(none)'} (give --source-env {env})")
    if raw.get("State") == "error":
        refused.append("in state error")
    return refused


def _iso(start: Any) -> str:
    return start.isoformat() if hasattr(start, "isoformat") else str(start or "")


def zones(ec2: EC2) -> list[str]:
    raw = ec2.call("describe_availability_zones", Filters=[{"Name": "state", "Values": ["available"]}])
    return sorted(z["ZoneName"] for z in raw["AvailabilityZones"])


@dataclass
class Launched:
    instance_id: str
    az: str
    address: str  # the public IP, else the private one (what the listing shows)
    snapshot_id: str
    volume_id: str = ""
    verified: bool | None = None
    public_ip: str = ""
    private_ip: str = ""

    def addresses(self) -> dict[str, str]:
        """Return the instance's id and addresses as DescribeInstances names them (what a Reach reads)."""
        found = {"PublicIpAddress": self.public_ip, "PrivateIpAddress": self.private_ip}
        return {"InstanceId": self.instance_id, **{k: v for k, v in found.items() if v}}


def snapshot_size(ec2: EC2, snapshot_id: str) -> int:
    """Return the size in GiB of the volume ``snapshot_id`` was taken of; raise CloudError when it is unknown."""
    raw = ec2.call("describe_snapshots", SnapshotIds=[snapshot_id])["Snapshots"]
    if not raw:
        raise CloudError("describe_snapshots", "InvalidSnapshot.NotFound", f"no snapshot {snapshot_id} in {ec2.region}")
    return int(raw[0]["VolumeSize"])


def check_volume_size(ec2: EC2, snapshot_id: str, size_gib: int | None) -> None:
    """Refuse (InvalidInput, exit 2) a data volume smaller than its snapshot; None (the snapshot's size) passes."""
    if size_gib is None:
        return
    if size_gib < 1:
        raise InvalidInput(f"--volume-size {size_gib}: give a size in GiB, at least 1")
    least = snapshot_size(ec2, snapshot_id)
    if size_gib < least:
        raise InvalidInput(
            f"--volume-size {size_gib} GiB is smaller than snapshot {snapshot_id} ({least} GiB)",
            hint=f"give at least {least}: a volume may grow at a restore, never shrink",
        )


def data_disk(
    role: Role, image: RoleImage, snapshot_id: str, *, size_gib: int | None = None, delete_on_termination: bool = False
) -> resources.Disk:
    """Return the role's data device made from ``snapshot_id``, ``size_gib`` large (None: the snapshot's size).

    A larger volume than the snapshot is grown into at its first mount (ebsrole-data-grow on
    the instance). Check the size first with :func:`check_volume_size`.
    """
    vol = role.volume
    return resources.Disk(
        image.device or vol.device,
        vol.type,
        True,
        delete_on_termination,
        size_gib=size_gib,
        snapshot_id=snapshot_id,
        iops=vol.iops,
        throughput=vol.throughput,
    )


@dataclass(frozen=True)
class RestoreOptions:
    """How an instance of a role is set up, whether launched now or by a launch template later."""

    env: str = ""
    instance_type: str | None = None  # None: the role's first instance type
    key_name: str | None = None
    security_group_ids: tuple[str, ...] = ()
    user_data: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)
    delete_data_on_termination: bool = False
    public_ip: bool | None = None
    volume_size: int | None = None  # GiB, checked against the snapshot (check_volume_size); None: its size


def restore_spec(
    role: Role,
    image: RoleImage,
    source: Source,
    options: RestoreOptions,
    *,
    count: int = 1,
    subnet_id: str | None = None,
    az: str | None = None,
) -> resources.LaunchSpec:
    """Return the LaunchSpec of an instance of ``role``'s ``image`` whose data device is made from ``source``.

    The one home of a restore's shape, for `launch` and `template` alike: the data device
    (encrypted, the role's type and rates) and the tags its instance and volumes get at creation.
    """
    name = f"{role.name}-{options.env}" if options.env else role.name
    shared = {**tags.launched(name, role.name, options.env, source.snapshot_id), **options.extra_tags}
    data = data_disk(
        role,
        image,
        source.snapshot_id,
        size_gib=options.volume_size,
        delete_on_termination=options.delete_data_on_termination,
    )
    return resources.LaunchSpec(
        image_id=image.image_id,
        instance_type=options.instance_type or role.instance_type,
        disks=(data,),
        instance_tags=tags.with_kind(shared, tags.KIND_INSTANCE),
        volume_tags=tags.with_kind(shared, tags.KIND_VOLUME),
        count=count,
        user_data=options.user_data,
        key_name=options.key_name,
        subnet_id=subnet_id,
        security_group_ids=options.security_group_ids,
        az=az,
        public_ip=options.public_ip,
    )


def launch(
    ec2: EC2,
    role: Role,
    image: RoleImage,
    source: Source,
    *,
    count: int = 1,
    az: str | None = None,
    env: str = "",
    instance_type: str | None = None,
    key_name: str | None = None,
    subnet_id: str | None = None,
    security_group_ids: list[str] | None = None,
    user_data: str | None = None,
    extra_tags: dict[str, str] | None = None,
    delete_data_on_termination: bool = False,
    undo: UndoStack | None = None,
    public_ip: bool | None = None,
    volume_size: int | None = None,
) -> list[Launched]:
    """Launch ``count`` instances of the role AMI with the data device made from ``source``.

    ``public_ip`` False launches them without a public IP (in the default subnet unless ``subnet_id``).
    ``volume_size`` (GiB, checked against the snapshot by the caller) makes the data volume larger.
    """
    spec = restore_spec(
        role,
        image,
        source,
        RestoreOptions(
            env=env,
            instance_type=instance_type,
            key_name=key_name,
            security_group_ids=tuple(security_group_ids or ()),
            user_data=user_data,
            extra_tags=extra_tags or {},
            delete_data_on_termination=delete_data_on_termination,
            public_ip=public_ip,
            volume_size=volume_size,
        ),
        count=count,
        subnet_id=subnet_id,
        az=az,
    )
    vol = role.volume
    fallback = () if instance_type else role.instance_types[1:]
    ids = resources.launch(ec2, spec, undo, fallback=fallback, running=900)
    launched = []
    for instance_id in ids:
        described = ec2.instance(instance_id)
        device = image.device or vol.device
        volume = next(
            (m["Ebs"]["VolumeId"] for m in described.get("BlockDeviceMappings", []) if m["DeviceName"] == device), ""
        )
        if volume:
            # The target of `schedule` (DLM) and of `snapshot`: this instance's data volume only.
            ec2.call(
                "create_tags",
                Resources=[volume],
                Tags=tag_list(tags.data_volume(role.name, env)),  # backup-target: its env's DLM policy
            )
        launched.append(
            Launched(
                instance_id,
                described.get("Placement", {}).get("AvailabilityZone", ""),
                described.get("PublicIpAddress") or described.get("PrivateIpAddress") or "",
                source.snapshot_id,
                volume,
                public_ip=described.get("PublicIpAddress") or "",
                private_ip=described.get("PrivateIpAddress") or "",
            )
        )
    return launched


def login_user_data(login: KeyPair) -> str:
    """Return cloud-config that admits the temporary ``login`` key for the default user."""
    return "#cloud-config\n" + f"ssh_authorized_keys:\n  - {login.public_line}\n"


def console_host_key(ec2: EC2, instance_id: str, timeout: float = 300) -> str:
    """Return the instance's ed25519 host key as printed by cloud-init on its console (waiting for it)."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        raw = ec2.call("get_console_output", InstanceId=instance_id, Latest=True)
        text = str(raw.get("Output") or "")  # botocore has decoded it from base64 already
        for block in HOST_KEYS.findall(text):
            keys = dict(KEY_LINE.findall(block))
            if keys:
                kind = "ssh-ed25519" if "ssh-ed25519" in keys else next(iter(keys))
                return f"{kind} {keys[kind]}"
        if time.monotonic() > deadline:
            raise SSHError(
                f"{instance_id}: no SSH host keys on its console after {timeout:.0f} s",
                hint="the tool pins host keys from cloud-init's console output; is cloud-init running?",
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 5)


def connect(
    ec2: EC2, launched: Launched, login: KeyPair, user: str, timeout: float = 300, *, reach: Reach | None = None
) -> Remote:
    """Log in to a launched instance with the temporary key, its host key pinned from the console.

    ``reach`` says which address and proxy (default: its public IP, else its private one, directly).
    """
    reach = reach or Reach()
    address = reach.address(launched.addresses())
    host_key = console_host_key(ec2, launched.instance_id, timeout)
    return Remote.connect(
        address,
        22,
        user,
        login,
        host_key,
        deadline=timeout,
        prefix=f"[{launched.instance_id}] ",
        proxy=reach.proxy(address, 22, user, launched.instance_id),
    )


def drop_login(remote: Remote, login: KeyPair) -> None:
    """Remove the temporary login key from the instance (the user's own key pair stays)."""
    comment = login.public_line.split()[-1]
    remote.run(
        f"sed -i {shlex.quote('/' + re.escape(comment) + '$/d')} ~/.ssh/authorized_keys",
        timeout=60,
        on_line=lambda *_: None,
    )


@dataclass(frozen=True)
class LaunchRequest:
    """What a launch asks for: the snapshot to restore, how many instances, where, and whether to verify them."""

    choice: str = "latest"  # latest | seed | snap-...
    source_env: str = ""
    allow_other_role: bool = False
    count: int = 1
    az: str | None = None
    env: str = ""
    instance_type: str | None = None
    key_name: str | None = None
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    wait: bool = False  # log in with a temporary key and run the verify script on each
    ssh_user: str = "admin"
    reach: Reach = field(default_factory=Reach)  # how --wait reaches each instance
    public_ip: bool | None = None  # False: launch without a public IP
    volume_size: int | None = None  # GiB of the data volume (default: the snapshot's); grown into at boot

    def __post_init__(self) -> None:
        """Refuse --no-public-ip with --connect public (InvalidInput)."""
        if self.public_ip is False:
            self.reach.refuse_public()


@dataclass(frozen=True)
class Restored:
    """A launch's result: the AMI, the snapshot its data came from, the instances."""

    image: RoleImage
    source: Source
    instances: list[Launched]


def restore(ec2: EC2, role: Role, request: LaunchRequest) -> Restored:
    """Launch instances of ``role``'s current AMI with the data of the snapshot ``request`` names.

    With ``request.wait`` each instance is logged in to (host key pinned from its console)
    and verified; ``Launched.verified`` says how that went, each failed check is logged.
    Raises like :func:`current_image`, :func:`choose_source` and :func:`launch`.
    """
    image = current_image(ec2, role.name)
    source = choose_source(
        ec2, role.name, image, request.choice, request.source_env, allow_other_role=request.allow_other_role
    )
    check_volume_size(ec2, source.snapshot_id, request.volume_size)
    login = KeyPair.generate(f"ebsrole-launch-{role.name}") if request.wait else None
    launched = launch(
        ec2,
        role,
        image,
        source,
        count=request.count,
        az=request.az,
        env=request.env,
        instance_type=request.instance_type,
        key_name=request.key_name,
        subnet_id=request.subnet_id,
        security_group_ids=list(request.security_group_ids) or None,
        user_data=login_user_data(login) if login else None,
        public_ip=request.public_ip,
        volume_size=request.volume_size,
    )
    if login is not None:
        for instance in launched:
            verify_launched(ec2, instance, role, login, request.ssh_user, reach=request.reach)
    return Restored(image, source, launched)


def verify_launched(
    ec2: EC2, instance: Launched, role: Role, login: KeyPair, user: str, *, reach: Reach | None = None
) -> None:
    """Run the verify script on ``instance``, set its ``verified``, then remove the temporary login."""
    remote = connect(ec2, instance, login, user, reach=reach)
    try:
        checks = verify_checks(remote, role)
        instance.verified = all(c.ok for c in checks)
        for check in checks:
            if not check.ok:
                log.warning("%s: %s", instance.instance_id, check.line())
        drop_login(remote, login)
    finally:
        remote.close()

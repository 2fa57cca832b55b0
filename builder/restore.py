"""Restores: launch a role from a snapshot, prove a restore works (drill), copy AMIs across regions.

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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import tags
from builder.backups import MARKER, nightly_snapshots
from builder.cleanup import UndoStack
from builder.ec2 import EC2
from builder.errors import BuildError, CloudError, CopiesFailed, InvalidInput, SSHError
from builder.keys import KeyPair
from builder.live import verify_checks
from builder.pipeline import ssh_ranges
from builder.registry import RoleImage, role_images
from builder.remote import Remote
from builder.roles import Role
from builder.tags import RESTORABLE, tag_list, tag_specs

log = logging.getLogger(__name__)

HOST_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)
KEY_LINE = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) ([A-Za-z0-9+/]+=*)")
WEB_SERVICES = ("apache2", "nginx", "httpd")


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
    if choice == "seed":
        return Source(image.seed_snapshot, "seed", image.created[:10], "", None, "", role)
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
    address: str
    snapshot_id: str
    volume_id: str = ""
    verified: bool | None = None


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
) -> list[Launched]:
    """Launch ``count`` instances of the role AMI with the data device made from ``source``."""
    vol = role.volume
    ebs: dict[str, Any] = {
        "SnapshotId": source.snapshot_id,
        "DeleteOnTermination": delete_data_on_termination,
        "VolumeType": vol.type,
        "Encrypted": True,
    }
    ebs.update({k: v for k, v in (("Iops", vol.iops), ("Throughput", vol.throughput)) if v})
    name = f"{role.name}-{env}" if env else role.name
    shared = {**tags.launched(name, role.name, env, source.snapshot_id), **(extra_tags or {})}
    params: dict[str, Any] = {
        "ImageId": image.image_id,
        "MinCount": count,
        "MaxCount": count,
        "InstanceType": instance_type or role.instance_type,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [{"DeviceName": image.device or vol.device, "Ebs": ebs}],
        "TagSpecifications": [
            *tag_specs("instance", tags.with_kind(shared, tags.KIND_INSTANCE)),
            *tag_specs("volume", tags.with_kind(shared, tags.KIND_VOLUME)),
        ],
    }
    if az:
        params["Placement"] = {"AvailabilityZone": az}
    if key_name:
        params["KeyName"] = key_name
    if subnet_id:
        params["SubnetId"] = subnet_id
    if security_group_ids:
        params["SecurityGroupIds"] = security_group_ids
    if user_data:
        params["UserData"] = user_data
    if undo is not None:
        with undo.creating():
            reply = ec2.call("run_instances", **params)
            ids = [i["InstanceId"] for i in reply["Instances"]]
            for instance_id in ids:
                undo.push("instance", instance_id, _terminator(ec2, instance_id))
    else:
        reply = ec2.call("run_instances", **params)
        ids = [i["InstanceId"] for i in reply["Instances"]]
    launched = []
    for instance_id in ids:
        ec2.wait_for(
            f"instance {instance_id}",
            _state_of(ec2, instance_id),
            "running",
            timeout=900,
            failed=("terminated", "shutting-down", "stopped"),
        )
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
            )
        )
    return launched


def _terminator(ec2: EC2, instance_id: str) -> Callable[[], None]:
    return lambda: ec2.terminate(instance_id)


def _state_of(ec2: EC2, instance_id: str) -> Callable[[], str]:
    return lambda: ec2.instance_state(instance_id)


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


def connect(ec2: EC2, launched: Launched, login: KeyPair, user: str, timeout: float = 300) -> Remote:
    """Log in to a launched instance with the temporary key, its host key pinned from the console."""
    host_key = console_host_key(ec2, launched.instance_id, timeout)
    return Remote.connect(
        launched.address, 22, user, login, host_key, deadline=timeout, prefix=f"[{launched.instance_id}] "
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
    )
    if login is not None:
        for instance in launched:
            verify_launched(ec2, instance, role, login, request.ssh_user)
    return Restored(image, source, launched)


def verify_launched(ec2: EC2, instance: Launched, role: Role, login: KeyPair, user: str) -> None:
    """Run the verify script on ``instance``, set its ``verified``, then remove the temporary login."""
    remote = connect(ec2, instance, login, user)
    try:
        checks = verify_checks(remote, role)
        instance.verified = all(c["state"] == "ok" for c in checks)
        for check in checks:
            if check["state"] != "ok":
                log.warning("%s: %s %s: %s", instance.instance_id, check["check"], check["subject"], check["detail"])
        drop_login(remote, login)
    finally:
        remote.close()


# ---------------------------------------------------------------- drill


@dataclass
class DrillReport:
    role: str
    passed: bool
    snapshot_id: str
    snapshot_kind: str
    snapshot_date: str
    source_az: str
    az: str
    instance_id: str = ""
    seconds_to_verified: float | None = None
    seconds_total: float = 0.0
    checks: list[dict[str, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drill_tags(drill_id: str, role: str) -> dict[str, str]:
    """Return the tags of every temporary resource of a drill: what `sweep` needs to find them after a kill."""
    return tags.drill(drill_id, role)


def drill(
    ec2: EC2,
    role: Role,
    image: RoleImage,
    source: Source,
    *,
    az: str | None,
    ssh_cidr: str,
    user: str = "admin",
    timeout: float = 900,
    drill_id: str,
) -> DrillReport:
    """Restore ``source`` into an AZ other than its own, check it over SSH, remove everything; report."""
    started = time.monotonic()
    available = zones(ec2)
    target = az or next((z for z in available if z != source.source_az), None)
    if target is None:
        raise InvalidInput(f"no AZ other than {source.source_az} in {ec2.region}: give --az")
    if target not in available:
        raise InvalidInput(f"--az {target}: not an available AZ of {ec2.region} ({', '.join(available)})")
    report = DrillReport(role.name, False, source.snapshot_id, source.kind, source.date, source.source_az, target)
    undo = UndoStack()
    common = drill_tags(drill_id, role.name)
    login = KeyPair.generate(f"ebsrole-drill-{drill_id}")
    try:
        with undo.creating():
            group = str(
                ec2.call(
                    "create_security_group",
                    GroupName=f"ebsrole-drill-{drill_id}",
                    Description=f"ebsrole restore drill {drill_id}: SSH from {ssh_cidr}",
                    TagSpecifications=tag_specs("security-group", tags.with_kind(common, tags.KIND_SECURITY_GROUP)),
                )["GroupId"]
            )
            undo.push("security-group", group, lambda: ec2.delete_security_group(group))
        ec2.call(
            "authorize_security_group_ingress",
            GroupId=group,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **ssh_ranges(ssh_cidr)}],
        )
        launched = launch(
            ec2,
            role,
            image,
            source,
            az=target,
            env="drill",
            security_group_ids=[group],
            user_data=login_user_data(login),
            extra_tags=tags.with_kind(common, tags.KIND_DRILL),
            delete_data_on_termination=True,
            undo=undo,
        )[0]
        report.instance_id = launched.instance_id
        remote = connect(ec2, launched, login, user, timeout)
        try:
            report.checks = _drill_checks(remote, role, image, source)
        finally:
            remote.close()
        report.seconds_to_verified = round(time.monotonic() - started, 1)
        report.reasons = [f"{c['check']} {c['subject']}: {c['detail']}" for c in report.checks if c["state"] != "ok"]
        report.passed = not report.reasons
    except BuildError as exc:
        report.reasons.append(str(exc).splitlines()[0])
    finally:
        left = undo.unwind()
        report.left_behind = [f"{r.kind} {r.id}: {r.error}" for r in left]
        report.seconds_total = round(time.monotonic() - started, 1)
    if report.left_behind:
        report.passed = False
    return report


def _drill_checks(remote: Remote, role: Role, image: RoleImage, source: Source) -> list[dict[str, str]]:
    checks = verify_checks(remote, role)
    mount = image.mount_point or role.volume.mount_point
    if source.marker:
        found = remote.run(
            f"sudo -n cat {shlex.quote(mount.rstrip('/') + '/' + MARKER)}", timeout=60, on_line=lambda *_: None
        )
        got = found.stdout.strip()
        state = "ok" if got == source.marker else "FAIL"
        detail = (
            "the data is the snapshotted data"
            if state == "ok"
            else f"marker {got or 'missing'!r}, snapshot says {source.marker!r}"
        )
        checks.append({"state": state, "check": "marker", "subject": MARKER, "detail": detail})
    for service in role.services:
        active = remote.run(f"systemctl is-active {shlex.quote(service)}", timeout=60, on_line=lambda *_: None)
        state = "ok" if active.stdout.strip() == "active" else "FAIL"
        checks.append(
            {"state": state, "check": "service", "subject": service, "detail": active.stdout.strip() or "unknown"}
        )
    if any(s.removesuffix(".service") in WEB_SERVICES for s in role.services):
        probe = (
            "python3 -c \"import urllib.request as u; r = u.urlopen('http://127.0.0.1/', timeout=20); "
            'print(r.status, len(r.read()))"'
        )
        answer = ""
        for _ in range(30):  # the service may still be starting
            result = remote.run(probe, timeout=60, on_line=lambda *_: None)
            answer = (
                result.stdout.strip() or result.stderr.strip().splitlines()[-1:][0]
                if (result.stdout or result.stderr)
                else ""
            )
            if result.exit_status == 0:
                break
            time.sleep(1)
        state = "ok" if answer.startswith("200 ") else "FAIL"
        checks.append(
            {"state": state, "check": "http", "subject": "http://127.0.0.1/", "detail": answer or "no answer"}
        )
    return checks


# ---------------------------------------------------------------- copy to another region


@dataclass
class Copied:
    region: str
    ami: str
    seed_snapshot: str
    root_snapshot: str
    source_ami: str
    source_region: str


def copy_to_regions(
    source: EC2, connect: Callable[[str], EC2], role: str, ami: str | None, regions: Sequence[str]
) -> list[Copied]:
    """Copy AMI ``ami`` of ``role`` (default: its newest) to each of ``regions`` at once; return the copies.

    ``connect(region)`` gives the EC2 of a region; every region is connected to before the
    first copy, so a bad one stops it all. Raises InvalidInput when there is no such AMI or a
    region is the AMI's own, CopiesFailed like :func:`copy_images`.
    """
    if not ami:
        images = role_images(source, roles=[role])
        if not images:
            raise InvalidInput(f"no AMI of role {role} in {source.region}", hint=f"build it: python build.py {role}")
        ami = images[0].image_id
    raw = source.call("describe_images", ImageIds=[ami])["Images"]
    if not raw:
        raise InvalidInput(f"{role}: no AMI {ami} in {source.region}")
    image = RoleImage.of(raw[0])
    wanted = list(dict.fromkeys(regions))
    if source.region in wanted:
        raise InvalidInput(f"--copy-to {source.region}: that is the AMI's own region")
    targets = {region: connect(region) for region in wanted}
    started = time.monotonic()
    log.info("%s: copying %s to %s at once ...", role, image.image_id, ", ".join(wanted))
    made = copy_images(source, targets, image)
    log.info("%s: copies done after %.1f s", role, time.monotonic() - started)
    return made


def copy_images(source: EC2, targets: dict[str, EC2], image: RoleImage) -> list[Copied]:
    """Copy a role AMI to every target region at once; return the copies in the targets' order.

    Each copy is EC2's work, so waiting for them one after another would add their times:
    they run on one thread each. A failure in one region does not stop the others
    (CopiesFailed names it and what completed). On Ctrl-C or SIGTERM the copies EC2 is still
    making are named in a warning: they finish on their own, untagged, and running the copy
    again (same client token) picks them up and tags them.
    """
    raw = source.call("describe_images", ImageIds=[image.image_id])["Images"][0]
    started: dict[str, str] = {}
    done: dict[str, Copied] = {}
    failed: dict[str, BuildError] = {}

    def one(region: str, target: EC2) -> None:
        try:
            done[region] = copy_image(source, target, image, raw, on_started=lambda ami: started.update({region: ami}))
        except BuildError as exc:
            failed[region] = exc

    threads = [threading.Thread(target=one, args=item, daemon=True, name=f"copy-{item[0]}") for item in targets.items()]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # short joins: Ctrl-C reaches this thread
    except BaseException:
        for region, ami in started.items():
            if region not in done:
                log.warning("copy to %s: AMI %s left copying (untagged); run the copy again to finish it", region, ami)
        raise
    if failed:
        raise CopiesFailed(failed, [done[r] for r in targets if r in done])
    return [done[region] for region in targets]


def copy_image(
    source: EC2,
    target: EC2,
    image: RoleImage,
    raw: dict[str, Any] | None = None,
    on_started: Callable[[str], None] | None = None,
) -> Copied:
    """Copy a role AMI (and so its snapshots) to ``target``'s region, tags and pairing kept.

    ``raw`` is the source image's description if the caller has it; ``on_started`` hears
    the copy's AMI id as soon as EC2 has given it.
    """
    raw = raw or source.call("describe_images", ImageIds=[image.image_id])["Images"][0]
    source_tags = tags.tags_of(raw)
    reply = target.call(
        "copy_image",
        SourceImageId=image.image_id,
        SourceRegion=source.region,
        Name=image.name,
        Description=str(raw.get("Description") or f"ebsrole {image.role}")[:255],
        Encrypted=True,
        ClientToken=f"ebsrole-copy-{image.image_id}-{target.region}"[:64],
    )
    copied = str(reply["ImageId"])
    if on_started:
        on_started(copied)
    target.wait_for(
        f"image {copied}",
        lambda: target.image_state(copied),
        "available",
        timeout=3600,
        failed=("failed", "invalid", "error", "deregistered"),
    )
    described = target.call("describe_images", ImageIds=[copied])["Images"][0]
    by_device = {
        m["DeviceName"]: m["Ebs"]["SnapshotId"]
        for m in described.get("BlockDeviceMappings", [])
        if m.get("Ebs", {}).get("SnapshotId")
    }
    root = by_device.get(str(described.get("RootDeviceName")), "")
    seed = by_device.get(image.device, "")
    origin = f"{source.region}/{image.image_id}"
    target.call("create_tags", Resources=[copied], Tags=tag_list(tags.copied_image(source_tags, origin, seed, root)))
    for snapshot, kind in ((seed, tags.KIND_SEED_SNAPSHOT), (root, tags.KIND_ROOT_SNAPSHOT)):
        if snapshot:
            snap_tags = tags.copied_snapshot(source_tags, origin, kind, copied)
            target.call("create_tags", Resources=[snapshot], Tags=tag_list(snap_tags))
    return Copied(target.region, copied, seed, root, image.image_id, source.region)

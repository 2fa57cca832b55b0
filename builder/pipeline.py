"""The build of one role AMI, as an ordered list of stages.

resolve base image -> temporary credentials -> launch builder (with its data volume) ->
SSH (pinned host key) -> provision, verify, image hygiene -> freeze data and root, snapshot
both, thaw (with --stop instead: stop builder -> snapshot root and data volume) -> register the
role AMI -> pair and tag -> publish the SSM parameters (builder.publish; also for an unchanged build) -> clean up.

Every resource is pushed on an undo stack the moment it exists and tagged with the
build id at creation; whatever happens, the stack unwinds and the manifest is written.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import publish, tags
from builder.aws import resources
from builder.aws.ec2 import EC2, Image
from builder.cleanup import Resource, UndoStack
from builder.errors import CloudError, InvalidInput, LeftBehind, Unchanged
from builder.files import write_atomic
from builder.fingerprint import fingerprint
from builder.keys import KeyPair
from builder.manifest import Manifest, write_manifest
from builder.publish import check_env
from builder.reach import Reach
from builder.registry import role_images
from builder.render import render_role
from builder.roles import Role
from builder.sweep import builder_token, find_leftovers, remove
from builder.tags import BUILDER_VOLUMES, tag_list
from builder.userdata import builder_user_data

if TYPE_CHECKING:
    from builder.remote import Remote

log = logging.getLogger(__name__)

Connector = Callable[..., "Remote"]


# The longest a build may take: the builder's dead-man switch powers it off after this.
MAX_TIMEOUT = 7 * 24 * 3600
MAX_DEPRECATE_DAYS = 3650  # EC2 deprecates at most 10 years ahead
KMS_KEY = re.compile(
    r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/[A-Za-z0-9/_-]+|alias/[A-Za-z0-9/_-]+|[0-9a-f-]{36}|mrk-[0-9a-f]{32}"
)


def deprecate_time(at: str | None, after_days: int | None, now: datetime) -> str | None:
    """Return when the AMI is deprecated, as EnableImageDeprecation takes it (whole minutes, UTC), or None.

    ``at``: YYYY-MM-DD (midnight UTC) or an ISO time; else ``after_days`` from ``now``. Raises
    InvalidInput for a time that is not one, is past, or is more than 10 years ahead.
    """
    if at:
        try:
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidInput(f"--deprecate-at {at!r}: not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM)") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if not now < when <= now + timedelta(days=MAX_DEPRECATE_DAYS):
            raise InvalidInput(f"--deprecate-at {at!r}: must be in the future, at most 10 years ahead")
    elif after_days:
        when = now + timedelta(days=after_days)
    else:
        return None
    return when.strftime("%Y-%m-%dT%H:%M:00Z")


@dataclass(frozen=True)
class BuildOptions:
    """How to build, beyond the role itself."""

    ssh_user: str = "admin"
    ssh_host: str | None = None
    ssh_port: int = 22
    ssh_cidr: str | None = None
    ssh_source_group: str | None = None  # admit SSH from this group's members instead of a CIDR
    connect_method: str | None = None  # public | private | proxy | None: see builder.reach
    ssh_proxy_command: str | None = None
    bastion: str | None = None
    bastion_known_hosts: str | None = None
    bastion_identity: str | None = None
    no_public_ip: bool = False
    instance_profile: str | None = None
    subnet_id: str | None = None
    security_group_id: str | None = None
    keep_on_failure: bool = False
    timeout: float = 3600.0  # the whole build; also the builder's dead-man switch
    ssh_timeout: float = 600.0
    manifest_path: Path | None = None
    endpoint_url: str | None = None
    if_changed: bool = False  # skip the build when an AMI of the role's fingerprint exists
    publish: bool = True  # write the SSM parameters /ebsrole/<role>/... (builder.publish)
    publish_env: str = ""  # and /ebsrole/<role>/<env>/ami
    connect: Connector | None = None  # how to open SSH (default: Remote.connect)
    kms_key_id: str | None = None  # the root volume's key, over the role's root.kms_key_id
    deprecate_at: str | None = None  # YYYY-MM-DD or an ISO time (UTC unless it says otherwise)
    deprecate_after: int | None = None  # days, over the role's deprecate_after_days
    protect: bool = False  # deregistration protection on the new AMI, as the role's deregistration_protection
    stop: bool = False  # stop the builder before the snapshots (the old way) instead of freezing it

    def __post_init__(self) -> None:
        """Refuse numbers that would disarm the dead-man switch or cannot be a port, and a bad reach (InvalidInput)."""
        for name, seconds in (("timeout", self.timeout), ("ssh_timeout", self.ssh_timeout)):
            if not 0 < seconds <= MAX_TIMEOUT:
                raise InvalidInput(f"{name} {seconds}: must be more than 0 and at most {MAX_TIMEOUT} s (7 days)")
        if not 1 <= self.ssh_port <= 65535:
            raise InvalidInput(f"ssh_port {self.ssh_port}: must be 1 to 65535")
        check_env(self.publish_env, "--env")
        reach = self.reach  # checked here, before any cloud call
        if self.kms_key_id and not KMS_KEY.fullmatch(self.kms_key_id):
            raise InvalidInput(f"--kms-key-id {self.kms_key_id!r}: not a KMS key id, key ARN, alias/NAME or alias ARN")
        if self.deprecate_at and self.deprecate_after:
            raise InvalidInput("give --deprecate-at or --deprecate-after, not both")
        if self.deprecate_after is not None and not 1 <= self.deprecate_after <= MAX_DEPRECATE_DAYS:
            raise InvalidInput(f"--deprecate-after {self.deprecate_after}: give 1 to {MAX_DEPRECATE_DAYS} days")
        if self.deprecate_at:
            deprecate_time(self.deprecate_at, None, datetime.now(UTC))
        if self.no_public_ip:
            reach.refuse_public()

    @property
    def reach(self) -> Reach:
        """Return how SSH reaches the builder (checked: InvalidInput)."""
        return Reach.of(self)


@dataclass
class _Build:
    """The state of one build while it runs."""

    role: Role
    ec2: EC2
    options: BuildOptions
    manifest: Manifest
    undo: UndoStack = field(default_factory=UndoStack)
    base: Image | None = None
    login: KeyPair | None = None
    host_key: KeyPair | None = None
    group_id: str | None = None
    instance_id: str | None = None
    instance: dict[str, Any] = field(default_factory=dict)
    volume_id: str | None = None
    remote: Remote | None = None
    released: bool = False  # the builder was told to terminate once its snapshots started

    @property
    def own_group(self) -> bool:
        """Whether the builder's security group is the build's own (made by it, deleted at cleanup)."""
        return self.group_id is not None and not self.options.security_group_id

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def stamp(self) -> tags.BuildStamp:
        """Return what every resource of this build carries in its tags."""
        return tags.BuildStamp(self.build_id, self.role.name, self.manifest.started_at, dict(self.role.tags))


def new_build_id() -> str:
    """Return a fresh build id: sortable by time, unique."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def build(role: Role, ec2: EC2, options: BuildOptions, build_id: str | None = None) -> Manifest:
    """Build ``role``'s AMI and seed snapshot; return the manifest (also written to disk).

    Raises the error that stopped the build (after cleaning up), LeftBehind when cleanup
    could not remove everything.
    """
    if options.kms_key_id:  # the flag is the role's root.kms_key_id for this build (and its fingerprint)
        role = replace(role, root_kms_key_id=options.kms_key_id)
    manifest = Manifest.begin(role, ec2.region, build_id or new_build_id(), options.manifest_path)
    state = _Build(role, ec2, options, manifest)
    error: BaseException | None = None
    try:
        _run_stages(state)
        if options.publish:  # an unchanged build too: a re-run repairs a missing or stale parameter
            with _step(state, "publish parameters"):
                _publish(state)
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C and SIGTERM too: clean up, then re-raise
        error = exc
        manifest.status = "interrupted" if not isinstance(exc, Exception) else "failed"
        manifest.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        if state.remote is not None:
            state.remote.close()
    if error is not None and options.keep_on_failure:
        _keep_builder(state)
    with _step(state, "clean up"):
        left = state.undo.unwind()
        # A twin can only come from a create call that failed or was retried after a lost
        # answer (CreateSnapshot has no client token): look for those by tag only then.
        if error is not None or ec2.retried_creates:
            left += _remove_orphans(state)
    manifest.finish(state.undo.resources, ec2)
    write_manifest(manifest)
    leftovers = [(r.kind, r.id, r.error) for r in left]
    if error is not None:
        if leftovers and isinstance(error, Exception):
            raise LeftBehind(leftovers, error, state.build_id) from error
        raise error
    if leftovers:
        raise LeftBehind(leftovers, None, state.build_id)
    return manifest


def _run_stages(state: _Build) -> None:
    """Run the stages; an unchanged build (--if-changed) ends early, naming the AMI it found."""
    manifest = state.manifest
    manifest.snapshot_way = "stopped" if state.options.stop else "frozen"
    try:
        for name, stage in STOP_STAGES if state.options.stop else STAGES:
            with _step(state, name):
                stage(state)
        manifest.status = "complete"
    except Unchanged as image:
        manifest.status = "unchanged"
        manifest.ami, manifest.seed_snapshot, manifest.root_snapshot = (
            image.image_id,
            image.seed_snapshot,
            image.root_snapshot,
        )
        log.info("%s: unchanged: AMI %s has fingerprint %s", state.role.name, image.image_id, manifest.fingerprint)


def _publish(state: _Build) -> None:
    """Write the role's SSM parameters (and --env's AMI); record each outcome in the manifest, never raise."""
    manifest, envs = state.manifest, [state.options.publish_env] if state.options.publish_env else []
    made = publish.image_parameters(
        state.role.name, str(manifest.ami), manifest.seed_snapshot or "", f"build {state.build_id}", envs
    )
    done = publish.publish(state.ec2, made, state.role.name, state.options.publish_env)
    manifest.published = [asdict(p) for p in done]


@contextmanager
def _step(state: _Build, name: str) -> Iterator[None]:
    started = time.monotonic()
    log.info("%s: %s ...", state.role.name, name)
    outcome = "stopped"
    try:
        yield
        outcome = "done"
    finally:
        took = time.monotonic() - started
        state.manifest.steps.append({"step": name, "seconds": round(took, 3), "outcome": outcome})
        log.info("%s: %s %s after %.1f s", state.role.name, name, outcome, took)


# ---------------------------------------------------------------- stages


def resolve_base(state: _Build) -> None:
    """Find the base AMI: the pinned id, or the newest match of owner and name pattern."""
    base = state.role.base
    if base.ami:
        state.base = state.ec2.image(base.ami)
    else:
        state.base = state.ec2.newest_image(base.owner, base.name_pattern, base.ec2_architecture)
    state.manifest.base_ami = state.base.image_id
    state.manifest.fingerprint = fingerprint(state.role, state.base.image_id).value
    log.info(
        "%s: base image %s (%s), fingerprint %s",
        state.role.name,
        state.base.image_id,
        state.base.name,
        state.manifest.fingerprint,
    )
    if state.options.if_changed:
        existing = role_images(state.ec2, values=[state.manifest.fingerprint])
        if existing:
            raise Unchanged(existing[0].image_id, existing[0].seed_snapshot, existing[0].root_snapshot)


def temporary_credentials(state: _Build) -> None:
    """Make the login and host keys in memory (for the user data), admit SSH from one source only.

    The source (a CIDR, the VPC's when SSH goes privately, or a group) is settled first: one
    that cannot be found stops the build before anything exists.
    """
    ec2, name, options = state.ec2, f"ebsrole-{state.role.name}-{state.build_id}", state.options
    source = None
    if not options.security_group_id:
        private = options.reach.private(public_ip=not options.no_public_ip and _maps_public_ip(ec2, options.subnet_id))
        source = resources.ssh_source(
            ec2, cidr=options.ssh_cidr, group_id=options.ssh_source_group, private=private, subnet_id=options.subnet_id
        )
    # The login key reaches the builder only in its user data (ssh_authorized_keys), as the
    # host key does: no EC2 key pair, so two calls fewer and nothing more that could leak.
    state.login = KeyPair.generate(name)
    state.host_key = KeyPair.generate(f"{name}-host")
    if source is None:
        state.group_id = options.security_group_id
        return
    state.group_id = resources.ssh_group(
        ec2,
        name,
        f"ebsrole build {state.build_id}: SSH from {source}",
        source,
        group_tags=state.stamp.temporary(tags.KIND_SECURITY_GROUP),
        undo=state.undo,
        subnet_id=state.options.subnet_id,
    )


def _maps_public_ip(ec2: EC2, subnet_id: str | None) -> bool:
    """Return True when an instance launched in ``subnet_id`` (default: the default VPC's) gets a public IP."""
    if not subnet_id:
        return True  # default subnets map public IPs
    subnets = ec2.call("describe_subnets", SubnetIds=[subnet_id])["Subnets"]
    return bool(subnets and subnets[0].get("MapPublicIpOnLaunch"))


def launch_builder(state: _Build) -> None:
    """Launch the builder: IMDSv2 only, encrypted root, tagged, terminate on shutdown, dead-man switch."""
    assert state.base and state.login and state.host_key
    ec2, role = state.ec2, state.role
    # Always armed: BuildOptions refuses a timeout that is not > 0; a fraction rounds up.
    deadline = math.ceil(state.options.timeout)
    user_data = builder_user_data(state.login, state.host_key, deadline_seconds=deadline)
    vol = role.volume
    spec = resources.LaunchSpec(
        image_id=state.base.image_id,
        instance_type=role.instance_type,
        disks=(
            resources.Disk(
                state.base.root_device_name,
                "gp3",
                True,
                True,
                size_gib=state.base.root_size_gib,
                kms_key_id=role.root_kms_key_id,  # and so the AMI's root snapshot's key
            ),
            # The data volume comes with the instance (in its block-device mapping): made in
            # its AZ, attached at the role's device before it runs, and gone with it.
            resources.Disk(
                vol.device,
                vol.type,
                vol.encrypted,
                True,
                size_gib=vol.size_gib,
                iops=vol.iops,
                throughput=vol.throughput,
                kms_key_id=vol.kms_key_id,
            ),
        ),
        instance_tags={tags.NAME: f"ebsrole-builder-{role.name}", **state.stamp.temporary(tags.KIND_BUILDER)},
        volume_tags=state.stamp.temporary(tags.KIND_BUILDER_VOLUME),
        user_data=user_data,
        subnet_id=state.options.subnet_id,
        security_group_ids=(state.group_id,) if state.group_id else (),
        hop_limit=1,
        terminate_on_shutdown=True,
        client_token=builder_token(state.build_id),
        public_ip=False if state.options.no_public_ip else None,
        instance_profile=state.options.instance_profile,
    )
    # SSH comes next: load its code (paramiko, ~0.1 s) while EC2 boots the builder, not after.
    threading.Thread(target=importlib.import_module, args=("builder.remote",), daemon=True).start()
    (instance_id,) = resources.launch(
        ec2,
        spec,
        state.undo,
        terminate=lambda i: lambda: _end_builder(state, i),
        fallback=role.instance_types[1:],
        running=600,
        kind="instance-running",
        # Its sshd answering says it runs, at no EC2 call: the launch wait then looks once
        # more instead of polling while it boots (direct SSH only; a test's own connect none).
        ready=None
        if state.options.connect
        else lambda i: state.options.reach.answering(state.options.ssh_port, lambda: ec2.described.get(i)),
    )
    state.instance_id = instance_id
    state.instance = ec2.described[instance_id]
    where = state.instance.get("Placement", {}).get("AvailabilityZone", "?")
    log.info("%s: builder %s is a %s in %s", role.name, instance_id, state.instance.get("InstanceType"), where)
    volume_id = next(
        (m["Ebs"]["VolumeId"] for m in state.instance.get("BlockDeviceMappings", []) if m["DeviceName"] == vol.device),
        None,
    )
    if not volume_id:
        raise CloudError("run_instances", "NoDataVolume", f"instance {instance_id} has no volume at {vol.device}")
    state.volume_id = state.manifest.data_volume = str(volume_id)


def connect_ssh(state: _Build) -> None:
    """Open SSH to the builder, accepting only the host key it was given."""
    assert state.login and state.host_key
    options, reach = state.options, state.options.reach
    host = reach.address(state.instance)
    from builder.remote import Remote

    connect = options.connect or Remote.connect
    state.remote = connect(
        host,
        options.ssh_port,
        options.ssh_user,
        state.login,
        state.host_key,
        deadline=options.ssh_timeout,
        prefix=f"[{state.role.name}] ",
        proxy=reach.proxy(host, options.ssh_port, options.ssh_user, str(state.instance_id)),
    )


def run_scripts(state: _Build) -> None:
    """Run provision, verify and image hygiene with sudo (each sent over stdin), streaming their output."""
    assert state.remote and state.volume_id
    scripts = render_role(state.role)
    state.manifest.scripts = {s.name: s.sha256 for s in scripts}
    for script in scripts:
        args = [state.volume_id] if script.name == "provision.sh" else []
        started = time.monotonic()
        state.remote.run_script(script.name, script.text, args, timeout=state.options.timeout)
        log.info("%s: %s passed in %.1f s", state.role.name, script.name, time.monotonic() - started)
    if state.options.stop:  # else the session freezes the builder next
        state.remote.close()
        state.remote = None


@dataclass(frozen=True)
class _DataVolume:
    """The builder's data volume, as builder.freeze knows volumes."""

    instance_id: str
    volume_id: str
    device: str
    mount_point: str


def freeze_and_snapshot(state: _Build) -> None:
    """Freeze data then root on the running builder, start both snapshots, thaw; release the builder.

    A snapshot holds the blocks as of its CreateSnapshot call, so both are consistent images of
    one instant, with no StopInstances (and its wait) on the critical path. The watchdogs thaw
    the builder within FREEZE_TIMEOUT even if this process or its session dies.
    """
    assert state.remote
    vol = state.role.volume
    volume = _DataVolume(str(state.instance_id), str(state.volume_id), vol.device, vol.mount_point)
    from builder.freeze import while_all_frozen

    _, thawed = while_all_frozen(state.remote, volume, lambda: _start_snapshots(state), FREEZE_TIMEOUT)
    state.remote.close()
    state.remote = None
    log.info("%s: builder frozen %.3f s for its snapshots (thawed by %s)", state.role.name, thawed.seconds, thawed.by)
    _release_and_wait(state)


def stop_builder(state: _Build) -> None:
    """Stop the builder so that both filesystems are clean for the snapshots."""
    ec2, instance_id = state.ec2, str(state.instance_id)
    ec2.call("stop_instances", InstanceIds=[instance_id])
    ec2.wait_for(
        f"instance {instance_id}",
        lambda: ec2.instance_state(instance_id),
        "stopped",
        timeout=900,
        failed=("terminated",),
        kind="instance-stopped",
    )


def snapshot_volumes(state: _Build) -> None:
    """Snapshot the root and the data volume of the stopped builder, both at once (--stop)."""
    _start_snapshots(state)
    _release_and_wait(state)


def _start_snapshots(state: _Build) -> None:
    """Start the snapshots of the builder's root and data volume; each is on the undo stack once it exists."""
    ec2, role = state.ec2, state.role
    instance = ec2.described.get(str(state.instance_id)) or ec2.instance(str(state.instance_id))
    root_volume = next(
        m["Ebs"]["VolumeId"]
        for m in instance.get("BlockDeviceMappings", [])
        if m["DeviceName"] == instance.get("RootDeviceName", state.base.root_device_name if state.base else "")
    )
    made: dict[str, str] = {}
    # Where the data was: a drill of the seed then restores it into another AZ, as of a nightly one.
    zone = instance.get("Placement", {}).get("AvailabilityZone")
    facts = {tags.SOURCE_AZ: str(zone)} if zone else {}
    for kind, volume_id in ((tags.KIND_ROOT_SNAPSHOT, root_volume), (tags.KIND_SEED_SNAPSHOT, str(state.volume_id))):
        with state.undo.creating():
            snapshot_id = resources.snapshot(
                ec2,
                volume_id,
                f"ebsrole {role.name} {kind} {state.build_id}",
                state.stamp.artefact(kind, tags.STATUS_PENDING, facts),
            )
            state.undo.push("snapshot", snapshot_id, _deleter(ec2, "delete_snapshot", SnapshotId=snapshot_id))
        made[kind] = snapshot_id
    state.manifest.root_snapshot, state.manifest.seed_snapshot = (
        made[tags.KIND_ROOT_SNAPSHOT],
        made[tags.KIND_SEED_SNAPSHOT],
    )


def _release_and_wait(state: _Build) -> None:
    """Terminate the builder without waiting for it, then wait for both snapshots to complete."""
    ec2 = state.ec2
    # A snapshot holds the volume's blocks as they were when CreateSnapshot answered: the
    # builder is not needed any more, so it shuts down while the snapshots complete instead
    # of after the AMI is made (cleanup then finds it gone, or nearly).
    ec2.call("terminate_instances", InstanceIds=[str(state.instance_id)])
    state.released = True  # cleanup only waits for it to be gone
    ids = [str(state.manifest.root_snapshot), str(state.manifest.seed_snapshot)]
    ec2.wait_for(
        "snapshots " + " ".join(ids),
        lambda: _all_same(ec2.snapshot_states(ids)),
        "completed",
        timeout=3600,
        failed=("error",),
        kind="snapshots-completed",
    )


def register_image(state: _Build) -> None:
    """Register the role AMI: root and seed snapshot in its mapping, data kept on termination, IMDSv2."""
    assert state.base
    ec2, role, vol, manifest = state.ec2, state.role, state.role.volume, state.manifest
    name = _image_name(state)
    spec = resources.ImageSpec(
        name=name,
        description=role.description,
        architecture=state.base.architecture,
        root_device_name=state.base.root_device_name,
        ena_support=state.base.ena_support,
        boot_mode=state.base.boot_mode,
        disks=(
            resources.Disk(state.base.root_device_name, "gp3", None, True, snapshot_id=manifest.root_snapshot),
            resources.Disk(
                vol.device,
                vol.type,
                None,
                False,
                snapshot_id=manifest.seed_snapshot,
                iops=vol.iops,
                throughput=vol.throughput,
            ),
        ),
        image_tags=_image_tags(state),
    )
    with state.undo.creating():
        image_id = resources.register(ec2, spec, state.build_id)
        manifest.ami = image_id
        state.undo.push("image", image_id, lambda: ec2.call("deregister_image", ImageId=image_id))
    ec2.wait_for(
        f"image {image_id}",
        lambda: ec2.image_state(image_id),
        "available",
        timeout=3600,
        failed=("failed", "invalid", "error", "deregistered"),
        kind="image-available",
    )


def pair_and_keep(state: _Build) -> None:
    """Mark the AMI and both snapshots complete, each naming the AMI, in one call; keep them, the rest is temporary.

    The AMI names its snapshots from its creation (RegisterImage's tags); an EC2 that dropped
    those (moto does) gets them again first. From the last call on sweep leaves all three alone.
    """
    ec2, manifest = state.ec2, state.manifest
    ami = str(manifest.ami)
    created = _image_tags(state)
    if not created.items() <= tags.tags_of(ec2.described.get(ami, {})).items():  # the wait's last answer
        ec2.call("create_tags", Resources=[ami], Tags=tag_list(created))
    artefacts = [ami, str(manifest.seed_snapshot), str(manifest.root_snapshot)]
    ec2.call("create_tags", Resources=artefacts, Tags=tag_list(tags.artefacts_done(ami)))
    for resource_id in artefacts:  # only once all three are complete: never half-paired
        state.undo.keep(resource_id)


def deprecate_and_protect(state: _Build) -> None:
    """Deprecate the new AMI when asked; with protection, move deregistration protection onto it.

    The previous newest AMIs of the role lose their protection, so that prune may remove them later.
    """
    ec2, role, image_id = state.ec2, state.role, str(state.manifest.ami)
    options = state.options
    when = deprecate_time(options.deprecate_at, options.deprecate_after or role.deprecate_after_days, datetime.now(UTC))
    if when:
        ec2.call("enable_image_deprecation", ImageId=image_id, DeprecateAt=when)
        log.info("%s: %s deprecated from %s on", role.name, image_id, when)
    if not (options.protect or role.deregistration_protection):
        return
    ec2.call("enable_image_deregistration_protection", ImageId=image_id)
    for older in role_images(ec2, roles=[role.name]):
        if older.image_id != image_id and older.protected:
            ec2.call("disable_image_deregistration_protection", ImageId=older.image_id)
            log.info("%s: deregistration protection moved from %s to %s", role.name, older.image_id, image_id)


FREEZE_TIMEOUT = 120.0  # seconds the builder may stay frozen before its watchdogs thaw it

_BEFORE: list[tuple[str, Callable[[_Build], None]]] = [
    ("resolve base image", resolve_base),
    ("temporary credentials", temporary_credentials),
    ("launch builder", launch_builder),
    ("connect over SSH", connect_ssh),
    ("provision, verify, image hygiene", run_scripts),
]
_AFTER: list[tuple[str, Callable[[_Build], None]]] = [
    ("register AMI", register_image),
    ("pair and tag", pair_and_keep),
    ("deprecate and protect", deprecate_and_protect),
]
# The default: no stop on the critical path. --stop: the old way.
STAGES = [*_BEFORE, ("freeze and snapshot", freeze_and_snapshot), *_AFTER]
STOP_STAGES = [
    *_BEFORE,
    ("stop builder", stop_builder),
    ("snapshot root and data volume", snapshot_volumes),
    *_AFTER,
]


# ---------------------------------------------------------------- helpers


def _remove_orphans(state: _Build) -> list[Resource]:
    """Remove what carries this build's id but is on no undo stack, and record it.

    A create call whose response was lost (CreateSnapshot has no client token) can leave
    a twin that only the tag knows of. Returns those that could not be removed.
    """
    known = {r.id for r in state.undo.resources}
    try:
        orphans = [
            f
            for f in find_leftovers(state.ec2, 0, build_id=state.build_id)
            # the builder's root volume lives and dies with the builder, which is on the stack
            if f.id not in known and f.tool_kind not in BUILDER_VOLUMES
        ]
        remove(state.ec2, orphans)
    except CloudError as exc:
        log.warning("%s: could not look for orphans of build %s: %s", state.role.name, state.build_id, exc)
        return []
    recorded = [Resource(f.kind.rstrip("s").replace("_", "-"), f.id, lambda: None, f.fate, f.error) for f in orphans]
    state.undo.resources.extend(recorded)
    return [r for r in recorded if r.fate == "left"]


def _end_builder(state: _Build, instance_id: str) -> None:
    """The builder's undo: terminate it (unless released already) and make sure it is gone.

    Released, with a security group of its own, it is not waited for here: the group's
    deletion, next on the undo stack, retries while EC2 answers DependencyViolation, which
    it does until the builder has terminated. That is the proof it is gone, and usually
    comes first time (the builder shut down while the snapshots and the image completed),
    so cleanup costs no DescribeInstances.
    """
    if state.released and state.own_group:
        return
    state.ec2.terminate(instance_id, requested=state.released)


def _image_name(state: _Build) -> str:
    return f"ebsrole-{state.role.name}-{state.build_id}"


def _image_tags(state: _Build) -> dict[str, str]:
    """Return the role AMI's tags at its creation: name, pending, what it carries, its two snapshots."""
    manifest = state.manifest
    facts = {**_image_facts(state), **tags.pairing(str(manifest.seed_snapshot), str(manifest.root_snapshot))}
    return {tags.NAME: _image_name(state), **state.stamp.artefact(tags.KIND_IMAGE, tags.STATUS_PENDING, facts)}


def _image_facts(state: _Build) -> dict[str, str]:
    role, manifest = state.role, state.manifest
    paths = [p.path for p in role.externalize]
    return tags.image_facts(
        manifest.base_ami or "", manifest.fingerprint or "", role.volume.mount_point, role.volume.device, paths
    )


def _deleter(ec2: EC2, operation: str, **params: str) -> Callable[[], object]:
    return lambda: ec2.call(operation, **params)


def _all_same(states: list[str]) -> str:
    if "error" in states:
        return "error"
    return states[0] if len(set(states)) == 1 else "pending"


def _keep_builder(state: _Build) -> None:
    """--keep-on-failure: keep what reaches the builder and say how."""
    for resource in state.undo.resources:
        if resource.kind in ("instance", "volume", "security-group"):
            resource.fate = "kept"
    options = state.options
    host = options.ssh_host or state.instance.get("PublicIpAddress") or state.instance.get("PrivateIpAddress")
    proxy = options.reach.proxy(str(host), options.ssh_port, options.ssh_user, state.instance_id or "")
    if state.login is None or not state.instance_id:
        return
    # The one exception to "keys only in memory", asked for explicitly: without the key
    # the kept builder could not be reached at all.
    key_path = state.manifest.path.with_suffix(".key")
    write_atomic(key_path, state.login.private_openssh, mode=0o600)
    port = f" -p {state.options.ssh_port}" if state.options.ssh_port != 22 else ""
    port += f" -o ProxyCommand={shlex.quote(proxy)}" if proxy else ""
    log.warning(
        "%s: kept builder %s for debugging: ssh -i %s%s %s@%s ; remove it afterwards with: "
        "python build.py sweep --build-id %s",
        state.role.name,
        state.instance_id,
        key_path,
        port,
        state.options.ssh_user,
        host,
        state.build_id,
    )

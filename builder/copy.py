"""Copies of a role AMI in other regions: its snapshots, tags and AMI/seed-snapshot pairing kept."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import publish, tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.errors import BuildError, CopiesFailed, InvalidInput
from builder.registry import RoleImage, role_images
from builder.tags import tag_list

log = logging.getLogger(__name__)


@dataclass
class Copied:
    region: str
    ami: str
    seed_snapshot: str
    root_snapshot: str
    source_ami: str
    source_region: str
    published: list[dict[str, Any]] = field(default_factory=list)  # its SSM parameters in its region


def copy_to_regions(
    source: EC2,
    connect: Callable[[str], EC2],
    role: str,
    ami: str | None,
    regions: Sequence[str],
    *,
    keys: Mapping[str, str] | None = None,
    publish_to: bool = True,
    env: str = "",
) -> list[Copied]:
    """Copy AMI ``ami`` of ``role`` (default: its newest) to each of ``regions`` at once; return the copies.

    ``keys``: the KMS key of the copy in a region (region -> key); a region not named gets its default key.
    With ``publish_to`` each copy is published in its region (``builder.publish``: the
    role's AMI and seed snapshot, and ``env``'s AMI when given).

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
    stray = sorted(set(keys or {}) - set(wanted))
    if stray:
        raise InvalidInput(f"--kms-key-id {stray[0]}=...: {stray[0]} is not a region the AMI is copied to")
    targets = {region: connect(region) for region in wanted}
    started = time.monotonic()
    log.info("%s: copying %s to %s at once ...", role, image.image_id, ", ".join(wanted))
    made = copy_images(source, targets, image, keys or {}, publish_to=publish_to, env=env)
    log.info("%s: copies done after %.1f s", role, time.monotonic() - started)
    return made


def copy_images(
    source: EC2,
    targets: dict[str, EC2],
    image: RoleImage,
    keys: Mapping[str, str] | None = None,
    *,
    publish_to: bool = False,
    env: str = "",
) -> list[Copied]:
    """Copy a role AMI to every target region at once; return the copies in the targets' order.

    Each copy is EC2's work, so waiting for them one after another would add their times:
    they run on one thread each. A failure in one region does not stop the others
    (CopiesFailed names it and what completed). On Ctrl-C or SIGTERM the copies EC2 is still
    making are named in a warning: they finish on their own, untagged, and running the copy
    again (same client token) picks them up and tags them. With ``publish_to`` each copy is
    published in its region as soon as it is made (its ``published`` says how).
    """
    raw = source.call("describe_images", ImageIds=[image.image_id])["Images"][0]
    started: dict[str, str] = {}
    done: dict[str, Copied] = {}
    failed: dict[str, BuildError] = {}

    def one(region: str, target: EC2) -> None:
        try:
            done[region] = copy_image(
                source,
                target,
                image,
                raw,
                on_started=lambda ami: started.update({region: ami}),
                kms_key_id=(keys or {}).get(region),
            )
            if publish_to:  # never raises: a copy that is made stays made
                _publish(target, done[region], image.role, env)
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
    *,
    kms_key_id: str | None = None,
) -> Copied:
    """Copy a role AMI (and so its snapshots) to ``target``'s region, tags and pairing kept.

    ``raw`` is the source image's description if the caller has it; ``on_started`` hears
    the copy's AMI id as soon as EC2 has given it.
    """
    raw = raw or source.call("describe_images", ImageIds=[image.image_id])["Images"][0]
    source_tags = tags.tags_of(raw)
    description = str(raw.get("Description") or f"ebsrole {image.role}")
    copied = resources.copy_image(target, source.region, image.image_id, image.name, description, kms_key_id=kms_key_id)
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
    copy_tags = tags.copied_image(source_tags, origin, seed, root, copied)
    target.call("create_tags", Resources=[copied], Tags=tag_list(copy_tags))
    for snapshot, kind in ((seed, tags.KIND_SEED_SNAPSHOT), (root, tags.KIND_ROOT_SNAPSHOT)):
        if snapshot:
            snap_tags = tags.copied_snapshot(source_tags, origin, kind, copied)
            target.call("create_tags", Resources=[snapshot], Tags=tag_list(snap_tags))
    return Copied(target.region, copied, seed, root, image.image_id, source.region)


def _publish(target: EC2, copied: Copied, role: str, env: str) -> None:
    """Publish a copy in its region: the role's AMI and seed snapshot (and ``env``'s AMI); record the outcomes."""
    writer = f"copy from {copied.source_region}/{copied.source_ami}"
    made = publish.image_parameters(role, copied.ami, copied.seed_snapshot, writer, [env] if env else [])
    copied.published = [asdict(p) for p in publish.publish(target, made, role, env)]

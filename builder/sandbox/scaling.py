"""Auto Scaling in the sandbox: moto's groups, with real machines for the instances they make.

moto's Auto Scaling makes and ends instances by calling its EC2 model directly, never through
an HTTP RunInstances, so the data plane would not see them. After each Auto Scaling call that
changes something, :func:`reconcile` compares the instances before and after: a new one is
given what EC2 would have given it from its launch template (the image's recorded mappings
merged with the template's, so the data volume is made from the template's snapshot; the
template's volume tags, user data and key pair) and then booted like a RunInstances' instance;
one that moto terminated has its machine stopped and its deleted volumes dropped.

moto has no instance refresh: :func:`start_instance_refresh` replaces every instance of the
group at once, new ones first (EC2 rolls them by MinHealthyPercentage).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import uuid
from typing import Any

from builder.errors import EC2Error

log = logging.getLogger("builder.sandbox.scaling")

NAMESPACE = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
TEMPLATE_ID_TAG = "aws:ec2launchtemplate:id"
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"


def states(backend: Any) -> dict[str, str]:
    """Return each instance's state in ``backend`` (what :func:`reconcile` compares)."""
    return {i.id: i.state for i in backend.all_instances()}


def groups(account: str, region: str) -> Any:
    """Return moto's Auto Scaling backend of the region."""
    from moto.autoscaling.models import autoscaling_backends

    return autoscaling_backends[account][region]


def reconcile(sandbox: Any, backend: Any, before: dict[str, str]) -> None:
    """Boot a machine for each instance moto made since ``before``; stop the machines of those it terminated."""
    now = states(backend)
    ended = [i for i, state in now.items() if state == "terminated" and before.get(i) not in (None, "terminated")]
    if ended:
        log.info("Auto Scaling terminated %s", " ".join(ended))
        sandbox._terminate(backend, ended, moto_done=True)
    for instance_id in [i for i in now if i not in before]:
        instance = backend.get_instance(instance_id)
        log.info("Auto Scaling launched %s", instance_id)
        try:
            adopt(backend, instance)
            sandbox._make_volumes(backend, instance)
        except Exception as exc:  # as on EC2: that instance ends terminated, with the reason
            log.exception("%s: adopting it failed", instance_id)
            sandbox._failed_launch(backend, instance, f"{type(exc).__name__}: {exc}")
            continue
        sandbox._start_machine(backend, instance, first=True)


def adopt(backend: Any, instance: Any) -> None:
    """Give an instance moto's Auto Scaling made what EC2 gives it from its launch template.

    Its block devices become its image's (as the sandbox recorded them) merged with the
    template's, the template's volume tags go onto its volumes, and its user data and key
    pair are kept for the machine. Raises KeyError when the template is gone.
    """
    from builder.sandbox.server import merge_mappings

    found = {t["key"]: t["value"] for t in instance.get_tags()}
    version = backend._get_template_from_args(
        {"LaunchTemplateId": found[TEMPLATE_ID_TAG], "Version": found[TEMPLATE_VERSION_TAG]}
    )
    data = version.data
    image = backend.amis[instance.image_id]
    recorded = getattr(image, "sandbox_mappings", None) or [
        {"DeviceName": image.root_device_name, "Ebs": {"VolumeSize": 8, "DeleteOnTermination": True}}
    ]
    made = [block.volume_id for _, block in instance.get_block_device_mapping]
    instance.teardown_defaults()
    for volume_id in made:
        if volume_id in backend.volumes:
            backend.delete_volume(volume_id)
    for mapping in merge_mappings(recorded, _typed(data.get("BlockDeviceMappings") or [])):
        ebs = mapping.get("Ebs")
        if ebs is None:
            continue
        instance.add_block_device(
            ebs.get("VolumeSize"),
            mapping["DeviceName"],
            ebs.get("SnapshotId"),
            bool(ebs.get("Encrypted", False)),
            bool(ebs.get("DeleteOnTermination", True)),
            ebs.get("KmsKeyId"),
            volume_type=ebs.get("VolumeType"),
        )
    volume_tags = {
        t["Key"]: t["Value"]
        for spec in data.get("TagSpecifications") or []
        if spec.get("ResourceType") == "volume"
        for t in spec.get("Tags") or []
    }
    if volume_tags:
        backend.create_tags([block.volume_id for _, block in instance.get_block_device_mapping], volume_tags)
    _machine_inputs(backend, instance, data)


def _machine_inputs(backend: Any, instance: Any, data: dict[str, Any]) -> None:
    """Keep the template's user data (decoded) and key pair, and its IMDS settings, on the instance."""
    from builder.sandbox.server import _wants_public

    user_data = str(data.get("UserData") or "")
    with contextlib.suppress(binascii.Error, UnicodeDecodeError):
        user_data = base64.b64decode(user_data, validate=True).decode()
    pair = backend.key_pairs.get(data.get("KeyName") or "")
    instance.sandbox_user_data = user_data
    instance.sandbox_keys = [pair.material_public.decode().strip()] if pair is not None else []
    instance.sandbox_public = _wants_public({}, instance)
    if data.get("MetadataOptions"):
        from moto.ec2.models.instances import MetadataOptions

        instance.metadata_options = MetadataOptions(dict(data["MetadataOptions"]))


def _typed(mappings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return mappings whose query-string values ("true", "10") are typed as the API's."""

    def typed(value: Any) -> Any:
        if value in ("true", "false"):
            return value == "true"
        return int(value) if isinstance(value, str) and value.isdigit() else value

    return [{**m, **({"Ebs": {k: typed(v) for k, v in m["Ebs"].items()}} if "Ebs" in m else {})} for m in mappings]


def start_instance_refresh(account: str, region: str, params: dict[str, str]) -> bytes:
    """Replace every instance of the group (new ones first) and return the answer's XML body.

    Raises EC2Error (ValidationError) for a group that does not exist.
    """
    name = params.get("AutoScalingGroupName", "")
    group = groups(account, region).autoscaling_groups.get(name)
    if group is None:
        raise EC2Error("ValidationError", f"AutoScalingGroup name not found - AutoScalingGroup '{name}' not found")
    old = list(group.instance_states)
    if old:
        group.replace_autoscaling_group_instances(len(old), group.get_propagated_tags())
        group.instance_states = [s for s in group.instance_states if s not in old]
        group.autoscaling_backend.ec2_backend.terminate_instances([s.instance.id for s in old])
    refresh = str(uuid.uuid4())
    return (
        f'<StartInstanceRefreshResponse xmlns="{NAMESPACE}"><StartInstanceRefreshResult>'
        f"<InstanceRefreshId>{refresh}</InstanceRefreshId></StartInstanceRefreshResult>"
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></StartInstanceRefreshResponse>"
    ).encode()

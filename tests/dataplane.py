"""A test data plane behind in-process moto: real local machines for the instances EC2 launches.

botocore event hooks on the tool's own EC2 client start a local Debian machine from the
user-data of RunInstances (so the machine gets exactly the keys the build generated) with
its launch-mapped volumes, plug a loop-device volume in on AttachVolume (as /dev/xvdX and
by volume id), halt the
machine on StopInstances and remove it on TerminateInstances. They also record every
request, so tests can assert on what moto does not keep (block-device mappings, IMDSv2,
user-data), and inject failures into any call.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions

from builder.sandbox.machine import Disk, Machine, free_port, make_image
from tests.machines import next_address


@dataclass
class DataPlane:
    rootfs: Path
    workdir: Path
    with_machines: bool = True
    address: str = field(default_factory=next_address)
    port: int = 0
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    machines: dict[str, Machine] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)  # operation -> fail on this call number
    calls: Counter[str] = field(default_factory=Counter)
    host_key_override: str | None = None
    region: str = "eu-west-1"

    def __post_init__(self) -> None:
        self.port = free_port(self.address)

    def install(self, client: Any) -> None:
        self.region = client.meta.region_name
        events = client.meta.events
        events.register("provide-client-params.ec2.*", self._record)
        events.register("before-call.ec2.*", self._maybe_fail)
        if self.with_machines:
            events.register("after-call.ec2.RunInstances", self._run)
            events.register("after-call.ec2.AttachVolume", self._attach)
            events.register("after-call.ec2.StopInstances", self._stop)
            events.register("after-call.ec2.TerminateInstances", self._terminate)

    def params(self, operation: str) -> list[dict[str, Any]]:
        return [p for op, p in self.requests if op == operation]

    def stop_all(self) -> None:
        for machine in self.machines.values():
            machine.stop()

    # ------------------------------------------------------------ hooks

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.requests.append((model.name, dict(params)))

    def _maybe_fail(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1
        if self.fail.get(model.name) == self.calls[model.name]:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "InjectedFault", "Message": f"injected failure of {model.name}"}}, model.name
            )

    def _run(self, parsed: dict[str, Any], **_: Any) -> None:
        if "Instances" not in parsed:
            return
        user_data = self.params("RunInstances")[-1]["UserData"]
        if isinstance(user_data, bytes):
            user_data = user_data.decode()
        if not user_data.startswith("#cloud-config"):
            user_data = base64.b64decode(user_data).decode()
        if self.host_key_override:
            user_data = self.host_key_override
        instance_id = parsed["Instances"][0]["InstanceId"]
        # Launch-mapped data volumes are plugged in from the start, as on EC2 (a plain client:
        # this look must not count as the tool's call).
        plain = boto3.client("ec2", region_name=self.region)
        described = plain.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        root = described.get("RootDeviceName")
        disks = []
        for mapping in described.get("BlockDeviceMappings", []):
            if mapping["DeviceName"] == root:
                continue
            volume_id = mapping["Ebs"]["VolumeId"]
            node = "xvd" + mapping["DeviceName"].removeprefix("/dev/sd").removeprefix("/dev/xvd")
            disks.append(Disk(make_image(self.workdir / "volumes" / f"{volume_id}.img", 2), node, volume_id))
        self.machines[instance_id] = Machine.start(
            instance_id,
            [self.rootfs],
            user_data=user_data,
            ssh_address=self.address,
            ssh_port=self.port,
            disks=disks,
            state_root=self.workdir / "machines",
        )

    def _attach(self, parsed: dict[str, Any], **_: Any) -> None:
        params = self.params("AttachVolume")[-1]
        machine = self.machines.get(params["InstanceId"])
        if machine is None or "VolumeId" not in parsed:
            return
        node = "xvd" + params["Device"].removeprefix("/dev/sd").removeprefix("/dev/xvd")
        image = make_image(self.workdir / "volumes" / f"{params['VolumeId']}.img", 2)
        machine.attach(Disk(image, node, params["VolumeId"]))

    def _stop(self, parsed: dict[str, Any], **_: Any) -> None:
        for instance_id in self.params("StopInstances")[-1]["InstanceIds"]:
            if instance_id in self.machines:
                self.machines[instance_id].stop(clean=True)

    def _terminate(self, parsed: dict[str, Any], **_: Any) -> None:
        for instance_id in self.params("TerminateInstances")[-1]["InstanceIds"]:
            machine = self.machines.pop(instance_id, None)
            if machine is not None:
                machine.stop()

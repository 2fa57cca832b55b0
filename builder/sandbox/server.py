"""The sandbox's EC2 endpoint: moto's EC2 API with a data plane behind it.

moto answers the EC2 API (its control plane: ids, states, attachments). A WSGI layer in
front of it watches the calls that change the world and makes them real in the data
plane (``dataplane.DataPlane``): RunInstances starts machines, AttachVolume plugs a
volume in, CreateSnapshot copies bytes, RegisterImage and CreateImage record what a later
RunInstances boots. It also makes moto tell the truth where it is fake: images keep the
block-device mappings they were given, an instance's private address is real (on its
VPC's bridge, out of the host's reach) and only an instance EC2 would give a public address
has one (the loopback address its machine answers on), a stopping instance is ``stopping``
until its machine has halted, a security group in use by an instance that has not
terminated cannot be deleted, and a machine that dies turns its instance ``stopped`` or
``terminated`` as its shutdown behaviour says. Any EC2 client works against it: the tool itself, or Packer.

Every request must be signed (SigV4) with the credentials ``sandbox start`` made
(``builder.sandbox.auth``); anything else, and every path but EC2's ``/`` and the
sandbox's status, gets 403. moto's own HTTP API (``/moto-api/*``: reset, data dump) is not
served: the sandbox reaches moto's state in this process only.

This module runs as its own process (``python -m builder.sandbox.server``), started by
``builder.sandbox.control``. moto's EC2 state is pickled into the state directory after
every change and loaded at start, so a stopped sandbox comes back with the same world.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime as dt
import io
import ipaddress
import json
import logging
import os
import pickle
import re
import signal
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from builder.errors import DataPlaneError, EC2Error
from builder.files import write_atomic
from builder.sandbox import capacity, scaling
from builder.sandbox.auth import Credentials, Refusal, load_credentials, verify
from builder.sandbox.dataplane import Attachment, DataPlane, Placement
from builder.sandbox.latency import SHOWN_BY, Latency, Model, new_seed
from builder.sandbox.rootfs import DEFAULT_CACHE, is_ready, rootfs_path

log = logging.getLogger("builder.sandbox.server")

AMIS = Path(__file__).with_name("debian-amis.json")
ACCOUNT = "123456789012"  # moto's default account
MOTO_STATE = "moto-ec2.pickle"
AUTOSCALING = "autoscaling"  # its regions' key in MOTO_STATE (EC2's regions are the others)
SERVER_FILE = "server.json"
STATUS_PATH = "/ebsrole-sandbox/status"
MAX_RANGE = 64  # a wider port range of a security group rule is not forwarded
DEBIAN_RELEASES = {"12": "bookworm", "13": "trixie"}
READ_ONLY = re.compile(r"^(Describe|Get|List)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_BODY = 16 * 2**20  # EC2's largest calls (RunInstances with user-data) are far smaller
SLIRP_NET = ipaddress.ip_network("10.0.2.0/24")  # every machine's link to the outside (slirp4netns)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def error_response(code: str, message: str, status: int) -> tuple[str, list[tuple[str, str]], bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{_xml(code)}</Code><Message>{_xml(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()
    reasons = {400: "Bad Request", 403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}
    reason = reasons.get(status, "Error")
    return f"{status} {reason}", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))], body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def response_ids(body: bytes, tag: str) -> list[str]:
    """Return the text of every ``tag`` element of an EC2 XML answer, in order, without repeats."""
    ids: list[str] = []
    for element in ET.fromstring(body).iter():  # noqa: S314 - moto's answer, made in this process
        if element.tag.rsplit("}", 1)[-1] == tag and element.text and element.text not in ids:
            ids.append(element.text)
    return ids


def mappings_from_params(params: dict[str, str]) -> list[dict[str, Any]]:
    """Return the BlockDeviceMapping.N.* query parameters as API-shaped dicts, in N order."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        match = re.fullmatch(r"BlockDeviceMapping\.(\d+)\.(.+)", key)
        if not match:
            continue
        entry = found.setdefault(int(match.group(1)), {})
        field = match.group(2)
        if field.startswith("Ebs."):
            entry.setdefault("Ebs", {})[field[4:]] = _typed(value)
        else:
            entry[field] = value
    return [found[n] for n in sorted(found)]


def mappings_to_params(params: dict[str, str], mappings: list[dict[str, Any]]) -> dict[str, str]:
    """Return ``params`` with its BlockDeviceMapping.N.* replaced by ``mappings``."""
    out = {k: v for k, v in params.items() if not k.startswith("BlockDeviceMapping.")}
    for n, mapping in enumerate(mappings, 1):
        for field, value in mapping.items():
            if field == "Ebs":
                for sub, sub_value in value.items():
                    out[f"BlockDeviceMapping.{n}.Ebs.{sub}"] = _wire(sub_value)
            else:
                out[f"BlockDeviceMapping.{n}.{field}"] = _wire(value)
    return out


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    return int(value) if value.isdigit() else value


def _wire(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def merge_mappings(image: list[dict[str, Any]], request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge a launch's mappings over its image's, by device, as EC2 does."""
    merged: dict[str, dict[str, Any]] = {m["DeviceName"]: json.loads(json.dumps(m)) for m in image}
    for mapping in request:
        device = mapping["DeviceName"]
        if "NoDevice" in mapping:
            merged.pop(device, None)
        elif device in merged and "Ebs" in mapping:
            merged[device]["Ebs"] = {**merged[device].get("Ebs", {}), **mapping["Ebs"]}
        else:
            merged[device] = mapping
    return list(merged.values())


class Sandbox:
    """The WSGI layer between EC2 clients and moto, and the owner of the data plane."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        state: Path,
        credentials: Credentials,
        cache: Path = DEFAULT_CACHE,
        model: Model | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.credentials = credentials  # the only ones it answers (builder.sandbox.auth)
        self.cache = cache
        self.plane = DataPlane(state / "data")
        self.lock = threading.RLock()
        self.calls = 0
        self.actions: Counter[str] = Counter()
        # "service:Action" as IAM names it (ec2:RunInstances, ssm:GetParameters): what a policy must allow.
        self.operations: Counter[str] = Counter()
        self.model = model or Model()
        self.latency = Latency(self.model, self.lock, self.plane.snapshot_bytes) if self.model.active else None
        if self.latency is not None:
            self.latency.on_running = self._now_running
        self._stop_watch = threading.Event()

    # ------------------------------------------------------------ moto's state

    @staticmethod
    def backends() -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[ACCOUNT]

    def backend(self, region: str) -> Any:
        return self.backends()[region]

    def load(self) -> None:
        """Load moto's EC2 state saved by an earlier run, and start the machines that were running."""
        path = self.state / MOTO_STATE
        if path.exists():
            saved: dict[str, Any] = pickle.loads(path.read_bytes())  # noqa: S301 - our own file, root-only dir
            # EC2's regions, and Auto Scaling's (whose groups hold EC2's instances: one pickle keeps them one).
            groups = saved.pop(AUTOSCALING, {})
            for region, backend in saved.items():
                self.backends()[region] = backend
            if groups:
                from moto.autoscaling.models import autoscaling_backends

                for region, backend in groups.items():
                    autoscaling_backends[ACCOUNT][region] = backend
        for region in list(self.backends().keys()):
            backend = self.backend(region)
            for instance in list(backend.all_instances()):
                if instance.id not in self.plane.instances:
                    continue
                if instance.state in ("running", "pending", "stopping"):
                    if instance.state == "stopping":
                        instance._state.name, instance._state.code = "stopped", 80
                        continue
                    self._start_machine(backend, instance)

    def save(self) -> None:
        """Pickle moto's EC2 state (every region used) next to the data plane's index."""
        backends = self.backends()
        from moto.autoscaling.models import autoscaling_backends

        groups = autoscaling_backends[ACCOUNT]
        saved = {region: backends[region] for region in list(backends.keys())}
        data = pickle.dumps({**saved, AUTOSCALING: {region: groups[region] for region in list(groups.keys())}})
        part = self.state / f".{MOTO_STATE}.part"
        part.write_bytes(data)
        part.chmod(0o600)
        part.replace(self.state / MOTO_STATE)

    # ------------------------------------------------------------ WSGI

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/", STATUS_PATH):  # moto's own API (/moto-api/reset, data.json) among them
            return self._refuse(
                environ, start_response, Refusal("AuthFailure", f"{path} is not served: EC2's API is at /")
            )
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return self._refuse(
                environ, start_response, Refusal("AuthFailure", "the request's Content-Length is refused")
            )
        raw = environ["wsgi.input"].read(length) if length else b""
        verdict = verify(environ, raw, self.credentials, dt.datetime.now(dt.UTC))
        if isinstance(verdict, Refusal):
            return self._refuse(environ, start_response, verdict)
        if path == STATUS_PATH:
            with self.lock:
                body = json.dumps(self.status(), indent=1).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("REQUEST_METHOD") != "POST":
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.app(environ, start_response)
        params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        action = params.get("Action", "")
        # SSM speaks JSON: its action is in X-Amz-Target ("AmazonSSM.GetParameters"), not the form.
        operation = f"{verdict.service}:{environ.get('HTTP_X_AMZ_TARGET', '').rpartition('.')[2] or action}"
        if self.latency is not None and not self.latency.bucket.admit():
            status, headers, body = error_response("RequestLimitExceeded", "Request limit exceeded.", 503)
            start_response(status, headers)
            return [body]
        with self.lock:
            self.calls += 1
            self.actions[action] += 1
            self.operations[operation] += 1
            handle = self._autoscaling if verdict.service == "autoscaling" else self._handle
            status, headers, body = handle(environ, verdict.region, action, params, raw)
        start_response(status, headers)
        return [body]

    @staticmethod
    def _refuse(environ: Environ, start_response: StartResponse, refusal: Refusal) -> Iterable[bytes]:
        """Answer 403 with an EC2 error, and log it (who knocks matters when the endpoint is shared)."""
        log.warning("refused %s %r: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), refusal.code)
        status, headers, body = error_response(refusal.code, refusal.message, 403)
        start_response(status, headers)
        return [body]

    def _handle(
        self, environ: Environ, region: str, action: str, params: dict[str, str], raw: bytes
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        backend = self.backend(region)
        before = getattr(self, f"_before_{action}", None)
        after = getattr(self, f"_after_{action}", None)
        try:
            if before is not None:
                new = before(backend, params)
                if new is not None:
                    params = new
                    raw = urlencode(params).encode()
            own = getattr(self, f"_answer_{action}", None)  # what moto lacks, answered here
            status, headers, body = own(backend, params) if own else self._call_moto(environ, raw)
            if after is not None and status.startswith("200"):
                changed = after(backend, params, body)
                if isinstance(changed, bytes):
                    body = changed
                    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                    headers.append(("Content-Length", str(len(body))))
            # A JSON service's answer (SSM's) has no form Action and is no EC2 XML: no latency, no ids.
            if self.latency is not None and action and status.startswith("200") and not READ_ONLY.match(action):
                ids = {t: response_ids(body, t) for t in ("instanceId", "volumeId", "snapshotId", "imageId")}
                self.latency.after(action, backend, params, ids)
            elif self.latency is not None and action in SHOWN_BY and self.latency.unseen and status.startswith("200"):
                # How late each tool sees a transition end: the first answer that shows it.
                self.latency.seen(action, response_ids(body, SHOWN_BY[action][0]))
        except EC2Error as exc:
            return error_response(exc.code, exc.message, exc.status)
        except DataPlaneError as exc:
            log.warning("%s: %s", action, exc)
            return error_response(exc.code, str(exc), 500)
        finally:
            if not READ_ONLY.match(action):
                self.save()
        return status, headers, body

    def _autoscaling(
        self, environ: Environ, region: str, action: str, params: dict[str, str], raw: bytes
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        """Answer an Auto Scaling call through moto; then give its new instances machines (``scaling``)."""
        backend = self.backend(region)
        before = scaling.states(backend)
        try:
            if action == "StartInstanceRefresh":  # moto has none
                body = scaling.start_instance_refresh(ACCOUNT, region, params)
                status, headers = "200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
            else:
                status, headers, body = self._call_moto(environ, raw)
            if status.startswith("200") and not READ_ONLY.match(action):
                scaling.reconcile(self, backend, before)
        except EC2Error as exc:
            return error_response(exc.code, exc.message, exc.status)
        finally:
            if not READ_ONLY.match(action):
                self.save()
        return status, headers, body

    def _call_moto(self, environ: Environ, raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        inner = dict(environ)
        inner["wsgi.input"] = io.BytesIO(raw)
        inner["CONTENT_LENGTH"] = str(len(raw))
        answer: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer["status"], answer["headers"] = status, headers

        chunks = self.app(inner, start)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()
        headers = [(k, v) for k, v in answer["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        return answer["status"], headers, body

    # ------------------------------------------------------------ instances

    def _before_RunInstances(self, backend: Any, params: dict[str, str]) -> dict[str, str]:
        self._check_capacity(backend, params)
        image = self._image(backend, params.get("ImageId", ""))
        if image.architecture != "x86_64":
            raise EC2Error("Unsupported", f"the sandbox runs x86_64 images only; {image.id} is {image.architecture}")
        recorded = getattr(image, "sandbox_mappings", None)
        if recorded is None:
            self._base_tree(image)
            recorded = [
                {
                    "DeviceName": image.root_device_name,
                    "Ebs": {"VolumeSize": 8, "DeleteOnTermination": True, "VolumeType": "gp3"},
                }
            ]
        mappings = merge_mappings(recorded, mappings_from_params(params))
        return mappings_to_params(params, mappings)

    def _after_RunInstances(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        user_data = params.get("UserData", "")
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            user_data = base64.b64decode(user_data, validate=True).decode()
        keys: list[str] = []
        if params.get("KeyName"):
            pair = backend.key_pairs.get(params["KeyName"])
            if pair is not None:
                keys.append(pair.material_public.decode().strip())
        for instance_id in response_ids(body, "instanceId"):
            instance = backend.get_instance(instance_id)
            instance.sandbox_user_data = user_data
            instance.sandbox_keys = keys
            instance.sandbox_public = _wants_public(params, instance)
            if self._fails_late(backend, instance):
                continue
            try:
                self._make_volumes(backend, instance)
            except (DataPlaneError, EC2Error, OSError) as exc:
                self._failed_launch(backend, instance, str(exc))
                continue
            # Pending a while (the latency model): its sshd answers once it shows running.
            self._start_machine(backend, instance, first=True, ssh_later=self._launch_pending())

    def _check_capacity(self, backend: Any, params: dict[str, str]) -> None:
        """Refuse a type its AZ does not offer (Unsupported), or one `sandbox capacity` refuses there."""
        itype = params.get("InstanceType", "m1.small")
        subnet = params.get("SubnetId")
        az = params.get("Placement.AvailabilityZone") or (
            backend.get_subnet(subnet).availability_zone if subnet else f"{backend.region_name}a"
        )
        from moto.ec2.models.instance_types import INSTANCE_TYPE_OFFERINGS

        offers = INSTANCE_TYPE_OFFERINGS["availability-zone"].get(backend.region_name, [])
        offering = sorted({o["Location"] for o in offers if o["InstanceType"] == itype})
        if offering and az not in offering:
            raise EC2Error("Unsupported", capacity.unsupported_message(itype, az))
        if capacity.load(self.state).refuses(itype, az):
            log.info("RunInstances: %s in %s refused (sandbox capacity)", itype, az)
            others = [z for z in offering if z != az]
            raise EC2Error("InsufficientInstanceCapacity", capacity.insufficient_message(itype, az, others), 500)

    def _fails_late(self, backend: Any, instance: Any) -> bool:
        """End ``instance`` terminated for capacity when `sandbox capacity --refuse-late` says so."""
        if not capacity.load(self.state).fails_late(instance.instance_type, instance.placement.zone):
            return False
        log.info(
            "%s: %s in %s terminated at launch (sandbox capacity)",
            instance.id,
            instance.instance_type,
            instance.placement.zone,
        )
        volumes = [block.volume_id for _, block in instance.get_block_device_mapping]
        self._terminate(backend, [instance.id])
        for volume_id in volumes:  # it never ran: EC2 keeps none of its volumes
            if volume_id in backend.volumes:
                backend.delete_volume(volume_id)
        _set_reason(
            instance,
            "Server.InsufficientInstanceCapacity",
            "Server.InsufficientInstanceCapacity: Insufficient capacity.",
        )
        return True

    def _make_volumes(self, backend: Any, instance: Any) -> None:
        for device, block in instance.get_block_device_mapping:
            volume = backend.get_volume(block.volume_id)
            if device == instance.root_device_name:
                layers = self.plane.root_layers(volume.snapshot_id)
                image = backend.amis.get(instance.image_id)
                if layers is None and image is not None and getattr(image, "sandbox_mappings", None) is None:
                    layers = [str(self._base_tree(image))]
                if layers is not None:
                    self.plane.create_root_volume(volume.id, layers)
            else:
                self.plane.create_volume(volume.id, volume.size, volume.snapshot_id)

    def _start_machine(self, backend: Any, instance: Any, *, first: bool = False, ssh_later: bool = False) -> None:
        root = None
        attachments = []
        for device, block in instance.get_block_device_mapping:
            if device == instance.root_device_name:
                root = block.volume_id
            else:
                attachments.append(Attachment(block.volume_id, device))
        try:
            if root is None or not self.plane.is_root_volume(root):
                raise DataPlaneError("Server.InternalError", f"{instance.id} has no root filesystem to boot")
            if first:
                self.plane.launch(
                    instance.id,
                    root,
                    attachments,
                    getattr(instance, "sandbox_user_data", ""),
                    getattr(instance, "sandbox_keys", []),
                    placement=_placement(backend, instance),
                    public=getattr(instance, "sandbox_public", True),
                    ssh_later=ssh_later,
                )
            else:
                self.plane.start(instance.id, attachments)
        except DataPlaneError as exc:
            if first:
                self._failed_launch(backend, instance, str(exc))
            else:
                log.warning("%s", exc)
                instance.stop()
                _set_reason(instance, "Server.InternalError", f"Server.InternalError: {exc}")
            return
        self._show_address(instance)
        if not ssh_later:  # else _now_running does, when the latency model ends its pending
            self.plane.forward(instance.id, _open_ports(instance))

    def _launch_pending(self) -> bool:
        """Return True when launches stay pending a while: their sshd answers from `running` on, as on EC2."""
        return self.latency is not None and self.model.instance_pending > 0

    def _now_running(self, instance: Any) -> None:
        """A launch's pending ended: its machine's sshd (and what its groups admit) answers from now on."""
        try:
            self.plane.forward(instance.id, _open_ports(instance))
        except (DataPlaneError, OSError) as exc:
            log.warning("%s: could not open its ports: %s", instance.id, exc)

    def _after_AuthorizeSecurityGroupIngress(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        for instance in backend.all_instances():
            if instance.state == "running" and params.get("GroupId") in {g.id for g in instance.security_groups}:
                self.plane.forward(instance.id, _open_ports(instance))

    def _failed_launch(self, backend: Any, instance: Any, why: str) -> None:
        """An instance that cannot boot ends terminated with Server.InternalError, as on EC2."""
        log.warning("%s: launch failed: %s", instance.id, why)
        self._terminate(backend, [instance.id])
        _set_reason(instance, "Server.InternalError", f"Server.InternalError: {why}")

    def _show_address(self, instance: Any) -> None:
        """Show the machine's loopback address as the public address, or none (moto may have made one up)."""
        address = self.plane.address(instance.id)
        primary = instance.nics.get(0)
        if primary is not None:
            primary.public_ip = address
            primary.public_ip_auto_assign = False  # moto would make one up at the next start

    def _before_StartInstances(self, backend: Any, params: dict[str, str]) -> None:
        for instance_id in _indexed(params, "InstanceId"):
            if self.plane.is_stopping(instance_id):
                raise EC2Error(
                    "IncorrectInstanceState",
                    f"The instance '{instance_id}' is not in a state from which it can be started.",
                )

    def _after_StartInstances(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        running = self.plane.running()
        for instance_id in _indexed(params, "InstanceId"):
            if instance_id in running and not running[instance_id]:
                self._start_machine(backend, backend.get_instance(instance_id))

    def _after_StopInstances(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        running = self.plane.running()
        for instance_id in _indexed(params, "InstanceId"):
            if not running.get(instance_id):
                continue
            instance = backend.get_instance(instance_id)
            instance._state.name, instance._state.code = "stopping", 64
            self.plane.begin_stop(instance_id)
            threading.Thread(target=self._halt, args=(backend, instance), daemon=True).start()

    def _halt(self, backend: Any, instance: Any) -> None:
        try:
            self.plane.stop(instance.id)
            if self.latency is not None:  # EC2's stop takes its time even when the machine is quick
                time.sleep(self.latency.remaining_stop(instance.id))
        finally:
            with self.lock:
                if instance.state == "stopping":
                    instance._state.name, instance._state.code = "stopped", 80
                    if self.latency is not None:
                        self.latency.ended(instance.id, "instance_stopping")
                self.plane.prune_networks()
                self.save()

    def _after_TerminateInstances(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        self._terminate(backend, _indexed(params, "InstanceId"), moto_done=True)

    def _terminate(self, backend: Any, instance_ids: list[str], *, moto_done: bool = False) -> None:
        if not moto_done:
            backend.terminate_instances(instance_ids)
        for instance_id in instance_ids:
            if instance_id in self.plane.instances:
                self.plane.terminate(instance_id)
        self._forget_deleted_volumes()

    def _forget_deleted_volumes(self) -> None:
        alive: set[str] = set()
        for region in list(self.backends().keys()):
            alive.update(self.backend(region).volumes)
        for volume_id in [v for v in self.plane.volumes if v not in alive]:
            self.plane.delete_volume(volume_id)

    # ------------------------------------------------------------ volumes

    def _after_CreateVolume(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        for volume_id in response_ids(body, "volumeId"):
            volume = backend.get_volume(volume_id)
            try:
                self.plane.create_volume(volume_id, volume.size, volume.snapshot_id)
            except (OSError, DataPlaneError) as exc:
                backend.delete_volume(volume_id)
                raise EC2Error("InternalError", f"creating {volume_id}: {exc}", 500) from exc

    def _after_DeleteVolume(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        self._forget_deleted_volumes()

    def _before_AttachVolume(self, backend: Any, params: dict[str, str]) -> None:
        self.plane.check_attachable(params.get("VolumeId", ""))

    def _after_AttachVolume(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        instance_id, volume_id, device = params["InstanceId"], params["VolumeId"], params["Device"]
        try:
            self.plane.attach(instance_id, volume_id, device)
        except DataPlaneError:
            backend.detach_volume(volume_id, instance_id, device)
            raise

    def _before_DetachVolume(self, backend: Any, params: dict[str, str]) -> dict[str, str]:
        volume = backend.get_volume(params.get("VolumeId", ""))
        if volume.attachment is None:
            raise EC2Error("IncorrectState", f"Volume '{volume.id}' is in the 'available' state.")
        params = dict(params)
        params.setdefault("InstanceId", volume.attachment.instance.id)
        params.setdefault("Device", volume.attachment.device)
        return params

    def _after_DetachVolume(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        self.plane.detach(params["InstanceId"], params["Device"])

    # ------------------------------------------------------------ snapshots and images

    def _after_CreateSnapshot(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        self._after_CreateSnapshot_key(backend, params, body)
        for snapshot_id in response_ids(body, "snapshotId"):
            try:
                self.plane.snapshot(params["VolumeId"], snapshot_id)
            except DataPlaneError:
                backend.snapshots.pop(snapshot_id, None)
                raise

    def _after_CreateSnapshot_key(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        """EC2 names the key of every encrypted snapshot (moto drops the volume's): keep the volume's key."""
        volume = backend.volumes.get(params["VolumeId"])
        for snapshot_id in response_ids(body, "snapshotId"):
            snapshot = backend.snapshots.get(snapshot_id)
            if snapshot is not None and volume is not None and volume.encrypted:
                snapshot.kms_key_id = volume.kms_key_id or backend._create_default_encryption_key()

    # ------------------------------------------------------------ what moto lacks: deprecation, protection

    def _answer_EnableImageDeprecation(self, backend: Any, params: dict[str, str]) -> tuple[str, list[Any], bytes]:
        image = self._image(backend, params.get("ImageId", ""))
        try:
            when = dt.datetime.fromisoformat(params.get("DeprecateAt", "").replace("Z", "+00:00"))
        except ValueError:
            raise EC2Error(
                "InvalidParameterValue", f"DeprecateAt {params.get('DeprecateAt')!r} is not a time"
            ) from None
        image.deprecation_time = when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return _returned("EnableImageDeprecation")

    def _answer_DisableImageDeprecation(self, backend: Any, params: dict[str, str]) -> tuple[str, list[Any], bytes]:
        self._image(backend, params.get("ImageId", "")).deprecation_time = None
        return _returned("DisableImageDeprecation")

    def _answer_EnableImageDeregistrationProtection(
        self, backend: Any, params: dict[str, str]
    ) -> tuple[str, list[Any], bytes]:
        cooldown = params.get("WithCooldown") == "true"
        image = self._image(backend, params.get("ImageId", ""))
        image.deregistration_protection = "enabled-with-cooldown" if cooldown else "enabled-without-cooldown"
        return _returned("EnableImageDeregistrationProtection")

    def _answer_DisableImageDeregistrationProtection(
        self, backend: Any, params: dict[str, str]
    ) -> tuple[str, list[Any], bytes]:
        # The sandbox has no 24-hour cooldown: protection ends at once, with or without it.
        self._image(backend, params.get("ImageId", "")).deregistration_protection = "disabled"
        return _returned("DisableImageDeregistrationProtection")

    def _before_DeleteSecurityGroup(self, backend: Any, params: dict[str, str]) -> None:
        """EC2 refuses to delete a group an instance still uses, until it has terminated (moto does not)."""
        group_id = params.get("GroupId")
        for instance in backend.all_instances():
            # The group is held by the instance's network interfaces (moto puts it there too when
            # given SecurityGroupIds), which go when it has terminated.
            in_use = any(g.id == group_id for nic in instance.nics.values() for g in nic.group_set)
            if in_use and instance.state != "terminated":
                raise EC2Error("DependencyViolation", f"resource {group_id} has a dependent object")

    def _before_DeregisterImage(self, backend: Any, params: dict[str, str]) -> None:
        image = backend.amis.get(params.get("ImageId", ""))
        if image is not None and str(getattr(image, "deregistration_protection", "") or "").startswith("enabled"):
            raise EC2Error(
                "InvalidParameterValue",
                f"The AMI {image.id} has deregistration protection enabled: disable it first "
                "(DisableImageDeregistrationProtection)",
            )

    def _after_GetConsoleOutput(self, backend: Any, params: dict[str, str], body: bytes) -> bytes:
        """The machine's console (EC2 keeps the last 64 KiB), not moto's canned text."""
        text = ANSI.sub("", self.plane.console(params.get("InstanceId", ""))).replace("\r", "")
        encoded = base64.b64encode(text.encode()[-65536:]).decode()
        return re.sub(rb"<output>.*?</output>", f"<output>{encoded}</output>".encode(), body, flags=re.S)

    def _after_CopyImage(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        """A copied image gets copies of the source image's snapshots, as EC2 makes them."""
        source_region = params["SourceRegion"]
        source = self.backend(source_region).amis[params["SourceImageId"]]
        for image_id in response_ids(body, "imageId"):
            image = backend.amis[image_id]
            image.root_device_name = source.root_device_name
            image.architecture = source.architecture
            image.imds_support = getattr(source, "imds_support", None)
            mappings = []
            for mapping in json.loads(json.dumps(source.block_device_mappings)):
                snapshot_id = mapping.get("Ebs", {}).get("SnapshotId")
                if snapshot_id:
                    copy = backend.copy_snapshot(
                        snapshot_id, source_region, f"Copied for {image_id} from {source_region}", None
                    )
                    # As EC2: the copy's key is KmsKeyId, else (encrypted) the region's default key.
                    if params.get("KmsKeyId") or params.get("Encrypted") == "true":
                        copy.encrypted = True
                        copy.kms_key_id = params.get("KmsKeyId") or backend._create_default_encryption_key()
                    mapping["Ebs"].pop("KmsKeyId", None)
                    mapping["Ebs"]["Encrypted"] = bool(copy.encrypted)
                    self.plane.copy_snapshot(snapshot_id, copy.id)
                    mapping["Ebs"]["SnapshotId"] = copy.id
                mappings.append(mapping)
            self._record_mappings(backend, image, mappings)

    def _after_CopySnapshot(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        for snapshot_id in response_ids(body, "snapshotId"):
            self.plane.copy_snapshot(params["SourceSnapshotId"], snapshot_id)

    def _after_DeleteSnapshot(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        self.plane.delete_snapshot(params["SnapshotId"])

    def _before_RegisterImage(self, backend: Any, params: dict[str, str]) -> None:
        for mapping in mappings_from_params(params):
            snapshot_id = mapping.get("Ebs", {}).get("SnapshotId")
            if snapshot_id and snapshot_id not in backend.snapshots:
                raise EC2Error("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")

    def _after_RegisterImage(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        for image_id in response_ids(body, "imageId"):
            image = backend.amis[image_id]
            image.root_device_name = params.get("RootDeviceName", image.root_device_name)
            image.architecture = params.get("Architecture", "x86_64")
            if params.get("ImdsSupport"):
                image.imds_support = params["ImdsSupport"]
            if params.get("BootMode"):
                image.boot_mode = params["BootMode"]
            self._record_mappings(backend, image, mappings_from_params(params))
            keys = [k.removesuffix(".Key") for k in params if re.fullmatch(r"TagSpecification\.\d+\.Tag\.\d+\.Key", k)]
            tags = {params[f"{key}.Key"]: params.get(f"{key}.Value", "") for key in keys}
            if tags:
                backend.create_tags([image_id], tags)

    def _after_CreateImage(self, backend: Any, params: dict[str, str], body: bytes) -> None:
        instance = backend.get_instance(params["InstanceId"])
        for image_id in response_ids(body, "imageId"):
            image = backend.amis[image_id]
            image.root_device_name = instance.root_device_name
            mappings = []
            for device, block in instance.get_block_device_mapping:
                snapshot = backend.create_snapshot(
                    block.volume_id, f"Created by CreateImage({instance.id}) for {image_id}", from_ami=image_id
                )
                try:
                    self.plane.snapshot(block.volume_id, snapshot.id)
                except DataPlaneError:
                    backend.snapshots.pop(snapshot.id, None)
                    backend.amis.pop(image_id, None)
                    raise
                mappings.append(
                    {
                        "DeviceName": device,
                        "Ebs": {"SnapshotId": snapshot.id, "DeleteOnTermination": bool(block.delete_on_termination)},
                    }
                )
            self._record_mappings(backend, image, mappings)

    def _record_mappings(self, backend: Any, image: Any, mappings: list[dict[str, Any]]) -> None:
        """Keep an image's mappings (moto drops them) and drop moto's made-up snapshot."""
        shown = []
        for mapping in mappings:
            ebs = dict(mapping.get("Ebs", {}))
            snapshot = backend.snapshots.get(ebs.get("SnapshotId", ""))
            if snapshot is not None:
                snapshot.from_ami = image.id
                ebs.setdefault("VolumeSize", snapshot.volume.size)
                ebs.setdefault("Encrypted", bool(snapshot.encrypted))
            ebs.setdefault("DeleteOnTermination", True)
            ebs.setdefault("VolumeType", "gp3")
            shown.append({**mapping, "Ebs": ebs} if "Ebs" in mapping else mapping)
        fake = getattr(image, "ebs_snapshot", None)
        if fake is not None and fake.id not in {m.get("Ebs", {}).get("SnapshotId") for m in shown}:
            backend.snapshots.pop(fake.id, None)
        image.sandbox_mappings = shown

    # ------------------------------------------------------------ helpers

    def _image(self, backend: Any, image_id: str) -> Any:
        images = backend.amis
        if image_id not in images:
            raise EC2Error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")
        return images[image_id]

    def _base_tree(self, image: Any) -> Path:
        match = re.match(r"debian-(\d+)-", image.name or "")
        release = DEBIAN_RELEASES.get(match.group(1)) if match else None
        if release is None:
            raise EC2Error(
                "Unsupported", f"the sandbox boots Debian 12 and 13 images only; {image.id} is {image.name!r}"
            )
        tree = rootfs_path(release, "amd64", self.cache)
        if not is_ready(tree):
            raise EC2Error(
                "Unsupported",
                f"no Debian {release} tree is prepared for {image.id}; "
                f"run: python build.py sandbox start --release {release}",
            )
        return tree

    def status(self) -> dict[str, Any]:
        """Return EC2's view (per region) and the data plane's use of this host."""
        regions = {}
        for region in list(self.backends().keys()):
            backend = self.backend(region)
            regions[region] = {
                "instances": {i.id: i.state for i in backend.all_instances()},
                "volumes": sorted(backend.volumes),
                "snapshots": sorted(i for i, snap in backend.snapshots.items() if snap.owner_id == ACCOUNT),
                "images": sorted(i for i, image in backend.amis.items() if image.owner_id == ACCOUNT),
            }
        return {
            "ec2": regions,
            "api_calls": self.calls,
            "api_calls_by_action": dict(sorted(self.actions.items())),
            "api_calls_by_operation": dict(sorted(self.operations.items())),
            "latency": json.loads(self.model.to_json()) if self.model.active else None,
            "throttled": self.latency.bucket.refused if self.latency else 0,
            # Every modelled transition in order: kind, resource, its drawn time, how late it was seen.
            "transitions": [t.to_dict() for t in self.latency.timeline] if self.latency else [],
            **self.plane.usage(),
        }

    def watch(self, interval: float = 0.5) -> None:
        """Turn machines that died on their own into stopped or terminated instances (a thread)."""
        while not self._stop_watch.wait(interval):
            with self.lock:
                self._check_machines()

    def _check_machines(self) -> None:
        dead = [i for i, up in self.plane.running().items() if not up and not self.plane.is_stopping(i)]
        for region in list(self.backends().keys()):
            backend = self.backend(region)
            for instance in list(backend.all_instances()):
                if instance.id not in dead or instance.state != "running":
                    continue
                try:
                    self._shut_down(backend, instance)
                except Exception:  # one machine that cannot be put away must not stop the watching
                    log.exception("%s: following its machine's halt failed", instance.id)

    def _shut_down(self, backend: Any, instance: Any) -> None:
        """Apply the instance's shutdown behaviour to an instance whose machine halted by itself."""
        log.info(
            "%s: its machine halted; instance shutdown behaviour: %s",
            instance.id,
            instance.instance_initiated_shutdown_behavior,
        )
        if instance.instance_initiated_shutdown_behavior == "terminate":
            self._terminate(backend, [instance.id])
        else:
            self.plane.stop(instance.id, clean=False)
            self.plane.prune_networks()
            instance.stop()
        _set_reason(
            instance,
            "Client.InstanceInitiatedShutdown",
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
        )
        self.save()

    def shutdown(self) -> None:
        """Stop watching, halt every machine (keeping state) and save moto's state."""
        self._stop_watch.set()
        if self.latency is not None:
            self.latency.clock.stop()
            self.latency.clock.flush()
        with self.lock:
            self.plane.shutdown()
            self.save()


def _set_reason(instance: Any, code: str, message: str) -> None:
    from moto.ec2.models.instances import StateReason

    instance.state_reason = StateReason(message, code)


def _open_ports(instance: Any) -> set[int]:
    """Return the TCP ports an instance's security groups admit (small ranges only), and 22."""
    ports = {22}
    for group in instance.security_groups:
        for rule in group.ingress_rules:
            low, high = rule.from_port, rule.to_port
            if rule.ip_protocol in ("tcp", "6") and low is not None and high is not None and high - low < MAX_RANGE:
                ports.update(range(low, high + 1))
    return ports


def _wants_public(params: dict[str, str], instance: Any) -> bool:
    """Return whether EC2 gives the instance a public address.

    The launch's AssociatePublicIpAddress of its primary interface decides when it is given;
    otherwise its subnet's MapPublicIpOnLaunch (true in a default VPC's subnets).
    """
    for key, value in params.items():
        match = re.fullmatch(r"NetworkInterface\.(\d+)\.AssociatePublicIpAddress", key)
        if match and params.get(f"NetworkInterface.{match.group(1)}.DeviceIndex", "0") == "0":
            return value.lower() == "true"
    return str(instance.nics[0].subnet.map_public_ip_on_launch).lower() == "true"


def _placement(backend: Any, instance: Any) -> Placement:
    """Return the instance's place in its VPC: the private address moto gave it, its subnet's prefix, the VPC's CIDRs.

    Raises DataPlaneError for a subnet the machines cannot use (it overlaps their link to the outside).
    """
    primary = instance.nics[0]
    subnet = primary.subnet
    network = ipaddress.ip_network(subnet.cidr_block)
    if network.overlaps(SLIRP_NET):
        raise DataPlaneError(
            "Unsupported", f"the sandbox's machines use {SLIRP_NET} to reach the outside; {subnet.id} overlaps it"
        )
    vpc = backend.get_vpc(subnet.vpc_id)
    cidrs = tuple(
        str(c["cidr_block"])
        for c in vpc.cidr_block_association_set
        if c.get("cidr_block_state", {}).get("state") == "associated"
    )
    return Placement(vpc.id, str(primary.private_ip_address), network.prefixlen, cidrs or (str(vpc.cidr_block),))


def _returned(action: str) -> tuple[str, list[tuple[str, str]], bytes]:
    """Return EC2's answer ``<return>true</return>`` to ``action``."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>{uuid.uuid4()}</requestId><return>true</return></{action}Response>"
    ).encode()
    return "200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))], body


def _indexed(params: dict[str, str], name: str) -> list[str]:
    return [v for k, v in sorted(params.items()) if re.fullmatch(rf"{name}\.\d+", k)]


def _patch_moto() -> None:
    """Two fixes to moto's models, in this process only.

    Images show the block-device mappings the sandbox recorded for them. And a
    resource's tags are looked up by its id: moto scans every tag of the region for
    each resource, so a DescribeImages over thousands of tagged images took minutes
    (EC2 answers it at once; the tool's `changed` relies on that).
    """
    from moto.ec2.models.amis import Ami
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    original: Any = Ami.__dict__["block_device_mappings"]

    def mappings(self: Any) -> Any:
        recorded = getattr(self, "sandbox_mappings", None)
        return recorded if recorded is not None else original.fget(self)

    def get_tags(self: Any) -> list[dict[str, str]]:
        if not self.id:
            return []
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        found = self.ec2_backend.tags.get(self.id, {})
        return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind} for k, v in found.items()]

    from moto.ec2.models.elastic_block_store import Volume

    volume_status: Any = Volume.__dict__["status"]

    def status(self: Any) -> Any:
        modelled = getattr(self, "sandbox_state", None)  # the latency model's `creating`
        return modelled or volume_status.fget(self)

    Ami.block_device_mappings = property(mappings)  # type: ignore[method-assign,assignment]
    Volume.status = property(status)  # type: ignore[method-assign,assignment]
    TaggedEC2Resource.get_tags = get_tags  # type: ignore[method-assign]


def make_app(state: Path, credentials: Credentials, cache: Path = DEFAULT_CACHE, model: Model | None = None) -> Sandbox:
    """Return the sandbox's WSGI application over a fresh moto (moto's settings from the environment).

    It answers only requests signed with ``credentials``; moto's own HTTP API is not served.
    """
    os.environ.setdefault("MOTO_AMIS_PATH", str(AMIS))
    os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    _patch_moto()
    return Sandbox(DomainDispatcherApplication(create_backend_app), state, credentials, cache, model)


def serve(state: Path, address: str, port: int, cache: Path, model: Model | None = None) -> None:
    """Run the sandbox endpoint until SIGTERM or SIGINT; write ``server.json`` once it listens."""
    sandbox = make_app(state, load_credentials(state), cache, model)
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    sandbox.load()
    server = make_server(address, port, sandbox, threaded=True, request_handler=MotoRequestHandler)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = threading.Thread(target=sandbox.watch, daemon=True)
    watcher.start()
    host, bound = str(server.server_address[0]), int(server.server_address[1])
    info = {
        "pid": os.getpid(),
        "endpoint": f"http://{host}:{bound}",
        "started": time.time(),
        "latency": json.loads(sandbox.model.to_json()) if sandbox.model.active else None,
    }
    write_atomic(state / SERVER_FILE, json.dumps(info) + "\n")
    log.info("sandbox: EC2 endpoint %s (state in %s)", info["endpoint"], state)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        sandbox.shutdown()
        (state / SERVER_FILE).unlink(missing_ok=True)
        log.info("sandbox: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.sandbox.server")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--latency", default="none", help="latency preset: none, fixed or realistic")
    parser.add_argument("--latency-scale", type=float, default=1.0)
    parser.add_argument("--latency-seed", type=int, default=None, help="of the draws (default: a random one)")
    parser.add_argument("--api-rate", type=float, default=0, help="EC2 calls per second (0: no throttling)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    seed = new_seed() if args.latency_seed is None else args.latency_seed
    model = Model.preset(args.latency, args.latency_scale, args.api_rate, seed)
    serve(args.state, args.address, args.port, args.cache, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())

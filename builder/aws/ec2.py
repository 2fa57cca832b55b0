"""The only boto3 code: EC2 calls, error translation, call counting.

Every call goes through :meth:`EC2.call`, which counts it and turns botocore's errors
into the tool's (CloudError, exit 3). Throttling and transient network errors are
retried by botocore's own retry configuration: standard mode with 6 attempts unless
``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` (or the profile's ``max_attempts``/``retry_mode``)
say otherwise, as for every AWS SDK. They never change the waits: those (fast first, then back
off, within a deadline) are scheduled by :mod:`builder.aws.waits`; typed operations on
resources live in :mod:`builder.aws.resources`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Unpack

import boto3
import botocore.config
import botocore.exceptions

from builder.aws.waits import Limits, Waits, wait_for, waits_file
from builder.errors import CloudError, InvalidInput

log = logging.getLogger(__name__)

RETRIES = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60)
RETRY_MODES = ("legacy", "standard", "adaptive")
CREATES = ("create_", "run_", "import_", "register_", "copy_")


HINTS = {
    "AuthFailure": "check the credentials (--profile, AWS_PROFILE, or the instance role)",
    "UnauthorizedOperation": "the credentials lack an EC2 permission; see docs/reference/iam.md",
    "InvalidAMIID.NotFound": "the base AMI does not exist in this region",
    "VPCIdNotSpecified": "this region has no default VPC: give --subnet-id (and --security-group-id if you like)",
    "RequestLimitExceeded": "EC2 throttled the calls beyond botocore's retries; try again later",
    "InsufficientInstanceCapacity": "add types to the role's instance_types, or give another --subnet-id (AZ)",
}


def now_iso() -> str:
    """Return the current UTC time as EC2 tags carry it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_region(region: str | None, endpoint_url: str | None) -> None:
    """Raise InvalidInput for a missing or unknown region (before any network call)."""
    if not region:
        raise InvalidInput("no AWS region: give --region or set AWS_REGION / a profile's region")
    if endpoint_url:
        return
    known = boto3.session.Session().get_available_regions("ec2", allow_non_regional=False)
    partitions = ("aws-cn", "aws-us-gov")
    for partition in partitions:
        known += boto3.session.Session().get_available_regions("ec2", partition_name=partition)
    if region not in known:
        raise InvalidInput(f"unknown AWS region {region!r}", hint="e.g. --region eu-west-1")


@dataclass(frozen=True)
class Image:
    """What the build needs to know of a base AMI."""

    image_id: str
    name: str
    creation_date: str
    root_device_name: str
    architecture: str
    ena_support: bool
    boot_mode: str | None
    root_size_gib: int | None = None


def client_config(session: Any) -> botocore.config.Config:
    """Return the clients' configuration: RETRIES, with the SDK's retry settings where they are given.

    ``AWS_MAX_ATTEMPTS`` (total attempts, the first included) and ``AWS_RETRY_MODE`` win over the
    profile's ``max_attempts`` and ``retry_mode``, as in every AWS SDK. Raises InvalidInput on a
    value the SDK would not take, naming where it came from.
    """
    scoped = session._session.get_scoped_config() if session is not None else {}
    attempts = _setting("AWS_MAX_ATTEMPTS", "max_attempts", scoped)
    mode = _setting("AWS_RETRY_MODE", "retry_mode", scoped)
    if attempts is None and mode is None:
        return RETRIES
    retries: dict[str, Any] = {"mode": "standard", "total_max_attempts": 6}
    if mode is not None:
        if mode[1] not in RETRY_MODES:
            raise InvalidInput(f"{mode[0]} {mode[1]!r}: not a retry mode ({', '.join(RETRY_MODES)})")
        retries["mode"] = mode[1]
    if attempts is not None:
        if not attempts[1].isdigit() or int(attempts[1]) < 1:
            raise InvalidInput(f"{attempts[0]} {attempts[1]!r}: must be a whole number of attempts, at least 1")
        retries["total_max_attempts"] = int(attempts[1])
    return RETRIES.merge(botocore.config.Config(retries=retries))  # type: ignore[arg-type]


def _setting(variable: str, key: str, scoped: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return (where, value) of a setting: the environment variable, else the profile's key; None when unset."""
    if os.environ.get(variable, "").strip():
        return variable, os.environ[variable].strip()
    if str(scoped.get(key, "")).strip():
        return f"the profile's {key}", str(scoped[key]).strip()
    return None


@dataclass(frozen=True)
class AssumedRole:
    """--role-arn: the role every client of a command works as, assumed with the standard chain's credentials."""

    role_arn: str
    session_name: str  # ebsrole-<command>: what CloudTrail shows of the session
    external_id: str | None = None

    def session(self, base: Any, region: str, endpoint_url: str | None, config: botocore.config.Config) -> Any:
        """Return a boto3 session holding the role's temporary credentials (CloudError, exit 3, when STS refuses)."""
        sts = base.client("sts", region_name=region, endpoint_url=endpoint_url, config=config)
        params = {"RoleArn": self.role_arn, "RoleSessionName": self.session_name[:64]}
        if self.external_id:
            params["ExternalId"] = self.external_id
        try:
            given = sts.assume_role(**params)["Credentials"]
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            raise CloudError(
                "sts AssumeRole",
                code,
                str(error.get("Message") or code),
                hint=f"may these credentials assume {self.role_arn}?",
            ) from None
        except botocore.exceptions.NoCredentialsError:
            raise InvalidInput("no AWS credentials found to assume --role-arn with") from None
        except (botocore.exceptions.BotoCoreError, ConnectionError) as exc:
            raise CloudError("sts AssumeRole", type(exc).__name__, str(exc)) from None
        return boto3.session.Session(
            aws_access_key_id=given["AccessKeyId"],
            aws_secret_access_key=given["SecretAccessKey"],
            aws_session_token=given["SessionToken"],
            region_name=region,
        )


class EC2:
    """A counted, error-translating EC2 client."""

    def __init__(self, client: Any, session: Any = None, endpoint_url: str | None = None) -> None:
        self.client = client
        self.session = session
        self.endpoint_url = endpoint_url
        self.calls: Counter[str] = Counter()
        self.retried_creates = 0  # create calls botocore had to retry: a lost answer may have made a twin
        self.described: dict[str, dict[str, Any]] = {}  # the last description of each instance or image polled
        self.waits = Waits(waits_file())
        # Whose waits these are: AWS, an endpoint, or the sandbox with its latency model
        # (its port changes at every start; its waits do not).
        self.wait_scope = endpoint_url or "aws"
        self.dlm_client: Any = None  # Data Lifecycle Manager, made on first use
        self.clients: dict[str, Any] = {}  # SSM, Auto Scaling, KMS: each made on first use
        self.config = RETRIES  # every client's: timeouts and the SDK's retries

    @classmethod
    def connect(
        cls,
        region: str | None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        *,
        credentials: tuple[str, str] | None = None,
        assume: AssumedRole | None = None,
    ) -> EC2:
        """Return an EC2 for the standard credential chain (or ``profile``, or fixed ``credentials``).

        With ``assume``, every client (EC2, SSM, STS, KMS, DLM) works with the role's credentials.
        """
        key, secret = credentials or (None, None)
        try:
            session = boto3.session.Session(
                profile_name=profile, region_name=region, aws_access_key_id=key, aws_secret_access_key=secret
            )
        except botocore.exceptions.ProfileNotFound as exc:
            raise InvalidInput(str(exc), hint="profiles come from ~/.aws/config") from None
        region = region or session.region_name
        check_region(region, endpoint_url)
        config = client_config(session)
        if session.get_credentials() is None:
            raise InvalidInput(
                "no AWS credentials found", hint="use --profile, AWS_ACCESS_KEY_ID/..., or an instance role"
            )
        if assume is not None:
            session = assume.session(session, str(region), endpoint_url, config)
        client = session.client("ec2", region_name=region, endpoint_url=endpoint_url, config=config)
        ec2 = cls(client, session, endpoint_url)
        ec2.config = config
        return ec2

    @property
    def region(self) -> str:
        return str(self.client.meta.region_name)

    def account_id(self) -> str:
        """Return the account the credentials belong to (sts:GetCallerIdentity)."""
        sts = self.session.client("sts", region_name=self.region, endpoint_url=self.endpoint_url, config=self.config)
        try:
            return str(sts.get_caller_identity()["Account"])
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            raise CloudError("get_caller_identity", str(error.get("Code")), str(error.get("Message"))) from None

    def dlm_call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Call Data Lifecycle Manager ``operation`` (snake_case) and return the response; raise CloudError."""
        if self.dlm_client is None:
            self.dlm_client = self.session.client(
                "dlm", region_name=self.region, endpoint_url=self.endpoint_url, config=self.config
            )
        self.calls[operation] += 1
        try:
            response: dict[str, Any] = getattr(self.dlm_client, operation)(**params)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            raise CloudError(operation, code, str(error.get("Message") or code), HINTS.get(code)) from None
        return response

    def kms_call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Call KMS ``operation`` (snake_case) in this region and return the response; raise CloudError."""
        return self.service_call("kms", operation, **params)

    def ssm_call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Call SSM ``operation`` (snake_case) in this region and return the response; raise CloudError."""
        return self.service_call("ssm", operation, **params)

    def autoscaling_call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Call Auto Scaling ``operation`` (snake_case) in this region and return the response; raise CloudError."""
        return self.service_call("autoscaling", operation, **params)

    def service_call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """Call ``service``'s (boto3's name) ``operation`` in this region at this endpoint; raise CloudError."""
        client = self.clients.get(service)
        if client is None:
            session: Any = self.session or boto3.session.Session()
            client = session.client(
                service, region_name=self.region, endpoint_url=self.endpoint_url, config=self.config
            )
            self.clients[service] = client
        self.calls[f"{service}:{operation}"] += 1
        try:
            response: dict[str, Any] = getattr(client, operation)(**params)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            raise CloudError(f"{service} {operation}", code, str(error.get("Message") or code)) from None
        except (botocore.exceptions.BotoCoreError, ConnectionError) as exc:
            raise CloudError(f"{service} {operation}", type(exc).__name__, str(exc)) from None
        return response

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Call EC2 ``operation`` (snake_case) and return the response; raise CloudError."""
        self.calls[operation] += 1
        try:
            response: dict[str, Any] = getattr(self.client, operation)(**params)
            if operation.startswith(CREATES) and response.get("ResponseMetadata", {}).get("RetryAttempts"):
                self.retried_creates += 1
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            raise CloudError(operation, code, str(error.get("Message") or code), HINTS.get(code)) from None
        except botocore.exceptions.NoCredentialsError:
            raise InvalidInput("no AWS credentials found", hint="use --profile or AWS_ACCESS_KEY_ID/...") from None
        except botocore.exceptions.EndpointConnectionError as exc:
            raise CloudError(
                operation, "EndpointUnreachable", str(exc), "check --endpoint-url/--region and the network"
            ) from None
        except (botocore.exceptions.BotoCoreError, ConnectionError) as exc:
            raise CloudError(operation, type(exc).__name__, str(exc)) from None
        return response

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    # ------------------------------------------------------------ waiting

    def wait_for(
        self,
        what: str,
        describe: Callable[[], str],
        wanted: str | Sequence[str],
        *,
        kind: str | None = None,
        **limits: Unpack[Limits],
    ) -> str:
        """Poll ``describe`` (returns a state) until it is ``wanted``; see :func:`builder.aws.waits.wait_for`.

        With a ``kind`` ("instance-stopped", ...) the wait learns from, and is scheduled by,
        earlier waits of that kind at this endpoint and region. Raises CloudError, WaitTimeout.
        """
        key = self._wait_key(kind) if kind else None
        return wait_for(self.waits, key, what, describe, wanted, **limits)

    def _wait_key(self, kind: str | None) -> str:
        return f"{self.wait_scope}|{self.region}|{kind}"

    def instance_state(self, instance_id: str) -> str:
        """Return the instance's state; its whole description stays in ``described`` (no second call)."""
        reservations = self.call("describe_instances", InstanceIds=[instance_id])["Reservations"]
        self.described[instance_id] = dict(reservations[0]["Instances"][0])
        return str(self.described[instance_id]["State"]["Name"])

    def instance(self, instance_id: str) -> dict[str, Any]:
        reservations = self.call("describe_instances", InstanceIds=[instance_id])["Reservations"]
        return dict(reservations[0]["Instances"][0])

    def volume_state(self, volume_id: str) -> str:
        volume = self.call("describe_volumes", VolumeIds=[volume_id])["Volumes"][0]
        attachments = volume.get("Attachments") or []
        if volume["State"] == "in-use" and attachments:
            return f"in-use:{attachments[0].get('State', 'attached')}"
        return str(volume["State"])

    def snapshot_states(self, snapshot_ids: Sequence[str]) -> list[str]:
        snapshots = self.call("describe_snapshots", SnapshotIds=list(snapshot_ids))["Snapshots"]
        return [str(s["State"]) for s in snapshots]

    def image_state(self, image_id: str) -> str:
        """Return the image's state; its whole description stays in ``described`` (no second call)."""
        images = self.call("describe_images", ImageIds=[image_id])["Images"]
        if not images:
            return "missing"
        self.described[image_id] = dict(images[0])
        return str(images[0]["State"])

    # ------------------------------------------------------------ removal

    def terminate(self, instance_id: str, *, requested: bool = False) -> None:
        """Terminate an instance (unless ``requested`` already) and wait until it is gone."""
        if not requested:
            self.call("terminate_instances", InstanceIds=[instance_id])
        self.wait_for(
            f"instance {instance_id}",
            lambda: self.instance_state(instance_id),
            "terminated",
            timeout=900,
            missing="terminated",
            kind="instance-terminated",
        )

    def delete_volume(self, volume_id: str, instance_id: str | None) -> None:
        """Delete a volume, detaching it first from ``instance_id`` (ours) if attached there.

        A volume already being deleted is left to finish; one attached to any other
        instance is refused (VolumeInUse) rather than waited on.
        """
        state = self.volume_state(volume_id)
        if state == "deleting":
            return
        if state.startswith("in-use"):
            if not instance_id:
                raise CloudError(
                    "delete_volume", "VolumeInUse", f"{volume_id} is attached to an instance that is not ours to stop"
                )
            self.call("detach_volume", VolumeId=volume_id, InstanceId=instance_id, Force=True)
        if state != "available":
            done = self.wait_for(
                f"volume {volume_id}",
                lambda: self.volume_state(volume_id),
                ("available", "deleting"),
                timeout=600,
                missing="deleting",
            )
            if done == "deleting":
                return
        self.call("delete_volume", VolumeId=volume_id)

    def delete_security_group(self, group_id: str, timeout: float = 900) -> None:
        """Delete a security group, retrying while EC2 still reports it in use.

        An instance that uses it keeps it in use until it has terminated: ``timeout`` is as long
        as the wait for a termination.
        """
        deadline = time.monotonic() + timeout
        delay = 1.0
        while True:
            try:
                self.call("delete_security_group", GroupId=group_id)
                return
            except CloudError as exc:
                if exc.code != "DependencyViolation" or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 15)

    # ------------------------------------------------------------ lookups

    def newest_image(self, owner: str, name_pattern: str, architecture: str) -> Image:
        """Return the newest available AMI (by creation date, then name) matching the pattern."""
        images = self.call(
            "describe_images",
            Owners=[owner],
            Filters=[
                {"Name": "name", "Values": [name_pattern]},
                {"Name": "architecture", "Values": [architecture]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
        if not images:
            raise CloudError(
                "describe_images",
                "NoMatchingImage",
                f"no available {architecture} AMI of owner {owner} named {name_pattern!r} in {self.region}",
                hint="check base.owner / base.name in the role, or pin base.ami",
            )
        best = max(images, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")))
        return image_from(best)

    def image(self, image_id: str) -> Image:
        images = self.call("describe_images", ImageIds=[image_id])["Images"]
        if not images:
            raise CloudError("describe_images", "InvalidAMIID.NotFound", f"no AMI {image_id} in {self.region}")
        return image_from(images[0])

    def find_tagged(self, kind: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return resources of ``kind`` (instances, volumes, snapshots, images, key_pairs, security_groups)."""
        if kind == "instances":
            reservations = self.call("describe_instances", Filters=filters)["Reservations"]
            return [i for r in reservations for i in r["Instances"]]
        if kind == "volumes":
            return list(self.call("describe_volumes", Filters=filters)["Volumes"])
        if kind == "snapshots":
            return list(self.call("describe_snapshots", OwnerIds=["self"], Filters=filters)["Snapshots"])
        if kind == "images":
            return list(self.call("describe_images", Owners=["self"], Filters=filters)["Images"])
        if kind == "key_pairs":
            return list(self.call("describe_key_pairs", Filters=filters)["KeyPairs"])
        return list(self.call("describe_security_groups", Filters=filters)["SecurityGroups"])


def image_from(raw: Mapping[str, Any]) -> Image:
    """Return the Image of a DescribeImages entry."""
    return Image(
        image_id=str(raw["ImageId"]),
        name=str(raw.get("Name", "")),
        creation_date=str(raw.get("CreationDate", "")),
        root_device_name=str(raw.get("RootDeviceName") or "/dev/xvda"),
        architecture=str(raw.get("Architecture", "x86_64")),
        ena_support=bool(raw.get("EnaSupport", True)),
        boot_mode=raw.get("BootMode"),
        root_size_gib=next(
            (
                m["Ebs"].get("VolumeSize")
                for m in raw.get("BlockDeviceMappings") or []
                if m.get("DeviceName") == raw.get("RootDeviceName") and "Ebs" in m
            ),
            None,
        ),
    )

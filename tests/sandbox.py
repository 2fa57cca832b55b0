"""Test helpers around a running sandbox (builder.sandbox): its endpoint, CLI runs against it, launches."""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import boto3

from builder.keys import KeyPair
from builder.launch import HOST_KEYS, KEY_LINE
from builder.remote import Remote
from builder.sandbox import control
from builder.userdata import builder_user_data
from tests.conftest import PROJECT

REGION = control.REGION


@dataclass
class Instance:
    """An instance launched in the sandbox, with a pinned SSH session."""

    id: str
    address: str
    remote: Remote
    login: KeyPair
    host_key: KeyPair

    def reconnect(self) -> None:
        self.remote = Remote.connect(self.address, 22, "admin", self.login, self.host_key, deadline=120)

    def sh(self, command: str, *, check: bool = True) -> str:
        result = self.remote.run(f"sudo -n bash -c '{command}'", timeout=300, on_line=lambda *_: None)
        if check and result.exit_status != 0:
            raise AssertionError(f"{command!r} exited {result.exit_status}:\n{result.tail()}")
        return result.stdout


@dataclass
class World:
    """A sandbox started for a test module, in its own state directory."""

    state: Path
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, state: Path, latency: tuple[str, float, float] = ("none", 1.0, 0.0)) -> World:
        current = control.start(state, latency=latency)
        env = {**os.environ, "EBSROLE_SANDBOX": str(state)}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            env.pop(name, None)
        return cls(state, current.endpoint, env)

    def client(self, region: str = REGION, service: str = "ec2", config: Any = None) -> Any:
        """Return a boto3 client signing with the sandbox's credentials (made at its last start).

        ``service``: EC2, or SSM (the endpoint answers it too, in memory only).
        """
        key, secret = control.credentials(self.state)
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=config,
        )

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run ``python build.py ARGS`` with this sandbox as EBSROLE_SANDBOX."""
        return subprocess.run(
            [sys.executable, str(PROJECT / "build.py"), *args],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str, log: Path) -> subprocess.Popen[str]:
        """Start ``python build.py ARGS`` in the background, output to ``log``; SIGINT ignored like a `cmd &`."""
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, str(PROJECT / "build.py"), *args],
                cwd=PROJECT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
            )

    def status(self) -> dict[str, Any]:
        return control.status(self.state)

    def launch(
        self, image_id: str, *, open_ports: tuple[int, ...] = (), region: str = REGION, **params: Any
    ) -> Instance:
        """Launch ``image_id`` with a fresh login and host key (as user-data); return it logged in."""
        ec2 = self.client(region)
        login, host_key = KeyPair.generate("sandbox-test"), KeyPair.generate("sandbox-test-host")
        if open_ports:
            group = ec2.create_security_group(GroupName=f"test-{time.monotonic_ns()}", Description="test")["GroupId"]
            for port in open_ports:
                ec2.authorize_security_group_ingress(
                    GroupId=group, IpProtocol="tcp", FromPort=port, ToPort=port, CidrIp="127.0.0.0/8"
                )
            params["SecurityGroupIds"] = [group]
        reply = ec2.run_instances(
            ImageId=image_id,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.small",
            UserData=builder_user_data(login, host_key),
            **params,
        )
        instance_id = reply["Instances"][0]["InstanceId"]
        # With a latency model the instance is `pending` for a while first.
        wait_until(lambda: self.describe(instance_id, region)["State"]["Name"] != "pending", 120, "not pending")
        described = self.describe(instance_id, region)
        assert described["State"]["Name"] == "running", described.get("StateReason")
        address = described["PublicIpAddress"]
        remote = Remote.connect(address, 22, "admin", login, host_key, deadline=120)
        return Instance(instance_id, address, remote, login, host_key)

    def ec2_view(self) -> dict[str, Any]:
        """Return the instances (not terminated), volumes, snapshots and images the sandbox's EC2 holds."""
        view = self.status()["ec2"][REGION]
        live = sorted(i for i, s in view["instances"].items() if s != "terminated")
        return {"instances": live, "volumes": view["volumes"], "snapshots": view["snapshots"], "images": view["images"]}

    def explain(self, *instance_ids: str) -> str:
        """Return what a failing test needs to see: the instances' states and consoles, the server log's tail."""
        parts = []
        for instance_id in instance_ids:
            described = self.describe(instance_id)
            console = self.client().get_console_output(InstanceId=instance_id).get("Output", "")
            parts.append(f"== {instance_id}: {described['State']['Name']} {described.get('StateReason')}")
            parts.append(console[-3000:])
        log = self.state / "server.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        parts.append("== server.log (tail)")
        parts.extend(lines[-40:])
        return "\n".join(parts)

    def describe(self, instance_id: str, region: str = REGION) -> dict[str, Any]:
        reservations = self.client(region).describe_instances(InstanceIds=[instance_id])["Reservations"]
        return dict(reservations[0]["Instances"][0])


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 60,
    what: str = "condition",
    explain: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate``; on timeout fail with ``explain()`` (what the world looked like) appended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    detail = f"\n{explain()}" if explain else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


def clean(status: dict[str, Any]) -> list[str]:
    """Return what a sandbox holds that a finished or failed build must not leave: machines, loops, mounts."""
    found = [f"machine {m}" for m in status["machines"]]
    found += [f"loop {d}" for d in status["loop_devices"]]
    found += [f"mount {m}" for m in status["mounts"]]
    return found


# ---------------------------------------------------------------- private networks


BASE_AMI = "ami-000000000000000d2"  # Debian 12 amd64 in debian-amis.json


def private_network(ec2: Any, cidr: str = "10.20.0.0/16", zone: str = f"{REGION}a") -> tuple[str, str]:
    """Make a VPC as a company account has one; return (private subnet id, public subnet id).

    The private subnet (second /24) gives no public addresses; the public one (first /24)
    maps one on launch and routes through an internet gateway, as a bastion's subnet does.
    """
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    public_cidr, private_cidr = list(ipaddress.ip_network(cidr).subnets(new_prefix=24))[:2]
    public = ec2.create_subnet(VpcId=vpc, CidrBlock=str(public_cidr), AvailabilityZone=zone)["Subnet"]["SubnetId"]
    private = ec2.create_subnet(VpcId=vpc, CidrBlock=str(private_cidr), AvailabilityZone=zone)["Subnet"]["SubnetId"]
    ec2.modify_subnet_attribute(SubnetId=public, MapPublicIpOnLaunch={"Value": True})
    gateway = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc)
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    ec2.associate_route_table(RouteTableId=table, SubnetId=public)
    return private, public


@dataclass(frozen=True)
class Bastion:
    """A plain Debian instance in a public subnet, for ``ssh -W``: its address, user, key and pinned host key."""

    id: str
    address: str
    user: str
    key_file: Path  # the private key of its key pair (mode 0600)
    known_hosts: Path  # one line: its address and the host key it printed on its console

    @property
    def spec(self) -> str:
        """Return ``user@host``, as ``--bastion`` takes it."""
        return f"{self.user}@{self.address}"

    def proxy_command(self) -> str:
        """Return an OpenSSH ProxyCommand (``%h %p`` tokens) through this bastion, host key pinned, no config read."""
        return shlex.join([*self.ssh_options(), "-W", "%h:%p", self.spec])

    def ssh_options(self) -> list[str]:
        """Return ``ssh`` with the options that log in to the bastion, and nothing but it."""
        return [
            "ssh",
            "-F", "/dev/null",
            "-i", str(self.key_file),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ConnectTimeout=20",
        ]  # fmt: skip


def bastion(world: World, subnet_id: str, workdir: Path, image_id: str = BASE_AMI) -> Bastion:
    """Launch a bastion in ``subnet_id`` with a new key pair; return it once its host key is on its console.

    Nothing in its user-data: like any instance of the Debian AMI, cloud-init installs the key
    pair's key for ``admin`` and prints the host keys it made; the known_hosts line is pinned
    from that console output (GetConsoleOutput), never trusted on first use.
    """
    ec2 = world.client()
    login = KeyPair.generate("bastion")
    name = f"bastion-{time.monotonic_ns()}"
    ec2.import_key_pair(KeyName=name, PublicKeyMaterial=login.public_line.encode())
    reply = ec2.run_instances(
        ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro", KeyName=name, SubnetId=subnet_id
    )
    instance_id = reply["Instances"][0]["InstanceId"]
    wait_until(lambda: world.describe(instance_id)["State"]["Name"] != "pending", 120, "not pending")
    described = world.describe(instance_id)
    assert described["State"]["Name"] == "running", described.get("StateReason")
    address = described["PublicIpAddress"]
    found: list[str] = []

    def host_key() -> bool:
        text = ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
        found.extend(f"{kind} {blob}" for block in HOST_KEYS.findall(text) for kind, blob in KEY_LINE.findall(block))
        return bool(found)

    wait_until(host_key, 120, f"{instance_id}'s host keys on its console", partial(world.explain, instance_id))
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / f"{name}.key"
    key_file.write_text(login.private_openssh)
    key_file.chmod(0o600)
    known_hosts = workdir / f"{name}.known_hosts"
    known_hosts.write_text("".join(f"{address} {line}\n" for line in found))
    return Bastion(instance_id, address, "admin", key_file, known_hosts)


@dataclass(frozen=True)
class PrivateInstance:
    """An instance reached only through its VPC: its private address, login key and pinned host key."""

    id: str
    address: str
    login: KeyPair
    host_key: KeyPair

    def files(self, workdir: Path) -> tuple[Path, Path]:
        """Write its login key and a known_hosts line for its private address; return (key file, known_hosts)."""
        workdir.mkdir(parents=True, exist_ok=True)
        key_file, known_hosts = workdir / f"{self.id}.key", workdir / f"{self.id}.known_hosts"
        key_file.write_text(self.login.private_openssh)
        key_file.chmod(0o600)
        known_hosts.write_text(f"{self.address} {self.host_key.public_line}\n")
        return key_file, known_hosts


def launch_private(world: World, subnet_id: str, image_id: str = BASE_AMI, **params: Any) -> PrivateInstance:
    """Launch ``image_id`` in ``subnet_id`` with a fresh login and host key (user-data); do not log in."""
    login, host_key = KeyPair.generate("private-test"), KeyPair.generate("private-test-host")
    reply = world.client().run_instances(
        ImageId=image_id,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.small",
        SubnetId=subnet_id,
        UserData=builder_user_data(login, host_key),
        **params,
    )
    instance_id = reply["Instances"][0]["InstanceId"]
    wait_until(lambda: world.describe(instance_id)["State"]["Name"] != "pending", 120, "not pending")
    described = world.describe(instance_id)
    assert described["State"]["Name"] == "running", described.get("StateReason")
    return PrivateInstance(instance_id, described["PrivateIpAddress"], login, host_key)


def ssh_via(
    bastion: Bastion, target: PrivateInstance, command: str, workdir: Path, user: str = "admin", deadline: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` on ``target`` with OpenSSH through ``bastion`` (``ssh -W``), both host keys pinned.

    Retries while ssh itself fails (255) for a reason other than a host key (sshd not up yet).
    """
    key_file, known_hosts = target.files(workdir)
    argv = [
        "ssh",
        "-F", "/dev/null",
        "-i", str(key_file),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", f"ProxyCommand={bastion.proxy_command()}",
        f"{user}@{target.address}",
        command,
    ]  # fmt: skip
    ends = time.monotonic() + deadline
    while True:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max(deadline, 60), check=False)
        if done.returncode != 255 or "Host key verification failed" in done.stderr or time.monotonic() > ends:
            return done
        time.sleep(0.5)

"""Test helpers around a running sandbox (builder.sandbox): its endpoint, CLI runs against it, launches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from builder.keys import KeyPair
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

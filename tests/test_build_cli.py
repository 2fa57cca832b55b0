"""`python build.py ROLE` as a process against moto's HTTP server: signals, sweep, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from builder.sandbox.machine import free_port
from builder.tags import tag
from tests.conftest import MINI_ROLE, PROJECT, run_cli

REGION = "eu-west-1"


def resources(client: Any) -> dict[str, list[str]]:
    c = client
    tagged = [{"Name": "tag-key", "Values": [tag("build-id")]}]
    return {
        "instances": [
            i["InstanceId"]
            for r in c.describe_instances(Filters=tagged)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ],
        "volumes": [v["VolumeId"] for v in c.describe_volumes(Filters=tagged)["Volumes"]],
        "key_pairs": [k["KeyName"] for k in c.describe_key_pairs()["KeyPairs"]],
        "security_groups": [
            g["GroupId"] for g in c.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
        ],
        "snapshots": [s["SnapshotId"] for s in c.describe_snapshots(Filters=tagged)["Snapshots"]],
        "images": [i["ImageId"] for i in c.describe_images(Owners=["self"])["Images"]],
    }


def start_build(endpoint: str, roles_dir: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """Start a real build whose SSH target never answers: it waits there with every resource made.

    ``extra``: more build options.
    """
    closed = free_port("127.0.0.1")
    return subprocess.Popen(
        [
            sys.executable,
            str(PROJECT / "build.py"),
            *build_args("mini", roles_dir, endpoint, str(tmp_path / "manifest.json")),
            "--ssh-host",
            "127.0.0.1",
            "--ssh-port",
            str(closed),
            "--ssh-timeout",
            "120",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # As a non-interactive shell starts a background job: SIGINT ignored. Ctrl-C must
        # still reach the build's cleanup.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )


def build_args(role: str, roles_dir: Path, endpoint: str, manifest: str) -> list[str]:
    """Arguments of a build against the moto server, SSH admitted from loopback only."""
    return [
        role,
        "--roles-dir",
        str(roles_dir),
        "--endpoint-url",
        endpoint,
        "--region",
        REGION,
        "--ssh-cidr",
        "127.0.0.1/32",
        "--manifest",
        manifest,
    ]


def both_volumes_attached(client: Any) -> bool:
    """True once the builder's root and data volume are both attached: the build is at SSH."""
    return sum(v["State"] == "in-use" for v in client.describe_volumes()["Volumes"]) >= 2


def wait_until(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "point", "code"),
    [
        (signal.SIGINT, "instance", 130),
        (signal.SIGINT, "volume attached", 130),
        (signal.SIGTERM, "volume attached", 143),
    ],
    ids=["sigint-after-launch", "sigint-waiting-for-ssh", "sigterm-waiting-for-ssh"],
)
def test_signal_mid_build_cleans_up(
    endpoint: str, client: Any, mini_dir: Path, tmp_path: Path, signum: int, point: str, code: int
) -> None:
    proc = start_build(endpoint, mini_dir, tmp_path)
    try:
        if point == "instance":
            wait_until(lambda: bool(resources(client)["instances"]))
        else:
            wait_until(lambda: both_volumes_attached(client))
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not any(resources(client).values()), resources(client)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["resources"] and all(r["fate"] == "deleted" for r in manifest["resources"])


def test_sigkill_then_sweep_removes_everything(endpoint: str, client: Any, mini_dir: Path, tmp_path: Path) -> None:
    proc = start_build(endpoint, mini_dir, tmp_path)
    wait_until(lambda: both_volumes_attached(client))
    proc.kill()
    proc.wait()
    left = resources(client)
    assert left["instances"] and left["volumes"] and left["security_groups"] and not left["key_pairs"]

    young = run_cli("sweep", "--endpoint-url", endpoint, "--region", REGION, "--dry-run")
    assert young.returncode == 0 and young.stdout.strip() == "nothing to sweep"  # a build could still be running

    dry = run_cli(
        "sweep", "--endpoint-url", endpoint, "--region", REGION, "--older-than", "0s", "--force", "--dry-run",
        "--format", "json",
    )  # fmt: skip
    listed = {(r["kind"], r["id"]) for r in json.loads(dry.stdout)["resources"]}
    assert ("instances", left["instances"][0]) in listed and ("volumes", left["volumes"][0]) in listed
    assert resources(client) == left, "a dry run removes nothing"

    done = run_cli("sweep", "--endpoint-url", endpoint, "--region", REGION, "--older-than", "0s", "--force")
    assert done.returncode == 0, done.stderr
    assert "deleted" in done.stdout
    assert not any(resources(client).values()), resources(client)


def test_sweep_keeps_finished_builds_artefacts(endpoint: str, client: Any) -> None:
    c = client
    snap = c.create_snapshot(
        VolumeId=c.create_volume(AvailabilityZone=f"{REGION}a", Size=1)["VolumeId"],
        TagSpecifications=[
            {
                "ResourceType": "snapshot",
                "Tags": [
                    {"Key": tag("build-id"), "Value": "b1"},
                    {"Key": tag("status"), "Value": "complete"},
                    {"Key": tag("temporary"), "Value": "false"},
                ],
            }
        ],
    )["SnapshotId"]
    done = run_cli("sweep", "--endpoint-url", endpoint, "--region", REGION, "--older-than", "0s", "--force")
    assert done.returncode == 0 and done.stdout.strip() == "nothing to sweep"
    assert resources(client)["snapshots"] == [snap]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def test_bad_input_gives_one_clear_line(mini_dir: Path, tmp_path: Path) -> None:
    base = [
        sys.executable,
        str(PROJECT / "build.py"),
        "mini",
        "--roles-dir",
        str(mini_dir),
        "--ssh-cidr",
        "127.0.0.1/32",
    ]

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, env=env, check=False)

    no_creds = run("--region", REGION, env=_clean_env(tmp_path))
    assert no_creds.returncode == 2 and no_creds.stderr.startswith("error: no AWS credentials found"), no_creds.stderr
    no_region = run(env={**_clean_env(tmp_path), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert no_region.returncode == 2 and "no AWS region" in no_region.stderr
    bad_region = run("--region", "xx-nowhere-1")
    assert bad_region.returncode == 2 and "unknown AWS region 'xx-nowhere-1'" in bad_region.stderr
    unreachable = run("--region", REGION, "--endpoint-url", f"http://127.0.0.1:{free_port('127.0.0.1')}")
    assert unreachable.returncode == 3 and "EndpointUnreachable" in unreachable.stderr, unreachable.stderr
    for done in (no_creds, no_region, bad_region, unreachable):
        assert "Traceback" not in done.stderr
        assert len([line for line in done.stderr.splitlines() if not line.startswith(("hint:", "mini:"))]) == 1


def test_no_matching_base_ami_at_the_command_line(
    endpoint: str, client: Any, roles_dir: Path, write_role: Callable[..., Path], tmp_path: Path
) -> None:
    write_role("old", dict(MINI_ROLE, base={"name": "debian-9-*"}))
    done = run_cli(*build_args("old", roles_dir, endpoint, str(tmp_path / "m.json")))
    assert done.returncode == 3
    assert "NoMatchingImage" in done.stderr and "hint: check base.owner" in done.stderr
    assert not any(resources(client).values())


def test_unwritable_manifest_is_refused_before_anything(endpoint: str, client: Any, mini_dir: Path) -> None:
    done = run_cli(*build_args("mini", mini_dir, endpoint, "/dev/null/x.json"))
    assert done.returncode == 2 and "--manifest /dev/null/x.json" in done.stderr, done.stderr
    assert not any(resources(client).values())

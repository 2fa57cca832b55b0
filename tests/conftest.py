"""Shared fixtures: role directories written on the fly, the project's paths, fake AWS."""

from __future__ import annotations

import os
from pathlib import Path as _Path

# moto reads the AMI catalogue once, before its first EC2 call: the official Debian AMIs.
os.environ["MOTO_AMIS_PATH"] = str(_Path(__file__).parent.parent / "builder/sandbox/debian-amis.json")
# Fake credentials: no test can reach a real AWS account.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}.items():
    os.environ[_name] = _value
os.environ.pop("AWS_PROFILE", None)
# Never ask an instance metadata service for credentials (that is network traffic).
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# The waits the tests' builds learn stay with this run, not in the user's cache.
if "EBSROLE_WAITS" not in os.environ:
    import atexit as _atexit
    import shutil as _shutil
    import tempfile as _tempfile

    _waits_dir = _tempfile.mkdtemp(prefix="ebsrole-waits-")
    _atexit.register(_shutil.rmtree, _waits_dir, True)
    os.environ["EBSROLE_WAITS"] = str(_Path(_waits_dir) / "waits.json")

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent

# paramiko logs each refused connection while a machine boots as an ERROR; the runner
# retries those on purpose.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

GOOD_ROLE: dict[str, Any] = {
    "description": "test role",
    "packages": ["apache2"],
    "services": ["apache2"],
    "volume": {"device": "/dev/sdf", "mount_point": "/data", "size_gib": 10},
    "externalize": ["/etc/apache2", "/var/www"],
}


@pytest.fixture
def roles_dir(tmp_path: Path) -> Path:
    path = tmp_path / "roles"
    path.mkdir()
    return path


@pytest.fixture
def write_role(roles_dir: Path) -> Callable[..., Path]:
    """Write roles/<name>.yaml from a dict (YAML-dumped) or a string (verbatim)."""

    def write(name: str, content: dict[str, Any] | str) -> Path:
        path = roles_dir / f"{name}.yaml"
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


def run_cli(*args: str, cwd: Path = PROJECT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python build.py ARGS`` as a user would; return the finished process."""
    return subprocess.run(
        [sys.executable, str(PROJECT / "build.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's EC2 as a real HTTP server in this process, one per test module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def client(endpoint: str) -> Iterator[Any]:
    """An EC2 client of ``endpoint``, whose state is reset first (nothing of another test stays)."""
    import urllib.request

    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    yield boto3.client("ec2", region_name=os.environ["AWS_DEFAULT_REGION"], endpoint_url=endpoint)


@pytest.fixture
def mini_dir(roles_dir: Path, write_role: Callable[..., Path]) -> Path:
    """A roles directory holding MINI_ROLE as ``mini``."""
    write_role("mini", MINI_ROLE)
    return roles_dir


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The cached Debian 12 tree (built on first use: a few minutes)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, mounts and loop devices")
    from builder.sandbox.rootfs import ensure_rootfs

    return ensure_rootfs("bookworm", "amd64")


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    """Where this test's machines keep their state (removed by Machine.stop)."""
    return tmp_path / "machines"


MINI_ROLE: dict[str, Any] = {
    "description": "a role with nothing to install: quick to provision",
    "packages": [],
    "services": [],
    "volume": {"device": "/dev/sdf", "mount_point": "/data", "size_gib": 2},
    "externalize": [{"path": "/srv/app", "owner": "root", "group": "root", "mode": "0755"}],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Any:
    """A sandbox of this test module's own (tests/sandbox.py), reset afterwards: nothing may stay."""
    from builder.sandbox import control
    from tests.sandbox import World

    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state)
    try:
        yield world
    finally:
        # The server's log outlives the reset, next to the test's files, for a failure's story.
        log = state / "server.log"
        if log.exists():
            (tmp_path_factory.getbasetemp() / f"{state.name}-server.log").write_bytes(log.read_bytes())
        control.reset(state)
        assert not state.exists()
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
        assert str(state) not in loops

"""Start, inspect, stop and reset the sandbox: a local EC2 endpoint with real machines behind it.

The sandbox runs in the background (``builder.sandbox.server``) with its state in one
directory (``EBSROLE_SANDBOX``, default /var/lib/ebsrole/sandbox) until ``reset``, so
separate commands see the same world. ``ensure_started`` is what ``--sandbox`` calls.

Each start makes new credentials in the state directory (``builder.sandbox.auth``); the
endpoint answers only requests signed with them, and ``env`` gives them to other tools.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import EnvironmentProblem
from builder.sandbox import auth, vpcnet
from builder.sandbox.dataplane import DataPlane, network_prefix
from builder.sandbox.host import require_root, require_tools
from builder.sandbox.latency import Model, new_seed
from builder.sandbox.machine import TOOLS, Machine
from builder.sandbox.rootfs import DEFAULT_CACHE, ensure_rootfs
from builder.sandbox.server import SERVER_FILE, STATUS_PATH

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("EBSROLE_SANDBOX", "/var/lib/ebsrole/sandbox"))
REGION = "us-east-1"


def loopback_only_env(home: Path) -> dict[str, str]:
    """Return an environment that keeps another AWS tool (e.g. Packer) on the sandbox.

    Add ``env(state)`` (endpoint and credentials) to it. No AWS config or credentials
    files, no update checks, and every proxy variable set to a dead loopback port with
    loopback exempted: whatever the tool tries to reach beyond the sandbox's endpoint
    fails instead of leaving the machine.
    """
    dead = "http://127.0.0.1:9"
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CHECKPOINT_DISABLE": "1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        **{name: dead for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
        **{name: "127.0.0.1,localhost,127.0.0.0/8" for name in ("NO_PROXY", "no_proxy")},
    }


START_TIMEOUT = 60.0
# What the server imports beyond the runtime install: the extra ``ebsrole[sandbox]``.
SERVER_PACKAGES = ("moto", "flask", "werkzeug")


@dataclass(frozen=True)
class Running:
    """A running sandbox: its process and its EC2 endpoint."""

    pid: int
    endpoint: str
    latency: dict[str, Any] | None = None  # the EC2 latency model it runs, if any

    @property
    def wait_scope(self) -> str:
        """What the sandbox's waits are remembered under: its latency model, not its port."""
        # Not its seed: the same model with other draws is the same EC2 to learn from.
        latency = {k: v for k, v in self.latency.items() if k != "seed"} if self.latency else None
        model = json.dumps(latency, sort_keys=True) if latency else "none"
        return f"sandbox:{model}"


def running(state: Path = STATE_DIR) -> Running | None:
    """Return the running sandbox of ``state``, or None.

    Raises EnvironmentProblem when ``state`` exists but is not private to this user: its
    ``server.json`` names the endpoint clients trust with user-data and host keys.
    """
    if os.path.lexists(state):
        auth.check_state_dir(state)
    try:
        info = json.loads((state / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = int(info.get("pid", 0))
    if not _is_server(pid):
        return None
    return Running(pid, str(info["endpoint"]), info.get("latency"))


def require_packages() -> None:
    """Raise EnvironmentProblem when the sandbox's Python packages (the extra ``sandbox``) are missing."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"the sandbox needs moto[server] (not installed: {', '.join(missing)})",
            hint="pip install 'ebsrole[sandbox]'",
        )


def check_host() -> None:
    """Raise EnvironmentProblem (one line with the fix) when this host cannot run the sandbox."""
    require_root("the sandbox")
    require_tools(**TOOLS)
    if not Path("/dev/loop-control").exists():
        raise EnvironmentProblem(
            "no loop devices on this host (/dev/loop-control is missing)", hint="run: modprobe loop"
        )
    if not Path("/proc/self/ns/user").exists():
        raise EnvironmentProblem(
            "this kernel has no namespaces", hint="the sandbox needs a Linux kernel with namespaces"
        )


def start(
    state: Path = STATE_DIR,
    releases: tuple[str, ...] = ("bookworm",),
    cache: Path = DEFAULT_CACHE,
    latency: tuple[str, float, float] = ("none", 1.0, 0.0),
    seed: int | None = None,
) -> Running:
    """Start the sandbox unless it runs; prepare the Debian trees it boots first (with progress).

    ``latency`` is (preset, scale, EC2 calls per second) of the EC2 latency model; ``seed``
    that of its draws (None: a random one, recorded in its status).
    """
    seed = new_seed() if seed is None else seed
    Model.preset(*latency, seed=seed)  # bad values: InvalidInput, before anything starts
    require_packages()
    check_host()
    for release in releases:
        ensure_rootfs(release, "amd64", cache)
    current = running(state)
    if current:
        return current
    auth.make_state_dir(state)
    (state / SERVER_FILE).unlink(missing_ok=True)
    auth.new_credentials(state)  # each start its own: a leaked key dies with its server
    log_path = state / "server.log"
    started = time.monotonic()
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "builder.sandbox.server",
                "--state",
                str(state),
                "--cache",
                str(cache),
                "--latency",
                latency[0],
                "--latency-scale",
                str(latency[1]),
                "--api-rate",
                str(latency[2]),
                "--latency-seed",
                str(seed),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    while time.monotonic() - started < START_TIMEOUT:
        current = running(state)
        if current and current.pid == proc.pid:
            log.info(
                "sandbox: started in the background, EC2 endpoint %s (%.1f s); stop it with: build.py sandbox stop",
                current.endpoint,
                time.monotonic() - started,
            )
            return current
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    raise EnvironmentProblem(f"the sandbox did not start; last lines of {log_path}:\n{tail}")


def ensure_started(state: Path = STATE_DIR) -> Running:
    """Return the running sandbox, starting it (and preparing its Debian tree) when needed."""
    return running(state) or start(state)


def credentials(state: Path = STATE_DIR) -> tuple[str, str]:
    """Return the (access key id, secret) the running sandbox of ``state`` answers.

    Raises EnvironmentProblem when they are missing or not private to this user.
    """
    return auth.load_credentials(state).pair()


def env(state: Path = STATE_DIR) -> dict[str, str]:
    """Return the variables that point awscli, Terraform, Packer (any AWS SDK) at the sandbox.

    Starts the sandbox when it does not run (as ``--sandbox`` does).
    """
    current = ensure_started(state)
    key, secret = credentials(state)
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL_EC2": current.endpoint,
        "AWS_ENDPOINT_URL_AUTO_SCALING": current.endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


def stop(state: Path = STATE_DIR, timeout: float = 60.0) -> bool:
    """Stop the sandbox, keeping its state; return False when it was not running."""
    current = running(state)
    if current is None:
        _stop_machines(state, keep_state=True)
        return False
    os.kill(current.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_server(current.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_server(current.pid):
        os.kill(current.pid, signal.SIGKILL)
    _stop_machines(state, keep_state=True)
    log.info("sandbox: stopped (state kept in %s)", state)
    return True


def reset(state: Path = STATE_DIR) -> None:
    """Stop the sandbox and delete its whole state: instances, volumes, snapshots, images."""
    stop(state)
    _stop_machines(state, keep_state=False)
    shutil.rmtree(state, ignore_errors=True)
    log.info("sandbox: reset (%s removed)", state)


def status(state: Path = STATE_DIR) -> dict[str, Any]:
    """Return what the sandbox holds: EC2's view when it runs, and the host resources it uses."""
    current = running(state)
    if current is None:
        plane = DataPlane(state / "data") if (state / "data").is_dir() else None
        usage = plane.usage() if plane else DataPlane.empty_usage()
        return {"running": False, "state": str(state), **usage}
    url = current.endpoint + STATUS_PATH
    headers = auth.sign("GET", url, auth.load_credentials(state), REGION)
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback http
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback http
        view: dict[str, Any] = json.loads(answer.read())
    return {"running": True, "state": str(state), "endpoint": current.endpoint, "pid": current.pid, **view}


def _stop_machines(state: Path, *, keep_state: bool) -> None:
    """Stop machines a dead sandbox process left running (and free their loop devices and VPC bridges)."""
    machines = state / "data" / "machines"
    if machines.is_dir():
        for path in machines.iterdir():
            if path.is_dir():
                Machine(path.name, path).stop(keep_state=keep_state, grace=10)
    if state.is_dir():
        vpcnet.remove_networks(network_prefix(state / "data"))


def _is_server(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"builder.sandbox.server" in cmdline and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

"""Security boundaries of the tool itself: remote scripts never run from a path another user can
write, and secrets (the builder's host private key, its user-data) never reach logs or files.

Everything runs for real: a `--debug` build through the sandbox's endpoint, an instance of the
AMI it made, `audit --instance` against it while an unprivileged user on the instance attacks.
"""

from __future__ import annotations

import base64
import json
import shlex
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import CommandResult, RemoteCommandFailed, RemoteTimeout
from builder.redact import redact
from tests.conftest import MINI_ROLE
from tests.machines import needs_root
from tests.sandbox import Instance, World

pytestmark = needs_root

HOSTILE_DIR = "/var/tmp/ebsrole-audit"  # on the instance: where the audit used to upload to
MARKER = "/root/hostile-ran-as"  # only root can write there
# The attacker (www-data on the instance) swaps in this script whenever a verify.sh of someone
# else's appears in its directory; run by root, it leaves a marker and forges a passing report.
HOSTILE_SCRIPT = f"""#!/bin/bash
id -u > {MARKER}
printf 'ok\\tforged\\teverything\\tfine\\n'
"""
WATCHER = f"""
import os, shutil, time
d = {HOSTILE_DIR!r}
target, evil, me = d + "/verify.sh", d + "/evil.sh", os.getuid()
end = time.monotonic() + 600
while time.monotonic() < end:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        continue
    if st.st_uid != me and st.st_mode & 0o777 == 0o700:  # uploaded and made executable: swap it
        shutil.copy(evil, d + "/swap")
        os.replace(d + "/swap", target)
        open(d + "/swapped", "w").close()
"""


# ---------------------------------------------------------------- redaction, form by form


def _user_data() -> str:
    from builder.keys import KeyPair
    from builder.userdata import builder_user_data

    return builder_user_data(KeyPair.generate("l"), KeyPair.generate("h"), deadline_seconds=60)


@pytest.mark.parametrize(
    "form",
    [
        "{{'Action': 'RunInstances', 'UserData': '{b64}', 'ClientToken': 'x'}}",  # botocore's params
        '{{"UserData": "{b64}", "ClientToken": "x"}}',  # JSON
        "Action=RunInstances&UserData={url}&ClientToken=x",  # urlencoded body
        "Action=CreateLaunchTemplate&LaunchTemplateData.UserData={url}&ClientToken=x",
        "<userData><value>{b64}</value></userData>",  # an XML answer
        "user data: {b64_cut} (truncated)",  # base64 anywhere, even cut short
        "{plain}",  # the cloud-config itself
        "{{'UserData': {plain_repr}, 'ClientToken': 'x'}}",
    ],
)
def test_redact_removes_user_data_and_keys_in_every_form(form: str) -> None:
    user_data = _user_data()
    b64 = base64.b64encode(user_data.encode()).decode()
    line = form.format(
        b64=b64,
        url=urllib.parse.quote(b64, safe=""),
        b64_cut=b64[:-7],
        plain=user_data,
        plain_repr=repr(user_data),
    )
    clean = redact(line)
    assert "PRIVATE KEY" not in clean and "ssh_keys" not in clean
    assert b64[:40] not in clean and urllib.parse.quote(b64, safe="")[:40] not in clean
    assert "[redacted]" in clean
    assert "ClientToken" not in line or "ClientToken" in clean  # the rest of the line stays


def test_redact_keeps_what_is_not_secret() -> None:
    line = "{'ImageId': 'ami-0123', 'KeyName': 'ebsrole-x', 'Body': '" + base64.b64encode(b"x" * 90).decode() + "'}"
    assert redact(line) == line


# ---------------------------------------------------------------- a --debug build, then attacks


@pytest.fixture(scope="module")
def built(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A `--debug` build of a role without packages: its complete log, manifest and user-data."""
    roles = tmp_path_factory.mktemp("roles")
    (roles / "sec.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    manifest = tmp_path_factory.mktemp("out") / "sec.json"
    args = ["sec", "--roles-dir", str(roles), "--manifest", str(manifest), "--sandbox", "--debug", "--verbose"]
    done = world.cli(*args, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    doc = json.loads(manifest.read_text())
    builder = next(r["id"] for r in doc["resources"] if r["kind"] == "instance")
    attribute = world.client().describe_instance_attribute(InstanceId=builder, Attribute="userData")
    user_data_b64 = attribute["UserData"]["Value"]
    return {
        "log": done.stdout + done.stderr,
        "manifest_text": manifest.read_text(),
        "ami": doc["ami"],
        "builder": builder,
        "roles": roles,
        "user_data_b64": user_data_b64,
        "user_data": base64.b64decode(user_data_b64).decode(),
    }


def test_debug_build_log_and_manifest_hold_no_key_and_no_user_data(built: dict[str, Any]) -> None:
    log, user_data, b64 = built["log"], built["user_data"], built["user_data_b64"]
    assert "RunInstances" in log and "botocore" in log  # it is the debug log, bodies and all
    assert "PRIVATE KEY" in user_data  # what must not leak: the builder's pinned host key
    key_body = [line.strip() for line in user_data.splitlines() if len(line.strip()) >= 60]
    assert key_body, "no private key body found in the user-data"
    for text, what in ((log, "log"), (built["manifest_text"], "manifest")):
        assert "PRIVATE KEY" not in text, what
        assert "#cloud-config" not in text, what
        assert b64[:40] not in text and urllib.parse.quote(b64, safe="")[:40] not in text, what
        assert "I2Nsb3VkLWNvbmZpZw" not in text, what  # base64 of "#cloud-config", any framing
        assert not [line for line in key_body if line in text], what
    assert "'UserData': '[redacted]'" in log


def test_the_build_makes_no_key_pair_its_login_key_goes_in_the_user_data_only(
    world: World, built: dict[str, Any]
) -> None:
    """The sandbox authorizes a key pair's key only when RunInstances names one (instance metadata);
    this build SSHed into its builder and provisioned it, so cloud-init's ssh_authorized_keys let it in."""
    client = world.client()
    assert client.describe_key_pairs()["KeyPairs"] == []
    (reservation,) = client.describe_instances(InstanceIds=[built["builder"]])["Reservations"]
    assert "KeyName" not in reservation["Instances"][0]
    assert "ImportKeyPair" not in built["log"] and "DeleteKeyPair" not in built["log"]
    (login,) = yaml.safe_load(built["user_data"])["ssh_authorized_keys"]
    assert login.startswith("ssh-ed25519 ")
    steps = {s["step"]: s["outcome"] for s in json.loads(built["manifest_text"])["steps"]}
    assert steps["connect over SSH"] == steps["provision, verify, image hygiene"] == "done", steps


def test_sandbox_files_holding_a_key_are_private(world: World, built: dict[str, Any]) -> None:
    """Whatever the sandbox keeps that holds user-data (a key) is 0600 in a 0700 state directory."""
    assert world.state.stat().st_mode & 0o777 == 0o700
    key_body = next(line.strip() for line in built["user_data"].splitlines() if len(line.strip()) >= 60)
    holding = []
    for path in world.state.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
            data = path.read_bytes()
            if b"PRIVATE KEY" in data or key_body.encode() in data or built["user_data_b64"].encode() in data:
                holding.append(path)
    assert holding, "the sandbox keeps the builder's user-data somewhere: this test must look there"
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in holding} == {str(p): "0o600" for p in holding}


@pytest.fixture(scope="module")
def instance(world: World, built: dict[str, Any]) -> Iterator[Instance]:
    launched = world.launch(built["ami"])
    try:
        yield launched
    finally:
        launched.remote.close()
        world.client().terminate_instances(InstanceIds=[launched.id])


def _root(instance: Instance, command: str) -> CommandResult:
    result = instance.remote.run(f"sudo -n bash -c {shlex.quote(command)}", timeout=120, on_line=lambda *_: None)
    assert result.exit_status == 0, f"{command!r}: {result.tail()}"
    return result


def _audit(world: World, instance: Instance, built: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    key, known = tmp_path / "id", tmp_path / "known_hosts"
    key.write_text(instance.login.private_openssh)
    key.chmod(0o600)
    known.write_text(f"{instance.address} {' '.join(instance.host_key.public_line.split()[:2])}\n")
    done = world.cli(
        *("audit", "--instance", instance.id, "--identity", str(key), "--known-hosts", str(known)),
        *("--roles-dir", str(built["roles"]), "--sandbox", "--format", "json"),
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_hostile_audit_directory_is_never_used(
    world: World, instance: Instance, built: dict[str, Any], tmp_path: Path
) -> None:
    """www-data on the instance pre-creates the audit's old directory and swaps any script put there."""
    as_www = "runuser -u www-data --"
    _root(
        instance,
        f"{as_www} install -d -m 0777 {HOSTILE_DIR} && "
        f"printf %s {shlex.quote(HOSTILE_SCRIPT)} | {as_www} tee {HOSTILE_DIR}/evil.sh >/dev/null && "
        f"setsid -f {as_www} python3 -c {shlex.quote(WATCHER)} </dev/null >/dev/null 2>&1",
    )
    try:
        time.sleep(0.5)  # the watcher is up
        code, report = _audit(world, instance, built, tmp_path)
        listing = _root(instance, f"ls -A {HOSTILE_DIR}").stdout.split()
        ran = _root(instance, f"cat {MARKER} 2>/dev/null || true").stdout.strip()
        assert ran == "", f"the hostile script ran as uid {ran}"
        assert listing == ["evil.sh"], f"the audit used the hostile directory: {listing}"
        assert code == 0 and report["passed"], report
        assert "forged" not in {c["check"] for c in report["checks"]}
        assert any(c["subject"] == "/srv/app" and c["state"] == "ok" for c in report["checks"])

        # The result is the instance's, not the attacker's: break it, and the audit says so.
        _root(instance, "umount -l /data")
        code, report = _audit(world, instance, built, tmp_path)
        assert code == 1 and not report["passed"]
        assert any(c["check"] == "mount" and c["state"] == "FAIL" for c in report["checks"])
        assert _root(instance, f"ls -A {HOSTILE_DIR}").stdout.split() == ["evil.sh"]
    finally:
        _root(instance, "pkill -u www-data -f 'python3 -c' || true; mountpoint -q /data || mount /data || true")


# ---------------------------------------------------------------- the script runner itself


def test_scripts_run_as_root_from_stdin_leaving_no_file(instance: Instance) -> None:
    before = _root(instance, "ls -A /var/tmp /tmp").stdout
    lines: list[tuple[str, str]] = []
    script = (
        "#!/bin/bash\nset -euo pipefail\n"
        'echo "name=$0 args=$# $1|$2 uid=$(id -u)"\n'
        'rest=$(cat); echo "stdin left to the script: ${#rest} bytes"\n'  # must not eat the script
        "echo to-stderr >&2\n"
        "echo last line\n"
    )
    result = instance.remote.run_script(
        "probe.sh", script, ["one", "two words"], timeout=60, on_line=lambda s, line: lines.append((s, line))
    )
    assert result.stdout.splitlines() == [
        "name=probe.sh args=2 one|two words uid=0",
        "stdin left to the script: 0 bytes",
        "last line",
    ]
    assert ("stderr", "to-stderr") in lines and ("stdout", "last line") in lines  # streamed as they come
    assert _root(instance, "ls -A /var/tmp /tmp").stdout == before


def test_script_exit_codes_large_scripts_and_time_outs(instance: Instance) -> None:
    with pytest.raises(RemoteCommandFailed) as failed:
        instance.remote.run_script("fails.sh", "echo before\nexit 7\necho never\n", timeout=60)
    assert failed.value.result.exit_status == 7 and failed.value.result.stdout == "before\n"
    assert "fails.sh exited 7" in failed.value.render()
    assert instance.remote.run_script("soft.sh", "false\n", check=False).exit_status == 1

    # Larger than SSH's window (2 MiB): sent as the window opens, read whole before it runs.
    filler = "".join(f": {i:08d} {'x' * 100}\n" for i in range(30_000))
    big = instance.remote.run_script("big.sh", f"echo first\n{filler}echo done $(( 6 * 7 ))\n", timeout=120)
    assert big.stdout.split() == ["first", "done", "42"]

    started = time.monotonic()
    with pytest.raises(RemoteTimeout):
        instance.remote.run_script("slow.sh", "sleep 60\n", timeout=2)
    assert time.monotonic() - started < 10
    _root(instance, "pkill -x sleep || true")

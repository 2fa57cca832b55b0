"""Who may use the sandbox: its state directory's checks, and SigV4 checking of odd requests.

The requests that travel over HTTP to a running sandbox (unsigned, wrong secret, replayed
body, /moto-api) are tested in test_sandbox.py against its `world`; here, what needs no
running sandbox.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from builder.errors import EnvironmentProblem
from builder.sandbox import auth, control
from tests.conftest import PROJECT

SANDBOX = auth.Credentials("ASBX0123456789ABCDEF", "s" * 40)
BODY = b"Action=DescribeVolumes&Version=2016-11-15"


def _private_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    auth.make_state_dir(state)
    return state


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (lambda s: s.chmod(0o755), "has mode 0755: others may use it"),
        (lambda s: os.chown(s, 65534, 65534), "is owned by uid 65534"),
        (lambda s: (s.rmdir(), s.symlink_to(s.parent)), "is not a directory"),
    ],
    ids=["group-and-world-readable", "another-owner", "symlink"],
)
@pytest.mark.parametrize("action", ["status", "start"])
def test_a_state_directory_others_can_use_is_refused(tmp_path: Path, spoil: Any, says: str, action: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the sandbox and chown")
    state = _private_state(tmp_path)
    spoil(state)
    done = subprocess.run(
        [sys.executable, str(PROJECT / "build.py"), "sandbox", action],
        cwd=PROJECT,
        env={**os.environ, "EBSROLE_SANDBOX": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert done.stderr.startswith(f"error: sandbox state {state} {says}"), done.stderr
    assert "refusing to use it" in done.stderr and "Traceback" not in done.stderr
    assert not (state / "server.json").exists() and not (state / auth.CREDENTIALS_FILE).exists()


def test_new_state_is_0700_and_credentials_0600_and_a_readable_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    auth.make_state_dir(state)
    made = auth.new_credentials(state)
    assert (state.stat().st_mode & 0o777, (state / auth.CREDENTIALS_FILE).stat().st_mode & 0o777) == (0o700, 0o600)
    assert control.credentials(state) == made.pair()
    assert made.secret_access_key not in repr(made)
    (state / auth.CREDENTIALS_FILE).chmod(0o644)
    with pytest.raises(EnvironmentProblem, match=r"credentials\.json has mode 0644"):
        control.credentials(state)


def _environ(request: AWSRequest) -> dict[str, Any]:
    """Return the WSGI environ a server sees for ``request`` (headers as HTTP_*)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(request.body),
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    return environ


def _signed(
    service: str = "ec2", secret: str = SANDBOX.secret_access_key, headers: dict[str, str] | None = None
) -> AWSRequest:
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:8000/",
        data=BODY,
        headers={"Host": "127.0.0.1:8000", "Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
    )
    SigV4Auth(BotoCredentials(SANDBOX.access_key_id, secret), service, "us-east-1").add_auth(request)
    return request


def _verify(environ: dict[str, Any]) -> str:
    verdict = auth.verify(environ, BODY, SANDBOX, dt.datetime.now(dt.UTC))
    return verdict.code if isinstance(verdict, auth.Refusal) else f"ok {verdict.region}"


def test_verify_accepts_botocores_signature_and_names_each_refusal() -> None:
    assert _verify(_environ(_signed())) == "ok us-east-1"
    assert _verify(_environ(_signed(secret="x" * 40))) == "SignatureDoesNotMatch"
    assert _verify(_environ(_signed(service="s3"))) == "AuthFailure"  # moto's other services: not here
    changed = _environ(_signed())
    changed["CONTENT_TYPE"] = "text/plain"  # a signed header altered on the way
    assert _verify(changed) == "SignatureDoesNotMatch"
    dropped = _environ(_signed())
    del dropped["CONTENT_TYPE"]  # a signed header missing
    assert _verify(dropped) == "SignatureDoesNotMatch"
    lying = _environ(_signed(headers={"X-Amz-Content-SHA256": "0" * 64}))  # signed, but not the body's hash
    assert _verify(lying) == "XAmzContentSHA256Mismatch"
    undated = _environ(_signed())
    del undated["HTTP_X_AMZ_DATE"]
    assert _verify(undated) == "AuthFailure"
    garbled = _environ(_signed())
    garbled["HTTP_AUTHORIZATION"] = "Basic c2FuZGJveDpzYW5kYm94"
    assert _verify(garbled) == "AuthFailure"

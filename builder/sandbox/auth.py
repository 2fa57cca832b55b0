"""Who may talk to the sandbox's endpoint: its own credentials, checked with SigV4.

127.0.0.1 is reachable by every local user, and a sandbox instance's user-data runs as root
on a real machine, so the endpoint answers only requests signed (AWS Signature Version 4)
with the credentials made at ``sandbox start``. They live in the state directory, which
must be a real directory owned by whoever runs the sandbox with no access for anyone else
(0700); the credentials file is 0600. A state directory that is not so is refused: its
``server.json`` names the endpoint a client trusts with user-data and host keys.

The signature is recomputed with botocore's own ``SigV4Auth`` over the request as received
(method, path, query, the headers it says it signed, the body) and compared in constant
time; the scope's access key id, date and service and the request's clock skew are checked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from builder.errors import EnvironmentProblem
from builder.files import write_atomic

CREDENTIALS_FILE = "credentials.json"
# EC2; SSM parameters (prune reads them); STS (the account id); KMS keys; Auto Scaling (`template --asg`).
SERVICES = ("ec2", "ssm", "sts", "kms", "autoscaling")
MAX_SKEW = dt.timedelta(minutes=15)  # as AWS allows
AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/(?P<service>[a-z0-9-]+)"
    r"/aws4_request,\s*SignedHeaders=(?P<headers>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)
AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
HINT = 'sign with the sandbox\'s credentials: eval "$(python build.py sandbox env)"'


@dataclass(frozen=True)
class Credentials:
    """The access key id and secret the sandbox's endpoint accepts."""

    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a log line or a traceback

    def pair(self) -> tuple[str, str]:
        """Return (access key id, secret), as boto3 takes them."""
        return self.access_key_id, self.secret_access_key

    @classmethod
    def generate(cls) -> Credentials:
        """Return fresh random credentials (shaped like AWS's: a 20-character id, a 40-character secret)."""
        return cls("ASBX" + secrets.token_hex(8).upper(), secrets.token_hex(20))


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an EC2 error code and its message (answered with 403)."""

    code: str
    message: str


@dataclass(frozen=True)
class Scope:
    """The credential scope of a request whose signature checked out."""

    access_key_id: str
    region: str
    service: str = "ec2"  # of SERVICES: what the signature's scope names


# ---------------------------------------------------------------- the state directory


def make_state_dir(state: Path) -> None:
    """Create ``state`` as 0700 when missing; raise EnvironmentProblem when it is not safe to use."""
    state.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        state.mkdir(mode=0o700)
    check_state_dir(state)


def check_state_dir(state: Path) -> None:
    """Raise EnvironmentProblem unless ``state`` is a directory of this user that nobody else can use."""
    info = os.lstat(state)
    _check_private(state, info, "directory", stat.S_ISDIR(info.st_mode), 0o700)


def _check_private(path: Path, info: os.stat_result, kind: str, right_kind: bool, mode: int) -> None:
    problem = None
    if not right_kind:
        problem = f"is not a {kind}"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by uid {os.geteuid()} who runs the sandbox"
    elif stat.S_IMODE(info.st_mode) & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}: others may use it"
    if problem:
        raise EnvironmentProblem(
            f"sandbox state {path} {problem}; refusing to use it",
            hint=f"make it a {kind} of yours with mode {mode:04o}, or set EBSROLE_SANDBOX to another path",
        )


def new_credentials(state: Path) -> Credentials:
    """Make fresh credentials for the sandbox of ``state`` and store them 0600; return them."""
    check_state_dir(state)
    made = Credentials.generate()
    body = {"access_key_id": made.access_key_id, "secret_access_key": made.secret_access_key}
    write_atomic(state / CREDENTIALS_FILE, json.dumps(body) + "\n", mode=0o600)
    return made


def load_credentials(state: Path) -> Credentials:
    """Return the credentials of the sandbox of ``state``.

    Raises EnvironmentProblem when the directory or the file is not private to this user,
    or when there are none (a sandbox started before credentials existed).
    """
    check_state_dir(state)
    path = state / CREDENTIALS_FILE
    try:
        info = os.lstat(path)
        _check_private(path, info, "file", stat.S_ISREG(info.st_mode), 0o600)
        data = json.loads(path.read_text())
        return Credentials(str(data["access_key_id"]), str(data["secret_access_key"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnvironmentProblem(
            f"sandbox credentials {path}: unreadable ({exc})",
            hint="restart the sandbox (python build.py sandbox stop; python build.py sandbox start): it makes new ones",
        ) from None


# ---------------------------------------------------------------- signing and checking


def sign(method: str, url: str, credentials: Credentials, region: str, body: bytes = b"") -> dict[str, str]:
    """Return the headers that sign a request to the sandbox (for the calls boto3 does not make)."""
    request = AWSRequest(method=method, url=url, data=body)
    SigV4Auth(BotoCredentials(*credentials.pair()), SERVICES[0], region).add_auth(request)
    return dict(request.headers.items())


def verify(environ: dict[str, Any], body: bytes, credentials: Credentials, now: dt.datetime) -> Scope | Refusal:
    """Return the scope of a request correctly signed with ``credentials``, or why it is refused.

    ``environ`` is the request's WSGI environ, ``body`` its body as received, ``now`` in UTC.
    """
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header:
        return Refusal("AuthFailure", f"the request is not signed; {HINT}")
    match = AUTHORIZATION.fullmatch(header.strip())
    if not match:
        return Refusal("AuthFailure", "the Authorization header is not an AWS4-HMAC-SHA256 signature")
    if not hmac.compare_digest(match["key"].encode(), credentials.access_key_id.encode()):
        return Refusal("AuthFailure", f"AWS was not able to validate the provided access credentials; {HINT}")
    if match["service"] not in SERVICES:
        served = ", ".join(SERVICES)
        return Refusal("AuthFailure", f"the credential scope names service {match['service']!r}; this serves {served}")
    refused = _check_date(environ.get("HTTP_X_AMZ_DATE", ""), match["date"], now)
    if refused:
        return refused
    signed = match["headers"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return Refusal("AuthFailure", "the signature must cover the host and x-amz-date headers")
    expected = _signature(environ, body, signed, credentials, match["region"], service=match["service"])
    if isinstance(expected, Refusal):
        return expected
    if not hmac.compare_digest(expected.encode(), match["signature"].encode()):
        return Refusal(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
    return Scope(match["key"], match["region"], match["service"])


def _check_date(amz_date: str, scope_date: str, now: dt.datetime) -> Refusal | None:
    if not AMZ_DATE.fullmatch(amz_date):
        return Refusal("AuthFailure", "the request has no valid X-Amz-Date header")
    when = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
    if amz_date[:8] != scope_date:
        return Refusal("SignatureDoesNotMatch", "the credential scope's date is not the X-Amz-Date's")
    if abs(now - when) > MAX_SKEW:
        return Refusal(
            "RequestExpired", f"Request has expired: X-Amz-Date {amz_date} is over 15 minutes off the sandbox's clock"
        )
    return None


def _signature(
    environ: dict[str, Any], body: bytes, signed: list[str], credentials: Credentials, region: str, *, service: str
) -> str | Refusal:
    """Return the signature botocore computes for the request as received, over the headers it says it signed."""
    headers = {}
    for name in signed:
        value = _header(environ, name)
        if value is None:
            return Refusal("SignatureDoesNotMatch", f"the signed header {name!r} is not in the request")
        headers[name] = value
    query = environ.get("QUERY_STRING", "")
    url = f"http://{headers['host']}{environ.get('PATH_INFO', '/')}" + (f"?{query}" if query else "")
    request = AWSRequest(method=environ.get("REQUEST_METHOD", "GET"), url=url, headers=headers, data=body)
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(BotoCredentials(*credentials.pair()), service, region)
    claimed = request.headers.get("X-Amz-Content-SHA256")
    if claimed is not None and not hmac.compare_digest(claimed.encode(), signer.payload(request).encode()):
        return Refusal("XAmzContentSHA256Mismatch", "the X-Amz-Content-SHA256 header is not the body's hash")
    canonical = signer.canonical_request(request)
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


def _header(environ: dict[str, Any], name: str) -> str | None:
    """Return a request header from a WSGI environ (content-type and -length have no HTTP_ prefix)."""
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}")
    return None if value is None else str(value)

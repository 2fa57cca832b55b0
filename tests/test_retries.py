"""The SDK's retry conventions: AWS_MAX_ATTEMPTS and AWS_RETRY_MODE (or the profile's) decide
how often a throttled call is sent, counted at a real HTTP endpoint that always throttles."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.aws.ec2 import EC2
from builder.errors import CloudError, InvalidInput
from tests.conftest import run_cli

THROTTLED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded</Code>'
    b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>"
)


class Throttling(ThreadingHTTPServer):
    """An EC2 endpoint on loopback that answers every call with RequestLimitExceeded (503)."""

    requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: Throttling

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests += 1
        self.send_response(503)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(THROTTLED)))
        self.end_headers()
        self.wfile.write(THROTTLED)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def throttling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Throttling]:
    server = Throttling(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))  # no user's settings leak in
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    yield server
    server.shutdown()
    server.server_close()


def _describe(server: Throttling, profile: str | None = None) -> int:
    """Make one throttled call; return how many requests reached the endpoint."""
    ec2 = EC2.connect("us-east-1", profile, f"http://127.0.0.1:{server.server_address[1]}")
    with pytest.raises(CloudError, match="RequestLimitExceeded"):
        ec2.call("describe_regions")
    return server.requests


def test_aws_max_attempts_sets_the_total_attempts(throttling: Throttling, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert _describe(throttling) == 2


def test_aws_max_attempts_1_sends_once(throttling: Throttling, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    assert _describe(throttling) == 1


def test_the_profiles_max_attempts_counts_when_the_environment_is_silent(
    throttling: Throttling, tmp_path: Path
) -> None:
    (tmp_path / "config").write_text(
        "[profile slow]\nregion = us-east-1\naws_access_key_id = testing\naws_secret_access_key = testing\nmax_attempts = 3\nretry_mode = standard\n"
    )
    assert _describe(throttling, "slow") == 3


def test_the_default_is_standard_mode_with_retries(throttling: Throttling) -> None:
    ec2 = EC2.connect("us-east-1", None, f"http://127.0.0.1:{throttling.server_address[1]}")
    retries = ec2.client.meta.config.retries
    assert retries["mode"] == "standard"
    assert retries.get("total_max_attempts", retries.get("max_attempts", 0) + 1) == 6


def test_adaptive_mode_reaches_the_clients(throttling: Throttling, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    ec2 = EC2.connect("us-east-1", None, f"http://127.0.0.1:{throttling.server_address[1]}")
    assert ec2.client.meta.config.retries["mode"] == "adaptive"
    with pytest.raises(CloudError):
        ec2.call("describe_regions")
    assert throttling.requests == 2


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [("AWS_MAX_ATTEMPTS", "zero", "AWS_MAX_ATTEMPTS 'zero'"), ("AWS_RETRY_MODE", "eager", "AWS_RETRY_MODE 'eager'")],
)
def test_bad_settings_exit_2_naming_the_variable(
    throttling: Throttling, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidInput, match=says):
        EC2.connect("us-east-1", None, f"http://127.0.0.1:{throttling.server_address[1]}")
    done = run_cli(
        "changed", "--region", "us-east-1", "--endpoint-url", f"http://127.0.0.1:{throttling.server_address[1]}"
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2
    assert throttling.requests == 0

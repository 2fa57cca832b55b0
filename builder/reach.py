"""How to reach an instance over SSH: directly (public or private address) or through a proxy.

A :class:`Reach` says which address of a described instance to connect to and, for a
proxy, the OpenSSH ``ProxyCommand`` to run with its tokens expanded (``%h`` the address,
``%p`` the port, ``%r`` the remote user, ``%i`` the instance id, ``%%`` a percent sign).
``--bastion [user@]host[:port]`` is a shorthand for an ``ssh -W`` proxy whose bastion host
key is pinned from a known_hosts file: the bastion is never trusted on first use.

Pure: no SSH and no EC2 here (the expanded command is handed to :mod:`builder.remote`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import InvalidInput

METHODS = ("public", "private", "proxy")
TOKEN = re.compile(r"%(.)?", re.S)
TOKENS = "%h %p %r %i %%"
# The option names (argparse dests, BuildOptions fields) a Reach is made of, in its field order.
OPTIONS = ("connect_method", "ssh_proxy_command", "bastion", "bastion_known_hosts", "bastion_identity", "ssh_host")
BASTION = re.compile(
    r"(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
    r"(?::(?P<port>\d+))?"
)


def default_known_hosts() -> Path:
    """Return the known_hosts file the bastion's host key is pinned from by default."""
    return Path.home() / ".ssh" / "known_hosts"


@dataclass(frozen=True)
class Bastion:
    """An ``ssh -W`` jump host: [user@]host[:port]."""

    host: str
    port: int = 22
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> Bastion:
        """Return the bastion ``text`` names; raise InvalidInput for anything but [user@]host[:port]."""
        found = BASTION.fullmatch(text)
        port = int(found["port"]) if found and found["port"] else 22
        if not found or found["host"].startswith("-") or not 1 <= port <= 65535:
            raise InvalidInput(f"--bastion {text!r}: give [user@]host[:port], e.g. admin@bastion.example.com:22")
        return cls(found["host"].strip("[]"), port, found["user"])

    def known_name(self) -> str:
        """Return the bastion's name in a known_hosts file (``[host]:port`` unless port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class Reach:
    """How to reach an instance: the method (None: public when it has a public IP, else private) and proxy."""

    method: str | None = None  # public | private | proxy | None (auto)
    proxy_command: str | None = None  # OpenSSH ProxyCommand, with %h %p %r %i %% tokens
    bastion: str | None = None  # [user@]host[:port]: an ssh -W proxy, its host key pinned
    bastion_known_hosts: Path | str | None = None  # default ~/.ssh/known_hosts
    bastion_identity: Path | str | None = None  # the key to log in to the bastion (default: ssh's own)
    host: str | None = None  # connect here instead of the instance's address (--ssh-host)

    def __post_init__(self) -> None:
        """Refuse contradictory or malformed options (InvalidInput), before any cloud call."""
        if self.method is not None and self.method not in METHODS:
            raise InvalidInput(f"--connect {self.method!r}: give one of {', '.join(METHODS)}")
        if self.bastion and self.proxy_command:
            raise InvalidInput("--bastion and --ssh-proxy-command both name a proxy: give one of them")
        proxied = bool(self.bastion or self.proxy_command)
        if self.method == "proxy" and not proxied:
            raise InvalidInput("--connect proxy needs --ssh-proxy-command CMD or --bastion [user@]host[:port]")
        if self.method in ("public", "private") and proxied:
            raise InvalidInput(f"--connect {self.method} connects directly: drop it, or drop the proxy option")
        if self.proxy_command is not None:
            _check_tokens(self.proxy_command)
        if self.bastion:
            _check_pinned(Bastion.parse(self.bastion), self.known_hosts)

    def refuse_public(self) -> None:
        """Raise InvalidInput when asked to connect publicly to an instance launched without a public IP."""
        if self.method == "public":
            raise InvalidInput("--no-public-ip and --connect public contradict: connect privately or through a proxy")

    @classmethod
    def of(cls, options: Any) -> Reach:
        """Return the Reach the shared connection options (argparse or BuildOptions fields) name."""
        method, command, bastion, known_hosts, identity, host = (getattr(options, name, None) for name in OPTIONS)
        return cls(method, command, bastion, known_hosts, identity, host)

    @property
    def known_hosts(self) -> Path:
        """Return the known_hosts file that pins the bastion's host key."""
        return Path(self.bastion_known_hosts).expanduser() if self.bastion_known_hosts else default_known_hosts()

    @property
    def proxied(self) -> bool:
        """Return True when SSH goes through a proxy command (or a bastion)."""
        return bool(self.bastion or self.proxy_command)

    def private(self, public_ip: bool) -> bool:
        """Return True when SSH reaches an instance (with a public IP or not) from inside its VPC."""
        if self.proxied or self.method == "private":
            return True
        return self.method is None and not public_ip and not self.host

    def address(self, instance: Mapping[str, Any]) -> str:
        """Return the address to connect to (or to hand a proxy as %h) of a described instance.

        Raises InvalidInput naming the instance and the option to use when it lacks the
        address the method needs.
        """
        if self.host:
            return self.host
        name = instance.get("InstanceId", "the instance")
        public, private = instance.get("PublicIpAddress"), instance.get("PrivateIpAddress")
        if self.method == "public" and not public:
            raise InvalidInput(
                f"{name} has no public IP address: give --connect private (from inside its VPC), "
                "--bastion or --ssh-proxy-command"
            )
        if self.method == "private" and not private:
            raise InvalidInput(f"{name} has no private IP address: give --connect public")
        if self.method == "public" or (self.method is None and not self.proxied and public):
            return str(public)
        address = private or public
        if not address:
            raise InvalidInput(f"{name} has no IP address yet: give --ssh-host ADDRESS")
        return str(address)

    def answering(self, port: int, described: Callable[[], Mapping[str, Any] | None]) -> Callable[[], bool] | None:
        """Return a check that the instance's sshd answers where SSH will go; None through a proxy.

        ``described`` gives the instance's latest description (its address may show only
        after a look). Only the address that SSH will connect to next is ever tried.
        """
        if self.proxied:
            return None

        def answers() -> bool:
            instance = described()
            if not instance:
                return False
            try:
                host = self.address(instance)
            except InvalidInput:
                return False
            return ssh_answers(host, port)

        return answers

    def proxy(self, address: str, port: int, user: str, instance_id: str = "") -> str | None:
        """Return the proxy command to run for ``address``:``port`` (tokens expanded), or None for none."""
        template = self.proxy_command or (self._bastion_command() if self.bastion else None)
        if template is None:
            return None
        values = {"h": address, "p": str(port), "r": user, "i": instance_id or address}
        return expand(template, values)

    def _bastion_command(self) -> str:
        bastion = Bastion.parse(str(self.bastion))
        words = ["ssh", "-W", "%h:%p", "-o", "StrictHostKeyChecking=yes"]
        words += ["-o", _ssh_file_option("UserKnownHostsFile", self.known_hosts), "-o", "BatchMode=yes"]
        if self.bastion_identity:
            words += ["-o", _ssh_file_option("IdentityFile", Path(self.bastion_identity).expanduser())]
            words += ["-o", "IdentitiesOnly=yes"]
        if bastion.port != 22:
            words += ["-p", str(bastion.port)]
        if bastion.user:
            words += ["-l", bastion.user]
        words.append(bastion.host)
        return " ".join(w if w.startswith("%") else shlex.quote(w).replace("%", "%%") for w in words)


def expand(template: str, values: Mapping[str, str]) -> str:
    """Return ``template`` with each %TOKEN replaced by its value, shell-quoted (%% is a percent sign)."""

    def one(found: re.Match[str]) -> str:
        name = found[1]
        return "%" if name == "%" else shlex.quote(values[name])

    return TOKEN.sub(one, template)


def _check_tokens(template: str) -> None:
    if not template.strip():
        raise InvalidInput("--ssh-proxy-command is empty: give a command such as 'ssh -W %h:%p bastion'")
    for found in TOKEN.finditer(template):
        if found[1] is None or found[1] not in "hpri%":
            raise InvalidInput(f"--ssh-proxy-command: unknown token {found[0]!r}: use {TOKENS}")


def _check_pinned(bastion: Bastion, known_hosts: Path) -> None:
    """Raise InvalidInput unless ``known_hosts`` holds a host key of ``bastion``."""
    try:
        text = known_hosts.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidInput(f"--bastion-known-hosts {known_hosts}: {exc.strerror}") from None
    if not any(_names(line, bastion.known_name()) for line in text.splitlines()):
        raise InvalidInput(
            f"--bastion {bastion.host}: no host key for {bastion.known_name()} in {known_hosts}: "
            "pin the bastion's key there (checked, e.g. from its console) or give --bastion-known-hosts FILE"
        )


def _names(line: str, name: str) -> bool:
    """Return True when known_hosts ``line`` is a (plain or hashed) key of host ``name``."""
    fields = line.split()
    if len(fields) < 3 or line.lstrip().startswith("#"):
        return False
    hosts = fields[1] if fields[0].startswith("@") else fields[0]
    if fields[0] == "@revoked":
        return False
    for pattern in hosts.split(","):
        if pattern.startswith("|1|"):
            if _hashed(pattern, name):
                return True
        elif pattern == name:
            return True
    return False


def _hashed(pattern: str, name: str) -> bool:
    """Return True when the hashed known_hosts name ``|1|salt|hash`` is ``name`` (ssh's HashKnownHosts)."""
    try:
        salt, digest = (base64.b64decode(p, validate=True) for p in pattern[3:].split("|", 1))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _ssh_file_option(option: str, path: Path) -> str:
    """Return ``option=path`` for ssh -o: ssh expands %-tokens in file names, and splits at blanks."""
    value = str(path).replace("%", "%%")
    if any(c.isspace() for c in value):
        if '"' in value:
            raise InvalidInput(f"{path}: a file name with both blanks and double quotes cannot be handed to ssh")
        value = f'"{value}"'
    return f"{option}={value}"


def ssh_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return True when an SSH server greets at ``host``:``port`` ("SSH-" first), without logging in.

    A port that accepts and then closes (a forwarder with nothing behind it yet) is no
    answer; nor is a refusal or a time-out.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            greeting = b""
            while len(greeting) < 4:
                chunk = sock.recv(4 - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
            return greeting == b"SSH-"
    except OSError:
        return False

"""Temporary ed25519 keys, made and kept in memory only (never written to disk); and the user's own."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder.errors import InvalidInput

if TYPE_CHECKING:  # paramiko is imported where a key meets SSH: a build loads it while EC2 boots the builder
    import paramiko


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair: OpenSSH private key text and the public key line."""

    private_openssh: str = field(repr=False)
    public_line: str  # "ssh-ed25519 AAAA... comment"

    @classmethod
    def generate(cls, comment: str) -> KeyPair:
        """Return a new key pair; ``comment`` ends the public line."""
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return cls(private, f"{public.decode()} {comment}".strip())

    @classmethod
    def from_file(cls, path: Path) -> KeyPair:
        """Return the user's own key pair from a private key file (for logging in to an instance)."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInput(f"--identity {path}: {exc.strerror}") from None
        import paramiko

        pair = cls(text, "")
        try:
            pair.pkey()
        except (paramiko.SSHException, ValueError) as exc:
            raise InvalidInput(f"--identity {path}: not a private key paramiko can read ({exc})") from None
        return pair

    def pkey(self) -> paramiko.PKey:
        """Return the private key as paramiko wants it (ed25519, ECDSA or RSA)."""
        import paramiko

        last: Exception | None = None
        for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return kind.from_private_key(io.StringIO(self.private_openssh))
            except (paramiko.SSHException, ValueError) as exc:
                last = exc
        raise paramiko.SSHException(f"unreadable private key: {last}")


def public_key(line: str) -> paramiko.PKey:
    """Return the public key of an OpenSSH public key line ("ssh-ed25519 AAAA... comment")."""
    import paramiko

    kind, blob = line.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(blob))

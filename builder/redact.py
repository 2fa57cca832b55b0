"""Keep secrets out of logs: user-data and private key material, in every form botocore logs them.

A builder's user-data carries its pinned SSH host private key. ``--debug`` logs botocore's
request parameters and response bodies, so RunInstances (and any response that echoes
user-data) would put that key in the log. ``redact`` removes it whether it appears as a
PEM block, as a ``UserData`` value (dict repr, JSON, query string, XML) or as base64 that
decodes to a private key or a cloud-config.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import traceback
import urllib.parse

REDACTED = "[redacted]"

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL)
# 'UserData': '...' (a dict's repr) and "UserData": "..." (JSON), quotes and escapes kept whole.
_QUOTED_FIELD = re.compile(r"""(?i)(["']userdata["']\s*:\s*b?)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
# UserData=... and LaunchTemplateData.UserData=... (a query string or an urlencoded body).
_QUERY_FIELD = re.compile(r"(?i)(\buserdata=)[^&\s'\"]*")
# <userData><value>...</value></userData> (EC2's XML answers).
_XML_FIELD = re.compile(r"(?i)(<userdata>\s*(?:<value>)?)[^<]*")
# A plain cloud-config: everything after its header is user-data.
_CLOUD_CONFIG = re.compile(r"#cloud-config(?:\\n|\n).*", re.DOTALL)
# Base64, possibly urlencoded, long enough to hold a key.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]|%2[BbFf]){64,}(?:=|%3[Dd]){0,2}")
_SECRET_MARKS = (b"PRIVATE KEY", b"#cloud-config")


def redact(text: str) -> str:
    """Return ``text`` with user-data and private key material replaced by ``[redacted]``."""
    text = _PEM.sub(REDACTED, text)
    text = _QUOTED_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)[0]}{REDACTED}{m.group(2)[0]}", text)
    text = _QUERY_FIELD.sub(rf"\1{REDACTED}", text)
    text = _XML_FIELD.sub(rf"\1{REDACTED}", text)
    text = _CLOUD_CONFIG.sub(f"#cloud-config {REDACTED}", text)
    return _BASE64.sub(_redact_base64, text)


def _redact_base64(match: re.Match[str]) -> str:
    token = match.group(0)
    whole = urllib.parse.unquote(token).rstrip("=")
    whole = whole[: len(whole) - len(whole) % 4]  # a cut-off token still decodes up to its last full group
    try:
        decoded = base64.b64decode(whole)
    except (binascii.Error, ValueError):
        return token
    return REDACTED if any(mark in decoded for mark in _SECRET_MARKS) else token


class RedactSecrets(logging.Filter):
    """A handler filter that redacts each record's message and traceback before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; return True (every record is still written)."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it as usual
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return True
